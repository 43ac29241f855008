"""Data faults as users meet them, through the real commands with DataLoader workers: a truncated or
unreadable WebDataset shard (every sample its manifest promised counts as lost, in training and in
extraction, where later rows keep their true index), ``--max-skip-fraction`` of eval and extract
(judged over the whole set, named in the message)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from integrity_cli import ROOT, write_config
from PIL import Image

from veca_ssl.data.shards import make_shards
from veca_ssl.data.tario import scan_shard

PER_SHARD = 16
TINY_MODEL = ["--model", "veca_tiny", "--patch-size", "8", "--num-cores", "16", "--model-arg", "depth=1",
              "--model-arg", "embed_dim=32", "--model-arg", "num_heads=2", "--resolution", "16"]


def veca(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """The ``veca`` command line in a subprocess (one thread, as the tests run everything)."""
    return subprocess.run([sys.executable, "-m", "veca_ssl.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, OMP_NUM_THREADS="1"))


def image_folder(root: Path, per_class: int, classes: int = 4, bad: tuple[str, ...] = ()) -> Path:
    """``root/c<k>/<i>.png`` of 16 px noise; the files named in ``bad`` (``c0/000.png``) hold no image."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / f"c{c}" / f"{i:03d}.png")
    for name in bad:
        (root / name).write_bytes(b"not an image")
    return root


