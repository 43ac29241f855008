"""Saving and loading backbones without unpickling arbitrary objects.

Exported weights are ``<stem>.safetensors`` with a ``<stem>.json`` sidecar holding the backbone
config. Training checkpoints are ``torch.save`` dicts of tensors and plain containers, read back
with ``weights_only=True``, or sharded ``torch.distributed.checkpoint`` directories (FSDP2 runs,
``veca_ssl.train.sharded_checkpoint``); ``load_backbone`` takes the EMA teacher's backbone from either.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from veca_ssl import fileio

from .base import Backbone
from .registry import build_from_config

EXPORT_FORMAT = "veca-ssl-backbone"
CHECKPOINT_FORMAT = "veca-ssl-checkpoint"
EXPORT_FORMAT_NAME = "veca-ssl"  # the format name reported for our own exports and checkpoints
log = logging.getLogger("veca_ssl.models")


def save_backbone(model: Backbone, path: str | Path, extra: dict | None = None) -> Path:
    """Write ``path`` (.safetensors) and its .json sidecar, each atomically. Returns the weights path."""
    path = Path(path).with_suffix(".safetensors")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with fileio.atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"format": EXPORT_FORMAT})
    fileio.atomic_write_json(path.with_suffix(".json"), {"format": EXPORT_FORMAT, "config": model.config, **(extra or {})})
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


class WeightsMismatchError(ValueError):
    """Weights whose tensors do not fit the architecture their config (sidecar, checkpoint) describes."""


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(map(str, t.shape)) + ")"


def _first(items: list[str], limit: int = 3) -> str:
    more = len(items) - limit
    return "; ".join(items[:limit]) + (f" (and {more} more)" if more > 0 else "")


def load_weights(model: Backbone, state: dict[str, torch.Tensor], source: str, config_from: str) -> None:
    """``model.load_state_dict(state, strict=True)``, where weights that do not fit ``model`` (built from
    the config in ``config_from``) raise one line naming the first tensors that differ and their shapes
    (expected by the config vs found in the file), instead of torch's multi-line list of every tensor."""
    expected = model.state_dict()
    wrong = [f"{k}: expected {_shape(v)}, found {_shape(state[k])}" for k, v in expected.items()
             if k in state and tuple(state[k].shape) != tuple(v.shape)]
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if wrong or missing or unexpected:
        arch = ", ".join(f"{k}={model.config[k]}" for k in ("embed_dim", "depth", "num_heads", "num_cores",
                                                             "patch_size") if k in model.config)
        parts = ([f"{len(wrong)} tensor(s) differ in shape: {_first(wrong)}"] if wrong else []) + \
                ([f"{len(missing)} missing from the file: {_first(missing)}"] if missing else []) + \
                ([f"{len(unexpected)} not in the model: {_first(unexpected)}"] if unexpected else [])
        raise WeightsMismatchError(
            f"{source} does not fit the architecture in {config_from} ({model.config['arch']} {arch}): "
            f"{' — '.join(parts)}. The config and the weights come from different models: keep an export's "
            f".safetensors and .json together (veca export and save_backbone write both)")
    model.load_state_dict(state, strict=True)


@dataclass
class LoadedBackbone:
    """A backbone and where its weights came from.

    ``fmt``: ``veca-ssl`` (our export or checkpoint), ``veca-reference`` (the VECA reference code) or
    ``dinov2``/``dinov3``/``timm`` (external dense teachers). ``provenance`` maps each of our tensor
    names to the source tensor(s) it was converted from (empty for our own files, where every name is
    its own source); ``synthesized`` names tensors the source lacks, filled with neutral values.
    """

    model: Backbone
    fmt: str
    provenance: dict[str, str] = field(default_factory=dict)
    synthesized: tuple[str, ...] = ()
    notes: list[str] = field(default_factory=list)


def load_backbone(path: str | Path, map_location: str | torch.device = "cpu", which: str = "teacher",
                  **kwargs) -> Backbone:
    """Load a backbone, returned in eval mode (as DINOv2's and timm's loaders do): no drop-path and no
    coordinate augmentation, so the same image always gives the same features. Call ``.train()`` on it
    to train it.

    Loads it from an export (.safetensors + .json), a training checkpoint (the EMA teacher by
    default, ``which="student"`` for the student; single-file or a sharded ``checkpoint-<step>/``
    directory of an FSDP2 run) or a directory holding either.

    Checkpoints of the VECA reference code (``{"student": …, "config": …}`` or a bare state dict) are
    converted exactly by ``veca_ssl.models.reference`` (``num_heads=`` for bare state dicts of
    non-reference widths). External teachers (DINOv2/DINOv3/timm ``.pth`` state dicts, and
    ``.safetensors`` files that are not our exports, e.g. timm's) go through
    ``veca_ssl.models.convert``; extra ``kwargs`` are passed there (e.g. ``arch=``, ``num_heads=``).

    Weights that do not fit the architecture their config describes raise :class:`WeightsMismatchError`
    (a ``ValueError``), one line naming the first tensors that differ and their shapes.
    """
    return read_backbone(path, map_location, which, **kwargs).model


