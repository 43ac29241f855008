"""Runtime pieces every evaluation shares: device, model, resolution, datasets, output directory, logs.

The options themselves (and their defaults and rules) live in ``eval.config``; this module turns a
checked :class:`~eval.config.EvalConfig` into a model on a device, datasets at a resolution, and the
run directory with its log.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from eval.config import REQUIRED_DATA, EvalConfig, EvalConfigError, ModelSource
from veca_ssl.models.provenance import training_resolution
from veca_ssl.widths import Width

log = logging.getLogger("eval")

#: Resolution used when neither the option nor the checkpoint gives one (DINOv2's eval resolution).
FALLBACK_RESOLUTION = 224
REPORT_FILES = ("report.json", "report.md", "report.csv", "report.png")
#: The option unusable images are judged by, named in the error (every eval command and veca extract).
SKIP_OPTION = "--max-skip-fraction"


# --------------------------------------------------------------------------------------------- device
def resolve_device(name: str | None) -> torch.device:
    """``"auto"``/``None`` → CUDA when available, else CPU; anything else is passed to torch."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EvalConfigError(f"--device {name!r} requested but CUDA is not available; use --device cpu or auto")
    return dev


# --------------------------------------------------------------------------------------------- models
def check_checkpoint(path: str | Path | None) -> None:
    """Raise FileNotFoundError naming ``path`` when it does not exist (call before any work)."""
    if path is not None and not Path(path).exists():
        raise FileNotFoundError(f"checkpoint not found: {str(path)!r} (pass an existing run directory, "
                                "checkpoint or export)")


def model_kwargs(src: ModelSource) -> dict:
    """Constructor arguments of a ``--model`` preset: ``model_args`` plus ``patch_size``/``num_cores``."""
    kwargs = dict(src.model_args or {})
    for key in ("patch_size", "num_cores"):
        value = getattr(src, key)
        if value is not None:
            if key in kwargs and kwargs[key] != value:
                raise EvalConfigError(f"{key} given twice with different values: {value} and model_args.{key}="
                                      f"{kwargs[key]}")
            kwargs[key] = value
    return kwargs


def load_model(src: ModelSource, seed: int = 0) -> torch.nn.Module:
    """The backbone of ``src``: ``load_backbone(checkpoint)`` or a randomly initialised ``model`` preset.

    ``src.features == "teacher"`` makes the backbone return teacher-space features (through its output
    projection, e.g. a distilled reference VECA's) everywhere; an error when it has none.
    """
    from veca_ssl.models import build_backbone, load_backbone

    if src.checkpoint is not None:
        check_checkpoint(src.checkpoint)
        net = load_backbone(src.checkpoint)
    else:
        torch.manual_seed(seed)
        try:
            net = build_backbone(src.model, **model_kwargs(src))
        except TypeError as exc:  # an unknown constructor argument
            raise EvalConfigError(f"--model {src.model}: {exc} (check --model-arg names)") from None
    if src.features != "native":
        try:
            net.set_feature_space(src.features)
        except ValueError as exc:
            raise EvalConfigError(f"--features {src.features}: {exc}") from None
    return net.eval()


def model_description(src: ModelSource, net: torch.nn.Module) -> str:
    """Human-readable model name for manifests and report titles."""
    if src.model is not None:
        return f"{src.model} (random init)"
    shape = ", ".join(f"{k} {getattr(net, k)}" for k in ("embed_dim", "depth", "patch_size") if hasattr(net, k))
    return f"{type(net).__name__} [{shape}] ({src.checkpoint})"


# --------------------------------------------------------------------------------------------- resolution
def resolve_resolution(cfg: EvalConfig, model: torch.nn.Module) -> tuple[int, str]:
    """``(resolution, why)``: the option, else the checkpoint's training resolution, else 224.

    Raises EvalConfigError when it is not a multiple of the model's patch size.
    """
    if cfg.resolution is not None:
        res, why = cfg.resolution, "--resolution"
    else:
        found = training_resolution(cfg.checkpoint) if cfg.checkpoint else None
        if found is not None:
            res, why = found[0], f"training resolution, from {found[1]}"
        else:
            res, why = FALLBACK_RESOLUTION, ("default; the checkpoint records no training resolution"
                                             if cfg.checkpoint else "default for a randomly initialised --model")
    patch = int(getattr(model, "patch_size", 1))
    if res % patch:
        near = max(patch, round(res / patch) * patch)
        raise EvalConfigError(f"resolution {res} ({why}) is not a multiple of the patch size {patch}; "
                              f"use --resolution {near}")
    return res, why


