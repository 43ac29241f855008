"""Distillation from a frozen dense teacher into a nested-core VECA student.

The VECA paper's recipe: the student runs at the sampled width(s), the frozen teacher once per
batch (no gradients; bf16 on CUDA; optionally micro-batched), and the losses are image-feature
cosine + patch-feature cosine + patch MSE (``veca_ssl.loss.DistillationLoss``). The teacher's patch
grid is resampled onto the student's when patch sizes or resolutions differ (a /14 teacher and a /16
student cover the same pixels), and learnable projections bridge different widths.

As in self-supervised training, ``teacher`` is the EMA of the student (the weights that are exported
and evaluated); the external network is ``frozen_teacher``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from veca_ssl.loss import DistillationLoss
from veca_ssl.loss.distill import resample_patch_grid
from veca_ssl.method.base import Method, bf16_autocast, ema_copy
from veca_ssl.models import load_backbone
from veca_ssl.models.base import Backbone


class DistillStudentNet(nn.Module):
    """The student backbone and the learnable projections from its width to the frozen teacher's
    (identity when the widths match); one forward = every width of the step (one DDP forward per
    backward). The projections live here, not in the loss, so that DDP averages their gradients and
    the EMA copy carries them along with the backbone."""

    def __init__(self, backbone: Backbone, teacher_dim: int) -> None:
        super().__init__()
        self.backbone = backbone
        same = backbone.embed_dim == teacher_dim
        self.cls_projection = nn.Identity() if same else nn.Linear(backbone.embed_dim, teacher_dim)
        self.patch_projection = nn.Identity() if same else nn.Linear(backbone.embed_dim, teacher_dim)

    def forward(self, images: Tensor, widths: Sequence[int | None]) -> list[dict]:
        outs = []
        for c in widths:
            f = self.backbone.forward_features(images, num_cores=c)
            outs.append({**f, "cls": self.cls_projection(f["cls"]), "patches": self.patch_projection(f["patches"])})
        return outs


def load_frozen_teacher(cfg) -> Backbone:
    kwargs = {"arch": cfg.distill.teacher_arch} if cfg.distill.teacher_arch else {}
    teacher = load_backbone(cfg.distill.teacher, **kwargs)
    teacher.eval().requires_grad_(False)
    return teacher


class ElasticDistillation(Method):
    """Distillation of a frozen dense network into a nested-width VECA student.

    ``student`` is a :class:`DistillStudentNet`; ``teacher`` its EMA copy (exported and evaluated);
    ``frozen_teacher`` the external network whose features are the targets.
    """

    def __init__(self, cfg, backbone: Backbone, frozen_teacher: Backbone | None = None) -> None:
        super().__init__(cfg)
        backbone.mask_token.requires_grad_(False)  # no masking in distillation (DDP needs every grad)
        self.frozen_teacher = frozen_teacher if frozen_teacher is not None else load_frozen_teacher(cfg)
        self.student = DistillStudentNet(backbone, self.frozen_teacher.embed_dim)
        self.teacher = ema_copy(self.student)  # EMA of the student
        d = cfg.distill
        self.loss = DistillationLoss(d.cls_weight, d.patch_cos_weight, d.patch_mse_weight,
                                     normalize_mse_target=d.normalize_mse_target,
                                     center_features=d.center_features)
        self.teacher_resolution = self.teacher_size(cfg.crops.global_size)

    def to(self, device: torch.device | str) -> ElasticDistillation:
        super().to(device)
        self.frozen_teacher.to(device)
        return self

    def teacher_size(self, student_size: int) -> int:
        """The teacher's input side: ``distill.teacher_resolution`` or the student's (multi-resolution
        batches included), rounded to a multiple of the teacher's patch size."""
        tp = self.frozen_teacher.patch_size
        size = self.cfg.distill.teacher_resolution or student_size
        return max(tp, round(size / tp) * tp)

    @torch.no_grad()
    def get_teacher_output(self, images: Tensor) -> dict:
        """Frozen-teacher features, micro-batched, at the teacher's resolution; in bf16 on CUDA (the
        reference's recipe, whatever ``train.amp`` says) and wherever ``train.amp`` asks for bf16."""
        size = self.teacher_size(images.shape[-1])
        if images.shape[-2:] != (size, size):
            images = F.interpolate(images, size=(size, size), mode="bicubic", align_corners=False)
        chunk = self.cfg.distill.teacher_batch_size or images.shape[0]
        use_bf16 = images.device.type == "cuda" or bf16_autocast(self.cfg.train.amp, images.device)
        cls, patches, grid = [], [], None
        for part in images.split(chunk):
            with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=use_bf16):
                out = self.frozen_teacher.forward_features(part)
            cls.append(out["cls"].float())
            patches.append(out["patches"].float())
            grid = out["grid"]
        return {"cls": torch.cat(cls), "patches": torch.cat(patches), "grid": grid}

    def get_student_output(self, images: Tensor, widths: Sequence[int | None]) -> list[dict]:
        """Per width: projected image feature ``cls`` and patch features, with the patch ``grid``."""
        return self.engine(images, widths)

    def compute_losses(self, widths: Sequence[int | None], student_outs: list[dict], t: dict) -> dict[str, Tensor]:
        terms: dict[str, Tensor] = {}
        total = t["cls"].new_zeros(())
        for c, s in zip(widths, student_outs):
            t_patches = resample_patch_grid(t["patches"], t["grid"], s["grid"])
            losses = self.loss(s["cls"], s["patches"], t["cls"], t_patches)
            total = total + sum(losses.values())
            for name, value in losses.items():
                terms[name] = terms.get(name, 0.0) + value.detach()
                if len(widths) > 1:
                    terms[f"{name}_C{c}"] = value.detach()
        terms["loss"] = total
        return terms

    def forward(self, batch: dict, widths: Sequence[int | None], teacher_temp: float | None = None) -> dict:
        """One step's losses. Reads ``batch["global_crops"]`` (the student's images; the frozen teacher
        sees them resized to its resolution). Returns ``"loss"`` and the detached terms
        ``"distill_cls_cos"``, ``"distill_patch_cos"``, ``"distill_patch_mse"`` (those with a non-zero
        weight), per width as ``"<term>_C{c}"`` when the step trains several widths."""
        images = batch["global_crops"]
        t = self.get_teacher_output(images)
        return self.compute_losses(widths, self.get_student_output(images, widths), t)
