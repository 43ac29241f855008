"""VECA vs the dense ViT of the same width and depth vs VECA with attention removed (the limit VECA
can approach), forward passes across resolutions.

Rows: resolution × {dense ViT, VECA at each core width, VECA without attention}. Columns: query–key
pairs per layer, analytic GFLOPs (attention included), median latency (min–max), images/s, peak
memory and the speed ratios. At each resolution every model is warmed up, then timed round-robin
(one call of each per round) so that load from elsewhere on the machine hits every row alike; each
ratio is the median over rounds of the ratio within a round.

Peak memory (peak_mem_mb) is what one forward adds on top of what was resident before it: the
activations, attention scores and workspaces of that call — not the weights or the input, which
already exist. In inference mode activations are freed block by block, so at batch 1 and small
resolutions it is a few MB: a ViT-tiny at 224 px peaks at about 2 MB (a count of live tensor bytes
agrees). On CPU it is read from the kernel's resident-set high-water mark, which varies by about
1 MB between runs, so rows under 1 MB are flagged as below what it resolves; compare memory at
larger resolutions or batches, where the growth with the patch count is what matters.
"""

from __future__ import annotations

import argparse
import statistics

from veca_ssl.bench import (
    add_common_options,
    apply_threads,
    bench_parser,
    check_common_options,
    output_path,
    print_kernels,
    stamp,
)

MEMORY_RESOLUTION_MB = 1.0  # run-to-run spread of the CPU high-water mark (measured: 2.0–3.4 MB, same call)


def build_parser() -> argparse.ArgumentParser:
    p = bench_parser("backbone", __doc__)
    p.add_argument("--family", default="small", choices=["tiny", "small", "base", "large"],
                   help="model size of both networks")
    p.add_argument("--patch-size", type=int, default=16, help="patch size of both networks")
    p.add_argument("--resolutions", type=int, nargs="+", default=[224, 448, 896, 1344],
                   help="square input sides in pixels, multiples of --patch-size")
    p.add_argument("--widths", type=int, nargs="+", default=None,
                   help="VECA core widths to time (default: every width of the model)")
    p.add_argument("--batch-size", type=int, default=1, help="images per forward")
    p.add_argument("--attn-backend", default="auto", help="VECA attention backend: auto, sdpa, sdpa_masked, math")
    p.add_argument("--compare-masked", action="store_true",
                   help="also time VECA at the largest width with one masked SDPA call")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    p.add_argument("--device", default="auto", help="auto (cuda when available) | cpu | cuda")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights and inputs")
    p.add_argument("--quick", action="store_true",
                   help="224 and 448 px, the narrowest and widest width only")
    add_common_options(p, "backbone")
    return p


def _variants(args) -> list:
    """(row name, model, width or None for the dense ViT), the no-attention limit last."""
    from veca_ssl.models import build_backbone

    common = dict(patch_size=args.patch_size)
    veca = build_backbone(f"veca_{args.family}", attn_backend=args.attn_backend, **common)
    widths = args.widths or ([veca.budgets[0], veca.budgets[-1]] if args.quick else list(veca.budgets))
    out: list = [
        (f"vit_{args.family} (dense)", build_backbone(f"vit_{args.family}", **common), None)]
    out += [(f"veca_{args.family} C{c}", veca, c) for c in widths]
    if args.compare_masked:
        masked = build_backbone(f"veca_{args.family}", attn_backend="sdpa_masked", **common)
        masked.load_state_dict(veca.state_dict())
        out.append((f"veca_{args.family} C{widths[-1]} masked-SDPA", masked, widths[-1]))
    limit = build_backbone(f"veca_{args.family}", attn_backend="none", **common)
    out.append((f"veca_{args.family} C{widths[-1]} no-attention (limit)", limit, widths[-1]))
    return out


