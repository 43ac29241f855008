"""Parallel forms from the config (veca_ssl.parallelize) and sharded checkpoints
(veca_ssl.train.sharded_checkpoint), with the real training loop on 2 gloo processes.

Tolerance of the parity tests: 2 processes x 4 images vs 1 process x 8 images differ only in float
summation order -- per-rank batch means averaged over ranks vs one mean, the gradient-norm sum over
shards vs over whole tensors -- i.e. a few ulp (~1e-7 relative) per reduction. Three AdamW steps
(lr ~1e-3, updates normalised by the second moment) carry such differences into the weights at
~1e-7..1e-6; 1e-5 absolute leaves an order of magnitude of margin and still fails for any real
mistake (a missing gradient average, a wrong shard, a teacher that skipped an EMA step), each of
which moves weights by ~lr = 1e-3. Every comparison also checks that training moved the weights by
far more than the tolerance, so it cannot pass vacuously. FSDP2 vs DDP on the same 2 processes uses
the same tolerance: all-reduce vs reduce-scatter order, and clipping norms summed over shards.
"""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from veca_ssl import distributed as vd
from veca_ssl.spawn import run_two_process

ROOT = Path(__file__).resolve().parent.parent
TOL = 1e-5
STEPS = 4

COMMON = [
    "model.patch_size=8", "data.train=synthetic:n=64,size=32,classes=4,seed=0", "data.num_workers=0",
    "crops.global_size=32", "crops.local_size=16", "crops.num_local=2",
    "dino.head_out_dim=64", "dino.head_hidden_dim=64", "dino.head_bottleneck_dim=32", "ibot.head_out_dim=64",
    "optim.warmup_epochs=0", "optim.base_lr=0.1", "optim.lr_scaling=linear", "optim.freeze_last_layer_epochs=0",
    "dino.koleo_weight=0.0",  # nearest neighbours within each rank's batch: not comparable across world sizes
    # iBOT masks are drawn per rank's batch (DINOv2's collate: half of its global crops, stratified
    # ratios), so they depend on how the global batch is split
    "ibot.mask_probability=0.0",
    "train.progress=false", "train.log_every=1", "train.checkpoint_every=2", "train.keep_last=3",
    f"train.max_steps={STEPS}", "device=cpu", "deterministic=true",
]
# no per-rank randomness: VECA's coordinate augmentation draws from each rank's RNG
VECA = ["model.name=veca_tiny", "model.num_cores=16",
        "model.overrides={embed_dim: 32, depth: 2, num_heads: 2, coord_shift: 0.0, coord_rescale: [1.0, 1.0]}"]
VIT = ["model.name=vit_tiny", "model.overrides={embed_dim: 32, depth: 2, num_heads: 2}"]
MODELS = {"veca": VECA, "vit": VIT}
# VECA with its coordinate augmentation (a shift and a rescale drawn from each rank's generator) and drop-path
PER_RANK_RANDOMNESS = ["model.overrides={embed_dim: 32, depth: 2, num_heads: 2}", "model.drop_path_rate=0.2"]
AC_AND_MONITOR = ["model.grad_checkpointing=true", "train.knn_monitor.enabled=true", "train.knn_monitor.every=2",
                  "train.knn_monitor.dataset=synthetic:n=32,val_n=16,size=32,classes=4,seed=1",
                  "train.knn_monitor.resolution=32", "train.knn_monitor.k=5"]


def _overrides(kind: str, model: str, teacher: str | None, output_dir: Path, parallel: str, batch: int,
               *extra: str) -> list[str]:
    mode = ["mode=distill", f"distill.teacher={teacher}", "crops.num_local=0"] if kind == "distill" else []
    return COMMON + MODELS[model] + mode + [f"output_dir={output_dir}", f"train.parallel={parallel}",
                                            f"optim.batch_size_per_gpu={batch}", *extra]


def _train(overrides: list[str]) -> dict:
    from veca_ssl.config import load_config
    from veca_ssl.train.loop import train

    return train(load_config(None, overrides))


