"""Elastic DINO: DINO + iBOT + KoLeo self-distillation with nested core widths .

DINO (Caron et al. 2021, arXiv:2104.14294), iBOT (Zhou et al. 2022, arXiv:2111.07832) and the
DINOv2 recipe (Oquab et al. 2023, arXiv:2304.07193), adapted to VECA's elastic cores: the EMA
teacher always runs at the full bank and the student at the sampled width(s), so every width
learns from the widest ("elastic self-distillation").

``ElasticDINO.forward(batch, widths, teacher_temp)`` returns a dict of losses; backward,
clipping, the optimiser and the EMA step (``update_teacher``) are the training loop's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from veca_ssl.loss import DINOHead, DINOLoss, KoLeoLoss, iBOTPatchLoss
from veca_ssl.method.base import Method, ema_copy, teacher_mode
from veca_ssl.models.base import Backbone


class StudentTeacherNet(nn.Module):
    """Backbone + DINO head (+ optional separate iBOT head). One forward = all widths of a step, so
    that a DDP wrapper sees exactly one forward per backward."""

    def __init__(self, backbone: Backbone, dino_head: DINOHead, ibot_head: DINOHead | None = None) -> None:
        super().__init__()
        self.backbone, self.dino_head, self.ibot_head = backbone, dino_head, ibot_head

    def forward(self, global_crops: Tensor, local_crops: Tensor, masks: Tensor | None,
                widths: Sequence[int | None], mask_indices: Tensor | None = None) -> list[dict]:
        """Per width: image features, DINO logits of every crop and, with ``masks``, iBOT logits of the
        masked patches (``mask_indices``: their positions in ``masks.flatten()``, see ``masked_patches``)."""
        outs = []
        patch_head = self.ibot_head or self.dino_head
        for c in widths:
            g = self.backbone.forward_features(global_crops, num_cores=c, masks=masks)
            cls = [g["cls"]]
            if local_crops.numel():
                cls.append(self.backbone.forward_features(local_crops, num_cores=c)["cls"])
            logits = self.dino_head(torch.cat(cls))  # one head call for every crop
            n_global = global_crops.shape[0]
            out = {"cls": g["cls"], "global_logits": logits[:n_global], "local_logits": logits[n_global:]}
            if masks is not None:
                out["patch_logits"] = patch_head(masked_patches(g["patches"], masks, mask_indices))
            outs.append(out)
        return outs


def with_mask_index(batch: dict) -> dict:
    """``batch`` with ``mask_indices``, ``masked_patch_weights`` and ``n_masked_patches`` when it has iBOT
    ``masks``: the collate computes them on the CPU (``veca_ssl.data.collate``); a batch built by hand
    gets them here (a host sync on an accelerator)."""
    masks = batch.get("masks")
    if masks is None or "mask_indices" in batch:
        return batch
    indices = masks.flatten().nonzero().flatten()
    return {**batch, "mask_indices": indices, "n_masked_patches": int(indices.numel()),
            "masked_patch_weights": batch["mask_weights"].flatten().index_select(0, indices)}


def masked_patches(patches: Tensor, masks: Tensor, mask_indices: Tensor | None) -> Tensor:
    """The rows of ``patches`` (B, N, D) where ``masks`` (B, N) is True, in ``patches[masks]`` order, as
    (M, D). With ``mask_indices`` (their positions in ``masks.flatten()``) this is an ``index_select``:
    the same values in the same order, without a boolean mask whose output size the host must wait for."""
    if mask_indices is None:
        return patches[masks]
    return patches.flatten(0, 1).index_select(0, mask_indices)


def build_heads(cfg, embed_dim: int) -> tuple[DINOHead, DINOHead | None]:
    d, i = cfg.dino, cfg.ibot
    kw = dict(use_bn=d.head_use_bn, mlp_bias=d.head_mlp_bias, last_layer=d.head_last_layer)
    dino_head = DINOHead(embed_dim, d.head_out_dim, d.head_hidden_dim, d.head_bottleneck_dim, d.head_nlayers, **kw)
    ibot_head = (DINOHead(embed_dim, i.head_out_dim, i.head_hidden_dim, i.head_bottleneck_dim, i.head_nlayers, **kw)
                 if i.separate_head else None)
    return dino_head, ibot_head


class ElasticDINO(Method):
    """DINO + iBOT + KoLeo with nested core widths: the EMA teacher at the full bank, the student at
    the step's width(s).

    ``student`` and ``teacher`` are :class:`StudentTeacherNet` (backbone + DINO head + optional iBOT
    head); the DINO and iBOT losses hold the EMA centres (checkpointed through ``loss_modules``).
    """

    def __init__(self, cfg, backbone: Backbone) -> None:
        super().__init__(cfg)
        dino_head, ibot_head = build_heads(cfg, backbone.embed_dim)
        self.student = StudentTeacherNet(backbone, dino_head, ibot_head)
        self.teacher = ema_copy(self.student)
        ibot_dim = cfg.ibot.head_out_dim if cfg.ibot.separate_head else cfg.dino.head_out_dim
        self.dino_loss = DINOLoss(cfg.dino.head_out_dim, cfg.dino.student_temp, cfg.dino.center_momentum)
        self.ibot_loss = iBOTPatchLoss(ibot_dim, cfg.dino.student_temp, cfg.dino.center_momentum)
        self.koleo_loss = KoLeoLoss()
        self._mask_index: tuple[Tensor, Tensor, int] | None = None  # set by forward, see get_teacher_output

    def loss_modules(self) -> dict[str, nn.Module]:
        return {"dino": self.dino_loss, "ibot": self.ibot_loss}

    def parallelize(self, wrap: Callable[[nn.Module], nn.Module],
                    shard_teacher: Callable[[nn.Module], nn.Module] | None = None) -> None:
        super().parallelize(wrap, shard_teacher)
        # a student whose head BatchNorm was synchronised across GPUs: the teacher's batch statistics
        # (see ``teacher_mode``) must cover the same global batch, as DINO's SyncBN teacher does
        if any(isinstance(m, nn.SyncBatchNorm) for m in self.student.modules()):
            self.teacher = teacher_mode(nn.SyncBatchNorm.convert_sync_batchnorm(self.teacher))

    @torch.no_grad()
    def get_teacher_output(self, global_crops: Tensor, masks: Tensor | None,
                           teacher_temp: float) -> tuple[Tensor, Tensor | None]:
        """Teacher probabilities for the global crops (full width) and the masked patches. The masked
        patches are gathered with the collate's index (:func:`with_mask_index`) of the batch that
        ``forward`` is processing, or with one derived from ``masks`` when called on other masks.

        With EMA centring, the centres are updated here from this batch's teacher logits, after the
        targets were computed with the previous centres (DINOv2 applies the same update lazily, before
        the next use).
        """
        teacher = teacher_mode(self.teacher)  # idempotent; guards against a caller's .train()
        g = teacher.backbone.forward_features(global_crops)  # full width (None = all cores)
        cls_logits = teacher.dino_head(g["cls"]).float()
        patch_logits = None
        if masks is not None:
            known = self._mask_index if self._mask_index is not None and self._mask_index[0] is masks else None
            indices = known[1] if known is not None else masks.flatten().nonzero().flatten()
            n_masked = known[2] if known is not None else int(indices.numel())
            if n_masked > 0:
                patch_logits = (teacher.ibot_head or teacher.dino_head)(
                    masked_patches(g["patches"], masks, indices)).float()
        if self.cfg.dino.centering == "sinkhorn_knopp":
            cls_probs = self.dino_loss.sinkhorn_knopp_teacher(cls_logits, teacher_temp)
            patch_probs = (self.ibot_loss.sinkhorn_knopp_teacher(patch_logits, teacher_temp)
                           if patch_logits is not None else None)
            return cls_probs, patch_probs
        cls_probs = self.dino_loss.softmax_center_teacher(cls_logits, teacher_temp)
        patch_probs = (self.ibot_loss.softmax_center_teacher(patch_logits, teacher_temp)
                       if patch_logits is not None else None)
        self.dino_loss.update_center(cls_logits)
        if patch_logits is not None:
            self.ibot_loss.update_center(patch_logits)
        return cls_probs, patch_probs

    def get_student_output(self, batch: dict, widths: Sequence[int | None]) -> list[dict]:
        """Per width: the image features and DINO logits of every crop, iBOT logits of masked patches."""
        batch = with_mask_index(batch)
        return self.engine(batch["global_crops"], batch["local_crops"], batch.get("masks"), widths,
                           batch.get("mask_indices"))

    def compute_losses(self, batch: dict, widths: Sequence[int | None], student_outs: list[dict],
                       t_cls: Tensor, t_patch: Tensor | None) -> dict[str, Tensor]:
        cfg = self.cfg
        n_global_views, n_local = 2, cfg.crops.num_local
        batch = with_mask_index(batch)
        masks = batch.get("masks")
        teacher_views = list(t_cls.chunk(n_global_views))
        terms: dict[str, Tensor] = {}
        total = batch["global_crops"].new_zeros(())
        for c, out in zip(widths, student_outs):
            views = list(out["global_logits"].chunk(n_global_views))
            if n_local and out["local_logits"].numel():
                views += list(out["local_logits"].chunk(n_local))
            dino = self.dino_loss(views, teacher_views)
            if t_patch is not None:
                weights = batch["masked_patch_weights"]
                ibot = self.ibot_loss.forward_masked(out["patch_logits"], t_patch, masks, weights)
            else:  # keep the head in the graph so DDP sees a (zero) gradient for it
                ibot = out["patch_logits"].sum() * 0.0 if "patch_logits" in out else total * 0.0
            koleo = sum(self.koleo_loss(v) for v in out["cls"].chunk(n_global_views))
            loss = cfg.dino.loss_weight * dino + cfg.ibot.loss_weight * ibot + cfg.dino.koleo_weight * koleo
            total = total + loss
            for name, value in (("dino", dino), ("ibot", ibot), ("koleo", koleo)):
                terms[name] = terms.get(name, 0.0) + value.detach()
                if len(widths) > 1:
                    terms[f"{name}_C{c}"] = value.detach()
        terms["loss"] = total
        return terms

    def forward(self, batch: dict, widths: Sequence[int | None], teacher_temp: float) -> dict[str, Tensor]:
        """One step's losses.

        Reads ``batch["global_crops"]`` (2B, 3, H, W: view-major), ``batch["local_crops"]``
        (n_local·B, 3, h, w, possibly empty), and for iBOT ``batch["masks"]`` (2B, N) bool with
        ``batch["mask_weights"]`` (2B, N) and the collate's ``mask_indices``, ``masked_patch_weights``,
        ``n_masked_patches`` (derived from the masks when absent: :func:`with_mask_index`). Returns
        ``"loss"`` (the weighted total over the widths) and the detached terms ``"dino"``, ``"ibot"``,
        ``"koleo"`` (summed over widths), plus per width ``"dino_C{c}"`` etc. when the step trains
        several widths.
        """
        batch = with_mask_index(batch)
        masks = batch.get("masks")
        # the collate's index of these masks, for get_teacher_output (which keeps DINOv3's signature)
        self._mask_index = (masks, batch["mask_indices"], batch["n_masked_patches"]) if masks is not None else None
        try:
            t_cls, t_patch = self.get_teacher_output(batch["global_crops"], masks, teacher_temp)
        finally:
            self._mask_index = None
        student_outs = self.get_student_output(batch, widths)
        return self.compute_losses(batch, widths, student_outs, t_cls, t_patch)
