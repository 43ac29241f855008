"""``make-shards`` is crash-safe: killed mid-write (SIGKILL) or mid-swap, the old or the new set is
intact, readers never see a mix, and a rerun finishes; ``--verify`` re-reads every written sample."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import veca_ssl.data.shards as shards_mod
from veca_ssl.data import DataError, build_dataset, make_shards

ROOT = Path(__file__).resolve().parent.parent


def _folder(root: Path, n: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    for i in range(n):
        d = root / ("a" if i % 2 else "b")
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (9, 11, 3), dtype=np.uint8)).save(d / f"{i:04d}.png")
    return root


def _snapshot(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


def _consistent(d: Path, n: int, finished: bool = True) -> dict:
    manifest = json.loads((d / "manifest.json").read_text())
    files = sorted(p.name for p in d.glob("shard-*.tar"))
    assert files == [e["name"] for e in manifest["shards"]]
    assert all((d / e["name"]).stat().st_size == e["bytes"] for e in manifest["shards"])
    assert manifest["num_samples"] == n == sum(e["count"] for e in manifest["shards"])
    assert len(list(build_dataset(manifest["spec"]))) == n  # every sample reads back
    assert not (d / ".make-shards-commit.json").exists()
    assert (d / ".make-shards-staging").exists() != finished
    return manifest


KILL_AFTER_SHARD = """
import os, signal, sys
from veca_ssl.data import make_shards
def die(i):
    if i == 3:
        os.kill(os.getpid(), signal.SIGKILL)
