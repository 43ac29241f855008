"""``veca extract``: the command line of the feature extraction in ``eval.extract``.

Parsed before torch is imported (instant ``--help``); shares the model and run options of
``veca eval`` (``eval.config``), so ``--checkpoint``, ``--resolution``, ``--batch-size``, ``--device``
mean the same everywhere. ``--width-from selection.json`` takes the width ``veca select`` chose.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from eval.config import EvalConfig, add_model_options, check_source
from eval.options import (
    ArgumentParser,
    EvalConfigError,
    HelpFormatter,
    add_debug_option,
    add_fields,
    at_least,
    check_fields,
    flag_names,
    from_mapping,
    in_cli_terms,
    namespace_to_mapping,
    opt,
)

log = logging.getLogger("eval")

FORMATS = ("safetensors", "npy")
DTYPES = ("float32", "float16")


@dataclass
class ExtractOptions:
    """What ``veca extract`` writes (the model and run options are those of :class:`~eval.config.EvalConfig`)."""

    data: str | None = opt(None, "dataset SPEC[@SPLIT], e.g. imagefolder:/data/train, digits@train", metavar="SPEC")
    output_dir: str | None = opt(None, "where the shards and manifest.json go; rerunning with the same options "
                                       "resumes there", metavar="DIR")
    width: int | None = opt(None, "core width; a width of the backbone", default_text="the widest width",
                            rule=at_least(1))
    width_from: str | None = opt(None, "take the width (and, without --resolution, the resolution) from a "
                                       "`veca select` selection.json, instead of --width",
                                 metavar="FILE", default_text="none")
    format: str = opt("safetensors", "one .safetensors file per shard, or one .npy file per array",
                      choices=FORMATS)
    dtype: str = opt("float32", "storage dtype of the features", choices=DTYPES)
    shard_size: int = opt(10000, "images per shard", rule=at_least(1))
    patch_mean: bool = opt(True, "store the mean patch token")
    patches: bool = opt(False, "store all patch tokens (large: N x patches x dim)")
    max_shards: int | None = opt(None, "stop after this many new shards (resume later)", default_text="all",
                                 rule=at_least(1))


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="veca extract", formatter_class=HelpFormatter, allow_abbrev=False,
                       description="Extract frozen image (and patch) features of a dataset at one core width to "
                                   "shards with a manifest (resumable).",
                       epilog="Shards hold image (N, D), patch_mean (N, D), patches (N, Hp*Wp, D), labels and "
                              "dataset indices; manifest.json lists them with sizes and SHA-256. Read them back "
                              "with eval.extract.read_features(DIR).")
    add_model_options(p)
    g = p.add_argument_group("extraction")
    add_fields(g, ExtractOptions, required=("data", "output_dir"))
    r = p.add_argument_group("run")
    add_fields(r, EvalConfig, only=("resolution", "batch_size", "num_workers", "num_threads", "device", "progress",
                                    "max_skip_fraction", "max_pixels", "allow_empty_classes"))
    add_debug_option(p)
    return p


def parse_args(argv: list[str]) -> tuple[EvalConfig, ExtractOptions]:
    """Options → (model and run options as an EvalConfig, extraction options), both checked."""
    parser = build_parser()
    data = namespace_to_mapping(parser.parse_args(argv))
    names = set(ExtractOptions.__dataclass_fields__)
    try:
        opts = check_fields(from_mapping(ExtractOptions, {k: v for k, v in data.items() if k in names}))
        common = check_fields(from_mapping(EvalConfig, {k: v for k, v in data.items() if k not in names}))
        check_source(common)
    except EvalConfigError as exc:
        raise in_cli_terms(exc, flag_names(parser)) from None
    if opts.width is not None and opts.width_from is not None:
        raise ValueError("give --width or --width-from, not both")
    return common, opts


def from_selection(path: str, common: EvalConfig) -> int | None:
    """The width of a ``veca select`` file, and its target resolution unless ``--resolution`` is given;
    a warning when it was chosen for another checkpoint."""
    from eval.selection import read_selection

    sel = read_selection(path)
    chosen_for = sel.get("checkpoint")
    if chosen_for and common.checkpoint and Path(chosen_for).resolve() != Path(common.checkpoint).resolve():
        log.warning("%s was chosen for checkpoint %s, not %s", path, chosen_for, common.checkpoint)
    log.info("width %s from %s (%s)", sel.get("width_label"), path, sel.get("rule"))
    if common.resolution is None and isinstance(sel.get("resolution"), int):
        common.resolution = sel["resolution"]  # the resolution the width was chosen for
    return sel["width"]


def main(argv: list[str] | None = None) -> int:
    from eval.cli import run_user_command

    argv = list(sys.argv[1:] if argv is None else argv)

    def body() -> int:
        common, opts = parse_args(argv)
        from eval.common import (
            build_eval_dataset,
            check_checkpoint,
            load_model,
            model_description,
            resolve_device,
            resolve_resolution,
            run_logging,
            thread_policy,
            warn_if_upsampling,
        )
        from eval.extract import MANIFEST, extract_to_shards
        from veca_ssl.progress import progress_enabled

        check_checkpoint(common.checkpoint)
        with run_logging(None, terminal=sys.stderr.isatty()), \
                thread_policy(common.num_threads, common.num_workers) as threads:
            width = from_selection(opts.width_from, common) if opts.width_from else opts.width
            device = resolve_device(common.device)
            model = load_model(common, common.seed)
            resolution, why = resolve_resolution(common, model)
            dataset = build_eval_dataset(opts.data, resolution, common.max_pixels, common.allow_empty_classes)
            warn_if_upsampling(dataset, opts.data, resolution, why)
            info = {"model": model_description(common, model), "checkpoint": common.checkpoint, "dataset": opts.data}
            manifest = extract_to_shards(
                model, dataset, opts.output_dir, width, resolution, common.batch_size, device, opts.shard_size,
                opts.format, opts.dtype, with_patch_mean=opts.patch_mean, with_patches=opts.patches, info=info,
                max_shards=opts.max_shards, num_workers=common.num_workers,
                progress=progress_enabled(common.progress), max_skip_fraction=common.max_skip_fraction)
        state = "complete" if manifest["complete"] else "incomplete (run again to resume)"
        skipped = manifest["skipped"]["count"]
        unusable = f" ({skipped} unusable, left out and listed in the manifest)" if skipped else ""
        print(f"{len(manifest['shards'])} shard(s), {manifest['count']} images{unusable}, width {manifest['width']}, "
              f"{resolution} px ({why}): {state} → {opts.output_dir}/{MANIFEST}")
        print(f"threads: {threads}")
        return 0

    return run_user_command("veca extract", body, argv)


if __name__ == "__main__":
    sys.exit(main())
