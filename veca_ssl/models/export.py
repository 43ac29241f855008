"""Export a backbone for deployment at one fixed width, and check the export against the model.

Formats (``FORMATS``):
  ``safetensors``     our export (weights + .json config) of the bank cut to the chosen width; loads
                      with ``load_backbone`` and runs at any resolution (and at the smaller widths)
  ``torchscript``     ``torch.jit.trace`` of the fixed-width module: ``images -> (cls, patches)``
  ``onnx``            the same graph through ``torch.onnx.export`` (needs ``pip install veca-ssl[onnx]``:
                      onnx + onnxscript to write, onnxruntime to check)
  ``veca-reference``  the VECA reference code's checkpoint layout (``{"student", "config"}``), which its
                      ``load_model`` reads; the whole bank unless a width is given

The TorchScript trace is fixed to the example input's shape (batch and resolution): the patch grid
and the RoPE tables are computed from it at trace time. The ONNX graph is exported through
``torch.export`` with a dynamic batch axis and dynamic height and width (multiples of the patch
size), the grid and RoPE tables computed in the graph — except for a dense ViT with a learned
position table, whose interpolation to the grid branches on the grid size in Python (no
interpolation at the table's own size): its height and width stay those of the example input.
Every export is read back and compared with the elastic model at the same width on the same input
(``Parity``); an ONNX graph also on a larger batch, and at another resolution when it has dynamic
height and width, so a shape fixed inside the graph fails the check instead of the first deployment.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
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
    #: input axes the artefact accepts at any size (ONNX: ``batch``, ``height``, ``width``); empty: fixed
    dynamic_axes: tuple[str, ...] = ()
    #: every input shape the parity check ran on
    checked_shapes: tuple[tuple[int, ...], ...] = ()


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
        if fmt == "onnx":
            def reference(x: Tensor) -> tuple[Tensor, Tensor]:
                ref = model.forward_features(x, num_cores=width, space=space)
                return ref["cls"], ref["patches"]

            parity, axes, shapes, onnx_notes = _export_onnx(module, images, path, reference, p)
            return ExportResult(path, fmt, width, tuple(images.shape), space, parity, onnx_notes, axes, shapes)
        if fmt == "torchscript":
            with warnings.catch_warnings():  # shape-dependent Python values are constants: by design
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                traced = torch.jit.trace(module, (images,), check_trace=False)
            with fileio.atomic_path(path) as tmp:
                torch.jit.save(traced, str(tmp))
            cls, patches = torch.jit.load(str(path))(images)
            parity = Parity(_diff(expected["cls"], cls), _diff(expected["patches"], patches))
    return ExportResult(path, fmt, width, tuple(images.shape), space, parity, notes,
                        checked_shapes=(tuple(images.shape),))


def _spatial_axes_allowed(module: torch.nn.Module) -> tuple[bool, str]:
    """Whether the graph of ``module`` can take any height and width, and why not."""
    from .fixed_width import FixedDense

    if isinstance(module, FixedDense) and getattr(module.model, "pos_embed_type", "") == "learned":
        return False, ("a learned position table is interpolated to the grid with sizes fixed at export (and "
                       "not at all at the table's own size); height and width are those of --resolution")
    return True, ""


def _export_onnx(module: torch.nn.Module, images: Tensor, path: Path,
                 reference: Callable[[Tensor], tuple[Tensor, Tensor]], patch: int
                 ) -> tuple[Parity, tuple[str, ...], tuple[tuple[int, ...], ...], list[str]]:
    """Write ``module`` as ONNX with dynamic axes; check it with onnxruntime against ``reference`` on
    ``images`` and on a larger batch (at another resolution when height and width are dynamic).
    Returns (parity, dynamic axes, shapes checked, notes)."""
    try:
        import onnxscript  # noqa: F401  (the exporter needs it; a clear message beats its ImportError)
    except ImportError:
        raise ValueError("ONNX export needs onnx and onnxscript: pip install 'veca-ssl[onnx]'") from None
    from torch.export import Dim

    notes: list[str] = []
    b, _, h, w = images.shape
    # torch.export fixes an axis whose example size is 1 (it cannot tell 1 from "broadcast"): trace on
    # two images at least, so a --batch-size 1 export still takes any batch
    trace = images if b > 1 else torch.cat([images, images])
    batch = {0: Dim("batch", min=1)}
    spatial, why_not = _spatial_axes_allowed(module)
    axes: dict[int, object] = dict(batch)
    if spatial:
        axes.update({2: patch * Dim("height_patches", min=1), 3: patch * Dim("width_patches", min=1)})
    try:
        program = _onnx_program(module, trace, axes)
    except Exception as exc:  # the exporter could not keep height/width symbolic: fall back to batch only
        if not spatial:
            raise
        spatial, why_not = False, f"the exporter could not keep them symbolic ({str(exc).strip().splitlines()[0]})"
        program = _onnx_program(module, trace, batch)
    if not spatial:
        notes.append(f"ONNX height and width fixed at {h}x{w}: {why_not}")
    with fileio.atomic_path(path) as tmp:  # the temporary name ends in the target's, .onnx included
        program.save(str(tmp))
    dynamic = ("batch", "height", "width") if spatial else ("batch",)
    try:
        import onnxruntime as ort
    except ImportError:
        return (Parity(None, None, "onnxruntime is not installed (pip install 'veca-ssl[onnx]')"), dynamic, (),
                notes)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    other = example_input(b + 2, (h + patch, w + 2 * patch) if spatial else (h, w), images.shape[1], seed=1)
    worst_cls = worst_patches = 0.0
    for x in (images, other):
        cls, patches = session.run(["cls", "patches"], {"images": x.numpy()})
        ref_cls, ref_patches = reference(x)
        worst_cls = max(worst_cls, _diff(ref_cls, torch.from_numpy(cls)))
        worst_patches = max(worst_patches, _diff(ref_patches, torch.from_numpy(patches)))
    return Parity(worst_cls, worst_patches), dynamic, (tuple(images.shape), tuple(other.shape)), notes


def _onnx_program(module: torch.nn.Module, images: Tensor, axes: dict):
    return torch.onnx.export(module, (images,), dynamo=True, input_names=["images"], output_names=["cls", "patches"],
                             dynamic_shapes={"images": axes}, verbose=False)
