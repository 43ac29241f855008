"""Feature engine width loop and the quality-vs-compute report (one row per width)."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from eval.config import KnnConfig
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


def test_width_loop_covers_every_width_and_matches_direct_forward() -> None:
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
    # The widths really differ (core width changes the features).
    assert not torch.allclose(feats[8].image, feats[16].image)


def test_widths_are_validated_and_dense_vit_has_one_row() -> None:
    model = _veca()
    with pytest.raises(ValueError, match=r"width\(s\) \[24\] not supported.*valid widths: \[8, 16\]"):
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
    knn = run_knn(train, test, KnnConfig(ks=(1, 3)))
    fake_linear = {8: {"linear_top1": 50.0}, 16: {"linear_top1": 75.0}}
    metrics = merge_metrics(knn, fake_linear)
    rows = build_rows(model, metrics, 32, batch_size=2, device="cpu", warmup=1, repeats=2)
    ref_train = extract_features(vit, _data(10), None, 32, 5, "cpu", progress=False)
    ref_test = extract_features(vit, _data(6), None, 32, 5, "cpu", progress=False)
    rows += build_rows(vit, run_knn(ref_train, ref_test, KnnConfig(ks=(1, 3))), 32, 2, "cpu", warmup=1, repeats=2,
                       reference=True)
    assert [r["width"] for r in rows] == ["C8", "C16", "dense"]
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
    assert [r["width"] for r in csv_rows] == ["C8", "C16", "dense"]
    doc = json.loads(paths["json"].read_text())
    assert doc["resolution"] == 32 and len(doc["rows"]) == 3 and doc["rows"][2]["linear_top1"] is None
    md = paths["md"].read_text()
    assert md.count("| C8 |") == 1 and "| dense |" in md and "gflops" in md


def test_missing_checkpoint_is_named_before_any_work(tmp_path, capsys) -> None:
    from eval.cli import main

    missing = tmp_path / "nope" / "teacher.safetensors"
    assert main(["knn", "--checkpoint", str(missing), "--train", "digits@train", "--test", "digits@val",
                 "--output-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("veca eval knn: error: checkpoint not found") and "nope/teacher.safetensors" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "o").exists()
    assert main(["frobnicate"]) == 2


def _rows_with_noise() -> list[dict]:
    """Four widths whose accuracies differ by less than their intervals (noise, not a trend)."""
    rows = []
    for i, (w, acc) in enumerate([(8, 91.2), (16, 91.6), (24, 91.4), (32, 91.7)]):
        rows.append({"width": f"C{w}", "num_cores": w, "reference": False, "linear_top1": acc,
                     "linear_top1_ci_lo": acc - 1.2, "linear_top1_ci_hi": acc + 1.1, "gflops": 0.5 + 0.25 * i,
                     "latency_ms": 1.0 + i, "latency_min_ms": 0.9 + i, "latency_max_ms": 1.2 + i})
    return rows


def test_plot_has_error_bars_a_honest_range_two_compute_axes_and_a_whole_title() -> None:
    from matplotlib.container import ErrorbarContainer

    from eval.report import MIN_PERCENT_SPAN, figure

    title = "Linear probe — VECA [embed_dim 384, depth 12, patch_size 16] (" + "/very/long/path" * 8 + ")"
    fig = figure(_rows_with_noise(), title, selected="C16")
    fig.canvas.draw()
    axes = fig.axes
    assert [ax.get_xlabel() for ax in axes] == ["GFLOPs / image", "latency (ms / image)"]
    for ax in axes:
        bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
        assert bars and bars[0].has_yerr  # the 95% intervals are drawn
        lo, hi = ax.get_ylim()
        assert hi - lo >= MIN_PERCENT_SPAN  # 0.5 points of noise are not stretched over the axis
        assert lo <= 91.2 - 1.2 and hi >= 91.7 + 1.1  # every interval visible
    assert "selected: C16" in [t.get_text() for t in axes[0].get_legend().get_texts()]
    box, frame = fig._suptitle.get_window_extent(), fig.bbox
    assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and box.y1 <= frame.y1  # not cut off
    assert "\n" in fig._suptitle.get_text()  # wrapped instead


def test_y_limits_rule() -> None:
    from eval.report import y_limits

    lo, hi = y_limits([99.5, 99.9], "knn_k20_top1")
    assert hi <= 100 and hi - lo >= 10  # shifted down, not past 100 %
    lo, hi = y_limits([20.0, 80.0], "linear_top1")
    assert lo < 20 and hi > 80 and hi - lo < 70  # a real spread keeps its own range
    lo, hi = y_limits([0.400, 0.401], "depth_rmse")
    assert hi - lo >= 0.2 * 0.4  # errors: at least 20% of their size


def test_bootstrap_interval_matches_an_independent_resampling() -> None:
    import numpy as np

    from eval.dense import confusion_matrices, miou_of_sums, segmentation_metrics
    from eval.stats import bootstrap_ci, mean_ci

    hits = (torch.arange(400) % 5 != 0).float()  # 80 % accuracy on 400 items
    lo, hi = mean_ci(hits, samples=2000, scale=100.0)
    rng = np.random.default_rng(0)
    ref = np.percentile([hits.numpy()[rng.integers(0, 400, 400)].mean() * 100 for _ in range(2000)], [2.5, 97.5])
    assert lo == pytest.approx(ref[0], abs=0.8) and hi == pytest.approx(ref[1], abs=0.8)
    assert lo < 80 < hi and hi - lo == pytest.approx(2 * 1.96 * (0.8 * 0.2 / 400) ** 0.5 * 100, rel=0.15)
    assert mean_ci(torch.ones(50), 500, scale=100.0) == (100.0, 100.0)
    assert all(np.isnan(mean_ci(torch.ones(1), 500)))  # one item: no interval
    # mIoU intervals resample images: the statistic of the plain sum is the reported mIoU
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randint(0, 3, (6, 4, 4), generator=g), torch.randint(0, 3, (6, 4, 4), generator=g)
    per_image = confusion_matrices(pred, target, 3)
    assert float(miou_of_sums(per_image.sum(0, keepdim=True).double())[0]) == pytest.approx(
        segmentation_metrics(per_image.sum(0))["seg_miou"])
    lo, hi = bootstrap_ci(per_image, miou_of_sums, samples=500)
    assert lo <= segmentation_metrics(per_image.sum(0))["seg_miou"] <= hi
