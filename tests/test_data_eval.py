"""Evaluation and extraction with unusable images (never another image's row; listed in reports and
manifests) and on ``wds:`` shards (every protocol's feature path, resumable extraction)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from eval.cli import main as eval_main
from eval.extract import extract_to_shards, read_features
from eval.extract import main as extract_main
from veca_ssl.data import build_dataset, make_shards
from veca_ssl.data.transforms import make_eval_transform
from veca_ssl.features import extract_features
from veca_ssl.models import build_backbone, save_backbone

BAD = (3, 4, 9)  # indices (in sorted path order) of unreadable files


def _model():
    torch.manual_seed(0)
    return build_backbone("veca_tiny", patch_size=8, num_cores=16, depth=2, embed_dim=32, num_heads=2).eval()


def _folder(root: Path, n: int = 12, bad: tuple[int, ...] = BAD) -> Path:
    """``n`` images with very different content in two classes; files at ``bad`` are corrupt."""
    rng = np.random.default_rng(1)
    for i in range(n):
        d = root / ("a" if i < n // 2 else "b")
        d.mkdir(parents=True, exist_ok=True)
        path = d / f"{i:03d}.png"
        if i in bad:
            path.write_bytes(b"\x89PNG\r\n\x1a\n broken")
        else:
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
    return root


def _own_features(model, paths: list[str], width: int = 16) -> torch.Tensor:
    """Reference: each file's image feature computed on its own (one forward per image)."""
    t = make_eval_transform(32)
    with torch.no_grad():
        return torch.cat([model.forward_features(t(Image.open(p).convert("RGB"))[None], num_cores=width)["cls"]
                          for p in paths])


@pytest.mark.parametrize("workers", [0, 2])
def test_features_of_unreadable_images_are_dropped_and_listed_never_substituted(tmp_path, workers):
    root = _folder(tmp_path)
    ds = build_dataset(f"imagefolder:{root}", transform=make_eval_transform(32), dense=False)
    model = _model()
    fs = extract_features(model, ds, [16], 32, batch_size=4, device="cpu", num_workers=workers,
                          progress=False, max_skip_fraction=None)[16]
    good = [i for i in range(12) if i not in BAD]
    assert fs.indices.tolist() == good and fs.labels.tolist() == [int(ds.targets[i]) for i in good]
    assert [r["index"] for r in fs.skipped] == list(BAD) and fs.seen == 12  # counted over workers
    assert all(r["item"] == ds.paths[r["index"]] and r["kind"] == "unreadable" for r in fs.skipped)
    reference = _own_features(model, [ds.paths[i] for i in good])
    torch.testing.assert_close(fs.image, reference, rtol=1e-4, atol=1e-4)  # each row is its own image's
    with pytest.raises(RuntimeError, match=r"3 of 12 samples were unusable"):
        extract_features(model, ds, [16], 32, batch_size=4, device="cpu", progress=False, max_skip_fraction=0.1)


def test_extract_cli_lists_skipped_indices_and_eval_reports_them(tmp_path, capsys):
    root = _folder(tmp_path / "f")
    ckpt = save_backbone(_model(), tmp_path / "teacher.safetensors")
    out = tmp_path / "ext"
    assert extract_main(["--checkpoint", str(ckpt), "--data", f"imagefolder:{root}", "--resolution", "32",
                         "--output-dir", str(out), "--shard-size", "5", "--max-skip-fraction", "0.5",
                         "--no-progress", "--num-workers", "2"]) == 0
    assert "3 unusable, left out and listed" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["skipped"] == {"seen": 12, "count": 3, "indices": list(BAD)}
    assert [[r["index"] for r in e["skipped"]] for e in manifest["shards"]] == [[3, 4], [9], []]
    arrays = read_features(out)
    assert arrays["indices"].tolist() == [i for i in range(12) if i not in BAD]
    paths = build_dataset(f"imagefolder:{root}").paths
    np.testing.assert_allclose(arrays["image"], _own_features(_model(), [paths[i] for i in arrays["indices"]]).numpy(),
                               rtol=1e-4, atol=1e-4)

    report = tmp_path / "knn"
    assert eval_main(["knn", "--checkpoint", str(ckpt), "--train", f"imagefolder:{root}", "--test",
                      f"imagefolder:{root}", "--resolution", "32", "--no-speed", "--no-progress", "--ks", "1",
                      "--output-dir", str(report), "--max-skip-fraction", "0.3"]) == 0
    skips = json.loads((report / "knn" / "report.json").read_text())["data_skips"]
    assert skips["train"]["skipped_indices"] == list(BAD) and skips["test"]["skipped"] == 3
    assert "- images read (unusable, left out): train 12 (3), test 12 (3)" in (report / "knn" / "report.md").read_text()
    # a clean dataset reports its zero: counted, not unknown
    clean = _folder(tmp_path / "clean", n=6, bad=())
    assert eval_main(["knn", "--checkpoint", str(ckpt), "--train", f"imagefolder:{clean}", "--test",
                      f"imagefolder:{clean}", "--resolution", "32", "--no-speed", "--no-progress", "--ks", "1",
                      "--output-dir", str(tmp_path / "knn_clean")]) == 0
    skips = json.loads((tmp_path / "knn_clean" / "knn" / "report.json").read_text())["data_skips"]
    assert {k: (v["seen"], v["skipped"]) for k, v in skips.items()} == {"train": (6, 0), "test": (6, 0)}
    # k=1 on train == test: every kept image finds itself, so no row carries another image's label
    rows = json.loads((report / "knn" / "report.json").read_text())["rows"]
    assert all(r["knn_k1_top1"] == 100.0 for r in rows)


