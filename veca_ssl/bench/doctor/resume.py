"""Stop and resume, as a cluster does it: the real ``veca train`` in subprocesses (DataLoader workers
on), SIGTERM to the job's process group mid-run, the same command again — and the result bit-identical
to a run that was never stopped: every logged loss, the exported teacher and the final checkpoint
(weights, EMA teacher, AdamW state, RNG and data position).

One process on the doctor's device, and two processes (NCCL on two GPUs, else gloo on the CPU),
started the way ``srun`` starts a job step: one process per rank with ``RANK``/``WORLD_SIZE``/
``LOCAL_RANK`` and a rendezvous address, all in one process group that the signal goes to.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from veca_ssl.bench.doctor import rules
from veca_ssl.bench.doctor.checks import Context
from veca_ssl.bench.doctor.report import Result
from veca_ssl.bench.doctor.rules import FAIL, PASS

STEPS = 20


def run_config(device: str, steps: int, world: int) -> list[str]:
    """The run's overrides: a small VECA on synthetic images, deterministic, a checkpoint every 5
    steps, loader workers on. On a GPU at 64 px with bf16 autocast (what the product trains with)."""
    per_rank_batch = 8
    samples = 64 * world
    common = [f"data.train=synthetic:n={samples},size={{s}},classes=4,seed=0",
              f"data.num_workers={2 if device == 'cuda' else 1}", f"optim.batch_size_per_gpu={per_rank_batch}",
              f"optim.epochs={-(-steps * per_rank_batch * world // samples) + 1}", "optim.warmup_epochs=1",
              "optim.lr_scaling=none", "optim.base_lr=0.002", "dino.warmup_teacher_temp_epochs=1",
              "dino.head_out_dim=256", "dino.head_hidden_dim=256", "dino.head_bottleneck_dim=64",
              "ibot.head_out_dim=256", f"train.max_steps={steps}", "train.checkpoint_every=5", "train.keep_last=10",
              "train.log_every=1", "train.progress=false", "train.knn_monitor.enabled=false", "deterministic=true",
              f"device={device}"]
    if device == "cuda":
        model = ["model.name=veca_tiny", "model.patch_size=16", "crops.global_size=64", "crops.local_size=32"]
        size = 64
    else:
        model = ["model.name=veca_tiny", "model.patch_size=8", "model.num_cores=16",
                 "model.overrides={embed_dim: 32, depth: 2, num_heads: 2}", "crops.global_size=32",
                 "crops.local_size=16", "crops.num_local=2"]
        size = 32
    return [o.replace("{s}", str(size)) for o in common] + model


def _env(device: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if device == "cuda":
        # torch.use_deterministic_algorithms (deterministic=true) refuses cuBLAS without a fixed
        # workspace configuration; PyTorch's documented setting
        env.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    return env


@dataclass
class Job:
    """The ranks of one ``veca train`` job, in one process group (its leader is rank 0)."""

    procs: list[subprocess.Popen]
    logs: list[Path]

    @property
    def pgid(self) -> int:
        return self.procs[0].pid

    def wait(self, timeout: float) -> list[int]:
        deadline = time.monotonic() + timeout
        codes = []
        for p in self.procs:
            codes.append(p.wait(timeout=max(1.0, deadline - time.monotonic())))
        return codes

    def kill(self) -> None:
        if any(p.poll() is None for p in self.procs):
            try:
                os.killpg(self.pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            for p in self.procs:
                p.wait(timeout=30)

    def output(self) -> str:
        return "\n".join(f"--- rank {i} ---\n{log.read_text(errors='replace')}" for i, log in enumerate(self.logs))


def _in_group(leader: int) -> dict:
    """Popen arguments that put the child in process group ``leader`` (0: a new group it leads)."""
    if sys.version_info >= (3, 11):
        return {"process_group": leader}  # set between fork and exec without running Python code
    return {"preexec_fn": lambda: os.setpgid(0, leader)}


def start(config: Path, output_dir: Path, device: str, world: int, logs: Path) -> Job:
    """``veca train --config config output_dir=…`` as ``world`` ranks in a new process group."""
    from veca_ssl.spawn import find_free_port

    cmd = [sys.executable, "-m", "veca_ssl.cli", "train", "--config", str(config), f"output_dir={output_dir}"]
    env = _env(device)
    if world > 1:
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(find_free_port()), WORLD_SIZE=str(world))
    procs: list[subprocess.Popen] = []
    paths = []
    for rank in range(world):
        rank_env = dict(env, RANK=str(rank), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world)) if world > 1 else env
        leader = procs[0].pid if procs else 0
        path = Path(f"{logs}.rank{rank}.log")
        paths.append(path)
        with open(path, "w") as log:
            procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=rank_env,
                                          **_in_group(leader)))
    return Job(procs, paths)


def logged_steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    return sum(1 for line in path.read_text().splitlines() if '"loss"' in line)


def diff_states(a, b, where: str = "") -> list[str]:
    """Where two checkpoint trees differ (tensors bit for bit, plain values by ``==``)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{where}/{k}: only in one" for k in sorted(set(a) ^ set(b), key=str)]
        for k in sorted(set(a) & set(b), key=str):
            out += diff_states(a[k], b[k], f"{where}/{k}")
        return out
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{where}: lengths {len(a)} != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in diff_states(x, y, f"{where}[{i}]")]
    if torch.is_tensor(a) and torch.is_tensor(b):
        same = a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
        return [] if same else [f"{where}: tensors differ"]
    return [] if a == b else [f"{where}: {a!r} != {b!r}"]


