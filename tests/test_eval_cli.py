"""End-to-end ``veca eval …`` / ``veca extract`` on the embedded datasets with a tiny backbone."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from eval.all import load_config, run_all
from eval.cli import main as eval_main
from eval.extract import main as extract_main
from eval.extract import read_features
from veca_ssl import CONFIG_DIR
from veca_ssl.models import build_backbone, save_backbone

TINY_ARGS = ["--model", "veca_tiny", "--patch-size", "8", "--num-cores", "16", "--model-arg", "depth=2",
             "--model-arg", "embed_dim=64", "--model-arg", "num_heads=2", "--resolution", "32", "--no-speed"]
SYN = "synthetic:n=24,val_n=12,size=32,classes=3"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = build_backbone("veca_tiny", patch_size=8, num_cores=16, depth=2, embed_dim=64, num_heads=2)
    return save_backbone(model, tmp_path_factory.mktemp("ckpt") / "teacher.safetensors")


def test_eval_all_on_digits_config_writes_one_row_per_width(tmp_path, checkpoint) -> None:
    cfg = load_config(CONFIG_DIR / "eval" / "digits.yaml", [
        f"checkpoint={checkpoint}", f"output_dir={tmp_path}", "linear.epochs=2", "linear.epoch_length=15",
        "logreg.cs=[1.0]", "speed.warmup=0", "speed.repeats=1",
        "reference={model: vit_tiny, model_args: {patch_size: 8, depth: 2, embed_dim: 64, num_heads: 2}}"])
    assert cfg.resolution == 32 and cfg.datasets.train == "digits@train" and cfg.datasets.test == "digits@val"
    rows = run_all(cfg)
    assert [r["width"] for r in rows] == ["C=8", "C=16", "dense"]  # every budget + the dense reference
    doc = json.loads((tmp_path / "report.json").read_text())
    assert [r["num_cores"] for r in doc["rows"]] == [8, 16, None]
    assert [r["reference"] for r in doc["rows"]] == [False, False, True]
    for r in doc["rows"]:
        for key in ("knn_k20_top1", "knn_k200_top5", "linear_top1", "logreg_top1", "gflops", "latency_ms",
                    "images_per_s"):
            assert r[key] is not None, key
        assert r["knn_k20_top1"] > 20  # 10 classes: even random-init features beat chance (10 %)
    assert (tmp_path / "report.png").stat().st_size > 0 and (tmp_path / "report.csv").exists()


def test_eval_all_rejects_unknown_keys_and_missing_checkpoints(tmp_path) -> None:
    cfg_file = CONFIG_DIR / "eval" / "digits.yaml"
    with pytest.raises(ValueError, match="knn_k"):
        load_config(cfg_file, ["knn_k=3"])
    with pytest.raises(ValueError, match="knn.kk"):
        load_config(cfg_file, ["knn.kk=3"])
    with pytest.raises(ValueError, match="unknown protocol"):
        load_config(cfg_file, ["protocols=[knn,segment]"])
    cfg = load_config(cfg_file, [f"checkpoint={tmp_path}/missing.safetensors", f"output_dir={tmp_path}/o"])
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        run_all(cfg)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("protocol", ["knn", "linear", "logreg"])
def test_classification_cli_on_unlabelled_npz_names_the_dataset(tmp_path, protocol) -> None:
    path = tmp_path / "unlabelled.npz"
    np.savez(path, images=np.zeros((4, 32, 32, 3), dtype=np.uint8))  # no "labels" key
    with pytest.raises(ValueError, match=rf"'npz:{path}' has no labels"):
        eval_main([protocol, *TINY_ARGS, "--train", f"npz:{path}", "--test", f"{SYN}@val",
                   "--output-dir", str(tmp_path / "o")])


def test_knn_and_linear_cli_on_synthetic(tmp_path) -> None:
    assert eval_main(["knn", *TINY_ARGS, "--widths", "8", "--train", f"{SYN}@train", "--test", f"{SYN}@val",
                      "--output-dir", str(tmp_path / "knn")]) == 0
    rows = json.loads((tmp_path / "knn" / "report.json").read_text())["rows"]
    assert [r["width"] for r in rows] == ["C=8"] and "knn_k10_top1" in rows[0]
    assert eval_main(["linear", *TINY_ARGS, "--train", f"{SYN}@train", "--test", f"{SYN}@val", "--epochs", "2",
                      "--epoch-length", "0", "--output-dir", str(tmp_path / "lin")]) == 0
    rows = json.loads((tmp_path / "lin" / "report.json").read_text())["rows"]
    assert [r["width"] for r in rows] == ["C=8", "C=16"] and all(0 <= r["linear_top1"] <= 100 for r in rows)


def test_dense_cli_on_synthetic_and_on_data_without_masks(tmp_path) -> None:
    assert eval_main(["dense", *TINY_ARGS, "--train", f"{SYN}@train", "--test", f"{SYN}@val", "--epochs", "2",
                      "--output-dir", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "report.json").read_text())["rows"]
    assert [r["width"] for r in rows] == ["C=8", "C=16"]
    for r in rows:
        assert 0 <= r["seg_miou"] <= 100 and r["depth_rmse"] > 0 and r["depth_absrel"] > 0
    with pytest.raises(ValueError, match="'digits@val' has no masks/depth"):
        eval_main(["dense", *TINY_ARGS, "--train", "digits@val", "--test", "digits@val",
                   "--output-dir", str(tmp_path / "d")])


def test_extract_cli_writes_a_readable_manifest(tmp_path) -> None:
    out = tmp_path / "feats"
    args = [a for a in TINY_ARGS if a != "--no-speed"]
    assert extract_main([*args, "--data", f"{SYN}@val", "--width", "8", "--shard-size", "5", "--patches",
                         "--output-dir", str(out), "--no-progress"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["count"] == 12 and len(manifest["shards"]) == 3 and manifest["dataset"] == f"{SYN}@val"
    arrays = read_features(out)
    assert arrays["image"].shape == (12, 64) and arrays["patches"].shape == (12, 16, 64)
    np.testing.assert_array_equal(arrays["labels"], np.arange(12) % 3)
