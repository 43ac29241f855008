"""DINO projection head (DINO arXiv:2104.14294 §3.1 / App. C; DINOv2 arXiv:2304.07193 §4).

``x -> MLP (GELU) -> bottleneck -> L2-normalise -> prototype layer (no bias) -> K logits``.

The prototype layer (``last_layer``) comes in three kinds (``DINOHead(last_layer=...)``):

* ``"weight_norm"`` (default, DINOv2): weight-normalised with a *learnable* per-prototype gain
  ``weight_g`` initialised to 1 (DINOv2's ``weight_norm(...)`` followed by ``weight_g.fill_(1)``,
  the gain left trainable), so the logits are cosines times the gains.
* ``"normalized"`` (DINO's ``norm_last_layer=True``): the gain frozen at 1 — no ``weight_g`` — so the
  logits are cosine similarities between the bottleneck feature and the prototypes.
* ``"linear"`` (DINOv3): a plain bias-free ``nn.Linear``.

Instead of ``nn.utils.weight_norm`` (a forward pre-hook that recomputes ``weight`` from two
parameters) the normalisation is written out in :class:`WeightNormLinear`: the state dict holds plain
parameters ``last_layer.weight_v`` (and ``last_layer.weight_g``) that FSDP can shard and that
checkpoints round-trip without hooks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class WeightNormLinear(nn.Module):
    """Bias-free linear layer with weight normalisation (Salimans & Kingma, arXiv:1602.07868).

    ``y = x @ (g * weight_v / ||weight_v||_row).T``. With ``learn_gain`` the gain ``weight_g``
    (``(out_features, 1)``, initialised to 1) is a parameter — ``nn.utils.weight_norm(nn.Linear(in,
    out, bias=False))`` as DINOv2 uses it; without, the gain is fixed at 1 and there is no ``weight_g``.

    Args:
        in_features: input width (the head's bottleneck).
        out_features: number of prototypes K.
        learn_gain: a learnable per-row gain (DINOv2) or rows of unit norm (DINO).
    """

    def __init__(self, in_features: int, out_features: int, learn_gain: bool = True) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))
        self.weight_g = nn.Parameter(torch.ones(out_features, 1)) if learn_gain else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.Linear``'s default init, as DINO/DINOv2 (the last layer is created after trunc-normal init
        is applied to the MLP), and a unit gain. The row norm sets the effective step size of the
        normalised weight."""
        nn.init.kaiming_uniform_(self.weight_v, a=5**0.5)
        if self.weight_g is not None:
            nn.init.ones_(self.weight_g)

    @property
    def weight(self) -> torch.Tensor:
        """The effective weight, ``(out_features, in_features)``."""
        if self.weight_g is None:
            return F.normalize(self.weight_v, p=2, dim=1, eps=1e-12)
        # torch's weight-norm arithmetic (v * (g / ||v||)); one norm per prototype row
        return self.weight_v * (self.weight_g / self.weight_v.norm(p=2, dim=1, keepdim=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def extra_repr(self) -> str:
        gain = "learnable" if self.weight_g is not None else "1"
        return f"in_features={self.in_features}, out_features={self.out_features}, weight_norm=True, g={gain}"


#: Kinds of prototype layer (see the module docstring).
LAST_LAYERS = ("weight_norm", "normalized", "linear")


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
        last_layer: ``"weight_norm"`` (DINOv2, learnable gain), ``"normalized"`` (DINO, gain fixed at
            1) or ``"linear"`` (DINOv3, plain linear).

    Input ``(..., in_dim)``, output ``(..., out_dim)`` logits (cosine similarities for
    ``"normalized"``, times the gains for ``"weight_norm"``). MLP linears use truncated-normal init
    (std 0.02) and zero biases, as DINO/DINOv2; a ``"linear"`` prototype layer too (DINOv3 applies the
    same init to every linear of its head).
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
        last_layer: str = "weight_norm",
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
        if last_layer not in LAST_LAYERS:
            raise ValueError(f"DINOHead: last_layer={last_layer!r}; valid: {', '.join(LAST_LAYERS)}")
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.mlp = _build_mlp(nlayers, in_dim, bottleneck_dim, hidden_dim, use_bn, mlp_bias)
        self.mlp.apply(self._init_weights)
        self.last_layer: nn.Module
        if last_layer == "linear":
            self.last_layer = nn.Linear(bottleneck_dim, out_dim, bias=False)
            self._init_weights(self.last_layer)
        else:
            self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, learn_gain=last_layer == "weight_norm")

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
