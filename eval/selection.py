"""``veca select``: pick the core width to deploy from an eval report and a latency measurement.

An elastic backbone runs at any width of its budget list, so the deployment question is which one.
From an eval report (quality per width, with bootstrap intervals) and latency measured here, at the
target resolution and batch size, ``veca select`` chooses

- by default, the **smallest width whose quality is within ``--tolerance`` of the widest's**
  (points for percentages; metric units otherwise; "within" respects lower-is-better metrics), or
- with ``--max-latency-ms`` and/or ``--max-gflops``, the **best width under the budget(s)** (ties:
  the smaller width),

prints the trade-off table, and writes ``selection.json`` (+ ``selection.md``, ``selection.png`` with
the chosen width ringed) next to the report or into ``--output-dir``.

``selection.json`` (format ``veca-ssl-width-selection``, version 1) is what ``veca extract
--width-from`` and ``veca export --width-from`` read (``veca_ssl.selection.read_selection``); its keys:

- ``width`` (int; null for a dense ViT) and ``width_label`` (``"C16"``): the choice;
- ``rule`` (text), ``criterion`` (``tolerance``, ``max_latency_ms``, ``max_gflops``), ``metric``,
  ``higher_is_better``;
- ``quality``, ``quality_ci`` ([low, high] or null), ``widest`` (``width``, ``quality``);
- ``gflops``, ``latency_ms``, ``images_per_s`` of the choice, measured at ``resolution`` and
  ``batch_size`` on ``device`` (``latency_source``: ``measured`` here, or ``report``), ``host``, with
  ``threads`` intra-op threads at ``load_average`` ([before, after] the measurement, 1 minute);
- ``checkpoint``/``model`` (what was measured), ``report`` (the path read);
- ``candidates``: every width with the same fields and ``eligible``.
"""

from __future__ import annotations

import json
import math
import platform
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eval.config import ModelSource, check_source
from eval.options import (
    ArgumentParser,
    EvalConfigError,
    HelpFormatter,
    add_debug_option,
    add_fields,
    at_least,
    check_fields,
    flag_names,
    from_mapping,
    in_cli_terms,
    namespace_to_mapping,
    opt,
    positive,
)
from veca_ssl.selection import (  # read_selection: re-exported for eval users
    SELECTION_FORMAT,
    SELECTION_VERSION,
    SelectionError,
    read_selection,  # noqa: F401
)


@dataclass
class SelectOptions:
    """What ``veca select`` reads, the rule it applies and where it measures."""

    report: str | None = opt(None, "eval report: report.json, or the run directory holding it", metavar="PATH")
    metric: str | None = opt(None, "quality column of the report", metavar="NAME",
                             default_text="the first of knn_k20_top1, linear_top1, logreg_top1, seg_miou, "
                                          "depth_rmse in the report")
    tolerance: float | None = opt(None, "pick the smallest width within this much of the widest width's quality "
                                        "(points for percentages); not together with a budget",
                                  default_text="1.0 when no budget is given",
                                  rule=at_least(0))
    max_latency_ms: float | None = opt(None, "latency budget: pick the best width whose measured latency per batch "
                                             "is at most this", default_text="none", rule=positive(), metavar="MS")
    max_gflops: float | None = opt(None, "compute budget: pick the best width with at most this many GFLOPs per "
                                         "image", default_text="none", rule=positive(), metavar="GFLOPS")
    resolution: int | None = opt(None, "target image side for the latency and GFLOPs; a multiple of the patch size",
                                 default_text="the report's resolution", rule=at_least(1))
    batch_size: int = opt(1, "target batch size of the latency measurement", rule=at_least(1))
    device: str = opt("auto", "where to measure: auto (CUDA when available) | cpu | cuda | cuda:N",
                      metavar="DEVICE")
    latency_from_report: bool = opt(False, "use the report's latency and GFLOPs (measured during the eval at its "
                                           "resolution, 1 image) instead of measuring here")
    speed_warmup: int = opt(3, "untimed warm-up calls per width", rule=at_least(0))
    speed_repeats: int = opt(10, "timed calls per width (median used, min-max shown)", rule=at_least(1))
    num_threads: int = opt(0, "intra-op CPU threads of the measurement; 0 = veca train's policy: the cores this "
                              "process may use, at least 1 (OMP_NUM_THREADS, when set, wins)",
                           default_text="0 (auto)", rule=at_least(0))
    output_dir: str | None = opt(None, "where selection.{json,md,png} go", metavar="DIR",
                                 default_text="the report's directory")
    overwrite: bool = opt(False, "replace an earlier selection.json in that directory")