def native_size(dataset: torch.utils.data.Dataset) -> tuple[int, int] | None:
    """(width, height) of the dataset's first image before any transform; None when unknown (streams)."""
    if isinstance(dataset, torch.utils.data.IterableDataset) or len(dataset) == 0:  # type: ignore[arg-type]
        return None
    images = getattr(dataset, "images", None)
    if isinstance(images, np.ndarray) and images.ndim >= 3:  # in-memory arrays (digits, npz)
        return int(images.shape[2]), int(images.shape[1])
    load = getattr(dataset, "load", None)
    if callable(load):
        with contextlib.suppress(Exception):
            return tuple(load(0)[0].size)  # type: ignore[return-value]
    return None


def warn_if_upsampling(dataset: torch.utils.data.Dataset, spec: str, resolution: int, why: str) -> None:
    size = native_size(dataset)
    if size is not None and resolution > max(size):
        log.warning("resolution %d (%s) upsamples %s's %dx%d images %.1fx: slower, and different numbers than "
                    "at the native size; pass --resolution to choose", resolution, why, spec, size[0], size[1],
                    resolution / max(size))


# --------------------------------------------------------------------------------------------- data
_SPLIT_RE = re.compile(r"^(?P<spec>.+)@(?P<split>[A-Za-z0-9_\-]+)$")


def parse_dataset_spec(text: str) -> tuple[str, str | None]:
    """``"digits@val"`` → ``("digits", "val")``; a spec without ``@split`` → ``(spec, None)``."""
    m = _SPLIT_RE.match(text.strip())
    if m:
        return m.group("spec"), m.group("split")
    return text.strip(), None


def build_eval_dataset(text: str, resolution: int, max_pixels: int | None = None,
                       allow_empty_classes: bool = False) -> torch.utils.data.Dataset:
    """Build ``SPEC[@SPLIT]`` with the evaluation transform (resize, centre crop, normalise); images
    declaring more than ``max_pixels`` pixels are unusable (None: the data path's default limit). An
    image folder's class folder without images is an error unless ``allow_empty_classes``."""
    from veca_ssl.data import build_dataset, parse_spec
    from veca_ssl.data.transforms import make_eval_transform

    spec, split = parse_dataset_spec(text)
    if parse_spec(spec)[0] == "wds":
        # Streaming shards: one pass in shard order, each rank reading its own shards.
        options = {"shuffle_buffer": 0, "shard_shuffle": False, "endless": False}
    else:
        options = {"dense": False}  # classification items (image, target) even for dense data
    if max_pixels is not None:
        options["max_pixels"] = max_pixels
    return build_dataset(spec, split=split, transform=make_eval_transform(resolution),
                         allow_empty_classes=allow_empty_classes, **options)


def require_labels(labels: torch.Tensor, spec: str) -> None:
    """Raise ValueError when a dataset used for classification has unlabelled (−1) items."""
    n_missing = int((labels < 0).sum())
    if n_missing:
        raise ValueError(
            f"dataset {spec!r} has no labels ({n_missing} of {labels.numel()} items are -1); k-NN, linear "
            "and logreg need class labels: use a labelled dataset (e.g. imagefolder:, npz: with 'labels')"
        )


