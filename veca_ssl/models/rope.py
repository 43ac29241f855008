"""2D rotary position embedding (RoPE) on normalised coordinates, DINOv3 layout.

Coordinates are (y, x) pairs in [-1, 1] (row first, as DINOv3 stacks its meshgrid). Each head of
dimension ``d`` rotates ``d/4`` frequency pairs per axis; the angle of a frequency ``k`` is
``2π · coord / period_k`` with ``period_k = base ** (k / (d/4))``. VECA's reference zeroes the lowest
1/8 of the frequencies, which leaves those channels position-free (pure content).
Because coordinates are continuous, the same embedding serves patch cell centres at any resolution
and the learned, moving coordinates of VECA's core tokens.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

ZERO_FROM = ("low", "high")


def rope_inv_periods(head_dim: int, base: float = 100.0, zero_fraction: float = 0.0,
                     zero_from: str = "low") -> Tensor:
    """``2π / period_k`` for ``k < head_dim/4`` with ``zero_fraction`` of the frequencies set to 0.

    ``zero_from="low"`` zeroes the lowest frequencies (longest periods, the last entries; they carry
    almost no position anyway), ``"high"`` the highest (the first entries) — the reference's
    ``rope_zero_freqs_from`` options.
    """
    if head_dim % 4:
        raise ValueError(f"2D RoPE needs a head dimension divisible by 4, got {head_dim}")
    if zero_from not in ZERO_FROM:
        raise ValueError(f"rope zero_from={zero_from!r}; valid: {', '.join(ZERO_FROM)}")
    n_freq = head_dim // 4
    periods = base ** (torch.arange(n_freq, dtype=torch.float64) / n_freq)
    inv = 2 * math.pi / periods
    n_zero = int(round(n_freq * zero_fraction))
    if n_zero:
        if zero_from == "low":
            inv[n_freq - n_zero :] = 0.0
        else:
            inv[:n_zero] = 0.0
    return inv.float()


def patch_coords(grid: tuple[int, int], device=None, dtype=torch.float32) -> Tensor:
    """Cell centres of an (Hp, Wp) grid on [-1, 1]², each axis normalised on its own: (Hp*Wp, 2) (y, x)."""
    hp, wp = grid
    ys = (torch.arange(hp, device=device, dtype=dtype) + 0.5) / hp * 2 - 1
    xs = (torch.arange(wp, device=device, dtype=dtype) + 0.5) / wp * 2 - 1
    return torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).reshape(-1, 2)


def rope_cos_sin(coords: Tensor, inv_periods: Tensor) -> tuple[Tensor, Tensor]:
    """cos/sin tables for coordinates (..., T, 2): each (..., T, head_dim), [y-freqs, x-freqs] tiled twice."""
    angles = coords[..., :, None] * inv_periods.to(coords.device, coords.dtype)  # (..., T, 2, n_freq)
    angles = angles.flatten(-2)  # (..., T, head_dim / 2)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate (B, heads, T, d) by tables broadcastable to it.

    Same result as ``x * cos + cat(-x2, x1) * sin`` (rotate-half RoPE), computed on half-width views: the tables are
    tiled twice, so each half needs only the first half of the table, which saves a negation and a
    full-width concatenation per call (RoPE is a visible share of VECA's time at high resolution).
    """
    half = x.shape[-1] // 2
    cos, sin = cos[..., :half].to(x.dtype), sin[..., :half].to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def rope_freqs(coords: Tensor, inv_periods: Tensor) -> Tensor:
    """Unit complex rotations ``exp(i·angle)`` for coordinates (..., T, 2): (..., T, head_dim / 2).

    Same angles as :func:`rope_cos_sin` ([y-freqs, x-freqs]), for the interleaved-pair layout of
    :func:`apply_rope_pairs`.
    """
    angles = (coords[..., :, None].float() * inv_periods.to(coords.device, torch.float32)).flatten(-2)
    return torch.polar(torch.ones_like(angles), angles)


def apply_rope_pairs(x: Tensor, freqs: Tensor) -> Tensor:
    """Rotate channel pairs ``(2j, 2j+1)`` of ``x`` (..., d) by ``freqs`` (complex, broadcastable to (..., d/2)).

    The interleaved (RoFormer) layout lets the rotation be one complex multiplication: a single
    read of ``x`` and a single write, about 5x faster on CPU than the rotate-half form's slices,
    products and concatenation — at high resolution RoPE on every patch's query and key is most of
    what VECA spends beyond its matmuls. It is the rotate-half RoPE up to a fixed permutation of
    the query/key channels (``q·k`` is unchanged when both are permuted alike). Accepts strided
    inputs (e.g. q and k as views of one fused qkv output); the result is contiguous in ``x``'s order.
    """
    rotated = torch.view_as_complex(x.float().unflatten(-1, (-1, 2))) * freqs
    return torch.view_as_real(rotated).flatten(-2).to(x.dtype)


def farthest_point_coords(num_points: int, extent: float = 0.95, grid: int = 41) -> Tensor:
    """Deterministic farthest-point ordering of points inside ±``extent``, starting at the centre.

    Every prefix of the result is spread over the image, which is what a nested core bank needs:
    the first C cores cover the image at every width C. Returns (num_points, 2) (y, x).
    """
    if num_points > grid * grid:
        raise ValueError(f"cannot place {num_points} cores on a {grid}x{grid} candidate grid")
    axis = torch.linspace(-extent, extent, grid, dtype=torch.float64, device="cpu")
    cand = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), dim=-1).reshape(-1, 2)
    chosen = [int(torch.argmin(cand.norm(dim=1)))]
    dist = (cand - cand[chosen[0]]).norm(dim=1)
    for _ in range(num_points - 1):
        nxt = int(torch.argmax(dist))  # argmax returns the first maximum: deterministic ties
        chosen.append(nxt)
        dist = torch.minimum(dist, (cand - cand[nxt]).norm(dim=1))
    return cand[chosen].float()