def read_backbone(path: str | Path, map_location: str | torch.device = "cpu", which: str = "teacher",
                  **kwargs) -> LoadedBackbone:
    """:func:`load_backbone` with the source format and per-tensor provenance (for ``init_from``); the
    model is in eval mode."""
    loaded = _read_backbone(Path(path), map_location, which, **kwargs)
    loaded.model.eval()
    return loaded


def _read_backbone(path: Path, map_location: str | torch.device, which: str, **kwargs) -> LoadedBackbone:
    path = _find_weights(path)
    if path.is_dir():  # a sharded training checkpoint (FSDP2): read whole tensors in this process
        from veca_ssl.train.sharded_checkpoint import load_backbone_state

        config, state = load_backbone_state(path, which)
        model = build_from_config(config)
        load_weights(model, state, str(path), "its veca.json")
        return LoadedBackbone(model, EXPORT_FORMAT_NAME)
    if path.suffix == ".safetensors":
        sidecar = path.with_suffix(".json")
        if not sidecar.exists():
            if _safetensors_format(path) != EXPORT_FORMAT:  # e.g. timm/HF model.safetensors
                return _foreign(_read_safetensors(path, map_location), str(path), kwargs)
            raise FileNotFoundError(f"{path} has no config sidecar {sidecar}; export with save_backbone()")
        meta = json.loads(sidecar.read_text())
        model = build_from_config(meta["config"])
        load_weights(model, _read_safetensors(path, map_location), str(path), f"its sidecar {sidecar.name}")
        return LoadedBackbone(model, EXPORT_FORMAT_NAME)
    obj = _torch_load(path, map_location)
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        if which not in ("teacher", "student"):
            raise ValueError(f"which={which!r}; valid: 'teacher', 'student'")
        model = build_from_config(obj["backbone_config"])
        prefix = "backbone."
        state = {k[len(prefix):]: v for k, v in obj[which].items() if k.startswith(prefix)}
        load_weights(model, state, f"{path} ({which})", "its backbone_config")
        return LoadedBackbone(model, EXPORT_FORMAT_NAME)
    return _foreign(obj, str(path), kwargs)


def _torch_load(path: Path, map_location) -> object:
    try:
        fileio.verify_file(path)  # torch.load does not notice flipped bytes inside a tensor
    except fileio.CorruptFileError as exc:
        raise ValueError(f"cannot read checkpoint {path}: {exc}") from None
    if fileio.is_plain_pickle(path):
        raise ValueError(f"cannot read checkpoint {path}: {fileio.PLAIN_PICKLE}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise ValueError(f"cannot read checkpoint {path}: {_load_failure(exc)}") from None


def _load_failure(exc: Exception) -> str:
    """Why ``torch.load(weights_only=True)`` refused a file, in our words: torch's own message advises
    ``weights_only=False``, which a user must not be pointed to for a file that is merely damaged."""
    text = str(exc)
    found = re.search(r"GLOBAL (\S+)", text)
    if isinstance(exc, pickle.UnpicklingError) and found:
        return (f"it holds pickled Python objects ({found.group(1)}) beyond tensors and plain containers, and "
                f"veca-ssl never unpickles arbitrary objects. Only if you trust the file: open it once in Python "
                f"with torch's weights_only=False, save its tensors and plain values alone (for a reference "
                f"VECA checkpoint: {{'student': its state dict, 'config': dict(its config)}}) to a new file, "
                f"and load that one")
    if "legacy .tar format" in text:
        return "a tar archive, not a checkpoint (torch's legacy .tar format or a WebDataset shard)"
    if "weights_only" in text.lower() or "weights only" in text.lower():
        text = "unreadable as a torch checkpoint"
    else:
        text = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return f"{text} (truncated, corrupt, or not a torch checkpoint file)"


def _foreign(obj: object, source: str, kwargs: dict) -> LoadedBackbone:
    """A reference VECA checkpoint, or an external dense teacher."""
    from . import reference

    if reference.is_reference_checkpoint(obj):
        bad = sorted(set(kwargs) - {"num_heads"})
        if bad:
            raise ValueError(f"{source}: option(s) {bad} do not apply to a reference VECA checkpoint; valid: num_heads")
        conv = reference.convert_reference(obj, source, **kwargs)
        from .veca import VECA

        model = VECA(**conv.config)
        model.load_state_dict(conv.state, strict=True)
        for note in conv.notes:
            log.info("%s: %s", source, note)
        return LoadedBackbone(model.eval(), reference.FORMAT, conv.provenance, conv.synthesized, conv.notes)
    from . import convert

    model = convert.backbone_from_state_dict(obj, source=source, **kwargs)
    layout = getattr(model, "source_layout", "external")
    synthesized = tuple(getattr(model, "synthesized_keys", ()))
    provenance = {k: f"{k} ({layout} layout)" for k in model.state_dict() if k not in synthesized}
    return LoadedBackbone(model, layout, provenance, synthesized)
