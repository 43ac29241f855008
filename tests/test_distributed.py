"""veca_ssl.distributed: single-process fallbacks, 2-process gloo collectives, DDP with sliced core banks
(gradients averaged, rows past the width exactly zero, 2×b == 1×2b), FSDP2 on CPU, preemption flags."""

from __future__ import annotations

import copy
import os
import signal

import pytest
import torch
from torch import nn

from veca_ssl import distributed as vd
from veca_ssl import signals
from veca_ssl.bench.ddp_worker import SquaredFeatureLoss  # the DDP bench's stand-in student
from veca_ssl.parallelize import apply_fsdp2, unwrap_model, wrap_ddp
from veca_ssl.spawn import run_two_process

# ---------------------------------------------------------------------------------------- helpers


class SlicedCoreToy(nn.Module):
    """A VECA-like toy: one core-bank parameter sliced to the active width, plus a dense layer."""

    def __init__(self, num_cores: int = 6, dim: int = 4) -> None:
        super().__init__()
        self.cores = nn.Parameter(torch.randn(num_cores, dim, dtype=torch.float64))
        self.proj = nn.Linear(dim, dim, dtype=torch.float64)

    def forward(self, x: torch.Tensor, num_cores: int) -> torch.Tensor:
        attn = torch.softmax(self.proj(x) @ self.cores[:num_cores].T, dim=-1)  # (B, C)
        return attn @ self.cores[:num_cores] + x


