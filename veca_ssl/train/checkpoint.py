"""Checkpoints that survive a kill at any moment: atomic writes, keep-last-k, safe loading.

A checkpoint is one ``torch.save`` dict of tensors and plain containers (no pickled objects), read
with ``weights_only=True``. It holds everything a bit-exact resume needs: student, teacher, loss
centres, optimiser, step, RNG states and the resolved config (the data position is derived from the
step: samples are addressed by global position, see ``veca_ssl.data.InfiniteSampler``).
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import torch

from veca_ssl.models.io import CHECKPOINT_FORMAT

_NAME = re.compile(r"checkpoint-(\d{8})\.pt$")


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointManager:
    def __init__(self, directory: str | Path, keep_last: int = 3) -> None:
        self.directory = Path(directory)
        self.keep_last = keep_last

    def path(self, step: int) -> Path:
        return self.directory / f"checkpoint-{step:08d}.pt"

    def all(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        return sorted(p for p in self.directory.iterdir() if _NAME.search(p.name))

    def latest(self) -> Path | None:
        found = self.all()
        return found[-1] if found else None

    def save(self, state: dict, step: int) -> Path:
        """Write to a temporary file, fsync, then rename: readers never see a partial checkpoint."""
        self.directory.mkdir(parents=True, exist_ok=True)
        final = self.path(step)
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-checkpoint-")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save({"format": CHECKPOINT_FORMAT, **state}, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        for old in self.all()[: -self.keep_last]:
            old.unlink(missing_ok=True)
        return final

    @staticmethod
    def load(path: str | Path, map_location="cpu") -> dict:
        try:
            state = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as exc:
            raise ValueError(f"cannot load checkpoint {path}: {exc}. Delete it to resume from the previous "
                             f"one.") from exc
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path} is not a veca-ssl training checkpoint")
        return state
