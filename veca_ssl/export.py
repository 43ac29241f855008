"""``veca export``: write a backbone at one fixed core width for deployment, with a parity check.

Arguments are parsed before torch is imported, so ``veca export --help`` is instant.
"""

from __future__ import annotations

import argparse
import sys

from veca_ssl.cli import HelpFormatter

FORMATS = ("safetensors", "torchscript", "onnx", "veca-reference")  # = veca_ssl.models.export.FORMATS

EPILOG = """formats:
  safetensors     the bank cut to --width (+ .json config); load_backbone() reads it, any resolution
  torchscript     torch.jit.trace of the fixed-width network: images -> (cls, patches); fixed input shape
  onnx            the same network as ONNX (pip install 'veca-ssl[onnx]'): any batch, height and width
                  (multiples of the patch size; a dense ViT with a learned position table: any batch)
  veca-reference  the VECA reference code's checkpoint ({"student", "config"}) for its load_model()

The export is read back and compared with the elastic model at the same width on a seeded input of
--batch-size images at --resolution (ONNX: also on a larger batch at another resolution); the command
fails (exit 1) when the difference exceeds --tolerance.
--width-from takes the width `veca select` chose, and its resolution and batch size unless given;
otherwise the resolution is the checkpoint's training resolution when it records one (else 224). A
safetensors export records that resolution, so evaluation defaults to it.
Examples:
  veca export --checkpoint outputs/run --width 32 --format onnx --out veca_w32.onnx --resolution 224
  veca export --checkpoint veca_small_reference.pt --format safetensors --width 16 --out w16
  veca export --checkpoint outputs/run --format veca-reference --out veca_ref.pt
  veca export --checkpoint outputs/run --width-from outputs/eval/linear/selection.json --format onnx --out w.onnx
"""


def _resolution(text: str) -> tuple[int, int]:
    parts = text.lower().replace(",", "x").split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--resolution {text!r}: give SIDE or HxW, e.g. 224 or 224x320") from None
    if len(values) not in (1, 2) or min(values) < 1:
        raise argparse.ArgumentTypeError(f"--resolution {text!r}: give SIDE or HxW, e.g. 224 or 224x320")
    return (values[0], values[-1])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="veca export", description=__doc__.split("\n")[0].split(": ", 1)[1],
                                epilog=EPILOG, formatter_class=HelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="run dir, checkpoint, our .safetensors export, a VECA reference checkpoint, or a "
                        "DINOv2/DINOv3/timm file")
    p.add_argument("--out", required=True, help="output file (the format's suffix is added when it has none)")
    p.add_argument("--format", choices=FORMATS, default="safetensors", help="export format (default: %(default)s)")
    p.add_argument("--width", type=int, default=None,
                   help="core width C to export (default: the full bank; dense ViTs take none)")
    p.add_argument("--width-from", default=None, metavar="SELECTION_JSON",
                   help="take the width (and, unless given, --resolution and --batch-size) from a `veca select` "
                        "selection.json")
    p.add_argument("--features", choices=("native", "teacher"), default="native",
                   help="native: the final LayerNorm's features; teacher: through the model's output projection "
                        "(distilled reference models) (default: %(default)s)")
    p.add_argument("--resolution", type=_resolution, default=None, metavar="SIDE|HxW",
                   help="example input for the trace and the parity check, a multiple of the patch size "
                        "(default: the selection's, else the checkpoint's training resolution, else 224)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="example input batch (default: the selection's, else 2)")
    p.add_argument("--which", choices=("teacher", "student"), default="teacher",
                   help="backbone of a training checkpoint (default: %(default)s)")
    p.add_argument("--tolerance", type=float, default=1e-4,
                   help="largest max-abs difference accepted by the parity check (default: %(default)s)")
    p.add_argument("--allow-nonstandard", action="store_true",
                   help="veca-reference: also write depths/bank sizes other than the reference family's "
                        "(readable by veca-ssl, not by the reference's load_model)")
    p.add_argument("--debug", action="store_true", help="show the full Python traceback of an error")
    return p


def _defaults(args: argparse.Namespace) -> list[str]:
    """Fill width, resolution and batch size from ``--width-from`` and the checkpoint; returns what was
    taken from where, for the log. Raises ValueError/FileNotFoundError for a bad selection file."""
    taken = []
    if args.width_from is not None:
        from veca_ssl.selection import read_selection

        if args.width is not None:
            raise ValueError("give --width or --width-from, not both")
        sel = read_selection(args.width_from)
        args.width = sel["width"]
        taken.append(f"width {sel.get('width_label', args.width)} from {args.width_from}")
        if args.resolution is None and isinstance(sel.get("resolution"), int):
            args.resolution = (sel["resolution"], sel["resolution"])
            taken.append(f"resolution {sel['resolution']} from {args.width_from}")
        if args.batch_size is None and isinstance(sel.get("batch_size"), int):
            args.batch_size = sel["batch_size"]
    if args.resolution is None:
        from veca_ssl.models.provenance import training_resolution

        found = training_resolution(args.checkpoint)
        side = found[0] if found else 224
        args.resolution = (side, side)
        taken.append(f"resolution {side} from {found[1]}" if found else "resolution 224 (none recorded)")
    if args.batch_size is None:
        args.batch_size = 2
    return taken


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.batch_size is not None and args.batch_size < 1:
        print(f"veca export: --batch-size must be >= 1, got {args.batch_size}", file=sys.stderr)
        return 2
    try:
        taken = _defaults(args)
        from veca_ssl.models import load_backbone
        from veca_ssl.models.export import export_backbone

        model = load_backbone(args.checkpoint, which=args.which)
        h, w = args.resolution
        result = export_backbone(model, args.out, args.format, args.width, args.resolution, args.features,
                                 args.batch_size, strict_reference=not args.allow_nonstandard,
                                 meta={"resolution": h} if h == w else None)
    except (ValueError, FileNotFoundError) as exc:
        if args.debug:
            raise
        print(f"veca export: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the output cannot be written (a file where a directory must be, permissions)
        if args.debug:
            raise
        from veca_ssl.fileio import describe_os_error

        print(f"veca export: cannot write --out {args.out!r}: {describe_os_error(exc)}", file=sys.stderr)
        return 2
    for line in taken:
        print(line)
    label = "dense" if result.width is None else f"width {result.width}"
    shapes = result.checked_shapes or (result.input_shape,)
    shape = " and ".join("x".join(map(str, s)) for s in shapes)
    print(f"exported {type(model).__name__} at {label} ({result.space} features, {result.fmt}) -> {result.path}")
    if result.dynamic_axes:
        spatial = f" (multiples of {model.patch_size})" if "height" in result.dynamic_axes else ""
        print(f"  input axes of any size: {', '.join(result.dynamic_axes)}{spatial}")
    elif args.format == "torchscript":
        print(f"  input shape fixed at {'x'.join(map(str, result.input_shape))} (traced)")
    for note in result.notes:
        print(f"  note: {note}")
    par = result.parity
    if not par.checked:
        print(f"parity: not checked: {par.reason}")
        return 0
    verdict = "OK" if par.ok(args.tolerance) else "FAILED"
    print(f"parity vs the elastic model at {label}, input {shape}: max |diff| cls {par.cls:.3g}, "
          f"patches {par.patches:.3g} (tolerance {args.tolerance:g}): {verdict}")
    return 0 if verdict == "OK" else 1


if __name__ == "__main__":
    sys.exit(main())