def _toy_loss(feats: torch.Tensor, all_feats: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample MSE (local mean) + a term over the global batch (variance of gathered features)."""
    return (feats - target).pow(2).mean() + 0.5 * all_feats.var(dim=0).sum()


def _toy_data(step: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(n, 4, generator=g, dtype=torch.float64), torch.randn(n, 4, generator=g, dtype=torch.float64)


BUDGETS = [2, 4, 6, 2]  # same width on every rank at each step, changes from step to step


def _ddp_vs_single_worker(steps: int, per_rank: int) -> dict:
    """Each rank trains DDP(toy) on its half of the global batch and, in the same process, a plain copy
    on the whole global batch; returns both final weights and the step-0 gradient."""
    info = vd.init_distributed(device="cpu")
    rank, world = info.rank, info.world_size
    torch.manual_seed(0)
    model = SlicedCoreToy()
    reference = copy.deepcopy(model)
    ddp = wrap_ddp(model, info, find_unused_parameters=False)
    opt = torch.optim.AdamW(ddp.parameters(), lr=0.05, weight_decay=0.01)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=0.05, weight_decay=0.01)
    first_grad = None
    for step in range(steps):
        x, y = _toy_data(step, per_rank * world)
        local = slice(rank * per_rank, (rank + 1) * per_rank)
        c = BUDGETS[step % len(BUDGETS)]
        feats = ddp(x[local], c)
        loss = _toy_loss(feats, vd.all_gather_with_grad(feats), y[local])
        opt.zero_grad()
        loss.backward()
        ref_feats = reference(x, c)
        ref_opt.zero_grad()
        _toy_loss(ref_feats, ref_feats, y).backward()
        if step == 0:
            first_grad = {"ddp": model.cores.grad.clone(), "ref": reference.cores.grad.clone(), "width": c}
        opt.step()
        ref_opt.step()
    return {
        "weights": {k: v.clone() for k, v in unwrap_model(ddp).state_dict().items()},
        "reference": {k: v.clone() for k, v in reference.state_dict().items()},
        "first_grad": first_grad,
    }


def _collectives_worker() -> dict:
    rank, world = vd.get_rank(), vd.get_world_size()
    x = torch.tensor([float(rank + 1), 10.0 * (rank + 1)])
    out = {
        "rank": rank,
        "world": world,
        "is_main": vd.is_main_process(),
        "sum": vd.all_reduce_sum(x),
        "mean": vd.all_reduce_mean(x),
        "input_untouched": x.clone(),
        "gather": vd.all_gather_tensor(torch.full((2, 3), float(rank))),
        "gather_uneven": vd.all_gather_tensor(torch.arange(rank + 1, dtype=torch.float32) + 10 * rank, uneven=True),
        "flag_before": signals.checkpoint_requested(),
    }
    vd.barrier()
    if rank == 1:  # the signal reached only one rank: every rank must still stop after the same step
        signals.request_checkpoint()
    out["flag_after"] = signals.checkpoint_requested()
    out["local_flag_after_sync"] = signals.checkpoint_requested(sync=False)
    out["seed"] = vd.seed_everything(7)
    out["draw"] = torch.rand(1).item()
    signals.clear_checkpoint_request()
    return out


class BlockToy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.blocks = nn.ModuleList([nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8), nn.GELU()) for _ in range(2)])
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for blk in self.blocks:
            x = x + blk(x)
        return self.head(x)


def _fsdp_worker(steps: int) -> dict:
    info = vd.init_distributed(device="cpu")
    torch.manual_seed(0)
    model = BlockToy()
    reference = copy.deepcopy(model)
    model = apply_fsdp2(model, info)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    for step in range(steps):
        g = torch.Generator().manual_seed(step)
        x = torch.randn(8, 4, generator=g)
        local = x[info.rank * 4 : (info.rank + 1) * 4]
        opt.zero_grad()
        model(local).pow(2).mean().backward()
        opt.step()
        ref_opt.zero_grad()
        reference(x).pow(2).mean().backward()
        ref_opt.step()
    full = {n: p.full_tensor().clone() for n, p in model.named_parameters()}
    local_rows = model.embed.weight.to_local().shape[0]
    return {"full": full, "ref": dict(reference.named_parameters()), "rows": local_rows}


def _veca_ddp_worker() -> dict:
    from veca_ssl.models import build_backbone

    info = vd.init_distributed(device="cpu")
    torch.manual_seed(0)
    backbone = build_backbone("veca_tiny", patch_size=8, num_cores=16, depth=2, embed_dim=64, num_heads=2)
    backbone.eval()  # no coordinate augmentation: the per-rank reference must see the same coordinates
    ddp = wrap_ddp(SquaredFeatureLoss(backbone), info)
    grads = []
    for step, c in enumerate((8, 16, 8)):  # varying width, no find_unused_parameters
        g = torch.Generator().manual_seed(step)
        images = torch.randn(2 * info.world_size, 3, 32, 32, generator=g)
        masks = torch.rand(2 * info.world_size, 16, generator=g) < 0.3
        local = slice(2 * info.rank, 2 * info.rank + 2)
        ddp.zero_grad()
        ddp(images[local], c, masks[local]).backward()
        grads.append({n: p.grad.clone() for n, p in backbone.named_parameters()})
    # per-rank gradient of the local loss at the last step, for the averaging check
    local_model = copy.deepcopy(backbone)
    local_model.zero_grad()
    SquaredFeatureLoss(local_model)(images[local], 8, masks[local]).backward()
    return {"grads": grads, "local_last": {n: p.grad.clone() for n, p in local_model.named_parameters()}}


def _all_two_rank_checks() -> dict:
    """One spawn for every 2-rank unit check (process start-up dominates their cost); a failing check
    returns its traceback instead of taking the others down."""
    import traceback

    checks = {"collectives": (_collectives_worker, ()), "ddp": (_ddp_vs_single_worker, (4, 3)),
              "fsdp": (_fsdp_worker, (3,)), "veca": (_veca_ddp_worker, ())}
    out = {}
    for name, (fn, args) in checks.items():
        try:
            out[name] = fn(*args)
        except Exception:
            out[name] = traceback.format_exc()
        vd.barrier()
    return out


# ------------------------------------------------------------------------------------------ tests


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SUBMITIT_EXECUTOR"):
        monkeypatch.delenv(var, raising=False)
    vd.cleanup()
    yield monkeypatch
    vd.cleanup()


def test_single_process_fallbacks(clean_env):
    info = vd.init_distributed(device="cpu")
    assert (info.rank, info.world_size, info.local_rank, info.backend) == (0, 1, 0, None)
    assert info.device == torch.device("cpu") and not info.is_distributed
    assert vd.init_distributed() is info  # idempotent
    x = torch.tensor([1.0, 2.0])
    assert vd.all_reduce_mean(x) is x and vd.all_reduce_sum(x) is x and vd.all_gather_tensor(x) is x
    assert vd.all_gather_with_grad(x) is x
    model = nn.Linear(2, 2)
    assert wrap_ddp(model, info) is model and unwrap_model(model) is model
    assert vd.get_rank() == 0 and vd.get_world_size() == 1 and vd.is_main_process()
    vd.barrier()
    with pytest.raises(ValueError, match="model.blocks"):
        apply_fsdp2(model, info)
    if not torch.cuda.is_available():
        vd.cleanup()
        with pytest.raises(ValueError, match="CUDA is not available"):
            vd.init_distributed(device="cuda")


def test_seed_everything_is_per_rank(clean_env):
    assert vd.seed_everything(5, rank=0) == 5 and vd.seed_everything(5, rank=3) == 8
    vd.seed_everything(5, rank=3)
    a = (torch.rand(2), __import__("numpy").random.rand(), __import__("random").random())
    vd.seed_everything(5, rank=3)
    b = (torch.rand(2), __import__("numpy").random.rand(), __import__("random").random())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]


def test_submitit_slurm_environment_sets_rendezvous(clean_env):
    env = {
        "SUBMITIT_EXECUTOR": "slurm",
        "SLURM_JOB_ID": "4242",
        "SLURM_NTASKS": "8",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_JOB_NODELIST": "gpu[017-018]",
        "SLURM_NODEID": "1",
        "SLURM_PROCID": "5",
        "SLURM_LOCALID": "1",
    }
    for k, v in env.items():
        clean_env.setenv(k, v)
    assert vd._rank_env() == (5, 8, 1)
    assert os.environ["MASTER_ADDR"] == "gpu017"  # first host of the allocation
    assert os.environ["MASTER_PORT"] == str(20000 + 4242)  # same on every task, from the job id


def test_preemption_flag_and_chaining(clean_env):
    calls = []
    previous = signal.signal(signal.SIGUSR1, lambda s, f: calls.append(s))
    try:
        assert signals.install_preemption_handler([signal.SIGUSR1]) == (signal.SIGUSR1,)
        signals.install_preemption_handler([signal.SIGUSR1])  # idempotent: keeps the original "previous"
        assert not signals.checkpoint_requested()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert signals.checkpoint_requested() and signals.preemption_signal() == signal.SIGUSR1
        assert calls == []  # first signal: only the flag
        os.kill(os.getpid(), signal.SIGUSR1)
        assert calls == [signal.SIGUSR1]  # second signal: handed to the handler found first
        signals.uninstall_preemption_handler()
        assert not signals.checkpoint_requested()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert calls == [signal.SIGUSR1, signal.SIGUSR1]  # original handler restored
    finally:
        signals.uninstall_preemption_handler()
        signal.signal(signal.SIGUSR1, previous)


@pytest.fixture(scope="module")
def two_ranks() -> list[dict]:
    return run_two_process(_all_two_rank_checks, timeout_s=300)


def _check(two_ranks: list[dict], name: str) -> tuple[dict, dict]:
    for rank, result in enumerate(two_ranks):
        if isinstance(result[name], str):
            pytest.fail(f"rank {rank} failed in {name}:\n{result[name]}")
    return two_ranks[0][name], two_ranks[1][name]


def test_two_process_collectives(two_ranks):
    r0, r1 = _check(two_ranks, "collectives")
    for r in (r0, r1):
        assert r["world"] == 2
        assert torch.equal(r["sum"], torch.tensor([3.0, 30.0]))
        assert torch.equal(r["mean"], torch.tensor([1.5, 15.0]))
        assert torch.equal(r["gather"], torch.cat([torch.zeros(2, 3), torch.ones(2, 3)]))
        assert torch.equal(r["gather_uneven"], torch.tensor([0.0, 10.0, 11.0]))
        assert r["flag_before"] is False and r["flag_after"] is True and r["local_flag_after_sync"] is True
    assert torch.equal(r0["input_untouched"], torch.tensor([1.0, 10.0]))
    assert (r0["rank"], r0["is_main"], r1["rank"], r1["is_main"]) == (0, True, 1, False)
    assert (r0["seed"], r1["seed"]) == (7, 8) and r0["draw"] != r1["draw"]


def test_ddp_sliced_core_bank_matches_single_process_global_batch(two_ranks):
    r0, r1 = _check(two_ranks, "ddp")
    g = r0["first_grad"]
    c = g["width"]
    # gradients: averaged over ranks == gradient of the global-batch loss; rows past the width are 0.0
    assert torch.allclose(g["ddp"], g["ref"], atol=1e-12, rtol=0)
    assert torch.count_nonzero(g["ddp"][c:]) == 0 and torch.count_nonzero(g["ddp"][:c]) > 0
    assert torch.equal(r0["first_grad"]["ddp"], r1["first_grad"]["ddp"])
    for name, w in r0["weights"].items():
        assert torch.equal(w, r1["weights"][name]), f"ranks diverged on {name}"
        assert torch.allclose(w, r0["reference"][name], atol=1e-10, rtol=0), name
    torch.manual_seed(0)
    initial = SlicedCoreToy().state_dict()
    assert not torch.allclose(r0["weights"]["proj.weight"], initial["proj.weight"])  # it did train


def test_fsdp2_on_cpu_gloo_matches_single_process(two_ranks):
    r0, r1 = _check(two_ranks, "fsdp")
    assert r0["rows"] == 4 and r1["rows"] == 4  # embed.weight (8, 4) split over 2 ranks on dim 0
    for name, ref in r0["ref"].items():
        assert torch.allclose(r0["full"][name], ref, atol=1e-6), name
        assert torch.equal(r0["full"][name], r1["full"][name]), name


def test_veca_backbone_ddp_zero_rows_and_averaging(two_ranks):
    r0, r1 = _check(two_ranks, "veca")
    for step, c in enumerate((8, 16, 8)):
        g0, g1 = r0["grads"][step], r1["grads"][step]
        for name in g0:
            assert torch.equal(g0[name], g1[name]), f"step {step}: {name} not synchronised"
        assert torch.count_nonzero(g0["cores"][c:]) == 0 and torch.count_nonzero(g0["cores"][:c]) > 0
        assert torch.count_nonzero(g0["core_coords"][c:]) == 0
    averaged = {n: (r0["local_last"][n] + r1["local_last"][n]) / 2 for n in r0["local_last"]}
    for name, g in r0["grads"][-1].items():
        assert torch.allclose(g, averaged[name], atol=1e-6, rtol=1e-4), name


# ----------------------------------------------------------------------------------------------------
# The real training loop (veca_ssl.train, lead): 2 gloo processes with batch b == 1 process with 2b.
# Per-rank randomness is switched off here: KoLeo (nearest neighbours within the rank's batch), the
# DINO head's BatchNorm (per-rank batch statistics on CPU/gloo; SyncBatchNorm on CUDA),
# VECA's training-time RoPE coordinate augmentation (drawn from the global RNG per batch) and iBOT
# masking (DINOv2's collate masks exactly half of each rank's global crops with ratios stratified
# over that rank's batch, so the masks depend on how the global batch is split). Centring
# all-reduces its statistics; crops are seeded per sample, the width per step.
# ----------------------------------------------------------------------------------------------------
TINY_TRAIN = ["--config", "quickstart", "train.max_steps=3", "data.num_workers=0", "train.checkpoint_every=1",
              "train.keep_last=3", "train.progress=false", "train.knn_monitor.enabled=false", "device=cpu",
              "deterministic=true", "optim.warmup_epochs=0", "optim.base_lr=0.1", "crops.num_local=2",
              "model.overrides={depth: 2, embed_dim: 64, num_heads: 2, coord_shift: 0.0, coord_rescale: [1.0, 1.0]}",
              "dino.head_out_dim=64", "dino.head_hidden_dim=64", "dino.head_bottleneck_dim=32",
              "ibot.head_out_dim=64", "dino.koleo_weight=0.0", "dino.head_use_bn=false", "ibot.mask_probability=0.0",
              "optim.lr_scaling=linear"]  # pinned: peak lr 0.1 x 8/1024, independent of the quickstart demo


def _train_worker(output_dir: str, batch_per_rank: int) -> dict:
    from veca_ssl.config import load_config
    from veca_ssl.train.checkpoint import CheckpointManager
    from veca_ssl.train.loop import train
    from veca_ssl.train.main import build_parser

    args = build_parser().parse_args(TINY_TRAIN + [f"optim.batch_size_per_gpu={batch_per_rank}",
                                                   f"output_dir={output_dir}"])
    train(load_config(args.config, args.overrides))
    vd.barrier()
    ckpts = CheckpointManager(f"{output_dir}/checkpoints")
    first, last = (CheckpointManager.load(ckpts.path(step)) for step in (1, 3))
    return {"student": last["student"], "teacher": last["teacher"], "step": int(last["step"]),
            "student_step1": first["student"]}


def test_training_two_processes_match_one_process_with_double_batch(tmp_path):
    (single,) = run_two_process(_train_worker, str(tmp_path / "one"), 8, world_size=1, timeout_s=300)
    r0, r1 = run_two_process(_train_worker, str(tmp_path / "two"), 4, timeout_s=300)
    assert single["step"] == r0["step"] == 3
    assert r0["student"].keys() == single["student"].keys()
    tol = 1e-5
    moved = max((single["student"][k] - single["student_step1"][k]).abs().max().item() for k in single["student"])
    assert moved > 100 * tol, f"steps 2-3 barely changed the weights ({moved:.2e}): the comparison would be vacuous"
    for part in ("student", "teacher"):
        for name, ref in single[part].items():
            diff = (r0[part][name] - ref).abs().max().item()
            assert diff <= tol, f"{part}.{name}: 2 processes x 4 differ from 1 x 8 by {diff:.2e}"
