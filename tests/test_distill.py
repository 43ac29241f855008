"""Distillation from a frozen teacher: learning signal, grid alignment, bad teachers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from veca_ssl.config import ConfigError, load_config
from veca_ssl.loss.distill import resample_patch_grid
from veca_ssl.train.distill_report import feature_cosines
from veca_ssl.train.loop import build_method, build_model, train

COMMON = [
    "model.patch_size=8", "model.overrides={embed_dim: 32, depth: 2, num_heads: 2}",
    "data.train=synthetic:n=64,size=32,classes=4,seed=0", "data.num_workers=0",
    "crops.global_size=32", "crops.local_size=16", "crops.num_local=0",
    "optim.batch_size_per_gpu=8", "optim.warmup_epochs=0", "optim.lr_scaling=none",
    "optim.freeze_last_layer_epochs=0", "train.progress=false", "train.checkpoint_every=100",
    "dino.head_out_dim=64", "dino.head_hidden_dim=64", "dino.head_bottleneck_dim=32", "ibot.head_out_dim=64",
]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    """A tiny dense ViT pretrained with `veca train` (self-supervised, a few steps)."""
    out = tmp_path_factory.mktemp("teacher")
    train(load_config(None, COMMON + ["model.name=vit_tiny", "optim.epochs=2", "optim.base_lr=0.002", "seed=1",
                                      f"output_dir={out}"]))
    return out


def distill_cfg(tmp_path: Path, teacher: Path, *extra: str):
    return load_config(None, COMMON + [
        "mode=distill", "model.name=veca_tiny", "model.num_cores=16", f"distill.teacher={teacher}",
        "optim.epochs=4", "optim.base_lr=0.003", "optim.momentum_teacher=0.0", "optim.final_momentum_teacher=0.0",
        "widths.policy=sandwich", f"output_dir={tmp_path / 'student'}", *extra])


def test_short_distillation_raises_cosine_at_every_width(tmp_path, teacher_dir):
    cfg = distill_cfg(tmp_path, teacher_dir)
    torch.manual_seed(cfg.seed)
    method = build_method(cfg, build_model(cfg))  # the initial student, as train() builds it
    from veca_ssl.data import build_dataset, make_eval_transform

    data = build_dataset("synthetic:n=64,size=32,classes=4,seed=0", dense=False)
    images = torch.stack([make_eval_transform(32)(data[i][0]) for i in range(16)])  # the training distribution
    before = feature_cosines(method, images, [8, 16])
    train(cfg)
    from veca_ssl.train.checkpoint import CheckpointManager

    state = CheckpointManager.load(CheckpointManager(tmp_path / "student" / "checkpoints").latest())
    method.teacher.load_state_dict(state["teacher"])  # momentum 0: the EMA copy is the student
    after = feature_cosines(method, images, [8, 16])
    for w in (8, 16):
        assert after[w]["cls_cos"] > before[w]["cls_cos"] + 0.5, (w, before[w], after[w])
        assert after[w]["patch_cos"] > before[w]["patch_cos"] + 0.3, (w, before[w], after[w])
    assert (tmp_path / "student" / "export" / "teacher.safetensors").exists()


def test_truncated_or_missing_teacher_fails_before_any_work(tmp_path, teacher_dir):
    weights = teacher_dir / "export" / "teacher.safetensors"
    broken = tmp_path / "broken"
    (broken / "export").mkdir(parents=True)
    (broken / "export" / "teacher.safetensors").write_bytes(weights.read_bytes()[:200])
    (broken / "export" / "teacher.json").write_bytes((teacher_dir / "export" / "teacher.json").read_bytes())
    with pytest.raises(ValueError, match="truncated"):
        train(distill_cfg(tmp_path, broken))
    with pytest.raises(ConfigError, match=r"distill.teacher=\S*nowhere.pth does not exist"):
        train(distill_cfg(tmp_path, tmp_path / "nowhere.pth"))
    assert not (tmp_path / "student").exists()


def test_teacher_patch_lands_under_the_student_patch_covering_the_same_pixels():
    """/14 teacher at 224 px (16x16 grid) -> /16 student (14x14): each student patch receives the
    teacher map evaluated at its own pixel centre (the map here is the pixel coordinate itself)."""
    t_centres = (torch.arange(16) + 0.5) * 14  # teacher patch centres in pixels
    ty, tx = torch.meshgrid(t_centres, t_centres, indexing="ij")
    teacher = torch.stack([ty, tx], -1).reshape(1, 256, 2)
    out = resample_patch_grid(teacher, (16, 16), (14, 14)).reshape(14, 14, 2)
    s_centres = (torch.arange(14) + 0.5) * 16
    sy, sx = torch.meshgrid(s_centres, s_centres, indexing="ij")
    inner = slice(1, 13)  # bilinear reproduces an affine map exactly away from the clamped border
    assert torch.allclose(out[inner, inner, 0], sy[inner, inner], atol=1e-4)
    assert torch.allclose(out[inner, inner, 1], sx[inner, inner], atol=1e-4)


def test_centered_cosine_against_direct_formula():
    import torch.nn.functional as F

    from veca_ssl.loss import DistillationLoss

    torch.manual_seed(0)
    s, t = torch.randn(4, 8), torch.randn(4, 8) + 5  # a teacher with a large shared component
    sp, tp = torch.randn(4, 3, 8), torch.randn(4, 3, 8) + 5
    out = DistillationLoss(center_features=True)(s, sp, t, tp)
    mc, mp = t.mean(0), tp.mean((0, 1))
    assert torch.allclose(out["distill_cls_cos"], 1 - F.cosine_similarity(s - mc, t - mc, dim=-1).mean())
    assert torch.allclose(out["distill_patch_cos"], 1 - F.cosine_similarity(sp - mp, tp - mp, dim=-1).mean())
    assert torch.allclose(out["distill_patch_mse"], F.mse_loss(sp, tp))  # MSE ignores the centring
    raw = DistillationLoss()(s, sp, t, tp)
    assert not torch.allclose(raw["distill_cls_cos"], out["distill_cls_cos"])


def test_distillation_starts_from_init_from_weights(tmp_path, teacher_dir):
    """model.init_from holds in distillation as in self-supervised training: one start for every mode."""
    from veca_ssl.models import save_backbone
    from veca_ssl.train.lock import RunLock
    from veca_ssl.train.loop import setup

    torch.manual_seed(7)
    source = build_model(distill_cfg(tmp_path, teacher_dir))
    path = save_backbone(source, tmp_path / "init.safetensors")
    cfg = distill_cfg(tmp_path, teacher_dir, f"model.init_from={path}")
    try:
        run = setup(cfg)
        student = run.method.backbone.state_dict()
    finally:
        RunLock.release_held(cfg.output_dir)
    for name, value in source.state_dict().items():
        assert torch.equal(student[name], value), name
