"""Export a backbone for deployment at one fixed width, and check the export against the model.

Formats (``FORMATS``):
  ``safetensors``     our export (weights + .json config) of the bank cut to the chosen width; loads
                      with ``load_backbone`` and runs at any resolution (and at the smaller widths)
  ``torchscript``     ``torch.jit.trace`` of the fixed-width module: ``images -> (cls, patches)``
  ``onnx``            the same graph through ``torch.onnx.export`` (needs ``pip install veca-ssl[onnx]``:
                      onnx + onnxscript to write, onnxruntime to check)
  ``veca-reference``  the VECA reference code's checkpoint layout (``{"student", "config"}``), which its
                      ``load_model`` reads; the whole bank unless a width is given

Traced graphs (TorchScript, ONNX) are fixed to the example input's shape (batch and resolution):
the patch grid and the RoPE tables are computed from it at trace time. Every export is read back
and compared with the elastic model at the same width on the same input (``Parity``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from veca_ssl import fileio

from .base import Backbone
from .fixed_width import fixed_width, slice_to_width
from .io import load_backbone, save_backbone
from .veca import VECA

FORMATS = ("safetensors", "torchscript", "onnx", "veca-reference")
SUFFIXES = {"safetensors": ".safetensors", "torchscript": ".pt", "onnx": ".onnx", "veca-reference": ".pt"}


@dataclass
class Parity:
    """Max absolute differences of the reloaded export vs the elastic model (None: not checked)."""

    cls: float | None
    patches: float | None
    reason: str = ""

    @property
    def checked(self) -> bool:
        return self.cls is not None

    def ok(self, tolerance: float) -> bool:
        return self.checked and max(self.cls, self.patches) <= tolerance  # type: ignore[type-var]


@dataclass
class ExportResult:
    path: Path
    fmt: str
    width: int | None
    input_shape: tuple[int, ...]
    space: str
    parity: Parity
    notes: list[str] = field(default_factory=list)


def _diff(a: Tensor, b: Tensor) -> float:
    if a.shape != b.shape:
        raise RuntimeError(f"export parity: output shape {tuple(b.shape)} differs from the model's {tuple(a.shape)}")
    return float((a.float() - b.float()).abs().max())


def example_input(batch: int, resolution: tuple[int, int], in_chans: int = 3, seed: int = 0) -> Tensor:
    return torch.randn(batch, in_chans, *resolution, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def export_backbone(model: Backbone, out: str | Path, fmt: str = "safetensors", width: int | None = None,
                    resolution: tuple[int, int] = (224, 224), space: str = "native", batch: int = 2,
                    strict_reference: bool = True, meta: dict | None = None) -> ExportResult:
    """Write ``model`` at ``width`` (None: a VECA's full bank; must be None for a dense ViT) as ``fmt``
    to ``out`` and compare the reloaded export with ``model`` at that width on a seeded example input
    of ``batch`` images at ``resolution`` (H, W). ``meta`` goes into a safetensors export's ``.json``
    sidecar (e.g. ``resolution``, the default of evaluation). Raises ``ValueError`` for bad options."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; valid: {', '.join(FORMATS)}")
    model = model.eval()
    space = model._check_space(space)
    if isinstance(model, VECA):
        width = model.check_width(width)
    elif width is not None:
        raise ValueError(f"width={width} given for a dense ViT, which has no core widths; omit it")
    p = model.patch_size
    if resolution[0] % p or resolution[1] % p:
        raise ValueError(f"resolution {resolution[0]}x{resolution[1]} is not a multiple of the patch size {p}")
    out = Path(out)
    if out.suffix == "":
        out = out.with_suffix(SUFFIXES[fmt])
    out.parent.mkdir(parents=True, exist_ok=True)
    images = example_input(batch, resolution, model.patch_embed.in_chans)
    expected = model.forward_features(images, num_cores=width, space=space)
    kwargs = {} if width is None else {"num_cores": width}
    notes: list[str] = []

    if fmt == "safetensors":
        target = slice_to_width(model, width) if isinstance(model, VECA) else model
        path = save_backbone(target, out, extra={**(meta or {}), "width": width})
        got = load_backbone(path).eval().forward_features(images, space=space, **kwargs)
        parity = Parity(_diff(expected["cls"], got["cls"]), _diff(expected["patches"], got["patches"]))
    elif fmt == "veca-reference":
        from . import reference

        target = slice_to_width(model, width) if isinstance(model, VECA) and width != model.num_cores else model
        ckpt, notes = reference.to_reference(target, strict=strict_reference)
        path = out
        with fileio.atomic_path(path) as tmp:
            torch.save(ckpt, tmp)
        got = load_backbone(path).eval().forward_features(images, space=space, **kwargs)
        parity = Parity(_diff(expected["cls"], got["cls"]), _diff(expected["patches"], got["patches"]))
    else:
        module = fixed_width(model, width, space)
        path = out
        if fmt == "torchscript":
            with warnings.catch_warnings():  # shape-dependent Python values are constants: by design
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                traced = torch.jit.trace(module, (images,), check_trace=False)
            with fileio.atomic_path(path) as tmp:
                torch.jit.save(traced, str(tmp))
            cls, patches = torch.jit.load(str(path))(images)
            parity = Parity(_diff(expected["cls"], cls), _diff(expected["patches"], patches))
        else:
            parity = _export_onnx(module, images, path, expected["cls"], expected["patches"])
    return ExportResult(path, fmt, width, tuple(images.shape), space, parity, notes)


def _export_onnx(module: torch.nn.Module, images: Tensor, path: Path, cls_ref: Tensor, patches_ref: Tensor) -> Parity:
    try:
        import onnxscript  # noqa: F401  (the exporter needs it; a clear message beats its ImportError)
    except ImportError:
        raise ValueError("ONNX export needs onnx and onnxscript: pip install 'veca-ssl[onnx]'") from None
    program = torch.onnx.export(module, (images,), dynamo=True, input_names=["images"],
                                output_names=["cls", "patches"], verbose=False)
    with fileio.atomic_path(path) as tmp:  # the temporary name ends in the target's, .onnx included
        program.save(str(tmp))
    try:
        import onnxruntime as ort
    except ImportError:
        return Parity(None, None, "onnxruntime is not installed (pip install 'veca-ssl[onnx]')")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    cls, patches = session.run(["cls", "patches"], {"images": images.numpy()})
    return Parity(_diff(cls_ref, torch.from_numpy(cls)), _diff(patches_ref, torch.from_numpy(patches)))
