"""One run per output directory: a second `veca train` on a busy directory stops with a message naming
the holder and touches nothing; the lock of a killed run is free again and reported as taken over."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest
from integrity_cli import ROOT, kill_group, logged_steps, output, run, start, wait_for, write_config

from veca_ssl.train.lock import RunLock, RunLockedError


def test_second_run_on_the_same_directory_is_refused(tmp_path):
    out = tmp_path / "run"
    config = write_config(tmp_path / "exp.yaml", "optim.epochs=400", "train.checkpoint_every=100000",
                          f"output_dir={out}")
    first = start(config, logs=tmp_path / "first")
    try:
        wait_for(lambda: logged_steps(out) >= 2, [first])
        config_before = (out / "config.yaml").read_bytes()
        second = run(config, "optim.base_lr=0.01")  # even a different config must not touch the directory
        assert second.returncode == 2, second.stderr
        assert "Traceback" not in second.stderr
        assert f"is in use by another `veca train` (pid {first.pid} on host {socket.gethostname()}" in second.stderr
        assert (out / "config.yaml").read_bytes() == config_before
        assert first.poll() is None  # the first run goes on
        os.killpg(first.pid, signal.SIGTERM)
        assert first.wait(timeout=120) == 0
    finally:
        kill_group(first)
    stdout, _ = output(tmp_path / "first")
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, len(steps) + 1))  # one run's steps, each once
    assert "checkpoint at step" in stdout


_HOLDER = textwrap.dedent("""
    import sys, time
    from veca_ssl.train.lock import RunLock
    RunLock(sys.argv[1]).acquire()
    print("held", flush=True)
    time.sleep(600)
""")


def test_lock_of_a_killed_run_is_taken_over(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunLockedError, match=f"pid {holder.pid} on host"):
            RunLock(tmp_path, wait_for_dead_s=0).acquire()
        holder.kill()  # SIGKILL: no chance to release anything
        holder.wait(timeout=30)
        lock = RunLock(tmp_path)
        stale = lock.acquire()
        assert stale is not None and stale.pid == holder.pid  # reported as taken over
        assert json.loads((tmp_path / "train.lock").read_text())["pid"] == os.getpid()
        lock.release()
        assert (tmp_path / "train.lock").read_text() == ""  # released cleanly: nothing stale left
        assert RunLock(tmp_path).acquire() is None
    finally:
        holder.kill()
        holder.wait(timeout=30)
        RunLock.release_held(tmp_path)


def test_pid_file_lock_where_flock_is_unavailable(tmp_path):
    """Filesystems without flock: the lock file itself is the lock; a dead holder on this host is stale."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(timeout=60)
    record = {"pid": dead.pid, "host": socket.gethostname(), "since": "earlier", "command": "veca train"}
    (tmp_path / "train.lock").write_text(json.dumps(record))
    lock = RunLock(tmp_path, use_flock=False)
    assert lock.acquire().pid == dead.pid
    with pytest.raises(RunLockedError, match=rf"pid {os.getpid()} .*if no run is active, delete"):
        RunLock(tmp_path, use_flock=False).acquire()  # a live holder (this process)
    lock.release()
    assert not (tmp_path / "train.lock").exists()
    busy = dict(record, host="another-node")  # a holder elsewhere cannot be checked: refused
    (tmp_path / "train.lock").write_text(json.dumps(busy))
    with pytest.raises(RunLockedError, match="host another-node"):
        RunLock(tmp_path, use_flock=False).acquire()
