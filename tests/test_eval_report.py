"""Feature engine width loop and the quality-vs-compute report (one row per width)."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from eval.knn import run_knn
from eval.report import build_rows, merge_metrics, write_report
from veca_ssl.features import extract_features
from veca_ssl.models import build_backbone
from veca_ssl.widths import resolve_widths, width_label

TINY = dict(patch_size=8, depth=2, embed_dim=64, num_heads=2)


def _veca():
    torch.manual_seed(0)
    return build_backbone("veca_tiny", num_cores=16, **TINY).eval()


def _vit():
    torch.manual_seed(0)
    return build_backbone("vit_tiny", **TINY).eval()


def _data(n: int = 10):
    g = torch.Generator().manual_seed(2)
    return [(torch.randn(3, 32, 32, generator=g), i % 2) for i in range(n)]


def test_width_loop_covers_every_budget_and_matches_direct_forward() -> None:
    model, data = _veca(), _data()
    feats = extract_features(model, data, None, 32, batch_size=4, device="cpu", n_last_blocks=2,
                             with_patch_mean=True, with_patches=True, progress=False)
    assert list(feats) == [8, 16] == list(model.budgets)
    images = torch.stack([x for x, _ in data])
    with torch.no_grad():
        for w, fs in feats.items():
            direct = model.forward_features(images, num_cores=w)
            blocks = model.get_intermediate_features(images, n=2, num_cores=w)
            assert fs.cls.shape == (10, 2, 64) and fs.width == w
            torch.testing.assert_close(fs.image, direct["cls"], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(fs.cls[:, 0], blocks[0]["cls"], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(fs.patches, direct["patches"], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(fs.patch_mean, direct["patches"].mean(1), rtol=1e-5, atol=1e-5)
            assert fs.grid == (4, 4)
            assert fs.labels.tolist() == [i % 2 for i in range(10)] and fs.indices.tolist() == list(range(10))
    # The widths really differ (core budget changes the features).
    assert not torch.allclose(feats[8].image, feats[16].image)


def test_widths_are_validated_and_dense_vit_has_one_row() -> None:
    model = _veca()
    with pytest.raises(ValueError, match=r"width\(s\) \[24\] not supported.*valid budgets: \[8, 16\]"):
        resolve_widths(model, [8, 24])
    with pytest.raises(ValueError, match=r"width\(s\) \[12\]"):
        extract_features(model, _data(2), [12], 32, 2, "cpu", progress=False)
    vit = _vit()
    assert resolve_widths(vit, None) == [None] and width_label(None) == "dense"
    with pytest.raises(ValueError, match="dense ViT"):
        resolve_widths(vit, [8])
    feats = extract_features(vit, _data(3), None, 32, 2, "cpu", progress=False)
    assert list(feats) == [None] and feats[None].image.shape == (3, 64)
    with pytest.raises(ValueError, match="multiple of the patch size 8"):
        extract_features(model, _data(2), None, 36, 2, "cpu", progress=False)


def test_report_has_one_row_per_width_with_compute_and_a_reference_point(tmp_path) -> None:
    model, vit = _veca(), _vit()
    train = extract_features(model, _data(10), None, 32, 5, "cpu", progress=False)
    test = extract_features(model, _data(6), None, 32, 5, "cpu", progress=False)
    knn = run_knn(train, test, ks=(1, 3))
    fake_linear = {8: {"linear_top1": 50.0}, 16: {"linear_top1": 75.0}}
    metrics = merge_metrics(knn, fake_linear)
    rows = build_rows(model, metrics, 32, batch_size=2, device="cpu", warmup=1, repeats=2)
    ref_train = extract_features(vit, _data(10), None, 32, 5, "cpu", progress=False)
    ref_test = extract_features(vit, _data(6), None, 32, 5, "cpu", progress=False)
    rows += build_rows(vit, run_knn(ref_train, ref_test, ks=(1, 3)), 32, 2, "cpu", warmup=1, repeats=2,
                       reference=True)
    assert [r["width"] for r in rows] == ["C=8", "C=16", "dense"]
    for r, (m, w) in zip(rows, [(model, 8), (model, 16), (vit, None)]):
        assert r["gflops"] == pytest.approx(m.flops(32, 32, w) / 1e9)
        assert 0 < r["latency_min_ms"] <= r["latency_ms"] <= r["latency_max_ms"]
        assert r["images_per_s"] > 0 and "knn_k3_top1" in r
    assert rows[0]["gflops"] < rows[1]["gflops"]  # more cores, more compute
    assert rows[1]["linear_top1"] == 75.0 and rows[2]["reference"] is True

    paths = write_report(rows, tmp_path / "out", "test report", {"resolution": 32})
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(paths["csv"]) as f:
        csv_rows = list(csv.DictReader(f))
    assert [r["width"] for r in csv_rows] == ["C=8", "C=16", "dense"]
    doc = json.loads(paths["json"].read_text())
    assert doc["resolution"] == 32 and len(doc["rows"]) == 3 and doc["rows"][2]["linear_top1"] is None
    md = paths["md"].read_text()
    assert md.count("| C=8 |") == 1 and "| dense |" in md and "gflops" in md


def test_missing_checkpoint_is_named_before_any_work(tmp_path) -> None:
    from eval.cli import main

    missing = tmp_path / "nope" / "teacher.safetensors"
    with pytest.raises(FileNotFoundError, match="nope/teacher.safetensors"):
        main(["knn", "--checkpoint", str(missing), "--train", "does-not-matter", "--test", "x",
              "--output-dir", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()
    assert main(["frobnicate"]) == 2
