"""CPU/gloo step time of 1 process vs 2 DDP processes at the same per-process batch (the cost of
gradient sync), and DDP with ``find_unused_parameters`` / ``static_graph``.

Nested core widths need neither: the core bank is one parameter sliced to ``[:C]``, so the cores
beyond the budget get exactly-zero gradient rows rather than missing ones. Two processes, each with its share of the
cores (``--num-threads``), modes interleaved step by step; rank 0's median and min–max over the timed steps.
"""

from __future__ import annotations

import argparse

from veca_ssl.bench import (
    add_common_options,
    apply_threads,
    bench_parser,
    check_common_options,
    output_path,
    stamp,
)


def build_parser() -> argparse.ArgumentParser:
    p = bench_parser("ddp", __doc__)
    add_common_options(p, "ddp", repeats=15)
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    check_common_options(p, args)
    from veca_ssl.bench.ddp_worker import ddp_overhead_benchmark
    from veca_ssl.tables import markdown_table, write_rows

    threads = apply_threads(args, "ddp", processes=2)
    rows = stamp(ddp_overhead_benchmark(args.repeats, warmup=args.warmup), threads=threads)
    print(markdown_table(rows))
    print("results: " + ", ".join(str(p) for p in write_rows(rows, output_path(args, "ddp"))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
