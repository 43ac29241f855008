"""Multi-head attention with VECA's core–periphery pattern and a dense fallback.

With ``num_cores = C`` the sequence is ``[R_C; Z]`` (C cores, then N patches) and
    cores   attend to cores + patches:  R' = Attn(R_C, [R_C; Z], [R_C; Z])
    patches attend to cores only:      Z' = Attn(Z, R_C, R_C)
so a layer scores ``2NC + C²`` query–key pairs instead of ``(N + C)²``: no patch ever sees another.

Backends (``attn_backend``):
  ``sdpa``        two ``scaled_dot_product_attention`` calls (cores, patches); the default and the
                  fastest on CPU — see ``veca bench backbone --attn-backends``.
  ``sdpa_masked`` one SDPA call over the full sequence with a block-sparse boolean mask; scores all
                  (N + C)² pairs, kept for the side-by-side measurement.
  ``math``        explicit matmul + softmax, same two-part pattern: PyTorch's FLOP counter sees every
                  product, so the analytic FLOP count can be tested against it.
  ``xformers``    ``xformers.ops.memory_efficient_attention`` (CUDA only, optional dependency).
  ``auto``        ``sdpa`` on every device (see :func:`resolve_backend` for why not xformers).
  ``none``        attention removed (output = values): the limit VECA can approach, for benchmarks.

Both SDPA calls of the core pattern (and the dense ViT's one) hand the fused kernels what they take:
q, k, v of one dtype (bf16 under autocast: VECA's RoPE rotation is computed in fp32 and cast back),
stride 1 in the head dim (views of the fused qkv projection), head dim 64 in every preset (a
multiple of 8, <= 256), no mask and no bias — so on a GPU flash attention (or the memory-efficient
kernel) runs, never the math fallback. ``veca_ssl.models.sdpa`` states those conditions with their
sources, the tests check every preset's calls against them, and training logs the kernel that ran
(``veca_ssl.models.kernels``).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .rope import apply_rope, apply_rope_pairs

ATTN_BACKENDS = ("auto", "sdpa", "sdpa_masked", "math", "xformers", "none")


@functools.lru_cache(maxsize=1)
def _xformers_ops():
    try:
        import xformers.ops as xops  # optional GPU extra
    except ImportError:
        return None
    return xops


def _sdpa(q: Tensor, k: Tensor, v: Tensor, backend: str, mask: Tensor | None = None) -> Tensor:
    if backend == "math":
        scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        return scores.softmax(dim=-1) @ v
    if backend == "xformers" and mask is None:
        xops = _xformers_ops()
        out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def core_periphery_mask(num_cores: int, num_tokens: int, device=None) -> Tensor:
    """Boolean (T, T) mask, True where attention is allowed: core rows see all, patch rows see cores."""
    mask = torch.zeros(num_tokens, num_tokens, dtype=torch.bool, device=device)
    mask[:num_cores] = True
    mask[:, :num_cores] = True
    return mask


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in ATTN_BACKENDS:
        raise ValueError(f"unknown attn_backend {backend!r}; valid: {', '.join(ATTN_BACKENDS)}")
    if backend == "auto":
        # SDPA everywhere, also on CUDA with xformers installed: SDPA's flash kernel is PyTorch's own
        # FlashAttention-2 (cuDNN's on recent Hopper set-ups), the dense ViT baseline runs the same
        # kernel (like-for-like speed comparisons), torch.compile traces it without a graph break,
        # and its kernel choice is what veca_ssl.models.sdpa checks and the profiler reports. Both
        # libraries run FlashAttention/CUTLASS kernels for these shapes; xformers stays selectable
        # (attn_backend=xformers) for a measured comparison (veca bench backbone --attn-backend).
        return "sdpa"
    if backend == "xformers" and (device.type != "cuda" or _xformers_ops() is None):
        raise ValueError("attn_backend='xformers' needs CUDA and `pip install veca-ssl[gpu]`; use 'sdpa'")
    return backend


class Attention(nn.Module):
    """Pre-projected multi-head attention; ``num_cores`` switches on the core–periphery pattern.

    ``rope`` is either a complex (B, T, head_dim/2) tensor of rotations for every token, applied to
    interleaved channel pairs (VECA), or a (cos, sin) pair in the rotate-half layout for the last
    ``T - rope_skip`` tokens (dense ViTs, DINOv3-compatible; class/register tokens stay unrotated).
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, proj_bias: bool = True,
                 attn_backend: str = "auto") -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim={dim} must be divisible by num_heads={num_heads}")
        if attn_backend not in ATTN_BACKENDS:
            raise ValueError(f"unknown attn_backend {attn_backend!r}; valid: {', '.join(ATTN_BACKENDS)}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.attn_backend = attn_backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | Tensor | None = None, num_cores: int | None = None,
                rope_skip: int = 0) -> Tensor:
        b, t, d = x.shape
        backend = resolve_backend(self.attn_backend, x.device)
        qkv = self.qkv(x).view(b, t, 3, self.num_heads, self.head_dim)
        if backend == "none":
            return self.proj(qkv[:, :, 2].reshape(b, t, d))
        if isinstance(rope, Tensor):
            # complex (B, T, head_dim/2) rotations, interleaved pairs (VECA): q and k in one pass
            qk = apply_rope_pairs(qkv[:, :, :2], rope[:, :, None, None])
            q, k = qk[:, :, 0].transpose(1, 2), qk[:, :, 1].transpose(1, 2)
            v = qkv[:, :, 2].transpose(1, 2)  # (B, heads, T, head_dim) views
        else:
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            if rope is not None:  # (cos, sin) tables, rotate-half layout (dense ViT, DINOv3-compatible)
                cos, sin = rope
                if rope_skip:
                    q = torch.cat([q[:, :, :rope_skip], apply_rope(q[:, :, rope_skip:], cos, sin)], dim=2)
                    k = torch.cat([k[:, :, :rope_skip], apply_rope(k[:, :, rope_skip:], cos, sin)], dim=2)
                else:
                    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if num_cores is None:
            out = _sdpa(q, k, v, "sdpa" if backend == "sdpa_masked" else backend)
        elif backend == "sdpa_masked":
            out = _sdpa(q, k, v, "sdpa", core_periphery_mask(num_cores, t, x.device))
        else:
            c = num_cores
            out_cores = _sdpa(q[:, :, :c], k, v, backend)
            out_patches = _sdpa(q[:, :, c:], k[:, :, :c], v[:, :, :c], backend)
            # join along tokens in (B, T, heads, d) layout: one copy, and the reshape below is free
            return self.proj(torch.cat([out_cores.transpose(1, 2), out_patches.transpose(1, 2)], dim=1)
                             .reshape(b, t, d))
        return self.proj(out.transpose(1, 2).reshape(b, t, d))
