"""After a NaN/Inf loss the run names a checkpoint a rerun can really resume from: written before the
diverging step, finite weights and optimiser state, its next step not already diverging; the ones
that are not are set aside, so a plain rerun resumes from the named one."""

from __future__ import annotations

import json
import math
import re
import shutil

import pytest
import torch
from integrity_cli import TINY, run, write_config

from veca_ssl.config import load_config
from veca_ssl.train.checkpoint import CheckpointManager
from veca_ssl.train.loop import NonFiniteLossError, train
from veca_ssl.train.rundir import non_finite, resume_point_after_divergence


def test_learning_rate_divergence_names_a_checkpoint_that_resumes_past_it(tmp_path):
    out = tmp_path / "run"
    config = write_config(tmp_path / "exp.yaml", f"output_dir={out}", "train.checkpoint_every=1",
                          "train.keep_last=50", "optim.warmup_epochs=0")
    result = run(config, "optim.base_lr=1000")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    message = result.stderr.strip()
    failed = int(re.search(r"non-finite loss at step (\d+)", message).group(1))
    good = int(re.search(r"Resume point: \S+checkpoint-(\d+)\.pt \(step \d+", message).group(1))
    # the checkpoint written after step failed-1 holds the weights that produced the NaN: never named
    assert good <= failed - 2, message
    assert f"Set aside checkpoint-{failed - 1:08d}.pt as checkpoint-{failed - 1:08d}.pt.diverged" in message
    ckpts = CheckpointManager(out / "checkpoints")
    assert CheckpointManager.step_of(ckpts.latest()) == good
    assert non_finite(CheckpointManager.load(ckpts.latest())) is None

    # as the message says: a lower lr, resumed from there, passes the step that diverged
    result = run(config, "optim.base_lr=0.001", "train.allow_config_change=true", f"train.max_steps={failed + 1}")
    assert result.returncode == 0, result.stderr
    assert f"checkpoint-{good:08d}.pt at step {good}" in result.stdout
    losses = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(losses) == failed + 1 and all(math.isfinite(v) for v in losses)


def test_nan_in_the_step_after_a_checkpoint_skips_that_checkpoint(tmp_path, monkeypatch):
    from veca_ssl.method import ssl

    original, calls = ssl.ElasticDINO.forward, {"n": 0}

    def poisoned(self, batch, widths, teacher_temp):
        losses = original(self, batch, widths, teacher_temp)
        calls["n"] += 1
        if calls["n"] == 5:  # step 5, right after checkpoint-4
            losses["loss"] = losses["loss"] * float("inf")
        return losses

    monkeypatch.setattr(ssl.ElasticDINO, "forward", poisoned)
    cfg = load_config(None, TINY + [f"output_dir={tmp_path / 'run'}"])
    with pytest.raises(NonFiniteLossError, match=r"at step 5: loss .*Set aside checkpoint-00000004.pt as "
                                                 r"checkpoint-00000004.pt.diverged .*Resume point: \S+checkpoint-00000002"):
        train(cfg)
    monkeypatch.setattr(ssl.ElasticDINO, "forward", original)
    summary = train(cfg)  # a plain rerun resumes from checkpoint-2 and finishes
    assert summary["steps"] == 16


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory):
    out = tmp_path_factory.mktemp("nan") / "run"
    train(load_config(None, TINY + ["train.max_steps=6", f"output_dir={out}"]))
    return out


def test_non_finite_optimiser_state_or_a_diverging_next_step_disqualify(tmp_path, four_steps):
    out = tmp_path / "run"
    shutil.copytree(four_steps, out)
    ckpts = CheckpointManager(out / "checkpoints")
    state = CheckpointManager.load(ckpts.path(4))
    first = next(iter(state["optimizer"]["state"].values()))
    first["exp_avg_sq"].view(-1)[0] = float("inf")  # finite weights, broken AdamW moments
    ckpts.save({k: v for k, v in state.items() if k != "format"}, 4)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    records[2]["grad_norm"] = float("inf")  # step 3, the step after checkpoint-2, already blew up
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))

    good, moved = resume_point_after_divergence(ckpts, failed_step=6, metrics_path=out / "metrics.jsonl")
    assert good is None  # 4: inf in the optimiser state, 2: its next step diverged -> nothing to resume from
    reasons = {old.name: reason for old, _, reason in moved}
    assert reasons["checkpoint-00000006.pt"] == "holds the weights that produced the non-finite loss"
    assert "non-finite values in optimizer.state" in reasons["checkpoint-00000004.pt"]
    assert "its next step already diverged (grad_norm=inf at step 3)" in reasons["checkpoint-00000002.pt"]
    assert ckpts.all() == [] and all(new.name.endswith(".diverged") and new.exists() for _, new, _ in moved)
    assert all(torch.is_tensor(v) for v in CheckpointManager.load(
        out / "checkpoints" / "checkpoint-00000004.pt.diverged", verify=False)["student"].values())