def check_first_label(dataset: torch.utils.data.Dataset, spec: str) -> None:
    """Cheap check before extraction: all ``targets`` when the dataset exposes them, else item 0.

    Streaming datasets are checked after extraction only (``require_labels`` on the gathered labels).
    """
    if isinstance(dataset, torch.utils.data.IterableDataset):
        return
    if len(dataset) == 0:  # type: ignore[arg-type]
        raise ValueError(f"dataset {spec!r} is empty")
    targets = getattr(dataset, "targets", None)  # veca_ssl.data datasets expose all labels cheaply
    if targets is not None and len(targets) == len(dataset):  # type: ignore[arg-type]
        require_labels(torch.as_tensor(np.asarray(targets)), spec)
        return
    item = dataset[0]
    target = item[1] if isinstance(item, tuple | list) and len(item) > 1 else -1
    if int(target) < 0:
        require_labels(torch.tensor([-1]), spec)


def check_dataset_spec(text: str) -> None:
    """Cheap checks of ``SPEC[@SPLIT]`` without reading it: a known kind, and an existing path."""
    import os

    from veca_ssl.data import parse_spec

    spec, split = parse_dataset_spec(text)
    if spec.startswith("folder:"):  # the dense folder layout of eval.dense
        kind, path = "folder", spec.removeprefix("folder:")
    elif os.path.isdir(os.path.expanduser(spec)):  # a bare dense folder
        return
    else:
        kind, path = parse_spec(spec)
    if kind in ("digits", "synthetic", "textures"):
        return
    path = os.path.expanduser(path)
    if "{split}" in path:
        path = path.replace("{split}", split or "")
    elif kind == "wds":
        path = os.path.dirname(path) or "."  # brace-expanded shard names: check their folder
    elif kind == "imagefolder" and split:
        path = os.path.join(path, split)
    if not os.path.exists(path):
        raise FileNotFoundError(f"dataset {text!r}: {path!r} does not exist")


def check_paths(cfg: EvalConfig) -> None:
    """Every path a run reads exists: checkpoints and datasets (before anything is loaded)."""
    check_checkpoint(cfg.checkpoint)
    if cfg.reference is not None:
        check_checkpoint(cfg.reference.checkpoint)
    needed = {name for p in cfg.protocols for name in REQUIRED_DATA[p]} | (
        {"val"} if cfg.datasets.val and "linear" in cfg.protocols else set())
    for name in sorted(needed):
        check_dataset_spec(getattr(cfg.datasets, name))


def classification_features(model: torch.nn.Module, widths: list[Width], cfg: EvalConfig, resolution: int,
                            why: str, device: torch.device, progress: bool, n_last_blocks: int = 1,
                            patch_mean: bool = False) -> dict[str, dict]:
    """Build the classification datasets, check their labels, extract features at every width once.

    Shared by k-NN, the linear probe and logistic regression. Returns
    ``{"train"|"test"|"val": {width: FeatureSet}}`` ("val" only when ``datasets.val`` is set).
    """
    from veca_ssl.data.errors import DataSkipError
    from veca_ssl.data.folder import check_same_classes
    from veca_ssl.features import extract_features

    specs = {k: getattr(cfg.datasets, k) for k in ("train", "test", "val") if getattr(cfg.datasets, k)}
    datasets = {k: build_eval_dataset(s, resolution, cfg.max_pixels, cfg.allow_empty_classes)
                for k, s in specs.items()}
    check_same_classes({f"the {k} set {specs[k]}": getattr(ds, "classes", None) for k, ds in datasets.items()},
                       hint=" (a class folder without images is kept as a class with --allow-empty-classes)")
    for k, ds in datasets.items():
        check_first_label(ds, specs[k])
    warn_if_upsampling(datasets["train"], specs["train"], resolution, why)
    n_blocks = max(1, min(n_last_blocks, int(getattr(model, "depth", n_last_blocks))))
    out: dict[str, dict] = {}
    for k, ds in datasets.items():
        log.info("extracting %s features of %s at %d px, widths %s", k, specs[k], resolution, widths)
        try:
            out[k] = extract_features(model, ds, widths, resolution, cfg.batch_size, device, n_last_blocks=n_blocks,
                                      with_patch_mean=patch_mean, num_workers=cfg.num_workers, progress=progress,
                                      max_skip_fraction=cfg.max_skip_fraction, skip_option=SKIP_OPTION)
        except DataSkipError as exc:  # over the whole set, after the pass: say which set
            raise DataSkipError(f"{k} set {specs[k]}: {exc}") from None
        require_labels(next(iter(out[k].values())).labels, specs[k])
    return out


