"""Sharded training checkpoints (``torch.distributed.checkpoint``) for FSDP2 runs, resumable on any
world size, and their conversion to the single-file backbone export.

Layout: ``<output_dir>/checkpoints/checkpoint-<step:08d>/`` — the same names and keep-last rule as the
single-file ``checkpoint-<step:08d>.pt`` (``veca_ssl.train.checkpoint``), so one directory can hold
both and the newest of either kind is resumed. Inside:

- ``__<rank>_0.distcp``: what each rank wrote (its shards of student, teacher and AdamW moments; a
  tensor that every rank holds whole, e.g. the DINO centres, is written once);
- ``.metadata``: DCP's index of every tensor's global shape and where its pieces are, written last
  by rank 0 once every rank has written;
- ``veca.json``: step, resolved config, backbone config, world size, and each file's size and SHA-256.

Atomic at the directory level: everything is written into ``.tmp-sharded-checkpoint-<step>/``, and rank 0
renames it to its final name only after ``.metadata`` and ``veca.json`` are on disk (fsynced), so a
directory with a final name is complete. A kill leaves only a ``.tmp-…`` directory, removed by the
next save.

Only tensors are stored (AdamW's per-parameter state, not its hyper-parameters, which the config
rebuilds every step), so loading never unpickles a stored object; DCP's ``.metadata`` index is itself
a pickle, read here by an unpickler that admits only DCP's metadata classes (``SafeFileSystemReader``).

Resume on another world size: DCP stores each tensor with its global shape, and a loading rank asks
for the pieces its own layout needs (whole tensors on one process, other shard boundaries on N), so
FSDP2 on 2 ranks can resume on 1 (plain modules), on 4, or under DDP. Each rank's RNG state is stored
under its rank; a rank that did not exist when the checkpoint was written keeps its seeded state.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist

from veca_ssl import distributed as vd
from veca_ssl import fileio
from veca_ssl.train.checkpoint import CheckpointError, rank_rng, rng_state, set_rng_state

FORMAT = "veca-ssl-sharded-checkpoint"
META_FILE = "veca.json"
DCP_METADATA = ".metadata"
_NAME = re.compile(r"^checkpoint-(\d{8})$")
_ANY_NAME = re.compile(r"^checkpoint-(\d{8})(\.pt)?$")
_TMP_PREFIX = ".tmp-sharded-checkpoint-"


# ------------------------------------------------------------------------------------- safe reading
def _metadata_classes() -> dict[tuple[str, str], Any]:
    """Everything a DCP ``.metadata`` pickle may name: DCP's metadata dataclasses, torch.Size, dtypes,
    layouts, paths (the checkpoint id). Nothing that runs code on load."""
    import pathlib

    import torch.distributed.checkpoint.filesystem as fs
    import torch.distributed.checkpoint.metadata as md
    import torch.serialization

    allowed: dict[tuple[str, str], Any] = {
        ("torch", "Size"): torch.Size,
        ("torch.serialization", "_get_layout"): torch.serialization._get_layout,
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): fs._StorageInfo,
        ("pathlib", "PosixPath"): pathlib.PosixPath,
        ("pathlib", "PurePosixPath"): pathlib.PurePosixPath,
        ("pathlib", "WindowsPath"): pathlib.PureWindowsPath,  # a checkpoint written on Windows: inert here
        ("pathlib", "PureWindowsPath"): pathlib.PureWindowsPath,
        ("collections", "OrderedDict"): __import__("collections").OrderedDict,
    }
    for name, obj in vars(md).items():
        if isinstance(obj, type) and obj.__module__ == md.__name__:
            allowed[(md.__name__, name)] = obj
    for name, obj in vars(torch).items():
        if isinstance(obj, torch.dtype):
            allowed[("torch", name)] = obj
    return allowed


class _MetadataUnpickler(pickle.Unpickler):
    _allowed: dict[tuple[str, str], Any] | None = None

    def find_class(self, module: str, name: str) -> Any:
        if _MetadataUnpickler._allowed is None:
            _MetadataUnpickler._allowed = _metadata_classes()
        try:
            return _MetadataUnpickler._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint index") from None


def _safe_reader(path: Path) -> Any:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeFileSystemReader(FileSystemReader):
        """DCP's file reader with an allow-list unpickler for the ``.metadata`` index."""

        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            with open(Path(self.path) / DCP_METADATA, "rb") as f:
                metadata = _MetadataUnpickler(f).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeFileSystemReader(str(path))


