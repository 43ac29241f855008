"""Token-wise building blocks shared by the VECA and dense ViT backbones."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch_size`` convolution: (B, 3, H, W) -> (B, Hp*Wp, D) and the grid (Hp, Wp).

    Non-overlapping patches matter for VECA: a patch token depends on its own pixels only, which is
    what makes the one-block patch-isolation property exact.
    """

    def __init__(self, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768, norm: bool = False,
                 norm_eps: float = 1e-5) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        # optional LayerNorm on the patch embeddings (the VECA reference's ``patch_embed_use_ln``);
        # registered only when used so that checkpoints without it keep their exact key set
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps) if norm else None

    def check_input(self, images: Tensor) -> tuple[int, int]:
        if images.ndim != 4:
            raise ValueError(f"images must be a (B, C, H, W) tensor, got shape {tuple(images.shape)}")
        _, c, h, w = images.shape
        if c != self.in_chans:
            raise ValueError(
                f"images have {c} channels but the backbone expects {self.in_chans}; "
                f"convert grayscale to RGB (repeat the channel) before the forward pass"
            )
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(
                f"image size {h}x{w} is not a multiple of the patch size {p}; valid sizes are multiples "
                f"of {p} (e.g. {max(p, h // p * p)}x{max(p, w // p * p)})"
            )
        return h // p, w // p

    def forward(self, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
        grid = self.check_input(images)
        x = self.proj(images).flatten(2).transpose(1, 2)
        return (self.norm(x) if self.norm is not None else x), grid


class SwiGLUFFN(nn.Module):
    """SwiGLU feed-forward (Shazeer 2020), DINOv2 layout: fused ``w12`` then ``w3``."""

    def __init__(self, dim: int, hidden_dim: int, bias: bool = True) -> None:
        super().__init__()
        self.hidden_dim = hidden_dim
        self.w12 = nn.Linear(dim, 2 * hidden_dim, bias=bias)
        self.w3 = nn.Linear(hidden_dim, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(nn.functional.silu(x1) * x2)


class Mlp(nn.Module):
    """GELU MLP (the ViT/DINOv2 S/B/L feed-forward): ``fc1`` -> GELU -> ``fc2``."""

    def __init__(self, dim: int, hidden_dim: int, bias: bool = True) -> None:
        super().__init__()
        self.hidden_dim = hidden_dim
        self.fc1 = nn.Linear(dim, hidden_dim, bias=bias)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


def ffn_hidden_dim(dim: int, ffn_layer: str, ffn_ratio: float | None, ffn_align: int = 8,
                   ffn_hidden: int | None = None) -> int:
    """Hidden width of the feed-forward layer.

    ``ffn_hidden`` (when given) is used as is. Otherwise SwiGLU uses 2/3 of ``ratio*dim`` (8/3·dim at
    the default ratio 4), rounded up to a multiple of ``ffn_align``: 8 is DINOv2's rule (2736 for a
    1024-d model), 1 is the VECA reference's ``int(dim * 2.66667)`` (2730; the two floor values agree
    for every width below 10^5). The GELU MLP uses ``ratio*dim``.
    """
    if ffn_hidden is not None:
        if int(ffn_hidden) < 1:
            raise ValueError(f"ffn_hidden must be >= 1, got {ffn_hidden}")
        if ffn_layer not in ("swiglu", "mlp"):
            raise ValueError(f"unknown ffn_layer {ffn_layer!r}; valid: 'swiglu', 'mlp'")
        return int(ffn_hidden)
    if ffn_align < 1:
        raise ValueError(f"ffn_align must be >= 1, got {ffn_align}")
    if ffn_layer == "swiglu":
        ratio = 4.0 if ffn_ratio is None else ffn_ratio
        hidden = int(dim * ratio * 2 / 3)
        return (hidden + ffn_align - 1) // ffn_align * ffn_align
    if ffn_layer == "mlp":
        return int(dim * (4.0 if ffn_ratio is None else ffn_ratio))
    raise ValueError(f"unknown ffn_layer {ffn_layer!r}; valid: 'swiglu', 'mlp'")


def build_ffn(dim: int, ffn_layer: str, hidden: int, bias: bool = True) -> nn.Module:
    """The feed-forward layer of width ``hidden`` (see :func:`ffn_hidden_dim`)."""
    return SwiGLUFFN(dim, hidden, bias) if ffn_layer == "swiglu" else Mlp(dim, hidden, bias)


class LayerScale(nn.Module):
    """Per-channel residual scaling (CaiT); ``gamma`` initialised to a small constant."""

    def __init__(self, dim: int, init_value: float = 1e-5) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample, rescaling the survivors."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: Tensor) -> Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


def drop_path_rates(rate: float, depth: int, uniform: bool = False) -> list[float]:
    """Per-block stochastic-depth rates: a linear ramp 0 → ``rate`` over the blocks (DeiT, DINO), or
    ``rate`` in every block (DINOv2's ``drop_path_uniform``, used for its large models)."""
    if uniform:
        return [float(rate)] * depth
    return torch.linspace(0, rate, depth, device="cpu").tolist()
