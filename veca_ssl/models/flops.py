"""Analytic FLOP counts (2 × multiply–accumulates), attention included.

PyTorch's FLOP counter does not see CPU ``scaled_dot_product_attention``, and attention is exactly
where VECA differs from a dense ViT, so counts are derived here from the architecture and tested
against ``torch.utils.flop_counter`` on the explicit-matmul (``math``) attention backend.
Element-wise work (norms, softmax, activations, RoPE rotations) is not counted, as is customary.
"""

from __future__ import annotations


def veca_attention_pairs(num_patches: int, num_cores: int) -> int:
    """Query–key pairs per layer and head: cores×(cores+patches) + patches×cores = 2NC + C²."""
    return 2 * num_patches * num_cores + num_cores * num_cores


def dense_attention_pairs(num_tokens: int) -> int:
    return num_tokens * num_tokens


def attention_block_flops(num_tokens: int, dim: int, attn_pairs: int) -> int:
    """qkv + scores + weighted values + output projection, for one block and one image."""
    return 2 * num_tokens * dim * 3 * dim + 4 * attn_pairs * dim + 2 * num_tokens * dim * dim


def ffn_flops(num_tokens: int, dim: int, hidden: int, ffn_layer: str) -> int:
    if ffn_layer == "swiglu":
        return 2 * num_tokens * (dim * 2 * hidden + hidden * dim)
    return 2 * num_tokens * (dim * hidden + hidden * dim)


def patch_embed_flops(num_patches: int, in_chans: int, patch_size: int, dim: int) -> int:
    return 2 * num_patches * in_chans * patch_size * patch_size * dim


def backbone_flops(*, num_patches: int, num_tokens: int, attn_pairs: int, dim: int, depth: int, hidden: int,
                   ffn_layer: str, in_chans: int, patch_size: int, extra: int = 0) -> int:
    """Whole forward pass of one image: patch embedding + ``depth`` blocks + model-specific ``extra``."""
    per_block = attention_block_flops(num_tokens, dim, attn_pairs) + ffn_flops(num_tokens, dim, hidden, ffn_layer)
    return patch_embed_flops(num_patches, in_chans, patch_size, dim) + depth * per_block + extra
