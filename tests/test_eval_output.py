"""Eval outputs: one directory per run and protocol, no silent overwrite, resolution from the checkpoint."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from test_train import TINY as TRAIN_TINY  # tests/ is on sys.path (no package, pytest prepend mode)

from eval.cli import main as eval_main
from eval.common import training_resolution
from veca_ssl.config import load_config as load_train_config

SYN = "synthetic:n=24,val_n=12,size=32,classes=3"
MODEL = ["--model", "veca_tiny", "--patch-size", "8", "--num-cores", "16", "--model-arg", "depth=2",
         "--model-arg", "embed_dim=32", "--model-arg", "num_heads=2"]
FAST = ["--no-speed", "--bootstrap", "0", "--train", f"{SYN}@train", "--test", f"{SYN}@val"]


def test_no_eval_run_overwrites_another(tmp_path, capsys) -> None:
    out = ["--output-dir", str(tmp_path)]
    assert eval_main(["knn", *MODEL, "--resolution", "32", *FAST, *out]) == 0
    assert eval_main(["logreg", *MODEL, "--resolution", "32", *FAST, "--cs", "1", *out]) == 0
    knn_report = tmp_path / "knn" / "report.json"
    assert knn_report.is_file() and (tmp_path / "logreg" / "report.json").is_file()  # side by side
    before = knn_report.read_bytes()
    capsys.readouterr()

    # the same protocol again into the same directory: refused before any work, report untouched
    assert eval_main(["knn", *MODEL, "--resolution", "32", "--seed", "1", *FAST, *out]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already holds an earlier run's results; pass --overwrite" in err
    assert str(knn_report) in err and knn_report.read_bytes() == before

    # a new --name, or --overwrite, are the two ways to run it
    assert eval_main(["knn", *MODEL, "--resolution", "32", "--seed", "1", *FAST, *out, "--name", "knn-seed1"]) == 0
    assert (tmp_path / "knn-seed1" / "report.json").is_file() and knn_report.read_bytes() == before
    assert eval_main(["knn", *MODEL, "--resolution", "32", "--seed", "1", *FAST, *out, "--overwrite"]) == 0
    after = json.loads(knn_report.read_text())
    assert knn_report.read_bytes() != before  # seed 1: another random init, other numbers
    assert after["rows"] == json.loads((tmp_path / "knn-seed1" / "report.json").read_text())["rows"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A real (2-step) training run at 48 px global crops on 32 px synthetic images."""
    from veca_ssl.train.loop import train

    run = tmp_path_factory.mktemp("train") / "run"
    train(load_train_config(None, TRAIN_TINY + ["crops.global_size=48", "train.max_steps=2",
                                                "train.checkpoint_every=2", f"output_dir={run}"]))
    return run


def test_resolution_defaults_to_the_training_resolution(trained_run, tmp_path, capsys) -> None:
    export = trained_run / "export" / "teacher.safetensors"
    ckpt = sorted((trained_run / "checkpoints").glob("checkpoint-*.pt"))[-1]
    assert training_resolution(trained_run)[0] == 48  # the run directory (its config.yaml)
    assert training_resolution(export)[0] == 48  # an export inside the run
    alone = tmp_path / "moved.pt"  # a checkpoint moved out of its run: the config stored inside it
    shutil.copy(ckpt, alone)
    assert training_resolution(alone) == (48, f"{alone} (training config)")
    assert training_resolution(tmp_path / "nothing.pth") is None

    assert eval_main(["knn", "--checkpoint", str(trained_run), *FAST, "--output-dir", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "knn" / "report.json").read_text())
    assert doc["resolution"] == 48 and doc["resolution_from"].startswith("training resolution, from ")
    assert doc["rows"][0]["gflops"] is not None and doc["config"]["resolution"] == 48
    err = capsys.readouterr().err
    # 48 px on 32 px data: said, with the way out
    assert "resolution 48 (training resolution" in err and "upsamples" in err and "1.5x" in err
    assert "--resolution" in err


def test_random_init_falls_back_to_224_and_warns(tmp_path, capsys) -> None:
    assert eval_main(["knn", *MODEL, *FAST, "--widths", "8", "--output-dir", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "knn" / "report.json").read_text())
    assert doc["resolution"] == 224 and "randomly initialised" in doc["resolution_from"]
    assert "upsamples" in capsys.readouterr().err


def test_an_export_that_records_its_resolution_is_read_first(tmp_path) -> None:
    from veca_ssl.models import build_backbone, save_backbone

    model = build_backbone("veca_tiny", patch_size=8, num_cores=16, depth=1, embed_dim=32, num_heads=2)
    path = save_backbone(model, tmp_path / "anywhere" / "w.safetensors", extra={"resolution": 40})
    assert training_resolution(path) == (40, str(path.with_suffix(".json")))
    plain = save_backbone(model, tmp_path / "plain.safetensors")  # no record, not inside a run
    assert training_resolution(plain) is None


def test_reference_checkpoints_and_sharded_directories_give_their_training_resolution(trained_run, tmp_path) -> None:
    from test_reference_veca import checkpoint, reference_state

    sd = reference_state("small", depth=1)
    single = tmp_path / "veca_small.pt"  # the reference's pretraining save: one image size
    torch.save(checkpoint(sd, "small", "module", image_size=256), single)
    assert training_resolution(single) == (256, f"{single} (training config)")
    multires = tmp_path / "veca_small_ft.pt"  # its multi-resolution fine-tuning: the last phase's likeliest size
    torch.save(checkpoint(sd, "small", "module", image_size=256, resolutions=(256, 384, 512),
                          phase_b_probs={256: 0.2, 384: 0.5, 512: 0.3}), multires)
    assert training_resolution(multires)[0] == 384
    run = tmp_path / "run"  # a sharded checkpoint-<step>/ directory reads its run's config
    (run / "checkpoints" / "checkpoint-00000002").mkdir(parents=True)
    shutil.copy(trained_run / "config.yaml", run / "config.yaml")
    assert training_resolution(run / "checkpoints" / "checkpoint-00000002") == (48, str(run / "config.yaml"))
