"""Saving and loading backbones without unpickling arbitrary objects.

Exported weights are ``<stem>.safetensors`` with a ``<stem>.json`` sidecar holding the backbone
config. Training checkpoints are ``torch.save`` dicts of tensors and plain containers, read back
with ``weights_only=True``, or sharded ``torch.distributed.checkpoint`` directories (FSDP2 runs,
``veca_ssl.train.sharded_checkpoint``); ``load_backbone`` takes the EMA teacher's backbone from either.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .base import Backbone
from .registry import build_from_config

EXPORT_FORMAT = "veca-ssl-backbone"
CHECKPOINT_FORMAT = "veca-ssl-checkpoint"


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_backbone(model: Backbone, path: str | Path, extra: dict | None = None) -> Path:
    """Write ``path`` (.safetensors) and its .json sidecar, each atomically. Returns the weights path."""
    path = Path(path).with_suffix(".safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    save_file(state, tmp, metadata={"format": EXPORT_FORMAT})
    os.replace(tmp, path)
    meta = {"format": EXPORT_FORMAT, "config": model.config, **(extra or {})}
    _atomic_write_bytes(path.with_suffix(".json"), json.dumps(meta, indent=2).encode())
    return path


def _newest_checkpoint(directory: Path) -> Path | None:
    """The newest ``checkpoint-<step>.pt`` or sharded ``checkpoint-<step>/`` (FSDP2 runs) in ``directory``."""
    from veca_ssl.train.sharded_checkpoint import all_checkpoints, step_of

    found = sorted(directory.glob("checkpoint-*.pt")) + all_checkpoints(directory)
    return max(found, key=lambda p: step_of(p) or -1) if found else None


def _find_weights(path: Path) -> Path:
    if path.is_dir():
        from veca_ssl.train.sharded_checkpoint import is_sharded_checkpoint

        if is_sharded_checkpoint(path):
            return path
        for cand in (path / "export" / "teacher.safetensors", path / "teacher.safetensors"):
            if cand.exists():
                return cand
        newest = _newest_checkpoint(path / "checkpoints") or _newest_checkpoint(path)
        if newest is not None:
            return newest
        found = sorted(path.glob("*.safetensors"))
        if len(found) == 1:
            return found[0]
        raise FileNotFoundError(f"no backbone weights in directory {path} (looked for export/teacher.safetensors, "
                                f"checkpoints/checkpoint-*.pt or a sharded checkpoints/checkpoint-*/, one *.safetensors)")
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return path


def _read_safetensors(path: Path, map_location: str | torch.device) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path), device=str(map_location))
    except Exception as exc:  # safetensors raises its own error types for truncated files
        raise ValueError(f"cannot read weights {path}: {exc} (truncated or not a safetensors file?)") from exc


def _safetensors_format(path: Path) -> str | None:
    """The ``format`` metadata entry (ours: EXPORT_FORMAT); None when absent or unreadable."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format")
    except Exception:  # unreadable: _read_safetensors reports it with the file name
        return None


def load_backbone(path: str | Path, map_location: str | torch.device = "cpu", which: str = "teacher",
                  **kwargs) -> Backbone:
    """Load a backbone from an export (.safetensors + .json), a training checkpoint (the EMA teacher by
    default, ``which="student"`` for the student; single-file or a sharded ``checkpoint-<step>/``
    directory of an FSDP2 run) or a directory holding either.

    External teachers (DINOv2/DINOv3/timm ``.pth`` state dicts, and ``.safetensors`` files that are not
    our exports, e.g. timm's) go through ``veca_ssl.models.convert``; extra ``kwargs`` are passed there
    (e.g. ``arch=``, ``num_heads=``).
    """
    path = _find_weights(Path(path))
    if path.is_dir():  # a sharded training checkpoint (FSDP2): read whole tensors in this process
        from veca_ssl.train.sharded_checkpoint import load_backbone_state

        config, state = load_backbone_state(path, which)
        model = build_from_config(config)
        model.load_state_dict(state, strict=True)
        return model
    if path.suffix == ".safetensors":
        sidecar = path.with_suffix(".json")
        if not sidecar.exists():
            if _safetensors_format(path) != EXPORT_FORMAT:  # e.g. timm/HF model.safetensors (issue 7)
                from . import convert

                return convert.backbone_from_state_dict(_read_safetensors(path, map_location), source=str(path),
                                                        **kwargs)
            raise FileNotFoundError(f"{path} has no config sidecar {sidecar}; export with save_backbone()")
        meta = json.loads(sidecar.read_text())
        model = build_from_config(meta["config"])
        model.load_state_dict(_read_safetensors(path, map_location), strict=True)
        return model
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise ValueError(f"cannot read checkpoint {path}: {exc} (truncated, corrupt, or not a torch file)") from exc
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        if which not in ("teacher", "student"):
            raise ValueError(f"which={which!r}; valid: 'teacher', 'student'")
        model = build_from_config(obj["backbone_config"])
        prefix = "backbone."
        state = {k[len(prefix):]: v for k, v in obj[which].items() if k.startswith(prefix)}
        model.load_state_dict(state, strict=True)
        return model
    from . import convert  # external layouts (issue 7)

    return convert.backbone_from_state_dict(obj, source=str(path), **kwargs)
