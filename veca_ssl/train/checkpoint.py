"""Checkpoints that survive a kill at any moment, and are checked before they are trusted.

A checkpoint is one ``torch.save`` dict of tensors and plain containers (no pickled objects), read
with ``weights_only=True``. It holds everything a bit-exact resume needs: student, teacher, loss
centres, optimiser, step, RNG states and the resolved config (the data position is derived from the
step: samples are addressed by global position, see ``veca_ssl.data.InfiniteSampler``).

On disk, ``checkpoints/checkpoint-<step>.pt`` is written atomically (``veca_ssl.fileio``) with its
sha256 in ``checkpoint-<step>.pt.sha256`` (``sha256sum -c`` format), written before the rename. Loading
verifies the digest (or, for a file without one, the zip records' CRC-32s): ``torch.load`` itself
would happily read flipped bytes inside a tensor. A checkpoint that fails any check is reported by
name and reason (``CheckpointError``); ``newest_usable`` walks back to the newest good one.

Retention: the newest ``keep_last`` checkpoints, plus every ``keep_every``-th step (milestones) when
``keep_every > 0``. Each one holds the student, the EMA teacher and AdamW's two moments: about four
times the size of all trainable parameters in fp32.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Callable
from pathlib import Path

import torch

from veca_ssl import fileio
from veca_ssl.models.io import CHECKPOINT_FORMAT

_NAME = re.compile(r"^checkpoint-(\d{8})\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used or written; the message names the file and the reason."""


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def rank_rng(state: dict, rank: int) -> dict | None:
    """The generator state ``rank`` resumes with from a single-file checkpoint: its own (``"rng_ranks"``,
    one entry per rank that wrote it; ``"rng"`` alone in a checkpoint that kept rank 0's only), or None
    for a rank the checkpoint has no stream for (more processes resume it than wrote it): that rank
    keeps the stream ``seed_everything`` gave it, rather than a copy of another rank's."""
    ranks = state.get("rng_ranks") or [state["rng"]]
    return ranks[rank] if rank < len(ranks) else None


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _tensor_bytes(obj: object) -> int:
    """Bytes of the tensors in a (nested) checkpoint state."""
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def state_mismatch(expected: dict[str, torch.Tensor], found: object, what: str) -> str | None:
    """Why the state dict ``found`` cannot be loaded where ``expected`` lives (other keys or shapes:
    another model's checkpoint), or None when it fits."""
    if not isinstance(found, dict):
        return f"{what} is missing"
    missing = [k for k in expected if k not in found]
    extra = [k for k in found if k not in expected]
    if missing or extra:
        sample = (missing or extra)[0]
        return (f"written for another model: {what} has {len(missing)} missing and {len(extra)} unexpected "
                f"entries (e.g. {sample!r})")
    for key, ref in expected.items():
        got = found[key]
        if torch.is_tensor(ref) and (not torch.is_tensor(got) or got.shape != ref.shape):
            shape = tuple(got.shape) if torch.is_tensor(got) else type(got).__name__
            return f"written for another model: {what}[{key!r}] is {shape} in the file, {tuple(ref.shape)} here"
    return None


