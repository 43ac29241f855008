"""The work behind ``veca bench ddp`` (its CLI is ``veca_ssl.bench.ddp``): a stand-in student, the
per-rank timing loop and the 2-process runner. Kept apart from the CLI so ``--help`` needs no torch."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from veca_ssl.distributed import barrier, init_distributed
from veca_ssl.parallelize import unwrap_model, wrap_ddp
from veca_ssl.spawn import run_two_process

_BENCH_MODELS: dict[str, dict[str, Any]] = {
    # name: (build_backbone kwargs, image size, per-process batch)
    "veca_tiny/8 d2 64-d": {"kw": {"patch_size": 8, "num_cores": 16, "depth": 2, "embed_dim": 64, "num_heads": 2},
                            "size": 32, "batch": 16},
    "veca_tiny/16 (192-d, 12 blocks)": {"kw": {"patch_size": 16, "num_cores": 64}, "size": 64, "batch": 8},
}


def _bench_worker(model_names: Sequence[str], repeats: int, warmup: int = 3) -> list[dict]:
    import statistics
    import time

    from veca_ssl.models import build_backbone

    info = init_distributed(device="cpu")
    rows = []
    for name in model_names:
        spec = _BENCH_MODELS[name]
        setups: dict[str, tuple[nn.Module, torch.optim.Optimizer]] = {}
        for mode in ("1 process (no DDP)", "DDP", "DDP find_unused_parameters", "DDP static_graph"):
            torch.manual_seed(0)
            model: nn.Module = SquaredFeatureLoss(build_backbone("veca_tiny", **spec["kw"]))
            if mode != "1 process (no DDP)":
                model = wrap_ddp(model, info, find_unused_parameters="find_unused" in mode,
                                 static_graph="static" in mode)
            setups[mode] = (model, torch.optim.SGD(model.parameters(), lr=1e-3))
        backbone = unwrap_model(model).backbone
        budget = backbone.budgets[len(backbone.budgets) // 2]
        g = torch.Generator().manual_seed(info.rank)
        images = torch.randn(spec["batch"], 3, spec["size"], spec["size"], generator=g)
        masks = torch.rand(spec["batch"], (spec["size"] // backbone.patch_size) ** 2, generator=g) < 0.3
        times: dict[str, list[float]] = {mode: [] for mode in setups}
        for i in range(warmup + repeats):  # modes interleaved, so load drift hits all of them alike
            for mode, (model, opt) in setups.items():
                barrier()
                if mode.startswith("1 process") and info.rank != 0:
                    continue  # the other rank idles: rank 0 alone is the 1-process run
                t0 = time.perf_counter()
                _bench_step(model, opt, images, budget, masks)
                if i >= warmup:
                    times[mode].append(time.perf_counter() - t0)
        for mode, ts in times.items():
            if ts:
                rows.append({"model": name, "mode": mode, "step_ms": 1e3 * statistics.median(ts),
                             "spread_ms": f"{1e3 * min(ts):.1f}–{1e3 * max(ts):.1f}"})
    return rows


def _bench_step(model: nn.Module, opt: torch.optim.Optimizer, images: torch.Tensor, budget: int,
                masks: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    model(images, budget, masks).backward()
    opt.step()


class SquaredFeatureLoss(nn.Module):
    """A stand-in student: one forward = the whole student pass at a width, returning a scalar loss
    (what the training loop hands to DDP), so gradient sync is measured and tested on it."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, images: torch.Tensor, num_cores: int, masks: torch.Tensor) -> torch.Tensor:
        out = self.backbone.forward_features(images, num_cores=num_cores, masks=masks)
        return out["cls"].pow(2).mean() + out["patches"].pow(2).mean()


def ddp_overhead_benchmark(repeats: int = 15, model_names: Sequence[str] | None = None,
                           warmup: int = 3) -> list[dict]:
    """CPU/gloo step time (forward + backward + SGD, VECA-tiny at the middle width, iBOT-style masks)
    of 1 process vs 2 DDP processes at the same per-process batch, and DDP with
    ``find_unused_parameters=True`` or ``static_graph=True``. One thread per process, modes interleaved;
    rank 0's median over ``repeats`` steps after ``warmup``. Run: ``veca bench ddp``.
    """
    names = list(model_names or _BENCH_MODELS)
    rows = run_two_process(_bench_worker, names, repeats, warmup, timeout_s=1800)[0]
    for r in rows:
        base = next(x for x in rows if x["model"] == r["model"] and x["mode"].startswith("1 process"))
        r["vs_1_process"] = r["step_ms"] / base["step_ms"]
    return rows
