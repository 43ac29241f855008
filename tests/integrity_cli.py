"""Helpers for the integrity tests: the real ``veca train`` CLI in a subprocess, run as users and
schedulers run it (own session/process group, signals to the group, files damaged on disk)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from omegaconf import OmegaConf
from test_train import TINY as _TRAIN_TINY  # tests/ is on sys.path (no package, pytest prepend mode)

ROOT = Path(__file__).resolve().parent.parent

#: tests/test_train.py's few-second model on 32 px synthetic images, checkpointing every 2 steps and
#: keeping them all, on the CPU.
TINY = [*_TRAIN_TINY, "train.checkpoint_every=2", "train.keep_last=10", "device=cpu"]


def write_config(path: Path, *overrides: str) -> Path:
    """An experiment YAML holding ``TINY`` + ``overrides`` (what a user would pass with --config)."""
    path.write_text(OmegaConf.to_yaml(OmegaConf.from_dotlist([*TINY, *overrides])))
    return path


def command(config: Path, *overrides: str, debug: bool = False) -> list[str]:
    return [sys.executable, "-m", "veca_ssl.train.main", "--config", str(config), *(["--debug"] if debug else []),
            *overrides]


def _env(extra: dict[str, str] | None) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update(extra or {})
    return env


def run(config: Path, *overrides: str, timeout: float = 240, umask: int | None = None, debug: bool = False,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``veca train`` to completion; returns the completed process (text stdout/stderr)."""
    preexec = (lambda: os.umask(umask)) if umask is not None else None
    return subprocess.run(command(config, *overrides, debug=debug), cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=_env(env), preexec_fn=preexec, start_new_session=True)


def start(config: Path, *overrides: str, logs: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """``veca train`` in the background, in a new session (its own process group, like a job step);
    stdout/stderr go to ``logs``.{out,err}."""
    out, err = open(f"{logs}.out", "w"), open(f"{logs}.err", "w")
    return subprocess.Popen(command(config, *overrides), cwd=ROOT, stdout=out, stderr=err, env=_env(env),
                            start_new_session=True)


# Starts one process per rank (as srun does) in the launcher's own process group and waits for them;
# the launcher itself shrugs off stop signals (a handler, not SIG_IGN, so the ranks start with the
# default dispositions) and exits with the ranks' exit codes as a JSON list on stdout.
_LAUNCHER = """
import json, os, signal, subprocess, sys
for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2):
    signal.signal(s, lambda *a: None)
cmd, logs, world = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3])
procs = [subprocess.Popen(cmd, env={**os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(world)},
                          stdout=open(f"{logs}{r}.out", "w"), stderr=open(f"{logs}{r}.err", "w"))
         for r in range(world)]
codes = []
for p in procs:
    while True:
        try:
            codes.append(p.wait())
            break
        except InterruptedError:
            continue
print(json.dumps(codes))
"""


def start_ranks(config: Path, *overrides: str, logs: Path, world: int = 2) -> subprocess.Popen:
    """``world`` ranks of ``veca train`` joined by a gloo group over localhost, all in one new process
    group (with their loader workers); rank r logs to ``logs``r.{out,err}; the returned launcher prints
    the ranks' exit codes as JSON when they are done."""
    import json

    from veca_ssl.spawn import find_free_port

    env = _env({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(find_free_port())})
    return subprocess.Popen([sys.executable, "-c", _LAUNCHER, json.dumps(command(config, *overrides)), str(logs),
                             str(world)], cwd=ROOT, stdout=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)


def output(logs: Path) -> tuple[str, str]:
    return Path(f"{logs}.out").read_text(), Path(f"{logs}.err").read_text()


def wait_for(condition: Callable[[], bool], procs: list[subprocess.Popen], timeout: float = 180) -> None:
    """Poll ``condition`` until true; fail early if a process ended first."""
    deadline = time.monotonic() + timeout
    while not condition():
        ended = [p for p in procs if p.poll() is not None]
        if ended:
            raise AssertionError(f"process {ended[0].args} ended (rc {ended[0].returncode}) before the condition held")
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.05)


def logged_steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return sum(1 for line in path.read_text().splitlines() if line.strip()) if path.exists() else 0


def kill_group(proc: subprocess.Popen) -> None:
    """Cleanup: SIGKILL the process group if it still runs."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, 9)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)
