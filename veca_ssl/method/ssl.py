"""Elastic DINO: DINO + iBOT + KoLeo self-distillation with nested core budgets (SPEC §3.1).

DINO (Caron et al. 2021, arXiv:2104.14294), iBOT (Zhou et al. 2022, arXiv:2111.07832) and the
DINOv2 recipe (Oquab et al. 2023, arXiv:2304.07193), adapted to VECA's elastic cores: the EMA
teacher always runs at the full budget and the student at the sampled budget(s), so every width
learns from the widest ("elastic self-distillation").

``ElasticDINO.forward(batch, budgets, teacher_temp)`` returns a dict of losses; backward,
clipping, the optimiser and the EMA step live in the training loop.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from veca_ssl.loss import DINOHead, DINOLoss, KoLeoLoss, iBOTPatchLoss
from veca_ssl.models.base import Backbone


class StudentTeacherNet(nn.Module):
    """Backbone + DINO head (+ optional separate iBOT head). One forward = all budgets of a step, so
    that a DDP wrapper sees exactly one forward per backward."""

    def __init__(self, backbone: Backbone, dino_head: DINOHead, ibot_head: DINOHead | None = None) -> None:
        super().__init__()
        self.backbone, self.dino_head, self.ibot_head = backbone, dino_head, ibot_head

    def forward(self, global_crops: Tensor, local_crops: Tensor, masks: Tensor | None,
                budgets: Sequence[int | None]) -> list[dict]:
        outs = []
        patch_head = self.ibot_head or self.dino_head
        for c in budgets:
            g = self.backbone.forward_features(global_crops, num_cores=c, masks=masks)
            cls = [g["cls"]]
            if local_crops.numel():
                cls.append(self.backbone.forward_features(local_crops, num_cores=c)["cls"])
            logits = self.dino_head(torch.cat(cls))  # one head call for every crop
            n_global = global_crops.shape[0]
            out = {"cls": g["cls"], "global_logits": logits[:n_global], "local_logits": logits[n_global:]}
            if masks is not None:
                out["patch_logits"] = patch_head(g["patches"][masks])
            outs.append(out)
        return outs


def build_heads(cfg, embed_dim: int) -> tuple[DINOHead, DINOHead | None]:
    d, i = cfg.dino, cfg.ibot
    dino_head = DINOHead(embed_dim, d.head_out_dim, d.head_hidden_dim, d.head_bottleneck_dim, d.head_nlayers,
                         use_bn=d.head_use_bn, mlp_bias=d.head_mlp_bias)
    ibot_head = (DINOHead(embed_dim, i.head_out_dim, i.head_hidden_dim, i.head_bottleneck_dim, i.head_nlayers,
                          use_bn=d.head_use_bn, mlp_bias=d.head_mlp_bias)
                 if i.separate_head else None)
    return dino_head, ibot_head


class ElasticDINO(nn.Module):
    """Student, EMA teacher and the three losses. ``student`` may be replaced by a DDP/FSDP wrapper
    (``student_module`` always gives the bare module)."""

    def __init__(self, cfg, backbone: Backbone) -> None:
        super().__init__()
        self.cfg = cfg
        dino_head, ibot_head = build_heads(cfg, backbone.embed_dim)
        self.student = StudentTeacherNet(backbone, dino_head, ibot_head)
        self.teacher = copy.deepcopy(self.student)
        self.teacher.requires_grad_(False)
        ibot_dim = cfg.ibot.head_out_dim if cfg.ibot.separate_head else cfg.dino.head_out_dim
        self.dino_loss = DINOLoss(cfg.dino.head_out_dim, cfg.dino.student_temp, cfg.dino.center_momentum)
        self.ibot_loss = iBOTPatchLoss(ibot_dim, cfg.dino.student_temp, cfg.dino.center_momentum)
        self.koleo_loss = KoLeoLoss()
        self._pending_centers: tuple[Tensor, Tensor | None] | None = None

    @property
    def student_module(self) -> StudentTeacherNet:
        return getattr(self.student, "module", self.student)

    @torch.no_grad()
    def teacher_targets(self, global_crops: Tensor, masks: Tensor | None, teacher_temp: float):
        """Teacher probabilities for the global crops (full budget) and the masked patches."""
        teacher = self.teacher
        g = teacher.backbone.forward_features(global_crops)  # full budget (None = all cores)
        cls_logits = teacher.dino_head(g["cls"]).float()
        patch_logits = None
        if masks is not None and masks.any():
            patch_logits = (teacher.ibot_head or teacher.dino_head)(g["patches"][masks]).float()
        if self.cfg.dino.centering == "sinkhorn_knopp":
            cls_probs = self.dino_loss.sinkhorn_knopp_teacher(cls_logits, teacher_temp)
            patch_probs = (self.ibot_loss.sinkhorn_knopp_teacher(patch_logits, teacher_temp)
                           if patch_logits is not None else None)
        else:
            cls_probs = self.dino_loss.softmax_center_teacher(cls_logits, teacher_temp)
            patch_probs = (self.ibot_loss.softmax_center_teacher(patch_logits, teacher_temp)
                           if patch_logits is not None else None)
        self._pending_centers = (cls_logits, patch_logits)
        return cls_probs, patch_probs

    def forward(self, batch: dict, budgets: Sequence[int | None], teacher_temp: float) -> dict[str, Tensor]:
        global_crops, local_crops = batch["global_crops"], batch["local_crops"]
        masks = batch.get("masks")
        n_global_views = 2
        t_cls, t_patch = self.teacher_targets(global_crops, masks, teacher_temp)
        teacher_views = list(t_cls.chunk(n_global_views))
        student_outs = self.student(global_crops, local_crops, masks, budgets)

        cfg = self.cfg
        terms: dict[str, Tensor] = {}
        total = global_crops.new_zeros(())
        n_local = self.cfg.crops.num_local
        for c, out in zip(budgets, student_outs):
            views = list(out["global_logits"].chunk(n_global_views))
            if n_local and out["local_logits"].numel():
                views += list(out["local_logits"].chunk(n_local))
            dino = self.dino_loss(views, teacher_views)
            if t_patch is not None:
                weights = batch["mask_weights"][masks]
                ibot = self.ibot_loss.forward_masked(out["patch_logits"], t_patch, masks, weights)
            else:  # keep the head in the graph so DDP sees a (zero) gradient for it
                ibot = out["patch_logits"].sum() * 0.0 if "patch_logits" in out else total * 0.0
            koleo = sum(self.koleo_loss(v) for v in out["cls"].chunk(n_global_views))
            loss = cfg.dino.loss_weight * dino + cfg.ibot.loss_weight * ibot + cfg.dino.koleo_weight * koleo
            total = total + loss
            for name, value in (("dino", dino), ("ibot", ibot), ("koleo", koleo)):
                terms[name] = terms.get(name, 0.0) + value.detach()
                if len(budgets) > 1:
                    terms[f"{name}_C{c}"] = value.detach()
        terms["loss"] = total
        return terms

    def loss_state(self) -> dict:
        """The loss modules' centres (checkpointed with the weights)."""
        return {"dino": self.dino_loss.state_dict(), "ibot": self.ibot_loss.state_dict()}

    def load_loss_state(self, state: dict) -> None:
        self.dino_loss.load_state_dict(state["dino"])
        self.ibot_loss.load_state_dict(state["ibot"])

    @torch.no_grad()
    def update_centers(self) -> None:
        """EMA centring update from this step's teacher logits (after the step, as in DINOv2)."""
        if self._pending_centers is None or self.cfg.dino.centering != "centering":
            self._pending_centers = None
            return
        cls_logits, patch_logits = self._pending_centers
        self.dino_loss.update_center(cls_logits)
        if patch_logits is not None:
            self.ibot_loss.update_center(patch_logits)
        self._pending_centers = None
