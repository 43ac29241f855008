"""WebDataset shards: round trip, the endless stream (split, seeded, exact resume without decoding what
is skipped, layout changes, resampling), unusable members, truncated shards, CLI tools."""

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
    DataError,
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
    sizes = {e["name"]: (e["count"], e["bytes"]) for e in manifest["shards"]}
    assert sizes == {p.name: (2, p.stat().st_size) for p in (tmp_path / "shards").glob("shard-*.tar")}
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
    one_pass = build_dataset(manifest["spec"])
    assert len(one_pass) == 12
    streamed = list(one_pass)
    assert sorted(label for _, label in streamed) == sorted(by_source[p][0] for p in by_source)
    pixels = sorted(np.asarray(img).tobytes() for img, _ in streamed)
    assert pixels == sorted(np.asarray(folder[i][0]).tobytes() for i in range(len(folder)))
    with pytest.raises(FileExistsError, match="overwrite"):
        make_shards(str(src), tmp_path / "shards", shard_size=2, progress=False)


class _Names(IterableDataset):
    """The training stream of ``ds`` as ``(worker, sample name, sample seed)`` — nothing decoded."""

    def __init__(self, ds: WdsDataset) -> None:
        self.ds = ds

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        for item, _ in self.ds.iter_train(lambda raw, seed: (raw.name, seed)):
            yield (info.id if info else 0, *item)


