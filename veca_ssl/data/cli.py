"""``veca data``: dataset tools — ``make-shards SRC DST --shard-size N`` and ``inspect SPEC``.

The parser is built before torch or the dataset modules are imported, so ``--help`` answers at once."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from veca_ssl.cli import HelpFormatter

from .decode import DEFAULT_MAX_PIXELS
from .errors import DataError

_EMPTY_HELP = ("keep an image folder's class folder without images as a class with zero images (without it, "
               "such a folder is an error naming it: leaving it out would shift every later label)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="veca data", formatter_class=HelpFormatter,
                                     description="Dataset tools: convert a dataset into WebDataset shards, or "
                                                 "inspect what a dataset spec holds.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{make-shards,inspect}")

    mk = sub.add_parser("make-shards", formatter_class=HelpFormatter,
                        help="convert an image folder / npz / spec into WebDataset tar shards",
                        description="Convert an image folder, an .npz file or any dataset spec into WebDataset "
                                    "tar shards\n(shard-000000.tar, …) and manifest.json; it prints the spec to "
                                    "train on, e.g. data.train=wds:DST/shard-{000000..000009}.tar.")
    mk.add_argument("src", help="image folder (class sub-folders), .npz file, or a dataset spec such as 'digits'")
    mk.add_argument("dst", help="output folder for shard-000000.tar …")
    mk.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    mk.add_argument("--split", default=None, help="split of the source spec (e.g. train)")
    mk.add_argument("--no-shuffle", action="store_true", help="keep source order instead of mixing samples")
    mk.add_argument("--seed", type=int, default=0, help="seed of the sample order")
    mk.add_argument("--verify", action="store_true",
                    help="fully decode every source image, and re-read every written sample before committing")
    mk.add_argument("--overwrite", action="store_true",
                    help="replace the shard set in DST (the old set stays until the new one is complete)")
    mk.add_argument("--max-skip-fraction", type=float, default=0.01,
                    help="stop when more than this fraction of the images is unreadable (0 to 1)")
    mk.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                    help=f"skip images with more pixels, without decoding them (default {DEFAULT_MAX_PIXELS}; 0 = no limit)")
    mk.add_argument("--allow-empty-classes", action="store_true", help=_EMPTY_HELP)

    ins = sub.add_parser("inspect", formatter_class=HelpFormatter,
                         help="counts, classes, image sizes and a PNG grid of samples",
                         description="Print what a dataset spec holds (counts, classes, image sizes) and "
                                     "optionally save a PNG grid of samples.")
    ins.add_argument("spec", help="dataset spec, e.g. imagefolder:/data/x, wds:/s/shard-{000000..000009}.tar, digits")
    ins.add_argument("--split", default=None, help="split to inspect (train/val/…)")
    ins.add_argument("--out", default=None, help="write a grid of samples to this PNG")
    ins.add_argument("--num-samples", type=int, default=16, help="images in the grid")
    ins.add_argument("--max-images", type=int, default=1000, help="images whose size is measured")
    ins.add_argument("--json", action="store_true", help="print the summary as JSON")
    ins.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                     help="report images with more pixels as too large, without decoding them")
    ins.add_argument("--allow-empty-classes", action="store_true", help=_EMPTY_HELP)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from .inspection import format_summary, inspect_dataset
    from .shards import make_shards

    try:
        if args.command == "make-shards":
            manifest = make_shards(
                args.src,
                args.dst,
                args.shard_size,
                split=args.split,
                shuffle=not args.no_shuffle,
                seed=args.seed,
                verify=args.verify,
                overwrite=args.overwrite,
                max_skip_fraction=args.max_skip_fraction,
                max_pixels=args.max_pixels,
                allow_empty_classes=args.allow_empty_classes,
            )
            print(
                f"wrote {manifest['num_samples']} samples in {manifest['num_shards']} shard(s) "
                f"({manifest['skipped']} unreadable skipped)"
            )
            print(f"use: {manifest['spec']}")
            return 0
        summary = inspect_dataset(args.spec, split=args.split, out=args.out, max_images=args.max_images,
                                  num_samples=args.num_samples, max_pixels=args.max_pixels,
                                  allow_empty_classes=args.allow_empty_classes)
        print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
        return 0
    except (ValueError, OSError, DataError, RuntimeError) as err:
        from veca_ssl.fileio import describe_os_error

        print(f"veca data {args.command}: error: {describe_os_error(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