def cut_shard(path: Path, keep: int) -> None:
    """Truncate a shard in the middle of sample ``keep``'s image, as a copy cut short or a full disk
    leaves it: samples ``0..keep-1`` stay complete."""
    offset, size = scan_shard(str(path)).members[keep]["png"]
    os.truncate(path, offset + size // 2)


@pytest.fixture
def damaged_shards(tmp_path, request) -> tuple[str, int, list[int]]:
    """128 samples in 8 shards of 16 (stored order: sample i is source i); shard 3 damaged as the test
    asks (``truncated``: 10 samples cut off; ``emptied``: 0 bytes, all 16 unreadable). Returns the spec,
    the damaged shard's number and the global indices of the lost samples."""
    src = image_folder(tmp_path / "src", per_class=32)
    manifest = make_shards(str(src), tmp_path / "shards", shard_size=PER_SHARD, shuffle=False, progress=False)
    shard = tmp_path / "shards" / "shard-000003.tar"
    if getattr(request, "param", "truncated") == "truncated":
        cut_shard(shard, keep=6)
        lost = list(range(3 * PER_SHARD + 6, 4 * PER_SHARD))
    else:
        shard.write_bytes(b"")
        lost = list(range(3 * PER_SHARD, 4 * PER_SHARD))
    return manifest["spec"], 3, lost


# ------------------------------------------------------------------------------------ truncated shards
def test_training_counts_every_sample_a_truncated_shard_lost(tmp_path, damaged_shards):
    """No data.samples_per_epoch: the manifest gives the length (the damaged shard still counts its 16).
    One epoch of 128 positions: exactly the 10 lost samples are skipped, once each; with 5% allowed
    the run stops with one message naming the shard."""
    spec, shard, lost = damaged_shards
    config = write_config(tmp_path / "exp.yaml", f"data.train={spec}", "data.num_workers=2", "optim.epochs=1",
                          "train.checkpoint_every=1000", "data.shuffle_buffer=16", "data.max_skip_fraction=0.5")
    done = veca("train", "--config", str(config), f"output_dir={tmp_path / 'ok'}")
    assert done.returncode == 0, done.stderr
    last = json.loads((tmp_path / "ok" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 128 // 8 and last["data_skipped"] == len(lost) == 10
    assert last["data_seen"] == 128 + len(lost)  # each position once, plus the substitutes read
    assert f"shard-{shard:06d}.tar has" in done.stderr and "the missing ones count as lost" in done.stderr
    stopped = veca("train", "--config", str(config), f"output_dir={tmp_path / 'stop'}", "data.max_skip_fraction=0.05")
    lines = [line for line in stopped.stderr.splitlines() if line.startswith("veca train")]
    assert stopped.returncode == 2 and len(lines) == 1, stopped.stderr
    assert "more than data.max_skip_fraction=0.05" in lines[0] and f"shard-{shard:06d}.tar[" in lines[0]
    assert "(lost)" in lines[0] and "Traceback" not in stopped.stderr


@pytest.mark.parametrize("damaged_shards", ["truncated", "emptied"], indirect=True)
def test_extraction_lists_lost_samples_and_later_rows_keep_their_index(tmp_path, damaged_shards):
    spec, shard, lost = damaged_shards
    out = tmp_path / "features"
    result = veca("extract", *TINY_MODEL, "--data", spec, "--output-dir", str(out), "--num-workers", "2",
                  "--max-skip-fraction", "0.5", "--no-progress")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["count"] == 128
    assert manifest["skipped"]["count"] == len(lost) and manifest["skipped"]["indices"] == lost
    records = manifest["shards"][0]["skipped"]
    assert all(f"shard-{shard:06d}.tar" in r["item"] and r["kind"] in ("lost", "unreadable") for r in records)
    from eval.extract import read_features

    features = read_features(out)
    assert features["indices"].tolist() == [i for i in range(128) if i not in lost]
    # rows keep their source's label: sources are c0..c3 with 32 each, in stored order
    assert features["labels"].tolist() == [i // 32 for i in range(128) if i not in lost]


def test_a_manifest_that_does_not_list_a_shard_is_named_as_such(tmp_path):
    src = image_folder(tmp_path / "src", per_class=8)
    manifest = make_shards(str(src), tmp_path / "shards", shard_size=PER_SHARD, shuffle=False, progress=False)
    listed = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    listed["shards"] = listed["shards"][:-1]
    (tmp_path / "shards" / "manifest.json").write_text(json.dumps(listed))
    config = write_config(tmp_path / "exp.yaml", f"data.train={manifest['spec']}")
    result = veca("train", "--config", str(config), f"output_dir={tmp_path / 'run'}", "--dry-run")
    assert result.returncode == 2
    assert "have no manifest.json" not in result.stderr
    assert f"the manifest.json in {tmp_path / 'shards'} does not list 1 of the shards (e.g. shard-000001.tar)" \
        in result.stderr, result.stderr


# ------------------------------------------------------------------------- eval/extract skip fraction
@pytest.fixture
def three_bad_in_front(tmp_path) -> Path:
    """200 images, the 3 first in stored order unusable: 1.5% of the set, 3% of the first 100."""
    return image_folder(tmp_path / "imgs", per_class=50, bad=("c0/000.png", "c0/001.png", "c0/002.png"))


@pytest.mark.parametrize("command", ["eval", "extract"])
def test_max_skip_fraction_of_eval_and_extract_judges_the_whole_set_with_workers(tmp_path, three_bad_in_front,
                                                                                 command):
    data = f"imagefolder:{three_bad_in_front}"
    if command == "eval":
        args = ["eval", "knn", *TINY_MODEL, "--widths", "16", "--train", data, "--test", data, "--no-speed",
                "--bootstrap", "0", "--output-dir", str(tmp_path / "eval"), "--no-progress", "--overwrite"]
    else:  # 4 extraction shards of 50: the first holds all 3 (6% of it)
        args = ["extract", *TINY_MODEL, "--data", data, "--output-dir", str(tmp_path / "features"),
                "--shard-size", "50", "--no-progress"]
    refused = veca(*args, "--num-workers", "2", "--max-skip-fraction", "0.01")
    lines = [line for line in refused.stderr.splitlines() if line.startswith(f"veca {command}")]
    assert refused.returncode == 2 and len(lines) == 1, refused.stderr
    message = lines[0]
    assert "3 of 200 samples were unusable (1.50%), more than --max-skip-fraction=0.01" in message, message
    assert "raise --max-skip-fraction" in message and "data.max_skip_fraction" not in message
    assert "DataLoader worker" not in refused.stderr and "Traceback" not in refused.stderr
    assert "c0/000.png" in message
    if command == "eval":
        assert f"train set {data}: " in message
    else:  # judged once the whole set is extracted: the shards are kept and the rerun accepts them
        assert json.loads((tmp_path / "features" / "manifest.json").read_text())["complete"]
    allowed = veca(*args, "--num-workers", "2", "--max-skip-fraction", "0.02")
    assert allowed.returncode == 0, allowed.stderr
    if command == "extract":
        assert json.loads((tmp_path / "features" / "manifest.json").read_text())["skipped"]["count"] == 3


# ------------------------------------------------------------------------------- image folder classes
def class_folders(root: Path, filled: str, empty: str = "") -> Path:
    """``root/<c>/`` for every letter of ``filled`` (4 images of 16 px each, colour by class) and of
    ``empty`` (no image)."""
    rng = np.random.default_rng(0)
    for c in sorted(filled + empty):
        (root / c).mkdir(parents=True, exist_ok=True)
        if c in filled:
            for i in range(4):
                shade = rng.integers(0, 20, (16, 16, 3), dtype=np.uint8) + 60 * (ord(c) - ord("a"))
                Image.fromarray(shade.astype(np.uint8)).save(root / c / f"{i}.png")
    return root


def test_an_empty_class_folder_is_named_or_kept_so_no_label_shifts(tmp_path):
    """torchvision's ImageFolder semantics: classes are the sorted folder names; a folder without
    images is an error naming it (it would shift the later labels), or, asked for, a class of its own."""
    test = class_folders(tmp_path / "test", filled="ac", empty="b")
    out = tmp_path / "features"
    args = ["extract", *TINY_MODEL, "--data", f"imagefolder:{test}", "--output-dir", str(out), "--no-progress"]
    refused = veca(*args)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert f"veca extract: error: imagefolder {test}: class folder b holds no image" in refused.stderr
    assert "--allow-empty-classes" in refused.stderr and not out.exists()
    kept = veca(*args, "--allow-empty-classes")
    assert kept.returncode == 0, kept.stderr
    from eval.extract import read_features

    assert read_features(out)["labels"].tolist() == [0] * 4 + [2] * 4  # c stays class 2, after the empty b
    # training reads the same folders; the config key keeps the empty class there
    config = write_config(tmp_path / "exp.yaml", f"data.train=imagefolder:{test}", "train.max_steps=1",
                          "optim.batch_size_per_gpu=4")
    train = veca("train", "--config", str(config), f"output_dir={tmp_path / 'run'}")
    assert train.returncode == 2 and "class folder b holds no image" in train.stderr
    assert "data.allow_empty_classes=true" in train.stderr
    trained = veca("train", "--config", str(config), f"output_dir={tmp_path / 'run'}", "data.allow_empty_classes=true")
    assert trained.returncode == 0, trained.stderr


def test_eval_refuses_train_and_test_sets_with_different_classes(tmp_path):
    train = class_folders(tmp_path / "train", filled="abc")
    test = class_folders(tmp_path / "test", filled="ac")  # no b folder at all: c would be label 1 here
    result = veca("eval", "knn", *TINY_MODEL, "--widths", "16", "--train", f"imagefolder:{train}", "--test",
                  f"imagefolder:{test}", "--no-speed", "--bootstrap", "0", "--output-dir", str(tmp_path / "eval"),
                  "--no-progress")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("veca eval knn")]
    assert lines == [f"veca eval knn: error: the train set imagefolder:{train} has 3 classes and the test set "
                     f"imagefolder:{test} has 2, and they differ (only in the train set imagefolder:{train}: b): label "
                     f"k would name a different class in each. Give both the same class folders (a class folder "
                     f"without images is kept as a class with --allow-empty-classes)"], result.stderr


def test_a_directory_symlink_loop_is_read_once_and_named(tmp_path):
    root = class_folders(tmp_path / "data", filled="ab")
    (root / "b" / "self").symlink_to(".")  # ln -s . data/b/self
    (root / "b" / "nested").mkdir()
    (root / "b" / "nested" / "up").symlink_to("../..")  # a loop two levels up, into the dataset root
    (root / "a" / "also_a").symlink_to(root / "a")
    result = veca("data", "inspect", f"imagefolder:{root}", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["num_items"] == 8 and summary["label_counts"] == {"0": 4, "1": 4}
    assert f"not following {root / 'b' / 'self'} -> {root / 'b'}: a loop back to {root / 'b'}" in result.stderr
    assert f"not following {root / 'a' / 'also_a'} -> {root / 'a'}: a loop back to {root / 'a'}" in result.stderr
    assert f"not following {root / 'b' / 'nested' / 'up'} -> {root}" in result.stderr
    from veca_ssl.data import build_dataset

    paths = build_dataset(f"imagefolder:{root}").paths
    assert len(paths) == len({os.path.realpath(p) for p in paths}) == 8  # no image twice


def test_a_link_to_another_class_folder_is_not_read_as_this_class(tmp_path, caplog):
    from veca_ssl.data import build_dataset

    root = class_folders(tmp_path / "data", filled="abc")
    (root / "a" / "more").symlink_to(root / "c")  # c's images would be filed under a as well
    (root / "b" / "extra").mkdir()
    for i in range(2):
        (root / "b" / "extra" / f"{i}.png").write_bytes((root / "b" / f"{i}.png").read_bytes())
    (root / "c" / "twin").symlink_to(root / "b" / "extra")  # b's sub-folder, already read under b
    ds = build_dataset(f"imagefolder:{root}")
    assert ds.classes == ["a", "b", "c"] and np.bincount(ds.targets).tolist() == [4, 6, 4]
    assert f"{root / 'a' / 'more'} -> {root / 'c'}: the class folder {root / 'c'}" in caplog.text
    assert f"{root / 'c' / 'twin'} -> {root / 'b' / 'extra'}: already read as {root / 'b' / 'extra'}" in caplog.text


def test_inspect_counts_one_bad_file_once(tmp_path):
    root = class_folders(tmp_path / "data", filled="ab")
    (root / "a" / "0.png").write_bytes(b"broken")  # both a size probe and a grid sample
    result = veca("data", "inspect", f"imagefolder:{root}", "--json", "--out", str(tmp_path / "grid.png"))
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["skipped"] == 1 and len(summary["skipped_items"]) == 1
