"""Distillation from a frozen dense teacher into a nested-core VECA student (SPEC §3.2).

The VECA paper's recipe: the student runs at the sampled budget(s), the frozen teacher once per
batch (no gradients; bf16 on CUDA; optionally micro-batched), and the losses are image-feature
cosine + patch-feature cosine + patch MSE (``veca_ssl.loss.DistillationLoss``). The teacher's patch
grid is resampled onto the student's when patch sizes or resolutions differ (a /14 teacher and a /16
student cover the same pixels), and learnable projections bridge different widths.

As in self-supervised training, ``teacher`` is the EMA of the student (the weights that are exported
and evaluated); the external network is ``frozen_teacher``.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from veca_ssl.loss import DistillationLoss
from veca_ssl.loss.distill import resample_patch_grid
from veca_ssl.models import load_backbone
from veca_ssl.models.base import Backbone


class DistillStudentNet(nn.Module):
    """The student backbone; one forward = every budget of the step (one DDP forward per backward)."""

    def __init__(self, backbone: Backbone) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, images: Tensor, budgets: Sequence[int | None]) -> list[dict]:
        return [self.backbone.forward_features(images, num_cores=c) for c in budgets]


def load_frozen_teacher(cfg) -> Backbone:
    kwargs = {"arch": cfg.distill.teacher_arch} if cfg.distill.teacher_arch else {}
    teacher = load_backbone(cfg.distill.teacher, **kwargs)
    teacher.eval().requires_grad_(False)
    return teacher


class ElasticDistillation(nn.Module):
    def __init__(self, cfg, backbone: Backbone, frozen_teacher: Backbone | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        backbone.mask_token.requires_grad_(False)  # no masking in distillation (DDP needs every grad)
        self.student = DistillStudentNet(backbone)
        self.teacher = copy.deepcopy(self.student)  # EMA of the student
        self.teacher.requires_grad_(False)
        self.frozen_teacher = frozen_teacher if frozen_teacher is not None else load_frozen_teacher(cfg)
        d = cfg.distill
        self.loss = DistillationLoss(d.cls_weight, d.patch_cos_weight, d.patch_mse_weight,
                                     student_dim=backbone.embed_dim, teacher_dim=self.frozen_teacher.embed_dim,
                                     normalize_mse_target=d.normalize_mse_target,
                                     center_features=d.center_features)
        self.teacher_resolution = self.teacher_size(cfg.crops.global_size)

    def teacher_size(self, student_size: int) -> int:
        """The teacher's input side: ``distill.teacher_resolution`` or the student's (multi-resolution
        batches included), rounded to a multiple of the teacher's patch size."""
        tp = self.frozen_teacher.patch_size
        size = self.cfg.distill.teacher_resolution or student_size
        return max(tp, round(size / tp) * tp)

    @property
    def student_module(self) -> DistillStudentNet:
        return getattr(self.student, "module", self.student)

    def extra_parameters(self) -> list[nn.Parameter]:
        """Learnable width projections of the loss (trained with the student)."""
        return list(self.loss.parameters())

    def loss_state(self) -> dict:
        return {"distill": self.loss.state_dict()}

    def load_loss_state(self, state: dict) -> None:
        self.loss.load_state_dict(state["distill"])

    def update_centers(self) -> None:  # no centring in distillation
        return None

    @torch.no_grad()
    def teacher_features(self, images: Tensor) -> dict:
        """Frozen-teacher features, micro-batched, bf16 on CUDA, at the teacher's resolution."""
        size = self.teacher_size(images.shape[-1])
        if images.shape[-2:] != (size, size):
            images = F.interpolate(images, size=(size, size), mode="bicubic", align_corners=False)
        chunk = self.cfg.distill.teacher_batch_size or images.shape[0]
        use_bf16 = images.device.type == "cuda"
        cls, patches, grid = [], [], None
        for part in images.split(chunk):
            with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=use_bf16):
                out = self.frozen_teacher.forward_features(part)
            cls.append(out["cls"].float())
            patches.append(out["patches"].float())
            grid = out["grid"]
        return {"cls": torch.cat(cls), "patches": torch.cat(patches), "grid": grid}

    def forward(self, batch: dict, budgets: Sequence[int | None], teacher_temp: float | None = None) -> dict:
        images = batch["global_crops"]
        t = self.teacher_features(images)
        student_outs = self.student(images, budgets)
        terms: dict[str, Tensor] = {}
        total = images.new_zeros(())
        for c, s in zip(budgets, student_outs):
            t_patches = resample_patch_grid(t["patches"], t["grid"], s["grid"])
            losses = self.loss(s["cls"], s["patches"], t["cls"], t_patches)
            total = total + sum(losses.values())
            for name, value in losses.items():
                terms[name] = terms.get(name, 0.0) + value.detach()
                if len(budgets) > 1:
                    terms[f"{name}_C{c}"] = value.detach()
        terms["loss"] = total
        return terms
