"""Image-level DINO self-distillation loss (DINO arXiv:2104.14294 §3.1, Alg. 1; DINOv2 arXiv:2304.07193).

The student is trained to predict, for every view it sees, the teacher's (centred, sharpened or
Sinkhorn-Knopp-normalised) distribution over K prototypes of every *other* global view.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from veca_ssl.loss.centering import sinkhorn_knopp, teacher_softmax_centered, update_center


def cross_entropy_with_probs(
    teacher_probs: torch.Tensor, student_logits: torch.Tensor, student_temp: float
) -> torch.Tensor:
    """Per-row ``H(t, s) = -sum_k t_k log softmax(s / T_s)_k``, shape ``(..., )``, computed in float32."""
    log_probs = F.log_softmax(student_logits.float() / student_temp, dim=-1)
    return -(teacher_probs.float() * log_probs).sum(dim=-1)


class DINOLoss(nn.Module):
    """DINO cross-entropy between teacher global views and student views, with an EMA centre.

    Pairing and averaging (exactly DINO's ``DINOLoss.forward``): given teacher targets
    ``t_0 … t_{G-1}`` (one per global view, each ``(B, K)`` probabilities) and student logits
    ``s_0 … s_{V-1}`` (``V >= G``; the first ``G`` student entries are the *same* global views in the
    same order, the rest are local crops), the loss is

        L = (1 / |P|) * sum_{(i, v) in P} mean_b H(t_i[b], softmax(s_v[b] / T_s)),
        P = {(i, v) : 0 <= i < G, 0 <= v < V, v != i},   |P| = G * V - G,

    i.e. every teacher global view supervises every student view except the student's copy of that
    same view, each pair's cross-entropy is averaged over the batch, and pairs are averaged with equal
    weight. (DINOv2 weights global/local terms the same way: ``2 / (n_global_terms + n_local_terms)``
    for the swapped global pair and ``1 / (…)`` per local pair.)

    The centre buffer ``center`` ``(1, K)`` is persistent, so it is saved and restored with checkpoints.
    Teacher targets are produced by :meth:`softmax_center_teacher` or :meth:`sinkhorn_knopp_teacher`;
    call :meth:`update_center` once per step with the raw teacher logits of that step (after computing
    the targets, so a step's targets use the centre of previous steps, as in DINO/DINOv2).

    Args:
        out_dim: number of prototypes K.
        student_temp: student temperature T_s (0.1).
        center_momentum: EMA momentum of the centre (0.9).
    """

    center: torch.Tensor

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__()
        if out_dim < 1:
            raise ValueError(f"DINOLoss: out_dim must be >= 1, got {out_dim}")
        if not student_temp > 0:
            raise ValueError(f"DINOLoss: student_temp must be > 0, got {student_temp}")
        if not 0.0 <= center_momentum <= 1.0:
            raise ValueError(f"DINOLoss: center_momentum must be in [0, 1], got {center_momentum}")
        self.out_dim = out_dim
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim), persistent=True)

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_logits: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """Targets ``softmax((teacher_logits - center) / teacher_temp)``, ``(B, K)``."""
        return teacher_softmax_centered(teacher_logits, self.center, teacher_temp)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(
        self, teacher_logits: torch.Tensor, teacher_temp: float, n_iterations: int = 3
    ) -> torch.Tensor:
        """Targets by Sinkhorn-Knopp over the global batch (DINOv2's alternative to centring).

        Pass all teacher global views of the step at once (``(G*B, K)``): equipartition is then enforced
        over every image and view, as DINOv2 does.
        """
        return sinkhorn_knopp(teacher_logits, teacher_temp, n_iterations)

    @torch.no_grad()
    def update_center(self, teacher_logits: torch.Tensor) -> None:
        """EMA-update the centre in place with the global-batch mean of ``teacher_logits`` ``(N, K)``."""
        self.center.copy_(update_center(self.center, teacher_logits, self.center_momentum))

    def forward(
        self, student_logits_list: Sequence[torch.Tensor], teacher_probs_list: Sequence[torch.Tensor]
    ) -> torch.Tensor:
        """The scalar loss defined in the class docstring.

        Args:
            student_logits_list: ``V`` tensors ``(B, K)``: the ``G`` global views first (same order as
                the teacher list), then local crops.
            teacher_probs_list: ``G`` tensors ``(B, K)`` of teacher target probabilities.
        """
        n_teacher, n_student = len(teacher_probs_list), len(student_logits_list)
        if n_teacher == 0:
            raise ValueError("DINOLoss: teacher_probs_list is empty")
        if n_student < n_teacher:
            raise ValueError(
                f"DINOLoss: {n_student} student views < {n_teacher} teacher views; the student list must "
                "start with the same global views as the teacher list"
            )
        n_pairs = n_teacher * n_student - n_teacher
        if n_pairs == 0:
            raise ValueError(
                "DINOLoss: one global view and no local crops leaves no (teacher, other view) pair"
            )
        for name, tensors in (("student", student_logits_list), ("teacher", teacher_probs_list)):
            for index, tensor in enumerate(tensors):
                if tensor.ndim != 2 or tensor.shape[-1] != self.out_dim:
                    raise ValueError(
                        f"DINOLoss: {name} view {index} has shape {tuple(tensor.shape)}, expected (B, {self.out_dim})"
                    )
        # One log-softmax per student view, reused against every teacher view: K can be 65536.
        total = torch.zeros((), device=student_logits_list[0].device)
        for v, student_logits in enumerate(student_logits_list):
            log_probs = F.log_softmax(student_logits.float() / self.student_temp, dim=-1)
            for i, teacher_probs in enumerate(teacher_probs_list):
                if i == v:
                    continue
                total = total - (teacher_probs.float() * log_probs).sum(dim=-1).mean()
        return total / n_pairs