make_shards(sys.argv[1], sys.argv[2], shard_size=10, overwrite=True, progress=False, on_shard=die)
"""


def test_killed_mid_write_keeps_the_old_set_and_a_rerun_finishes(tmp_path):
    old_src, new_src, dst = _folder(tmp_path / "old", 120, 0), _folder(tmp_path / "new", 90, 1), tmp_path / "dst"
    make_shards(str(old_src), dst, shard_size=10, progress=False)
    before = _snapshot(dst)
    proc = subprocess.run([sys.executable, "-c", KILL_AFTER_SHARD, str(new_src), str(dst)], cwd=ROOT,
                          capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert _snapshot(dst) == before  # the old set and its manifest, byte for byte
    assert _consistent(dst, 120, finished=False)["source"] == str(old_src)
    staged = sorted(p.name for p in (dst / ".make-shards-staging").glob("shard-*.tar"))
    assert staged == [f"shard-{i:06d}.tar" for i in range(4)]

    resumed_at: list[int] = []
    manifest = make_shards(str(new_src), dst, shard_size=10, overwrite=True, progress=False,
                           on_shard=resumed_at.append)
    assert resumed_at == list(range(4, 9))  # continued after the 4 shards the killed run finished
    assert _consistent(dst, 90) == manifest and manifest["num_shards"] == 9  # old shards 9-11 are gone
    clean = tmp_path / "clean"
    make_shards(str(new_src), clean, shard_size=10, progress=False)
    assert {k: v for k, v in _snapshot(dst).items() if k != "manifest.json"} == \
        {k: v for k, v in _snapshot(clean).items() if k != "manifest.json"}


def test_crash_during_the_swap_is_refused_by_readers_and_rolled_forward(tmp_path, monkeypatch):
    old_src, new_src, dst = _folder(tmp_path / "old", 40, 0), _folder(tmp_path / "new", 25, 1), tmp_path / "dst"
    spec = make_shards(str(old_src), dst, shard_size=10, progress=False)["spec"]

    def crash(path):  # the first removal of an old shard: new shards are in place, the manifest is old
        raise OSError("power cut")

    monkeypatch.setattr(shards_mod.os, "remove", crash)
    with pytest.raises(OSError, match="power cut"):
        make_shards(str(new_src), dst, shard_size=10, overwrite=True, progress=False)
    monkeypatch.undo()
    with pytest.raises(DataError, match="rerun the same make-shards command"):
        build_dataset(spec)
    manifest = make_shards(str(new_src), dst, shard_size=10, overwrite=True, progress=False)
    assert _consistent(dst, 25) == manifest and manifest["num_shards"] == 3
    assert make_shards(str(new_src), dst, shard_size=10, overwrite=True, progress=False)["num_samples"] == 25


def test_verify_decodes_sources_and_rereads_every_written_sample(tmp_path, monkeypatch):
    src = _folder(tmp_path / "src", 12, 0)
    buf = io.BytesIO()
    noise = np.random.default_rng(5).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buf, format="JPEG", quality=90)
    (src / "a" / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])  # header fine, data cut
    plain = make_shards(str(src), tmp_path / "plain", shard_size=5, progress=False)
    assert plain["num_samples"] == 13  # without --verify only headers are checked: the cut file is copied
    verified = make_shards(str(src), tmp_path / "verified", shard_size=5, verify=True, progress=False)
    assert verified["num_samples"] == 12 and verified["skipped"] == 1
    assert verified["skipped_items"][0]["item"].endswith("cut.jpg")

    before = _snapshot(tmp_path / "verified")
    real = shards_mod.read_sample

    def flipped(f, index, o):  # what a bad disk or cable would do to the bytes read back
        raw = real(f, index, o)
        if o == 2 and raw.data:
            raw.data = raw.data[:-1] + bytes([raw.data[-1] ^ 1])
        return raw

    monkeypatch.setattr(shards_mod, "read_sample", flipped)
    with pytest.raises(DataError, match="does not read back as written"):
        make_shards(str(src), tmp_path / "verified", shard_size=5, verify=True, overwrite=True, progress=False)
    assert _snapshot(tmp_path / "verified") == before  # nothing was swapped in
    assert os.path.isdir(tmp_path / "verified" / ".make-shards-staging")


def test_bad_source_or_destination_is_one_message_and_leaves_nothing(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "veca_ssl.cli", "data", "make-shards", *args], cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)

    proc = run(str(tmp_path / "nope"), "dst")
    assert proc.returncode == 2 and "source" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "dst").exists()  # a source that cannot be read creates no destination
    (tmp_path / "a_file").write_text("")
    proc = run("digits", "a_file")
    assert proc.returncode == 2 and "a_file exists and is not a directory" in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1


def test_a_source_replaced_under_the_same_name_is_not_resumed_with_stale_bytes(tmp_path):
    """Killed after 4 shards; then a source those shards hold is replaced by another image of the very
    same size (BMP: the size depends on the dimensions only). The rerun must not reuse the stale
    shards: its set equals a clean run's on the new sources."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    rng = np.random.default_rng(0)
    for i in range(60):
        (src / ("a" if i % 2 else "b")).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (9, 11, 3), dtype=np.uint8)).save(src / ("a" if i % 2 else "b") /
                                                                              f"{i:04d}.bmp")
    proc = subprocess.run([sys.executable, "-c", KILL_AFTER_SHARD, str(src), str(dst)], cwd=ROOT,
                          capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    staged = dst / ".make-shards-staging" / "shard-000000.tar"
    key = build_dataset(f"wds:{staged}").shards.index(0).keys[0]  # the source index of shard 0's first sample
    victim = Path(build_dataset(f"imagefolder:{src}").path(int(key)))
    before = victim.read_bytes()
    Image.fromarray(np.full((9, 11, 3), 7, np.uint8)).save(victim)
    assert len(victim.read_bytes()) == len(before) and victim.read_bytes() != before
    os.utime(victim, ns=(victim.stat().st_atime_ns, victim.stat().st_mtime_ns + 10**9))  # a later write
    resumed_at: list[int] = []
    make_shards(str(src), dst, shard_size=10, overwrite=True, progress=False, on_shard=resumed_at.append)
    assert resumed_at == list(range(6))  # started over: the finished shards no longer match their sources
    clean = tmp_path / "clean"
    make_shards(str(src), clean, shard_size=10, progress=False)
    assert {k: v for k, v in _snapshot(dst).items() if k != "manifest.json"} == \
        {k: v for k, v in _snapshot(clean).items() if k != "manifest.json"}
