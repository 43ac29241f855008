"""Intra-op thread policy of every command that trains, times or extracts (``train.num_threads`` of
``veca train``; ``--num-threads`` of ``veca eval``, ``veca select``, ``veca extract`` and ``veca bench``).

PyTorch starts one intra-op thread per physical core of the machine, whatever share of it the process
actually has. On a shared or busy machine that oversubscribes the cores: the OpenMP threads of a
small model spin at every barrier waiting for a thread that another process (another rank, a
DataLoader worker, somebody else's job) has pushed off its core, so steps get several times slower
than with fewer threads. The policy gives each rank the cores it can count on:

    cores of this rank = the CPUs this process may run on (``os.sched_getaffinity``), divided among
                         the ranks of this node that share them (a SLURM task already has its own
                         ``--cpus-per-task``)
    threads            = cores of this rank - its DataLoader workers (each worker runs one thread),
                         at least 1

``train.num_threads=N`` / ``--num-threads N`` (N >= 1) sets N threads outright; ``0`` (the default)
applies the policy, except when ``OMP_NUM_THREADS`` is set in the environment, which is then respected
as the user's choice. Timings are printed with :func:`timing_conditions`: the threads in effect and the
machine's load average when they were measured, since other processes on the cores change them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class ThreadPlan:
    """How many intra-op threads a process uses, and why (printed at start-up)."""

    threads: int
    reason: str


def available_cores() -> int:
    """CPUs this process may run on: its affinity mask (taskset, cgroups, SLURM binding), not the machine."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no sched_getaffinity (macOS, Windows)
        return max(1, os.cpu_count() or 1)


def _int(env: Mapping[str, str], key: str) -> int | None:
    m = re.match(r"\s*(\d+)", env.get(key, ""))  # SLURM writes e.g. "8(x2)" for 8 tasks on each of 2 nodes
    return int(m.group(1)) if m else None


def ranks_per_node(env: Mapping[str, str]) -> int:
    """Processes of this job on this node, from torchrun, submitit's local executor or SLURM variables."""
    if (n := _int(env, "LOCAL_WORLD_SIZE")) is not None:  # torchrun
        return max(1, n)
    if env.get("SUBMITIT_EXECUTOR") == "local" and (tasks := _int(env, "SUBMITIT_LOCAL_NTASKS")):
        return max(1, tasks // max(1, _int(env, "SUBMITIT_LOCAL_JOB_NUM_NODES") or 1))
    for key in ("SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        if (n := _int(env, key)) is not None:
            return max(1, n)
    return 1


def plan_threads(requested: int, num_workers: int, env: Mapping[str, str] | None = None,
                 cores: int | None = None, option: str = "train.num_threads") -> ThreadPlan:
    """The thread count for ``option=requested`` (``train.num_threads``, ``--num-threads``) with
    ``num_workers`` DataLoader workers.

    Pure (``env`` and ``cores`` default to this process's), so the rule is testable on any machine.
    """
    env = os.environ if env is None else env
    if requested > 0:
        return ThreadPlan(requested, f"{option}={requested}")
    if (omp := _int(env, "OMP_NUM_THREADS")) is not None and omp > 0:
        return ThreadPlan(omp, f"OMP_NUM_THREADS={omp} from the environment")
    cores = available_cores() if cores is None else cores
    slurm_cpus = _int(env, "SLURM_CPUS_PER_TASK") if "SLURM_JOB_ID" in env else None
    if slurm_cpus:  # SLURM binds each task to its own --cpus-per-task: the mask is already per rank
        share, how = min(cores, slurm_cpus), f"{min(cores, slurm_cpus)} cores of this SLURM task"
    else:
        ranks = ranks_per_node(env)
        share = max(1, cores // ranks)
        how = f"{cores} cores available" + (f" / {ranks} ranks on this node" if ranks > 1 else "")
    threads = max(1, share - max(0, num_workers))
    workers = f" - {num_workers} loader worker{'s' if num_workers != 1 else ''}" if num_workers > 0 else ""
    return ThreadPlan(threads, f"auto: {how}{workers}")


def apply_thread_policy(requested: int, num_workers: int, option: str = "train.num_threads") -> ThreadPlan:
    """Set torch's intra-op threads by :func:`plan_threads`; returns the plan with the count in effect."""
    import torch

    plan = plan_threads(requested, num_workers, option=option)
    if torch.get_num_threads() != plan.threads:
        torch.set_num_threads(plan.threads)
    return ThreadPlan(torch.get_num_threads(), plan.reason)


def describe_plan(plan: ThreadPlan, option: str) -> str:
    """``"1 intra-op CPU thread (auto: 2 cores available - 1 loader worker); --num-threads N to choose"``."""
    return (f"{plan.threads} intra-op CPU thread{'s' if plan.threads != 1 else ''} ({plan.reason}); "
            f"{option} to choose")


def load_average() -> float | None:
    """The machine's 1-minute load average (runnable processes), None where the OS gives none."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def timing_conditions(threads: int | None = None) -> dict:
    """What a timing depends on beyond the model, sampled now: ``threads`` (torch's intra-op threads
    unless given), ``cores`` (this process's) and ``load_average`` (1 minute)."""
    if threads is None:
        import torch

        threads = torch.get_num_threads()
    load = load_average()
    return {"threads": int(threads), "cores": available_cores(),
            "load_average": None if load is None else round(load, 2)}


def conditions_text(before: dict, after: dict | None = None) -> str:
    """``"1 thread, load average 2.31 (1 min, 2 cores)"`` — a range when it changed while measuring."""
    load = "unknown"
    lo = before.get("load_average")
    hi = (after or before).get("load_average")
    if lo is not None and hi is not None:
        load = f"{lo:.2f}" if abs(hi - lo) < 0.005 else f"{lo:.2f}–{hi:.2f}"
    t = before["threads"]
    return f"{t} intra-op thread{'s' if t != 1 else ''}, load average {load} (1 min, {before['cores']} cores)"


__all__ = ["ThreadPlan", "available_cores", "ranks_per_node", "plan_threads", "apply_thread_policy",
           "describe_plan", "load_average", "timing_conditions", "conditions_text"]