DEFAULT_TOLERANCE = 1.0


# --------------------------------------------------------------------------------------------- choosing
def select_width(candidates: Sequence[dict], metric: str, higher_is_better: bool = True,
                 tolerance: float | None = None, max_latency_ms: float | None = None,
                 max_gflops: float | None = None) -> tuple[dict, str]:
    """Choose among ``candidates`` (dicts with ``num_cores``, ``quality``, ``latency_ms``, ``gflops``).

    With a budget: the best quality among widths within every budget (ties → fewer cores). Else: the
    fewest cores whose quality is within ``tolerance`` of the widest width's. Returns ``(candidate, rule)``
    and marks each candidate's ``eligible``; SelectionError when no width meets the budget.
    """
    if not candidates:
        raise SelectionError("the report has no width rows to choose from")
    if tolerance is not None and (max_latency_ms is not None or max_gflops is not None):
        raise SelectionError("give either --tolerance or a budget (--max-latency-ms/--max-gflops), not both")
    by_width = sorted(candidates, key=lambda c: c["num_cores"])
    sign = 1.0 if higher_is_better else -1.0
    if max_latency_ms is not None or max_gflops is not None:
        limits = []
        for key, limit, unit in (("latency_ms", max_latency_ms, "ms"), ("gflops", max_gflops, "GFLOPs")):
            if limit is None:
                continue
            if any(c.get(key) is None for c in by_width):
                raise SelectionError(f"the budget on {key} needs {key} for every width; the report has none "
                                     "(measure here, without --latency-from-report, or rerun the eval with --speed)")
            limits.append((key, limit, unit))
        for c in by_width:
            c["eligible"] = all(c[key] <= limit for key, limit, _ in limits)
        eligible = [c for c in by_width if c["eligible"]]
        if not eligible:
            parts = []
            for key, limit, unit in limits:
                best = min(by_width, key=lambda c: c[key])
                parts.append(f"{key} <= {limit:g} {unit} (the lowest is {best[key]:.4g} {unit}, at "
                             f"{best['width']})")
            raise SelectionError(f"no width meets the budget {' and '.join(parts)}; raise the budget, lower the "
                                 "resolution or batch size, or measure on faster hardware")
        chosen = max(eligible, key=lambda c: (sign * c["quality"], -c["num_cores"]))
        rule = (f"best {metric} with " + " and ".join(f"{key} <= {limit:g} {unit}" for key, limit, unit in limits))
        return chosen, rule
    tol = DEFAULT_TOLERANCE if tolerance is None else tolerance
    widest = by_width[-1]
    for c in by_width:
        c["eligible"] = sign * (c["quality"] - widest["quality"]) >= -tol - 1e-9
    chosen = next(c for c in by_width if c["eligible"])
    rule = f"smallest width with {metric} within {tol:g} of the widest ({widest['width']}: {widest['quality']:.4g})"
    return chosen, rule


