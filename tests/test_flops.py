"""Analytic FLOP counts: parity with PyTorch's counter on explicit attention, and the VECA paper's table."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from veca_ssl.models import build_backbone
from veca_ssl.models.flops import attention_block_flops, dense_attention_pairs, veca_attention_pairs


def counted_flops(model, images, **kw) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.forward_features(images, **kw)
    return counter.get_total_flops()


@pytest.mark.parametrize("num_cores", [8, 16])
@pytest.mark.parametrize("size", [(32, 32), (48, 24)])
def test_veca_analytic_flops_equal_counter_on_explicit_attention(num_cores, size):
    model = build_backbone("veca_tiny", patch_size=8, embed_dim=64, num_heads=2, depth=3, num_cores=16,
                           attn_backend="math").eval()
    images = torch.randn(1, 3, *size)
    assert counted_flops(model, images, num_cores=num_cores) == model.flops(*size, num_cores=num_cores)


@pytest.mark.parametrize("kw", [dict(), dict(num_registers=4, pos_embed="rope", ffn_layer="mlp")])
def test_vit_analytic_flops_equal_counter(kw):
    model = build_backbone("vit_tiny", patch_size=8, embed_dim=64, num_heads=2, depth=2, attn_backend="math",
                           **kw).eval()
    assert counted_flops(model, torch.randn(1, 3, 40, 32)) == model.flops(40, 32)


def test_attention_term_grows_as_2NC_plus_C2():
    dim, depth = 64, 3
    model = build_backbone("veca_tiny", patch_size=8, embed_dim=dim, num_heads=2, depth=depth, num_cores=64)
    no_attn = build_backbone("veca_tiny", patch_size=8, embed_dim=dim, num_heads=2, depth=depth, num_cores=64,
                             attn_backend="none").eval()
    for side in (32, 64, 128):
        n = (side // 8) ** 2
        for c in (8, 32, 64):
            # what the counter sees without attention + the analytic attention term = analytic total
            rest = counted_flops(no_attn, torch.randn(1, 3, side, side), num_cores=c)
            assert model.flops(side, side, c) - rest == depth * 4 * dim * (2 * n * c + c * c)
    assert veca_attention_pairs(4096, 64) == 2 * 4096 * 64 + 64 * 64


@pytest.mark.parametrize("dim,px,veca,dense", [
    (768, 256, 1.62, 1.44), (768, 512, 5.55, 8.11), (768, 1024, 21.25, 71.02),
    (384, 1024, 5.72, 30.67), (1024, 1024, 37.06, 103.29),
])
def test_reference_attention_block_gflops(dim, px, veca, dense):
    """The VECA paper's table: one attention block at C = 64 vs DINOv3 (class token + 4 storage tokens), /16."""
    n = (px // 16) ** 2
    ours = attention_block_flops(n + 64, dim, veca_attention_pairs(n, 64)) / 1e9
    theirs = attention_block_flops(n + 5, dim, dense_attention_pairs(n + 5)) / 1e9
    assert round(ours, 2) == veca and round(theirs, 2) == dense