class CheckpointManager:
    """The checkpoints of one run directory: atomic, checksummed saves, retention, verified loads."""

    def __init__(self, directory: str | Path, keep_last: int = 3, keep_every: int = 0) -> None:
        self.directory = Path(directory)
        self.keep_last = keep_last
        self.keep_every = keep_every

    def path(self, step: int) -> Path:
        return self.directory / f"checkpoint-{step:08d}.pt"

    @staticmethod
    def step_of(path: str | Path) -> int:
        match = _NAME.match(Path(path).name)
        if match is None:
            raise ValueError(f"{path} is not named checkpoint-<8-digit step>.pt")
        return int(match.group(1))

    def all(self) -> list[Path]:
        """Checkpoints in step order (oldest first)."""
        if not self.directory.is_dir():
            return []
        return sorted(p for p in self.directory.iterdir() if _NAME.match(p.name))

    def latest(self) -> Path | None:
        found = self.all()
        return found[-1] if found else None

    def save(self, state: dict, step: int) -> Path:
        """Write ``checkpoint-<step>.pt`` (+ its sha256) atomically, then apply the retention rule.
        Raises ``CheckpointError`` (the previous checkpoints are untouched) when it cannot be written."""
        final = self.path(step)
        try:
            # through a file object of ours: when a write fails, ``with`` closes it at once (a file torch
            # opens itself can stay open, unlinked and holding its space, while the error is handled),
            # and the OSError (ENOSPC, EROFS, ...) stays the cause of torch's error
            with fileio.atomic_path(final, checksum=True) as tmp, open(tmp, "wb") as f:
                torch.save({"format": CHECKPOINT_FORMAT, **state}, f)
        except Exception as exc:
            cause, remedy = fileio.write_failure(exc, final)
            previous = self.latest()
            intact = f"The newest intact checkpoint is {previous}" if previous else "No checkpoint was written yet"
            if fileio.is_disk_full(exc):
                cause += f"; a checkpoint of this run takes about {fileio.human_bytes(_tensor_bytes(state))}"
                remedy += " (or lower train.keep_last)"
            raise CheckpointError(f"cannot write checkpoint {final}: {cause}. {intact}; {remedy} and rerun the same "
                                  f"command to resume.") from exc
        self._prune()
        return final

    def _prune(self) -> None:
        found = self.all()
        for old in found[: max(len(found) - self.keep_last, 0)]:
            if self.keep_every > 0 and self.step_of(old) % self.keep_every == 0:
                continue  # a milestone
            old.unlink(missing_ok=True)
            fileio.checksum_path(old).unlink(missing_ok=True)

    def remove_orphans(self) -> list[Path]:
        """Delete the temporary files of interrupted saves and checksum files without a checkpoint.
        Only while holding the run's lock (no other writer)."""
        removed = fileio.remove_orphans(self.directory)
        if self.directory.is_dir():
            for sidecar in self.directory.glob("checkpoint-*.pt" + fileio.CHECKSUM_SUFFIX):
                if not sidecar.with_name(sidecar.name[: -len(fileio.CHECKSUM_SUFFIX)]).exists():
                    sidecar.unlink(missing_ok=True)
                    removed.append(sidecar)
        return removed

    def set_aside(self, path: str | Path, tag: str) -> Path:
        """Rename ``path`` (and its checksum file) to ``<name>.<tag>`` so that it is neither resumed
        from nor pruned, but kept for inspection. Returns the new path."""
        path = Path(path)
        new, n = path.with_name(f"{path.name}.{tag}"), 1
        while new.exists():
            new, n = path.with_name(f"{path.name}.{tag}.{n}"), n + 1
        os.replace(path, new)
        sidecar = fileio.checksum_path(path)
        if sidecar.exists():
            os.replace(sidecar, fileio.checksum_path(new))
        return new

    @staticmethod
    def load(path: str | Path, map_location: str | torch.device = "cpu", verify: bool = True) -> dict:
        """Read a checkpoint, never unpickling objects (``weights_only=True``). With ``verify`` its
        sha256 (or its zip CRCs) is checked first. Raises ``CheckpointError`` naming the file and why."""
        path = Path(path)
        if fileio.is_plain_pickle(path):
            raise CheckpointError(f"{path}: {fileio.PLAIN_PICKLE}")
        try:
            if verify:
                fileio.verify_file(path)
            state = torch.load(path, map_location=map_location, weights_only=True)
        except FileNotFoundError:
            raise CheckpointError(f"{path}: no such file") from None
        except fileio.CorruptFileError as exc:
            raise CheckpointError(f"{path}: {exc}") from None
        except pickle.UnpicklingError as exc:
            # torch's message advises weights_only=False, exactly what must never happen here: say what
            # the file holds instead
            text = str(exc)
            found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
            if found:
                raise CheckpointError(f"{path}: holds a pickled Python object ({found.group(1)}), which is never "
                                      "loaded (only tensors and plain containers are): not a veca-ssl checkpoint") from None
            detail = re.search(r"WeightsUnpickler error: ([^\n]+)", text)
            # never torch's first line: it advises weights_only=False, exactly what must not be done here
            raise CheckpointError(f"{path}: unreadable ({detail.group(1) if detail else 'not a torch checkpoint'})") \
                from None
        except Exception as exc:  # torch raises RuntimeError/EOFError/... for damaged archives
            raise CheckpointError(f"{path}: unreadable ({_first_line(exc)})") from None
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"{path}: not a veca-ssl training checkpoint (no 'format': '{CHECKPOINT_FORMAT}' "
                                  "entry; another program's file?)")
        match = _NAME.match(path.name)
        if match is not None and int(state.get("step", -1)) != int(match.group(1)):
            raise CheckpointError(f"{path}: holds step {state.get('step')} but is named for step {int(match.group(1))} "
                                  "(renamed or copied from elsewhere)")
        return state

    def newest_usable(self, accept: Callable[[dict], str | None] | None = None, below: int | None = None,
                      map_location: str | torch.device = "cpu") -> tuple[Path | None, dict | None, list[tuple[Path, str]]]:
        """The newest checkpoint (with step < ``below`` if given) that loads, verifies and that
        ``accept(state)`` does not object to (it returns a reason or None).

        Returns ``(path, state, rejected)``: ``rejected`` lists the newer ones skipped, with reasons;
        ``(None, None, rejected)`` when none qualifies.
        """
        rejected: list[tuple[Path, str]] = []
        for path in reversed(self.all()):
            if below is not None and self.step_of(path) >= below:
                continue
            try:
                state = self.load(path, map_location)
                reason = accept(state) if accept is not None else None
            except CheckpointError as exc:
                reason, state = str(exc).removeprefix(f"{path}: "), None
            if reason is None:
                return path, state, rejected
            rejected.append((path, reason))
        return None, None, rejected
