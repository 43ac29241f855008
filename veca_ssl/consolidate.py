"""``veca consolidate``: turn a training checkpoint -- sharded (FSDP2) or single-file -- into the
single-file backbone export every eval command and ``load_backbone`` read.

Arguments are parsed before torch is imported, so ``veca consolidate --help`` is instant.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from veca_ssl.cli import HelpFormatter


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="veca consolidate", formatter_class=HelpFormatter,
        description="Convert a training checkpoint -- sharded (FSDP2) or single-file (DDP, one process) -- into "
                    "the single-file backbone export (<out>.safetensors + <out>.json) of the whole core bank, "
                    "which every eval command and load_backbone read. The export records the run's training "
                    "resolution (the default resolution of evaluation).")
    p.add_argument("checkpoint", help="a checkpoint-<step>/ directory or checkpoint-<step>.pt file, or a run's "
                                      "output directory (its newest checkpoint, sharded ones first)")
    p.add_argument("--out", default=None, help="output .safetensors path (default: <run>/export/<which>.safetensors, "
                                               "or <checkpoint>.safetensors next to a lone checkpoint)")
    p.add_argument("--which", default="teacher", choices=["teacher", "student"],
                   help="the EMA teacher (what training exports) or the student")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing export at the output path (e.g. the one a finished run wrote)")
    p.add_argument("--debug", action="store_true", help="show the full Python traceback of an error")
    return p


def _newest_in(run: Path, listing: Callable[[Path], list[Path]]) -> Path | None:
    """The newest checkpoint ``listing`` finds in ``run/checkpoints/`` or in ``run`` itself."""
    for directory in (run / "checkpoints", run):
        found = listing(directory)
        if found:
            return found[-1]
    return None


def _refuse_existing(out: Path, overwrite: bool) -> None:
    """FileExistsError naming an export (weights or sidecar) at ``out`` and what it holds, unless ``overwrite``."""
    weights = out.with_suffix(".safetensors")
    found = [p for p in (weights, weights.with_suffix(".json")) if p.exists()]
    if not found or overwrite:
        return
    held = ""
    try:
        import json

        step = json.loads(weights.with_suffix(".json").read_text()).get("steps")
        held = f" (the weights of step {step})" if step is not None else ""
    except (OSError, ValueError, AttributeError):
        pass
    raise FileExistsError(f"{found[0]} already exists{held}; pass --overwrite to replace it, or --out PATH to write "
                          f"elsewhere")


def consolidate(checkpoint: str | Path, out: str | Path | None = None, which: str = "teacher",
                overwrite: bool = False) -> tuple[Path, Path, dict]:
    """Write the export of ``checkpoint``; returns ``(checkpoint read, export written, its meta)``.
    An existing export at the output path is replaced only with ``overwrite`` (FileExistsError)."""
    from veca_ssl.models import load_backbone, save_backbone
    from veca_ssl.models.provenance import training_resolution
    from veca_ssl.models.registry import build_from_config
    from veca_ssl.train import sharded_checkpoint as sharded
    from veca_ssl.train.checkpoint import CheckpointManager

    given = Path(checkpoint)
    ckpt = given if sharded.is_sharded_checkpoint(given) else _newest_in(given, sharded.all_checkpoints)
    if ckpt is not None:  # an FSDP2 run: whole tensors from the shards, in this process
        config, state = sharded.load_backbone_state(ckpt, which)
        model = build_from_config(config)
        model.load_state_dict(state, strict=True)
        meta = sharded.read_meta(ckpt)
    else:  # a DDP / single-process run: the same export, from its single-file checkpoint
        ckpt = given if given.is_file() else _newest_in(given, lambda d: CheckpointManager(d).all())
        if ckpt is None:
            raise FileNotFoundError(f"no sharded checkpoint at {given} (expected checkpoint-<step>/ with "
                                    f"{sharded.DCP_METADATA} and {sharded.META_FILE}, or a run directory holding "
                                    f"checkpoints/checkpoint-<step>/)")
        model = load_backbone(ckpt, which=which)
        meta = {"step": sharded.step_of(ckpt), "world_size": "its"}
    if out is not None:
        out = Path(out)
    elif ckpt.parent.name == "checkpoints":
        out = ckpt.parent.parent / "export" / f"{which}.safetensors"
    else:
        out = ckpt.with_suffix(".safetensors")
    _refuse_existing(out, overwrite)
    extra = {"steps": meta["step"], "source": str(ckpt), "which": which}
    found = training_resolution(ckpt)
    if found is not None:  # so the export, moved anywhere, is still evaluated at its training resolution
        extra["resolution"] = found[0]
    return ckpt, save_backbone(model, out, extra=extra), meta


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        ckpt, written, meta = consolidate(args.checkpoint, args.out, args.which, args.overwrite)
    except (OSError, ValueError) as exc:
        if args.debug:
            raise
        print(f"veca consolidate: {exc}", file=sys.stderr)
        return 2
    print(f"{ckpt} (step {meta['step']}, written by {meta['world_size']} processes) -> {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
