"""Stop signals as schedulers and terminals send them: to the whole process group (main process and
DataLoader workers), with loader workers running; one signal checkpoints after the step and exits 0,
a second one stops at once; two gloo ranks stop after the same step."""

from __future__ import annotations

import json
import os
import re
import signal
import time

import pytest
import torch
from integrity_cli import kill_group, logged_steps, output, start, start_ranks, wait_for, write_config

from veca_ssl.train.checkpoint import CheckpointManager

LONG = ["optim.epochs=400", "train.checkpoint_every=100000", "data.num_workers=2"]


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2"])
def test_signal_to_the_process_group_checkpoints_after_the_step(tmp_path, sig):
    out = tmp_path / "run"
    config = write_config(tmp_path / "exp.yaml", *LONG, f"output_dir={out}")
    proc = start(config, logs=tmp_path / "log")
    try:
        wait_for(lambda: logged_steps(out) >= 2, [proc])
        os.killpg(proc.pid, getattr(signal, sig))  # main process and its 2 loader workers
        assert proc.wait(timeout=120) == 0
    finally:
        kill_group(proc)
    stdout, stderr = output(tmp_path / "log")
    assert "Traceback" not in stderr and "DataLoader worker" not in stderr, stderr
    found = re.search(rf"stop requested \({sig}\): checkpoint at step (\d+) written", stdout)
    assert found, stdout + stderr
    step = int(found.group(1))
    assert 2 <= step < 400 * 8
    ckpts = CheckpointManager(out / "checkpoints")
    assert [CheckpointManager.step_of(p) for p in ckpts.all()] == [step]
    assert int(CheckpointManager.load(ckpts.latest())["step"]) == step
    assert logged_steps(out) == step  # every step up to the checkpoint was logged, none after
    assert not (out / "export").exists()  # stopped, not finished


def test_second_signal_stops_at_once(tmp_path):
    """Ctrl-C twice: the first asks for a checkpoint after the step, the second interrupts the step
    (one message, exit 130, no checkpoint of the unfinished step)."""
    out = tmp_path / "run"
    slow = ["model.overrides={embed_dim: 192, depth: 6, num_heads: 3}", "data.train=synthetic:n=256,size=64,classes=4,"
            "seed=0", "crops.global_size=64", "crops.local_size=32", "crops.num_local=6", "optim.batch_size_per_gpu=16"]
    config = write_config(tmp_path / "exp.yaml", *LONG, *slow, f"output_dir={out}")
    proc = start(config, logs=tmp_path / "log")
    try:
        wait_for(lambda: logged_steps(out) >= 1, [proc])
        os.killpg(proc.pid, signal.SIGINT)
        time.sleep(1.0)  # the first one is handled; a step takes several seconds here
        assert proc.poll() is None, "the run ended before the second signal: the step was too fast for this test"
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=120) == 130
    finally:
        kill_group(proc)
    stdout, stderr = output(tmp_path / "log")
    assert "Traceback" not in stderr and "interrupted by a second stop signal" in stderr, stderr
    assert "checkpoint at step" not in stdout
    assert CheckpointManager(out / "checkpoints").all() == []


def test_two_gloo_ranks_stop_after_the_same_step(tmp_path):
    """Two ranks (as srun starts them: one process each, environment rendezvous) in one process group;
    SIGTERM to the group reaches both ranks and their loader workers at slightly different moments.
    Every rank stops after the same step and rank 0 writes that step's checkpoint."""
    out = tmp_path / "run"
    config = write_config(tmp_path / "exp.yaml", *LONG, "data.num_workers=1", "optim.batch_size_per_gpu=4",
                          f"output_dir={out}")
    launcher = start_ranks(config, logs=tmp_path / "rank")
    try:
        wait_for(lambda: logged_steps(out) >= 2, [launcher])
        os.killpg(launcher.pid, signal.SIGTERM)
        codes, _ = launcher.communicate(timeout=180)
    finally:
        kill_group(launcher)
    out0, err0 = output(tmp_path / "rank0")
    out1, err1 = output(tmp_path / "rank1")
    assert json.loads(codes) == [0, 0], err0 + err1
    assert "Traceback" not in err0 + err1, err0 + err1
    step0 = int(re.search(r"checkpoint at step (\d+) written", out0).group(1))
    step1 = int(re.search(r"rank 1: stop requested \([^)]*\): stopped after step (\d+)", out1).group(1))
    assert step0 == step1 >= 2
    ckpts = CheckpointManager(out / "checkpoints")
    assert [CheckpointManager.step_of(p) for p in ckpts.all()] == [step0]
    state = CheckpointManager.load(ckpts.latest())
    assert int(state["step"]) == step0 and all(torch.isfinite(v).all() for v in state["student"].values())


def test_sigterm_to_a_streaming_run_with_workers_resumes_bit_exactly(tmp_path):
    """The cluster path end to end: WebDataset shards read by 2 loader workers for many passes, SIGTERM
    to the whole process group mid-run, the same command again: the losses and the exported teacher are
    bit-identical to a run that was never stopped."""
    from integrity_cli import run
    from safetensors.torch import load_file

    from veca_ssl.data import make_shards

    spec = make_shards("synthetic:n=96,val_n=8,size=32,classes=4,seed=0", tmp_path / "shards", shard_size=12,
                       progress=False)["spec"]
    stream = [f"data.train={spec}", "data.samples_per_epoch=96", "data.num_workers=2", "optim.epochs=20",
              "train.checkpoint_every=100000", "train.knn_monitor.enabled=false"]  # 240 steps, 20 passes
    runs = {}
    for name in ("whole", "stopped"):
        out = tmp_path / name
        config = write_config(tmp_path / f"{name}.yaml", *stream, f"output_dir={out}")
        if name == "whole":
            assert run(config, timeout=300).returncode == 0
        else:
            proc = start(config, logs=tmp_path / "log")
            try:
                wait_for(lambda run=out: logged_steps(run) >= 30, [proc])  # past the second pass over the shards
                os.killpg(proc.pid, signal.SIGTERM)
                assert proc.wait(timeout=120) == 0
            finally:
                kill_group(proc)
            stdout, stderr = output(tmp_path / "log")
            found = re.search(r"checkpoint at step (\d+) written", stdout)
            assert found and 30 <= int(found.group(1)) < 240 and "Traceback" not in stderr, stdout + stderr
            resumed = run(config, timeout=300)
            assert resumed.returncode == 0 and f"at step {found.group(1)}" in resumed.stdout, resumed.stderr
        losses = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        runs[name] = ({r["step"]: r["loss"] for r in losses if "loss" in r},
                      load_file(str(out / "export" / "teacher.safetensors")))
    (whole_losses, whole_teacher), (losses, teacher) = runs["whole"], runs["stopped"]
    assert len(losses) == 240 and losses == whole_losses
    assert all(torch.equal(teacher[k], whole_teacher[k]) for k in whole_teacher)