# --------------------------------------------------------------------------------------------- output
#: How each way of configuring an evaluation spells the options a refused output directory needs.
OUTPUT_TERMS = {"cli": ("--overwrite", "--output-dir", "--name"),
                "yaml": ("overwrite=true", "output_dir=DIR", "name=NAME")}


def guard_output(run_dir: Path, overwrite: bool, terms: str = "cli") -> None:
    """Refuse to replace an earlier run's report unless ``overwrite`` (a message naming the file and the
    options that fix it, as ``terms`` spells them: ``cli`` flags, or ``yaml`` keys for ``veca eval all``)."""
    existing = [run_dir / f for f in REPORT_FILES if (run_dir / f).exists()]
    if existing and not overwrite:
        again, out, name = OUTPUT_TERMS[terms]
        raise FileExistsError(f"{existing[0]} already holds an earlier run's results; pass {again} to replace "
                              f"it, or choose another {out} or {name}")
    if run_dir.exists() and not run_dir.is_dir():
        raise NotADirectoryError(f"output path {str(run_dir)!r} exists and is not a directory")


@contextlib.contextmanager
def run_logging(run_dir: Path | None, terminal: bool) -> Iterator[Path | None]:
    """Log INFO lines of ``eval``/``veca_ssl`` to ``run_dir/eval.log`` and to stderr for the run's duration.

    In a terminal (``terminal``) progress lines go to the log file only — the bars show progress —
    while batch jobs (no terminal) also get them on stderr.
    """
    import sys

    loggers = [logging.getLogger("eval"), logging.getLogger("veca_ssl")]
    handlers: list[logging.Handler] = []
    stream = logging.StreamHandler(sys.stderr)
    stream.setLevel(logging.INFO)
    stream.setFormatter(logging.Formatter("%(message)s"))
    if terminal:
        stream.addFilter(lambda record: not record.name.startswith("veca_ssl.progress"))
    handlers.append(stream)
    path = None
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / "eval.log"
        file_handler = logging.FileHandler(path)
        file_handler.setLevel(logging.DEBUG)  # failures' tracebacks (DEBUG) go to the file only
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handlers.append(file_handler)
    saved = [(lg, lg.level, lg.propagate) for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.DEBUG if path is not None else logging.INFO)
        lg.propagate = False  # not twice through a root handler (pytest's, the user's)
        for h in handlers:
            lg.addHandler(h)
    try:
        yield path
    finally:
        for lg, level, propagate in saved:
            for h in handlers:
                lg.removeHandler(h)
            lg.setLevel(level)
            lg.propagate = propagate
        for h in handlers:
            h.close()


# --------------------------------------------------------------------------------------------- threads
@contextlib.contextmanager
def thread_policy(requested: int, num_workers: int) -> Iterator[str]:
    """Run with ``veca train``'s thread policy (``veca_ssl.threads``) for ``--num-threads requested`` and
    ``num_workers`` loader workers, then restore the previous count; yields the line that says so."""
    from veca_ssl.threads import apply_thread_policy, describe_plan

    previous = torch.get_num_threads()
    plan = apply_thread_policy(requested, num_workers, option="--num-threads")
    try:
        yield describe_plan(plan, "--num-threads N")
    finally:
        torch.set_num_threads(previous)


@contextlib.contextmanager
def few_threads_if_small(flops_per_step: float, threshold: float = 1e9) -> Iterator[None]:
    """Run a loop of small steps (probe training) with one intra-op thread, then restore.

    A probe step is dozens of small ops, each ending in a thread barrier; on a host busier than its
    cores a barrier waits for a descheduled thread, and a step gets ~50x slower than single-threaded
    (measured on 2 shared cores: linear probe on digits features, 0.23 GFLOP/step, 6 ms with 1
    thread vs 250-390 ms with 2). On an idle host one thread costs at most the thread count for such
    steps. Steps of >= ``threshold`` FLOPs (ImageNet-size heads) keep every thread.
    """
    if flops_per_step >= threshold:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
