"""Deployment forms of a backbone at one fixed core width.

An elastic VECA holds the whole bank and picks a prefix per call. For deployment the width is chosen
once (``veca export --width C``); these modules hold only what that width computes — the first C
cores and their coordinates — with no budget argument and no branching on it, so a traced
TorchScript or ONNX graph contains exactly one width's computation.

``FixedWidthVECA`` re-implements the forward pass with real arithmetic only: the elastic model
rotates RoPE pairs as complex numbers (fast on CPU), which ONNX cannot express; here each pair is
rotated with cos/sin. ``veca export`` checks every export against the elastic model at that width.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Backbone
from .rope import patch_coords
from .veca import VECA


def slice_to_width(model: VECA, width: int) -> VECA:
    """A VECA whose bank is the first ``width`` cores of ``model`` (same weights otherwise).

    At ``num_cores=width`` it computes exactly what ``model`` computes there (its smaller budgets
    stay available too). Used for the fixed-width safetensors export.
    """
    c = model.check_width(width)
    config = {k: v for k, v in model.config.items() if k != "arch"}
    config["num_cores"] = c
    sliced = VECA(**config)
    state = dict(model.state_dict())
    state["cores"], state["core_coords"] = state["cores"][:c], state["core_coords"][:c]
    sliced.load_state_dict(state, strict=True)
    return sliced.train(model.training)


def _rotate_pairs(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate channel pairs (2j, 2j+1) of (B, H, T, d) by angles with tables (B, 1, T, d/2).

    Computed in the tables' fp32 and cast back to ``x``'s dtype, as the elastic model's
    ``apply_rope_pairs``: under bf16 autocast q and k would otherwise reach SDPA as fp32 next to a
    bf16 v, which no fused kernel takes (autocast then copies them back to bf16 inside SDPA).
    """
    pairs = x.unflatten(-1, (-1, 2))
    a, b = pairs[..., 0], pairs[..., 1]
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2).to(x.dtype)


class FixedWidthVECA(nn.Module):
    """``images -> (image feature (B, D), patch tokens (B, N, D))`` of ``model`` at width ``width``.

    ``space="teacher"`` applies the model's output projection to both outputs. Eval mode only
    (no drop-path, no coordinate augmentation).
    """

    def __init__(self, model: VECA, width: int, space: str = "native") -> None:
        super().__init__()
        c = model.check_width(width)
        space = model._check_space(space)
        self.width, self.space = c, space
        self.num_heads, self.head_dim = model.num_heads, model.embed_dim // model.num_heads
        self.embed_dim, self.patch_size = model.embed_dim, model.patch_size
        self.patch_embed = copy.deepcopy(model.patch_embed)
        self.cores = nn.Parameter(model.cores[:c].detach().clone())
        self.core_coords = nn.Parameter(model.core_coords[:c].detach().clone())
        self.blocks = copy.deepcopy(model.blocks)
        self.coord_heads = copy.deepcopy(model.coord_heads)
        self.coord_alpha = (nn.Parameter(model.coord_alpha.detach().clone()) if model.coord_alpha is not None
                            else None)
        self.norm = copy.deepcopy(model.norm)
        self.output_proj = copy.deepcopy(model.output_proj) if space == "teacher" else None
        self.register_buffer("inv_periods", model.rope_inv_periods.detach().clone())
        self.eval()

    def _angles(self, coords: Tensor) -> tuple[Tensor, Tensor]:
        # [y-frequencies, x-frequencies], as the elastic model's rope_freqs
        angles = (coords[..., :, None] * self.inv_periods).flatten(-2)[:, None]  # (B, 1, T, d/2)
        return angles.cos(), angles.sin()

    def _attention(self, blk: nn.Module, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        b, t, d = x.shape
        c = self.width
        q, k, v = blk.attn.qkv(x).view(b, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = _rotate_pairs(q, cos, sin), _rotate_pairs(k, cos, sin)
        out_cores = F.scaled_dot_product_attention(q[:, :, :c], k, v)  # cores see everything
        out_patches = F.scaled_dot_product_attention(q[:, :, c:], k[:, :, :c], v[:, :, :c])  # patches: cores
        out = torch.cat([out_cores, out_patches], dim=2).transpose(1, 2).reshape(b, t, d)
        return blk.attn.proj(out)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        z, grid = self.patch_embed(images)
        b, c = z.shape[0], self.width
        x = torch.cat([self.cores.to(z.dtype).expand(b, -1, -1), z], dim=1)
        pcos, psin = self._angles(patch_coords(grid, z.device)[None].expand(b, -1, -1))
        raw = self.core_coords[None].expand(b, -1, -1)
        for i, blk in enumerate(self.blocks):
            ccos, csin = self._angles(torch.tanh(raw))
            cos, sin = torch.cat([ccos, pcos], dim=2), torch.cat([csin, psin], dim=2)
            x = x + blk.ls1(self._attention(blk, blk.norm1(x), cos, sin))
            x = x + blk.ls2(blk.mlp(blk.norm2(x)))
            if i < len(self.blocks) - 1:
                raw = raw + self.coord_alpha[i] * self.coord_heads[i](x[:, :c])
        x = self.norm(x)
        if self.output_proj is not None:
            x = self.output_proj(x)
        return x[:, 0], x[:, c:]


class FixedDense(nn.Module):
    """A dense ViT (no widths) with the same ``images -> (image feature, patch tokens)`` interface."""

    def __init__(self, model: Backbone, space: str = "native") -> None:
        super().__init__()
        self.space = model._check_space(space)
        self.model = copy.deepcopy(model)
        self.eval()

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        out = self.model.forward_features(images, space=self.space)
        return out["cls"], out["patches"]


def fixed_width(model: Backbone, width: int | None, space: str = "native") -> nn.Module:
    """The fixed-width deployment module of ``model`` (``width`` None for a dense ViT)."""
    if isinstance(model, VECA):
        return FixedWidthVECA(model, model.num_cores if width is None else width, space)
    if width is not None:
        raise ValueError(f"width={width} given for a dense ViT, which has no core widths; omit it")
    return FixedDense(model, space)
