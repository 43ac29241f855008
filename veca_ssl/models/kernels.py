"""Which attention kernel ran: one block of a backbone's architecture under the profiler.

:func:`attention_kernels` / :func:`probe_attention` name the kernel families that ran (flash,
efficient, cudnn, math, xformers) from the CUDA kernel names on a GPU and the ATen op names everywhere,
together with every SDPA call's inputs and the conditions of ``veca_ssl.models.sdpa`` they fail.
``veca train`` prints :meth:`KernelReport.describe` once per run; ``veca bench`` and ``veca doctor``
report it too.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch

from .sdpa import DEFAULT_CAPABILITY, LOW_PRECISION, SDPACall, capture_sdpa, kernel_blockers

# ATen ops SDPA dispatches to, by kernel family (the op names the profiler records on every device)
SDPA_OPS: dict[str, str] = {
    "aten::_scaled_dot_product_flash_attention": "flash",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "flash",
    "aten::_scaled_dot_product_efficient_attention": "efficient",
    "aten::_scaled_dot_product_cudnn_attention": "cudnn",
    "aten::_scaled_dot_product_attention_math": "math",
    "aten::_scaled_dot_product_fused_attention_overrideable": "overrideable",
}


def kernel_family(name: str, device_kernel: bool = False) -> str | None:
    """The attention family of a profiler event name, or None when it is not an attention kernel.

    Op names (every device) are matched exactly against :data:`SDPA_OPS`; xformers ops by their
    namespace. CUDA kernel names (``device_kernel``) by what their libraries call them: cuDNN's
    generated SDPA kernels (``cudnn_generated_…_sdpa_…flash_fprop…``, tested first: they say "flash"
    too), PyTorch's FlashAttention-2 (``pytorch_flash::flash_fwd_kernel<…>``) and the CUTLASS
    memory-efficient kernels (``fmha_cutlassF_…``, ``PyTorchMemEffAttention``).
    """
    if name in SDPA_OPS:
        return SDPA_OPS[name]
    low = name.lower()
    if low.startswith("xformers"):
        return "xformers"
    if not device_kernel:
        return None
    if "cudnn" in low and any(s in low for s in ("sdpa", "fmha", "attention", "flash")):
        return "cudnn"
    if "flash" in low and any(s in low for s in ("fwd", "bwd", "attn", "attention")):
        return "flash"
    if "fmha" in low or "memeffattention" in low or "efficient_attention" in low:
        return "efficient"
    return None


def classify_events(names: Iterable[tuple[str, bool]]) -> dict[str, list[str]]:
    """``{family: sorted event names}`` for ``(name, is_device_kernel)`` pairs of a profile."""
    found: dict[str, set[str]] = {}
    for name, device_kernel in names:
        family = kernel_family(name, device_kernel)
        if family is not None:
            found.setdefault(family, set()).add(name)
    return {family: sorted(found[family]) for family in sorted(found)}


def _profile_names(prof) -> list[tuple[str, bool]]:
    """(name, is device kernel) of every event of a finished ``torch.autograd.profiler.profile``."""
    from torch.autograd import DeviceType

    names = []
    for event in prof.function_events:
        names.append((event.name, getattr(event, "device_type", DeviceType.CPU) != DeviceType.CPU))
        names += [(k.name, True) for k in getattr(event, "kernels", [])]  # older profilers nest kernels
    return names


@dataclass
class KernelReport:
    """What :func:`probe_attention` saw: the kernel families that ran, the profiler names behind them
    and every SDPA call's inputs."""

    kernels: set[str]
    names: dict[str, list[str]]
    calls: list[SDPACall]
    backend: str
    device: str
    dtype: str
    image_size: tuple[int, int]
    error: str | None = None
    blockers: dict[str, list[str]] = field(default_factory=dict)

    def describe(self) -> str:
        """One line, e.g. ``attention: attn_backend=auto -> sdpa, ran flash
        (aten::_scaled_dot_product_flash_attention_for_cpu) on cpu, bfloat16 autocast, 224x224 px``."""
        where = f"on {self.device}, {self.dtype}, {self.image_size[0]}x{self.image_size[1]} px"
        if self.error is not None:
            return f"attention: attn_backend={self.backend}; kernels unknown ({self.error}) {where}"
        ran = "; ".join(f"{fam} ({', '.join(self.names[fam][:2])})" for fam in sorted(self.kernels)) or \
            "no SDPA kernel"
        return f"attention: attn_backend={self.backend}, ran {ran} {where}"


@contextlib.contextmanager
def _quiet_profiler() -> Iterator[None]:
    """Kineto prints ``profiler_start``/``profiler_stop`` lines on stderr at its default level; it reads
    ``KINETO_LOG_LEVEL`` once, when it first starts. A level the user set is kept."""
    if "KINETO_LOG_LEVEL" in os.environ:
        yield
        return
    os.environ["KINETO_LOG_LEVEL"] = "6"
    try:
        yield
    finally:
        os.environ.pop("KINETO_LOG_LEVEL", None)


