"""Quality against compute: one row per core width, written as Markdown, CSV, JSON and a PNG plot.

Each row holds the protocol metrics at that width, the analytic GFLOPs per image
(``model.flops(H, W, num_cores) / 1e9``, attention included), the measured latency of one image
(median and min–max over repeats, after warm-up; ``veca_ssl.timing.measure``) and the
throughput in images/s at the evaluation batch size, on the machine the evaluation runs on.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch

from veca_ssl.widths import Width, width_label

#: Metrics plotted (when present), in this order; lower is better for the depth errors.
PLOT_METRICS: tuple[str, ...] = ("knn_k20_top1", "linear_top1", "logreg_top1", "seg_miou", "depth_rmse")
COMPUTE_COLUMNS = ("gflops", "latency_ms", "latency_min_ms", "latency_max_ms", "images_per_s")


def gflops(model: torch.nn.Module, width: Width, resolution: int) -> float | None:
    """Analytic forward GFLOPs per image at ``width`` (None when the model cannot count them)."""
    if not hasattr(model, "flops"):
        return None
    return float(model.flops(resolution, resolution, width)) / 1e9


@torch.no_grad()
def measure_speed(model: torch.nn.Module, width: Width, resolution: int, batch_size: int,
                  device: torch.device | str, warmup: int = 3, repeats: int = 5) -> dict[str, float]:
    """Latency of one image (ms: median, min, max) and images/s at ``batch_size``."""
    from veca_ssl.timing import measure

    device = torch.device(device)
    kwargs = {} if width is None else {"num_cores": width}
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())
    model = model.eval()

    def run(x: torch.Tensor) -> None:
        with autocast:
            model.forward_features(x, **kwargs)

    one = torch.randn(1, 3, resolution, resolution, device=device)
    lat = measure(lambda: run(one), warmup=warmup, repeats=repeats, device=device)
    if batch_size > 1:
        batch = torch.randn(batch_size, 3, resolution, resolution, device=device)
        thr = measure(lambda: run(batch), warmup=warmup, repeats=repeats, device=device).median
    else:
        thr = lat.median
    return {"latency_ms": lat.median * 1e3, "latency_min_ms": lat.min * 1e3, "latency_max_ms": lat.max * 1e3,
            "images_per_s": batch_size / thr}


def build_rows(model: torch.nn.Module, metrics: dict[Width, dict], resolution: int, batch_size: int = 64,
               device: torch.device | str = "cpu", speed: bool = True, warmup: int = 3, repeats: int = 5,
               reference: bool = False) -> list[dict]:
    """One row per width (order of ``metrics``): label, metrics, GFLOPs and (optionally) speed."""
    rows = []
    for w, values in metrics.items():
        row: dict = {"width": width_label(w), "num_cores": w, "reference": reference}
        row.update(values)
        row["gflops"] = gflops(model, w, resolution)
        if speed:
            row.update(measure_speed(model, w, resolution, batch_size, device, warmup, repeats))
        rows.append(row)
    return rows


def merge_metrics(*per_protocol: dict[Width, dict]) -> dict[Width, dict]:
    """``{w: {...knn}}, {w: {...linear}}`` → ``{w: {...knn, ...linear}}`` (first-seen width order)."""
    out: dict[Width, dict] = {}
    for metrics in per_protocol:
        for w, values in metrics.items():
            out.setdefault(w, {}).update(values)
    return out


def _clean(v: object) -> object:
    if isinstance(v, float) and not math.isfinite(v):
        return None  # NaN/Inf are not valid JSON
    return v


def _columns(rows: Sequence[dict]) -> list[str]:
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    metric_cols = [c for c in cols if c not in COMPUTE_COLUMNS]
    return metric_cols + [c for c in COMPUTE_COLUMNS if c in cols]


def markdown(rows: Sequence[dict], title: str = "Evaluation", meta: dict | None = None) -> str:
    """The report as Markdown: a heading, the run facts and the table (latency as median (min–max))."""
    from veca_ssl.tables import markdown_table

    shown = []
    for r in rows:
        s = {k: v for k, v in r.items() if k not in ("latency_min_ms", "latency_max_ms", "num_cores")}
        if not any(x.get("reference") for x in rows):
            s.pop("reference", None)
        if r.get("latency_ms") is not None:
            s["latency_ms"] = f"{r['latency_ms']:.2f} ({r['latency_min_ms']:.2f}–{r['latency_max_ms']:.2f})"
        shown.append(s)
    lines = [f"# {title}", ""]
    lines += [f"- {k}: {v}" for k, v in (meta or {}).items()]
    lines += ["", markdown_table(shown, [c for c in _columns(shown)]), ""]
    return "\n".join(lines)


def plot(rows: Sequence[dict], path: str | Path, title: str = "") -> Path | None:
    """Metric vs GFLOPs, one subplot per metric of :data:`PLOT_METRICS` present, points labelled C."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def present(m: str) -> bool:
        return any(isinstance(r.get(m), int | float) and not isinstance(r.get(m), bool) for r in rows)

    metrics = [m for m in PLOT_METRICS if present(m)]
    if not present("knn_k20_top1"):  # k-NN run with other k: plot the first top-1 there is
        knn = [k for r in rows for k in r if k.startswith("knn_k") and k.endswith("_top1") and present(k)]
        metrics = knn[:1] + metrics
    if not metrics:
        metrics = [k for k, v in rows[0].items() if isinstance(v, float) and k not in COMPUTE_COLUMNS][:4]
    fig, axes = plt.subplots(1, max(1, len(metrics)), figsize=(4.2 * max(1, len(metrics)), 3.6), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        main = [r for r in rows if not r.get("reference") and r.get("gflops") is not None and r.get(metric) is not None]
        refs = [r for r in rows if r.get("reference") and r.get("gflops") is not None and r.get(metric) is not None]
        if main:
            ax.plot([r["gflops"] for r in main], [r[metric] for r in main], "o-", label="VECA widths")
            for r in main:
                ax.annotate(r["width"], (r["gflops"], r[metric]), textcoords="offset points", xytext=(4, 4),
                            fontsize=8)
        for r in refs:
            ax.plot(r["gflops"], r[metric], "*", markersize=12, label=f"reference ({r['width']})")
        ax.margins(x=0.2, y=0.15)  # room for the point labels
        ax.set_xlabel("GFLOPs / image")
        ax.set_ylabel(metric + (" (lower is better)" if metric.startswith("depth_") else ""))
        ax.grid(alpha=0.3)
        if refs:
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(rows: Sequence[dict], output_dir: str | Path, title: str = "Evaluation",
                 meta: dict | None = None) -> dict[str, Path]:
    """Write ``report.md``, ``report.csv``, ``report.json`` and ``report.png`` into ``output_dir``."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {ext: out / f"report.{ext}" for ext in ("md", "csv", "json", "png")}
    paths["md"].write_text(markdown(rows, title, meta))
    cols = _columns(rows)
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=cols)
        writer.writeheader()
        writer.writerows([{c: r.get(c) for c in cols} for r in rows])
    doc = {"title": title, **(meta or {}), "rows": [{c: _clean(r.get(c)) for c in cols} for r in rows]}
    paths["json"].write_text(json.dumps(doc, indent=2, default=str))
    plot(rows, paths["png"], title)
    return paths


def finish_report(ctx, args, metrics: dict[Width, dict], title: str, protocol: str) -> list[dict]:
    """Shared tail of every ``veca eval <protocol>``: rows with compute, files on rank 0, print table."""
    from eval.common import is_main_process

    rows = build_rows(ctx.model, metrics, args.resolution, args.batch_size, ctx.device,
                      speed=not args.no_speed, warmup=args.speed_warmup, repeats=args.speed_repeats)
    if is_main_process():
        meta = {"model": ctx.model_name, "protocol": protocol, "resolution": args.resolution,
                "device": str(ctx.device), "train": getattr(args, "train", None),
                "test": getattr(args, "test", None)}
        if getattr(ctx, "data_skips", None):  # unusable images left out, per dataset
            meta["data_skips"] = ctx.data_skips
        paths = write_report(rows, ctx.output_dir, f"{title} — {ctx.model_name}", meta)
        print(paths["md"].read_text())
        print(f"report written to {ctx.output_dir}/report.{{md,csv,json,png}}")
    return rows
