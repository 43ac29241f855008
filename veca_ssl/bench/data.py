"""Multi-crop samples/s per CPU core, from a JPEG folder and from its WebDataset shards.

Generates a temporary ImageNet-like JPEG folder (random smooth textures plus grain, ~500×375 by
default, both orientations), converts it into WebDataset shards, and measures three things:

1. per sample, on one core (``torch.set_num_threads(1)``, single process): the full DINOv2 sample —
   decode, 2 global crops at 224 and 8 local crops at 96 with all augmentations, iBOT masks — from the
   folder and from the shards, next to its parts (decode only, augment only) and with reduced-scale
   JPEG decoding switched off;
2. the training DataLoaders (folder: infinite sampler; shards: the endless stream) with 1 and 2 worker
   processes: samples/s on the wall clock and samples/s per core from the workers' CPU time;
3. the cost of resuming: seconds from building the shard loader to its first batch at sample 0 and at
   sample 10⁶ of a synthetic shard set (whole shards skipped by their manifest counts, nothing skipped
   is decoded), next to what reading through the skipped samples would cost.

Hygiene: >= 3 warm-up calls, median of >= 5 timed calls, spread (min–max) reported. Rows go to
<output-dir>/data.csv|json, data_loaders.* and data_resume.*.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from veca_ssl.bench import add_common_options, bench_parser, check_common_options, output_path


def _texture(rng: Any, width: int, height: int) -> Any:
    """A photo-like RGB array: upsampled colour noise (large structures) + stripes + fine grain."""
    import numpy as np
    from PIL import Image

    coarse = rng.integers(0, 256, (max(2, height // 24), max(2, width // 24), 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.float32)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    angle, freq = rng.uniform(0, np.pi), rng.uniform(0.02, 0.2)
    stripes = 25.0 * np.sin(freq * (np.cos(angle) * xx + np.sin(angle) * yy))
    grain = rng.normal(0.0, 8.0, (height, width, 1)).astype(np.float32)
    return np.clip(base + stripes[..., None] + grain, 0, 255).astype(np.uint8)


def generate_jpeg_folder(root: Path, count: int, size: tuple[int, int], seed: int = 0) -> Path:
    """Write ``count`` JPEGs (quality 90) around ``size`` = (W, H) into two class folders."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in ("class_a", "class_b"):
        (root / c).mkdir(parents=True, exist_ok=True)
    for i in range(count):
        w, h = size if i % 4 else size[::-1]  # a quarter in portrait orientation, like ImageNet
        w, h = int(w * rng.uniform(0.85, 1.0)), int(h * rng.uniform(0.85, 1.0))
        buf = io.BytesIO()
        Image.fromarray(_texture(rng, w, h)).save(buf, format="JPEG", quality=90)
        (root / ("class_a" if i % 2 else "class_b") / f"img_{i:05d}.jpg").write_bytes(buf.getvalue())
    return root


class _Cycle:
    """Calls ``step(i)`` for ``chunk`` consecutive indices per call, wrapping around ``n``.

    Also records the CPU time of every call: on a shared machine wall time includes waiting for a
    core, while process CPU time of this single-threaded loop is the cost per core.
    """

    def __init__(self, n: int, chunk: int, step: Callable[[int], object]) -> None:
        self.n, self.chunk, self.step, self.pos = n, chunk, step, 0
        self.cpu: list[float] = []

    def __call__(self) -> None:
        t0 = time.process_time()
        for _ in range(self.chunk):
            self.step(self.pos % self.n)
            self.pos += 1
        self.cpu.append(time.process_time() - t0)


