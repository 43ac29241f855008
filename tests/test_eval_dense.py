"""Dense probes: metric functions on hand-computed examples, folder loader, probes, bad data."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from eval.dense import (
    DenseEvalDataset,
    DenseProbeConfig,
    SegFolderDataset,
    build_dense_dataset,
    confusion_matrix,
    depth_metrics,
    run_dense,
    segmentation_metrics,
)
from veca_ssl.features import FeatureSet


def test_confusion_matrix_and_miou_by_hand() -> None:
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 0, 2]])
    conf = confusion_matrix(pred, target, num_classes=4)
    # rows = truth, cols = prediction; the 255 pixel is ignored whatever is predicted there.
    expected = torch.zeros(4, 4, dtype=torch.long)
    expected[0, 0], expected[0, 1] = 1, 1
    expected[1, 1], expected[1, 2] = 2, 1
    expected[2, 2], expected[2, 0] = 1, 1
    assert torch.equal(conf, expected)
    m = segmentation_metrics(conf)
    # IoU0 = 1/(2+2-1) = 1/3, IoU1 = 2/(3+3-2) = 1/2, IoU2 = 1/(2+2-1) = 1/3; class 3 absent (union 0).
    assert m["seg_miou"] == pytest.approx(100 * (1 / 3 + 1 / 2 + 1 / 3) / 3)
    assert m["seg_pixel_acc"] == pytest.approx(100 * 4 / 7)


def test_predicted_but_absent_class_counts_as_zero_iou() -> None:
    conf = confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 0]), num_classes=2)
    # class 1 never in the truth but predicted once: union 1, IoU 0 (mmsegmentation convention).
    assert segmentation_metrics(conf)["seg_miou"] == pytest.approx(100 * (0.5 + 0.0) / 2)


def test_mask_label_out_of_range_is_named() -> None:
    with pytest.raises(ValueError, match="mask label 7"):
        confusion_matrix(torch.tensor([0]), torch.tensor([7]), num_classes=3)


def test_depth_metrics_by_hand() -> None:
    gt = torch.tensor([[[1.0, 2.0], [0.0, 4.0]], [[2.0, 0.0], [0.0, 0.0]]])
    pred = torch.tensor([[[2.0, 2.0], [9.0, 2.0]], [[1.0, 5.0], [5.0, 5.0]]])
    m = depth_metrics(pred, gt)
    # image 1 (valid: 1,2,4): errors 1,0,-2 → RMSE sqrt(5/3), AbsRel (1 + 0 + 0.5)/3 = 0.5
    # image 2 (valid: 2):     error -1    → RMSE 1,          AbsRel 0.5;  averaged over images
    assert m["depth_rmse"] == pytest.approx((math.sqrt(5 / 3) + 1) / 2)
    assert m["depth_absrel"] == pytest.approx(0.5)


def _write_folder(root, n: int = 3, reduce: bool = False) -> None:
    for sub in ("images/training", "annotations/training", "depth/training"):
        (root / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(root / f"images/training/im{i}.jpg")
        mask = np.full((20, 24), i, dtype=np.uint8)
        mask[0, 0] = 0
        Image.fromarray(mask).save(root / f"annotations/training/im{i}.png")
        np.save(root / f"depth/training/im{i}.npy", np.full((20, 24), 1.5 + i, dtype=np.float32))


def test_folder_loader_pairs_stems_splits_and_reduces_zero_label(tmp_path) -> None:
    _write_folder(tmp_path)
    ds = build_dense_dataset(f"folder:{tmp_path}@train")  # "train" finds ADE20K's "training"
    assert isinstance(ds, SegFolderDataset) and len(ds) == 3
    img, target, dense = ds[2]
    assert img.size == (24, 20) and target == -1
    assert dense["mask"][5, 5] == 2 and dense["depth"][0, 0] == pytest.approx(3.5)
    reduced = SegFolderDataset(tmp_path, "training", reduce_zero_label=True)
    m = reduced[2][2]["mask"]
    assert m[0, 0] == 255 and m[5, 5] == 1  # 0 → ignore, k → k - 1
    ev = DenseEvalDataset(ds, resolution=16, spec="x")
    x, _ = ev[0]
    assert x.shape == (3, 16, 16)
    t = ev.targets()
    assert t["mask"].shape == (3, 16, 16) and t["mask"].dtype == torch.uint8
    assert t["depth"].shape == (3, 16, 16)


def test_folder_without_annotation_for_an_image_is_named(tmp_path) -> None:
    _write_folder(tmp_path, n=2)
    (tmp_path / "annotations/training/im1.png").unlink()
    with pytest.raises(FileNotFoundError, match="im1.jpg"):
        SegFolderDataset(tmp_path, "train")


def test_data_without_masks_or_depth_is_rejected() -> None:
    items = [(Image.new("RGB", (8, 8)), 3)] * 2  # classification items: (image, target)
    with pytest.raises(ValueError, match="'digits@val' has no masks/depth"):
        DenseEvalDataset(items, 16, spec="digits@val").targets()
    empty = [(Image.new("RGB", (8, 8)), 3, {})] * 2  # dense dict without mask/depth
    with pytest.raises(ValueError, match="has no masks/depth"):
        DenseEvalDataset(empty, 16, spec="x").targets()


def _dense_problem(n: int, seed: int):
    """Patch features (4×4 grid) that one-hot encode the class of each patch; masks at 8×8."""
    g = torch.Generator().manual_seed(seed)
    classes = torch.randint(0, 3, (n, 4, 4), generator=g)
    feats = torch.nn.functional.one_hot(classes, 3).float() * 3 + 0.1 * torch.randn(n, 4, 4, 3, generator=g)
    patches = torch.cat([feats, torch.randn(n, 4, 4, 5, generator=g)], dim=-1).reshape(n, 16, 8)
    masks = classes.repeat_interleave(2, 1).repeat_interleave(2, 2).to(torch.uint8)
    depth = (1.0 + classes.float()).repeat_interleave(2, 1).repeat_interleave(2, 2)
    fs = FeatureSet(width=8, cls=patches.mean(1, keepdim=True), labels=torch.zeros(n, dtype=torch.long),
                    indices=torch.arange(n), patches=patches, grid=(4, 4))
    return fs, {"mask": masks, "depth": depth}


def test_probes_learn_patch_aligned_targets() -> None:
    tr, tr_t = _dense_problem(48, seed=0)
    te, te_t = _dense_problem(16, seed=1)
    cfg = DenseProbeConfig(epochs=30, batch_size=8, lr=3e-2)
    res = run_dense({8: tr}, {8: te}, tr_t, te_t, ("seg", "depth"), None, cfg)[8]
    # Margins leave room for bilinear upsampling at class borders; chance mIoU would be ~33 %.
    assert res["seg_miou"] > 90 and res["seg_pixel_acc"] > 90
    # Depth 1..3 uniform per patch (std 0.82, i.e. the RMSE of predicting the mean); the linear head
    # cannot be sharp across patch borders after bilinear upsampling, hence not ~0.
    assert res["depth_rmse"] < 0.5 and res["depth_absrel"] < 0.25


def test_requested_task_without_targets_is_rejected() -> None:
    tr, tr_t = _dense_problem(4, seed=0)
    with pytest.raises(ValueError, match="'depth' targets"):
        run_dense({8: tr}, {8: tr}, {"mask": tr_t["mask"]}, {"mask": tr_t["mask"]}, ("seg", "depth"))


def test_eval_targets_are_the_data_paths_dense_transform() -> None:
    """Dense eval resizes exactly like veca_ssl.data's DenseEvalTransform (mask nearest, depth bilinear),
    and targets follow the feature rows' dataset indices."""
    from veca_ssl.data import build_dataset
    from veca_ssl.data.transforms import DenseEvalTransform

    spec = "synthetic:n=6,size=20,classes=3"
    joint = build_dataset(spec, transform=DenseEvalTransform(16))
    ev = DenseEvalDataset(build_dense_dataset(spec), 16, spec)
    order = [4, 0, 5, 2]
    t = ev.targets(order)
    for row, i in enumerate(order):
        image, _, dense = joint[i]
        torch.testing.assert_close(t["mask"][row].long(), dense["mask"])
        torch.testing.assert_close(t["depth"][row], dense["depth"])  # bilinear, not nearest
        torch.testing.assert_close(ev[i][0], image)
    nearest = torch.from_numpy(np.array(Image.fromarray(build_dense_dataset(spec)[0][2]["depth"]).resize(
        (16, 16), Image.NEAREST)))
    assert not torch.allclose(ev.targets([0])["depth"][0], nearest)  # the old nearest resize differs


