"""Checkpoints damaged on disk: corrupt, truncated, empty, random, foreign or pickled checkpoints are
reported by name and the run resumes from the newest good one; leftovers of killed writes are
removed; files honour the umask; milestones survive retention."""

from __future__ import annotations

import os
import re
import stat
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from integrity_cli import TINY, run, write_config

from veca_ssl import fileio
from veca_ssl.config import load_config
from veca_ssl.models import load_backbone
from veca_ssl.models.io import CHECKPOINT_FORMAT
from veca_ssl.train.checkpoint import CheckpointError, CheckpointManager
from veca_ssl.train.loop import train


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A run with checkpoints at steps 2, 4, 6 and 8 (trained in this process, to save time)."""
    out = tmp_path_factory.mktemp("base") / "run"
    train(load_config(None, TINY + ["train.max_steps=8", f"output_dir={out}"]))
    return out


@pytest.fixture(scope="module")
def foreign(tmp_path_factory) -> Path:
    """Another model's checkpoint at step 8 (wider embedding), with its own valid checksum file."""
    out = tmp_path_factory.mktemp("foreign") / "run"
    train(load_config(None, TINY + ["model.overrides={embed_dim: 48, depth: 2, num_heads: 2}",
                                    "train.max_steps=8", "train.checkpoint_every=8", f"output_dir={out}"]))
    return out / "checkpoints" / "checkpoint-00000008.pt"


def _copy_run(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _flip_inside_largest_tensor(path: Path) -> None:
    """XOR 64 bytes in the middle of the largest tensor record of a torch.save zip (a silent bit rot
    that torch.load would read without complaint)."""
    with zipfile.ZipFile(path) as archive:
        record = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[record.header_offset + 26: record.header_offset + 30])
    start = record.header_offset + 30 + name_len + extra_len + record.file_size // 2
    for i in range(64):
        data[start + i] ^= 0x5A
    path.write_bytes(bytes(data))


