"""iBOT masked-patch self-distillation loss (iBOT arXiv:2111.07832 §3.2; DINOv2 arXiv:2304.07193 §4).

The student sees an image with some patch tokens replaced by a mask token; on those masked positions
it must predict the teacher's distribution over patch prototypes, computed from the *unmasked* image.
Only masked positions contribute.
"""

from __future__ import annotations

import torch
from torch import nn

from veca_ssl.loss.centering import sinkhorn_knopp, teacher_softmax_centered, update_center
from veca_ssl.loss.dino import cross_entropy_with_probs


def masked_token_weights(masks: torch.Tensor) -> torch.Tensor:
    """Per masked token weight ``1 / (number of masked tokens of its image)``, in ``masks[masks]`` order.

    Args:
        masks: ``(B, N)`` bool, True where the student's patch is masked.

    Returns:
        ``(M,)`` float32 with ``M = masks.sum()``.
    """
    if masks.ndim != 2 or masks.dtype != torch.bool:
        raise ValueError(f"masks must be a (B, N) bool tensor, got {masks.dtype} {tuple(masks.shape)}")
    per_image = 1.0 / masks.sum(dim=-1).clamp(min=1).float()
    return per_image.unsqueeze(-1).expand_as(masks)[masks]


class iBOTPatchLoss(nn.Module):  # noqa: N801 - the paper's spelling, as in DINOv2
    """iBOT patch loss on masked tokens, with its own EMA centre (DINOv2 ``forward_masked``).

    With ``M`` masked tokens gathered as ``patches[masks]`` (row-major over ``(B, N)``), student logits
    ``s_m``, teacher targets ``t_m`` and per-token weights ``w_m`` (default ``1 / n_masked(image of m)``):

        L = (1 / B) * sum_m w_m * H(t_m, softmax(s_m / T_s)),

    i.e. each image's masked tokens are averaged, then the per-image losses are summed and divided by
    the number of images ``B = masks.shape[0]`` — *including* images with no masked token (DINOv2 masks
    only a fraction of the images, and this normalisation is DINOv2's).

    ``center`` ``(1, K)`` is a persistent buffer. Its update uses the mean over all masked tokens of the
    global batch.

    Args:
        patch_out_dim: number of patch prototypes K.
        student_temp: student temperature (0.1).
        center_momentum: EMA momentum of the centre (0.9).
    """

    center: torch.Tensor

    def __init__(self, patch_out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__()
        if patch_out_dim < 1:
            raise ValueError(f"iBOTPatchLoss: patch_out_dim must be >= 1, got {patch_out_dim}")
        if not student_temp > 0:
            raise ValueError(f"iBOTPatchLoss: student_temp must be > 0, got {student_temp}")
        if not 0.0 <= center_momentum <= 1.0:
            raise ValueError(f"iBOTPatchLoss: center_momentum must be in [0, 1], got {center_momentum}")
        self.patch_out_dim = patch_out_dim
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, patch_out_dim), persistent=True)

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_patch_logits: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """Targets ``softmax((logits - center) / teacher_temp)`` for ``(M, K)`` masked-token logits."""
        return teacher_softmax_centered(teacher_patch_logits, self.center, teacher_temp)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(
        self, teacher_patch_logits: torch.Tensor, teacher_temp: float, n_iterations: int = 3
    ) -> torch.Tensor:
        """Sinkhorn-Knopp targets over all masked tokens of the global batch (ranks may hold different
        numbers of tokens: the token count is all-reduced)."""
        return sinkhorn_knopp(teacher_patch_logits, teacher_temp, n_iterations)

    @torch.no_grad()
    def update_center(self, teacher_patch_logits: torch.Tensor) -> None:
        """EMA-update the centre in place with the global mean of masked-token logits ``(M, K)``."""
        self.center.copy_(update_center(self.center, teacher_patch_logits, self.center_momentum))

    def forward_masked(
        self,
        student_patch_logits_masked: torch.Tensor,
        teacher_patch_probs_masked: torch.Tensor,
        masks: torch.Tensor,
        mask_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The scalar loss of the class docstring.

        Args:
            student_patch_logits_masked: ``(M, K)`` student head logits of the masked tokens.
            teacher_patch_probs_masked: ``(M, K)`` teacher targets of the same tokens.
            masks: ``(B, N)`` bool student masks (their True entries, row-major, are the M tokens).
            mask_weights: optional ``(M,)`` weights; default :func:`masked_token_weights` of ``masks``
                (pass them precomputed, e.g. from the data collator, to avoid a host sync).
        """
        s, t = student_patch_logits_masked, teacher_patch_probs_masked
        if s.ndim != 2 or s.shape != t.shape or s.shape[-1] != self.patch_out_dim:
            raise ValueError(
                f"iBOTPatchLoss: student {tuple(s.shape)} and teacher {tuple(t.shape)} must both be "
                f"(M, {self.patch_out_dim})"
            )
        if masks.ndim != 2:
            raise ValueError(f"iBOTPatchLoss: masks must be (B, N), got shape {tuple(masks.shape)}")
        if mask_weights is None:
            mask_weights = masked_token_weights(masks)
        if mask_weights.shape != (s.shape[0],):
            raise ValueError(
                f"iBOTPatchLoss: {s.shape[0]} masked tokens but mask weights of shape {tuple(mask_weights.shape)} "
                "(masks.sum() must equal the number of rows)"
            )
        per_token = cross_entropy_with_probs(t, s, self.student_temp)
        return (per_token * mask_weights.float()).sum() / masks.shape[0]

    forward = forward_masked  # the module is callable with the same arguments
