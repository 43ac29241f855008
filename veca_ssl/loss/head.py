"""DINO projection head (DINO arXiv:2104.14294 §3.1 / App. C; DINOv2 arXiv:2304.07193 §4).

``x -> MLP (GELU) -> bottleneck -> L2-normalise -> weight-normalised linear (no bias) -> K logits``.

The last layer is weight-normalised with its gain frozen at 1 (DINO's ``norm_last_layer=True``;
DINOv2 ``nn.utils.weight_norm`` with ``weight_g`` filled with 1), i.e. each prototype row has unit
norm, so the logits are cosine similarities between the bottleneck feature and the prototypes.
Instead of ``nn.utils.weight_norm`` (a forward pre-hook that recomputes ``weight`` from two
parameters) the normalisation is written out in :class:`WeightNormLinear`: the state dict then holds
one plain parameter ``last_layer.weight_v`` that FSDP can shard and that checkpoints round-trip
without hooks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class WeightNormLinear(nn.Module):
    """Bias-free linear layer whose weight rows are L2-normalised on the fly (gain fixed at 1).

    ``y = x @ normalize(weight_v, dim=1).T``. Equivalent to ``nn.utils.weight_norm(nn.Linear(in, out,
    bias=False))`` with ``weight_g`` frozen at 1 (Salimans & Kingma, arXiv:1602.07868).

    Args:
        in_features: input width (the head's bottleneck).
        out_features: number of prototypes K.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.Linear``'s default init, as DINO/DINOv2 (the last layer is created after trunc-normal init
        is applied to the MLP). The row norm sets the effective step size of the normalised weight."""
        nn.init.kaiming_uniform_(self.weight_v, a=5**0.5)

    @property
    def weight(self) -> torch.Tensor:
        """The effective (row-normalised) weight, ``(out_features, in_features)``."""
        return F.normalize(self.weight_v, p=2, dim=1, eps=1e-12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weight_norm=True, g=1"


def _build_mlp(
    nlayers: int, in_dim: int, bottleneck_dim: int, hidden_dim: int, use_bn: bool, bias: bool
) -> nn.Module:
    """DINOv2's ``_build_mlp``: ``nlayers`` linears, GELU (and optional BN) between them."""
    if nlayers == 1:
        return nn.Linear(in_dim, bottleneck_dim, bias=bias)
    layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim, bias=bias)]
    if use_bn:
        layers.append(nn.BatchNorm1d(hidden_dim))
    layers.append(nn.GELU())
    for _ in range(nlayers - 2):
        layers.append(nn.Linear(hidden_dim, hidden_dim, bias=bias))
        if use_bn:
            layers.append(nn.BatchNorm1d(hidden_dim))
        layers.append(nn.GELU())
    layers.append(nn.Linear(hidden_dim, bottleneck_dim, bias=bias))
    return nn.Sequential(*layers)


class DINOHead(nn.Module):
    """DINO/DINOv2 projection head producing prototype logits.

    Args:
        in_dim: backbone feature width.
        out_dim: number of prototypes K (DINOv2: 65536; a few hundred suits small datasets).
        hidden_dim: MLP hidden width (2048).
        bottleneck_dim: width of the L2-normalised bottleneck (256).
        nlayers: number of MLP linears before the bottleneck (3; 1 = a single linear).
        use_bn: BatchNorm after hidden linears (off in DINO for ViTs).
        mlp_bias: biases in the MLP linears.

    Input ``(..., in_dim)``, output ``(..., out_dim)`` logits in [-1, 1] (cosine similarities).
    MLP linears use truncated-normal init (std 0.02) and zero biases, as DINO/DINOv2.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        use_bn: bool = False,
        mlp_bias: bool = True,
    ) -> None:
        super().__init__()
        for name, value in (
            ("in_dim", in_dim),
            ("out_dim", out_dim),
            ("hidden_dim", hidden_dim),
            ("bottleneck_dim", bottleneck_dim),
            ("nlayers", nlayers),
        ):
            if int(value) != value or value < 1:
                raise ValueError(f"DINOHead: {name} must be a positive integer, got {value!r}")
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.mlp = _build_mlp(nlayers, in_dim, bottleneck_dim, hidden_dim, use_bn, mlp_bias)
        self.mlp.apply(self._init_weights)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            # Bounds are absolute (+-2, i.e. 100 std) exactly as timm's trunc_normal_ used by DINO/DINOv2.
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def last_layer_parameters(self) -> list[nn.Parameter]:
        """Parameters of the prototype layer, which DINO freezes during the first epoch (lr 0 or
        gradients dropped) because updating the prototypes early destabilises training."""
        return list(self.last_layer.parameters())

    def forward_bottleneck(self, x: torch.Tensor) -> torch.Tensor:
        """The L2-normalised bottleneck feature ``(..., bottleneck_dim)``."""
        x = self.mlp(x)
        # fp16 cannot represent 1e-12; DINOv2 uses the same dtype-dependent epsilon.
        eps = 1e-6 if x.dtype == torch.float16 else 1e-12
        return F.normalize(x, p=2, dim=-1, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_dim:
            raise ValueError(f"DINOHead expects inputs of width {self.in_dim}, got shape {tuple(x.shape)}")
        if x.ndim > 2:
            # BatchNorm1d needs (N, C): fold leading dims (e.g. patch tokens (B, N, D)).
            return self.forward(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], self.out_dim)
        return self.last_layer(self.forward_bottleneck(x))
