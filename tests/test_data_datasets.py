"""Dataset specs, map-style datasets, splits, dense labels and skipping of unreadable images."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from veca_ssl.data import (
    DenseEvalTransform,
    SkipCounter,
    UnreadableItem,
    build_dataset,
    make_eval_transform,
    parse_spec,
)


def _png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _colour(i: int) -> np.ndarray:
    """A 6x5 image whose pixels encode ``i`` exactly (lossless formats only)."""
    return np.full((5, 6, 3), (i * 7 % 256, i * 13 % 256, i), dtype=np.uint8)


def _folder(root: Path, classes: dict[str, int], start: int = 0) -> Path:
    i = start
    for name, count in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for _ in range(count):
            (root / name / f"img{i:03d}.png").write_bytes(_png_bytes(_colour(i)))
            i += 1
    return root


def test_imagefolder_labels_from_sorted_class_names(tmp_path):
    _folder(tmp_path, {"zebra": 2, "ant": 3})
    (tmp_path / "ant" / "notes.txt").write_text("not an image")
    ds = build_dataset(f"imagefolder:{tmp_path}")
    assert ds.classes == ["ant", "zebra"] and len(ds) == 5
    assert ds.targets.tolist() == [0, 0, 0, 1, 1]
    img, target = ds[3]
    assert isinstance(img, Image.Image) and img.mode == "RGB" and target == 1
    assert np.array_equal(np.asarray(ds[0][0]), _colour(2))  # ant images were written after zebra's
    # a class folder without images would shift zebra to label 1 if left out: refused, or kept as a class
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="class folder empty holds no image"):
        build_dataset(f"imagefolder:{tmp_path}")
    kept = build_dataset(f"imagefolder:{tmp_path}", allow_empty_classes=True)
    assert kept.classes == ["ant", "empty", "zebra"] and kept.targets.tolist() == [0, 0, 0, 2, 2]


def test_flat_folder_is_unlabelled_and_missing_or_empty_raise(tmp_path):
    for i in range(3):
        (tmp_path / f"{i}.png").write_bytes(_png_bytes(_colour(i)))
    ds = build_dataset(f"imagefolder:{tmp_path}")
    assert ds.classes is None and ds.targets.tolist() == [-1, -1, -1]
    with pytest.raises(FileNotFoundError, match="nope"):
        build_dataset(f"imagefolder:{tmp_path / 'nope'}")
    (tmp_path / "void").mkdir()
    with pytest.raises(ValueError, match="no images"):
        build_dataset(f"imagefolder:{tmp_path / 'void'}")


def test_splits_by_subfolder_and_placeholder(tmp_path):
    _folder(tmp_path / "train", {"a": 2, "b": 2})
    _folder(tmp_path / "val", {"a": 1, "b": 1}, start=50)
    assert len(build_dataset(f"imagefolder:{tmp_path}", split="train")) == 4
    assert len(build_dataset(f"imagefolder:{tmp_path}/{{split}}", split="val")) == 2
    with pytest.raises(FileNotFoundError, match="test"):
        build_dataset(f"imagefolder:{tmp_path}", split="test")
    np.savez(tmp_path / "x.npz", images=np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(ValueError, match=r"\{split\}"):
        build_dataset(f"npz:{tmp_path / 'x.npz'}", split="train")


def test_filelist_relative_paths_labels_and_bad_label(tmp_path):
    _folder(tmp_path / "imgs", {"c": 3})
    lst = tmp_path / "list.txt"
    lst.write_text("# comment\nimgs/c/img000.png\t4\n\nimgs/c/img002.png\n" + f"{tmp_path}/imgs/c/img001.png\t1\n")
    ds = build_dataset(f"filelist:{lst}")
    assert ds.targets.tolist() == [4, -1, 1]
    assert np.array_equal(np.asarray(ds[1][0]), _colour(2))
    missing = tmp_path / "missing.txt"
    missing.write_text("imgs/c/gone.png\t0\nimgs/c/img001.png\t1\n")
    listed = build_dataset(f"filelist:{missing}")
    with pytest.raises(UnreadableItem, match="gone.png") as err:  # evaluation: never another item's row
        listed[0]
    assert err.value.kind == "missing"
    assert listed.load(0, substitute=True)[1:] == (1, 1)  # training: the next readable item is used
    assert listed.skip_counter.skipped == 2 and listed.skip_counter.by_kind == {"missing": 2}
    bad = tmp_path / "bad.txt"
    bad.write_text("imgs/c/img000.png\tcat\n")
    with pytest.raises(ValueError, match=r"bad.txt:1.*'cat'"):
        build_dataset(f"filelist:{bad}")


def test_npz_gray_images_labels_and_dense(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, 6, 8), dtype=np.uint8)
    masks = rng.integers(0, 3, (4, 6, 8)).astype(np.uint8)
    masks[0, 0, 0] = 255
    depth = rng.random((4, 6, 8)).astype(np.float32)
    np.savez(tmp_path / "d.npz", images=images, labels=np.array([3, 1, 0, 2]), masks=masks, depth=depth)
    ds = build_dataset(f"npz:{tmp_path / 'd.npz'}")
    img, target, dense = ds[1]
    assert img.size == (8, 6) and np.array_equal(np.asarray(img)[..., 2], images[1]) and target == 1
    assert np.array_equal(dense["mask"], masks[1]) and np.array_equal(dense["depth"], depth[1])
    assert ds.num_mask_classes == 3
    assert len(build_dataset(f"npz:{tmp_path / 'd.npz'}", dense=False)[0]) == 2
    x, t, d = build_dataset(f"npz:{tmp_path / 'd.npz'}", transform=DenseEvalTransform(12))[0]
    assert x.shape == (3, 12, 12) and d["mask"].shape == (12, 12) and d["mask"][0, 0] == 255
    np.savez(tmp_path / "bad.npz", images=np.zeros((2, 4, 4), np.float32))
    with pytest.raises(ValueError, match="'images' must be uint8"):
        build_dataset(f"npz:{tmp_path / 'bad.npz'}")
    np.savez(tmp_path / "nolab.npz", images=np.zeros((2, 4, 4, 3), np.uint8))
    assert build_dataset(f"npz:{tmp_path / 'nolab.npz'}")[1][1] == -1


def test_digits_fixed_stratified_split():
    train, val, every = build_dataset("digits", split="train"), build_dataset("digits", split="val"), build_dataset("digits")
    assert (len(train), len(val), len(every)) == (1437, 360, 1797)
    img, label = train[0]
    assert img.size == (32, 32) and img.mode == "RGB" and 0 <= label <= 9
    assert set(train.indices).isdisjoint(val.indices) and len(set(train.indices) | set(val.indices)) == 1797
    frac = np.bincount(val.targets, minlength=10) / np.bincount(every.targets, minlength=10)
    assert np.all(np.abs(frac - 0.2) < 0.02)  # stratified: every class ~20% in val
    assert np.array_equal(build_dataset("digits", split="val").indices, val.indices)  # fixed split
    with pytest.raises(ValueError, match="unknown split"):
        build_dataset("digits", split="holdout")


def test_synthetic_options_determinism_splits_and_dense():
    ds = build_dataset("synthetic:n=12,size=32x48,classes=3,seed=5")
    assert len(ds) == 12 and ds.targets.tolist() == [i % 3 for i in range(12)]
    img, label, dense = ds[4]
    assert img.size == (48, 32) and label == 1
    assert dense["mask"].dtype == np.uint8 and dense["depth"].dtype == np.float32 and dense["mask"].shape == (32, 48)
    assert (dense["mask"] == label + 1).sum() > 50  # the main shape carries the image's class
    assert set(np.unique(dense["mask"])) <= {0, 1, 2, 3}
    assert np.abs(np.diff(dense["depth"][dense["mask"] == 0])).mean() < 0.5  # smooth depth
    again = build_dataset("synthetic:n=12,size=32x48,classes=3,seed=5")[4]
    assert np.array_equal(np.asarray(again[0]), np.asarray(img)) and np.array_equal(again[2]["depth"], dense["depth"])
    val = build_dataset("synthetic:n=12,size=32x48,classes=3,seed=5,val_n=6", split="val")
    assert len(val) == 6 and not np.array_equal(np.asarray(val[4][0]), np.asarray(img))
    other_seed = build_dataset("synthetic:n=12,size=32x48,classes=3,seed=6")[4]
    assert other_seed[1] == label and not np.array_equal(np.asarray(other_seed[0]), np.asarray(img))


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("foo:/x", "unknown kind"),
        ("imagefolder:", "needs a path"),
        ("digits:extra", "takes no argument"),
        ("synthetic:n=abc", "not an integer"),
        ("synthetic:bogus=1", "is not one of"),
        ("synthetic:size=8", "at least 16"),
        ("", "expected one of"),
    ],
)
def test_malformed_specs_name_the_spec(spec, fragment):
    with pytest.raises(ValueError, match=fragment) as err:
        build_dataset(spec)
    assert repr(spec) in str(err.value)


def test_spec_parsing_config_blocks_and_options(tmp_path):
    assert parse_spec("wds:/a/b-{0..3}.tar") == ("wds", "/a/b-{0..3}.tar")
    assert len(build_dataset({"spec": "synthetic:n=4,size=16", "split": "train"})) == 4
    assert len(build_dataset({"type": "digits", "split": "val"})) == 360
    with pytest.raises(ValueError, match="unknown option"):
        build_dataset("digits", shuffle_buffer=3)
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        build_dataset(f"npz:{tmp_path / 'missing.npz'}")


def _corrupt_folder(root: Path) -> Path:
    _folder(root, {"a": 4})
    (root / "a" / "img001.png").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")  # unreadable header
    good = _png_bytes(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8))
    (root / "a" / "img002.png").write_bytes(good[: len(good) // 2])  # truncated PNG
    (root / "a" / "img000.jpg").write_bytes(b"GIF89a garbage")  # corrupt file with a .jpg name
    return root


def test_corrupt_and_truncated_images_are_skipped_counted_and_replaced(tmp_path, caplog):
    ds = build_dataset(f"imagefolder:{_corrupt_folder(tmp_path)}")
    names = [Path(p).name for p in ds.paths]
    assert names == ["img000.jpg", "img000.png", "img001.png", "img002.png", "img003.png"]
    with caplog.at_level(logging.WARNING, logger="veca_ssl.data"):
        items = [ds.load(i, substitute=True)[0] for i in range(len(ds))] + [ds.load(2, substitute=True)[0]]
    # training: unreadable items are replaced by the next readable one (wrapping), never by a blank image
    expected = [_colour(0), _colour(0), _colour(3), _colour(3), _colour(3), _colour(3)]
    assert all(np.array_equal(np.asarray(img), e) for img, e in zip(items, expected))
    assert ds.skip_counter.skipped == 6 and ds.skip_counter.seen == 12
    logged = [r.getMessage() for r in caplog.records if "skipping unreadable" in r.getMessage()]
    assert len(logged) == 3  # each bad file logged once although it was hit twice
    assert any("img002.png" in m for m in logged) and any("img000.jpg" in m for m in logged)
    # evaluation (plain indexing): the bad item itself is reported, never its neighbour's pixels/label
    for i, name in ((0, "img000.jpg"), (2, "img001.png"), (3, "img002.png")):
        with pytest.raises(UnreadableItem, match=name):
            ds[i]
    assert np.array_equal(np.asarray(ds[4][0]), _colour(3))


def test_ssl_samples_skip_corrupt_files_deterministically(tmp_path):
    from veca_ssl.data import MaskingGenerator, MultiCropTransform, SSLDataset

    base = build_dataset(f"imagefolder:{_corrupt_folder(tmp_path)}")
    ds = SSLDataset(base, MultiCropTransform(global_size=16, local_size=8, num_local_crops=1), MaskingGenerator((2, 2)), 8)
    a, b = ds[(2, 99)], ds[(2, 99)]
    assert torch.equal(a["global"][0], b["global"][0]) and torch.equal(a["local"][0], b["local"][0])
    assert base.skip_counter.skipped == 4  # img001 and img002 skipped on each call, img003 used


def test_skip_threshold_raises_with_config_key(tmp_path):
    counter = SkipCounter(max_skip_fraction=0.2, min_seen=5)
    ds = build_dataset(f"imagefolder:{_corrupt_folder(tmp_path)}", skip_counter=counter)
    with pytest.raises(RuntimeError, match=r"data\.max_skip_fraction") as err:
        for i in range(len(ds)):
            ds.load(i, substitute=True)
    assert "unreadable" in str(err.value) and "0.2" in str(err.value)
    fail_all = SkipCounter(fail_fast=3)
    with pytest.raises(RuntimeError, match="all of the first 3"):
        for i in range(3):
            fail_all.skip(f"x{i}", "bad")
    with pytest.raises(ValueError, match="max_skip_fraction"):
        SkipCounter(max_skip_fraction=1.5)
    tolerant = SkipCounter(max_skip_fraction=0.5, min_seen=4)
    for i in range(10):
        tolerant.ok() if i % 3 else tolerant.skip(f"y{i}", "bad")
    assert tolerant.skipped == 4 and tolerant.seen == 10


def test_eval_loader_batches_transformed_items():
    ds = build_dataset("synthetic:n=6,size=32,classes=2", transform=DenseEvalTransform(32))
    x, y, dense = next(iter(DataLoader(ds, batch_size=3)))
    assert x.shape == (3, 3, 32, 32) and y.tolist() == [0, 1, 0] and dense["mask"].shape == (3, 32, 32)
    plain = build_dataset("digits", split="val", transform=make_eval_transform(32))
    x, y = next(iter(DataLoader(plain, batch_size=5)))
    assert x.shape == (5, 3, 32, 32) and y.dtype == torch.int64


def test_specs_naming_one_set_of_files_train_whole_and_explicit_splits_stay_strict(tmp_path):
    from veca_ssl.data import check_spec, make_shards

    _folder(tmp_path / "d" / "train", {"a": 2, "b": 2})
    _folder(tmp_path / "d" / "val", {"a": 1, "b": 1}, start=50)
    # training's data.split=train: a class folder and the printed shard spec are used whole
    assert len(build_dataset(f"imagefolder:{tmp_path}/d/train", split="train", split_if_present=True)) == 4
    spec = make_shards(str(tmp_path / "d" / "train"), tmp_path / "s", shard_size=2, progress=False)["spec"]
    assert len(build_dataset(spec, split="train", split_if_present=True)) == 4
    assert check_spec(spec, "train", split_if_present=True).endswith("shard-{000000..000001}.tar")
    listed = tmp_path / "list.txt"  # a file list is one set of files too
    listed.write_text("".join(f"{p}\t0\n" for p in sorted((tmp_path / "d" / "train").rglob("*.*"))))
    assert len(build_dataset(f"filelist:{listed}", split="train", split_if_present=True)) == 4
    with pytest.raises(ValueError, match="has no split 'val'|cannot select split"):
        build_dataset(f"filelist:{listed}", split="val")
    # a folder of splits still applies the split, and refuses to be read as classes "train"/"val"
    assert len(build_dataset(f"imagefolder:{tmp_path}/d", split="train", split_if_present=True)) == 4
    with pytest.raises(ValueError, match=r"folder of splits \(train, val\)"):
        build_dataset(f"imagefolder:{tmp_path}/d")
    # an explicit split the spec does not have (evaluation's SPEC@SPLIT) is an error, not a leak
    with pytest.raises(ValueError, match="has no split 'val'"):
        build_dataset(spec, split="val")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        check_spec(f"imagefolder:{tmp_path}/nowhere")


def test_train_and_submit_accept_the_guessable_specs_and_name_bad_ones(tmp_path, capsys):
    from launchers.submit import main as submit_main
    from veca_ssl.config import ConfigError, load_config

    _folder(tmp_path / "d" / "train", {"a": 2})
    exp = "configs/experiments/veca_s16_imagenet.yaml"
    cfg = load_config(exp, [f"data.train=imagefolder:{tmp_path}/d/train"])
    assert cfg.data.split == "train"
    with pytest.raises(ConfigError, match=r"data\.train=imagefolder:/d/train: imagefolder: directory"):
        load_config(exp, ["data.train=imagefolder:/d/train"])
    assert submit_main(["train", "--config", exp, f"data.train=imagefolder:{tmp_path}/d/train", "--dry-run",
                        f"output_dir={tmp_path}/o"]) == 0
    assert submit_main(["train", "--config", exp, "data.train=wds:/nowhere/shard-{0..3}.tar", "--dry-run"]) == 2
    assert "data.train=wds:/nowhere/shard-{0..3}.tar" in capsys.readouterr().err
    from veca_ssl.data import make_shards

    printed = make_shards(str(tmp_path / "d" / "train"), tmp_path / "s", shard_size=1, progress=False)["spec"]
    assert submit_main(["train", "--config", exp, f"data.train={printed}", "--dry-run", f"output_dir={tmp_path}/o"]) == 0
    assert load_config(exp, [f"data.train={printed}"]).data.samples_per_epoch is None  # the manifest counts 2
