"""Jobs that run under submitit (SLURM, local or in-process) and the executor plumbing around them.

``TrainJob`` / ``EvalJob`` are picklable, checkpointable callables: submitit pickles one, runs it on
every task of the allocation and, when SLURM signals the end of the time slot or a preemption, calls
its ``checkpoint()`` and requeues the returned ``DelayedSubmission``. Training resumes by itself from
its output directory, so the requeued job is simply the same argv again.

Preemption sequence (see ``veca_ssl.distributed``): the signal sets a flag (it does not kill); the
training loop polls ``checkpoint_requested()`` every step, saves a checkpoint and returns; then
``TrainJob`` hands over to submitit's own handler, which calls ``checkpoint()`` on rank 0, requeues the
job and exits. A second signal before the loop reacts goes straight to submitit (requeue from the
last periodic checkpoint).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import re
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

TRAIN_ENTRY = "veca_ssl.train.main:main"
EVAL_ENTRY = "eval.cli:main"


def resolve_entry(entry: str) -> Callable[[list[str]], Any]:
    """``"package.module:function"`` → the function (imported lazily, inside the job)."""
    module, sep, name = entry.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"entry point {entry!r} must look like 'package.module:function'")
    fn = getattr(importlib.import_module(module), name, None)
    if not callable(fn):
        raise ValueError(f"entry point {entry!r}: {module} has no callable {name!r}")
    return fn


class _ArgvJob:
    """A submitit callable that runs ``entry(argv)`` on every task, after initialising distributed."""

    default_entry = TRAIN_ENTRY

    def __init__(self, argv: Sequence[str], entry: str | None = None) -> None:
        self.argv = [str(a) for a in argv]
        self.entry = entry or self.default_entry

    def __repr__(self) -> str:
        return f"{type(self).__name__}(argv={self.argv!r}, entry={self.entry!r})"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and (self.argv, self.entry) == (other.argv, other.entry)  # type: ignore[attr-defined]

    def __call__(self) -> Any:
        from veca_ssl import distributed as vd
        from veca_ssl import signals

        vd.init_distributed()
        # Installed after submitit's own handlers, which it remembers and restores afterwards.
        signals.install_preemption_handler()
        try:
            result = resolve_entry(self.entry)(list(self.argv))
            preempted = signals.checkpoint_requested(sync=False)
        finally:
            signals.uninstall_preemption_handler()
            vd.cleanup()
        if preempted:
            self._requeue_after_save()
            return {"status": "preempted", "result": result}
        if isinstance(result, int) and not isinstance(result, bool) and result != 0:
            # a CLI-style entry reporting failure (e.g. a config error): make the job itself fail
            raise RuntimeError(f"{self.entry} {' '.join(self.argv)} exited with status {result}")
        return result

    @staticmethod
    def _requeue_after_save() -> None:
        """The loop saved and returned after a signal: run submitit's own handler now, which calls
        ``checkpoint()``, requeues and exits on rank 0 (and just returns on the other ranks)."""
        try:
            import submitit

            sig = submitit.JobEnvironment._usr_sig()
        except Exception:  # pragma: no cover - submitit is a dependency
            sig = None
        handler = signal.getsignal(sig) if sig is not None else None
        if os.environ.get("SUBMITIT_EXECUTOR") in ("slurm", "local") and callable(handler):
            log.warning("checkpoint saved after a preemption signal: requeueing through submitit")
            handler(sig, None)
        else:
            log.warning("stopped on a preemption signal outside a submitit job: rerun the same command to resume")

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """Called by submitit (rank 0) before requeueing: resubmit the same argv, which resumes."""
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(type(self)(self.argv, entry=self.entry))


class TrainJob(_ArgvJob):
    """``veca train <argv>`` as a checkpointable submitit job (resumes from its output dir)."""

    default_entry = TRAIN_ENTRY


class EvalJob(_ArgvJob):
    """``veca eval <protocol> <argv>`` as a submitit job; requeued jobs simply run again."""

    default_entry = EVAL_ENTRY


# ----------------------------------------------------------------------------------------- parsing
_MEM_UNITS = {"k": 1 / 1024**2, "m": 1 / 1024, "g": 1.0, "t": 1024.0}


def parse_mem_gb(text: str) -> float:
    """``64G``/``64GB``/``500M``/``1.5T``/``64`` (GB) → gigabytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgtKMGT])?[bB]?\s*", str(text))
    if m is None or float(m.group(1)) <= 0:
        raise ValueError(f"--mem {text!r}: expected a positive size like 64G, 500M or 1.5T")
    return float(m.group(1)) * _MEM_UNITS[(m.group(2) or "g").lower()]


