"""WebDataset shards: make-shards round trip, node/worker splitting, resume, bad members, CLI tools."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset

from veca_ssl.data import (
    MaskingGenerator,
    MultiCropTransform,
    SSLIterableDataset,
    WdsDataset,
    build_dataset,
    make_shards,
)
from veca_ssl.data.cli import main as data_main


def _encode(arr: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, quality=90)
    return buf.getvalue()


def _folder(root: Path, per_class: int = 6, classes: tuple[str, ...] = ("cat", "dog")) -> Path:
    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            arr = rng.integers(0, 256, (12 + i, 10 + c, 3), dtype=np.uint8)
            fmt, ext = ("JPEG", "jpg") if i % 2 else ("PNG", "png")
            (root / name / f"{name}{i}.{ext}").write_bytes(_encode(arr, fmt))
    return root


@pytest.fixture()
def shards(tmp_path) -> tuple[Path, dict]:
    src = _folder(tmp_path / "src")
    manifest = make_shards(str(src), tmp_path / "shards", shard_size=2, progress=False)
    return src, manifest


def test_folder_to_shards_round_trip_keeps_bytes_and_labels(shards, tmp_path):
    src, manifest = shards
    assert manifest["num_samples"] == 12 and manifest["num_shards"] == 6 and manifest["classes"] == ["cat", "dog"]
    assert manifest["spec"].endswith("shard-{000000..000005}.tar")
    folder = build_dataset(f"imagefolder:{src}")
    by_source = {p: (int(t), Path(p).read_bytes()) for p, t in zip(folder.paths, folder.targets)}
    seen = {}
    for path in sorted((tmp_path / "shards").glob("shard-*.tar")):
        with tarfile.open(path) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        keys = {name.split(".")[0] for name in members}
        assert len(keys) == 2  # shard_size
        for key in keys:
            meta = json.loads(members[f"{key}.json"])
            ext = "jpg" if f"{key}.jpg" in members else "png"
            label, original = by_source[meta["source"]]
            assert int(members[f"{key}.cls"]) == label and meta["class"] == ["cat", "dog"][label]
            assert members[f"{key}.{ext}"] == original  # original JPEG/PNG bytes, not re-encoded
            seen[meta["source"]] = label
    assert len(seen) == 12
    streamed = list(build_dataset(manifest["spec"], shuffle_buffer=0, shard_shuffle=False))
    assert sorted(label for _, label in streamed) == sorted(by_source[p][0] for p in by_source)
    pixels = sorted(np.asarray(img).tobytes() for img, _ in streamed)
    assert pixels == sorted(np.asarray(folder[i][0]).tobytes() for i in range(len(folder)))
    with pytest.raises(FileExistsError, match="overwrite"):
        make_shards(str(src), tmp_path / "shards", shard_size=2, progress=False)


class _Keys(IterableDataset):
    """Yields ``shard:key`` of every sample a reader sees (with the worker id if ``with_worker``)."""

    def __init__(self, ds: WdsDataset, with_worker: bool = False) -> None:
        self.ds, self.with_worker = ds, with_worker

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        for raw in self.ds.iter_raw():
            yield (info.id if info else 0, raw.name) if self.with_worker else raw.name


def test_two_ranks_two_workers_read_disjoint_shards_covering_everything(shards):
    _, manifest = shards
    per_reader: list[list[str]] = []
    for rank in range(2):
        ds = build_dataset(manifest["spec"], rank=rank, world_size=2, seed=3, shuffle_buffer=4)
        loader = DataLoader(_Keys(ds, with_worker=True), batch_size=None, num_workers=2, multiprocessing_context="fork")
        read = list(loader)
        per_reader += [[name for w, name in read if w == worker] for worker in range(2)]
    shard_sets = [{n.rsplit(":", 1)[0] for n in names} for names in per_reader]
    assert all(shard_sets)
    for i in range(4):
        for j in range(i + 1, 4):
            assert shard_sets[i].isdisjoint(shard_sets[j])
    assert len(set().union(*shard_sets)) == 6
    everything = [n for names in per_reader for n in names]
    assert len(everything) == len(set(everything)) == 12


def test_endless_stream_resumes_exactly_and_epochs_reshuffle(shards):
    _, manifest = shards
    full = WdsDataset(manifest["spec"][4:], endless=True, seed=1, shuffle_buffer=3)
    it = full.iter_raw()
    first = [next(it) for _ in range(30)]
    names = [r.name for r in first]
    assert sorted(names[:12]) == sorted(names[12:24]) and names[:12] != names[12:24]
    resumed = WdsDataset(manifest["spec"][4:], endless=True, seed=1, shuffle_buffer=3, start=10).iter_raw()
    assert [(r.name, r.seed) for r in (next(resumed) for _ in range(20))] == [(r.name, r.seed) for r in first[10:]]
    # per-rank share of a global start, and the DataLoader's round-robin share per worker
    ds = WdsDataset(manifest["spec"][4:], start=24, batch_size=4)
    assert ds.reader_slot(rank=1, world_size=2, worker=0, num_workers=1) == (0, 12)
    # 3 batches were served by streams 0, 1, 0: stream 1 is next, so worker 0 replays it
    assert [ds.reader_slot(0, 2, w, 2) for w in range(2)] == [(1, 4), (0, 8)]
    with pytest.raises(ValueError, match="multiple of world_size"):
        WdsDataset(manifest["spec"][4:], start=3).reader_slot(0, 2, 0, 1)
    with pytest.raises(ValueError, match="cannot feed"):
        next(WdsDataset(manifest["spec"][4:], endless=True, rank=0, world_size=7).iter_raw())


def test_resume_with_two_workers_matches_uninterrupted_batches(shards):
    _, manifest = shards
    spec = manifest["spec"]

    def batches(start: int, n: int) -> list[list[str]]:
        ds = _Keys(build_dataset(spec, endless=True, seed=2, shuffle_buffer=2, start=start, batch_size=2))
        loader = DataLoader(ds, batch_size=2, num_workers=2, multiprocessing_context="fork")
        it = iter(loader)
        return [list(next(it)) for _ in range(n)]

    whole = batches(0, 7)
    assert batches(6, 4) == whole[3:7]  # 3 batches of 2 consumed, served by workers 0, 1, 0
    assert batches(8, 3) == whole[4:7]


def _write_shard(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_unreadable_shard_members_are_skipped_and_counted(tmp_path):
    good = _encode(np.zeros((8, 8, 3), np.uint8), "PNG")
    members = []
    for i in range(6):
        members += [(f"{i:04d}.png", good if i != 2 else good[:30]), (f"{i:04d}.cls", str(i).encode())]
    members += [("0006.png", good), ("0006.cls", b"not-a-number")]
    _write_shard(tmp_path / "s-0.tar", members)
    ds = build_dataset(f"wds:{tmp_path}/s-{{0..0}}.tar", shuffle_buffer=0)
    labels = [label for _, label in ds]
    assert labels == [0, 1, 3, 4, 5]
    assert ds.skip_counter.skipped == 2 and ds.skip_counter.seen == 7
    with pytest.raises(FileNotFoundError, match="s-1.tar"):
        build_dataset(f"wds:{tmp_path}/s-{{0..1}}.tar")


def test_ssl_streaming_samples_collate(shards):
    _, manifest = shards
    base = build_dataset(manifest["spec"], shuffle_buffer=0)
    t = MultiCropTransform(global_size=16, local_size=8, num_local_crops=2)
    ds = SSLIterableDataset(base, t, MaskingGenerator((2, 2)), patch_size=8)
    samples = list(ds)
    assert len(samples) == 12
    batch = ds.collate_fn(samples[:4])
    assert batch["global_crops"].shape == (8, 3, 16, 16) and batch["local_crops"].shape == (8, 3, 8, 8)
    again = list(SSLIterableDataset(base, t, MaskingGenerator((2, 2)), patch_size=8))
    assert all(torch.equal(a["global"][0], b["global"][0]) for a, b in zip(samples, again))


def test_cli_make_shards_and_inspect(tmp_path, capsys):
    src = _folder(tmp_path / "src", per_class=3)
    assert data_main(["make-shards", str(src), str(tmp_path / "out"), "--shard-size", "4"]) == 0
    out = capsys.readouterr().out
    assert "wrote 6 samples in 2 shard(s)" in out
    spec = out.split("use: ")[1].strip()
    assert spec == f"wds:{tmp_path / 'out'}/shard-{{000000..000001}}.tar"
    assert data_main(["inspect", spec, "--out", str(tmp_path / "grid.png"), "--num-samples", "4"]) == 0
    text = capsys.readouterr().out
    assert "items     6" in text and "cat=3" in text and "dog=3" in text
    assert Image.open(tmp_path / "grid.png").size == (4 * 96, 96 + 14)
    assert data_main(["inspect", "synthetic:n=8,size=32", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["num_items"] == 8 and summary["sizes"]["width"]["max"] == 32 and summary["mask_values"][0] == 0
    assert data_main(["inspect", "imagefolder:/definitely/missing"]) == 2
    assert "definitely/missing" in capsys.readouterr().err
