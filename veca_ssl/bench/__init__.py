"""``veca bench <what>``: benchmarks that print tables (ratios measured side by side in one run).

Every bench shares one vocabulary: ``--warmup`` (>= 3) untimed calls per shape, ``--repeats`` (>= 5)
timed calls whose median and min–max spread are reported, and ``--output-dir`` where the rows are
written as ``<bench>.csv`` and ``<bench>.json``. This module imports nothing heavy: the parsers are
built (and ``--help`` answered) before torch is imported.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

BENCHES: dict[str, tuple[str, str]] = {
    "backbone": ("veca_ssl.bench.backbone", "VECA vs dense ViT vs attention removed, across resolutions"),
    "data": ("veca_ssl.bench.data", "multi-crop samples/s per core from JPEG folders and shards"),
    "train": ("veca_ssl.bench.train", "training images/s, VECA vs dense"),
    "knn": ("veca_ssl.bench.knn", "k-NN seconds: torch and faiss vs a matrix-product floor"),
    "ddp": ("veca_ssl.bench.ddp", "gloo DDP step time, 2 processes vs 1"),
}

MIN_WARMUP, MIN_REPEATS = 3, 5  # benchmark hygiene: warm up each shape >= 3 times, median of >= 5 runs
DEFAULT_OUTPUT_DIR = "outputs/bench"


def bench_parser(name: str, doc: str | None) -> argparse.ArgumentParser:
    """The parser of ``veca bench <name>``: its module docstring as description (whole paragraphs,
    never cut mid-sentence) and defaults shown for every option."""
    from veca_ssl.cli import HelpFormatter

    return argparse.ArgumentParser(prog=f"veca bench {name}", description=(doc or "").strip(),
                                   formatter_class=HelpFormatter)


def add_common_options(p: argparse.ArgumentParser, name: str, repeats: int = MIN_REPEATS) -> None:
    """``--warmup``, ``--repeats`` and ``--output-dir``, with their rules stated where they are enforced."""
    p.add_argument("--warmup", type=int, default=MIN_WARMUP,
                   help=f"untimed calls per shape before timing, >= {MIN_WARMUP}")
    p.add_argument("--repeats", type=int, default=repeats,
                   help=f"timed calls per shape (median and min–max reported), >= {MIN_REPEATS}")
    p.add_argument("--output-dir", default=DEFAULT_OUTPUT_DIR,
                   help=f"rows are written to <output-dir>/{name}.csv and .json")


def check_common_options(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse (one argparse error, exit 2) what :func:`add_common_options` states as the rules."""
    if args.warmup < MIN_WARMUP or args.repeats < MIN_REPEATS:
        p.error(f"need --warmup >= {MIN_WARMUP} and --repeats >= {MIN_REPEATS} (benchmark hygiene: warm "
                f"up each shape, report the median and spread), got --warmup {args.warmup} "
                f"--repeats {args.repeats}")
    # the rows are written after minutes of measuring: find out now that they could not be
    out = Path(args.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        p.error(f"--output-dir {str(out)!r}: cannot create it ({exc.strerror or exc}); give a writable directory")
    if not os.access(out, os.W_OK):
        p.error(f"--output-dir {str(out)!r} is not writable; give a writable directory")


def output_path(args: argparse.Namespace, name: str) -> Path:
    """``<output-dir>/<name>.json`` (``veca_ssl.tables.write_rows`` writes the .csv next to it)."""
    return Path(args.output_dir) / f"{name}.json"


def print_kernels(family: str, patch_size: int, device: str, dtype=None, attn_backend: str = "auto") -> None:
    """One line per network of a VECA-vs-dense bench: the attention kernel its blocks run on ``device``
    at ``dtype`` (``veca_ssl.models.sdpa.probe_attention``), so a table's numbers come with the kernel
    behind them."""
    from veca_ssl.models import build_backbone
    from veca_ssl.models.kernels import probe_attention

    for name, backend in ((f"vit_{family}", "auto"), (f"veca_{family}", attn_backend)):
        model = build_backbone(name, patch_size=patch_size, depth=1, attn_backend=backend)
        print(f"{name}: {probe_attention(model, device, dtype).describe()}", flush=True)


def main(argv: list[str] | None = None) -> int:
    from veca_ssl.cli import dispatch

    return dispatch(BENCHES, argv, "veca bench")
