"""One evaluation run: config → model → features → protocols → report.

The single path behind ``veca eval <protocol>``, ``veca eval all`` and the Python API::

    from eval import EvalConfig, DataOptions, evaluate
    result = evaluate(EvalConfig(checkpoint="outputs/quickstart", protocols=("knn",),
                                 datasets=DataOptions(train="digits@train", test="digits@val")))
    result.rows, result.run_dir   # one row per width; <output_dir>/knn/report.{md,csv,json,png}

Image features are extracted once per dataset (every width on each batch) and shared by k-NN, the
linear probe and logistic regression; dense probes extract patch tokens of their own datasets.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from eval.common import (
    check_paths,
    classification_features,
    guard_output,
    load_model,
    model_description,
    resolve_device,
    resolve_resolution,
    run_logging,
    thread_policy,
)
from eval.config import EvalConfig, ModelSource, check, to_mapping
from eval.report import build_rows, merge_metrics, write_report
from veca_ssl.distributed import is_main_process
from veca_ssl.progress import progress_enabled
from veca_ssl.widths import Width, resolve_widths

log = logging.getLogger("eval")

PROTOCOL_TITLES = {"knn": "k-NN", "linear": "Linear probe", "logreg": "Logistic regression",
                   "dense": "Dense probes"}


@dataclass
class EvalResult:
    """What an evaluation produced: one row per width (+ reference rows) and where the report is."""

    rows: list[dict]
    run_dir: Path
    paths: dict[str, Path]
    resolution: int


def run_protocols(model: torch.nn.Module, widths: list[Width], cfg: EvalConfig, resolution: int, why: str,
                  device: torch.device, progress: bool, skips: dict | None = None) -> dict[Width, dict]:
    """Every protocol of ``cfg`` on ``model`` at ``widths``: ``{width: merged metrics}``. Unusable images
    left out of a dataset's features are summarised into ``skips`` (``{dataset: skip_summary}``)."""
    from veca_ssl.features import skip_summary

    skips = {} if skips is None else skips
    results = []
    classification = [p for p in cfg.protocols if p != "dense"]
    if classification:
        linear = "linear" in classification
        feats = classification_features(model, widths, cfg, resolution, why, device, progress,
                                        n_last_blocks=max(cfg.linear.n_last_blocks) if linear else 1,
                                        patch_mean=linear)
        skips.update({k: skip_summary(v) for k, v in feats.items()})  # zero counts too: "0 of N", not unknown
        for protocol in classification:
            if protocol == "knn":
                from eval.knn import run_knn

                results.append(run_knn(feats["train"], feats["test"], cfg.knn, device, cfg.bootstrap, cfg.seed,
                                       progress))
            elif protocol == "linear":
                from eval.linear import run_linear

                results.append(run_linear(feats["train"], feats["test"], feats.get("val"), cfg.linear, device,
                                          cfg.seed, cfg.bootstrap, progress))
            elif protocol == "logreg":
                from eval.logreg import run_logreg

                results.append(run_logreg(feats["train"], feats["test"], cfg.logreg, cfg.seed, cfg.bootstrap,
                                          progress))
    if "dense" in cfg.protocols:
        from eval.dense import dense_features, run_dense

        d = cfg.dense
        tr, te, tr_t, te_t = dense_features(model, widths, cfg.datasets.dense_train, cfg.datasets.dense_test,
                                            resolution, cfg.batch_size, device, cfg.num_workers,
                                            d.reduce_zero_label, progress, cfg.max_skip_fraction, cfg.max_pixels)
        skips.update({f"dense_{k}": skip_summary(v) for k, v in (("train", tr), ("test", te))})
        results.append(run_dense(tr, te, tr_t, te_t, d.tasks, d.num_classes, d, device, cfg.seed, cfg.bootstrap,
                                 progress))
    return merge_metrics(*results)


def _rows(model: torch.nn.Module, widths: list[Width], cfg: EvalConfig, resolution: int, why: str,
          device: torch.device, progress: bool, reference: bool = False, skips: dict | None = None,
          timing: dict | None = None) -> list[dict]:
    """The report rows of ``model``; with speed on, ``timing`` gets the conditions of the measurement
    (threads, load average before and after: other work on the machine changes latency)."""
    from veca_ssl.threads import conditions_text, timing_conditions

    metrics = run_protocols(model, widths, cfg, resolution, why, device, progress, skips)
    before = timing_conditions() if cfg.speed.enabled else None
    if before is not None:
        log.info("measuring latency and throughput at %d px, widths %s (%s)", resolution, widths,
                 conditions_text(before))
    rows = build_rows(model, metrics, resolution, cfg.batch_size, device, cfg.speed.enabled, cfg.speed.warmup,
                      cfg.speed.repeats, reference=reference)
    if before is not None and timing is not None and not timing:
        after = timing_conditions()
        timing.update(text=conditions_text(before, after), threads=before["threads"], cores=before["cores"],
                      load_average=[before["load_average"], after["load_average"]])
    return rows