def test_unreadable_and_oversized_images_are_left_out_and_listed(tmp_path, capsys) -> None:
    """Dense eval decodes like the rest of the data path: a corrupt image and one above the pixel limit
    are skipped and counted (never a traceback); a damaged annotation is one message naming it."""
    import json

    from eval.cli import main as eval_main

    _write_folder(tmp_path / "d", n=6)
    (tmp_path / "d/images/training/im1.jpg").write_bytes(b"not a jpeg")
    Image.new("1", (10_000, 9_000)).save(tmp_path / "d/images/training/im2.jpg".replace(".jpg", ".png"))
    (tmp_path / "d/images/training/im2.jpg").unlink()  # im2 is now a 90-megapixel PNG (a few kB on disk)
    args = ["dense", "--model", "veca_tiny", "--patch-size", "8", "--num-cores", "8", "--model-arg", "depth=1", "--train",
            f"folder:{tmp_path / 'd'}@train", "--test", f"folder:{tmp_path / 'd'}@train", "--resolution", "16",
            "--no-speed", "--no-progress", "--max-skip-fraction", "0.5", "--output-dir", str(tmp_path / "out")]
    assert eval_main(args) == 0, capsys.readouterr().err
    skips = json.loads((tmp_path / "out" / "dense" / "report.json").read_text())["data_skips"]
    assert skips["dense_train"]["skipped"] == 2 and skips["dense_train"]["skipped_indices"] == [1, 2]
    assert any("too large" in line for line in skips["dense_train"]["first"])

    (tmp_path / "d/annotations/training/im0.png").write_bytes(b"broken")
    assert eval_main([*args[:-1], str(tmp_path / "out2")]) == 2
    err = capsys.readouterr().err
    assert "annotation" in err and "im0.png" in err and "Traceback" not in err
