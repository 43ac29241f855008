"""Self-supervised and distillation losses, the DINO head and teacher-target normalisation.

* :class:`DINOHead` — projection head with weight-normalised prototypes (DINO/DINOv2).
* :class:`DINOLoss` — image-level self-distillation (DINO, arXiv:2104.14294).
* :class:`iBOTPatchLoss` — masked-patch self-distillation (iBOT, arXiv:2111.07832).
* :class:`KoLeoLoss` — nearest-neighbour entropy regulariser (arXiv:1806.03198, DINOv2).
* :func:`teacher_softmax_centered`, :func:`update_center`, :func:`sinkhorn_knopp` — teacher targets.
* :class:`DistillationLoss`, :func:`resample_patch_grid` — distillation from a frozen teacher.
"""

from veca_ssl.loss.centering import sinkhorn_knopp, teacher_softmax_centered, update_center
from veca_ssl.loss.dino import DINOLoss, cross_entropy_with_probs
from veca_ssl.loss.distill import DistillationLoss, resample_patch_grid
from veca_ssl.loss.head import DINOHead, WeightNormLinear
from veca_ssl.loss.ibot import iBOTPatchLoss, masked_token_weights
from veca_ssl.loss.koleo import KoLeoLoss

__all__ = [
    "DINOHead",
    "DINOLoss",
    "DistillationLoss",
    "KoLeoLoss",
    "WeightNormLinear",
    "cross_entropy_with_probs",
    "iBOTPatchLoss",
    "masked_token_weights",
    "resample_patch_grid",
    "sinkhorn_knopp",
    "teacher_softmax_centered",
    "update_center",
]
