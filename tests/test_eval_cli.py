"""End-to-end ``veca eval …`` / ``veca extract`` on the embedded datasets with a tiny backbone."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from eval import evaluate
from eval.cli import main as eval_main
from eval.config import EvalConfigError, load_config
from eval.extract import read_features
from eval.extract_cli import main as extract_main
from veca_ssl import CONFIG_DIR
from veca_ssl.models import build_backbone, save_backbone

TINY_ARGS = ["--model", "veca_tiny", "--patch-size", "8", "--num-cores", "16", "--model-arg", "depth=2",
             "--model-arg", "embed_dim=64", "--model-arg", "num_heads=2", "--resolution", "32", "--no-speed",
             "--bootstrap", "200"]
SYN = "synthetic:n=24,val_n=12,size=32,classes=3"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = build_backbone("veca_tiny", patch_size=8, num_cores=16, depth=2, embed_dim=64, num_heads=2)
    return save_backbone(model, tmp_path_factory.mktemp("ckpt") / "teacher.safetensors")


def test_eval_all_on_digits_config_writes_one_row_per_width(tmp_path, checkpoint) -> None:
    cfg = load_config(CONFIG_DIR / "eval" / "digits.yaml", [
        f"checkpoint={checkpoint}", f"output_dir={tmp_path}", "linear.epochs=2", "linear.epoch_length=15",
        "logreg.cs=[1.0]", "speed.warmup=0", "speed.repeats=1", "bootstrap=100",
        "reference={model: vit_tiny, model_args: {patch_size: 8, depth: 2, embed_dim: 64, num_heads: 2}}"])
    assert cfg.resolution == 32 and cfg.datasets.train == "digits@train" and cfg.datasets.test == "digits@val"
    rows = evaluate(cfg).rows
    assert [r["width"] for r in rows] == ["C8", "C16", "dense"]  # every width + the dense reference
    doc = json.loads((tmp_path / "all" / "report.json").read_text())
    assert [r["num_cores"] for r in doc["rows"]] == [8, 16, None]
    assert [r["reference"] for r in doc["rows"]] == [False, False, True]
    for r in doc["rows"]:
        for key in ("knn_k20_top1", "knn_k200_top5", "linear_top1", "logreg_top1", "gflops", "latency_ms",
                    "images_per_s"):
            assert r[key] is not None, key
        assert r["knn_k20_top1"] > 20  # 10 classes: even random-init features beat chance (10 %)
        for metric in ("knn_k20_top1", "linear_top1", "logreg_top1"):  # intervals around every accuracy
            assert r[f"{metric}_ci_lo"] <= r[metric] <= r[f"{metric}_ci_hi"]
        assert r["linear_iterations"] == 2 * 15
    assert doc["config"]["checkpoint"] == str(checkpoint) and doc["resolution"] == 32
    assert (tmp_path / "all" / "report.png").stat().st_size > 0 and (tmp_path / "all" / "report.csv").exists()
    # config.yaml next to the report is a complete eval config: it loads back to the same options
    again = load_config(tmp_path / "all" / "config.yaml")
    assert again.linear == cfg.linear and again.datasets == cfg.datasets and again.resolution == 32


def test_eval_all_rejects_unknown_keys_and_missing_checkpoints(tmp_path) -> None:
    cfg_file = CONFIG_DIR / "eval" / "digits.yaml"
    with pytest.raises(EvalConfigError, match="unknown key 'knn_k'"):
        load_config(cfg_file, ["knn_k=3"])
    with pytest.raises(EvalConfigError, match=r"unknown key 'knn.kk'; valid keys of knn: ks, temperature"):
        load_config(cfg_file, ["knn.kk=3"])
    with pytest.raises(EvalConfigError, match="protocols: 'segment' is not one of knn, linear, logreg, dense"):
        load_config(cfg_file, ["protocols=[knn,segment]"])
    cfg = load_config(cfg_file, [f"checkpoint={tmp_path}/missing.safetensors", f"output_dir={tmp_path}/o"])
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        evaluate(cfg)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("protocol", ["knn", "linear", "logreg"])
def test_classification_cli_on_unlabelled_npz_names_the_dataset(tmp_path, protocol, capsys) -> None:
    path = tmp_path / "unlabelled.npz"
    np.savez(path, images=np.zeros((4, 32, 32, 3), dtype=np.uint8))  # no "labels" key
    assert eval_main([protocol, *TINY_ARGS, "--train", f"npz:{path}", "--test", f"{SYN}@val",
                      "--output-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"veca eval {protocol}: error: dataset 'npz:{path}' has no labels" in err and "Traceback" not in err
    # the traceback is kept in the run's log, not shown
    assert "Traceback" in (tmp_path / "o" / protocol / "eval.log").read_text()


def test_knn_and_linear_cli_on_synthetic_write_their_own_directories(tmp_path) -> None:
    out = str(tmp_path / "ev")
    assert eval_main(["knn", *TINY_ARGS, "--widths", "8", "--train", f"{SYN}@train", "--test", f"{SYN}@val",
                      "--output-dir", out]) == 0
    rows = json.loads((tmp_path / "ev" / "knn" / "report.json").read_text())["rows"]
    assert [r["width"] for r in rows] == ["C8"] and "knn_k10_top1" in rows[0]
    assert eval_main(["linear", *TINY_ARGS, "--train", f"{SYN}@train", "--test", f"{SYN}@val", "--epochs", "2",
                      "--output-dir", out]) == 0
    rows = json.loads((tmp_path / "ev" / "linear" / "report.json").read_text())["rows"]
    assert [r["width"] for r in rows] == ["C8", "C16"] and all(0 <= r["linear_top1"] <= 100 for r in rows)
    # Default length: 2 epochs of one pass over the 22 items left after holding out 10% (batch 128: 1 step),
    # raised to the floor of 125 iterations per epoch
    assert all(r["linear_iterations"] == 2 * 125 for r in rows)
    # the first protocol's report is still there, untouched
    assert json.loads((tmp_path / "ev" / "knn" / "report.json").read_text())["protocols"] == "knn"


def test_dense_cli_on_synthetic_and_on_data_without_masks(tmp_path, capsys) -> None:
    assert eval_main(["dense", *TINY_ARGS, "--train", f"{SYN}@train", "--test", f"{SYN}@val", "--epochs", "2",
                      "--output-dir", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "dense" / "report.json").read_text())["rows"]
    assert [r["width"] for r in rows] == ["C8", "C16"]
    for r in rows:
        assert 0 <= r["seg_miou"] <= 100 and r["depth_rmse"] > 0 and r["depth_absrel"] > 0
        assert r["seg_miou_ci_lo"] <= r["seg_miou"] <= r["seg_miou_ci_hi"]
        assert r["depth_rmse_ci_lo"] <= r["depth_rmse"] <= r["depth_rmse_ci_hi"]
    capsys.readouterr()
    assert eval_main(["dense", *TINY_ARGS, "--train", "digits@val", "--test", "digits@val",
                      "--output-dir", str(tmp_path / "d")]) == 2
    assert "'digits@val' has no masks/depth" in capsys.readouterr().err


def test_progress_lines_reach_the_log(tmp_path) -> None:
    """Extraction, probe training and k-NN each log progress lines (bars need a terminal, logs do not)."""
    assert eval_main(["knn", *TINY_ARGS, "--train", f"{SYN}@train", "--test", f"{SYN}@val",
                      "--output-dir", str(tmp_path)]) == 0
    assert eval_main(["linear", *TINY_ARGS, "--train", f"{SYN}@train", "--test", f"{SYN}@val", "--epochs", "3",
                      "--output-dir", str(tmp_path)]) == 0
    knn_log = (tmp_path / "knn" / "eval.log").read_text()
    lin_log = (tmp_path / "linear" / "eval.log").read_text()
    assert knn_log.count("veca_ssl.progress: extract: done") == 2  # train and test sets
    assert "veca_ssl.progress: k-NN: done" in knn_log
    assert "veca_ssl.progress: linear probe C8: done" in lin_log and "(375 x step)" in lin_log


def test_extract_cli_writes_a_readable_manifest(tmp_path) -> None:
    out = tmp_path / "feats"
    args = TINY_ARGS[:-3]  # extract has no --speed or --bootstrap
    assert extract_main([*args, "--data", f"{SYN}@val", "--width", "8", "--shard-size", "5", "--patches",
                         "--output-dir", str(out), "--no-progress"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["count"] == 12 and len(manifest["shards"]) == 3 and manifest["dataset"] == f"{SYN}@val"
    arrays = read_features(out)
    assert arrays["image"].shape == (12, 64) and arrays["patches"].shape == (12, 16, 64)
    np.testing.assert_array_equal(arrays["labels"], np.arange(12) % 3)
