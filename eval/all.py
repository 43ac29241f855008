"""``veca eval all --config FILE [key=value ...]``: every configured protocol, one report.

The YAML config (OmegaConf; CLI ``key=value`` overrides on top, unknown keys are errors) names the
model (``checkpoint`` or a random-init ``model`` preset with ``model_args``), the datasets, the
``protocols`` (knn, linear, logreg, dense), the widths and resolution, protocol options, and an
optional dense-ViT ``reference`` evaluated the same way and drawn as a reference point. Image
features are extracted once per dataset (every width on each batch) and shared by k-NN, the linear
probe and logistic regression. See ``configs/eval/digits.yaml``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from eval.common import (
    EvalContext,
    build_eval_dataset,
    check_checkpoint,
    check_first_label,
    is_main_process,
    load_model,
    model_description,
    parse_widths,
    require_labels,
    resolve_device,
    resolve_widths,
)
from eval.linear import DINOV2_LRS, LinearProbeConfig
from eval.logreg import C_GRID, LogRegConfig
from veca_ssl.knn import KNN_KS, KNN_TEMPERATURE

PROTOCOLS = ("knn", "linear", "logreg", "dense")

DEFAULTS: dict = {
    "checkpoint": None, "model": None, "model_args": {}, "seed": 0,
    "datasets": {"train": None, "val": None, "test": None, "dense_train": None, "dense_test": None},
    "protocols": ["knn", "linear", "logreg"],
    "widths": "all", "resolution": 224, "batch_size": 64, "num_workers": 0, "device": "auto",
    "output_dir": "eval_output", "progress": True, "title": "Evaluation",
    "max_skip_fraction": 0.01,  # stop above this fraction of unusable images; below, they are listed
    "knn": {"ks": list(KNN_KS), "temperature": KNN_TEMPERATURE, "backend": "torch", "chunk_size": 1024},
    "linear": {"epochs": 10, "epoch_length": 1250, "batch_size": 128, "lrs": list(DINOV2_LRS),
               "val_fraction": 0.1},
    "logreg": {"cs": list(C_GRID), "val_fraction": 0.2, "max_iter": 1000},
    "dense": {"tasks": "auto", "num_classes": None, "reduce_zero_label": False, "epochs": 20,
              "batch_size": 16, "lr": 1e-3},
    "speed": {"enabled": True, "warmup": 3, "repeats": 5},
    "reference": None,  # {checkpoint: PATH} or {model: vit_tiny, model_args: {...}}: a dense-ViT point
}


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> DictConfig:
    """Defaults ← YAML file ← ``key=value`` overrides; unknown keys raise ValueError naming them."""
    base = OmegaConf.create(DEFAULTS)
    OmegaConf.set_struct(base, True)
    for open_key in ("model_args", "reference"):  # free-form blocks
        OmegaConf.set_struct(base[open_key], False) if base[open_key] is not None else None
    layers = []
    if path is not None:
        if not Path(path).is_file():
            raise FileNotFoundError(f"eval config not found: {str(path)!r}")
        layers.append(OmegaConf.load(path))
    layers.append(OmegaConf.from_dotlist(list(overrides or [])))
    try:
        with_ref = [OmegaConf.create({k: v for k, v in layer.items() if k != "reference"}) for layer in layers]
        cfg = OmegaConf.merge(base, *with_ref)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None)
        where = f" (key {key!r})" if key else ""
        raise ValueError(f"bad eval config {path}{where}: {str(exc).splitlines()[0]}; valid keys: see "
                         "eval/all.py DEFAULTS") from exc
    OmegaConf.set_struct(cfg, False)
    for layer in layers:  # the reference block is free-form (a model description)
        if "reference" in layer:
            cfg.reference = layer.reference
    bad = [p for p in cfg.protocols if p not in PROTOCOLS]
    if bad:
        raise ValueError(f"unknown protocol(s) {bad} in 'protocols'; valid: {list(PROTOCOLS)}")
    return cfg


def _check_sources(cfg: DictConfig) -> None:
    """Every path and required dataset is checked before any model is built or image is read."""
    if (cfg.checkpoint is None) == (cfg.model is None):
        raise ValueError("the eval config needs exactly one of 'checkpoint' or 'model'")
    check_checkpoint(cfg.checkpoint)
    if cfg.reference is not None:
        check_checkpoint(cfg.reference.get("checkpoint"))
    cls = [p for p in cfg.protocols if p != "dense"]
    for key in (["train", "test"] if cls else []) + (["dense_train", "dense_test"] if "dense" in cfg.protocols else []):
        if not cfg.datasets.get(key):
            raise ValueError(f"protocols {list(cfg.protocols)} need datasets.{key} in the eval config")


def evaluate(model: torch.nn.Module, widths: list, cfg: DictConfig, device: torch.device,
             progress: bool, data_skips: dict | None = None) -> dict:
    """Run the configured protocols on ``model`` at ``widths``: ``{width: merged metrics}``."""
    from eval.report import merge_metrics
    from veca_ssl.features import extract_features, skip_summary

    results = []
    skips = data_skips if data_skips is not None else {}
    cls_protocols = [p for p in cfg.protocols if p != "dense"]
    if cls_protocols:
        specs = {k: cfg.datasets[k] for k in ("train", "val", "test") if cfg.datasets.get(k)}
        datasets = {k: build_eval_dataset(s, cfg.resolution) for k, s in specs.items()}
        for k, ds in datasets.items():
            check_first_label(ds, specs[k])
        linear = "linear" in cls_protocols
        n_blocks = min(4, int(getattr(model, "depth", 4))) if linear else 1
        feats = {}
        for k, ds in datasets.items():
            feats[k] = extract_features(model, ds, widths, cfg.resolution, cfg.batch_size, device,
                                        n_last_blocks=n_blocks, with_patch_mean=linear,
                                        num_workers=cfg.num_workers, progress=progress,
                                        max_skip_fraction=cfg.max_skip_fraction)
            require_labels(next(iter(feats[k].values())).labels, specs[k])
            if next(iter(feats[k].values())).skipped:  # unusable images left out: into the report
                skips[k] = skip_summary(feats[k])
        if "knn" in cls_protocols:
            from eval.knn import run_knn

            k = cfg.knn
            results.append(run_knn(feats["train"], feats["test"], list(k.ks), k.temperature, k.backend, device,
                                   k.chunk_size))
        if linear:
            from eval.linear import run_linear

            lc = LinearProbeConfig(epochs=cfg.linear.epochs, epoch_length=cfg.linear.epoch_length,
                                   batch_size=cfg.linear.batch_size,
                                   lrs=tuple(cfg.linear.lrs), val_fraction=cfg.linear.val_fraction, seed=cfg.seed)
            results.append(run_linear(feats["train"], feats["test"], feats.get("val"), lc, device))
        if "logreg" in cls_protocols:
            from eval.logreg import run_logreg

            rc = LogRegConfig(cs=tuple(cfg.logreg.cs), val_fraction=cfg.logreg.val_fraction,
                              max_iter=cfg.logreg.max_iter, seed=cfg.seed)
            results.append(run_logreg(feats["train"], feats["test"], rc))
    if "dense" in cfg.protocols:
        from eval.dense import DenseProbeConfig, dense_features, resolve_tasks, run_dense

        d = cfg.dense
        ctx = EvalContext(model, "", widths, device, Path(cfg.output_dir), progress,
                          max_skip_fraction=cfg.max_skip_fraction)
        tr, te, tr_t, te_t = dense_features(ctx, cfg.datasets.dense_train, cfg.datasets.dense_test,
                                            cfg.resolution, cfg.batch_size, cfg.num_workers, d.reduce_zero_label)
        skips.update({f"dense_{k}": v for k, v in ctx.data_skips.items()})
        dc = DenseProbeConfig(epochs=d.epochs, batch_size=d.batch_size, lr=d.lr, seed=cfg.seed)
        results.append(run_dense(tr, te, tr_t, te_t, resolve_tasks(d.tasks, tr_t, te_t), d.num_classes, dc, device))
    return merge_metrics(*results)


def run_all(cfg: DictConfig) -> list[dict]:
    """Evaluate the configured model (and reference), write one report, return its rows."""
    from eval.report import build_rows, write_report

    _check_sources(cfg)
    t0 = time.perf_counter()
    device = resolve_device(cfg.device)
    progress = bool(cfg.progress) and sys.stderr.isatty()
    model = load_model(cfg.checkpoint, cfg.model, dict(cfg.model_args or {}), cfg.seed).to(device)
    widths = resolve_widths(model, parse_widths(cfg.widths if not OmegaConf.is_list(cfg.widths)
                                                else list(cfg.widths)))
    sp = cfg.speed
    skips: dict = {}  # unusable images left out of each dataset's features
    rows = build_rows(model, evaluate(model, widths, cfg, device, progress, skips), cfg.resolution,
                      cfg.batch_size, device, sp.enabled, sp.warmup, sp.repeats)
    ref_name = None
    if cfg.reference is not None:
        ref = cfg.reference
        ref_model = load_model(ref.get("checkpoint"), ref.get("model"), dict(ref.get("model_args") or {}),
                               cfg.seed).to(device)
        ref_widths = resolve_widths(ref_model, None)[-1:]  # a dense ViT: [None]; else its full width
        rows += build_rows(ref_model, evaluate(ref_model, ref_widths, cfg, device, progress), cfg.resolution,
                           cfg.batch_size, device, sp.enabled, sp.warmup, sp.repeats, reference=True)
        ref_name = model_description(ref.get("checkpoint"), ref.get("model"), ref_model)
    name = model_description(cfg.checkpoint, cfg.model, model)
    meta = {"model": name, "protocols": ", ".join(cfg.protocols), "resolution": cfg.resolution,
            "device": str(device), "datasets": {k: v for k, v in cfg.datasets.items() if v},
            "wall_time_s": round(time.perf_counter() - t0, 2)}
    if ref_name:
        meta["reference"] = ref_name
    if skips:
        meta["data_skips"] = skips
    if is_main_process():
        out = Path(cfg.output_dir)
        paths = write_report(rows, out, f"{cfg.title} — {name}", meta)
        OmegaConf.save(cfg, out / "eval_config.yaml")
        print(paths["md"].read_text())
        print(f"report written to {out}/report.{{md,csv,json,png}} in {meta['wall_time_s']} s")
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="veca eval all", description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="eval YAML, e.g. configs/eval/digits.yaml")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. checkpoint=runs/x/export/teacher.safetensors")
    args = p.parse_args(argv)
    run_all(load_config(args.config, args.overrides))
    return 0


if __name__ == "__main__":
    sys.exit(main())