# ---------------------------------------------------------------------------------------- listing
def is_sharded_checkpoint(path: str | Path) -> bool:
    """A directory with DCP's index and our ``veca.json`` (complete, as renamed by ``save``)."""
    path = Path(path)
    return path.is_dir() and (path / DCP_METADATA).is_file() and (path / META_FILE).is_file()


def step_of(path: Path) -> int | None:
    """The step in a checkpoint name of either kind (``checkpoint-00000008`` or ``….pt``)."""
    m = _ANY_NAME.match(path.name)
    return int(m.group(1)) if m else None


def all_checkpoints(directory: str | Path) -> list[Path]:
    """Sharded checkpoint directories (final names only), oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if _NAME.match(p.name) and p.is_dir())


def read_meta(path: str | Path) -> dict:
    """``veca.json`` of a sharded checkpoint. Raises ValueError naming the path when it is not one."""
    path = Path(path)
    try:
        meta = json.loads((path / META_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path} is not a veca-ssl sharded checkpoint (unreadable {META_FILE}: {exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a veca-ssl sharded checkpoint ({META_FILE} has no format {FORMAT!r})")
    return meta


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def verify(path: str | Path, checksums: bool = True) -> str | None:
    """``None`` when ``path`` is a complete, intact sharded checkpoint; else what is wrong with it
    (missing index, a shard missing, truncated or — with ``checksums`` — altered)."""
    path = Path(path)
    if not (path / DCP_METADATA).is_file():
        return f"{path} has no {DCP_METADATA} index (interrupted or not a sharded checkpoint)"
    try:
        meta = read_meta(path)
    except ValueError as exc:
        return str(exc)
    for name, rec in meta.get("files", {}).items():
        f = path / name
        if not f.is_file():
            return f"{path}: shard {name} is missing"
        if f.stat().st_size != rec["bytes"]:
            return f"{path}: shard {name} has {f.stat().st_size} bytes, {rec['bytes']} were written (truncated?)"
        if checksums and _sha256(f) != rec["sha256"]:
            return f"{path}: shard {name} does not match its SHA-256 (corrupted on disk)"
    return None


def newest_good(directory: str | Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest sharded checkpoint of ``directory`` that verifies (checksums included), and the newer
    ones that did not, with the reason. Run by one process (``veca_ssl.train.rundir`` on rank 0)."""
    rejected: list[tuple[Path, str]] = []
    for cand in reversed(all_checkpoints(directory)):
        problem = verify(cand)
        if problem is None:
            return cand, rejected
        rejected.append((cand, problem.removeprefix(f"{cand}: ")))
    return None, rejected


def remove_orphans(directory: str | Path) -> list[Path]:
    """Delete the temporary directories of interrupted sharded saves (under the run's lock)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = [p for p in directory.glob(f"{_TMP_PREFIX}*") if p.is_dir()]
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    return removed


# ------------------------------------------------------------------------------------------- saving
def _dist() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def _load_here(state: dict, reader: Any) -> None:
    """``dcp.load`` in this process alone (any world size wrote the checkpoint; nobody else reads)."""
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():  # DCP warns that it loads without a process group: that is the intent
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, storage_reader=reader, no_dist=True)


def _barrier() -> None:
    if _dist():
        vd.barrier()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _training_state(method: Any, optimizer: torch.optim.Optimizer) -> tuple[dict, list[dict]]:
    """What DCP saves and loads in place: the method's tensors and AdamW's per-parameter state by
    parameter name (``get_optimizer_state_dict`` creates empty moments on a fresh optimiser), and the
    optimiser's groups by parameter name (what ``set_optimizer_state_dict`` needs back)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    osd = get_optimizer_state_dict(method.student, optimizer)
    return {**method.state_dict(), "optimizer": osd["state"]}, osd["param_groups"]