def parse_timeout_min(text: str) -> int:
    """A SLURM time limit → whole minutes (seconds round up): ``90`` (minutes), ``MM:SS``,
    ``HH:MM:SS``, ``D-HH``, ``D-HH:MM``, ``D-HH:MM:SS``."""
    text = str(text).strip()
    m = re.fullmatch(r"(?:(\d+)-)?(\d+(?::\d+){0,2})", text)
    if m is None:
        raise ValueError(f"--timeout {text!r}: expected minutes (90), HH:MM:SS (1:30:00) or D-HH:MM:SS")
    days, parts = int(m.group(1) or 0), [int(x) for x in m.group(2).split(":")]
    if m.group(1) is not None:  # D-HH[:MM[:SS]]
        parts += [0] * (3 - len(parts))
        hours, minutes, seconds = parts
    elif len(parts) == 3:
        hours, minutes, seconds = parts
    else:  # MM or MM:SS
        hours, minutes, seconds = 0, parts[0], (parts[1] if len(parts) == 2 else 0)
    total = days * 1440 + hours * 60 + minutes + (1 if seconds else 0)
    if total <= 0:
        raise ValueError(f"--timeout {text!r} must be at least one minute")
    return total


# ---------------------------------------------------------------------------------------- executors
def executor_parameters(args: argparse.Namespace) -> dict[str, Any]:
    """AutoExecutor.update_parameters kwargs (generic names + ``slurm_`` ones) from parsed options."""
    gpus = args.gpus_per_node
    params: dict[str, Any] = {
        "nodes": args.nodes,
        "tasks_per_node": args.tasks_per_node or max(1, gpus),
        "gpus_per_node": gpus,
        "cpus_per_task": args.cpus_per_task,
        "mem_gb": parse_mem_gb(args.mem) if args.mem else None,
        "timeout_min": parse_timeout_min(args.timeout),
        "name": args.job_name,
        "slurm_partition": args.partition,
        "slurm_account": args.account,
        "slurm_qos": args.qos,
        "slurm_constraint": args.constraint,
        "slurm_exclude": args.exclude,
        "slurm_signal_delay_s": args.signal_delay,
        "slurm_setup": list(args.setup) or None,
    }
    return {k: v for k, v in params.items() if v is not None}


def _slurm_executor_for_rendering(folder: Path) -> Any:
    """A SlurmExecutor that works without ``srun`` on PATH: only used to render the sbatch script."""
    from submitit.slurm.slurm import SlurmExecutor

    class _RenderOnly(SlurmExecutor):
        @classmethod
        def affinity(cls) -> int:
            return 2

    return _RenderOnly(folder)


def render_sbatch(folder: Path, params: dict[str, Any], array_size: int | None = None) -> tuple[str, str]:
    """(sbatch script, command it runs) exactly as submitit would write them for these parameters."""
    ex = _slurm_executor_for_rendering(folder)
    generic = {k: v for k, v in params.items() if not k.startswith("slurm_")}
    specific = {k[len("slurm_"):]: v for k, v in params.items() if k.startswith("slurm_")}
    # The same translation AutoExecutor does: generic names → sbatch names, then slurm_* as they are.
    ex.update_parameters(**ex._convert_parameters(generic), **specific)
    if array_size is not None and array_size > 1:
        ex.parameters["map_count"] = array_size
    command = ex._submitit_command_str
    return ex._make_submission_file_text(command, uid="dry-run"), command


