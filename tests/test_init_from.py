"""``model.init_from``: start a fresh backbone from ours, reference VECA or dense-teacher weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.test_convert import make_state
from tests.test_reference_veca import checkpoint, reference_state
from tests.test_train import tiny_cfg
from veca_ssl.config import ConfigError
from veca_ssl.models import build_backbone, load_backbone, save_backbone
from veca_ssl.models.init import init_from
from veca_ssl.train.loop import train


def _tiny(**kw):
    return build_backbone("veca_tiny", patch_size=8, embed_dim=32, num_heads=2, depth=2, **kw)


def test_our_weights_load_unchanged_and_a_bank_can_shrink_or_grow(tmp_path):
    torch.manual_seed(1)
    source = _tiny(num_cores=16)
    path = save_backbone(source, tmp_path / "src.safetensors")
    torch.manual_seed(2)
    target = _tiny(num_cores=16)
    report = init_from(target, path)
    assert report.fmt == "veca-ssl" and not report.converted and not report.new and not report.unused
    assert len(report.loaded) == len(source.state_dict())
    for k, v in source.state_dict().items():
        assert torch.equal(target.state_dict()[k], v), k

    torch.manual_seed(3)
    bigger = _tiny(num_cores=24)
    fresh_tail = bigger.cores[16:].detach().clone()
    report = init_from(bigger, path)
    assert torch.equal(bigger.cores[:16], source.cores) and torch.equal(bigger.cores[16:], fresh_tail)
    assert "16 cores into the first rows of 24" in report.converted["cores"]
    smaller = _tiny(num_cores=8)
    report = init_from(smaller, path)
    assert torch.equal(smaller.core_coords, source.core_coords[:8]) and "first 8 of 16" in report.converted["cores"]


def test_reference_weights_convert_and_report_new_and_unused_tensors(tmp_path):
    sd = reference_state("small", depth=2, out_dim=768, seed=7)
    path = tmp_path / "ref.pt"
    torch.save(checkpoint(sd, "small", "module.student", distill_output_dim=768), path)
    torch.manual_seed(0)
    target = build_backbone("veca_small", depth=2)  # our preset: no output projection
    report = init_from(target, path)
    assert report.fmt == "veca-reference" and not report.loaded
    assert report.new == ["mask_token"] and report.unused == ["output_proj.bias", "output_proj.weight"]
    assert "q/k head halves swapped" in report.converted["blocks.0.attn.qkv.weight"]
    assert report.config_differences["output_dim"] == (768, None)
    summary = report.summary()
    assert "converted" in summary and "newly initialised: mask_token" in summary and "output_proj.weight" in summary
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():  # the same native function as the reference model
        ref = load_backbone(path).forward_features(images, num_cores=16)["patches"]
        assert torch.allclose(target.eval().forward_features(images, num_cores=16)["patches"], ref, atol=1e-6)


def test_dense_teacher_into_a_vit_baseline_resamples_positions_and_names_misfits(tmp_path):
    path = tmp_path / "dinov2.pth"
    torch.save(make_state("dinov2", patch=16, grid=4, layerscale=True), path)
    # the baseline made to match the teacher's layout (GELU MLP, layer-scale, 1e-6), at another grid
    target = build_backbone("vit_tiny", embed_dim=64, num_heads=2, depth=2, ffn_layer="mlp", layerscale_init=1e-5,
                            norm_eps=1e-6, pos_embed_grid=2)
    report = init_from(target, path, num_heads=2)  # 64-d: no standard head count to infer
    assert report.fmt == "dinov2" and "resampled from a 4x4 to a 2x2 grid" in report.converted["pos_embed"]
    assert not report.new and target.pos_embed.shape == (1, 5, 64)
    with pytest.raises(ValueError, match=r"do not fit this model: blocks.0.mlp.w12.weight.*ffn_layer='mlp' \(this "
                                         r"model 'swiglu'\)"):
        init_from(build_backbone("vit_tiny", embed_dim=64, num_heads=2, depth=2), path, num_heads=2)


def test_ssl_training_starts_from_the_given_weights(tmp_path, capsys):
    torch.manual_seed(123)
    source = _tiny(num_cores=16)
    path = save_backbone(source, tmp_path / "init.safetensors")
    # EMA momentum 1: the teacher stays the copy of the student taken at the start, so the exported
    # teacher is exactly the initial weights
    cfg = tiny_cfg(tmp_path, f"model.init_from={path}", "train.max_steps=1", "optim.momentum_teacher=1.0",
                   "optim.final_momentum_teacher=1.0")
    train(cfg)
    assert "init_from" in capsys.readouterr().out
    exported = load_file(str(Path(cfg.output_dir) / "export" / "teacher.safetensors"))
    for k, v in source.state_dict().items():
        assert torch.equal(exported[k], v), k
    # the control: without init_from the run starts elsewhere
    cfg2 = tiny_cfg(tmp_path / "b", "train.max_steps=1", "optim.momentum_teacher=1.0",
                    "optim.final_momentum_teacher=1.0")
    train(cfg2)
    other = load_file(str(Path(cfg2.output_dir) / "export" / "teacher.safetensors"))
    assert not torch.equal(other["cores"], source.cores)


def test_init_from_config_errors_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match=r"model.init_from='.*nope.pt' does not exist"):
        tiny_cfg(tmp_path, f"model.init_from={tmp_path / 'nope.pt'}")
    wrong = save_backbone(build_backbone("veca_tiny", patch_size=8, depth=1), tmp_path / "wide.safetensors")
    with pytest.raises(ConfigError, match=r"model.init_from: init_from .* do not fit this model.*embed_dim=192"):
        train(tiny_cfg(tmp_path, f"model.init_from={wrong}"))
    assert not (tmp_path / "run" / "checkpoints").exists()  # stopped before any training step


def test_final_table_baseline_is_the_network_training_started_from(tmp_path):
    # with init_from, "before training" means those weights, not a random init: else a fine-tuning run
    # would be compared with a network it never was
    from veca_ssl.train.monitor import KnnMonitor

    torch.manual_seed(123)
    source = _tiny(num_cores=16)
    path = save_backbone(source, tmp_path / "init.safetensors")
    cfg = tiny_cfg(tmp_path, f"model.init_from={path}", "train.max_steps=1", "train.knn_monitor.enabled=true",
                   "train.knn_monitor.dataset=synthetic:n=40,val_n=20,size=32,classes=4,seed=1",
                   "train.knn_monitor.resolution=32")
    monitor = KnnMonitor(cfg, torch.device("cpu"), tmp_path)
    rebuilt = monitor.untrained_backbone().state_dict()
    for k, v in source.state_dict().items():
        assert torch.equal(rebuilt[k], v), k
    summary = train(cfg)
    knn = summary["knn"]
    assert knn["start"] == "init_from"
    assert knn["before"] == json.loads((Path(cfg.output_dir) / "knn_before.json").read_text())
    header = KnnMonitor.table(knn).splitlines()[0]
    assert "k-NN initial" in header and "probe initial" in header and "untrained" not in header
    assert "model.init_from's weights" in KnnMonitor.caption(knn)