def _stream(spec: str, n: int, workers: int = 0, batch: int = 2, **kw) -> list[tuple]:
    ds = build_dataset(spec, endless=True, batch_size=batch, **kw)
    loader = DataLoader(_Names(ds), batch_size=batch, num_workers=workers, collate_fn=list)
    it = iter(loader)
    return [s for _ in range(n // batch) for s in next(it)]


def test_stream_is_endless_reshuffled_per_epoch_and_resumes_exactly(shards):
    spec = shards[1]["spec"]
    names = [s[1] for s in _stream(spec, 40, seed=1, shuffle_buffer=3)]
    assert sorted(names[:12]) == sorted(names[12:24]) == sorted(names[24:36])  # each epoch: every sample once
    assert len(set(names[:12])) == 12 and names[:12] != names[12:24]
    full = _stream(spec, 40, seed=1, shuffle_buffer=3)
    for start in (2, 10, 24, 26):  # mid-window, mid-shard, epoch boundary
        assert _stream(spec, 40 - start, seed=1, shuffle_buffer=3, start=start) == full[start:]
    assert _stream(spec, 12, seed=2, shuffle_buffer=3) != full[:12]


def test_resume_with_two_workers_matches_uninterrupted_batches(shards):
    spec = shards[1]["spec"]
    whole = [s[1:] for s in _stream(spec, 36, workers=2, seed=2, shuffle_buffer=6)]
    # 2 readers x 9 visits = 3 epochs: every sample exactly 3 times
    assert set(np.unique([n for n, _ in whole], return_counts=True)[1]) == {3}
    for start in (6, 8, 14):  # 3 batches consumed (served by workers 0, 1, 0), 4, 7
        resumed = [s[1:] for s in _stream(spec, 36 - start, workers=2, seed=2, shuffle_buffer=6, start=start)]
        assert resumed == whole[start:]


def test_resume_skips_whole_shards_by_count_and_decodes_nothing_skipped(shards, monkeypatch):
    import veca_ssl.data.shardset as shardset

    spec = shards[1]["spec"]
    scanned: list[str] = []
    real_scan = shardset.scan_shard
    monkeypatch.setattr(shardset, "scan_shard", lambda path: scanned.append(path) or real_scan(path))
    ds = build_dataset(spec, endless=True, seed=0, shuffle_buffer=1, start=1000 * 12 + 7)
    made: list[str] = []
    it = ds.iter_train(lambda raw, seed: made.append(raw.name) or raw.name)
    first = [next(it)[0] for _ in range(3)]
    assert made == first  # only the samples produced were decoded (made)
    assert len(scanned) <= 2  # 12007 samples in: only the shard(s) being read were opened
    reference = _stream(spec, 12 * 1001, seed=0, shuffle_buffer=1)[12 * 1000 + 7:12 * 1000 + 10]
    assert first == [r[1] for r in reference]


def test_two_ranks_two_workers_read_disjoint_shards(shards):
    spec = shards[1]["spec"]

    def readers(n: int) -> dict[tuple[int, int], list[str]]:
        out: dict[tuple[int, int], list[str]] = {}
        for rank in range(2):
            for worker, name, _ in _stream(spec, n, workers=2, rank=rank, world_size=2, seed=3, shuffle_buffer=2):
                out.setdefault((rank, worker), []).append(name)
        return out

    first_round = readers(4)  # each of the 4 readers reads one shard (one batch of 2)
    assert len(first_round) == 4
    shard_sets = [{n.rsplit(":", 1)[0] for n in names} for names in first_round.values()]
    assert all(len(s) == 1 for s in shard_sets) and len(set().union(*shard_sets)) == 4
    assert len({n for names in first_round.values() for n in names}) == 8
    everything = [n for names in readers(12).values() for n in names]  # 12 visits = 2 epochs
    assert set(np.unique(everything, return_counts=True)[1]) == {2} and len(set(everything)) == 12


def test_changed_layout_on_resume_repeats_nothing_within_an_epoch(shards):
    spec = shards[1]["spec"]  # 6 shards of 2 samples: one epoch = 6 shard visits
    kw = dict(seed=4, shuffle_buffer=2)
    old = build_dataset(spec, endless=True, **kw)
    old.resume(None, 0, rank=0, world_size=1, workers=2, batch_size=2)
    before = [s[1] for s in _stream(spec, 6, workers=2, **kw)]  # 3 batches (workers 0, 1, 0), then killed
    # readers 0 and 1 had started visits 0, 2 and 1: the new layout starts at visit 3
    new = build_dataset(spec, endless=True, **kw)
    note = new.resume(old.state(), 6, rank=0, world_size=2, workers=1, batch_size=2)
    assert "2 rank(s) x 1 worker(s)" in note and "1 rank(s) x 2 worker(s)" in note and "no sample repeats" in note
    assert [s.first_visit for s in new.segments] == [0, 3]
    after = []
    for rank, n in ((0, 4), (1, 2)):  # rank 0 reads visits 3 and 5, rank 1 visit 4: the rest of epoch 0
        ds = build_dataset(spec, endless=True, **kw)
        ds.resume(old.state(), 6, rank=rank, world_size=2, workers=1, batch_size=2)
        it = ds.iter_train(lambda raw, seed: raw.name)
        after += [next(it)[0] for _ in range(n)]
    assert len(set(before + after)) == 12  # epoch 0: every sample exactly once across the two layouts
    again = build_dataset(spec, endless=True, **kw)  # a second resume with the new layout is exact
    assert again.resume(new.state(), 10, rank=1, world_size=2, workers=1, batch_size=2) is None
    assert again.segments == new.segments


def test_resampled_shards_are_draws_with_replacement_and_resume_exactly(shards):
    spec = shards[1]["spec"]
    ds = build_dataset(spec, endless=True, resampled=True, seed=5)
    visits = [ds.visit_shard(t) for t in range(600)]
    counts = np.bincount(visits, minlength=6)
    assert counts.min() > 60 and any(visits[i:i + 6] != sorted(visits[i:i + 6]) for i in range(0, 600, 6))
    assert any(len(set(visits[i:i + 6])) < 6 for i in range(0, 600, 6))  # with replacement
    full = _stream(spec, 30, seed=5, resampled=True, shuffle_buffer=3)
    assert _stream(spec, 20, seed=5, resampled=True, shuffle_buffer=3, start=10) == full[10:]


def _write_shard(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_unusable_members_are_counted_and_a_bad_label_is_named(tmp_path):
    good = _encode(np.zeros((8, 8, 3), np.uint8), "PNG")
    members = []
    for i in range(6):
        members += [(f"{i:04d}.png", good if i != 2 else good[:30]), (f"{i:04d}.cls", str(i).encode())]
    members += [("0006.png", good), ("0006.cls", b"not-a-number")]
    _write_shard(tmp_path / "s-0.tar", members)
    ds = build_dataset(f"wds:{tmp_path}/s-{{0..0}}.tar")
    labels = [label for _, label in ds]
    assert labels == [0, 1, 3, 4, 5]
    assert ds.skip_counter.skipped == 2 and ds.skip_counter.seen == 7
    kinds = {r["item"].rsplit(":", 1)[1]: r["kind"] for r in ds.skip_counter.first}
    assert kinds == {"0002.png": "unreadable", "0006.cls": "bad label"}
    with pytest.raises(FileNotFoundError, match="s-1.tar"):
        build_dataset(f"wds:{tmp_path}/s-{{0..1}}.tar")


def test_truncated_shard_counts_every_lost_sample(shards, tmp_path):
    _, manifest = shards
    big = make_shards(str(_folder(tmp_path / "big", per_class=8)), tmp_path / "big_shards", shard_size=8,
                      progress=False)
    path = tmp_path / "big_shards" / "shard-000000.tar"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])  # a copy cut short: the manifest still promises 8 samples
    entry = json.loads((tmp_path / "big_shards" / "manifest.json").read_text())
    entry["shards"][0]["bytes"] = len(data) // 3  # the size check passes: the count is the manifest's
    (tmp_path / "big_shards" / "manifest.json").write_text(json.dumps(entry))
    ds = build_dataset(big["spec"])
    rows = list(ds.iter_indexed())
    lost = [r for r in rows if not isinstance(r, tuple) or len(r) == 2]
    readable = [r for r in rows if isinstance(r, tuple) and len(r) == 3]
    assert len(rows) == 16 and len(readable) + len(lost) == 16
    assert sum(1 for r in lost if r.record["kind"] == "lost") >= 5  # each lost sample counts, not 1
    assert ds.skip_counter.skipped == len(lost) and ds.skip_counter.seen == 16
    # the training stream replaces lost samples by others of the same window, positions stay exact
    train = build_dataset(big["spec"], endless=True, shuffle_buffer=4)
    it = train.iter_train(lambda raw, seed: raw.name)
    got = [next(it) for _ in range(16)]
    assert sum(len(skips) for _, skips in got) >= 5 and all(name.endswith((".jpg", ".png")) for name, _ in got)


def test_half_swapped_shard_set_is_refused(shards, tmp_path):
    (tmp_path / "shards" / ".make-shards-commit.json").write_text('{"new": [], "remove": []}')
    with pytest.raises(DataError, match="rerun the same make-shards command"):
        build_dataset(shards[1]["spec"])


def test_ssl_streaming_samples_collate_with_skip_counts(shards):
    _, manifest = shards
    base = build_dataset(manifest["spec"], endless=True, shuffle_buffer=1)
    t = MultiCropTransform(global_size=16, local_size=8, num_local_crops=2)
    ds = SSLIterableDataset(base, t, MaskingGenerator((2, 2)), patch_size=8)
    it = iter(ds)
    samples = [next(it) for _ in range(12)]
    batch = ds.collate_fn(samples[:4])
    assert batch["global_crops"].shape == (8, 3, 16, 16) and batch["local_crops"].shape == (8, 3, 8, 8)
    assert batch["data_seen"] == 4 and batch["data_skips"] == []
    again = iter(SSLIterableDataset(base, t, MaskingGenerator((2, 2)), patch_size=8))
    assert all(torch.equal(a["global"][0], next(again)["global"][0]) for a in samples)


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