def test_extraction_and_eval_on_wds_shards_match_the_folder_and_resume(tmp_path):
    root = _folder(tmp_path / "f", n=10, bad=())
    spec = make_shards(str(root), tmp_path / "s", shard_size=3, shuffle=False, progress=False)["spec"]
    model = _model()
    folder_fs = extract_features(model, build_dataset(f"imagefolder:{root}", transform=make_eval_transform(32)),
                                 [8, 16], 32, batch_size=4, device="cpu", progress=False)
    shard_ds = build_dataset(spec, transform=make_eval_transform(32))
    stream_fs = extract_features(model, shard_ds, [8, 16], 32, batch_size=4, device="cpu", num_workers=2,
                                 progress=False)
    for w in (8, 16):  # same rows, same order (global sample indices), no length needed per worker
        assert stream_fs[w].indices.tolist() == list(range(10))
        torch.testing.assert_close(stream_fs[w].image, folder_fs[w].image, rtol=1e-5, atol=1e-5)
        assert stream_fs[w].labels.tolist() == folder_fs[w].labels.tolist()

    info = {"model": "tiny", "checkpoint": None, "dataset": spec}
    full = extract_to_shards(model, shard_ds, tmp_path / "full", 16, 32, batch_size=4, shard_size=4, info=info,
                             progress=False)
    part = extract_to_shards(model, shard_ds, tmp_path / "part", 16, 32, batch_size=4, shard_size=4, info=info,
                             progress=False, max_shards=1)
    assert full["complete"] and not part["complete"] and full["count"] == 10
    resumed = extract_to_shards(model, shard_ds, tmp_path / "part", 16, 32, batch_size=4, shard_size=4, info=info,
                                progress=False, num_workers=2)
    assert resumed["shards"] == full["shards"]
    for name in ("shard-00000.safetensors", "shard-00001.safetensors", "shard-00002.safetensors"):
        assert (tmp_path / "part" / name).read_bytes() == (tmp_path / "full" / name).read_bytes()

    ckpt = save_backbone(model, tmp_path / "teacher.safetensors")
    for protocol, extra in (("knn", ["--ks", "1"]), ("logreg", ["--cs", "1.0"]),
                            ("linear", ["--epochs", "1", "--epoch-length", "2"])):
        out = tmp_path / protocol
        assert eval_main([protocol, "--checkpoint", str(ckpt), "--train", spec, "--test", spec, "--resolution",
                          "32", "--no-speed", "--no-progress", "--output-dir", str(out), *extra]) == 0
        assert len(json.loads((out / protocol / "report.json").read_text())["rows"]) == 2


def test_wds_extraction_lists_a_corrupt_member_by_its_global_index(tmp_path):
    root = _folder(tmp_path / "f", n=6, bad=())
    manifest = make_shards(str(root), tmp_path / "s", shard_size=3, shuffle=False, progress=False)
    shard = tmp_path / "s" / "shard-000001.tar"
    data = bytearray(shard.read_bytes())
    start = data.index(b"\x89PNG", data.index(b"000004.png"))  # the image of sample 4 (2nd of shard 1)
    data[start + 40:start + 400] = bytes(360)  # damaged in place: same size, headers intact
    shard.write_bytes(bytes(data))
    fs = extract_features(_model(), build_dataset(manifest["spec"], transform=make_eval_transform(32)), [16], 32,
                          batch_size=2, device="cpu", progress=False, max_skip_fraction=None)[16]
    assert fs.indices.tolist() == [0, 1, 2, 3, 5]
    assert [(r["index"], r["kind"]) for r in fs.skipped] == [(4, "unreadable")]
    assert fs.skipped[0]["item"].endswith("shard-000001.tar:000004.png")


def test_pixel_limit_is_an_eval_option_with_the_data_paths_default(tmp_path) -> None:
    from eval.config import EvalConfig
    from veca_ssl.data.decode import DEFAULT_MAX_PIXELS

    assert EvalConfig().max_pixels == DEFAULT_MAX_PIXELS
    root = _folder(tmp_path / "f", n=6, bad=())
    Image.new("RGB", (80, 80)).save(root / "a" / "000.png")  # 6400 pixels: above a limit of 5000, below the default
    ckpt = save_backbone(_model(), tmp_path / "m.safetensors")
    args = ["knn", "--checkpoint", str(ckpt), "--train", f"imagefolder:{root}", "--test", f"imagefolder:{root}",
            "--resolution", "32", "--no-speed", "--no-progress", "--ks", "1", "--max-skip-fraction", "0.5"]
    assert eval_main([*args, "--output-dir", str(tmp_path / "default")]) == 0
    assert eval_main([*args, "--max-pixels", "5000", "--output-dir", str(tmp_path / "limited")]) == 0
    counts = {name: json.loads((tmp_path / name / "knn" / "report.json").read_text())["data_skips"]["train"]["skipped"]
              for name in ("default", "limited")}
    assert counts == {"default": 0, "limited": 1}
