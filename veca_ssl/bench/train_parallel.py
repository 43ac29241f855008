"""``veca bench train --parallel``: the student's parallel forms (DDP, FSDP2; eager and compiled) side
by side on local CPU processes (gloo) or under torchrun (CUDA). Per process: the step time and the
memory -- the model state this process keeps between steps (parameters and AdamW moments it holds:
all of them under DDP, its shards under FSDP2; counted from the tensors) plus the measured peak a
step adds on top (activations, gradients, FSDP's gathered parameters and communication buffers).
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

import torch
from torch import nn

from veca_ssl.models import build_backbone
from veca_ssl.timing import peak_memory_bytes, time_round_robin


class _FeatureLoss(nn.Module):
    """A stand-in student (``.backbone`` like the methods' networks): one forward = forward_features at
    the full width and a squared-feature loss."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.backbone.forward_features(images)
        return out["cls"].float().square().mean() + out["patches"].float().square().mean()


def _state_bytes(net: nn.Module, opt: torch.optim.Optimizer) -> int:
    """Bytes of the parameters and optimiser state this process holds (local shards of DTensors)."""
    from torch.distributed.tensor import DTensor

    def local(t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if isinstance(t, DTensor) else t

    tensors = [local(p) for p in net.parameters()]
    tensors += [local(v) for st in opt.state.values() for v in st.values() if torch.is_tensor(v)]
    return sum(t.numel() * t.element_size() for t in tensors)


def _parallel_worker(args: argparse.Namespace) -> list[dict]:
    from veca_ssl.distributed import barrier, init_distributed
    from veca_ssl.parallelize import compile_blocks, device_mesh, mp_policy_for, shard_network, wrap_ddp

    info = init_distributed(device="auto")
    bf16 = info.device.type == "cuda" and args.bf16
    variants: list[tuple[str, str, Any, nn.Module, torch.optim.Optimizer]] = []
    for mode in args.parallel:
        for comp in (["none", "default"] if args.compile else ["none"]):
            torch.manual_seed(0)
            net = _FeatureLoss(build_backbone(f"veca_{args.family}", patch_size=args.patch_size)).to(info.device)
            net.backbone.set_grad_checkpointing(args.grad_checkpointing)
            net.backbone.mask_token.requires_grad_(False)  # no masking here; DDP needs every gradient
            compile_blocks(net.backbone, comp)
            if mode == "ddp":
                engine = wrap_ddp(net, info)
            else:
                mp = mp_policy_for(torch.bfloat16 if bf16 else None)
                engine = shard_network(net, device_mesh(info), mp, train=True)
            variants.append((mode, comp, engine, net, torch.optim.AdamW(net.parameters(), lr=1e-6)))

    def step_fn(engine: nn.Module, opt: torch.optim.Optimizer, images: torch.Tensor):
        def step() -> None:
            with torch.autocast(info.device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = engine(images)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return step

    rows = []
    for res in args.resolutions:
        g = torch.Generator().manual_seed(info.rank)
        images = torch.randn(args.batch_size, 3, res, res, generator=g).to(info.device)
        steps = [step_fn(engine, opt, images) for _, _, engine, _, opt in variants]
        peaks = []
        for step in steps:  # memory before timing (veca_ssl.timing); the first call also compiles
            for _ in range(args.warmup):
                step()
            barrier()
            peaks.append(peak_memory_bytes(step, info.device))
        if info.rank == 0:
            print(f"[{res}px] warm-up (and compilation) and memory done; timing", flush=True)
        times = time_round_robin(steps, 0, args.repeats, info.device)
        for (mode, comp, _, net, opt), peak, t in zip(variants, peaks, times):
            state = _state_bytes(net, opt)
            rows.append({"resolution": res, "parallel": mode, "compile": comp, "rank": info.rank,
                         "step_ms": 1e3 * statistics.median(t), "min_ms": 1e3 * min(t), "max_ms": 1e3 * max(t),
                         "state_mib": state / 2**20, "step_peak_mib": None if peak is None else peak / 2**20,
                         "total_mib": None if peak is None else (state + peak) / 2**20})
        barrier()
    return rows


def parallel_benchmark(args: argparse.Namespace) -> list[dict]:
    """Rows per resolution, parallel form and compile mode: every process's step time and memory
    (``rank`` column), and the ratio of each form's step time to eager DDP's at the same resolution."""
    from veca_ssl.distributed import get_world_size

    if get_world_size() > 1:  # under torchrun: this process is one of them
        per_rank = [_parallel_worker(args)]
    else:
        from veca_ssl.spawn import run_two_process

        per_rank = run_two_process(_parallel_worker, args, world_size=args.processes, timeout_s=24 * 3600)
    rows = [r for part in per_rank for r in part]
    for r in rows:
        base = next((b for b in rows if b["resolution"] == r["resolution"] and b["rank"] == r["rank"]
                     and b["compile"] == "none" and b["parallel"] == args.parallel[0]), r)
        r[f"time_vs_{args.parallel[0]}_eager"] = r["step_ms"] / base["step_ms"]
    return sorted(rows, key=lambda r: (r["resolution"], r["parallel"], r["compile"], r["rank"]))
