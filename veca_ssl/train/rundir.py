"""The run directory's integrity: one run at a time, a trustworthy resume point, honest history.

``open_run_dir`` (rank 0, before anything in ``output_dir`` is written):

1. takes the directory's lock (``veca_ssl.train.lock``), reporting a stale one taken over;
2. removes what killed writers left (``.tmp-*`` files, checksum files without their checkpoint);
3. picks the newest checkpoint that verifies and fits this model; newer unusable ones are reported
   by name and reason and set aside as ``<name>.rejected``; if checkpoints exist but none is usable
   the run stops rather than silently start over in a directory holding another run;
4. refuses to resume with a config that changes what the run computes (a diff is shown) unless
   ``train.allow_config_change=true``;
5. keeps the previous ``config.yaml`` as ``config.until-step-<N>.yaml`` when the config changed, then
   writes the new one.

``resume_point_after_divergence`` chooses the checkpoint to restart from after a NaN/Inf loss.

Every rank must agree on these outcomes, including failures: ``on_main`` runs a function on rank 0
and hands its result, or its exception, to all ranks.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from omegaconf import DictConfig, OmegaConf

from veca_ssl import distributed as dist
from veca_ssl import fileio
from veca_ssl.config import ConfigError, config_changes, format_changes, resume_changes, save_config
from veca_ssl.method.base import Method
from veca_ssl.train import sharded_checkpoint
from veca_ssl.train.checkpoint import CheckpointError, CheckpointManager, state_mismatch
from veca_ssl.train.lock import RunLock
from veca_ssl.train.metrics import read_metrics

log = logging.getLogger("veca_ssl.train")

T = TypeVar("T")


def on_main(info: dist.DistInfo, fn: Callable[[], T]) -> T:
    """``fn()`` on rank 0; every rank returns its result or raises its exception (so all ranks stop
    together with the same message instead of hanging in the next collective)."""
    result: Any = None
    error: BaseException | None = None
    if info.rank == 0:
        try:
            result = fn()
        except Exception as exc:
            error = exc
    if info.world_size > 1 and dist.is_distributed():
        try:
            result, error = dist.broadcast_object((result, error), src=0)
        except Exception:  # an exception that does not pickle: send its message
            result, error = dist.broadcast_object((result, RuntimeError(str(error)) if error is not None else None),
                                                  src=0)
    if error is not None:
        raise error
    return result


def incompatibility(method: Method, optimizer: torch.optim.Optimizer, state: dict) -> str | None:
    """Why ``state`` cannot be loaded into this method and optimiser (another model's checkpoint), or None."""
    expected = method.state_dict()
    for part in ("student", "teacher"):
        reason = state_mismatch(expected[part], state.get(part), part)
        if reason:
            return reason
    found_losses = state.get("loss_state") or {}
    for name, loss_state in expected["loss_state"].items():
        reason = state_mismatch(loss_state, found_losses.get(name), f"loss_state.{name}")
        if reason:
            return reason
    groups = (state.get("optimizer") or {}).get("param_groups")
    ours = [len(g["params"]) for g in optimizer.param_groups]
    theirs = [len(g.get("params", ())) for g in groups] if isinstance(groups, list) else None
    if theirs != ours:
        return f"written for another model: optimiser parameter groups of sizes {theirs} in the file, {ours} here"
    return None


def non_finite(state: dict) -> str | None:
    """The first non-finite floating-point tensor among weights, EMA, loss state and optimiser state."""
    def walk(node: Any, where: str) -> str | None:
        if torch.is_tensor(node):
            if node.is_floating_point() and not bool(torch.isfinite(node).all()):
                return where
            return None
        if isinstance(node, dict):
            for key, value in node.items():
                found = walk(value, f"{where}.{key}" if where else str(key))
                if found:
                    return found
        elif isinstance(node, (list, tuple)):
            for i, value in enumerate(node):
                found = walk(value, f"{where}[{i}]")
                if found:
                    return found
        return None

    found = walk({k: state.get(k) for k in ("student", "teacher", "loss_state", "optimizer")}, "")
    return f"non-finite values in {found}" if found else None


def open_run_dir(cfg: DictConfig, out: Path, lock: RunLock, checkpoints: CheckpointManager, method: Method,
                 optimizer: torch.optim.Optimizer) -> tuple[Path | None, dict | None]:
    """Steps 1-5 of the module docstring (rank 0). Returns the checkpoint to resume from and its state
    (``(None, None)`` for a fresh run). Raises ``RunLockedError``, ``CheckpointError``, ``ConfigError``."""
    stale = lock.acquire()
    if stale is not None:
        log.warning("took over the lock of a run that ended without releasing it (%s)", stale.describe())
    removed = [*fileio.remove_orphans(out), *checkpoints.remove_orphans(), *fileio.remove_orphans(out / "export"),
               *sharded_checkpoint.remove_orphans(checkpoints.directory)]
    if removed:
        log.warning("removed %d file(s) left by interrupted writes: %s", len(removed),
                    ", ".join(p.name for p in removed[:5]) + (" ..." if len(removed) > 5 else ""))

    path, state, rejected = checkpoints.newest_usable(accept=lambda s: incompatibility(method, optimizer, s))
    # FSDP2 runs write sharded checkpoint directories under the same names: the newest usable of either
    # kind is the resume point (its state here is its record: step and config; every rank reads its shards)
    sharded, sharded_rejected = sharded_checkpoint.newest_good(checkpoints.directory)
    floor = CheckpointManager.step_of(path) if path is not None else -1
    rejected += [(p, reason) for p, reason in sharded_rejected if sharded_checkpoint.step_of(p) > floor]
    if sharded is not None and sharded_checkpoint.step_of(sharded) > floor:
        path, state = sharded, sharded_checkpoint.read_meta(sharded)
    if rejected and path is None:
        listing = "\n".join(f"  {p.name}: {reason}" for p, reason in rejected)
        raise CheckpointError(f"no usable checkpoint in {checkpoints.directory}:\n{listing}\nNone was changed. Move "
                              f"them away (or choose another output_dir) to start this run from scratch.")
    for bad, reason in rejected:
        kept = checkpoints.set_aside(bad, "rejected")
        log.warning("skipping checkpoint %s: %s (kept as %s)", bad.name, reason, kept.name)
    if rejected:
        log.warning("resuming from the newest good checkpoint, %s", path.name)

    start_step = int(state["step"]) if state is not None else 0
    if state is not None:
        changes = [c for c in resume_changes(state["config"], cfg) if not _same_global_batch(c, state)]
        if changes and not cfg.train.allow_config_change:
            raise ConfigError(
                f"{out} holds a run at step {start_step} ({path.name}) trained with a different config; these "
                f"changes alter what it computes:\n{format_changes(changes)}\nRerun with the run's own values "
                f"(they are in {out / 'config.yaml'}), choose another output_dir, or add "
                f"train.allow_config_change=true to continue this run with the new values.")
        if changes:
            log.warning("continuing %s with a changed config (train.allow_config_change=true):\n%s", path.name,
                        format_changes(changes))
    with fileio.writing(out / "config.yaml", "the resolved config"):
        _keep_previous_config(cfg, out, start_step)
        save_config(cfg, out / "config.yaml")
    return path, state


def _same_global_batch(change: tuple[str, Any, Any], state: dict) -> bool:
    """A per-process batch changed with the number of processes so that the global batch (what the
    schedules, the lr and the data order depend on) is the same: a resume on another world size."""
    key, old, new = change
    saved_world = state.get("world_size")
    if key != "optim.batch_size_per_gpu" or not isinstance(saved_world, int):
        return False
    return int(old) * saved_world == int(new) * dist.get_world_size()


def _keep_previous_config(cfg: DictConfig, out: Path, start_step: int) -> None:
    """A config.yaml that differs from ``cfg`` is renamed to ``config.until-step-<start>.yaml``."""
    current = out / "config.yaml"
    if not current.is_file():
        return
    old = current.read_text()
    if old == OmegaConf.to_yaml(cfg, resolve=True):
        return
    try:
        changed = [k for k, _, _ in config_changes(old, cfg)]
    except Exception:  # not a config we can read: keep it all the same
        changed = ["(unreadable)"]
    target, n = out / f"config.until-step-{start_step:08d}.yaml", 1
    while target.exists():
        target, n = out / f"config.until-step-{start_step:08d}.{n}.yaml", n + 1
    os.replace(current, target)
    log.warning("config.yaml changed (%s); the previous one is kept as %s", ", ".join(changed[:8]) or "layout",
                target.name)


def resume_point_after_divergence(checkpoints: CheckpointManager, failed_step: int, metrics_path: Path
                                  ) -> tuple[Path | None, list[tuple[Path, Path, str]]]:
    """After a non-finite loss in step ``failed_step + 1`` (0-based index ``failed_step``): the newest
    checkpoint a rerun can resume from, and the newer ones set aside as ``<name>.diverged``
    (``(old path, new path, reason)``).

    Resumable means: written before the failing step (the checkpoint of step ``failed_step`` holds
    exactly the weights that produced the NaN), weights and optimiser state finite, and the step
    after it not already diverging in ``metrics.jsonl`` (a non-finite loss or gradient norm logged).
    """
    records: dict[int, dict] = {}
    if metrics_path.is_file():
        for record in read_metrics(metrics_path):
            records.setdefault(int(record.get("step", -1)), {}).update(record)

    def acceptable(state: dict) -> str | None:
        reason = non_finite(state)
        if reason:
            return reason
        following = records.get(int(state["step"]) + 1, {})
        for key in ("loss", "grad_norm"):
            value = following.get(key)
            if isinstance(value, (int, float)) and not math.isfinite(value):
                return f"its next step already diverged ({key}={value} at step {int(state['step']) + 1})"
        return None

    path, _, rejected = checkpoints.newest_usable(accept=acceptable, below=failed_step)
    diverged = [(p, "holds the weights that produced the non-finite loss") for p in checkpoints.all()
                if checkpoints.step_of(p) >= failed_step]
    moved = [(bad, checkpoints.set_aside(bad, "diverged"), reason) for bad, reason in diverged + rejected]
    # sharded (FSDP2) checkpoints of the same directory follow the same rules
    sharded, sharded_moved = _sharded_resume_point(checkpoints.directory, failed_step, records)
    if sharded is not None and (path is None or sharded_checkpoint.step_of(sharded) > checkpoints.step_of(path)):
        path = sharded
    return path, moved + sharded_moved


def _sharded_resume_point(directory: Path, failed_step: int, records: dict[int, dict]
                          ) -> tuple[Path | None, list[tuple[Path, Path, str]]]:
    """:func:`resume_point_after_divergence` for the sharded checkpoints of ``directory``."""
    moved: list[tuple[Path, Path, str]] = []
    found: Path | None = None
    for path in reversed(sharded_checkpoint.all_checkpoints(directory)):
        step = int(sharded_checkpoint.step_of(path))
        reason = None
        if step >= failed_step:
            reason = "holds the weights that produced the non-finite loss"
        elif found is None:
            reason = sharded_checkpoint.verify(path)
            if reason is None:
                reason = non_finite(sharded_checkpoint.read_tensors(path))
                reason = f"non-finite values in {reason}" if reason else None
            following = records.get(step + 1, {})
            for key in ("loss", "grad_norm"):
                value = following.get(key)
                if reason is None and isinstance(value, (int, float)) and not math.isfinite(value):
                    reason = f"its next step already diverged ({key}={value} at step {step + 1})"
            if reason is None:
                found = path
                continue
        else:
            continue
        new = path.with_name(f"{path.name}.diverged")
        n = 1
        while new.exists():
            new, n = path.with_name(f"{path.name}.diverged.{n}"), n + 1
        os.replace(path, new)
        moved.append((path, new, reason))
    return found, moved