class _Marker:
    """Unpickling this would create a file: proof that a checkpoint was (not) unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _damage(kind: str, path: Path, foreign: Path, tmp_path: Path) -> str:
    """Damage ``path`` like ``kind``; returns a regex for the reason the run must report."""
    if kind == "flipped":
        _flip_inside_largest_tensor(path)
        return "do not match the sha256"
    if kind == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        return "do not match the sha256"
    if kind == "empty":
        path.write_bytes(b"")
        return r"empty file \(0 bytes\)"
    if kind == "random":
        path.write_bytes(os.urandom(50_000))
        fileio.checksum_path(path).unlink()  # random bytes from elsewhere: no checksum file either
        return "unreadable"
    if kind == "foreign":  # another model's checkpoint of the same step, with its own valid checksum
        path.write_bytes(foreign.read_bytes())
        fileio.checksum_path(path).write_bytes(fileio.checksum_path(foreign).read_bytes())
        return r"written for another model: student\['backbone"
    if kind == "pickle":
        step = CheckpointManager.step_of(path)
        torch.save({"format": CHECKPOINT_FORMAT, "step": step, "student": _Marker(str(tmp_path / "unpickled"))}, path)
        fileio.checksum_path(path).unlink()
        return r"holds a pickled Python object \((io|builtins).open\), which is never loaded"
    raise ValueError(kind)


@pytest.mark.parametrize("kinds", [("flipped", "truncated", "empty"), ("foreign", "random", "pickle")],
                         ids=["corrupt-truncated-empty", "foreign-random-pickled"])
def test_damaged_checkpoints_are_named_and_skipped_for_the_newest_good_one(tmp_path, finished, foreign, kinds):
    """Checkpoints 8, 6 and 4 damaged (one way each): all three are reported by name and reason, set
    aside, and the run resumes from checkpoint 2, retraining the same weights."""
    out = _copy_run(finished, tmp_path / "run")
    ckpts = CheckpointManager(out / "checkpoints")
    reasons = {step: _damage(kind, ckpts.path(step), foreign, tmp_path) for step, kind in zip((8, 6, 4), kinds)}
    # leftovers of writes killed earlier: a temporary checkpoint, a temporary config, an orphan checksum
    (out / "checkpoints" / ".tmp-1a2b3c4d-checkpoint-00000010.pt").write_bytes(b"\0" * 4096)
    (out / ".tmp-5e6f7a8b-config.yaml").write_text("partial")
    (out / "checkpoints" / "checkpoint-00000010.pt.sha256").write_text("0" * 64 + "  checkpoint-00000010.pt\n")

    config = write_config(tmp_path / "exp.yaml", f"output_dir={out}")
    result = run(config, "train.max_steps=10", umask=0o022)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "unpickled").exists()  # the pickle was never executed
    for step, reason in reasons.items():
        assert re.search(rf"skipping checkpoint checkpoint-{step:08d}.pt: .*{reason}", result.stderr), result.stderr
    assert f"resumed from {out / 'checkpoints' / 'checkpoint-00000002.pt'} at step 2" in result.stdout
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    for step in reasons:  # kept for inspection, out of the resume path
        assert f"checkpoint-{step:08d}.pt.rejected" in names
    assert [CheckpointManager.step_of(p) for p in ckpts.all()] == [2, 4, 6, 8, 10]
    assert not [n for n in names if n.startswith(".tmp-")] and not (out / ".tmp-5e6f7a8b-config.yaml").exists()
    assert "checkpoint-00000010.pt.sha256" in names  # the new one's, not the orphan: it verifies
    assert fileio.verify_file(ckpts.path(10)) == "sha256"
    # what this run wrote is readable by others under the usual umask (mkstemp would make it 0600)
    for path in (out / "config.yaml", out / "metrics.jsonl", out / "summary.json", out / "export" / "teacher.json",
                 out / "export" / "teacher.safetensors", ckpts.path(10), fileio.checksum_path(ckpts.path(10))):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, (path, oct(path.stat().st_mode))
    # the retrained steps are good checkpoints again, equal to the originals (deterministic CPU run)
    for step in reasons:
        original = CheckpointManager.load(finished / "checkpoints" / f"checkpoint-{step:08d}.pt")
        redone = CheckpointManager.load(ckpts.path(step))
        for name, value in original["student"].items():
            assert torch.equal(value, redone["student"][name]), (step, name)


def test_no_usable_checkpoint_stops_and_changes_nothing(tmp_path, finished):
    out = _copy_run(finished, tmp_path / "run")
    for path in CheckpointManager(out / "checkpoints").all():
        path.write_bytes(path.read_bytes()[:1000])
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    result = run(write_config(tmp_path / "exp.yaml", f"output_dir={out}"), "train.max_steps=10")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "no usable checkpoint in" in result.stderr
    for step in (2, 4, 6, 8):
        assert f"checkpoint-0000000{step}.pt: contents" in result.stderr
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before


def test_load_backbone_refuses_a_corrupt_checkpoint(tmp_path, finished):
    path = _copy_run(finished, tmp_path / "run") / "checkpoints" / "checkpoint-00000008.pt"
    _flip_inside_largest_tensor(path)
    with pytest.raises(ValueError, match="checkpoint-00000008.pt: contents .* do not match the sha256"):
        load_backbone(path)
    fileio.checksum_path(path).unlink()  # without its checksum file: the zip records' CRC-32s catch it
    with pytest.raises(ValueError, match="fails its CRC-32 check"):
        load_backbone(path)
    with pytest.raises(CheckpointError, match="fails its CRC-32 check"):
        CheckpointManager.load(path)


def test_atomic_writes_honour_the_umask_and_never_leave_partial_files(tmp_path):
    target = tmp_path / "a.json"
    old = os.umask(0o027)
    try:
        fileio.atomic_write_json(target, {"v": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    with pytest.raises(RuntimeError, match="boom"), fileio.atomic_open(target, "w") as f:
        f.write('{"v": 2, "half')
        raise RuntimeError("boom")
    assert target.read_text() == '{\n  "v": 1\n}\n'  # the old contents, untouched
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]  # and no temporary file


def test_keep_every_keeps_milestones(tmp_path):
    out = tmp_path / "run"
    train(load_config(None, TINY + ["train.max_steps=7", "train.checkpoint_every=1", "train.keep_last=2",
                                    "train.keep_every=3", f"output_dir={out}"]))
    ckpts = CheckpointManager(out / "checkpoints")
    assert [CheckpointManager.step_of(p) for p in ckpts.all()] == [3, 6, 7]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == sorted(
        n for s in (3, 6, 7) for n in (f"checkpoint-{s:08d}.pt", f"checkpoint-{s:08d}.pt.sha256"))
    for path in ckpts.all():
        assert fileio.verify_file(path) == "sha256"


def test_a_plain_pickle_is_named_as_one_and_never_loaded(tmp_path, finished):
    """``pickle.dump`` output given as a checkpoint (to eval, and found among a run's checkpoints): named
    a plain Python pickle, never unpickled, without torch's advice to load it with weights_only=False."""
    import pickle
    import subprocess
    import sys

    from integrity_cli import ROOT

    plain = tmp_path / "weights.pkl"
    plain.write_bytes(pickle.dumps({"student": _Marker(str(tmp_path / "unpickled")), "w": [1.0, 2.0]}))
    result = subprocess.run([sys.executable, "-m", "veca_ssl.cli", "eval", "knn", "--checkpoint", str(plain),
                             "--train", "digits@train", "--test", "digits@val", "--no-speed"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"cannot read checkpoint {plain}: a plain Python pickle (pickle.dump), not a torch.save checkpoint" \
        in result.stderr, result.stderr
    assert "corrupt" not in result.stderr and "weights_only=False" not in result.stderr
    out = _copy_run(finished, tmp_path / "run")
    (out / "checkpoints" / "checkpoint-00000008.pt").write_bytes(plain.read_bytes())
    fileio.checksum_path(out / "checkpoints" / "checkpoint-00000008.pt").unlink()
    resumed = run(write_config(tmp_path / "exp.yaml", f"output_dir={out}"), "train.max_steps=8")
    assert resumed.returncode == 0, resumed.stderr
    assert re.search(r"skipping checkpoint checkpoint-00000008.pt: a plain Python pickle", resumed.stderr), \
        resumed.stderr
    assert "weights_only" not in resumed.stderr and not (tmp_path / "unpickled").exists()