def save(directory: str | Path, step: int, method: Any, optimizer: torch.optim.Optimizer, meta: dict,
         keep_last: int, keep_every: int = 0) -> Path:
    """Write ``<directory>/checkpoint-<step:08d>/`` from every rank (a collective) and keep the newest
    ``keep_last`` checkpoints of either kind, plus every ``keep_every``-th step. Returns the final path on
    every rank; raises ``CheckpointError`` on every rank when any part could not be written (the
    previous checkpoints are untouched)."""
    import torch.distributed.checkpoint as dcp

    directory = Path(directory)
    final = directory / f"checkpoint-{step:08d}"
    tmp = directory / f"{_TMP_PREFIX}{step:08d}"
    rank = tdist.get_rank() if _dist() else 0
    if rank == 0:
        directory.mkdir(parents=True, exist_ok=True)
        remove_orphans(directory)  # left by a kill during an earlier save
    _barrier()
    state, _ = _training_state(method, optimizer)
    state["rng"] = {f"rank{rank}": _rng_tensors()}
    writer = dcp.FileSystemWriter(str(tmp), sync_files=True)
    try:
        # returns on every rank after rank 0 has written .metadata, i.e. after every rank's shards; a
        # rank's write error is raised on every rank
        dcp.save(state, storage_writer=writer, no_dist=not _dist())
        mine = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)}
                for p in sorted(tmp.glob(f"__{rank}_*.distcp"))}
    except Exception as exc:
        raise CheckpointError(_write_error(final, exc)) from exc
    gathered: list[Any] = vd.all_gather_object(mine)
    error = None
    if rank == 0:
        try:
            _finalise(directory, tmp, final, step, gathered, meta, keep_last, keep_every)
        except Exception as exc:
            error = _write_error(final, exc)
    # every rank learns rank 0's outcome: all stop together, none waits in a collective
    error = vd.broadcast_object(error, src=0)
    if error is not None:
        raise CheckpointError(error)
    return final


def _write_error(final: Path, exc: BaseException) -> str:
    """One message for a sharded checkpoint that could not be written: the real cause and the way out."""
    cause, remedy = fileio.write_failure(exc, final)
    return (f"cannot write sharded checkpoint {final}: {cause}. The previous checkpoints are intact; {remedy} and "
            f"rerun the same command to resume.")


def _finalise(directory: Path, tmp: Path, final: Path, step: int, gathered: list[dict], meta: dict,
              keep_last: int, keep_every: int) -> None:
    """Rank 0, after every rank wrote: the record, then the rename that makes the checkpoint visible."""
    files = {name: rec for part in gathered for name, rec in part.items()}
    record = {"format": FORMAT, "step": int(step), "world_size": len(gathered), "files": files, **meta}
    with open(tmp / META_FILE, "w") as f:
        json.dump(record, f, indent=2, default=str)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    old = None
    if final.exists():  # the same step written again (a resume from an older checkpoint)
        old = directory / f"{_TMP_PREFIX}old-{step:08d}"
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(directory)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    _prune(directory, keep_last, keep_every)


def _prune(directory: Path, keep_last: int, keep_every: int) -> None:
    """Keep the newest ``keep_last`` checkpoints, counting single files and directories alike, and every
    ``keep_every``-th step (milestones), as ``CheckpointManager`` does."""
    found = sorted((p for p in directory.iterdir() if _ANY_NAME.match(p.name)), key=lambda p: step_of(p) or -1)
    for old in found[: max(len(found) - keep_last, 0)]:
        if keep_every > 0 and (step_of(old) or 0) % keep_every == 0:
            continue  # a milestone
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
            fileio.checksum_path(old).unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------ loading