def run(args) -> list[dict]:
    import torch

    from veca_ssl.models.flops import dense_attention_pairs, veca_attention_pairs
    from veca_ssl.timing import Stats, peak_memory_bytes, time_round_robin

    if args.quick:
        args.resolutions = [224, 448]
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    variants = _variants(args)
    for _, model, _ in variants:
        model.to(device=device, dtype=dtype).eval()

    def calls_at(res: int) -> list:
        images = torch.randn(args.batch_size, 3, res, res, device=device, dtype=dtype)
        return [lambda m=model, kw=({} if c is None else {"num_cores": c}), x=images: m.forward_features(x, **kw)
                for _, model, c in variants]

    # Memory first, for every resolution, while the process heap is still small: once timing has run
    # with heap reuse, freed chunks are recycled inside the heap and would inflate the next peak.
    mems_at: dict[int, list] = {}
    with torch.inference_mode():
        for res in args.resolutions:
            calls = calls_at(res)
            if args.no_memory:
                mems_at[res] = [None] * len(calls)
                continue
            mems_at[res] = []
            for call in calls:
                peak_memory_bytes(call, device)  # first call: one-time allocations (workspaces) are not the peak
                mems_at[res].append(peak_memory_bytes(call, device))
    rows: list[dict] = []
    for res in args.resolutions:
        calls, mems = calls_at(res), mems_at[res]
        with torch.inference_mode():
            times = time_round_robin(calls, args.warmup, args.repeats, device)
        n = (res // args.patch_size) ** 2
        for (name, model, c), t, mem in zip(variants, times, mems):
            st = Stats(statistics.median(t), min(t), max(t), len(t))
            if c is None:
                pairs = dense_attention_pairs(n + 1)
            else:
                pairs = 0 if model.config["attn_backend"] == "none" else veca_attention_pairs(n, c)
            # ratios are medians over rounds of same-round ratios: a slow spell on a shared machine
            # hits all calls of a round alike, so it cancels instead of skewing one row's median
            vs_dense = statistics.median(d / x for d, x in zip(times[0], t))
            vs_limit = statistics.median(x / lim for x, lim in zip(t, times[-1]))
            rows.append({
                "resolution": res, "model": name, "patches": n, "cores": c, "qk_pairs_per_layer": pairs,
                "gflops": model.flops(res, res, c) / 1e9, "latency_ms": st.median * 1e3,
                "latency_min_ms": st.min * 1e3, "latency_max_ms": st.max * 1e3,
                "images_per_s": args.batch_size / st.median,
                "peak_mem_mb": None if mem is None else mem / 2**20,
                # CUDA's allocator counts exactly; the CPU high-water mark only to about a MB
                "peak_mem_resolved": None if mem is None else (device.type == "cuda"
                                                               or mem / 2**20 >= MEMORY_RESOLUTION_MB),
                "speedup_vs_dense": vs_dense, "x_limit": vs_limit, "times_ms": [x * 1e3 for x in t],
            })
        stamp(rows)  # the threads and load average this resolution was timed at
        print(f"[{res}px] done", flush=True)
    return rows


def _slope(xs: list[float], ys: list[float]) -> float:
    if len(xs) < 2:
        return 0.0
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0


def summarize(rows: list[dict]) -> list[str]:
    lines = []
    for res in sorted({r["resolution"] for r in rows}):
        rs = [r for r in rows if r["resolution"] == res]
        vecas = [r for r in rs if r["cores"] is not None and "no-attention" not in r["model"]
                 and "masked" not in r["model"]]
        widest = max(vecas, key=lambda r: r["cores"])
        vecas = sorted(vecas, key=lambda r: r["cores"])
        # adjacent widths compared round by round (median of same-round ratios), 3% noise allowance
        steps = [statistics.median(b / a for a, b in zip(lo["times_ms"], hi["times_ms"]))
                 for lo, hi in zip(vecas, vecas[1:])]
        mono = all(s >= 0.97 for s in steps)
        cs = [r["cores"] for r in vecas]
        slope = _slope(cs, [r["latency_ms"] for r in vecas])
        lines.append(f"{res}px: C{widest['cores']} is {times_faster(widest['speedup_vs_dense'])} than dense and "
                     f"takes {widest['x_limit']:.3f}× the time of the no-attention limit; latency non-decreasing "
                     f"in C: {mono} (smallest adjacent ratio {min(steps, default=1.0):.3f}; fit {slope:+.2f} ms "
                     "per core)")
    widest_rows = [r for r in rows if r["cores"] is not None and "no-attention" not in r["model"]
                   and "masked" not in r["model"]]
    top = max(r["cores"] for r in widest_rows)
    mem = [(r["patches"], r["peak_mem_mb"]) for r in widest_rows if r["cores"] == top and r["peak_mem_mb"]]
    small = sorted({r["resolution"] for r in rows if r.get("peak_mem_resolved") is False})
    if small:
        lines.append(f"peak memory under {MEMORY_RESOLUTION_MB:g} MB at {', '.join(f'{s}px' for s in small)}: "
                     "one forward's activations in inference mode, near what the CPU high-water mark "
                     "resolves (see --help); compare larger resolutions or batches")
    if len(mem) >= 3:
        xs, ys = zip(*mem)
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        sxy = sum((x - mx) * (y - my) for x, y in mem)
        sxx, syy = sum((x - mx) ** 2 for x in xs), sum((y - my) ** 2 for y in ys)
        r2 = sxy * sxy / (sxx * syy) if sxx and syy else float("nan")
        lines.append(f"peak memory of C{top} vs patches: {sxy / sxx * 1024:.2f} MB per 1k patches, "
                     f"linear fit R^2 = {r2:.4f}")
    return lines


def times_faster(ratio: float) -> str:
    """A speed ratio (reference time / this time) in words: ``2.30× faster`` or ``2.33× slower``."""
    if ratio >= 1:
        return f"{ratio:.2f}× faster"
    return f"{1 / ratio:.2f}× slower"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_common_options(parser, args)
    import torch

    from veca_ssl.tables import markdown_table, write_rows

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    apply_threads(args, "backbone")
    print(f"veca bench backbone: family={args.family} patch={args.patch_size} device={args.device} "
          f"threads={torch.get_num_threads()} batch={args.batch_size} warmup={args.warmup} "
          f"repeats={args.repeats} (median, min–max); allocator: glibc heap reuse while timing", flush=True)
    print_kernels(args.family, args.patch_size, args.device, getattr(torch, args.dtype), args.attn_backend)
    rows = run(args)
    cols = ["resolution", "model", "qk_pairs_per_layer", "gflops", "latency_ms", "latency_min_ms",
            "latency_max_ms", "images_per_s", "peak_mem_mb", "speedup_vs_dense", "x_limit", "threads", "load_avg"]
    print(markdown_table(rows, cols))
    print("peak_mem_mb: memory one forward adds above what was resident (activations and workspaces; "
          "weights and input excluded)")
    for line in summarize(rows):
        print(line)
    paths = write_rows(rows, output_path(args, "backbone"))
    print("results: " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
