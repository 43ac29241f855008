"""``veca bench <what>``: benchmarks that print tables (ratios measured side by side in one run).

Every bench shares one vocabulary: ``--warmup`` (>= 3) untimed calls per shape, ``--repeats`` (>= 5)
timed calls whose median and min–max spread are reported, ``--num-threads`` (``veca train``'s thread
policy, ``veca_ssl.threads``; each row records the threads and the load average it was measured at),
and ``--output-dir`` where the rows are written as ``<bench>.csv`` and ``<bench>.json``. This module imports nothing heavy: the parsers are
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


def add_common_options(p: argparse.ArgumentParser, name: str, repeats: int = MIN_REPEATS, threads: bool = True) -> None:
    """``--warmup``, ``--repeats``, ``--num-threads`` (unless ``threads`` is false: a bench that measures
    per core on one thread) and ``--output-dir``, with their rules stated where they are enforced."""
    p.add_argument("--warmup", type=int, default=MIN_WARMUP,
                   help=f"untimed calls per shape before timing, >= {MIN_WARMUP}")
    p.add_argument("--repeats", type=int, default=repeats,
                   help=f"timed calls per shape (median and min–max reported), >= {MIN_REPEATS}")
    if threads:
        p.add_argument("--num-threads", type=int, default=0,
                       help="intra-op CPU threads per process; 0 = veca train's policy: the cores this process "
                            "may use (divided among the bench's processes), at least 1; OMP_NUM_THREADS, when set, "
                            "wins (default: 0)")
    p.add_argument("--output-dir", default=DEFAULT_OUTPUT_DIR,
                   help=f"rows are written to <output-dir>/{name}.csv and .json")


def check_common_options(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse (one argparse error, exit 2) what :func:`add_common_options` states as the rules."""
    if getattr(args, "num_threads", 0) < 0:
        p.error(f"--num-threads must be >= 0 (0 = the thread policy), got {args.num_threads}")
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


def apply_threads(args: argparse.Namespace, name: str, processes: int = 1) -> int:
    """Apply ``veca train``'s thread policy for ``--num-threads`` to this process, or, for a bench that
    starts ``processes`` > 1 processes itself, through ``OMP_NUM_THREADS`` to each of them
    (``veca_ssl.spawn`` applies the policy in every process it starts; under torchrun each process is
    one rank and applies it to itself). Prints the line saying so; returns the threads per process."""
    from veca_ssl.threads import apply_thread_policy, describe_plan, plan_threads

    if processes > 1 and "LOCAL_WORLD_SIZE" not in os.environ:
        env = dict(os.environ, LOCAL_WORLD_SIZE=str(processes))
        plan = plan_threads(args.num_threads, 0, env=env, option="--num-threads")
        os.environ["OMP_NUM_THREADS"] = str(plan.threads)  # inherited by the processes the bench starts
        line = f"{describe_plan(plan, '--num-threads N')} in each of {processes} processes"
    else:
        plan = apply_thread_policy(args.num_threads, 0, option="--num-threads")
        line = describe_plan(plan, "--num-threads N")
    print(f"veca bench {name}: {line}", flush=True)
    return plan.threads


def stamp(rows: list[dict], threads: int | None = None) -> list[dict]:
    """Add the conditions of the measurement just made to ``rows``: ``threads`` (this process's intra-op
    threads unless given) and ``load_avg`` (the machine's 1-minute load average, now)."""
    from veca_ssl.threads import timing_conditions

    now = timing_conditions(threads)
    for row in rows:
        row.setdefault("threads", now["threads"])
        row.setdefault("load_avg", now["load_average"])
    return rows


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
