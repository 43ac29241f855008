"""Writes that fail, as users meet them: a checkpoints/ folder nobody may write to (an immutable folder,
a read-only mount, another user's folder), a full disk (a small tmpfs), a metrics file that refuses
appends, a full disk at the final export. Each ends the real ``veca train`` within seconds, with its
loader workers (0, 1, 2) gone, one message naming the path and the real cause, the lock released and
the space of the temporary file freed; a second stop signal ends a process whatever it is doing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from integrity_cli import ROOT, command, write_config

from veca_ssl.train.checkpoint import CheckpointError, CheckpointManager
from veca_ssl.train.lock import RunLock

ONE_CHECKPOINT = ["optim.epochs=1", "train.checkpoint_every=2", "train.max_steps=3"]  # the write at step 2 fails
ROOT_USER = os.geteuid() == 0


def _sh(*cmd: str) -> bool:
    return subprocess.run(cmd, capture_output=True).returncode == 0


def _tmpfs(path: Path, options: str) -> Path:
    """Mount a tmpfs at ``path`` (root only; skips where the machine does not allow it)."""
    path.mkdir(parents=True, exist_ok=True)
    if not (ROOT_USER and _sh("mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path))):
        pytest.skip(f"cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN) to make {path} {options}")
    return path


@pytest.fixture
def mounts():
    made: list[Path] = []
    yield made
    for path in made:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.fixture
def immutable():
    made: list[Path] = []

    def make(path: Path) -> Path:
        """``path`` that nobody can write in, root included (``chattr +i``)."""
        if not (ROOT_USER and _sh("chattr", "+i", str(path))):
            pytest.skip(f"chattr +i is not possible here (needs root with CAP_LINUX_IMMUTABLE) on {path}")
        made.append(path)
        return path

    yield make
    for path in made:
        subprocess.run(["chattr", "-i", str(path)], capture_output=True)


#: As root, file permissions bind only a process without these capabilities: the CLI then meets a
#: chmod a-w folder as any user does.
_NO_PERMISSION_BYPASS = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search,-fowner", "--"]


def _as_ordinary_user() -> list[str]:
    """The command prefix that makes ``chmod a-w`` bind (none when not root); skips where impossible."""
    if not ROOT_USER:
        return []
    probe = subprocess.run([*_NO_PERMISSION_BYPASS, "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("as root, chmod a-w binds only without CAP_DAC_OVERRIDE: setpriv cannot drop it here "
                    f"({probe.stderr.decode(errors='replace').strip() or 'setpriv missing'})")
    return _NO_PERMISSION_BYPASS


def _group_gone(pgid: int) -> bool:
    """Whether every process of the process group ``pgid`` (main process, loader workers) has ended
    (zombies waiting for init to reap them count as ended)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                return False
    return True


