"""Shared plumbing of the evaluation commands: argument parsing, model loading, widths, datasets.

Every ``veca eval <protocol>`` / ``veca extract`` command takes the same model options
(``--checkpoint`` or ``--model``), dataset options (``--train/--val/--test SPEC[@SPLIT]``) and run
options (``--widths``, ``--resolution``, ``--batch-size``, ``--output-dir``, ``--device``); they are
defined once here so the commands cannot drift apart.
"""

from __future__ import annotations

import argparse
import contextlib
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from veca_ssl.features import progress_enabled
from veca_ssl.widths import Width, parse_widths, resolve_widths


# --------------------------------------------------------------------------------------------- device
def resolve_device(name: str | None) -> torch.device:
    """``"auto"``/``None`` → CUDA when available, else CPU; anything else is passed to torch."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name!r} requested but CUDA is not available; use --device cpu")
    return dev


# --------------------------------------------------------------------------------------------- models
def _parse_value(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    if text.lower() in ("none", "null"):
        return None
    return text


def parse_key_values(items: Sequence[str] | None) -> dict[str, Any]:
    """``["depth=2", "embed_dim=64"]`` → ``{"depth": 2, "embed_dim": 64}``."""
    out: dict[str, Any] = {}
    for item in items or ():
        if "=" not in item:
            raise ValueError(f"expected KEY=VALUE, got {item!r} (e.g. --model-arg depth=2)")
        key, value = item.split("=", 1)
        out[key.strip()] = _parse_value(value.strip())
    return out


def check_checkpoint(path: str | Path | None) -> None:
    """Raise FileNotFoundError naming ``path`` when it does not exist (call before any work)."""
    if path is not None and not Path(path).exists():
        raise FileNotFoundError(f"checkpoint not found: {str(path)!r} (pass an existing file or directory)")


def load_model(
    checkpoint: str | Path | None = None,
    model: str | None = None,
    model_args: dict[str, Any] | None = None,
    seed: int = 0,
) -> torch.nn.Module:
    """A backbone from ``checkpoint`` (``load_backbone``) or a randomly-initialised ``model`` preset."""
    if (checkpoint is None) == (model is None):
        raise ValueError("give exactly one of --checkpoint PATH or --model PRESET")
    from veca_ssl.models import build_backbone, load_backbone

    if checkpoint is not None:
        check_checkpoint(checkpoint)
        net = load_backbone(checkpoint)
    else:
        torch.manual_seed(seed)
        net = build_backbone(model, **(model_args or {}))
    return net.eval()


def model_description(checkpoint: str | Path | None, model: str | None, net: torch.nn.Module) -> str:
    """Human-readable model name for manifests and report titles."""
    if model is not None:
        return f"{model} (random init)"
    shape = ", ".join(f"{k} {getattr(net, k)}" for k in ("embed_dim", "depth", "patch_size") if hasattr(net, k))
    return f"{type(net).__name__} [{shape}] ({checkpoint})"


# --------------------------------------------------------------------------------------------- data
_SPLIT_RE = re.compile(r"^(?P<spec>.+)@(?P<split>[A-Za-z0-9_\-]+)$")


def parse_dataset_spec(text: str) -> tuple[str, str | None]:
    """``"digits@val"`` → ``("digits", "val")``; a spec without ``@split`` → ``(spec, None)``."""
    m = _SPLIT_RE.match(text.strip())
    if m:
        return m.group("spec"), m.group("split")
    return text.strip(), None


def build_eval_dataset(text: str, resolution: int) -> torch.utils.data.Dataset:
    """Build ``SPEC[@SPLIT]`` with the evaluation transform (resize, centre crop, normalise)."""
    from veca_ssl.data import build_dataset, parse_spec
    from veca_ssl.data.transforms import make_eval_transform

    spec, split = parse_dataset_spec(text)
    if parse_spec(spec)[0] == "wds":
        # Streaming shards: one pass in shard order, each rank reading its own shards.
        options = {"shuffle_buffer": 0, "shard_shuffle": False, "endless": False}
    else:
        options = {"dense": False}  # classification items (image, target) even for dense data
    return build_dataset(spec, split=split, transform=make_eval_transform(resolution), **options)


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


# --------------------------------------------------------------------------------------------- argparse
def add_model_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="training checkpoint dir/file or exported .safetensors")
    src.add_argument("--model", help="preset of a randomly-initialised backbone, e.g. veca_tiny, vit_small")
    g.add_argument("--patch-size", type=int, default=None, help="patch size of --model")
    g.add_argument("--num-cores", type=int, default=None, help="core bank size M of --model")
    g.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="extra constructor argument of --model (repeatable), e.g. depth=2")
    g.add_argument("--seed", type=int, default=0, help="seed of the random init and of the probes")


def model_from_args(args: argparse.Namespace) -> torch.nn.Module:
    """Load/build the backbone described by :func:`add_model_args` options."""
    check_checkpoint(args.checkpoint)
    kwargs = parse_key_values(args.model_arg)
    if args.patch_size is not None:
        kwargs["patch_size"] = args.patch_size
    if args.num_cores is not None:
        kwargs["num_cores"] = args.num_cores
    if args.checkpoint is not None and kwargs:
        raise ValueError("--patch-size/--num-cores/--model-arg only apply to --model, not --checkpoint")
    return load_model(args.checkpoint, args.model, kwargs, seed=args.seed)


def add_data_args(parser: argparse.ArgumentParser, names: Sequence[str] = ("train", "val", "test"),
                  required: Sequence[str] = ("train", "test")) -> None:
    g = parser.add_argument_group("data (SPEC[@SPLIT], e.g. digits@train, imagefolder:/data/val)")
    helps = {"train": "training set (k-NN bank / probe training data)",
             "val": "validation set for choosing hyper-parameters (default: held out of --train)",
             "test": "test set the metrics are reported on"}
    for name in names:
        g.add_argument(f"--{name}", required=name in required, help=helps.get(name, name))


def add_run_args(parser: argparse.ArgumentParser, resolution: int = 224) -> None:
    g = parser.add_argument_group("run")
    g.add_argument("--widths", default="all", help="core widths, e.g. 8,16,64 (default: all budgets)")
    g.add_argument("--resolution", type=int, default=resolution, help="eval image side in pixels")
    g.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    g.add_argument("--num-workers", type=int, default=0, help="DataLoader workers")
    g.add_argument("--output-dir", default="eval_output", help="where results and the report go")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    g.add_argument("--no-progress", action="store_true", help="disable progress bars")
    g.add_argument("--no-speed", action="store_true", help="skip latency/throughput in the report")
    g.add_argument("--speed-warmup", type=int, default=3, help="untimed warm-up calls per width")
    g.add_argument("--speed-repeats", type=int, default=5, help="timed calls per width (median)")
    g.add_argument("--max-skip-fraction", type=float, default=0.01,
                   help="stop when more than this fraction of a dataset's images is unusable; below it they "
                        "are left out and listed in the report (default 0.01)")


def is_main_process() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


# --------------------------------------------------------------------------------------------- running
@dataclass
class EvalContext:
    """What every protocol command needs after argument parsing: the model and where to run/write."""

    model: torch.nn.Module
    model_name: str
    widths: list[Width]
    device: torch.device
    output_dir: Path
    progress: bool
    #: Unusable images left out of each dataset's features (``veca_ssl.features.skip_summary``).
    data_skips: dict[str, Any] = field(default_factory=dict)
    #: Stop when more than this fraction of a dataset's images is unusable (``--max-skip-fraction``).
    max_skip_fraction: float = 0.01


def setup(args: argparse.Namespace) -> EvalContext:
    """Validate options and load the model (missing checkpoint → FileNotFoundError before any work)."""
    check_checkpoint(getattr(args, "checkpoint", None))
    widths = parse_widths(args.widths)
    device = resolve_device(args.device)
    model = model_from_args(args).to(device)
    return EvalContext(
        model=model,
        model_name=model_description(args.checkpoint, args.model, model),
        widths=resolve_widths(model, widths),
        device=device,
        output_dir=Path(args.output_dir),
        progress=progress_enabled(not args.no_progress),
        max_skip_fraction=getattr(args, "max_skip_fraction", 0.01),
    )


def classification_features(ctx: EvalContext, args: argparse.Namespace, n_last_blocks: int = 1,
                            patch_mean: bool = False) -> tuple[dict, dict, dict | None]:
    """Build ``--train``/``--test`` (and ``--val`` when given), check labels, extract features.

    Returns ``({width: FeatureSet} train, test, val-or-None)``.
    """
    from veca_ssl.features import extract_features, skip_summary

    specs = {"train": args.train, "test": args.test, "val": getattr(args, "val", None)}
    datasets = {name: build_eval_dataset(spec, args.resolution) for name, spec in specs.items() if spec}
    for name, ds in datasets.items():
        check_first_label(ds, specs[name])
    n_blocks = max(1, min(n_last_blocks, int(getattr(ctx.model, "depth", n_last_blocks))))
    out: dict[str, dict] = {}
    for name, ds in datasets.items():
        out[name] = extract_features(
            ctx.model, ds, ctx.widths, args.resolution, args.batch_size, ctx.device,
            n_last_blocks=n_blocks, with_patch_mean=patch_mean, num_workers=args.num_workers,
            progress=ctx.progress, max_skip_fraction=ctx.max_skip_fraction)
        first = next(iter(out[name].values()))
        require_labels(first.labels, specs[name])
        if first.skipped:
            ctx.data_skips[name] = skip_summary(first)
    return out["train"], out["test"], out.get("val")


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