def final_weights(output_dir: Path, step: int | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """Student and teacher of the newest (or the ``step``) checkpoint of either format, whole."""
    from veca_ssl.train import sharded_checkpoint as sc
    from veca_ssl.train.checkpoint import CheckpointManager

    directory = output_dir / "checkpoints"
    found = sorted((p for p in directory.iterdir() if sc.step_of(p) is not None), key=sc.step_of)
    path = found[-1] if step is None else next(p for p in found if sc.step_of(p) == step)
    if path.is_dir():
        return {part: sc.read_tensors(path, f"{part}.") for part in ("student", "teacher")}
    state = CheckpointManager.load(path)
    return {"student": state["student"], "teacher": state["teacher"]}


def assert_close(a: dict, b: dict, tol: float, what: str) -> None:
    for part in ("student", "teacher"):
        assert a[part].keys() == b[part].keys(), f"{what}: {part} names differ"
        for name, ref in b[part].items():
            diff = (a[part][name] - ref).abs().max().item()
            assert diff <= tol, f"{what}: {part}.{name} differs by {diff:.2e} (tolerance {tol:.0e})"


def assert_moved(after: dict, before: dict, what: str) -> None:
    moved = max((after["student"][k] - before["student"][k]).abs().max().item() for k in after["student"])
    assert moved > 100 * TOL, f"{what}: training barely moved the weights ({moved:.2e}); the test would be vacuous"


# ------------------------------------------------------------------------------------ 2-process side
def _two_process_worker(base: str, kinds: list[str], teacher: str | None) -> dict:
    """Every 2-process run of one fixture, in one spawn (process start-up dominates the cost)."""
    from torch.distributed.tensor import DTensor

    from veca_ssl.config import ConfigError, load_config
    from veca_ssl.train import sharded_checkpoint as sc
    from veca_ssl.train.loop import setup

    base_dir, out = Path(base), {}
    rank = vd.get_rank()
    for kind in kinds:
        for model in MODELS:
            for parallel in ("ddp", "fsdp2"):
                t0 = time.perf_counter()
                _train(_overrides(kind, model, teacher, base_dir / f"{kind}-{model}-{parallel}", parallel, 4))
                out[f"time {kind}-{model}-{parallel}"] = time.perf_counter() - t0
    if "ssl" in kinds:
        # activation checkpointing under FSDP2, with the k-NN monitor (whole EMA weights gathered to rank 0)
        _train(_overrides("ssl", "veca", None, base_dir / "ssl-veca-fsdp2-ac", "fsdp2", 4, *AC_AND_MONITOR))
        # the sharded checkpoint of step 2, resumed on the same 2 processes
        # and a DDP (single-file) checkpoint of step 2 continued with FSDP2
        for src, dst in (("ssl-veca-fsdp2", "resume-on-2"), ("ssl-veca-ddp", "ddp-then-fsdp2")):
            if rank == 0:
                _copy_until(base_dir / src, base_dir / dst, 2)
            vd.barrier()
            _train(_overrides("ssl", "veca", None, base_dir / dst, "fsdp2", 4))
        # per-rank randomness on (VECA's coordinate augmentation, drop-path): DDP stopped after step 2 and
        # resumed on the same 2 processes must be bit-identical, so every rank must get its own stream back
        for name in ("ddp-random", "ddp-random-resumed"):
            if name.endswith("resumed") and rank == 0:
                _copy_until(base_dir / "ddp-random", base_dir / name, 2)
            vd.barrier()
            _train(_overrides("ssl", "veca", None, base_dir / name, "ddp", 4, *PER_RANK_RANDOMNESS))
        # what FSDP2 holds per rank: DTensor shards of half of each parameter's rows
        run = setup(load_config(None, _overrides("ssl", "veca", None, base_dir / "inspect", "fsdp2", 4)))
        cores, t_cores = run.method.student.backbone.cores, run.method.teacher.backbone.cores
        out["dtensor"] = (isinstance(cores, DTensor), isinstance(t_cores, DTensor), tuple(cores.to_local().shape),
                          tuple(cores.shape))
        # each rank's RNG restored from its own entry
        stored = sc.read_tensors(base_dir / "ssl-veca-fsdp2" / "checkpoints" / "checkpoint-00000004", "rng.")
        run2 = setup(load_config(None, _overrides("ssl", "veca", None, base_dir / "ssl-veca-fsdp2", "fsdp2", 4)))
        out["rng_restored"] = torch.equal(torch.get_rng_state(), stored[f"rank{rank}.torch"])
        out["rng_differs_between_ranks"] = not torch.equal(stored["rank0.torch"], stored["rank1.torch"])
        out["resumed_step"] = run2.start_step
        run.logger.close()
        run2.logger.close()
        try:
            _train(_overrides("ssl", "veca", None, base_dir / "none", "none", 4))
            out["parallel_none"] = "no error"
        except ConfigError as exc:
            out["parallel_none"] = str(exc)
    return out


def _copy_until(src: Path, dst: Path, step: int) -> None:
    """A copy of run ``src`` as it was right after ``step``: later checkpoints and the export removed."""
    from veca_ssl.train import sharded_checkpoint as sc

    shutil.copytree(src, dst)
    for p in (dst / "checkpoints").iterdir():
        if (sc.step_of(p) or 0) > step:
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink()
    shutil.rmtree(dst / "export", ignore_errors=True)
    metrics = dst / "metrics.jsonl"
    lines = [line for line in metrics.read_text().splitlines() if json.loads(line)["step"] <= step]
    metrics.write_text("".join(line + "\n" for line in lines))


@pytest.fixture(scope="module")
def frozen_teacher(tmp_path_factory) -> str:
    """A randomly initialised tiny dense ViT, exported: the distillation targets."""
    from veca_ssl.models import build_backbone, save_backbone

    torch.manual_seed(3)
    teacher = build_backbone("vit_tiny", patch_size=8, embed_dim=32, depth=2, num_heads=2)
    return str(save_backbone(teacher, tmp_path_factory.mktemp("frozen") / "teacher.safetensors"))


def _run_fixture(tmp: Path, kinds: list[str], teacher: str | None) -> dict:
    t0 = time.perf_counter()
    r0, _ = run_two_process(_two_process_worker, str(tmp), kinds, teacher, timeout_s=600)
    r0["time two-process"] = time.perf_counter() - t0
    for kind in kinds:
        for model in MODELS:
            _train(_overrides(kind, model, teacher, tmp / f"{kind}-{model}-single", "ddp", 8))
    r0["time total"] = time.perf_counter() - t0
    return r0


@pytest.fixture(scope="module")
def ssl_runs(tmp_path_factory) -> tuple[Path, dict]:
    tmp = tmp_path_factory.mktemp("ssl")
    return tmp, _run_fixture(tmp, ["ssl"], None)


@pytest.fixture(scope="module")
def distill_runs(tmp_path_factory, frozen_teacher) -> tuple[Path, dict]:
    tmp = tmp_path_factory.mktemp("distill")
    return tmp, _run_fixture(tmp, ["distill"], frozen_teacher)


# ------------------------------------------------------------------------------------------- tests
def _check_parity(tmp: Path, kind: str) -> None:
    for model in MODELS:
        single = final_weights(tmp / f"{kind}-{model}-single")
        ddp = final_weights(tmp / f"{kind}-{model}-ddp")
        fsdp = final_weights(tmp / f"{kind}-{model}-fsdp2")
        assert_moved(single, final_weights(tmp / f"{kind}-{model}-single", step=2), f"{kind}/{model}")
        assert_close(ddp, single, TOL, f"{kind}/{model}: DDP 2x4 vs 1 process x8")
        assert_close(fsdp, single, TOL, f"{kind}/{model}: FSDP2 2x4 vs 1 process x8")
        assert_close(fsdp, ddp, TOL, f"{kind}/{model}: FSDP2 vs DDP")


def test_ssl_fsdp2_matches_ddp_and_one_process(ssl_runs):
    tmp, r0 = ssl_runs
    _check_parity(tmp, "ssl")
    for model in MODELS:  # FSDP2 wrote sharded checkpoints, DDP single files
        assert (tmp / f"ssl-{model}-fsdp2" / "checkpoints" / "checkpoint-00000004" / ".metadata").is_file()
        assert (tmp / f"ssl-{model}-ddp" / "checkpoints" / "checkpoint-00000004.pt").is_file()
    is_dt, t_is_dt, local, full = r0["dtensor"]
    assert is_dt and t_is_dt, "student and EMA teacher must both be sharded"
    assert local == (8, 32) and full == (16, 32), (local, full)  # the (16, 32) core bank, 8 rows per rank
    assert r0["parallel_none"].startswith("train.parallel=none in a 2-process job")


def test_fsdp2_with_activation_checkpointing_and_knn_monitor(ssl_runs):
    """Recomputed blocks give the same weights; the monitor and the final table see whole EMA weights."""
    tmp, _ = ssl_runs
    run = tmp / "ssl-veca-fsdp2-ac"
    assert_close(final_weights(run), final_weights(tmp / "ssl-veca-single"), TOL, "FSDP2 + activation checkpointing")
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    monitored = [m for m in metrics if "knn_C8_top1" in m]
    assert [m["step"] for m in monitored] == [2] and 0.0 <= monitored[0]["knn_C16_top1"] <= 100.0
    before = json.loads((run / "knn_before.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    assert set(before) == set(summary["knn"]["after"]) == {"knn_C8_top1", "knn_C16_top1"}


def test_distillation_fsdp2_matches_ddp_and_one_process(distill_runs):
    tmp, _ = distill_runs
    _check_parity(tmp, "distill")


def test_sharded_checkpoint_resumes_on_one_and_two_processes(ssl_runs):
    tmp, r0 = ssl_runs
    uninterrupted = final_weights(tmp / "ssl-veca-fsdp2")
    # 2 -> 2: the same processes, the same arithmetic: bit-identical
    resumed_2 = final_weights(tmp / "resume-on-2")
    assert_close(resumed_2, uninterrupted, 0.0, "sharded step 2 resumed on 2 processes")
    # 2 -> 1: the whole tensors reassembled from the shards, trained on with the whole batch
    dst = tmp / "resume-on-1"
    _copy_until(tmp / "ssl-veca-fsdp2", dst, 2)
    _train(_overrides("ssl", "veca", None, dst, "ddp", 8))
    metrics = [json.loads(line) for line in (dst / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4], "the 1-process run must continue at step 3"
    assert (dst / "checkpoints" / "checkpoint-00000004.pt").is_file()  # one process: single files again
    assert_close(final_weights(dst), uninterrupted, TOL, "sharded step 2 resumed on 1 process")
    assert_moved(uninterrupted, final_weights(tmp / "ssl-veca-fsdp2", step=2), "resume")
    assert r0["resumed_step"] == STEPS
    assert r0["rng_restored"] and r0["rng_differs_between_ranks"], "each rank resumes its own RNG stream"


def test_ddp_resume_with_per_rank_randomness_is_bit_identical(ssl_runs):
    """Each rank draws its own coordinate augmentation and drop-path masks; a checkpoint that kept only
    rank 0's generator would hand rank 1 rank 0's stream after a resume and the weights would drift."""
    tmp, _ = ssl_runs
    uninterrupted = final_weights(tmp / "ddp-random")
    assert_moved(uninterrupted, final_weights(tmp / "ddp-random", step=2), "per-rank randomness")
    assert_close(final_weights(tmp / "ddp-random-resumed"), uninterrupted, 0.0, "DDP step 2 resumed on 2 processes")
    state = torch.load(tmp / "ddp-random" / "checkpoints" / "checkpoint-00000004.pt", weights_only=True)
    streams = state["rng_ranks"]
    assert len(streams) == 2 and not torch.equal(streams[0]["torch"], streams[1]["torch"])


def test_single_file_checkpoint_resumes_sharded(ssl_runs):
    """A DDP (single-file) checkpoint continued with FSDP2 on 2 processes: whole tensors sharded on load."""
    tmp, _ = ssl_runs
    dst = tmp / "ddp-then-fsdp2"
    assert (dst / "checkpoints" / "checkpoint-00000002.pt").is_file()
    assert (dst / "checkpoints" / "checkpoint-00000004").is_dir()
    assert_close(final_weights(dst), final_weights(tmp / "ssl-veca-ddp"), TOL, "DDP step 2 continued with FSDP2")


def test_sharded_checkpoint_loads_as_backbone_and_converts(ssl_runs, tmp_path, capsys):
    from veca_ssl.models import load_backbone
    from veca_ssl.train import sharded_checkpoint as sc

    tmp, _ = ssl_runs
    run_dir = tmp / "ssl-veca-fsdp2"
    ckpt = run_dir / "checkpoints" / "checkpoint-00000004"
    meta = sc.read_meta(ckpt)
    assert meta["step"] == STEPS and meta["world_size"] == 2 and set(meta["files"]) == {"__0_0.distcp", "__1_0.distcp"}
    assert not list((run_dir / "checkpoints").glob(".tmp-*")), "no temporary directory may outlive a save"
    export = load_backbone(run_dir / "export" / "teacher.safetensors")  # written by rank 0 at the end
    teacher = final_weights(run_dir)["teacher"]
    for source in (ckpt, run_dir / "checkpoints"):
        model = load_backbone(source)
        for name, value in model.state_dict().items():
            assert torch.equal(value, export.state_dict()[name]), (source, name)
            assert torch.equal(value, teacher[f"backbone.{name}"]), (source, name)
    student = load_backbone(ckpt, which="student")
    assert not torch.equal(student.cores, model.cores)  # EMA momentum < 1: teacher != student
    # the command line, in a subprocess: veca consolidate
    out = tmp_path / "exported" / "teacher.safetensors"
    proc = subprocess.run([sys.executable, "-m", "veca_ssl.cli", "consolidate", str(run_dir), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "step 4, written by 2 processes" in proc.stdout
    converted = load_backbone(out)
    assert converted.config == export.config
    # the export moved out of its run is still evaluated at the run's training resolution
    from omegaconf import OmegaConf

    from veca_ssl.models.provenance import training_resolution

    side = OmegaConf.load(run_dir / "config.yaml").crops.global_size
    assert json.loads(out.with_suffix(".json").read_text())["resolution"] == side
    assert training_resolution(ckpt) == (side, str(run_dir / "config.yaml"))  # the sharded directory
    for name, value in converted.state_dict().items():
        assert torch.equal(value, export.state_dict()[name]), name

    # veca export reads the sharded checkpoint through load_backbone (here at width 8, 32 px)
    from veca_ssl import export as export_cli

    assert export_cli.main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "w8.safetensors"), "--width", "8",
                            "--resolution", "32"]) == 0
    narrow = load_backbone(tmp_path / "w8.safetensors")
    assert narrow.budgets == (8,) and torch.equal(narrow.cores, export.cores[:8])
    from veca_ssl.consolidate import main as consolidate_main

    assert consolidate_main([str(tmp_path)]) == 2  # nothing to convert: one message, no traceback
    err = capsys.readouterr().err
    assert "no sharded checkpoint at" in err and "Traceback" not in err


def test_damaged_sharded_checkpoints_are_named_and_skipped(ssl_runs, tmp_path):
    from veca_ssl.train import sharded_checkpoint as sc

    tmp, _ = ssl_runs
    directory = tmp_path / "checkpoints"
    shutil.copytree(tmp / "ssl-veca-fsdp2" / "checkpoints", directory)
    newest, older = directory / "checkpoint-00000004", directory / "checkpoint-00000002"
    assert sc.newest_good(directory) == (newest, [])
    shard = newest / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside a tensor record
    shard.write_bytes(bytes(data))
    assert "does not match its SHA-256" in sc.verify(newest)
    good, rejected = sc.newest_good(directory)
    assert good == older and [p for p, _ in rejected] == [newest] and "SHA-256" in rejected[0][1]
    (older / "__0_0.distcp").write_bytes(b"")
    assert "truncated" in sc.verify(older)
    (older / ".metadata").unlink()
    assert "no .metadata index" in sc.verify(older) and sc.newest_good(directory)[0] is None


def test_run_resumes_from_the_newest_good_sharded_checkpoint(ssl_runs, tmp_path):
    """A flipped byte in the newest sharded checkpoint: the run names it, sets it aside and resumes from
    the one before (here on 1 process, so the rerun also crosses world sizes)."""
    tmp, _ = ssl_runs
    dst = tmp_path / "run"
    _copy_until(tmp / "ssl-veca-fsdp2", dst, 4)
    shard = dst / "checkpoints" / "checkpoint-00000004" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0xFF
    shard.write_bytes(bytes(data))
    _train(_overrides("ssl", "veca", None, dst, "ddp", 8))
    assert (dst / "checkpoints" / "checkpoint-00000004.rejected").is_dir()
    assert (dst / "checkpoints" / "checkpoint-00000004.pt").is_file()  # steps 3-4 trained again
    assert_close(final_weights(dst), final_weights(tmp / "ssl-veca-fsdp2"), TOL, "resumed from step 2")


def test_nan_resume_point_covers_sharded_checkpoints(ssl_runs, tmp_path):
    """A non-finite loss in step 4 of an FSDP2 run: the checkpoint of step 4 (written from the weights
    that diverged) is set aside as .diverged and the message's resume point is the sharded step 2."""
    from veca_ssl.train.checkpoint import CheckpointManager
    from veca_ssl.train.rundir import resume_point_after_divergence

    tmp, _ = ssl_runs
    directory = tmp_path / "checkpoints"
    shutil.copytree(tmp / "ssl-veca-fsdp2" / "checkpoints", directory)
    good, moved = resume_point_after_divergence(CheckpointManager(directory), 3, tmp_path / "metrics.jsonl")
    assert good == directory / "checkpoint-00000002"
    assert [(old.name, new.name) for old, new, _ in moved] == [("checkpoint-00000004", "checkpoint-00000004.diverged")]
    # step 3 already diverged according to the metrics: step 2 is not a resume point either
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 3, "loss": float("nan")}) + "\n")
    good, moved = resume_point_after_divergence(CheckpointManager(directory), 3, tmp_path / "metrics.jsonl")
    assert good is None and "already diverged" in moved[0][2]


