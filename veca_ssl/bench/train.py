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
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA)")
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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_common_options(parser, args)
    if args.processes < 1:
        parser.error(f"--processes must be >= 1, got {args.processes}")
    import torch

    from veca_ssl.method.widths import WidthPolicy
    from veca_ssl.models import build_backbone
    from veca_ssl.tables import markdown_table, write_rows
    from veca_ssl.timing import time_round_robin

    if args.parallel:
        from veca_ssl.bench.train_parallel import parallel_benchmark

        threads = apply_threads(args, "train", processes=args.processes)
        print(f"veca bench train --parallel: veca_{args.family}/{args.patch_size} C=full, batch {args.batch_size} "
              f"per process, {args.processes} processes, warmup={args.warmup} repeats={args.repeats}", flush=True)
        rows = stamp(parallel_benchmark(args), threads=threads)
        print(markdown_table(rows))
        print("results: " + ", ".join(str(p) for p in write_rows(rows, output_path(args, "train"))))
        return 0
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    apply_threads(args, "train")
    print(f"veca bench train: family={args.family} batch={args.batch_size} device={device} "
          f"threads={torch.get_num_threads()} warmup={args.warmup} repeats={args.repeats}", flush=True)

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)

    models = {
        f"vit_{args.family} (dense)": build_backbone(f"vit_{args.family}", patch_size=args.patch_size),
        f"veca_{args.family}": build_backbone(f"veca_{args.family}", patch_size=args.patch_size),
    }
    for m in models.values():
        m.to(device).train().set_grad_checkpointing(args.grad_checkpointing)
    veca = models[f"veca_{args.family}"]
    nested = WidthPolicy(veca.budgets, "sample", None, seed=0)
    variants = [
        (f"vit_{args.family} (dense)", models[f"vit_{args.family} (dense)"], lambda i: None),
        (f"veca_{args.family} C{veca.budgets[-1]}", veca, lambda i: veca.budgets[-1]),
        (f"veca_{args.family} C{veca.budgets[0]}", veca, lambda i: veca.budgets[0]),
        (f"veca_{args.family} nested (sampled C)", veca, lambda i: nested(i)[0]),
    ]
    opts = {id(m): torch.optim.AdamW(m.parameters(), lr=1e-6) for m in models.values()}
    rows = []
    for res in args.resolutions:
        images = torch.randn(args.batch_size, 3, res, res, device=device)
        steps = [_step_fn(m, opts[id(m)], images, pick, autocast) for _, m, pick in variants]
        times = time_round_robin(steps, args.warmup, args.repeats, device)
        dense = statistics.median(times[0])
        for (name, _, _), t in zip(variants, times):
            med = statistics.median(t)
            rows.append({"resolution": res, "model": name, "step_ms": med * 1e3, "min_ms": min(t) * 1e3,
                         "max_ms": max(t) * 1e3, "images_per_s": args.batch_size / med,
                         "speedup_vs_dense": dense / med})
        stamp(rows)  # the threads and load average this resolution was timed at
        print(f"[{res}px] done", flush=True)
    print(markdown_table(rows))
    print("results: " + ", ".join(str(p) for p in write_rows(rows, output_path(args, "train"))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