def load(path: str | Path, method: Any, optimizer: torch.optim.Optimizer) -> dict:
    """Restore ``method`` (sharded or not) and ``optimizer`` from a sharded checkpoint written on any
    world size, and this rank's RNG when it was saved; a collective when a process group exists.
    Returns the checkpoint's ``veca.json`` record (``step``, ``config``, …)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    path = Path(path)
    meta = read_meta(path)
    reader = _safe_reader(path)
    stored = reader.read_metadata().state_dict_metadata
    state, param_groups = _training_state(method, optimizer)
    rank = tdist.get_rank() if _dist() else 0
    rng = _rng_tensors()
    restore_rng = all(f"rng.rank{rank}.{k}" in stored for k in rng)
    if restore_rng:
        state["rng"] = {f"rank{rank}": rng}
    missing = sorted(k for k in _flat_keys(state) if k not in stored)
    if missing:
        raise CheckpointError(f"{path} does not match this run: it lacks {', '.join(missing[:5])}"
                              f"{' …' if len(missing) > 5 else ''} (written for another model or method)")
    if _dist():
        dcp.load(state, storage_reader=reader)
    else:
        _load_here(state, reader)
    method.load_state_dict(state)  # in place already for plain and DTensor tensors; this keeps it explicit
    set_optimizer_state_dict(method.student, optimizer, {"state": state["optimizer"], "param_groups": param_groups})
    if restore_rng:
        saved = state["rng"][f"rank{rank}"]
        set_rng_state({"torch": saved["torch"], **({"cuda": [saved[f"cuda{i}"] for i in range(len(saved) - 1)]}
                                                    if len(saved) > 1 else {})})
    return meta


def _rng_tensors() -> dict[str, torch.Tensor]:
    """This process's RNG states as a flat dict of tensors (``torch``, ``cuda0``, ``cuda1``, …)."""
    state = rng_state()
    return {"torch": state["torch"], **{f"cuda{i}": t for i, t in enumerate(state.get("cuda", []))}}


def _flat_keys(state: dict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in state.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            keys += _flat_keys(v, name + ".")
        elif isinstance(v, (list, tuple)):
            keys += _flat_keys({str(i): x for i, x in enumerate(v)}, name + ".")
        else:
            keys.append(name)
    return keys


def load_full_state(state: dict, method: Any, optimizer: torch.optim.Optimizer) -> None:
    """Restore a sharded ``method`` from a single-file checkpoint (whole tensors, e.g. written by a DDP
    run): every rank keeps its shard of each tensor. The file's optimiser state is keyed by position
    (``Optimizer.state_dict``); positions map to parameter names through the optimiser's groups, built
    in the same order from the same model."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    full = StateDictOptions(full_state_dict=True)
    set_model_state_dict(method.student, state["student"], options=full)
    set_model_state_dict(method.teacher, state["teacher"], options=full)
    for name, module in method.loss_modules().items():
        module.load_state_dict(state.get("loss_state", {})[name])
    names = {id(p): n for n, p in method.student.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    saved = state["optimizer"]
    if len(order) != sum(len(g["params"]) for g in saved["param_groups"]):
        raise ValueError("the checkpoint's optimiser has a different number of parameters than this run")
    osd = {"state": {order[i]: s for i, s in saved["state"].items()},
           "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in saved["param_groups"]]}
    set_optimizer_state_dict(method.student, optimizer, osd, options=full)
    if (rng := rank_rng(state, vd.get_rank())) is not None:
        set_rng_state(rng)


def read_tensors(path: str | Path, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every stored tensor whose flat name starts with ``prefix`` (e.g. ``"teacher."``), whole, by flat
    name with the prefix removed; read in this process alone (any world size wrote it)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    path = Path(path)
    problem = verify(path, checksums=False)
    if problem is not None:
        raise ValueError(problem)
    reader = _safe_reader(path)
    stored = reader.read_metadata().state_dict_metadata
    state = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in stored.items()
             if k.startswith(prefix) and isinstance(m, TensorStorageMetadata)}
    _load_here(state, reader)
    return {k[len(prefix):]: v for k, v in state.items()}


def load_backbone_state(path: str | Path, which: str = "teacher") -> tuple[dict, dict[str, torch.Tensor]]:
    """``(backbone config, whole state dict)`` of the EMA teacher's (or the student's) backbone in a
    sharded checkpoint, read in this process alone (no process group needed, any world size)."""

    from veca_ssl.models.registry import build_from_config

    if which not in ("teacher", "student"):
        raise ValueError(f"which={which!r}; valid: 'teacher', 'student'")
    path = Path(path)
    problem = verify(path, checksums=False)
    if problem is not None:
        raise ValueError(problem)
    meta = read_meta(path)
    with torch.device("meta"):
        skeleton = build_from_config(meta["backbone_config"])
    state = {k: torch.empty(v.shape, dtype=v.dtype) for k, v in skeleton.state_dict().items()}
    _load_here({which: {f"backbone.{k}": v for k, v in state.items()}}, _safe_reader(path))
    return meta["backbone_config"], state


__all__ = ["FORMAT", "is_sharded_checkpoint", "all_checkpoints", "read_meta", "verify", "newest_good", "save",
           "load", "load_full_state", "read_tensors", "load_backbone_state", "step_of"]