def make_executor(folder: Path, cluster: str | None, params: dict[str, Any], max_requeues: int) -> Any:
    """submitit.AutoExecutor for ``cluster`` (None: SLURM when ``srun`` exists, else local)."""
    import submitit

    if cluster == "local" and params.get("nodes", 1) > 1:
        raise ValueError(f"--cluster local runs on this machine only: got --nodes {params['nodes']}, use 1")
    kwargs = {"slurm_max_num_timeout": max_requeues} if cluster in (None, "slurm") else {}
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster, **kwargs)
    if executor.cluster == "debug":  # in-process: a single task, no scheduler parameters apply
        params = {k: v for k, v in params.items() if k in ("timeout_min", "name")}
    executor.update_parameters(**params)
    return executor


def record_submission(output_dir: Path, entry: dict[str, Any]) -> Path:
    """Append one JSON line about a submission to ``<output_dir>/submitit/submissions.jsonl``."""
    path = output_dir / "submitit" / "submissions.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), **entry}) + "\n")
    return path


# -------------------------------------------------------------------------------------- smoke job
def smoke_train(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """A tiny deterministic DDP regression that exercises what a real run needs from the cluster:
    process-group rendezvous, gradient sync, atomic checkpoints, preemption → save → requeue → resume.

    ``veca submit train --entry launchers.slurm:smoke_train --output-dir D [--steps N]
    [--simulate-preemption-at K]``. The data of step s is a global batch drawn from seed s and split
    by rank, so any world size at the same global batch reaches the same weights.
    """
    import torch

    from veca_ssl import distributed as vd
    from veca_ssl import fileio, signals
    from veca_ssl.parallelize import wrap_ddp

    p = argparse.ArgumentParser(prog="smoke_train", allow_abbrev=False)
    p.add_argument("--output-dir", required=True)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--save-every", type=int, default=5)
    p.add_argument("--simulate-preemption-at", type=int, default=-1, help="rank 0 signals itself once")
    p.add_argument("--step-sleep", type=float, default=0.0)
    p.add_argument("--device", default="auto", help="auto: NCCL on GPUs (checks the GPU fabric), else gloo")
    args = p.parse_args(list(argv or []))
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    info = vd.init_distributed(device=args.device)
    signals.install_preemption_handler()
    if args.global_batch % info.world_size:
        raise ValueError(f"--global-batch {args.global_batch} is not divisible by {info.world_size} ranks")
    per_rank = args.global_batch // info.world_size
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1, dtype=torch.float64).to(info.device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ckpt, start = out / "smoke_ckpt.pt", 0
    if ckpt.exists():
        state = torch.load(ckpt, map_location=info.device, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start = int(state["step"])
    ddp = wrap_ddp(model, info)

    def save(step: int) -> None:
        if info.is_main:
            with fileio.atomic_path(ckpt) as tmp:  # a kill mid-write leaves the previous checkpoint intact
                torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step}, tmp)
        vd.barrier()

    for step in range(start, args.steps):
        g = torch.Generator().manual_seed(1000 + step)
        x = torch.randn(args.global_batch, 4, generator=g, dtype=torch.float64)
        y = x.sum(dim=1, keepdim=True) + 0.1 * torch.randn(args.global_batch, 1, generator=g, dtype=torch.float64)
        local = slice(info.rank * per_rank, (info.rank + 1) * per_rank)
        x, y = x[local].to(info.device), y[local].to(info.device)
        opt.zero_grad()
        (ddp(x) - y).pow(2).mean().backward()
        opt.step()
        time.sleep(args.step_sleep)
        marker = out / "smoke_preempted_once"
        if step + 1 == args.simulate_preemption_at and info.is_main and not marker.exists():
            marker.touch()
            os.kill(os.getpid(), signal.SIGUSR2)
        if signals.checkpoint_requested():  # collective: every rank stops after the same step
            save(step + 1)
            return {"status": "stopped", "step": step + 1, "resumed_from": start}
        if (step + 1) % args.save_every == 0:
            save(step + 1)
    save(args.steps)
    weights = torch.cat([model.weight.detach().flatten(), model.bias.detach()]).cpu().tolist()
    if info.is_main:
        (out / "smoke_final.json").write_text(json.dumps({"weights": weights, "world_size": info.world_size}))
    return {"status": "done", "step": args.steps, "resumed_from": start, "weights": weights,
            "world_size": info.world_size}


if __name__ == "__main__":
    print(smoke_train(sys.argv[1:]))
