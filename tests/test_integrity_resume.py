"""Resuming honestly: a config that changes what the run computes is refused with a diff (unless
asked for), config.yaml keeps its history, the export records the real step, metrics.jsonl has each
step once and survives torn lines and a full disk."""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import pytest
from integrity_cli import TINY, run, write_config
from omegaconf import OmegaConf

from veca_ssl import fileio
from veca_ssl.config import load_config, resume_changes
from veca_ssl.train.checkpoint import CheckpointManager
from veca_ssl.train.loop import train
from veca_ssl.train.metrics import read_metrics


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished 16-step run (2 epochs of 8 steps), checkpoints every 2 steps."""
    out = tmp_path_factory.mktemp("base") / "run"
    train(load_config(None, TINY + [f"output_dir={out}"]))
    return out


def test_resume_with_a_changed_meaning_is_refused_with_a_diff(tmp_path, finished):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    config = write_config(tmp_path / "exp.yaml", f"output_dir={out}")
    before = {p.name: p.read_bytes() for p in (out, out / "checkpoints") for p in p.iterdir() if p.is_file()}
    result = run(config, "optim.base_lr=0.05", "seed=9", "optim.epochs=7")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    for line in ("optim.epochs: 2 -> 7", "optim.base_lr: 0.002 -> 0.05", "seed: 0 -> 9"):
        assert line in result.stderr, result.stderr
    assert "train.allow_config_change=true" in result.stderr
    after = {p.name: p.read_bytes() for p in (out, out / "checkpoints") for p in p.iterdir() if p.is_file()}
    assert after == before  # nothing written: not config.yaml, not metrics, not a checkpoint

    # asked for: the run continues (8 more epochs' worth of steps), config.yaml keeps its history
    result = run(config, "optim.base_lr=0.05", "seed=9", "optim.epochs=3", "train.allow_config_change=true")
    assert result.returncode == 0, result.stderr
    assert "resumed from" in result.stdout and "at step 16" in result.stdout
    kept = out / "config.until-step-00000016.yaml"
    assert kept.read_bytes() == before["config.yaml"]
    assert OmegaConf.load(out / "config.yaml").optim.base_lr == 0.05
    assert json.loads((out / "export" / "teacher.json").read_text())["steps"] == 24


def test_operational_changes_resume_without_asking(tmp_path, finished):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    old = (out / "config.yaml").read_text()
    new = load_config(None, TINY + [f"output_dir={out}", "data.num_workers=2", "train.log_every=5",
                                    "train.keep_last=2", "train.max_steps=20", "device=cpu"])
    assert resume_changes(old, new) == []
    assert [k for k, _, _ in resume_changes(old, load_config(None, TINY + ["crops.num_local=3"]))] == ["crops.num_local"]


def test_export_records_the_step_of_its_weights(tmp_path, finished):
    """A finished 16-step run rerun with a shorter schedule (allowed) exports the step-16 weights as step 16."""
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    summary = train(load_config(None, TINY + [f"output_dir={out}", "optim.epochs=1", "optim.warmup_epochs=0",
                                              "train.allow_config_change=true"]))
    assert summary["steps"] == 16
    assert json.loads((out / "export" / "teacher.json").read_text())["steps"] == 16


def test_resume_continues_metrics_without_duplicates_or_torn_lines(tmp_path, finished):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    # as if killed after logging step 11 but before checkpoint 12 was written, mid-way through a line
    ckpts = CheckpointManager(out / "checkpoints")
    for path in ckpts.all():
        if CheckpointManager.step_of(path) > 10:
            path.unlink()
            fileio.checksum_path(path).unlink()
    shutil.rmtree(out / "export")
    lines = (out / "metrics.jsonl").read_text().splitlines(keepends=True)
    (out / "metrics.jsonl").write_text("".join(lines[:11]) + lines[11][:25])
    with pytest.warns(UserWarning, match="dropped a torn last line"):
        assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == list(range(1, 12))

    result = run(write_config(tmp_path / "exp.yaml", f"output_dir={out}"))
    assert result.returncode == 0, result.stderr
    assert "at step 10" in result.stdout
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no torn line left
        records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 17))  # each step once, in order


def test_read_metrics_names_a_damaged_line_that_is_not_the_last(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2 is not a JSON record"):
        read_metrics(path)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux) to simulate a full disk")
def test_full_disk_while_logging_ends_with_one_message(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").symlink_to("/dev/full")  # every write fails with ENOSPC, as on a full disk
    result = run(write_config(tmp_path / "exp.yaml", f"output_dir={out}"), "train.max_steps=4")
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith(f"veca train: cannot append step 1 to {out / 'metrics.jsonl'}: the disk is full")
    assert "rerun the same command to resume" in lines[0]