class _Boom:
    def __reduce__(self):
        return (print, ("executed",))


def test_sharded_index_is_read_without_unpickling_code(ssl_runs, tmp_path):
    """DCP's .metadata is a pickle: only checkpoint-index classes may be named in it."""
    from veca_ssl.train import sharded_checkpoint as sc

    tmp, _ = ssl_runs
    ckpt = tmp_path / "checkpoint-00000004"
    shutil.copytree(tmp / "ssl-veca-fsdp2" / "checkpoints" / "checkpoint-00000004", ckpt)
    (ckpt / ".metadata").write_bytes(pickle.dumps(_Boom()))
    with pytest.raises(pickle.UnpicklingError, match="builtins.print is not part of a checkpoint index"):
        sc.read_tensors(ckpt)


def test_compile_default_matches_eager_loss_curve(tmp_path, monkeypatch):
    """train.compile=default (inductor, C++ on CPU) vs eager for 3 steps: the same losses. The cost is the
    compilation of one block's training graph and the teacher's inference graph: 40 s measured with a
    cold inductor cache on 2 shared cores (load average 4-5); ~5 s when inductor's on-disk cache holds
    the kernels from an earlier run."""
    import torch._inductor.config as inductor_config

    if shutil.which("gcc") is None and shutil.which("cc") is None and shutil.which("clang") is None:
        pytest.skip("no C compiler on this machine: inductor cannot build CPU kernels")
    monkeypatch.setattr(inductor_config, "compile_threads", 1)  # no pool of compile workers to start
    extra = ["train.max_steps=3", "crops.num_local=0", "widths.policy=full", "ibot.mask_probability=0.0"]
    from torch._dynamo.utils import counters

    curves, graphs = {}, {}
    for mode in ("none", "default"):
        out = tmp_path / mode
        before = counters["stats"]["unique_graphs"]
        _train(_overrides("ssl", "veca", None, out, "ddp", 8, f"train.compile={mode}", *extra))
        graphs[mode] = counters["stats"]["unique_graphs"] - before
        curves[mode] = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(curves["none"]) == 3
    assert graphs["none"] == 0 and graphs["default"] > 0, graphs  # the blocks really went through dynamo
    for step, (eager, compiled) in enumerate(zip(curves["none"], curves["default"])):
        # inductor fuses and reorders float ops: a few ulp per op, ~1e-6 relative on the loss
        assert abs(eager - compiled) <= 1e-4 * abs(eager), (step, curves)