def run(args: argparse.Namespace, workdir: Path) -> dict[str, list[dict]]:
    import numpy as np
    import torch

    from veca_ssl.bench.data_stream import (
        folder_loader,
        loader_throughput,
        replay_seconds_per_sample,
        resume_rows,
        shard_loader,
        write_synthetic_shards,
    )
    from veca_ssl.data import (
        ImageFolderDataset,
        MaskingGenerator,
        MultiCropTransform,
        SSLDataset,
        SSLIterableDataset,
        WdsDataset,
        make_shards,
    )
    from veca_ssl.timing import measure

    torch.set_num_threads(1)
    size = tuple(int(v) for v in args.size.lower().split("x"))
    folder = generate_jpeg_folder(workdir / "jpeg", args.images, (size[0], size[1]))
    manifest = make_shards(str(folder), workdir / "shards", shard_size=max(1, args.images // 8), progress=False)
    folder_ds = ImageFolderDataset(folder)
    mb = sum(Path(p).stat().st_size for p in folder_ds.paths) / 2**20
    print(f"# {args.images} JPEGs (~{size[0]}x{size[1]}, {mb:.1f} MiB) and {manifest['num_shards']} shards in {workdir}")

    def transform(use_draft: bool, jitter_mode: str = "exact") -> Any:
        return MultiCropTransform(
            args.global_size, args.local_size, args.local_crops, use_draft=use_draft, jitter_mode=jitter_mode
        )

    grid = (args.global_size // args.patch_size,) * 2
    masks = MaskingGenerator(grid)
    ssl_draft = SSLDataset(folder_ds, transform(True), masks, args.patch_size)
    ssl_full = SSLDataset(folder_ds, transform(False), masks, args.patch_size)
    ssl_fused = SSLDataset(folder_ds, transform(True, "fused"), masks, args.patch_size)
    decoded = [folder_ds.load(i)[0] for i in range(min(len(folder_ds), 32))]
    plain = transform(False)
    stream = SSLIterableDataset(
        WdsDataset(manifest["spec"][4:], endless=True, shuffle_buffer=100, seed=0), transform(True), masks, args.patch_size
    )  # single process: the whole stream is one reader
    stream_it = iter(stream)

    cases: list[tuple[str, Callable[[int], object]]] = [
        ("decode only (JPEG → RGB, full size)", lambda i: folder_ds.load(i)),
        ("augment only (pre-decoded image)", lambda i: plain(decoded[i % len(decoded)], np.random.default_rng(i))),
        ("folder → SSL sample, full-size decode", lambda i: ssl_full[(i, i)]),
        ("folder → SSL sample (draft decode)", lambda i: ssl_draft[(i, i)]),
        ("shards → SSL sample (draft decode)", lambda i: next(stream_it)),
        ("folder → SSL sample, draft + fused jitter", lambda i: ssl_fused[(i, i)]),
    ]
    rows = []
    for name, step in cases:
        cycle = _Cycle(len(folder_ds), args.chunk, step)
        stats = measure(cycle, warmup=args.warmup, repeats=args.repeats)
        cpu = cycle.cpu[-args.repeats :]  # the timed calls
        rows.append(
            {
                "pipeline": name,
                "samples/s/core": args.chunk / statistics.median(cpu),
                "min": args.chunk / max(cpu),
                "max": args.chunk / min(cpu),
                "ms/sample (cpu)": statistics.median(cpu) * 1e3 / args.chunk,
                "wall samples/s": args.chunk / stats.median,
                "wall min": args.chunk / stats.max,
                "wall max": args.chunk / stats.min,
            }
        )
        print(f"#   {name}: {rows[-1]['samples/s/core']:.1f} samples/s per core", file=sys.stderr)
    if args.profile:
        prof = cProfile.Profile()
        prof.runcall(_Cycle(len(folder_ds), args.chunk * 2, lambda i: ssl_draft[(i, i)]))
        pstats.Stats(prof, stream=sys.stderr).sort_stats("tottime").print_stats(15)
    out = {"samples": rows}
    workers = [int(w) for w in args.workers.split(",") if w.strip()]
    t = transform(True)
    if workers:
        makers = {"folder": folder_loader(folder_ds, t, masks, args.patch_size, args.batch_size),
                  "shards": shard_loader(manifest["spec"], t, masks, args.patch_size, args.batch_size,
                                         window=max(1, args.images // 4))}
        out["loaders"] = []
        for k in workers:
            for name, make in makers.items():
                out["loaders"].append(loader_throughput(name, make, k, args.loader_batches, args.batch_size,
                                                        args.warmup, args.repeats))
                print(f"#   {name}, {k} worker(s): {out['loaders'][-1]['samples/s/core']:.1f} samples/s per core",
                      file=sys.stderr)
    if args.resume_at > 0:
        spec = write_synthetic_shards(workdir / "synthetic", args.resume_shards, args.resume_shard_size)
        out["resume"] = resume_rows(spec, args.resume_at, sorted({0, *workers}), t, masks, args.patch_size,
                                    args.batch_size, args.warmup, args.repeats)
        per_sample = replay_seconds_per_sample(spec)
        for row in out["resume"]:
            row["read-through estimate s"] = per_sample * row["start sample"]
    return out


def build_parser() -> argparse.ArgumentParser:
    p = bench_parser("data", __doc__)
    p.add_argument("--images", type=int, default=200, help="JPEGs to generate, >= 1")
    p.add_argument("--size", default="500x375", help="nominal image size WxH")
    p.add_argument("--global-size", type=int, default=224, help="global crop side in pixels")
    p.add_argument("--local-size", type=int, default=96, help="local crop side in pixels")
    p.add_argument("--local-crops", type=int, default=8, help="local crops per sample")
    p.add_argument("--patch-size", type=int, default=16, help="patch size of the iBOT masks")
    p.add_argument("--chunk", type=int, default=20, help="samples per timed call, >= 1")
    p.add_argument("--workdir", default=None, help="keep generated images/shards here (default: a temp dir)")
    p.add_argument("--profile", action="store_true", help="print a cProfile of the folder pipeline")
    p.add_argument("--workers", default="1,2", help="DataLoader worker counts to time ('' = skip)")
    p.add_argument("--batch-size", type=int, default=16, help="loader batch size")
    p.add_argument("--loader-batches", type=int, default=2, help="batches per timed loader call")
    p.add_argument("--resume-at", type=int, default=1_000_000,
                   help="global sample of the resume benchmark (0 = skip it)")
    p.add_argument("--resume-shards", type=int, default=20, help="shards of the synthetic resume set")
    p.add_argument("--resume-shard-size", type=int, default=1000, help="samples per synthetic shard")
    add_common_options(p, "data", threads=False)  # per-core throughput: one thread by definition
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    check_common_options(parser, args)
    if args.images < 1 or args.chunk < 1:
        parser.error(f"need --images >= 1 and --chunk >= 1, got --images {args.images} --chunk {args.chunk}")
    import torch

    from veca_ssl.tables import markdown_table, write_rows

    threads = torch.get_num_threads()
    try:
        if args.workdir:
            tables = run(args, Path(args.workdir))
        else:
            with tempfile.TemporaryDirectory(prefix="veca-bench-data-") as tmp:
                tables = run(args, Path(tmp))
    finally:
        torch.set_num_threads(threads)  # run() pins one thread; callers (tests) get theirs back
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"## per sample (one process, one core)\n\n{markdown_table(tables['samples'])}")
    print(
        f"\n(torch threads = 1; {args.chunk} samples per timed call, median of {args.repeats} after {args.warmup} "
        "warm-up calls. samples/s/core from process CPU time, min/max = its spread; wall-clock columns include "
        f"time spent waiting for a core on a busy machine: load average {load:.1f} on {os.cpu_count()} cores)"
    )
    if "loaders" in tables:
        print(f"\n## training DataLoaders, batch {args.batch_size}\n\n{markdown_table(tables['loaders'])}")
        print(f"\n({args.loader_batches} batches per timed call; samples/s/core from the worker processes' CPU time)")
    if "resume" in tables:
        print(f"\n## resume cost ({args.resume_shards} shards x {args.resume_shard_size} samples, batch "
              f"{args.batch_size})\n\n{markdown_table(tables['resume'])}")
        print("\n(seconds from building the loader to its first batch; 'images decoded' counts the decodes for "
              "that batch without workers; the read-through estimate is what reading every skipped sample "
              "without decoding would add)")
    out = output_path(args, "data")
    for name, rows in tables.items():
        target = out if name == "samples" else out.with_name(f"{out.stem}_{name}{out.suffix}")
        print("results: " + ", ".join(str(p) for p in write_rows(rows, target)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
