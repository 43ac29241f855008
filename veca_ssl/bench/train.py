"""Training throughput (forward + backward + AdamW step) of VECA vs the dense ViT of the same width
and depth, side by side, at several resolutions.

VECA rows: the full bank (C = M), the smallest width, and "nested": the width cycling through the
reference weights (what elastic training actually runs, on average). Each model is warmed up, then
the models are timed round-robin so background load affects every row alike.

``--parallel ddp fsdp2 [--compile]``: the student's parallel forms instead, on ``--processes`` local CPU
processes (gloo) or under torchrun (CUDA): per process, the step time, the model state it holds and
the peak a step adds, for each parallel form, eager and (with ``--compile``) with every block compiled.
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


def build_parser() -> argparse.ArgumentParser:
    p = bench_parser("train", __doc__)
    p.add_argument("--family", default="small", choices=["tiny", "small", "base", "large"],
                   help="model size of both networks")
    p.add_argument("--patch-size", type=int, default=16, help="patch size of both networks")
    p.add_argument("--resolutions", type=int, nargs="+", default=[224, 448],
                   help="square input sides in pixels, multiples of --patch-size")
    p.add_argument("--batch-size", type=int, default=8, help="images per step")
    p.add_argument("--device", default="auto", help="auto (cuda when available) | cpu | cuda")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast")
    p.add_argument("--widths", type=int, nargs="+", default=None,
                   help="VECA core widths to time besides the full bank (default: the narrowest)")
    p.add_argument("--no-nested", dest="nested", action="store_false",
                   help="leave out the nested row (the width cycling through the reference weights)")
    p.add_argument("--memory", action="store_true", help="also measure the peak memory one step adds")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute blocks in backward")
    p.add_argument("--parallel", nargs="+", choices=["ddp", "fsdp2"], default=None,
                   help="benchmark these parallel forms of VECA (full width) instead of VECA vs dense")
    p.add_argument("--compile", action="store_true",
                   help="with --parallel: also every form with torch.compile per block (mode default)")
    p.add_argument("--processes", type=int, default=2,
                   help="with --parallel: local CPU processes joined by gloo (ignored under torchrun)")
    add_common_options(p, "train")
    return p


def _step_fn(model, opt, images, budgets_of_call, autocast):
    calls = {"n": 0}

    def step():
        budget = budgets_of_call(calls["n"])
        calls["n"] += 1
        with autocast():
            out = model.forward_features(images, **({} if budget is None else {"num_cores": budget}))
            loss = out["cls"].float().square().mean() + out["patches"].float().square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def run(args: argparse.Namespace) -> list[dict]:
    """Time the training step of each model side by side at each resolution; one row per (resolution,
    model). ``args``: the options of :func:`build_parser` (``device`` already resolved to a name).

    Rows: the dense ViT, VECA at the full bank and at each of ``args.widths`` (default: the narrowest),
    and the nested row unless ``args.nested`` is False. With ``args.memory`` each row also has the
    peak memory one step adds (measured before any timing, as ``veca bench backbone`` does).
    """
    import torch

    from veca_ssl.method.widths import WidthPolicy
    from veca_ssl.models import build_backbone
    from veca_ssl.timing import peak_memory_bytes, time_round_robin

    device = torch.device(args.device)

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)

    models = {
        f"vit_{args.family} (dense)": build_backbone(f"vit_{args.family}", patch_size=args.patch_size),
        f"veca_{args.family}": build_backbone(f"veca_{args.family}", patch_size=args.patch_size),
    }
    for m in models.values():
        m.to(device).train().set_grad_checkpointing(args.grad_checkpointing)
    veca = models[f"veca_{args.family}"]
    widths = [veca.budgets[-1]] + [c for c in (getattr(args, "widths", None) or [veca.budgets[0]])
                                   if c != veca.budgets[-1]]
    for c in widths:
        veca.check_width(c)
    nested = WidthPolicy(veca.budgets, "sample", None, seed=0)
    # (row name, model, width of the i-th call, the row's "cores" entry)
    variants = [(f"vit_{args.family} (dense)", models[f"vit_{args.family} (dense)"], lambda i: None, None)]
    variants += [(f"veca_{args.family} C{c}", veca, lambda i, c=c: c, c) for c in widths]
    if getattr(args, "nested", True):
        variants.append((f"veca_{args.family} nested (sampled C)", veca, lambda i: nested(i)[0], "sampled"))
    opts = {id(m): torch.optim.AdamW(m.parameters(), lr=1e-6) for m in models.values()}
    rows = []
    for res in args.resolutions:
        images = torch.randn(args.batch_size, 3, res, res, device=device)
        steps = [_step_fn(m, opts[id(m)], images, pick, autocast) for _, m, pick, _ in variants]
        mems: list = [None] * len(steps)
        if getattr(args, "memory", False):
            for i, step in enumerate(steps):
                step()  # first step: AdamW's moments and one-time workspaces are not the step's peak
                mems[i] = peak_memory_bytes(step, device)
        times = time_round_robin(steps, args.warmup, args.repeats, device)
        dense = statistics.median(times[0])
        for (name, _, _, cores), t, mem in zip(variants, times, mems):
            med = statistics.median(t)
            rows.append({"resolution": res, "model": name, "cores": cores, "step_ms": med * 1e3,
                         "min_ms": min(t) * 1e3, "max_ms": max(t) * 1e3, "images_per_s": args.batch_size / med,
                         "speedup_vs_dense": dense / med,
                         "peak_mem_mb": None if mem is None else mem / 2**20,
                         "times_ms": [x * 1e3 for x in t]})
        stamp(rows)  # the threads and load average this resolution was timed at
        print(f"[{res}px] done", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_common_options(parser, args)
    if args.processes < 1:
        parser.error(f"--processes must be >= 1, got {args.processes}")
    from veca_ssl.models.veca import nested_widths

    if bad := [c for c in args.widths or [] if c not in nested_widths(64)]:
        parser.error(f"--widths {bad}: VECA presets have widths {', '.join(map(str, nested_widths(64)))}")
    import torch

    from veca_ssl.tables import markdown_table, write_rows

    if args.parallel:
        from veca_ssl.bench.train_parallel import parallel_benchmark

        print(f"veca bench train --parallel: veca_{args.family}/{args.patch_size} C=full, batch {args.batch_size} "
              f"per process, {args.processes} processes, warmup={args.warmup} repeats={args.repeats}", flush=True)
        threads = apply_threads(args, "train", processes=args.processes)
        rows = stamp(parallel_benchmark(args), threads=threads)
        print(markdown_table(rows))
        print("results: " + ", ".join(str(p) for p in write_rows(rows, output_path(args, "train"))))
        return 0
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    apply_threads(args, "train")
    print(f"veca bench train: family={args.family} batch={args.batch_size} device={args.device} "
          f"threads={torch.get_num_threads()} warmup={args.warmup} repeats={args.repeats}", flush=True)
    print_kernels(args.family, args.patch_size, args.device, torch.bfloat16 if args.bf16 else None)
    rows = run(args)
    cols = ["resolution", "model", "step_ms", "min_ms", "max_ms", "images_per_s", "speedup_vs_dense", "threads",
            "load_avg"]
    print(markdown_table(rows, cols + (["peak_mem_mb"] if args.memory else [])))
    print("results: " + ", ".join(str(p) for p in write_rows(rows, output_path(args, "train"))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