def compare_runs(whole: Path, stopped: Path) -> tuple[list[str], dict]:
    """Differences between a run that was stopped and resumed and one that was not (empty: bit-exact)."""
    from safetensors.torch import load_file

    from veca_ssl.train.checkpoint import CheckpointManager
    from veca_ssl.train.metrics import read_metrics

    problems: list[str] = []

    def losses(run: Path) -> dict[int, float]:
        return {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r}

    la, lb = losses(whole), losses(stopped)
    if la != lb:
        steps = sorted(set(la) | set(lb))
        first = next((s for s in steps if la.get(s) != lb.get(s)), None)
        problems.append(f"losses differ from step {first} ({la.get(first)} vs {lb.get(first)})")
    ta, tb = (load_file(str(run / "export" / "teacher.safetensors")) for run in (whole, stopped))
    problems += [f"export{d}" for d in diff_states(ta, tb)]
    ca, cb = (CheckpointManager(run / "checkpoints").latest() for run in (whole, stopped))
    if ca is None or cb is None or ca.name != cb.name:
        problems.append(f"final checkpoints {ca and ca.name} vs {cb and cb.name}")
    else:
        sa, sb = CheckpointManager.load(ca), CheckpointManager.load(cb)
        sa.pop("config", None), sb.pop("config", None)  # holds output_dir, which differs by design
        problems += [f"checkpoint{d}" for d in diff_states(sa, sb)]
    return problems, {"losses_compared": len(la), "teacher_tensors_compared": len(ta)}


def stop_and_resume(ctx: Context, device: str, world: int, name: str) -> Result:
    """The check: whole run, stopped run (SIGTERM to the group once >= 8 steps are logged), resumed run."""
    from omegaconf import OmegaConf

    steps = ctx.args.train_steps
    root = ctx.work / name
    root.mkdir(parents=True, exist_ok=True)
    config = root / "config.yaml"
    config.write_text(OmegaConf.to_yaml(OmegaConf.from_dotlist(run_config(device, steps, world))))
    timeout = ctx.args.train_timeout
    whole, stopped = root / "whole", root / "stopped"
    jobs: list[Job] = []
    try:
        job = start(config, whole, device, world, root / "whole")
        jobs.append(job)
        codes = job.wait(timeout)
        if any(codes):
            return Result(name, FAIL, f"uninterrupted {steps}-step run failed (exit {codes})",
                          _tail(job.output()))
        job = start(config, stopped, device, world, root / "stopped")
        jobs.append(job)
        target = max(2, steps * 2 // 5)
        deadline = time.monotonic() + timeout
        while logged_steps(stopped) < target:
            if any(p.poll() is not None for p in job.procs) or time.monotonic() > deadline:
                return Result(name, FAIL, "the run to be stopped ended or stalled before the signal",
                              _tail(job.output()))
            time.sleep(0.05)
        os.killpg(job.pgid, signal.SIGTERM)
        codes = job.wait(timeout)
        out = job.output()
        found = re.search(r"checkpoint at step (\d+) written", out)
        if any(codes) or not found:
            return Result(name, FAIL, f"SIGTERM to the process group: exit {codes}, no checkpoint line", _tail(out))
        stopped_at = int(found.group(1))
        job = start(config, stopped, device, world, root / "resumed")
        jobs.append(job)
        codes = job.wait(timeout)
        out = job.output()
        if any(codes) or f"at step {stopped_at}" not in out:
            return Result(name, FAIL, f"the resumed run failed or did not resume at step {stopped_at} "
                          f"(exit {codes})", _tail(out))
    finally:
        for job in jobs:
            job.kill()
    problems, counts = compare_runs(whole, stopped)
    backend = None if world == 1 else ("NCCL" if device == "cuda" else "gloo")
    nums = {"device": device, "processes": world, "backend": backend, "steps": steps, "stopped_at": stopped_at,
            **counts}
    procs = "1 process" if world == 1 else f"{world} processes, {backend}"
    summary = (f"veca train, {steps} steps on {device} ({procs}): SIGTERM to the process group at step "
               f"{stopped_at}, resumed; ")
    if problems:
        return Result(name, FAIL, summary + "NOT bit-exact", "; ".join(problems[:3]), nums)
    return Result(name, PASS, summary + f"bit-exact ({counts['losses_compared']} losses, exported teacher, final "
                  "checkpoint with optimiser, RNG and data state)", numbers=nums)


def _tail(text: str, lines: int = 6) -> str:
    kept = [line for line in text.strip().splitlines() if line.strip()][-lines:]
    return " / ".join(kept)


def check_resume(ctx: Context) -> Result:
    return stop_and_resume(ctx, ctx.device.type, 1, "resume")


def check_resume_two_processes(ctx: Context) -> Result:
    device, backend, note = rules.two_process_backend(ctx.machine)
    result = stop_and_resume(ctx, device, 2, "resume-2proc")
    if note and result.status == PASS:
        result.reason = note
    return result
