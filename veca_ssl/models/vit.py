"""Dense Vision Transformer baselines (and teachers) with the same blocks as VECA.

Full attention over ``[cls; registers; patches]``. Positions: learned absolute embeddings
(DINOv2/timm layout, covering the class token and a ``pos_embed_grid``² patch grid, bicubically
interpolated to other grids), 2D RoPE on the patch tokens (DINOv3 layout: class and register tokens
unrotated), or none.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Backbone, init_weights
from .block import Block
from .flops import backbone_flops, dense_attention_pairs
from .layers import PatchEmbed, drop_path_rates, ffn_hidden_dim
from .rope import patch_coords, rope_cos_sin, rope_inv_periods

POS_EMBEDS = ("learned", "rope", "none")


class VisionTransformer(Backbone):
    """A dense ViT (every token attends to every token) with the same blocks and API as :class:`VECA`:
    the baselines ``vit_tiny`` … ``vit_giant2`` and the frozen DINOv2/DINOv3/timm teachers converted by
    ``veca_ssl.models.convert``. Class token, optional register tokens, learned absolute positions
    (interpolated to any grid, as DINOv2), RoPE (as DINOv3) or none. It has one width: ``budgets == ()``.
    """

    arch = "vit"

    def __init__(self, patch_size: int = 16, embed_dim: int = 384, depth: int = 12, num_heads: int = 6,
                 num_registers: int = 0, pos_embed: str = "learned", pos_embed_grid: int | None = None,
                 pos_interp_offset: float = 0.0, ffn_layer: str = "swiglu", ffn_ratio: float | None = None,
                 qkv_bias: bool = True, proj_bias: bool = True, ffn_bias: bool = True,
                 drop_path_rate: float = 0.0, drop_path_uniform: bool = False,
                 layerscale_init: float | None = None, norm_eps: float = 1e-6,
                 rope_base: float = 100.0, rope_zero_fraction: float = 0.0, attn_backend: str = "auto",
                 in_chans: int = 3, grad_checkpointing: bool = False, pos_interp_antialias: bool = False,
                 ffn_align: int = 8, ffn_hidden: int | None = None) -> None:
        if pos_embed not in POS_EMBEDS:
            raise ValueError(f"unknown pos_embed {pos_embed!r}; valid: {', '.join(POS_EMBEDS)}")
        pos_embed_grid = pos_embed_grid or 224 // patch_size
        super().__init__({
            "patch_size": patch_size, "embed_dim": embed_dim, "depth": depth, "num_heads": num_heads,
            "num_registers": num_registers, "pos_embed": pos_embed, "pos_embed_grid": pos_embed_grid,
            "pos_interp_offset": pos_interp_offset, "pos_interp_antialias": pos_interp_antialias,
            "ffn_layer": ffn_layer, "ffn_ratio": ffn_ratio, "ffn_align": ffn_align, "ffn_hidden": ffn_hidden,
            "qkv_bias": qkv_bias, "proj_bias": proj_bias, "ffn_bias": ffn_bias,
            "drop_path_rate": drop_path_rate, "drop_path_uniform": drop_path_uniform, "layerscale_init": layerscale_init, "norm_eps": norm_eps,
            "rope_base": rope_base, "rope_zero_fraction": rope_zero_fraction, "attn_backend": attn_backend,
            "in_chans": in_chans,
        })
        self.embed_dim, self.depth, self.num_heads, self.patch_size = embed_dim, depth, num_heads, patch_size
        self.num_registers, self.pos_embed_type, self.pos_interp_offset = num_registers, pos_embed, pos_interp_offset
        self.pos_interp_antialias = pos_interp_antialias
        self.ffn_layer = ffn_layer
        self.ffn_hidden = ffn_hidden_dim(embed_dim, ffn_layer, ffn_ratio, ffn_align, ffn_hidden)
        self.grad_checkpointing = grad_checkpointing

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.register_tokens = nn.Parameter(torch.zeros(1, num_registers, embed_dim)) if num_registers else None
        self.pos_embed = (nn.Parameter(torch.zeros(1, 1 + pos_embed_grid**2, embed_dim))
                          if pos_embed == "learned" else None)
        self.mask_token = nn.Parameter(torch.zeros(embed_dim))
        dpr = drop_path_rates(drop_path_rate, depth, drop_path_uniform)
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, ffn_layer, self.ffn_hidden, qkv_bias, proj_bias, ffn_bias, dpr[i],
                  layerscale_init, norm_eps, attn_backend)
            for i in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)
        self.register_buffer("rope_inv_periods", rope_inv_periods(embed_dim // num_heads, rope_base,
                                                                  rope_zero_fraction), persistent=False)
        self.apply(init_weights)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        if self.pos_embed is not None:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def interpolate_pos_embed(self, grid: tuple[int, int]) -> Tensor:
        """Learned positions for an (Hp, Wp) grid: (1, 1 + Hp*Wp, D), bicubic as in DINOv2.

        ``pos_interp_antialias`` selects PyTorch's antialiased bicubic (the setting of DINOv2's register
        models and of timm's ``resample_abs_pos_embed``), which differs even when upsampling.
        """
        pos = self.pos_embed
        m = self.config["pos_embed_grid"]
        if grid == (m, m):
            return pos
        patch_pos = pos[:, 1:].float().reshape(1, m, m, -1).permute(0, 3, 1, 2)
        if self.pos_interp_offset:  # DINOv2's scale-factor form, kept for weight fidelity
            off = self.pos_interp_offset
            patch_pos = F.interpolate(patch_pos, scale_factor=((grid[0] + off) / m, (grid[1] + off) / m),
                                      mode="bicubic", antialias=self.pos_interp_antialias)
        else:
            patch_pos = F.interpolate(patch_pos, size=grid, mode="bicubic", antialias=self.pos_interp_antialias)
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, -1, pos.shape[-1]).to(pos.dtype)
        return torch.cat([pos[:, :1], patch_pos], dim=1)

    def _run(self, images: Tensor, num_cores: int | None, masks: Tensor | None, collect: set[int]):
        if num_cores is not None:
            raise ValueError(f"num_cores={num_cores!r} given to a dense ViT, which has no core widths; "
                             f"use num_cores=None")
        z, grid = self.patch_embed(images)
        b, n, _ = z.shape
        if masks is not None:
            z = torch.where(masks.unsqueeze(-1), self.mask_token.to(z.dtype), z)
        x = torch.cat([self.cls_token.expand(b, -1, -1).to(z.dtype), z], dim=1)
        if self.pos_embed is not None:
            x = x + self.interpolate_pos_embed(grid).to(z.dtype)
        if self.register_tokens is not None:
            x = torch.cat([x[:, :1], self.register_tokens.expand(b, -1, -1).to(z.dtype), x[:, 1:]], dim=1)
        prefix = 1 + self.num_registers
        rope = None
        if self.pos_embed_type == "rope":
            cos, sin = rope_cos_sin(patch_coords(grid, z.device), self.rope_inv_periods)
            rope = (cos[None, None], sin[None, None])
        outs: dict[int, Tensor] = {}
        for i, blk in enumerate(self.blocks):
            x = self._block(blk, x, rope, None, prefix)
            if i in collect:
                outs[i] = x
        return x, outs, prefix, self.num_registers, grid

    def flops(self, height: int, width: int, num_cores: int | None = None) -> float:
        if num_cores is not None:
            raise ValueError(f"num_cores={num_cores!r} given to a dense ViT; use None")
        n = (height // self.patch_size) * (width // self.patch_size)
        t = n + 1 + self.num_registers
        return float(backbone_flops(
            num_patches=n, num_tokens=t, attn_pairs=dense_attention_pairs(t), dim=self.embed_dim,
            depth=self.depth, hidden=self.ffn_hidden, ffn_layer=self.ffn_layer,
            in_chans=self.patch_embed.in_chans, patch_size=self.patch_size))