# --------------------------------------------------------------------------------------------- report
def read_report(path: str | Path) -> tuple[dict, Path]:
    """The report JSON (``report.json`` or a directory holding it) and its path."""
    p = Path(path)
    if p.is_dir():
        p = p / "report.json"
    if not p.is_file():
        raise FileNotFoundError(f"eval report not found: {str(p)!r} (pass a report.json or the run directory "
                                "of `veca eval`)")
    try:
        doc = json.loads(p.read_text())
    except ValueError as exc:
        raise SelectionError(f"{p} is not a JSON report: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("rows"), list):
        raise SelectionError(f"{p} has no 'rows' list; is it a `veca eval` report.json?")
    return doc, p


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(float(v))


def candidates_from_report(doc: dict, metric: str | None) -> tuple[list[dict], str]:
    """One candidate per elastic width of the report (reference rows excluded) and the metric used."""
    from eval.report import plot_metrics

    rows = [r for r in doc["rows"] if not r.get("reference")]
    if not rows:
        raise SelectionError("the report has no rows of the evaluated backbone (only reference rows)")
    if metric is None:
        metric = (plot_metrics(rows) or [None])[0]
        if metric is None:
            raise SelectionError("the report has no quality column; pass --metric")
    available = sorted({k for r in rows for k, v in r.items() if _number(v) and not k.endswith(("_ci_lo", "_ci_hi"))
                        and k not in ("num_cores", "gflops", "latency_ms", "latency_min_ms", "latency_max_ms",
                                      "images_per_s")})
    if any(not _number(r.get(metric)) for r in rows):
        raise SelectionError(f"metric {metric!r} is missing from the report rows; available: {', '.join(available)}")
    out = []
    for r in rows:
        lo, hi = r.get(f"{metric}_ci_lo"), r.get(f"{metric}_ci_hi")
        out.append({"width": r["width"], "num_cores": r.get("num_cores"), "quality": float(r[metric]),
                    "quality_ci": [lo, hi] if _number(lo) and _number(hi) else None,
                    "gflops": r.get("gflops"), "latency_ms": r.get("latency_ms"),
                    "latency_min_ms": r.get("latency_min_ms"), "latency_max_ms": r.get("latency_max_ms"),
                    "images_per_s": r.get("images_per_s")})
    if any(c["num_cores"] is None for c in out) and len(out) > 1:
        raise SelectionError("the report mixes dense and elastic rows; nothing to choose between")
    for c in out:
        c["num_cores"] = c["num_cores"] if c["num_cores"] is not None else 0
    return out, metric


def measure_candidates(candidates: list[dict], src: ModelSource, seed: int, resolution: int, batch_size: int,
                       device: str, warmup: int, repeats: int, num_threads: int = 0,
                       conditions: dict | None = None) -> str:
    """Replace each candidate's latency/GFLOPs by a measurement here at ``resolution`` and ``batch_size``,
    with ``veca train``'s thread policy (``--num-threads``).

    Latency is one forward of a batch (median of ``repeats``, min–max kept); returns the device used.
    ``conditions`` gets the threads and the load average of the measurement (``text``, ``threads``,
    ``cores``, ``load_average`` [before, after]).
    """
    from eval.common import thread_policy

    conditions = {} if conditions is None else conditions
    with thread_policy(num_threads, 0) as threads:
        conditions["policy"] = threads
        return _measure(candidates, src, seed, resolution, batch_size, device, warmup, repeats, conditions)


def _measure(candidates: list[dict], src: ModelSource, seed: int, resolution: int, batch_size: int,
             device: str, warmup: int, repeats: int, conditions: dict) -> str:
    import torch

    from eval.common import load_model, resolve_device
    from eval.report import gflops, time_forward
    from veca_ssl.threads import conditions_text, timing_conditions

    dev = resolve_device(device)
    model = load_model(src, seed).to(dev)
    patch = int(getattr(model, "patch_size", 1))
    if resolution % patch:
        raise EvalConfigError(f"--resolution {resolution} is not a multiple of the patch size {patch}")
    budgets = tuple(getattr(model, "budgets", ()) or ())
    x = torch.randn(batch_size, 3, resolution, resolution, device=dev)
    before = timing_conditions()
    for c in candidates:
        width = c["num_cores"] or None
        if budgets and width not in budgets:
            raise SelectionError(f"the report's width {c['width']} is not a budget of the measured model "
                                 f"{list(budgets)}; pass the checkpoint the report evaluated")
        stats = time_forward(model, width, x, warmup, repeats)
        c.update(latency_ms=stats.median * 1e3, latency_min_ms=stats.min * 1e3, latency_max_ms=stats.max * 1e3,
                 images_per_s=batch_size / stats.median, gflops=gflops(model, width, resolution))
    after = timing_conditions()
    conditions.update(text=conditions_text(before, after), threads=before["threads"], cores=before["cores"],
                      load_average=[before["load_average"], after["load_average"]])
    return str(dev)


def table(candidates: Sequence[dict], metric: str, chosen: dict, widest_quality: float) -> str:
    """The trade-off table (Markdown)."""
    from veca_ssl.tables import markdown_table

    rows = []
    for c in candidates:
        ci = c.get("quality_ci")
        rows.append({
            "width": c["width"] + (" ◀ selected" if c is chosen else ""),
            metric: f"{c['quality']:.4g}" + (f" [{ci[0]:.4g}, {ci[1]:.4g}]" if ci else ""),
            "vs widest": f"{c['quality'] - widest_quality:+.3g}",
            "gflops": c.get("gflops"),
            "latency_ms": (f"{c['latency_ms']:.3g} ({c['latency_min_ms']:.3g}–{c['latency_max_ms']:.3g})"
                           if _number(c.get("latency_ms")) and _number(c.get("latency_min_ms")) else c.get("latency_ms")),
            "images_per_s": c.get("images_per_s"),
            "eligible": "yes" if c.get("eligible") else "no",
        })
    return markdown_table(rows)


# --------------------------------------------------------------------------------------------- CLI
def build_parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="veca select", formatter_class=HelpFormatter, allow_abbrev=False,
        description="Pick the core width to deploy. From an eval report (quality per width) and latency measured "
                    "here at the target resolution and batch size: the smallest width within --tolerance of the "
                    "widest width's quality (default), or the best width under --max-latency-ms and/or "
                    "--max-gflops.",
        epilog="Prints the trade-off table and writes selection.json (+ selection.md, and selection.png with the "
               "choice ringed) next to the report or into --output-dir.\n`veca extract --width-from "
               "selection.json` (and `veca export`) read it: its 'width' (int; null for a dense ViT), "
               "'resolution' and 'batch_size' targeted, 'latency_ms', 'gflops', 'quality', 'rule', 'checkpoint' "
               "and every candidate (format veca-ssl-width-selection, version 1).")
    g = p.add_argument_group("report and rule")
    add_fields(g, SelectOptions, only=("report", "metric", "tolerance", "max_latency_ms", "max_gflops"),
               required=("report",))
    m = p.add_argument_group("measurement (model: the report's, unless --checkpoint/--model)")
    add_fields(m, SelectOptions, only=("resolution", "batch_size", "device", "num_threads", "latency_from_report",
                                       "speed_warmup", "speed_repeats"))
    add_fields(m, ModelSource, prefix="model.")
    o = p.add_argument_group("output")
    add_fields(o, SelectOptions, only=("output_dir", "overwrite"))
    add_debug_option(p)
    return p