def test_bench_train_parallel_reports_sharded_state(tmp_path):
    """veca bench train --parallel ddp fsdp2 on 2 CPU processes: FSDP2 holds half the state per process."""
    from veca_ssl.bench import train as bench

    out = tmp_path / "train.json"
    assert bench.main(["--parallel", "ddp", "fsdp2", "--family", "tiny", "--patch-size", "16", "--resolutions", "32",
                       "--batch-size", "2", "--warmup", "3", "--repeats", "5", "--output-dir", str(tmp_path)]) == 0
    rows = json.loads(out.read_text())
    assert sorted((r["parallel"], r["rank"]) for r in rows) == [("ddp", 0), ("ddp", 1), ("fsdp2", 0), ("fsdp2", 1)]
    ddp = next(r for r in rows if r["parallel"] == "ddp" and r["rank"] == 0)
    for r in rows:
        assert r["step_ms"] > 0 and r["min_ms"] <= r["step_ms"] <= r["max_ms"]
        if r["parallel"] == "fsdp2":  # parameters + AdamW moments: 1/2 per process, plus dim-0 padding
            assert 0.45 * ddp["state_mib"] < r["state_mib"] < 0.55 * ddp["state_mib"], (r, ddp)


def test_parallel_and_compile_values_are_checked_before_any_work():
    from veca_ssl.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="train.parallel=fsdp is not valid; choose one of: none, ddp, fsdp2"):
        load_config(None, COMMON + VECA + ["train.parallel=fsdp"])
    with pytest.raises(ConfigError, match="train.compile=max_autotune is not valid; choose one of: none, default, "):
        load_config(None, COMMON + VECA + ["train.compile=max_autotune"])
    with pytest.raises(ConfigError, match="train.compile.*must be of type str"):
        load_config(None, COMMON + VECA + ["train.compile=true"])  # the old boolean key
