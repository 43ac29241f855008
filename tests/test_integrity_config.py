"""Values `veca train` must refuse: one message naming the key and the fix, exit 2, no traceback, and
nothing created on disk (the checks run before any directory exists)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch
from integrity_cli import ROOT, TINY

from veca_ssl.config import ConfigError, load_config
from veca_ssl.train.main import main

CASES = [
    ("optim.base_lr=-1", r"optim.base_lr=-1 is out of range: it must be a number > 0 \(the default is optim.base_lr=0.004\)"),
    ("optim.base_lr=0", r"optim.base_lr=0 is out of range: it must be a number > 0"),
    ("optim.clip_grad=-1", r"optim.clip_grad=-1 is out of range: it must be a number >= 0"),
    ("train.max_steps=-5", r"train.max_steps=-5 is out of range: it must be an integer >= 1 or null"),
    ("optim.epochs=null", r"'optim.epochs' must not be null; give a value like the default optim.epochs=100"),
    ("data.max_skip_fraction=2", r"data.max_skip_fraction=2 is out of range: it must be a number in \[0, 1\]"),
    ("model.patch_size=0", r"model.patch_size=0 is out of range: it must be an integer >= 1"),
    ("dino.head_out_dim=0", r"dino.head_out_dim=0 is out of range: it must be an integer >= 1"),
    ("data.num_workers=-1", r"data.num_workers=-1 is out of range: it must be an integer >= 0"),
    ("ibot.mask_ratio=[0.5,0.1]", r"ibot.mask_ratio=\[0.5, 0.1\] is out of range: it must be a pair \[min, max\] "
                                  r"with 0 <= min <= max <= 1"),
    ("optim.momentum_teacher=2", r"optim.momentum_teacher=2 is out of range: it must be a number in \[0, 1\]"),
    ("seed=-1", r"seed=-1 is out of range: it must be an integer in \[0, 2147483647\]"),
    ("train.keep_every=-1", r"train.keep_every=-1 is out of range"),
    ("crops.global_scale=[0.5,0.2]", r"crops.global_scale=\[0.5, 0.2\] is out of range"),
    ("dino.teacher_temp=0", r"dino.teacher_temp=0 is out of range: it must be a number > 0"),
    ("augment.color_jitter=[0.4,0.4]", r"augment.color_jitter=\[0.4, 0.4\] is out of range: it must be a list of 4"),
    ("device=tpu", r"device='tpu' is not valid; choose auto, cpu, cuda or cuda:N"),
    ("optim.warmup_epochs=5", r"optim.warmup_epochs=5 is longer than the whole training \(optim.epochs=2\)"),
    ("data.train=imagefolder:/does/not/exist", r"data.train=imagefolder:/does/not/exist: .*'/does/not/exist' "
                                               r"does not exist"),
    ("data.train=npz:/does/not/exist.npz data.split=null",
     r"data.train=npz:/does/not/exist.npz: npz: file '/does/not/exist.npz' does not exist"),
    ("data.train=wds:/nope/shard-{000..003}.tar data.split=null data.samples_per_epoch=10",
     r"data.train=wds:/nope/shard-\{000..003\}.tar: wds: 4 of 4 shards do not exist"),
    ("data.train=foo:/x", r"data.train=foo:/x: malformed dataset spec 'foo:/x': unknown kind 'foo'"),
    ("train.knn_monitor.enabled=true train.knn_monitor.dataset=digits train.knn_monitor.resolution=30",
     r"train.knn_monitor.resolution=30 must be a multiple of model.patch_size=8"),
    ("mode=distill distill.teacher=/no/teacher.pth", r"distill.teacher=/no/teacher.pth does not exist"),
]


@pytest.mark.parametrize("override,message", CASES, ids=[c[0] for c in CASES])
def test_bad_value_is_one_message_and_exit_2_before_any_directory(tmp_path, capsys, override, message):
    out = tmp_path / "run"
    assert main([*TINY, f"output_dir={out}", *override.split()]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert lines[0].startswith("veca train: config error: ") and "Traceback" not in err, err
    assert re.search(message, err), err
    assert not out.exists()


@pytest.mark.parametrize("where", ["a file", "below a file"])
def test_unusable_output_dir(tmp_path, capsys, where):
    blocker = tmp_path / "blocker"
    blocker.write_text("not a directory")
    out = blocker if where == "a file" else blocker / "run"
    assert main([*TINY, f"output_dir={out}"]) == 2
    err = capsys.readouterr().err
    expected = "exists and is not a directory" if where == "a file" else f"cannot be created: {blocker} is a file"
    assert expected in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_requested_without_cuda(tmp_path, capsys):
    assert main([*TINY, "device=cuda", f"output_dir={tmp_path / 'run'}"]) == 2
    assert "device=cuda but CUDA is not available here" in capsys.readouterr().err
    # a job for another machine (veca submit) is not judged by this machine's hardware
    load_config(None, [*TINY, "device=cuda", f"output_dir={tmp_path / 'run'}"], local=False)
    assert not (tmp_path / "run").exists()


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "veca_ssl.train.main", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("content,message", [
    ("optim: {epochs: 3\nseed: 1\n", r"is not valid YAML at line \d+, column \d+"),
    ("- optim.epochs=3\n- seed=1\n", r"must hold a mapping of config keys .* its top level is a list"),
])
def test_broken_config_file_in_a_real_process(tmp_path, content, message):
    bad = tmp_path / "exp.yaml"
    bad.write_text(content)
    result = _cli("--config", str(bad), f"output_dir={tmp_path / 'run'}")
    assert result.returncode == 2
    assert re.fullmatch(rf"veca train: config error: {re.escape(str(bad))} {message}.*\n", result.stderr), result.stderr
    assert not (tmp_path / "run").exists()


def test_debug_shows_the_traceback(tmp_path):
    quiet = _cli(*TINY, "optim.base_lr=-1", f"output_dir={tmp_path / 'run'}")
    loud = _cli("--debug", *TINY, "optim.base_lr=-1", f"output_dir={tmp_path / 'run'}")
    assert quiet.returncode == 2 and "Traceback" not in quiet.stderr
    assert loud.returncode != 0 and "Traceback (most recent call last)" in loud.stderr
    assert "ConfigError: optim.base_lr=-1 is out of range" in loud.stderr


def test_load_config_raises_config_error_for_the_same_rules():
    with pytest.raises(ConfigError, match="optim.base_lr=-1"):
        load_config(None, [*TINY, "optim.base_lr=-1"])


@pytest.mark.parametrize("content", ["", "# experiment: to be written\n\n"])
def test_an_empty_config_file_is_named_not_run_with_every_default(tmp_path, content):
    empty = tmp_path / "exp.yaml"
    empty.write_text(content)
    result = _cli("--config", str(empty), f"output_dir={tmp_path / 'run'}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr == (f"veca train: config error: {empty} is empty (nothing but comments or blank lines): it "
                             f"would silently run with every default. Write the keys it should set (e.g. 'optim: "
                             f"{{epochs: 10}}'), or give another file\n")
    assert not (tmp_path / "run").exists()
    evaluated = subprocess.run([sys.executable, "-m", "veca_ssl.cli", "eval", "all", "--config", str(empty)],
                               cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert evaluated.returncode == 2 and f"eval config {empty} is empty" in evaluated.stderr, evaluated.stderr