def probe_attention(backbone, device: torch.device | str, dtype: torch.dtype | None = None,
                    image_size: int | tuple[int, int] | None = None,
                    autocast: contextlib.AbstractContextManager | None = None) -> KernelReport:
    """Run one block of ``backbone``'s architecture on ``device`` and report the attention kernels.

    A one-block copy is built from ``backbone.config`` (so a DDP/FSDP-wrapped or compiled model is
    never called, no rank waits for a collective, and the weights do not matter: the kernel depends
    on the dtypes, shapes and layouts, which are the architecture's), at ``image_size`` (default:
    two by three patches) with batch 1, under the Kineto profiler (``torch.autograd.profiler.profile``,
    which ``torch.profiler.profile`` wraps; the wrapper's first start imports ``torch._inductor``,
    seconds that every training run would pay for one log line). Precision: ``autocast`` (a context
    manager, e.g. the training loop's), else bf16/fp16 autocast for a low-precision ``dtype``, else
    fp32. The global RNG streams are forked, so the caller's randomness is untouched. Never raises
    for a profiler problem: the report then says why the kernels are unknown.
    """
    from torch.autograd.profiler import profile

    from .attention import resolve_backend
    from .registry import build_from_config

    device = torch.device(device)
    p = int(backbone.patch_size)
    size = (2 * p, 3 * p) if image_size is None else (
        (int(image_size), int(image_size)) if isinstance(image_size, int) else tuple(map(int, image_size)))
    config = {**backbone.config, "depth": 1}
    if autocast is None:
        low = dtype in LOW_PRECISION
        autocast = torch.autocast(device.type, dtype=dtype) if low else contextlib.nullcontext()
    config_backend = str(config.get("attn_backend", "auto"))
    try:
        resolved = resolve_backend(config_backend, device)
    except ValueError as exc:
        resolved = f"unusable ({exc})"
    backend = config_backend if config_backend == resolved else f"{config_backend} -> {resolved}"
    cuda = device.type == "cuda"
    fork = [device.index if device.index is not None else torch.cuda.current_device()] if cuda else []
    precision = "float32"
    with torch.random.fork_rng(devices=fork):
        model = build_from_config(config).to(device).eval()
        images = torch.randn(1, int(backbone.patch_embed.in_chans), *size, device=device)
        try:
            with autocast:
                if torch.is_autocast_enabled(device.type):
                    precision = f"{str(torch.get_autocast_dtype(device.type)).removeprefix('torch.')} autocast"
                with _quiet_profiler(), capture_sdpa() as calls, torch.no_grad(), \
                        profile(use_device="cuda" if cuda else None) as prof:
                    model.forward_features(images)
                    if cuda:
                        torch.cuda.synchronize(device)
            names = classify_events(_profile_names(prof))
            error = None
        except (RuntimeError, ValueError) as exc:  # another profiler already running; an unusable backend
            names, error, calls = {}, str(exc).splitlines()[0] if str(exc) else type(exc).__name__, []
    kernels = set(names)
    blockers = {}
    for kernel in (("flash", "efficient") if cuda else ("flash_cpu",)):
        capability = torch.cuda.get_device_capability(device) if cuda else DEFAULT_CAPABILITY
        reasons = sorted({r for c in calls for r in kernel_blockers(c, kernel, capability)})
        if reasons:
            blockers[kernel] = reasons
    return KernelReport(kernels, names, list(calls), backend, device.type, precision, size, error, blockers)


def attention_kernels(backbone, device: torch.device | str, dtype: torch.dtype | None = None,
                      image_size: int | tuple[int, int] | None = None) -> set[str]:
    """The SDPA kernel families (``flash``, ``efficient``, ``cudnn``, ``math``, ``xformers``) that one
    block of ``backbone`` runs on ``device`` at ``dtype`` (see :func:`probe_attention`)."""
    return probe_attention(backbone, device, dtype, image_size).kernels


def print_attention_kernels(backbone, device: torch.device | str,
                            autocast: contextlib.AbstractContextManager | None = None,
                            image_size: int | tuple[int, int] | None = None, enabled: bool = True) -> None:
    """Print :meth:`KernelReport.describe` once (the training set-up's line; ``enabled`` on rank 0)."""
    if enabled:
        print(probe_attention(backbone, device, image_size=image_size, autocast=autocast).describe(), flush=True)


__all__ = ["SDPA_OPS", "kernel_family", "classify_events", "KernelReport", "probe_attention", "attention_kernels",
           "print_attention_kernels"]