def evaluate(config: EvalConfig, model: torch.nn.Module | None = None) -> EvalResult:
    """Run ``config`` (checked first) and write its report to ``<output_dir>/<run name>/``.

    ``model``: an already built backbone to evaluate instead of ``config.checkpoint``/``config.model``
    (those still name it in the report). Raises EvalConfigError/ValueError/FileNotFoundError for bad
    options or data, FileExistsError when the run directory holds an earlier report (unless
    ``overwrite``), all before any feature is extracted.
    """
    t0 = time.perf_counter()
    cfg = check(config)
    check_paths(cfg)
    run_dir = cfg.run_dir
    guard_output(run_dir, cfg.overwrite)
    progress = progress_enabled(cfg.progress)
    # Everything that can be checked without reading data is, before the run directory exists.
    device = resolve_device(cfg.device)
    net = (model if model is not None else load_model(cfg, cfg.seed)).eval().to(device)
    resolution, why = resolve_resolution(cfg, net)
    widths = resolve_widths(net, cfg.widths)
    with run_logging(run_dir if is_main_process() else None, terminal=sys.stderr.isatty()), \
            thread_policy(cfg.num_threads, cfg.num_workers) as threads:
        log.info("threads: %s", threads)
        try:
            return _evaluate(cfg, net, device, resolution, why, widths, progress, t0)
        except Exception:
            log.debug("evaluation failed", exc_info=True)  # the traceback goes to eval.log only
            raise


def _evaluate(cfg: EvalConfig, net: torch.nn.Module, device: torch.device, resolution: int, why: str,
              widths: list[Width], progress: bool, t0: float) -> EvalResult:
    run_dir = cfg.run_dir
    log.info("evaluating %s: %s at %d px (%s), widths %s, on %s", model_description(cfg, net),
             ", ".join(cfg.protocols), resolution, why, [w for w in widths], device)
    skips: dict = {}  # unusable images left out of each dataset's features (listed in the report)
    timing: dict = {}  # threads and load average while the speed was measured
    rows = _rows(net, widths, cfg, resolution, why, device, progress, skips=skips, timing=timing)
    ref_name = None
    if cfg.reference is not None:
        ref_model = load_model(cfg.reference, cfg.seed).to(device)
        ref_widths = resolve_widths(ref_model, None)[-1:]  # a dense ViT: [None]; else its full width
        ref_name = model_description(cfg.reference, ref_model)
        log.info("evaluating the reference %s", ref_name)
        rows += _rows(ref_model, ref_widths, cfg, resolution, why, device, progress, reference=True)
    name = model_description(cfg, net)
    title = cfg.title or f"{' + '.join(PROTOCOL_TITLES[p] for p in cfg.protocols)} — {name}"
    resolved = dataclasses.replace(cfg, resolution=resolution, overwrite=False,
                                   widths=tuple(w for w in widths if w is not None) or None)
    meta = {"model": name, "checkpoint": cfg.checkpoint, "protocols": ", ".join(cfg.protocols),
            "resolution": resolution, "resolution_from": why, "device": str(device),
            "datasets": {k: v for k, v in to_mapping(cfg.datasets).items() if v},
            "wall_time_s": round(time.perf_counter() - t0, 2)}
    if ref_name:
        meta["reference"] = ref_name
    if timing:
        meta["timing"] = timing.pop("text")  # the report's line; the numbers in timing_conditions
        meta["timing_conditions"] = timing
    meta["data_skips"] = skips
    meta["config"] = to_mapping(resolved)
    paths: dict[str, Path] = {}
    if is_main_process():
        paths = write_report(rows, run_dir, title, meta)
        paths["config"] = save_config(resolved, run_dir / "config.yaml")
        print(paths["md"].read_text())
        print(f"report: {run_dir}/report.{{md,csv,json,png}} (config.yaml, eval.log) in {meta['wall_time_s']} s")
    return EvalResult(rows=rows, run_dir=run_dir, paths=paths, resolution=resolution)


def save_config(cfg: EvalConfig | ModelSource, path: Path) -> Path:
    """The resolved config as YAML; ``veca eval all --config`` runs it again."""
    from omegaconf import OmegaConf

    path.write_text(OmegaConf.to_yaml(OmegaConf.create(to_mapping(cfg))))
    return path
