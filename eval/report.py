"""Quality against compute: one row per core width, written as Markdown, CSV, JSON and a PNG plot.

Each row holds the protocol metrics at that width (with 95% bootstrap intervals as ``<metric>_ci_lo``
/ ``<metric>_ci_hi``), the analytic GFLOPs per image (``model.flops(H, W, num_cores) / 1e9``, attention
included), the measured latency of one image (median and min–max over repeats, after warm-up;
``veca_ssl.timing.measure``) and the throughput in images/s at the evaluation batch size, on the
machine the evaluation runs on. The plot draws every headline metric against GFLOPs and against
latency, with the intervals as error bars.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import textwrap
from collections.abc import Sequence
from pathlib import Path

import torch

from veca_ssl.widths import Width, width_label

#: Metrics plotted (when present), in this order; lower is better for the depth errors.
PLOT_METRICS: tuple[str, ...] = ("knn_k20_top1", "linear_top1", "logreg_top1", "seg_miou", "depth_rmse")
COMPUTE_COLUMNS = ("gflops", "latency_ms", "latency_min_ms", "latency_max_ms", "images_per_s")
#: Smallest y-axis span of a metric in percent: a difference of a few points between widths is drawn
#: as a few points, not stretched over the whole axis.
MIN_PERCENT_SPAN = 10.0
#: Smallest y-axis span of other metrics (errors such as depth RMSE), relative to their mean.
MIN_RELATIVE_SPAN = 0.2


def higher_is_better(metric: str) -> bool:
    """Accuracies and mIoU: higher is better; depth errors: lower is better."""
    return not metric.startswith("depth_")


def is_percent(metric: str) -> bool:
    return any(tag in metric for tag in ("top1", "top5", "miou", "acc"))


def gflops(model: torch.nn.Module, width: Width, resolution: int) -> float | None:
    """Analytic forward GFLOPs per image at ``width`` (None when the model cannot count them)."""
    if not hasattr(model, "flops"):
        return None
    return float(model.flops(resolution, resolution, width)) / 1e9


@torch.no_grad()
def time_forward(model: torch.nn.Module, width: Width, images: torch.Tensor, warmup: int = 3, repeats: int = 5):
    """``veca_ssl.timing.Stats`` (seconds) of ``model.forward_features(images)`` at ``width`` (bf16 on CUDA)."""
    from veca_ssl.timing import measure

    device = images.device
    kwargs = {} if width is None else {"num_cores": width}
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())
    model = model.eval()

    def run() -> None:
        with autocast:
            model.forward_features(images, **kwargs)

    return measure(run, warmup=warmup, repeats=repeats, device=device)


def measure_speed(model: torch.nn.Module, width: Width, resolution: int, batch_size: int,
                  device: torch.device | str, warmup: int = 3, repeats: int = 5) -> dict[str, float]:
    """Latency of one image (ms: median, min, max) and images/s at ``batch_size``."""
    device = torch.device(device)
    lat = time_forward(model, width, torch.randn(1, 3, resolution, resolution, device=device), warmup, repeats)
    if batch_size > 1:
        batch = torch.randn(batch_size, 3, resolution, resolution, device=device)
        thr = time_forward(model, width, batch, warmup, repeats).median
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


def _number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(float(v))


def markdown(rows: Sequence[dict], title: str = "Evaluation", meta: dict | None = None) -> str:
    """The report as Markdown: a heading, the run facts and the table.

    A metric with an interval reads ``value [low, high]``; latency reads ``median (min–max)``.
    """
    from veca_ssl.tables import markdown_table

    shown = []
    for r in rows:
        s = {}
        for k, v in r.items():
            if k in ("latency_min_ms", "latency_max_ms", "num_cores") or k.endswith(("_ci_lo", "_ci_hi")):
                continue
            if k == "reference" and not any(x.get("reference") for x in rows):
                continue
            lo, hi = r.get(f"{k}_ci_lo"), r.get(f"{k}_ci_hi")
            if _number(v) and _number(lo) and _number(hi):
                v = f"{v:.4g} [{lo:.4g}, {hi:.4g}]"
            s[k] = v
        if _number(r.get("latency_ms")) and _number(r.get("latency_min_ms")) and _number(r.get("latency_max_ms")):
            s["latency_ms"] = f"{r['latency_ms']:.2f} ({r['latency_min_ms']:.2f}–{r['latency_max_ms']:.2f})"
        shown.append(s)
    lines = [f"# {title}", ""]
    lines += [f"- {k}: {v}" for k, v in (meta or {}).items() if v is not None and not isinstance(v, dict)]
    skips = (meta or {}).get("data_skips") or {}
    if skips:  # every dataset's count, zero included: "0 unusable" is a fact, a missing line is not
        lines.append("- images read (unusable, left out): " + ", ".join(
            f"{name} {s.get('seen', '?')} ({s.get('skipped', 0)})" for name, s in skips.items()))
    if any(k.endswith("_ci_lo") for r in rows for k in r):
        lines.append("- intervals: 95% bootstrap over the test images, one width at a time")
    lines += ["", markdown_table(shown, _columns(shown)), ""]
    return "\n".join(lines)


def plot_metrics(rows: Sequence[dict]) -> list[str]:
    """The headline metrics present in ``rows``, in :data:`PLOT_METRICS` order."""
    def present(m: str) -> bool:
        return any(_number(r.get(m)) for r in rows)

    metrics = [m for m in PLOT_METRICS if present(m)]
    if not present("knn_k20_top1"):  # k-NN run with other k: plot the first top-1 there is
        knn = [k for r in rows for k in r if k.startswith("knn_k") and k.endswith("_top1") and present(k)]
        metrics = knn[:1] + metrics
    if not metrics:
        metrics = [k for k, v in rows[0].items() if isinstance(v, float) and k not in COMPUTE_COLUMNS
                   and not k.endswith(("_ci_lo", "_ci_hi"))][:4]
    return metrics


def y_limits(values: Sequence[float], metric: str) -> tuple[float, float]:
    """A y-range holding every value and interval end, at least :data:`MIN_PERCENT_SPAN` points wide for
    percentages (:data:`MIN_RELATIVE_SPAN` of the mean otherwise), so noise does not read as a trend."""
    vals = [float(v) for v in values if _number(v)]
    if not vals:
        return 0.0, 1.0
    lo, hi = min(vals), max(vals)
    if is_percent(metric):
        min_span = MIN_PERCENT_SPAN
    else:
        min_span = MIN_RELATIVE_SPAN * max(abs(sum(vals) / len(vals)), 1e-12)
    if hi - lo < min_span:
        mid = (lo + hi) / 2
        lo, hi = mid - min_span / 2, mid + min_span / 2
    pad = 0.08 * (hi - lo)
    lo, hi = lo - pad, hi + pad
    if is_percent(metric):  # stay inside [0, 100], keeping the span
        if lo < 0:
            lo, hi = 0.0, min(100.0, hi - lo)
        if hi > 100:
            lo, hi = max(0.0, lo - (hi - 100)), 100.0
    return lo, hi


def plot(rows: Sequence[dict], path: str | Path, title: str = "", selected: str | None = None,
         metrics: Sequence[str] | None = None, budgets: dict[str, float | None] | None = None,
         latency_label: str = "latency (ms / image)") -> Path:
    """Save :func:`figure` as a PNG at ``path``."""
    fig = figure(rows, title, selected, metrics, budgets, latency_label)  # selects the Agg backend first
    import matplotlib.pyplot as plt

    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def figure(rows: Sequence[dict], title: str = "", selected: str | None = None, metrics: Sequence[str] | None = None,
           budgets: dict[str, float | None] | None = None, latency_label: str = "latency (ms / image)"):
    """Each headline metric (rows of subplots) against GFLOPs and, when measured, latency (columns).

    Error bars are the rows' bootstrap intervals; ``selected`` (a width label such as ``"C16"``) is
    ringed and named in the legend; ``budgets`` (``{"gflops": x, "latency_ms": y}``) are drawn as
    dashed vertical lines. Returns the matplotlib figure.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = list(metrics or plot_metrics(rows))
    xs = [("gflops", "GFLOPs / image")]
    if any(_number(r.get("latency_ms")) for r in rows):
        xs.append(("latency_ms", latency_label))
    n_r, n_c = max(1, len(metrics)), len(xs)
    fig_w = 4.8 * n_c + 0.4
    fig, axes = plt.subplots(n_r, n_c, figsize=(fig_w, 3.3 * n_r + 0.9), squeeze=False, layout="constrained")
    for i, metric in enumerate(metrics):
        for j, (xkey, xlabel) in enumerate(xs):
            ax = axes[i][j]
            ys: list[float] = []
            for ref in (False, True):
                pts = [r for r in rows if bool(r.get("reference")) == ref and _number(r.get(xkey))
                       and _number(r.get(metric))]
                if not pts:
                    continue
                x = [r[xkey] for r in pts]
                y = [r[metric] for r in pts]
                lo = [r.get(f"{metric}_ci_lo") for r in pts]
                hi = [r.get(f"{metric}_ci_hi") for r in pts]
                has_ci = all(_number(a) and _number(b) for a, b in zip(lo, hi))
                yerr = [[v - a for v, a in zip(y, lo)], [b - v for v, b in zip(y, hi)]] if has_ci else None
                ys += y + ([v for v in lo + hi] if has_ci else [])
                if ref:
                    ax.errorbar(x, y, yerr=yerr, fmt="*", markersize=12, capsize=3, color="tab:orange",
                                label="reference (dense ViT)")
                else:
                    ax.errorbar(x, y, yerr=yerr, fmt="o-", capsize=3, color="tab:blue",
                                label="VECA widths" + (" (95% CI)" if has_ci else ""))
                for r in pts:
                    ax.annotate(r["width"], (r[xkey], r[metric]), textcoords="offset points", xytext=(5, 5),
                                fontsize=8)
                chosen = [r for r in pts if r["width"] == selected and not ref]
                if chosen:
                    ax.scatter([chosen[0][xkey]], [chosen[0][metric]], s=260, facecolors="none",
                               edgecolors="tab:red", linewidths=2, zorder=5, label=f"selected: {selected}")
            if budgets and budgets.get(xkey) is not None:
                ax.axvline(budgets[xkey], color="tab:red", linestyle="--", linewidth=1,
                           label=f"budget {budgets[xkey]:g}")
            ax.set_ylim(*y_limits(ys, metric))
            ax.margins(x=0.15)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(metric + (" (%)" if is_percent(metric) else "")
                          + ("" if higher_is_better(metric) else " (lower is better)"))
            ax.grid(alpha=0.3)
            if i == 0 and (j == 0 or (budgets and budgets.get(xkey) is not None)):
                ax.legend(fontsize=7, loc="best")
    if title:
        # Wrapped to the figure width (about 11 characters per inch at this size), never cut off.
        fig.suptitle(textwrap.fill(title, width=max(30, int(fig_w * 11))), fontsize=11)
    return fig


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