def _train(config: Path, *overrides: str, prefix: list[str] | None = None
           ) -> tuple[subprocess.CompletedProcess, float, bool]:
    """``veca train`` in its own process group; returns the result, the seconds it took and whether the
    whole group (main process and loader workers) was gone when the main process had exited."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    started = time.monotonic()
    proc = subprocess.Popen([*(prefix or []), *command(config, *overrides)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=120)  # a hang ends here, as a failure
        seconds = time.monotonic() - started
        time.sleep(0.2)
        gone = _group_gone(proc.pid)
    finally:
        if proc.poll() is None or not _group_gone(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), seconds, gone


def _one_message(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "inline_container" not in lines[0] and "Errno" not in lines[0], lines[0]
    return lines[0]


def _lock_is_free(out: Path) -> bool:
    lock = RunLock(out, wait_for_dead_s=0)
    lock.acquire()
    lock.release()
    return True


@pytest.mark.parametrize("how,workers", [("immutable", 0), ("read-only mount", 1), ("chmod a-w", 2)])
def test_unwritable_checkpoints_folder_stops_the_run_within_seconds(tmp_path, immutable, mounts, how, workers):
    out = tmp_path / "run"
    ckpts = out / "checkpoints"
    ckpts.mkdir(parents=True)
    prefix: list[str] = []
    if how == "immutable":  # chattr +i: refuses root too
        immutable(ckpts)
        cause, remedy = f"permission denied: cannot create files in {ckpts}", "make it writable"
    elif how == "read-only mount":
        mounts.append(_tmpfs(ckpts, "ro,size=64k"))
        cause, remedy = f"{ckpts} is on a read-only file system", "remount it read-write"
    else:
        prefix = _as_ordinary_user()
        ckpts.chmod(0o555)
        cause, remedy = f"permission denied: cannot create files in {ckpts}", "make it writable"
    config = write_config(tmp_path / "exp.yaml", f"output_dir={out}", f"data.num_workers={workers}", *ONE_CHECKPOINT)
    result, seconds, gone = _train(config, prefix=prefix)
    message = _one_message(result)
    assert message.startswith(f"veca train: cannot write checkpoint {ckpts / 'checkpoint-00000002.pt'}: {cause}. "
                              "No checkpoint was written yet; "), message
    assert "free space" not in message and remedy in message, message
    assert "rerun the same command to resume" in message
    assert seconds < 60, f"took {seconds:.0f} s"  # a few seconds of work; a hang is killed at 120
    assert gone, "loader workers outlived the run"
    assert _lock_is_free(out)


def test_full_disk_while_checkpointing_names_the_folder_and_frees_the_space(tmp_path, mounts):
    """checkpoints/ on a 128 KiB tmpfs: the checkpoint (~300 KiB) does not fit. With 2 workers the run
    ends at once, says "no space left on <checkpoints>" (not torch's inline_container.cc text) and the
    partial file is gone: the tmpfs is empty again."""
    out = tmp_path / "run"
    ckpts = _tmpfs(out / "checkpoints", "size=128k")
    mounts.append(ckpts)
    config = write_config(tmp_path / "exp.yaml", f"output_dir={out}", "data.num_workers=2", *ONE_CHECKPOINT)
    result, seconds, gone = _train(config)
    message = _one_message(result)
    assert message.startswith(f"veca train: cannot write checkpoint {ckpts / 'checkpoint-00000002.pt'}: no space "
                              f"left on {ckpts} ("), message
    assert "a checkpoint of this run takes about" in message and "free space (or lower train.keep_last)" in message
    assert seconds < 60 and gone, (seconds, gone)
    assert list(ckpts.iterdir()) == []
    assert os.statvfs(ckpts).f_bfree == os.statvfs(ckpts).f_blocks  # nothing holds the space
    assert _lock_is_free(out)


def test_checkpoint_write_that_fails_closes_its_temporary_file_at_once(tmp_path, mounts):
    """In-process: while the CheckpointError is still being handled (its traceback alive), the
    unlinked temporary file is already closed, so its space is free for the rerun the message asks for."""
    ckpts = _tmpfs(tmp_path / "checkpoints", "size=64k")
    mounts.append(ckpts)
    manager = CheckpointManager(ckpts)
    with pytest.raises(CheckpointError, match=r"no space left on .*checkpoints") as info:
        manager.save({"step": 1, "weights": torch.zeros(64 * 1024)}, 1)  # 256 KiB
    held = [os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
            if os.path.exists(f"/proc/self/fd/{fd}")]
    assert not [h for h in held if str(ckpts) in h], held
    assert os.statvfs(ckpts).f_bfree == os.statvfs(ckpts).f_blocks
    assert info.value is not None


def test_unwritable_metrics_file_with_workers_stops_the_run(tmp_path, immutable):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").touch()
    immutable(out / "metrics.jsonl")
    config = write_config(tmp_path / "exp.yaml", f"output_dir={out}", "data.num_workers=2", *ONE_CHECKPOINT)
    result, seconds, gone = _train(config)
    message = _one_message(result)
    assert message.startswith(f"veca train: cannot append step 1 to {out / 'metrics.jsonl'}: permission denied: "
                              f"cannot write {out / 'metrics.jsonl'}. The run stopped"), message
    assert "free space" not in message and "make it writable" in message
    assert seconds < 60 and gone, (seconds, gone)
    assert _lock_is_free(out)


def test_full_disk_at_the_final_export_is_one_message_and_a_rerun_exports(tmp_path, mounts):
    out = tmp_path / "run"
    export = _tmpfs(out / "export", "size=16k")
    mounts.append(export)
    config = write_config(tmp_path / "exp.yaml", f"output_dir={out}", "data.num_workers=1", *ONE_CHECKPOINT[:2],
                          "train.max_steps=2")
    result, _, _ = _train(config)
    message = _one_message(result)
    assert message.startswith(f"veca train: cannot write the exported teacher backbone {export / 'teacher.safetensors'}"
                              f": no space left on {export} ("), message
    assert "SafetensorError" not in message
    assert f"last checkpoint {out / 'checkpoints' / 'checkpoint-00000002.pt'}" in message
    subprocess.run(["umount", "-l", str(export)], check=True)
    mounts.remove(export)
    again, _, _ = _train(config)
    assert again.returncode == 0, again.stderr
    assert (export / "teacher.safetensors").is_file() and "resumed from" in again.stdout


_STUCK = textwrap.dedent("""
    import datetime, torch.distributed as dist
    from veca_ssl import signals
    signals.install_preemption_handler()
    store = dist.TCPStore("127.0.0.1", 0, 1, True, timeout=datetime.timedelta(seconds=60))
    print("blocked", flush=True)
    store.wait(["a key nobody sets"])  # C++ holding the GIL: no Python signal handler runs meanwhile
""")


def test_second_sigterm_ends_a_process_blocked_in_c_code():
    proc = subprocess.Popen([sys.executable, "-c", _STUCK], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "blocked"
        time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGTERM)  # as scancel / timeout: the first asks for a checkpoint
        time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGTERM)
        started = time.monotonic()
        proc.wait(timeout=30)
        assert time.monotonic() - started < 10
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert "second stop signal while the process is blocked" in proc.stderr.read()


def _noise_folder(root: Path, n: int = 120) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        (root / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / f"c{i % 2}" / f"{i:03d}.png")
    return root


@pytest.mark.parametrize("command", ["make-shards", "extract"])
def test_full_disk_in_make_shards_and_extract_names_the_file(tmp_path, mounts, command):
    """~400 KiB of shards or features onto a 128 KiB tmpfs: one message naming the file being written
    and the cause (not a bare [Errno 28] and a tarfile traceback), and the partial file removed."""
    src = _noise_folder(tmp_path / "src")
    full = _tmpfs(tmp_path / "full", "size=128k")
    mounts.append(full)
    if command == "make-shards":
        args = ["data", "make-shards", str(src), str(full / "dst"), "--shard-size", "20"]
        target = full / "dst" / ".make-shards-staging" / "shard-000000.tar.partial"
        what = "shard"
    else:
        args = ["extract", "--model", "veca_tiny", "--patch-size", "8", "--model-arg", "depth=1", "--resolution",
                "32", "--data", f"imagefolder:{src}", "--output-dir", str(full / "x"), "--patches", "--no-progress"]
        target = full / "x" / "shard-00000.safetensors"
        what = "feature shard"
    result = subprocess.run([sys.executable, "-m", "veca_ssl.cli", *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    lines = [line for line in result.stderr.splitlines() if line.startswith("veca ")]  # not progress or INFO lines
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith(f"veca {command.replace('make-shards', 'data make-shards')}: error: cannot write "
                               f"{what} {target}: no space left on {target.parent} ("), lines[0]
    assert "Free space and rerun the same command: it continues after the shards" in lines[0]
    assert "Errno" not in result.stderr and "Traceback" not in result.stderr and "Exception ignored" not in result.stderr
    assert not target.exists()
