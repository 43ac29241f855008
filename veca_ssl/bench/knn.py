"""k-NN evaluation seconds per 10k queries against a 100k bank: the torch and faiss backends next to
a matrix-product floor.

All three are measured side by side in one run on the same random bank (default 100k × 384, 10k
queries, 1000 classes, k up to 200):

- ``floor``: what any exact search must at least do — ``q @ bank.T`` and ``topk(200)`` in the same
  query chunks, nothing else (no normalisation, no voting);
- ``torch``: the full DINOv2 protocol of ``veca_ssl.knn.knn_classify`` (normalise, chunked search,
  weighted votes for k ∈ {10, 20, 100, 200}, top-1/top-5);
- ``faiss``: the same protocol with ``faiss.IndexFlatIP`` neighbour search (GPU when available;
  needs the ``[faiss]`` extra, skipped with a note without it).

Each is warmed up and timed (median, min–max).
"""

from __future__ import annotations

import argparse
import sys

from veca_ssl.bench import (
    add_common_options,
    apply_threads,
    bench_parser,
    check_common_options,
    output_path,
    stamp,
)


def _floor(bank, queries, k: int, chunk: int) -> None:
    for s in range(0, queries.shape[0], chunk):
        (queries[s:s + chunk] @ bank.T).topk(k, dim=1)


def run(n_bank: int = 100_000, n_queries: int = 10_000, dim: int = 384, classes: int = 1000,
        chunk: int = 1024, device: str = "cpu", warmup: int = 3, repeats: int = 5,
        backends: tuple[str, ...] = ("floor", "torch", "faiss")) -> list[dict]:
    """Time each backend; return table rows (seconds, seconds per 10k queries, ratio to the floor)."""
    import torch

    from veca_ssl.knn import KNN_KS, faiss_available, knn_classify
    from veca_ssl.timing import measure

    dev = torch.device(device)
    g = torch.Generator().manual_seed(0)
    bank = torch.randn(n_bank, dim, generator=g).to(dev)
    queries = torch.randn(n_queries, dim, generator=g).to(dev)
    yb = torch.randint(0, classes, (n_bank,), generator=g).to(dev)
    yq = torch.randint(0, classes, (n_queries,), generator=g).to(dev)
    k = min(max(KNN_KS), n_bank)
    if "faiss" in backends:
        if not faiss_available():
            print("faiss is not installed (pip install 'veca-ssl[faiss]'): skipping the faiss backend",
                  file=sys.stderr)
            backends = tuple(b for b in backends if b != "faiss")
        else:
            import faiss

            if hasattr(faiss, "omp_set_num_threads"):
                faiss.omp_set_num_threads(torch.get_num_threads())  # same CPU threads as torch
    fns = {
        "floor": lambda: _floor(bank, queries, k, chunk),
        "torch": lambda: knn_classify(bank, yb, queries, yq, backend="torch", num_classes=classes,
                                      chunk_size=chunk, device=dev),
        "faiss": lambda: knn_classify(bank, yb, queries, yq, backend="faiss", num_classes=classes,
                                      chunk_size=chunk, device=dev),
    }
    rows, floor_s = [], None
    for name in backends:
        stats = measure(fns[name], warmup=warmup, repeats=repeats, device=dev)
        floor_s = stats.median if name == "floor" else floor_s
        rows.append({
            "backend": name, "bank": n_bank, "queries": n_queries, "dim": dim, "device": str(dev),
            "seconds": stats.median, "min_s": stats.min, "max_s": stats.max,
            "s_per_10k_queries": stats.median * 10_000 / n_queries,
            "vs_floor": stats.median / floor_s if floor_s else None,
        })
        stamp(rows)  # the threads and load average this backend was timed at
    return rows


def build_parser() -> argparse.ArgumentParser:
    p = bench_parser("knn", __doc__)
    p.add_argument("--bank", type=int, default=100_000, help="bank size N")
    p.add_argument("--queries", type=int, default=10_000, help="number of queries Q")
    p.add_argument("--dim", type=int, default=384, help="feature dimension D")
    p.add_argument("--classes", type=int, default=1000, help="number of labels in the bank")
    p.add_argument("--chunk-size", type=int, default=1024, help="queries per similarity chunk")
    p.add_argument("--device", default="auto", help="auto (cuda when available) | cpu | cuda")
    p.add_argument("--backends", default="floor,torch,faiss", help="comma-separated: floor, torch, faiss")
    add_common_options(p, "knn")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    check_common_options(p, args)
    backends = tuple(b.strip() for b in args.backends.split(",") if b.strip())
    if not backends or set(backends) - {"floor", "torch", "faiss"}:
        p.error(f"--backends {args.backends!r}: choose from floor, torch, faiss (comma-separated)")
    import torch

    from veca_ssl.tables import markdown_table, write_rows

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    apply_threads(args, "knn")
    rows = run(args.bank, args.queries, args.dim, args.classes, args.chunk_size, device, args.warmup,
               args.repeats, backends)
    for r in rows:
        r["time"] = f"{r['seconds']:.3f} ({r['min_s']:.3f}–{r['max_s']:.3f})"
    print(f"k-NN bench: bank {args.bank}×{args.dim}, {args.queries} queries, k ≤ 200, "
          f"{torch.get_num_threads()} threads, device {device}")
    print(markdown_table(rows, ["backend", "time", "s_per_10k_queries", "vs_floor", "threads", "load_avg"]))
    print("results: " + ", ".join(str(p) for p in write_rows(rows, output_path(args, "knn"))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
