"""Which attention kernel ``F.scaled_dot_product_attention`` can run on a call, and which one it ran.

SDPA picks a kernel per call at run time and falls back without a word when the inputs fail a
kernel's checks: on CUDA the first of cuDNN / flash / memory-efficient / math that accepts them
(``select_sdp_backend`` in PyTorch's ``aten/src/ATen/native/transformers/cuda/sdp_utils.cpp``), on
the CPU its flash kernel or math (``select_sdp_backend_cpp`` in ``sdp_utils_cpp.cpp``). The math
fallback materialises the (L, S) score matrix, which costs VECA its linear memory at high resolution
and runs several times slower. So the inputs each attention call builds are checked here against
the fused kernels' own conditions, written from those sources (the ``check_*`` name of each rule is
quoted in its message), and the kernel that actually ran is read from the profiler:

- :class:`SDPACall` — what one call handed SDPA: shapes, strides, storage offsets, dtypes, mask,
  dropout; :func:`kernel_blockers` — the conditions of ``"flash"`` / ``"efficient"`` (CUDA, for a GPU
  of a given compute capability) or ``"flash_cpu"`` that the call fails (empty: eligible).
- :func:`capture_sdpa` — a spy recording every call made inside it (the tests run every preset
  through it; ``veca doctor`` also asks PyTorch's own ``can_use_*_attention`` about each call).
- ``veca_ssl.models.kernels`` runs one block of a backbone under the profiler and names the kernel
  that ran (``attention_kernels``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

KERNELS = ("flash", "efficient", "flash_cpu")

# The (major, minor) compute capability the static checks assume when none is given: sm90 (H100/H200),
# what the product's cluster jobs run on. The checks of sm80 (A100) give the same verdicts for every
# input VECA and the dense ViT build (the tests check both).
DEFAULT_CAPABILITY = (9, 0)

LOW_PRECISION = (torch.float16, torch.bfloat16)

# Conditions stricter than PyTorch's gates (SDPA would run the kernel, at a cost): a head dim that is
# not a multiple of 8 (flash pads q, k, v with a copy) and an attention mask (the memory-efficient
# kernel reads it as a materialised (L, S) bias). Their reasons start with these names.
POLICY_RULES = ("pad_last_dim<8>", "no materialised bias")


@dataclass(frozen=True)
class SDPACall:
    """The metadata of one ``scaled_dot_product_attention`` call (no tensors are kept)."""

    q_shape: tuple[int, ...]
    k_shape: tuple[int, ...]
    v_shape: tuple[int, ...]
    q_stride: tuple[int, ...]
    k_stride: tuple[int, ...]
    v_stride: tuple[int, ...]
    q_offset: int
    k_offset: int
    v_offset: int
    q_dtype: torch.dtype
    k_dtype: torch.dtype
    v_dtype: torch.dtype
    device: str
    has_mask: bool = False
    mask_shape: tuple[int, ...] | None = None
    mask_requires_grad: bool = False
    dropout_p: float = 0.0
    is_causal: bool = False
    enable_gqa: bool = False
    requires_grad: bool = False

    @classmethod
    def of(cls, query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None,
           dropout_p: float = 0.0, is_causal: bool = False, enable_gqa: bool = False) -> SDPACall:
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
        return cls(tuple(query.shape), tuple(key.shape), tuple(value.shape),
                   tuple(query.stride()), tuple(key.stride()), tuple(value.stride()),
                   query.storage_offset(), key.storage_offset(), value.storage_offset(),
                   query.dtype, key.dtype, value.dtype, query.device.type,
                   attn_mask is not None, None if attn_mask is None else tuple(attn_mask.shape),
                   bool(attn_mask is not None and attn_mask.requires_grad), float(dropout_p), bool(is_causal),
                   bool(enable_gqa), grad)

    def describe(self) -> str:
        dt = {str(d).removeprefix("torch.") for d in (self.q_dtype, self.k_dtype, self.v_dtype)}
        return (f"q{list(self.q_shape)} k{list(self.k_shape)} v{list(self.v_shape)} {'/'.join(sorted(dt))}"
                f"{' mask' if self.has_mask else ''} on {self.device}")


# ------------------------------------------------------------------------------ the conditions
# Each rule returns None (passes) or the reason it fails, led by the PyTorch check it mirrors.

def _four_dims(c: SDPACall) -> str | None:
    if not len(c.q_shape) == len(c.k_shape) == len(c.v_shape) == 4:
        return (f"check_tensor_shapes: q, k, v must be 4-D (batch, heads, tokens, head_dim), got "
                f"{len(c.q_shape)}/{len(c.k_shape)}/{len(c.v_shape)}-D")
    return None


def _no_mask(c: SDPACall) -> str | None:
    if c.has_mask:
        return "check_for_attn_mask: flash attention takes no attn_mask"
    return None


def _no_bias(c: SDPACall) -> str | None:
    # The efficient kernel accepts a mask, but SDPA turns a boolean one into an additive float bias
    # (convert_boolean_attn_mask in aten/src/ATen/native/transformers/attention.cpp) that is read per
    # (query, key) pair: an (L, S) tensor in memory, quadratic in the tokens — what VECA exists to avoid.
    if c.has_mask:
        return ("no materialised bias: an attn_mask becomes an (L, S) additive bias in memory "
                "(convert_boolean_attn_mask); express the pattern as separate calls instead")
    return None


def _same_head_dim_le_256(c: SDPACall) -> str | None:
    q, k, v = c.q_shape[-1], c.k_shape[-1], c.v_shape[-1]
    if not (q == k == v and q <= 256):
        return f"check_head_dim_size_flash: q, k, v head dims must be equal and <= 256, got {q}/{k}/{v}"
    return None


def _head_dim_multiple_of_8(c: SDPACall) -> str | None:
    # SDPA's flash path pads q, k and v to a multiple of 8 channels before the kernel (a copy of all
    # three: pad_last_dim<8> in attention.cpp's scaled_dot_product_attention) and slices the output.
    if c.q_shape[-1] % 8:
        return f"pad_last_dim<8>: a head dim of {c.q_shape[-1]} (not a multiple of 8) makes SDPA pad q, k, v with a copy"
    return None


def _same_head_dim(c: SDPACall) -> str | None:
    if not c.q_shape[-1] == c.k_shape[-1] == c.v_shape[-1]:
        return (f"check_head_dim_size_cpp: q, k, v head dims must be equal, got "
                f"{c.q_shape[-1]}/{c.k_shape[-1]}/{c.v_shape[-1]}")
    return None


def _batch_and_heads(c: SDPACall) -> str | None:
    (bq, hq), (bk, hk), (bv, hv) = c.q_shape[:2], c.k_shape[:2], c.v_shape[:2]
    if not bq == bk == bv:
        return f"check_batch_size_and_num_heads_dense: q, k, v batch sizes must be equal, got {bq}/{bk}/{bv}"
    if hq == hk == hv:
        return None
    if c.enable_gqa and hk == hv and hk and hq % hk == 0:  # grouped-query attention (flash, efficient, cpu)
        return None
    return (f"check_batch_size_and_num_heads_dense: q, k, v head counts must be equal (or grouped with "
            f"enable_gqa), got {hq}/{hk}/{hv}")


def _nonzero_tokens(c: SDPACall) -> str | None:
    if c.q_shape[-2] == 0 or c.k_shape[-2] == 0:
        return "check_nonzero_sequence_lengths_dense: zero-length query or key sequence"
    return None


def _last_dim_contiguous(ignore_singleton: bool) -> Callable[[SDPACall], str | None]:
    def rule(c: SDPACall) -> str | None:
        ok = c.q_stride[-1] == 1 and c.k_stride[-1] == 1 and c.v_stride[-1] == 1
        if ignore_singleton:  # flash's variant: a head dim of 1 has no stride to speak of
            ok = ok or c.q_shape[-1] == 1
        if not ok:
            return (f"check_last_dim_stride_equals_1_dense: q, k, v need stride 1 in the head dim, got "
                    f"{c.q_stride[-1]}/{c.k_stride[-1]}/{c.v_stride[-1]}")
        return None

    return rule


def _dtypes(allowed: tuple[torch.dtype, ...], check: str) -> Callable[[SDPACall], str | None]:
    def rule(c: SDPACall) -> str | None:
        if not (c.q_dtype == c.k_dtype == c.v_dtype and c.q_dtype in allowed):
            names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
            return (f"{check}: q, k, v must share one dtype among {{{names}}}, got "
                    f"{c.q_dtype}/{c.k_dtype}/{c.v_dtype}".replace("torch.", ""))
        return None

    return rule


def _flash_dtypes(capability: tuple[int, int]) -> Callable[[SDPACall], str | None]:
    # check_dtypes_flash_attention -> check_dtypes_low_precision: fp16/bf16 from sm80, fp16 below
    allowed = LOW_PRECISION if capability >= (8, 0) else (torch.float16,)
    return _dtypes(allowed, "check_dtypes_flash_attention")


def _flash_hardware(capability: tuple[int, int]) -> Callable[[SDPACall], str | None]:
    def rule(c: SDPACall) -> str | None:
        if not (8, 0) <= capability <= (12, 1):
            return f"check_flash_attention_hardware_support: flash needs sm80..sm121, this is sm{capability[0]}{capability[1]}"
        return None

    return rule


def _flash_training_head_dim(capability: tuple[int, int]) -> Callable[[SDPACall], str | None]:
    def rule(c: SDPACall) -> str | None:
        consumer = (8, 6) <= capability <= (8, 9) or (12, 0) <= capability <= (12, 1)
        d = c.q_shape[-1]
        if c.requires_grad and consumer and not (d <= 192 or (c.dropout_p == 0 and d > 224)):
            return ("check_requires_grad_and_head_dim_gt192_constraints_on_sm86_89_or_120: no flash backward "
                    f"for head dim {d} on sm{capability[0]}{capability[1]}")
        return None

    return rule


def _causal_square(c: SDPACall) -> str | None:
    if c.is_causal and c.q_shape[-2] != c.k_shape[-2]:
        return "check_flash_causal_non_square_seqlens: is_causal needs as many queries as keys"
    return None


def _gemm_alignment(capability: tuple[int, int], dtype: torch.dtype) -> int:
    """``minimum_gemm_alignment`` of sdp_utils.cpp: elements a head dim (and a storage offset) must be a
    multiple of for the CUTLASS memory-efficient kernel."""
    half = dtype in LOW_PRECISION
    tensor_cores = capability[0] >= 8 or (capability[0] >= 7 and half)
    align = 4 if capability[0] >= 8 else 1
    if tensor_cores:
        align = max(align, 128 // (16 if half else 32))
    return align


def _efficient_head_dim(capability: tuple[int, int]) -> Callable[[SDPACall], str | None]:
    def rule(c: SDPACall) -> str | None:
        a = _gemm_alignment(capability, c.q_dtype)
        q, k, v = c.q_shape[-1], c.k_shape[-1], c.v_shape[-1]
        if not (q == k and q > 0 and v > 0 and q % a == 0 and v % a == 0):
            return (f"check_head_dim_size_mem_efficient: q and k head dims must be equal and q, v head dims "
                    f"multiples of {a}, got {q}/{k}/{v}")
        return None

    return rule


def _efficient_offsets(capability: tuple[int, int]) -> Callable[[SDPACall], str | None]:
    def rule(c: SDPACall) -> str | None:
        if capability[0] < 8:
            return None
        a = _gemm_alignment(capability, c.q_dtype)
        bad = [n for n, off, shape in (("q", c.q_offset, c.q_shape), ("k", c.k_offset, c.k_shape),
                                       ("v", c.v_offset, c.v_shape)) if off % a and all(shape)]
        if bad:
            return (f"check_data_ptr_alignment_mem_efficient: storage offsets of {', '.join(bad)} must be "
                    f"multiples of {a} elements on sm80+")
        return None

    return rule


def _efficient_dtypes(capability: tuple[int, int]) -> Callable[[SDPACall], str | None]:
    allowed = (torch.float16, torch.float32, torch.bfloat16) if capability[0] >= 8 else (torch.float16, torch.float32)
    return _dtypes(allowed, "can_use_mem_efficient_attention dtypes")


def _efficient_hardware(capability: tuple[int, int]) -> Callable[[SDPACall], str | None]:
    def rule(c: SDPACall) -> str | None:
        if not (5, 0) <= capability <= (12, 1):
            return f"check_mem_efficient_hardware_support: needs sm50..sm121, this is sm{capability[0]}{capability[1]}"
        return None

    return rule


def _no_dropout(c: SDPACall) -> str | None:
    if c.dropout_p > 0:
        return "check_for_dropout: the CPU flash kernel takes no dropout"
    return None


def _mask_shape(c: SDPACall) -> str | None:
    if not c.has_mask:
        return None
    m, (b, h, lq), lk = c.mask_shape or (), c.q_shape[:3], c.k_shape[-2]
    fits = lambda dim, target: dim in (1, target)  # noqa: E731
    ok = (not c.mask_requires_grad and len(m) in (2, 4) and fits(m[-2], lq) and fits(m[-1], lk)
          and (len(m) == 2 or (fits(m[0], b) and fits(m[1], h))))
    if not ok:
        return f"check_attn_mask_shape: mask of shape {list(m)} is not (L, S) or (B|1, H|1, L, S)"
    return None


def _rules(kernel: str, capability: tuple[int, int]) -> list[Callable[[SDPACall], str | None]]:
    if kernel == "flash":  # can_use_flash_attention (cuda/sdp_utils.cpp), dense inputs
        return [_flash_hardware(capability), _four_dims, _no_mask, _same_head_dim_le_256, _head_dim_multiple_of_8,
                _flash_training_head_dim(capability), _causal_square, _flash_dtypes(capability),
                _batch_and_heads, _nonzero_tokens, _last_dim_contiguous(ignore_singleton=True)]
    if kernel == "efficient":  # can_use_mem_efficient_attention (cuda/sdp_utils.cpp), dense inputs
        return [_efficient_hardware(capability), _four_dims, _no_bias, _efficient_head_dim(capability),
                _efficient_offsets(capability), _nonzero_tokens, _last_dim_contiguous(ignore_singleton=False),
                _batch_and_heads, _efficient_dtypes(capability)]
    if kernel == "flash_cpu":  # use_flash_attention_cpp (sdp_utils_cpp.cpp)
        return [_no_dropout, _four_dims, _batch_and_heads, _mask_shape, _same_head_dim, _nonzero_tokens,
                _last_dim_contiguous(ignore_singleton=False),
                _dtypes((torch.float32, torch.float64, torch.bfloat16, torch.float16), "check_tensor_dtype")]
    raise ValueError(f"unknown SDPA kernel {kernel!r}; valid: {', '.join(KERNELS)}")


def kernel_blockers(call: SDPACall, kernel: str, capability: tuple[int, int] = DEFAULT_CAPABILITY) -> list[str]:
    """The conditions of ``kernel`` that ``call`` fails (``[]``: the kernel can take it).

    ``"flash"`` and ``"efficient"`` are the CUDA kernels on a GPU of compute ``capability``
    (``(9, 0)`` for H100); ``"flash_cpu"`` is the CPU's fused kernel. Runtime switches
    (``torch.backends.cuda.enable_flash_sdp``) and nested tensors are out of scope: these are the
    conditions on the inputs. For the memory-efficient kernel an ``attn_mask`` counts as a blocker
    too: PyTorch would take it, as a materialised (L, S) bias.
    """
    if len(call.q_shape) != 4 or len(call.k_shape) != 4 or len(call.v_shape) != 4:
        return [_four_dims(call)]  # type: ignore[list-item]  # the other rules index 4-D shapes
    return [reason for rule in _rules(kernel, capability) if (reason := rule(call)) is not None]


# ------------------------------------------------------------------------------ the spy
_SDPA_OPTIONS = ("attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


@contextlib.contextmanager
def capture_sdpa(on_call: Callable[..., None] | None = None) -> Iterator[list[SDPACall]]:
    """Record every ``F.scaled_dot_product_attention`` call made inside the block (every caller looks
    the function up on ``torch.nn.functional`` at call time, so they all go through the spy).

    Yields the list the calls are appended to. ``on_call(query, key, value, **options)`` also sees the
    live tensors (``veca doctor`` asks PyTorch's ``can_use_flash_attention`` about them). Patches a
    module attribute: not for concurrent use from several threads.
    """
    calls: list[SDPACall] = []
    original = F.scaled_dot_product_attention

    def spy(query: Tensor, key: Tensor, value: Tensor, *args, **kwargs):
        options = dict(zip(_SDPA_OPTIONS, args), **kwargs)
        calls.append(SDPACall.of(query, key, value, options.get("attn_mask"), options.get("dropout_p", 0.0),
                                 options.get("is_causal", False), options.get("enable_gqa", False)))
        if on_call is not None:
            on_call(query, key, value, **options)
        return original(query, key, value, *args, **kwargs)

    F.scaled_dot_product_attention = spy
    try:
        yield calls
    finally:
        F.scaled_dot_product_attention = original


__all__ = ["SDPACall", "KERNELS", "LOW_PRECISION", "DEFAULT_CAPABILITY", "POLICY_RULES", "kernel_blockers", "capture_sdpa"]