def run_select(opts: SelectOptions, src: ModelSource | None = None, seed: int = 0) -> dict:
    """Apply ``opts``; print the table; write ``selection.{json,md,png}``; return the selection document."""
    if not opts.report:
        raise EvalConfigError("--report is required: a report.json of `veca eval`, or its run directory")
    doc, report_path = read_report(opts.report)
    out_dir = Path(opts.output_dir) if opts.output_dir else report_path.parent
    target = out_dir / "selection.json"
    if target.exists() and not opts.overwrite:
        raise FileExistsError(f"{target} already holds a selection; pass --overwrite to replace it, or choose "
                              "another --output-dir")
    candidates, metric = candidates_from_report(doc, opts.metric)
    from eval.report import higher_is_better, plot

    config = doc.get("config") or {}
    report_res = doc.get("resolution")
    resolution = opts.resolution or report_res
    if opts.latency_from_report:
        if opts.resolution is not None and opts.resolution != report_res:
            raise EvalConfigError(f"--latency-from-report: the report was measured at {report_res} px, not "
                                  f"--resolution {opts.resolution}; drop one of them")
        if opts.batch_size != 1:
            raise EvalConfigError("--latency-from-report: the report's latency is of one image; drop --batch-size")
        device, source, batch = doc.get("device"), "report", 1
        conditions = {"text": doc.get("timing") or "threads and load average not recorded in the report",
                      **(doc.get("timing_conditions") or {})}
    else:
        if src is None or (src.checkpoint is None and src.model is None):
            src = from_mapping(ModelSource, {k: config.get(k) for k in ("checkpoint", "model", "patch_size",
                                                                          "num_cores", "model_args", "features")
                                             if config.get(k) not in (None, {})})
            seed = int(config.get("seed") or 0)
            if src.checkpoint is None and src.model is None:
                raise EvalConfigError("the report names no model to measure; pass --checkpoint (or "
                                      "--latency-from-report to use the report's latency)")
        check_source(src)
        if resolution is None:
            raise EvalConfigError("the report has no resolution; pass --resolution")
        conditions = {}
        device = measure_candidates(candidates, src, seed, int(resolution), opts.batch_size, opts.device,
                                    opts.speed_warmup, opts.speed_repeats, opts.num_threads, conditions)
        source, batch = "measured", opts.batch_size
    hib = higher_is_better(metric)
    chosen, rule = select_width(candidates, metric, hib, opts.tolerance, opts.max_latency_ms, opts.max_gflops)
    widest = max(candidates, key=lambda c: c["num_cores"])
    text = table(candidates, metric, chosen, widest["quality"])
    where = (f"{resolution} px, batch {batch}, {device} ({'measured here' if source == 'measured' else 'from the report'}"
             f"; {conditions['text']})")
    selection = {
        "format": SELECTION_FORMAT, "version": SELECTION_VERSION,
        "width": chosen["num_cores"] or None, "width_label": chosen["width"], "rule": rule,
        "criterion": {"tolerance": (opts.tolerance if opts.tolerance is not None else
                                    (DEFAULT_TOLERANCE if opts.max_latency_ms is None and opts.max_gflops is None
                                     else None)),
                      "max_latency_ms": opts.max_latency_ms, "max_gflops": opts.max_gflops},
        "metric": metric, "higher_is_better": hib, "quality": chosen["quality"], "quality_ci": chosen["quality_ci"],
        "widest": {"width": widest["num_cores"] or None, "quality": widest["quality"]},
        "gflops": chosen.get("gflops"), "latency_ms": chosen.get("latency_ms"),
        "images_per_s": chosen.get("images_per_s"), "resolution": resolution, "batch_size": batch,
        "device": device, "latency_source": source, "host": platform.node(),
        "threads": conditions.get("threads"), "load_average": conditions.get("load_average"),
        "checkpoint": (src.checkpoint if source == "measured" and src is not None else config.get("checkpoint")),
        "model": (src.model if source == "measured" and src is not None else config.get("model")),
        "report": str(report_path),
        "candidates": [{k: c.get(k) for k in ("width", "num_cores", "quality", "quality_ci", "gflops", "latency_ms",
                                              "latency_min_ms", "latency_max_ms", "images_per_s", "eligible")}
                       for c in candidates],
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(selection, indent=2) + "\n")
    threads = f"- threads: {conditions['policy']}\n" if "policy" in conditions else ""
    md = (f"# Width selection: {chosen['width']}\n\n- rule: {rule}\n- speed: {where}\n{threads}- report: "
          f"{report_path}\n\n{text}\n")
    (out_dir / "selection.md").write_text(md)
    rows = [{"width": c["width"], "reference": False, metric: c["quality"], "gflops": c.get("gflops"),
             "latency_ms": c.get("latency_ms"),
             **({f"{metric}_ci_lo": c["quality_ci"][0], f"{metric}_ci_hi": c["quality_ci"][1]} if c["quality_ci"] else {})}
            for c in candidates]
    plot(rows, out_dir / "selection.png", f"Width selection: {chosen['width']} — {rule}; speed at {where}",
         selected=chosen["width"], metrics=[metric],
         budgets={"latency_ms": opts.max_latency_ms, "gflops": opts.max_gflops},
         latency_label=f"latency (ms / batch of {batch})")
    print(md)
    print(f"selected {chosen['width']} → {target} (use: veca extract --width-from {target})")
    return selection


def main(argv: list[str] | None = None) -> int:
    from eval.cli import run_user_command

    argv = list(sys.argv[1:] if argv is None else argv)

    def body() -> int:
        parser = build_parser()
        data = namespace_to_mapping(parser.parse_args(argv))
        src_data = data.pop("model", {})
        try:
            opts = check_fields(from_mapping(SelectOptions, data))
            src = check_fields(from_mapping(ModelSource, src_data)) if src_data else None
        except EvalConfigError as exc:
            raise in_cli_terms(exc, {k.removeprefix("model."): v for k, v in flag_names(parser).items()}) from None
        run_select(opts, src)
        return 0

    return run_user_command("veca select", body, argv)


if __name__ == "__main__":
    sys.exit(main())
