"""The doctor's in-process checks: environment, attention kernels, a bf16 training step, torch.compile
and the faiss k-NN. (Throughput: ``throughput.py``; the ``veca train`` runs: ``resume.py``.)

Each check takes the :class:`Context` and returns a :class:`~veca_ssl.bench.doctor.report.Result`;
its decision is one of the pure functions of ``rules.py``.
"""

from __future__ import annotations

import argparse
import os
import platform
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from veca_ssl.bench.doctor import rules
from veca_ssl.bench.doctor.report import Result
from veca_ssl.bench.doctor.rules import FAIL, PASS, SKIP


@dataclass
class Context:
    device: torch.device
    machine: rules.Machine
    args: argparse.Namespace
    work: Path  # scratch space inside the output directory

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


def _version(module: str) -> str | None:
    from importlib import metadata

    for dist in (module, f"{module}-cpu", f"{module}-gpu"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def faiss_gpus() -> int:
    try:
        import faiss
    except ImportError:
        return 0
    return int(getattr(faiss, "get_num_gpus", lambda: 0)())


def environment_numbers(device: torch.device) -> dict:
    """Versions and the device, as flat name -> value pairs."""
    import numpy

    import veca_ssl

    nums: dict = {"python": platform.python_version(), "platform": platform.platform(),
                  "veca_ssl": getattr(veca_ssl, "__version__", _version("veca-ssl")), "torch": torch.__version__,
                  "cuda_build": torch.version.cuda, "numpy": numpy.__version__,
                  "cpu_threads": torch.get_num_threads(),
                  "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
                  "xformers": _version("xformers"), "faiss": _version("faiss"), "faiss_gpus": faiss_gpus()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(device if device.type == "cuda" else 0)
        nums.update(gpus=torch.cuda.device_count(), gpu=props.name,
                    capability=f"sm{props.major}{props.minor}", gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    cudnn=torch.backends.cudnn.version(), bf16_supported=torch.cuda.is_bf16_supported())
        tbc = torch.backends.cuda
        if hasattr(tbc, "is_flash_attention_available"):  # torch >= 2.5
            nums["flash_attention_built"] = tbc.is_flash_attention_available()
        nums["sdpa_enabled"] = ",".join(name for name, switch in (
            ("flash", "flash_sdp_enabled"), ("efficient", "mem_efficient_sdp_enabled"),
            ("cudnn", "cudnn_sdp_enabled"), ("math", "math_sdp_enabled"))
            if getattr(tbc, switch, lambda: False)())
        import torch.distributed as dist

        if dist.is_available() and dist.is_nccl_available():
            version = torch.cuda.nccl.version()  # a tuple; a bare int on old builds
            nums["nccl"] = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
    else:
        nums.update(gpus=0)
    return nums


def check_environment(ctx: Context) -> Result:
    nums = environment_numbers(ctx.device)
    x = torch.arange(6, device=ctx.device, dtype=torch.float32).reshape(2, 3)
    works = float((x @ x.T).sum()) == 83.0  # a matmul on the device, read back
    where = (f"{nums.get('gpus')}x {nums.get('gpu')} ({nums.get('capability')}, {nums.get('gpu_memory_gib')} GiB)"
             if ctx.cuda else f"CPU, {nums['cpu_threads']} intra-op thread(s), {nums['cpus_usable']} usable cores")
    summary = (f"{where}; torch {nums['torch']}, CUDA {nums['cuda_build'] or '–'}, cuDNN {nums.get('cudnn') or '–'}, "
               f"NCCL {nums.get('nccl') or '–'}, xformers {nums['xformers'] or '–'}, faiss {nums['faiss'] or '–'} "
               f"({nums['faiss_gpus']} GPUs)")
    if not works:
        return Result("environment", FAIL, summary, f"a matmul on {ctx.device} gave a wrong result", nums)
    if ctx.cuda and not nums.get("bf16_supported"):
        return Result("environment", FAIL, summary, "this GPU has no bf16 (training uses bf16 autocast on CUDA)", nums)
    return Result("environment", PASS, summary, numbers=nums)


# --------------------------------------------------------------------------------------- attention
def _pytorch_verdicts(query, key, value, **options) -> dict[str, bool]:
    """PyTorch's own answer (``torch.backends.cuda.can_use_*_attention``) for live CUDA tensors."""
    import torch.backends.cuda as tbc

    mask, dropout = options.get("attn_mask"), float(options.get("dropout_p", 0.0))
    causal, gqa = bool(options.get("is_causal", False)), bool(options.get("enable_gqa", False))
    try:
        params = tbc.SDPAParams(query, key, value, mask, dropout, causal, gqa)
    except TypeError:  # torch < 2.5: no enable_gqa
        params = tbc.SDPAParams(query, key, value, mask, dropout, causal)
    return {"flash": bool(tbc.can_use_flash_attention(params)),
            "efficient": bool(tbc.can_use_efficient_attention(params))}


def disagreements(ours: dict[str, list[str]], theirs: dict[str, bool]) -> list[str]:
    """Where the checker's blockers (``ours``: kernel -> reasons) and PyTorch's ``can_use_*`` answers
    (``theirs``: kernel -> bool) disagree about a call."""
    from veca_ssl.models.sdpa import POLICY_RULES

    out = []
    for kernel, can_use in theirs.items():
        # rules of our own (no padding copy, no materialised bias) are stricter than PyTorch's gates
        gates = [r for r in ours.get(kernel, []) if not r.startswith(POLICY_RULES)]
        if can_use == bool(gates):
            said = f"blocked ({gates[0]})" if gates else "eligible"
            out.append(f"PyTorch says can_use_{kernel}={can_use}, the checker says {said}")
    return out


def check_attention(ctx: Context) -> Result:
    """The kernel each network's attention runs (profiler names) in bf16 at 224 px, and each SDPA call's
    inputs against the flash / memory-efficient conditions (on a GPU also against PyTorch's own
    ``can_use_*_attention``)."""
    from veca_ssl.models import build_backbone
    from veca_ssl.models.kernels import probe_attention
    from veca_ssl.models.sdpa import DEFAULT_CAPABILITY, capture_sdpa, kernel_blockers

    family = ctx.args.step_family
    capability = torch.cuda.get_device_capability(ctx.device) if ctx.cuda else DEFAULT_CAPABILITY
    rows, problems, ran = [], [], {}
    for name in (f"veca_{family}", f"vit_{family}"):
        # the probe runs one block built from the config: the weights and the depth do not change the kernel
        model = build_backbone(name, patch_size=16, depth=1)
        report = probe_attention(model, ctx.device, torch.bfloat16, 224)
        ran[name] = report
        if report.error:
            problems.append(f"{name}: profiler: {report.error}")
        fused = report.kernels & ({"flash", "efficient", "cudnn"} if ctx.cuda else {"flash"})
        if not fused or "math" in report.kernels:
            problems.append(f"{name} ran {sorted(report.kernels) or 'no SDPA kernel'}, not a fused kernel")
        verdicts: list[dict] = []
        replica = model.to(ctx.device).eval()
        hook = (lambda *a, out=verdicts, **o: out.append(_pytorch_verdicts(*a, **o))) if ctx.cuda else None
        with capture_sdpa(hook) as calls, torch.no_grad(), torch.autocast(ctx.device.type, dtype=torch.bfloat16):
            replica.forward_features(torch.randn(1, 3, 224, 224, device=ctx.device))
        for i, call in enumerate(calls):
            ours = {k: kernel_blockers(call, k, capability) for k in ("flash", "efficient")}
            row = {"network": name, "call": call.describe(), "kernel ran": ", ".join(sorted(report.kernels)),
                   "flash blockers": "; ".join(ours["flash"]) or "none",
                   "efficient blockers": "; ".join(ours["efficient"]) or "none"}
            for kernel, blockers in ours.items():
                if blockers:
                    problems.append(f"{name} call {i}: {kernel}: {blockers[0]}")
            if verdicts:
                row["pytorch can_use"] = ", ".join(f"{k}={v}" for k, v in verdicts[i].items())
                problems += [f"{name} call {i}: {d}" for d in disagreements(ours, verdicts[i])]
            rows.append(row)
    names = "; ".join(f"{n}: {', '.join(f'{fam} ({r.names[fam][0]})' for fam in sorted(r.kernels)) or '–'}"
                      for n, r in ran.items())
    where = (f"sm{capability[0]}{capability[1]}" if ctx.cuda
             else f"CPU (inputs also checked against the CUDA conditions of sm{capability[0]}{capability[1]})")
    summary = f"bf16 224 px on {where}: {names}"
    nums = {f"{n}_kernels": ",".join(sorted(r.kernels)) for n, r in ran.items()}
    if problems:
        return Result("attention", FAIL, summary, "; ".join(problems[:3]), nums, rows)
    return Result("attention", PASS, summary, numbers=nums, rows=rows)


# --------------------------------------------------------------------------------------- bf16 step
# bf16 keeps 8 significant bits (unit roundoff u = 2^-8 = 3.9e-3); autocast runs the matmuls in bf16
# with fp32 accumulation, norms and softmax in fp32. Over 12 blocks the features drift from fp32 by
# ~1-3e-2 relative (measured on the CPU at 224 px, batch 1, relative L2 differences: VECA-S/16 loss
# 2.7e-3, features 1.6e-2, gradients 2.2e-2; ViT-S/16 3.8e-3, 2.9e-2, 3.9e-2; batch 2 alike). The
# tolerances leave ~4x room above that and are still 10x below what a real defect gives (a wrong
# kernel, fp16 overflow, a dtype mix-up: O(1) differences).
BF16_TOLERANCES = {"loss_rel": 2e-2, "cls_rel": 0.1, "patches_rel": 0.1, "grad_rel": 0.15}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def bf16_step(name: str, device: torch.device, batch: int, size: int = 224, seed: int = 0) -> dict:
    """fp32 and bf16-autocast training steps of ``name`` from the same weights, inputs and random
    draws: the loss, features and gradients of both, the AdamW update finite."""
    from veca_ssl.models import build_backbone

    torch.manual_seed(seed)
    model = build_backbone(name, patch_size=16).to(device).train()
    g = torch.Generator().manual_seed(seed + 1)
    d = model.embed_dim
    images = torch.randn(batch, 3, size, size, generator=g).to(device)
    head = (torch.randn(d, 16, generator=g) / d ** 0.5).to(device)
    labels = torch.randint(0, 16, (batch,), generator=g).to(device)
    target = torch.randn(batch, (size // 16) ** 2, d, generator=g).to(device)
    out = {}
    for amp in (False, True):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(seed + 2)  # the same coordinate augmentation in both passes
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            feats = model.forward_features(images)
        cls, patches = feats["cls"].float(), feats["patches"].float()
        # a loss every parameter feeds (a squared feature norm after LayerNorm would be nearly constant)
        loss = F.cross_entropy(cls @ head, labels) + (patches - target).square().mean()
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        out[amp] = (loss.detach(), cls.detach(), patches.detach(), grads)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    opt.step()  # the bf16 pass's gradients: the update the training loop would make
    (l32, c32, p32, g32), (l16, c16, p16, g16) = out[False], out[True]
    finite = all(bool(torch.isfinite(t).all()) for t in (l16, c16, p16, g16)) and all(
        bool(torch.isfinite(p).all()) for p in model.parameters())
    return {"finite": finite, "loss_fp32": float(l32), "loss_bf16": float(l16),
            "loss_rel": abs(float(l16) - float(l32)) / max(abs(float(l32)), 1e-30),
            "cls_rel": _rel(c16, c32), "patches_rel": _rel(p16, p32), "grad_rel": _rel(g16, g32)}


def check_bf16_step(ctx: Context) -> Result:
    family = ctx.args.step_family
    batch = ctx.args.step_batch or (8 if ctx.cuda else 1)
    rows, statuses, parts = [], [], []
    for name in (f"veca_{family}", f"vit_{family}"):
        m = bf16_step(name, ctx.device, batch)
        verdict = rules.within({k: m[k] for k in BF16_TOLERANCES}, BF16_TOLERANCES) if m["finite"] else \
            rules.Verdict(FAIL, "non-finite loss, features, gradients or weights in bf16")
        statuses.append(verdict.status)
        rows.append({"network": f"{name}/16", **m, "status": verdict.status, "detail": verdict.detail})
        parts.append(f"{name}: loss {m['loss_fp32']:.4f} fp32 vs {m['loss_bf16']:.4f} bf16, features "
                     f"{max(m['cls_rel'], m['patches_rel']):.1e}, grads {m['grad_rel']:.1e} rel.")
    status = rules.overall(statuses)
    reason = "; ".join(f"{r['network']}: {r['detail']}" for r in rows if r["status"] == FAIL)
    tol = ", ".join(f"{k} <= {v:g}" for k, v in BF16_TOLERANCES.items())
    return Result("bf16-step", status, f"224 px, batch {batch}: " + " ".join(parts) + f" Tolerances: {tol}",
                  reason, {"tolerances": tol}, rows)


# --------------------------------------------------------------------------------------- compile
# Compiled and eager code reorder fp32 reductions and fuse element-wise work: ~1e-7..1e-6 relative
# differences (measured on the CPU: 4.8e-7 absolute on outputs of magnitude 5, 7e-12 on input
# gradients). 1e-4 relative to the largest reference value keeps two orders of magnitude of margin
# and still catches a miscompiled block (differences of order one).
COMPILE_TOLERANCE = 1e-4


def check_compile(ctx: Context) -> Result:
    """One VECA block compiled (inductor, mode default) against eager: forward and backward in fp32."""
    from veca_ssl.models import build_backbone
    from veca_ssl.models.rope import rope_freqs

    family = ctx.args.step_family
    torch.manual_seed(0)
    model = build_backbone(f"veca_{family}", patch_size=16, depth=1).to(ctx.device)
    block, c, n = model.blocks[0], 64, 196
    x = torch.randn(2, c + n, model.embed_dim, device=ctx.device, requires_grad=True)
    rope = rope_freqs(torch.rand(2, c + n, 2, device=ctx.device) * 2 - 1, model.rope_inv_periods)

    def run(fn):
        block.zero_grad(set_to_none=True)
        x.grad = None
        y = fn(x, rope, c)
        y.square().mean().backward()
        grads = [p.grad.clone() for p in block.parameters()]
        return [y.detach(), x.grad.clone(), *grads]

    eager = run(block)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import time

        t0 = time.perf_counter()
        compiled = run(torch.compile(block))
        compile_s = time.perf_counter() - t0
    worst = max(float((a - b).abs().max()) / max(1.0, float(b.abs().max())) for a, b in zip(compiled, eager))
    notes = sorted({str(w.message).split(".")[0] for w in caught if "complex" in str(w.message)})
    nums = {"max_rel_diff": worst, "tolerance": COMPILE_TOLERANCE, "compile_s": round(compile_s, 1),
            "inductor_notes": "; ".join(notes) or None}
    summary = (f"veca_{family} block, fwd+bwd fp32: compiled vs eager max diff {worst:.1e} (relative to the "
               f"largest value; tolerance {COMPILE_TOLERANCE:g}); first call {compile_s:.0f} s"
               + (f"; inductor: {notes[0]}" if notes else ""))
    if not worst <= COMPILE_TOLERANCE:
        return Result("compile", FAIL, summary, f"compiled block differs by {worst:.2e}", nums)
    return Result("compile", PASS, summary, numbers=nums)


# --------------------------------------------------------------------------------------- k-NN
def neighbours_agree(sims_a: torch.Tensor, idx_a: torch.Tensor, sims_b: torch.Tensor, idx_b: torch.Tensor,
                     tol: float = 1e-4) -> tuple[bool, float, int]:
    """Do two exact top-k searches (rows sorted by similarity) agree? The similarity at every rank
    within ``tol``, and each query's neighbour set identical except at the boundary: a neighbour one
    search has and the other lacks must sit within ``tol`` of the other's k-th similarity (a near-tie
    that rounding may order either way). Returns (agree, largest similarity difference, number of
    queries whose neighbour sets differ at the boundary)."""
    sim_diff = float((sims_a - sims_b).abs().max()) if sims_a.numel() else 0.0
    differ = (idx_a.sort(dim=1).values != idx_b.sort(dim=1).values).any(dim=1).nonzero().flatten().tolist()
    sets_ok = True
    for r in differ:
        a = dict(zip(idx_a[r].tolist(), sims_a[r].tolist()))
        b = dict(zip(idx_b[r].tolist(), sims_b[r].tolist()))
        kth_a, kth_b = float(sims_a[r, -1]), float(sims_b[r, -1])
        sets_ok &= all(a[i] <= kth_b + tol for i in a.keys() - b.keys())
        sets_ok &= all(b[i] <= kth_a + tol for i in b.keys() - a.keys())
    return sim_diff <= tol and sets_ok, sim_diff, len(differ)


def check_knn(ctx: Context) -> Result:
    from veca_ssl.knn import knn_classify, knn_search_faiss, knn_search_torch

    kind, bank_n, note = rules.knn_mode(ctx.machine, ctx.args.knn_bank)
    queries_n, dim, classes, k = ctx.args.knn_queries or (10_000 if kind == "gpu" else 1000), 768, 1000, 200
    g = torch.Generator().manual_seed(0)
    bank = F.normalize(torch.randn(bank_n, dim, generator=g), dim=1).to(ctx.device)
    queries = F.normalize(torch.randn(queries_n, dim, generator=g), dim=1).to(ctx.device)
    yb = torch.randint(0, classes, (bank_n,), generator=g)
    yq = torch.randint(0, classes, (queries_n,), generator=g)
    st, it = knn_search_torch(bank, queries, k)
    sf, i_f = knn_search_faiss(bank, queries, k)
    agree, sim_diff, swaps = neighbours_agree(st.cpu(), it.cpu(), sf.cpu(), i_f.cpu())
    acc_t = knn_classify(bank, yb, queries, yq, backend="torch", num_classes=classes, device=ctx.device)
    acc_f = knn_classify(bank, yb, queries, yq, backend="faiss", num_classes=classes, device=ctx.device)
    same_acc = acc_t == acc_f
    nums = {"faiss_index": kind, "bank": bank_n, "dim": dim, "queries": queries_n, "k": k,
            "max_similarity_diff": sim_diff, "queries_with_boundary_ties": swaps, "accuracies_equal": same_acc}
    summary = (f"faiss-{kind} vs torch, {bank_n} x {dim} bank, {queries_n} queries, k = {k}: similarities "
               f"within {sim_diff:.1e}, {swaps} queries with a near-tie at the k-th neighbour, k-NN accuracies "
               f"{'identical' if same_acc else 'DIFFERENT'}" + (f"; {note}" if note else ""))
    if not (agree and same_acc):
        why = "neighbours differ beyond near-ties" if not agree else f"accuracies differ: {acc_t} vs {acc_f}"
        return Result("knn", FAIL, summary, why, nums)
    return Result("knn", PASS, summary, numbers=nums)


__all__ = ["Context", "check_environment", "check_attention", "check_bf16_step", "check_compile", "check_knn",
           "bf16_step", "neighbours_agree", "BF16_TOLERANCES", "COMPILE_TOLERANCE", "SKIP"]
