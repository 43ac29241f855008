"""What a checkpoint says about the run that made it: the resolution it was trained at.

Evaluation, export and width selection default to it (a backbone trained at 32 px should not be probed
at 224 unless asked). Sources, first found wins: a ``resolution`` entry in an export's ``.json``
sidecar; the run's resolved ``config.yaml`` (for a run directory, an export in ``<run>/export/``, a
checkpoint file in ``<run>/checkpoints/`` or a sharded ``<run>/checkpoints/checkpoint-<step>/``); the
config stored inside a training checkpoint, ours (YAML text) or the VECA reference's (a dict:
``image_size``, or the multi-resolution fine-tuning's last-phase probabilities). External weights
(DINOv2/timm ``.pth``) carry none.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch


def _most_likely(probs: dict) -> int | None:
    """The most likely size of ``{size: probability}`` (ties: the larger)."""
    pairs = [(float(p), int(s)) for s, p in probs.items()]
    return max(pairs)[1] if pairs else None


def resolution_of_config(config: str | dict) -> int | None:
    """The global-crop side a training run ended at, from our config (YAML text or mapping: the last
    multi-resolution phase's most likely size, ties the larger, else ``crops.global_size``) or the VECA
    reference's config dict (``phase_b_probs`` of a multi-resolution run, else ``image_size``)."""
    from omegaconf import OmegaConf

    if isinstance(config, dict) and ("image_size" in config or "phase_b_probs" in config):
        if isinstance(config.get("phase_b_probs"), dict) and config["phase_b_probs"]:
            return _most_likely(config["phase_b_probs"])
        size = config.get("image_size")
        return int(size) if isinstance(size, int) and not isinstance(size, bool) else None
    cfg = OmegaConf.create(config)
    phases = OmegaConf.select(cfg, "multires.phases", default=None)
    if phases:
        last = phases[-1]
        sizes, probs = list(last.get("sizes", [])), list(last.get("probs", []))
        if sizes and len(probs) == len(sizes):
            return _most_likely(dict(zip(sizes, probs)))
    size = OmegaConf.select(cfg, "crops.global_size", default=None)
    return int(size) if size is not None else None


def _run_configs(path: Path) -> list[Path]:
    """Where the resolved ``config.yaml`` of the run holding ``path`` can be."""
    if path.is_dir():
        if path.parent.name == "checkpoints":  # a sharded checkpoint-<step>/ directory
            return [path.parent.parent / "config.yaml"]
        return [path / "config.yaml"]
    if path.parent.name in ("export", "checkpoints"):
        return [path.parent.parent / "config.yaml"]
    return []


def training_resolution(checkpoint: str | Path) -> tuple[int, str] | None:
    """``(resolution, where it was read)`` of the run that produced ``checkpoint``; None if unknown."""
    path = Path(checkpoint)
    sidecar = path.with_suffix(".json")
    if path.is_file() and path.suffix == ".safetensors" and sidecar.is_file():
        try:
            meta = json.loads(sidecar.read_text())
        except (OSError, ValueError):
            meta = {}
        value = meta.get("resolution") if isinstance(meta, dict) else None
        if isinstance(value, int) and not isinstance(value, bool):
            return value, str(sidecar)
    for cand in _run_configs(path):
        if cand.is_file():
            with contextlib.suppress(Exception):  # unreadable config: try the next source
                res = resolution_of_config(cand.read_text())
                if res:
                    return res, str(cand)
    if path.is_file() and path.suffix in (".pt", ".pth"):
        try:  # mmap: reads the pickled structure, not the tensors
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # not ours, or unreadable; load_backbone reports it properly
            return None
        config = obj.get("config") if isinstance(obj, dict) else None
        if isinstance(config, str | dict):
            with contextlib.suppress(Exception):
                res = resolution_of_config(config)
                if res:
                    return res, f"{path} (training config)"
    return None
