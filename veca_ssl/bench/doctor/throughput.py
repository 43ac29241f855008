"""Throughput and peak memory: VECA at C = 64 and C = 16 vs the dense ViT, forward and training step,
bf16, side by side in one run — measured by ``veca bench backbone`` and ``veca bench train`` (their
``run`` functions: warm-up, round-robin timing, medians and spread, peak memory), judged against
the goals by ``rules.speed_goals`` and ``rules.memory_linearity``.
"""

from __future__ import annotations

import argparse
import contextlib
import math

import torch

from veca_ssl.bench.doctor import rules
from veca_ssl.bench.doctor.checks import Context
from veca_ssl.bench.doctor.report import Result
from veca_ssl.bench.doctor.rules import FAIL, PASS

WIDTHS = (64, 16)
PATCH = 16


def _flash_only(cuda: bool) -> contextlib.AbstractContextManager:
    """On a GPU both networks run SDPA's flash kernel: the goals compare VECA with a flash-attention
    ViT, and the dense ViT's packed q/k/v layout would otherwise let recent PyTorch pick cuDNN for it
    (a different baseline on every machine). If flash cannot run, SDPA raises, and the check fails
    with its reason."""
    if not cuda:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.FLASH_ATTENTION)


def measure(ctx: Context, family: str, resolutions: list[int]) -> tuple[list[dict], list[dict]]:
    """(forward rows, training-step rows) of ``veca bench backbone`` / ``veca bench train`` at each
    resolution, each with its batch size."""
    from veca_ssl.bench import backbone as bench_forward
    from veca_ssl.bench import train as bench_step

    forward, step = [], []
    common = dict(family=family, patch_size=PATCH, device=str(ctx.device), warmup=ctx.args.warmup,
                  repeats=ctx.args.repeats)
    for res in resolutions:
        batch = rules.batch_for(res, PATCH, ctx.device.type, requested=ctx.args.batch_size)
        fwd_args = argparse.Namespace(**common, resolutions=[res], widths=list(WIDTHS), batch_size=batch,
                                      attn_backend="auto", compare_masked=False, no_memory=False, dtype="bfloat16",
                                      quick=False)
        step_args = argparse.Namespace(**common, resolutions=[res], batch_size=batch, bf16=True,
                                       widths=list(WIDTHS[1:]), nested=False, memory=True, grad_checkpointing=False)
        with _flash_only(ctx.cuda):
            rows = bench_forward.run(fwd_args)
        forward += [dict(r, batch=batch) for r in rows]
        with _flash_only(ctx.cuda):
            rows = bench_step.run(step_args)
        step += [dict(r, batch=batch) for r in rows]
        if ctx.cuda:
            torch.cuda.empty_cache()
    return forward, step


def _per_image_mib(row: dict) -> float | None:
    mem = row.get("peak_mem_mb")
    return None if mem is None else mem / row["batch"]


def side_by_side(forward: list[dict], step: list[dict]) -> list[dict]:
    """One row per (resolution, network): forward and training-step numbers next to each other."""
    steps = {(r["resolution"], r["model"]): r for r in step}
    out = []
    for f in forward:
        s = steps.get((f["resolution"], f["model"]), {})
        out.append({"px": f["resolution"], "batch": f["batch"], "network": f["model"],
                    "fwd img/s": f["images_per_s"], "fwd ms (min–max)": f"{f['latency_ms']:.3g} "
                    f"({f['latency_min_ms']:.3g}–{f['latency_max_ms']:.3g})",
                    "fwd x dense": f["speedup_vs_dense"], "fwd MiB/img": _per_image_mib(f),
                    "step img/s": s.get("images_per_s"),
                    "step ms (min–max)": f"{s['step_ms']:.3g} ({s['min_ms']:.3g}–{s['max_ms']:.3g})" if s else None,
                    "step x dense": s.get("speedup_vs_dense"), "step MiB/img": _per_image_mib(s) if s else None})
    return out


def judge(forward: list[dict], step: list[dict], family: str, cuda: bool) -> tuple[list[dict], list[rules.Verdict]]:
    """The speed goals (judged on a GPU) and the linear-memory check of VECA at C = 64 (forward and step)."""
    def real(rows: list[dict]) -> list[dict]:
        return [r for r in rows if "no-attention" not in r["model"]]

    goals = rules.speed_goals(real(forward), "forward", family, judged=cuda)
    goals += rules.speed_goals(real(step), "train step", family, judged=cuda)
    memory = []
    for kind, rows in (("forward", forward), ("train step", step)):
        points = [(r["patches"] if "patches" in r else (r["resolution"] // PATCH) ** 2, _per_image_mib(r))
                  for r in real(rows) if r.get("cores") == rules.GOAL_WIDTH]
        v = rules.memory_linearity([(n, None if m is None else m * 2**20) for n, m in points])
        memory.append(rules.Verdict(v.status, f"{kind}: {v.detail}"))
    return goals, memory


def check_throughput(ctx: Context) -> Result:
    family = ctx.args.bench_family or ("base" if ctx.cuda else "tiny")
    resolutions, left_out = rules.plan_resolutions(ctx.args.resolutions, ctx.device.type)
    forward, step = measure(ctx, family, resolutions)
    goals, memory = judge(forward, step, family, ctx.cuda)
    rows = side_by_side(forward, step)
    finite = all(math.isfinite(r["images_per_s"]) and r["images_per_s"] > 0 for r in forward + step)
    status = rules.overall([g["status"] for g in goals] + [v.status for v in memory] + [PASS])
    if not finite:
        status = FAIL
    F = family[0].upper()
    ratios = "; ".join(f"{r['px']} px fwd {r['fwd x dense']:.2f}x, step {r['step x dense']:.2f}x"
                       for r in rows if r["network"].endswith(f"C{rules.GOAL_WIDTH}") and r["step x dense"])
    judged = [v for v in memory if v.status != rules.SKIP]
    summary = (f"VECA-{F}/16 C{rules.GOAL_WIDTH} vs ViT-{F}/16 images/s, bf16"
               f"{', flash attention for both' if ctx.cuda else ''}: {ratios}"
               + (". Peak memory per image, " + "; ".join(v.detail for v in judged) if judged else ""))
    reasons = [g["goal"] + ": " + g["reason"] for g in goals if g["status"] == FAIL]
    reasons += [v.detail for v in memory if v.status == FAIL]
    if not finite:
        reasons.insert(0, "a throughput is not finite")
    notes = []
    if not ctx.cuda:
        notes.append("goals are judged on a GPU"
                     + ("" if family == "base" else f"; measured {family} (--bench-family base for B/16)"))
    if not judged:
        notes.append(f"memory linearity {memory[0].detail.split(': ', 1)[1]}")
    if left_out:
        notes.append(f"not measured: {', '.join(f'{r} px' for r in left_out)} ({next(iter(left_out.values()))})")
    nums = {f"{kind}_{r['px']}px_C{rules.GOAL_WIDTH}_x_dense": r[f"{kind} x dense"]
            for r in rows if r["network"].endswith(f"C{rules.GOAL_WIDTH}") for kind in ("fwd", "step")}
    reason = "; ".join(reasons) if status == FAIL else "; ".join(notes)
    return Result("throughput", status, summary, reason, nums, rows, goals)
