"""VECA: Visual Elastic Core Attention (arXiv 2605.12491).

Patches never attend to each other: every block runs on ``[R_C; Z]`` where ``R_C`` is the prefix of
``C`` tokens of an ordered bank of ``M`` learned cores, and patches only read from the cores (see
``attention.py``). Cost per layer is ``2NC + C²`` query–key pairs — linear in the number of patches.

Elasticity: the bank is one (M, D) parameter and a forward pass slices its first ``C`` rows, so a
width's output can only depend on cores < C and cores >= C receive exactly-zero gradient rows
(DDP needs no ``find_unused_parameters``); the training optimiser then leaves those rows and their
moments untouched, chunk by chunk, as the reference's separate chunk parameters
(``veca_ssl.train.optim.ElasticAdamW``). Training with nested widths makes every prefix a
working model: pick any width in ``budgets`` at inference without retraining.

Positions: 2D RoPE on queries and keys (interleaved channel pairs, one complex product per block). Patches sit at their cell centres on [-1, 1]²; each core has
a learned coordinate (raw, pre-tanh), initialised by farthest-point sampling inside ±0.95 so every
prefix is spread over the image, and moved after every block but the last by a small linear head
on the core's state: ``raw += alpha_l · Linear_l(core)`` (``alpha_l`` learned, initialised 0.01).
During training the patch coordinates are shifted (±0.08 per axis) and then rescaled (×[0.5, 2],
log-uniform), one draw per batch — the coordinate augmentation of the reference, which keeps the
cores from over-fitting to one absolute layout of the patches (``coord_aug="image"``: one draw per
image). Eval mode (and so the EMA teacher) uses the plain cell centres.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .base import Backbone, init_weights
from .block import Block
from .flops import backbone_flops, veca_attention_pairs
from .layers import PatchEmbed, drop_path_rates, ffn_hidden_dim
from .rope import farthest_point_coords, patch_coords, rope_freqs, rope_inv_periods


def nested_widths(num_cores: int, core_chunk: int = 8) -> tuple[int, ...]:
    if core_chunk < 1 or num_cores < core_chunk or num_cores % core_chunk:
        raise ValueError(
            f"num_cores={num_cores} must be a positive multiple of core_chunk={core_chunk} "
            f"(e.g. {max(core_chunk, num_cores // max(core_chunk, 1) * core_chunk)})"
        )
    return tuple(range(core_chunk, num_cores + 1, core_chunk))


class VECA(Backbone):
    """Visual Elastic Core Attention: a ViT whose patches exchange information only through an ordered
    bank of ``num_cores`` learned core tokens (see the module docstring).

    A forward pass at width ``C`` (``num_cores=C``, any of ``budgets``; default the whole bank) uses the
    first ``C`` cores: cost per block ``2NC + C²`` query-key pairs for ``N`` patches. The image feature
    (``"cls"``) is core 0 after the final LayerNorm; ``"patches"`` are the dense features on the input's
    patch grid (any multiple of the patch size, non-square included).
    """

    arch = "veca"

    def __init__(self, patch_size: int = 16, embed_dim: int = 384, depth: int = 12, num_heads: int = 6,
                 num_cores: int = 64, core_chunk: int = 8, ffn_layer: str = "swiglu",
                 ffn_ratio: float | None = None, qkv_bias: bool = True, drop_path_rate: float = 0.0,
                 drop_path_uniform: bool = False,
                 layerscale_init: float | None = None, norm_eps: float = 1e-5, rope_base: float = 100.0,
                 rope_zero_fraction: float = 0.125, coord_shift: float = 0.08,
                 coord_rescale: tuple[float, float] = (0.5, 2.0), coord_aug: str = "batch",
                 coord_alpha_init: float = 0.01,
                 attn_backend: str = "auto", in_chans: int = 3, grad_checkpointing: bool = False,
                 ffn_align: int = 1, ffn_hidden: int | None = None, output_dim: int | None = None,
                 patch_norm: bool = False, coord_jitter: float | None = None,
                 rope_zero_from: str = "low") -> None:
        """Reference numbers by default: LayerNorm eps 1e-5, SwiGLU hidden ``int(dim * 8/3)``
        (``ffn_align=1``; 2730 for a 1024-d model). Configs saved before ``ffn_align`` existed used
        multiples of 8 and eps 1e-6; they store their values (``build_from_config`` fills the
        missing ``ffn_align``), so old checkpoints rebuild their exact shapes.

        ``output_dim`` adds a linear projection of the final features to a teacher's width (the
        reference's ``output_proj`` of distilled models); see ``forward_features(space=...)``.
        ``patch_norm`` adds a LayerNorm after the patch embedding; ``coord_jitter`` (> 1) scales each
        axis of the patch coordinates by a log-uniform factor in [1/j, j] during training;
        ``rope_zero_from`` picks which end of the RoPE spectrum ``rope_zero_fraction`` zeroes.
        ``coord_aug``: ``"batch"`` (the reference) draws one coordinate augmentation per batch, ``"image"``
        one per image. ``drop_path_uniform``: every block drops paths at ``drop_path_rate`` (DINOv2's
        option) instead of a linear ramp from 0.
        """
        super().__init__({
            "patch_size": patch_size, "embed_dim": embed_dim, "depth": depth, "num_heads": num_heads,
            "num_cores": num_cores, "core_chunk": core_chunk, "ffn_layer": ffn_layer, "ffn_ratio": ffn_ratio,
            "ffn_align": ffn_align, "ffn_hidden": ffn_hidden,
            "qkv_bias": qkv_bias, "drop_path_rate": drop_path_rate, "drop_path_uniform": drop_path_uniform,
            "layerscale_init": layerscale_init,
            "norm_eps": norm_eps, "rope_base": rope_base, "rope_zero_fraction": rope_zero_fraction,
            "rope_zero_from": rope_zero_from,
            "coord_shift": coord_shift, "coord_rescale": list(coord_rescale), "coord_jitter": coord_jitter,
            "coord_aug": coord_aug,
            "coord_alpha_init": coord_alpha_init, "attn_backend": attn_backend, "in_chans": in_chans,
            "output_dim": output_dim, "patch_norm": patch_norm,
        })
        self._budgets = nested_widths(num_cores, core_chunk)
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.embed_dim, self.depth, self.num_heads, self.patch_size = embed_dim, depth, num_heads, patch_size
        self.num_cores = num_cores
        self.ffn_layer = ffn_layer
        self.ffn_hidden = ffn_hidden_dim(embed_dim, ffn_layer, ffn_ratio, ffn_align, ffn_hidden)
        self.coord_shift, self.coord_rescale = coord_shift, tuple(coord_rescale)
        if coord_jitter is not None and coord_jitter < 1.0:
            raise ValueError(f"coord_jitter={coord_jitter} must be >= 1 (a scale range [1/j, j]) or None")
        self.coord_jitter = coord_jitter
        if coord_aug not in ("batch", "image"):
            raise ValueError(f"coord_aug={coord_aug!r}; valid: 'batch' (the reference: one shift and one "
                             f"rescale per batch) or 'image' (one per image)")
        self.coord_aug = coord_aug
        self.grad_checkpointing = grad_checkpointing

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, norm=patch_norm)
        self.cores = nn.Parameter(torch.empty(num_cores, embed_dim))
        # stored pre-tanh so the per-layer updates stay unconstrained
        self.core_coords = nn.Parameter(torch.atanh(farthest_point_coords(num_cores)))
        self.mask_token = nn.Parameter(torch.zeros(embed_dim))
        dpr = drop_path_rates(drop_path_rate, depth, drop_path_uniform)
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, ffn_layer, self.ffn_hidden, qkv_bias, True, True, dpr[i], layerscale_init,
                  norm_eps, attn_backend)
            for i in range(depth)
        )
        # a coordinate update after the last block would feed nothing: depth - 1 heads
        self.coord_heads = nn.ModuleList(nn.Linear(embed_dim, 2) for _ in range(depth - 1))
        # registered only when there is a head to scale (an empty parameter would never get a gradient)
        self.coord_alpha = (nn.Parameter(torch.full((depth - 1,), float(coord_alpha_init))) if depth > 1
                            else None)
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)
        self.output_proj = nn.Linear(embed_dim, output_dim) if output_dim is not None else None
        self.register_buffer("rope_inv_periods", rope_inv_periods(embed_dim // num_heads, rope_base,
                                                                  rope_zero_fraction, rope_zero_from),
                             persistent=False)
        self.apply(init_weights)
        # as the reference's core chunks: N(0, 1/D). The cores are the only content that patches can
        # read in the first block; at timm's std 0.02 (~0.3/sqrt(D) for D=192) they start ~4x
        # closer to one another than the reference's bank.
        nn.init.normal_(self.cores, std=embed_dim ** -0.5)

    @property
    def budgets(self) -> tuple[int, ...]:
        return self._budgets

    def check_width(self, num_cores: int | None) -> int:
        if num_cores is None:
            return self.num_cores
        if isinstance(num_cores, bool) or int(num_cores) != num_cores or int(num_cores) not in self._budgets:
            raise ValueError(f"num_cores={num_cores!r} is not a valid core width; valid widths: "
                             f"{self._budgets}")
        return int(num_cores)

    def _patch_coords(self, batch: int, grid: tuple[int, int], device) -> Tensor:
        """Patch cell centres, (1, N, 2) — or (B, N, 2) with per-image augmentation — augmented in
        training as the reference does: a shift U(±coord_shift) per axis, then the optional per-axis
        jitter, *then* one isotropic rescale, log-uniform in ``coord_rescale``. ``coord_aug="batch"``
        (the reference) draws one augmentation for the whole batch; ``"image"`` one per image."""
        coords = patch_coords(grid, device)[None]  # (1, N, 2)
        lo, hi = self.coord_rescale
        jitter = self.coord_jitter is not None and self.coord_jitter != 1.0
        if self.training and (self.coord_shift > 0 or lo != 1.0 or hi != 1.0 or jitter):
            # the reference's order: shift, then per-axis jitter, then one isotropic rescale
            n = batch if self.coord_aug == "image" else 1
            shift = (torch.rand(n, 1, 2, device=device) * 2 - 1) * self.coord_shift
            log_scale = torch.empty(n, 1, 1, device=device).uniform_(math.log(lo), math.log(hi))
            coords = coords + shift
            if jitter:
                j = math.log(self.coord_jitter)
                coords = coords * torch.empty(n, 1, 2, device=device).uniform_(-j, j).exp()
            coords = coords * log_scale.exp()
        return coords

    def _run(self, images: Tensor, num_cores: int | None, masks: Tensor | None, collect: set[int]):
        c = self.check_width(num_cores)
        z, grid = self.patch_embed(images)
        b, n, _ = z.shape
        if masks is not None:
            if masks.shape != (b, n):
                raise ValueError(f"masks must be (B, N) = {(b, n)}, got {tuple(masks.shape)}")
            z = torch.where(masks.unsqueeze(-1), self.mask_token.to(z.dtype), z)
        x = torch.cat([self.cores[:c].to(z.dtype).expand(b, -1, -1), z], dim=1)

        # patch rotations are fixed for the pass; the cores' move with their coordinates every block
        rope_p = rope_freqs(self._patch_coords(b, grid, z.device), self.rope_inv_periods).expand(b, -1, -1)
        core_raw = self.core_coords[:c].expand(b, -1, -1)
        outs: dict[int, Tensor] = {}
        for i, blk in enumerate(self.blocks):
            rope = torch.cat([rope_freqs(torch.tanh(core_raw), self.rope_inv_periods), rope_p], dim=1)
            x = self._block(blk, x, rope, c)
            if i in collect:
                outs[i] = x
            if i < self.depth - 1:
                core_raw = core_raw + self.coord_alpha[i] * self.coord_heads[i](x[:, :c]).float()
        return x, outs, c, c, grid

    def core_coordinates(self, num_cores: int | None = None) -> Tensor:
        """Initial (layer-0) core coordinates in [-1, 1]², (C, 2) as (y, x)."""
        return torch.tanh(self.core_coords[: self.check_width(num_cores)]).detach()

    def flops(self, height: int, width: int, num_cores: int | None = None) -> float:
        c = self.check_width(num_cores)
        n = (height // self.patch_size) * (width // self.patch_size)
        coord_heads = (self.depth - 1) * 2 * c * self.embed_dim * 2
        return float(backbone_flops(
            num_patches=n, num_tokens=n + c,
            attn_pairs=0 if self.config["attn_backend"] == "none" else veca_attention_pairs(n, c), dim=self.embed_dim,
            depth=self.depth, hidden=self.ffn_hidden, ffn_layer=self.ffn_layer,
            in_chans=self.patch_embed.in_chans, patch_size=self.patch_size, extra=coord_heads))
