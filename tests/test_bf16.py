"""``train.amp=bf16`` runs on the CPU the precision path a GPU run takes: bf16 autocast for the student
and teacher forwards (and the frozen teacher of a distillation), fp32 master weights, optimiser state
and EMA, an fp32 export; FSDP2 gathers bf16 parameters and reduces fp32 gradients.

Tolerance, measured here (torch 2.13 CPU, tests/test_train.TINY, 30 steps, the same run in fp32 and
in bf16 autocast): |loss_bf16 - loss_fp32| at steps 10 / 20 / 30 was
    VECA SSL 6.3e-4 / 6.0e-3 / 2.7e-4,  ViT SSL 7.0e-4 / 1.2e-3 / 1.0e-3,
    VECA distillation from a (random tiny) ViT 2.2e-4 / 1.3e-4 / 2.1e-5,
and at most 0.020 / 0.0085 / 5.1e-4 over all 30 steps. The assertions allow 0.05 for the self-supervised
losses (~6.0 here: 0.8 %) and 0.005 for the distillation loss (~0.07): a few times what bf16 rounding
did, far below what a wrong precision path does (a bf16 softmax at teacher temperature 0.04, bf16
master weights or a bf16 EMA move these losses by tenths). The bf16 run must also differ from the
fp32 one (else autocast did not run) and its activations must be bf16.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from test_train import TINY

from veca_ssl.config import load_config
from veca_ssl.method.base import bf16_autocast
from veca_ssl.models import build_backbone, save_backbone
from veca_ssl.parallelize import resolve_plan
from veca_ssl.spawn import run_two_process
from veca_ssl.train import loop
from veca_ssl.train.checkpoint import CheckpointManager

STEPS = 30
VIT = ["model.name=vit_tiny", "model.overrides={embed_dim: 32, depth: 2, num_heads: 2}"]
TOLERANCE = {"veca": 0.05, "vit": 0.05, "distill": 0.005}


@pytest.fixture(scope="module")
def frozen_teacher(tmp_path_factory) -> str:
    torch.manual_seed(0)
    teacher = build_backbone("vit_tiny", patch_size=8, embed_dim=32, depth=2, num_heads=2)
    return str(save_backbone(teacher, tmp_path_factory.mktemp("frozen") / "teacher.safetensors"))


def _overrides(kind: str, teacher: str, out: Path, amp: str) -> list[str]:
    extra = {"veca": [], "vit": VIT, "distill": ["mode=distill", "crops.num_local=0", f"distill.teacher={teacher}"]}
    return [*TINY, *extra[kind], f"output_dir={out}", "optim.epochs=4", f"train.max_steps={STEPS}",
            "train.log_every=10", "train.checkpoint_every=1000", f"train.amp={amp}"]


@pytest.fixture(scope="module", params=["veca", "vit", "distill"])
def runs(request, tmp_path_factory, frozen_teacher) -> tuple[str, dict]:
    kind, base = request.param, tmp_path_factory.mktemp(f"amp-{request.param}")
    out = {}
    for amp in ("auto", "bf16"):  # auto: fp32 on a CPU
        summary = loop.train(load_config(None, _overrides(kind, frozen_teacher, base / amp, amp)))
        records = [json.loads(line) for line in (base / amp / "metrics.jsonl").read_text().splitlines()]
        out[amp] = {"dir": base / amp, "summary": summary,
                    "losses": {r["step"]: r["loss"] for r in records if "loss" in r}}
    return kind, out


def test_bf16_losses_stay_within_the_measured_tolerance_of_fp32(runs):
    kind, out = runs
    fp32, bf16 = out["auto"]["losses"], out["bf16"]["losses"]
    assert sorted(bf16) == sorted(fp32) == [10, 20, 30]
    assert all(math.isfinite(v) for v in bf16.values())  # (a non-finite loss would also have stopped the run)
    diffs = {step: abs(bf16[step] - fp32[step]) for step in fp32}
    print(kind, "bf16 - fp32 loss:", {s: f"{d:.2e}" for s, d in diffs.items()})
    assert max(diffs.values()) <= TOLERANCE[kind], (kind, fp32, bf16)
    assert max(diffs.values()) > 0, "bf16 gave the fp32 losses bit for bit: autocast did not run"


def test_bf16_keeps_master_weights_ema_optimiser_and_export_fp32(runs):
    kind, out = runs
    run_dir = out["bf16"]["dir"]
    state = CheckpointManager.load(CheckpointManager(run_dir / "checkpoints").latest())
    for part in ("student", "teacher"):
        dtypes = {v.dtype for v in state[part].values() if v.is_floating_point()}
        assert dtypes == {torch.float32}, (part, dtypes)
    moments = {v.dtype for s in state["optimizer"]["state"].values() for k, v in s.items() if k != "step"}
    assert moments == {torch.float32}, moments
    from safetensors.torch import load_file

    export = load_file(str(run_dir / "export" / "teacher.safetensors"))
    assert {v.dtype for v in export.values() if v.is_floating_point()} == {torch.float32}


@pytest.mark.parametrize("kind", ["veca", "distill"])
def test_bf16_autocast_reaches_student_teacher_and_frozen_teacher(tmp_path, frozen_teacher, kind):
    """The forwards of one step really run in bf16 on the CPU (what makes the comparison above mean something)."""
    run = loop.setup(load_config(None, _overrides(kind, frozen_teacher, tmp_path / "run", "bf16")))
    seen: dict[str, set] = {}
    if kind == "distill":  # the EMA copy of the student runs no forward while training: nothing to check
        networks = {"student": run.method.student, "frozen teacher": run.method.frozen_teacher}
    else:
        networks = {"student": run.method.student, "teacher": run.method.teacher}
    for name, net in networks.items():
        for module in net.modules():
            if isinstance(module, torch.nn.Linear):
                module.register_forward_hook(lambda m, i, o, name=name: seen.setdefault(name, set()).add(o.dtype))
    try:
        loop.train_step(run, 0)
    finally:
        run.lock.release()
    assert seen == {name: {torch.bfloat16} for name in networks}, seen
    assert {p.dtype for p in run.method.student.parameters()} == {torch.float32}


def test_amp_auto_is_bf16_on_cuda_and_fp32_on_cpu():
    assert bf16_autocast("auto", torch.device("cuda", 0)) and not bf16_autocast("auto", torch.device("cpu"))
    assert bf16_autocast("bf16", torch.device("cpu")) and bf16_autocast("bf16", torch.device("cuda", 0))
    assert not bf16_autocast("off", torch.device("cuda", 0))
    cfg = load_config(None, [*TINY, "train.amp=off"])  # the documented spelling (YAML alone would read false)
    assert cfg.train.amp == "off" and not bf16_autocast(cfg.train.amp, torch.device("cuda", 0))


# ------------------------------------------------------------------------------- FSDP2, 2 gloo ranks
def _fsdp2_bf16_worker(output_dir: str) -> dict:
    from torch.distributed.tensor import DTensor

    from veca_ssl import distributed as vd

    cfg = load_config(None, [*TINY, f"output_dir={output_dir}", "train.parallel=fsdp2", "train.amp=bf16",
                             "optim.batch_size_per_gpu=4", "train.max_steps=4", "train.checkpoint_every=1000",
                             "ibot.mask_probability=0.0"])
    plan = resolve_plan(cfg, vd._INFO)
    run = loop.setup(cfg)
    gathered: set = set()
    block = run.method.student.backbone.blocks[0]
    block.register_forward_pre_hook(lambda m, args: gathered.add(m.attn.qkv.weight.dtype))
    losses = []
    try:
        for step in range(4):
            _, record = loop.train_step(run, step)
            losses.append(record["loss"])
        loop.finish(run, 4)
    finally:
        if run.lock is not None:
            run.lock.release()
    masters = {(type(p).__name__, p.dtype) for net in (run.method.student, run.method.teacher)
               for p in net.parameters()}
    moments = {v.dtype for s in run.optimizer.state.values() for k, v in s.items() if k != "step"}
    policies = {(net, m._get_fsdp_state()._mp_policy.param_dtype, m._get_fsdp_state()._mp_policy.reduce_dtype)
                for net, root in (("student", run.method.student), ("teacher", run.method.teacher))
                for m in root.modules() if hasattr(m, "_get_fsdp_state")}
    return {"plan": (plan.mode, plan.param_dtype), "losses": losses, "masters": masters, "gathered": gathered,
            "policies": policies,
            "moments": moments, "sharded": all(isinstance(p, DTensor) for p in run.method.student.parameters())}


def test_fsdp2_bf16_on_two_gloo_ranks_gathers_bf16_and_keeps_fp32_masters(tmp_path):
    r0, r1 = run_two_process(_fsdp2_bf16_worker, str(tmp_path / "run"), timeout_s=300)
    for r in (r0, r1):
        assert r["plan"] == ("fsdp2", torch.bfloat16)
        assert r["policies"] == {(net, torch.bfloat16, torch.float32) for net in ("student", "teacher")}
        assert r["sharded"] and r["gathered"] == {torch.bfloat16}, r["gathered"]  # the forward saw bf16 weights
        assert r["masters"] == {("DTensor", torch.float32)}, r["masters"]  # sharded master weights and EMA: fp32
        assert r["moments"] == {torch.float32}
        assert len(r["losses"]) == 4 and all(math.isfinite(v) for v in r["losses"])
    assert r0["losses"] == r1["losses"]  # logged values: averaged over the ranks, the same on both
