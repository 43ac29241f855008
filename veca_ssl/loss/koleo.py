"""KoLeo regulariser (Sablayrolles et al., "Spreading vectors for similarity search", arXiv:1806.03198;
used on image features by DINOv2, arXiv:2304.07193 §4).

Derived from the Kozachenko–Leonenko differential-entropy estimator: for n points on the unit sphere,
``H ≈ (1/n) Σ_i log(ρ_i) + const`` where ``ρ_i`` is the distance from point i to its nearest
neighbour. Minimising ``-(1/n) Σ_i log ρ_i`` pushes nearest neighbours apart, i.e. spreads the batch's
features uniformly and prevents the collapse of several images onto one feature.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class KoLeoLoss(nn.Module):
    """``-mean_i log(||x_i - x_{nn(i)}|| + eps)`` on L2-normalised rows (DINOv2 ``KoLeoLoss``).

    The nearest neighbour is the row of largest dot product other than the row itself (for unit
    vectors, the largest dot product is the smallest Euclidean distance). As in DINOv2 the distance is
    ``F.pairwise_distance(x_i, x_nn, eps=eps)`` = ``||x_i - x_nn + eps||``, which keeps the gradient
    finite for duplicated points, and the loss is computed in float32 with autocast disabled.
    The loss is over the rows given (DINOv2 applies it per global crop on each rank's local batch).

    Args:
        eps: added inside the distance and to it before the log.
    """

    def __init__(self, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = eps

    @staticmethod
    def nearest_neighbours(x: torch.Tensor) -> torch.Tensor:
        """Index of each row's nearest other row by dot product, for ``(n, D)`` unit rows."""
        dots = x @ x.t()
        # -2 is below any cosine, so a row never picks itself (DINOv2 uses -1, the same in effect
        # except for exactly antipodal points).
        dots.fill_diagonal_(-2.0)
        return dots.argmax(dim=1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Scalar loss for ``(n, D)`` features, ``n >= 2``."""
        if features.ndim != 2:
            raise ValueError(f"KoLeoLoss expects (n, D) features, got shape {tuple(features.shape)}")
        if features.shape[0] < 2:
            raise ValueError(f"KoLeoLoss needs at least 2 rows to find a neighbour, got {features.shape[0]}")
        with torch.autocast(device_type=features.device.type, enabled=False):
            x = F.normalize(features.float(), p=2, dim=-1, eps=self.eps)
            with torch.no_grad():
                neighbour = self.nearest_neighbours(x)
            distances = F.pairwise_distance(x, x[neighbour], p=2, eps=self.eps)
            return -torch.log(distances + self.eps).mean()
