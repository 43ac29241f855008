"""Pre-norm transformer block shared by VECA and the dense ViT: attention + FFN, layer-scale, drop-path."""

from __future__ import annotations

from torch import Tensor, nn

from .attention import Attention
from .layers import DropPath, LayerScale, build_ffn


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, ffn_layer: str = "swiglu", ffn_hidden: int = 1024,
                 qkv_bias: bool = True, proj_bias: bool = True, ffn_bias: bool = True, drop_path: float = 0.0,
                 layerscale_init: float | None = None, norm_eps: float = 1e-6,
                 attn_backend: str = "auto") -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias, proj_bias, attn_backend)
        self.ls1 = LayerScale(dim, layerscale_init) if layerscale_init else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = build_ffn(dim, ffn_layer, ffn_hidden, ffn_bias)
        self.ls2 = LayerScale(dim, layerscale_init) if layerscale_init else nn.Identity()
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor, rope=None, num_cores: int | None = None, rope_skip: int = 0) -> Tensor:
        x = x + self.drop_path(self.ls1(self.attn(self.norm1(x), rope, num_cores, rope_skip)))
        return x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))
