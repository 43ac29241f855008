"""Weights that do not fit the architecture their config describes (an edited or swapped export sidecar,
a checkpoint whose backbone_config was changed): `veca export`, `veca eval`, `veca extract` and
load_backbone stop with one line naming the first tensors that differ and their shapes, exit 2, no
traceback (--debug shows it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from veca_ssl.models import build_backbone, load_backbone, save_backbone
from veca_ssl.models.io import CHECKPOINT_FORMAT

ROOT = Path(__file__).resolve().parent.parent


def _export_with_sidecar(tmp_path: Path, **changes) -> Path:
    """A tiny VECA export (64-d, 2 blocks, 16 cores, patch 8) whose .json then says ``changes``."""
    torch.manual_seed(0)
    model = build_backbone("veca_tiny", patch_size=8, embed_dim=64, num_heads=2, depth=2, num_cores=16)
    path = save_backbone(model, tmp_path / "w.safetensors")
    sidecar = path.with_suffix(".json")
    meta = json.loads(sidecar.read_text())
    meta["config"].update(changes)
    sidecar.write_text(json.dumps(meta))
    return path


def _veca(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "veca_ssl.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=180)


def test_export_eval_and_extract_name_the_tensors_that_do_not_fit(tmp_path: Path) -> None:
    path = _export_with_sidecar(tmp_path, embed_dim=32)  # a sidecar of another width
    expected = (f"{path} does not fit the architecture in its sidecar w.json (veca embed_dim=32, depth=2, "
                f"num_heads=2, num_cores=16, patch_size=8): 31 tensor(s) differ in shape: cores: expected (16, 32), "
                f"found (16, 64); mask_token: expected (32), found (64); patch_embed.proj.weight: expected "
                f"(32, 3, 8, 8), found (64, 3, 8, 8) (and 28 more)")
    commands = {
        "veca export": ["export", "--checkpoint", str(path), "--width", "8", "--out", str(tmp_path / "x")],
        "veca eval knn: error": ["eval", "knn", "--checkpoint", str(path), "--train", "digits@train", "--test",
                                 "digits@val", "--output-dir", str(tmp_path / "ev")],
        "veca extract: error": ["extract", "--checkpoint", str(path), "--data", "digits@val", "--width", "8",
                                "--output-dir", str(tmp_path / "fe")],
    }
    for prefix, argv in commands.items():
        proc = _veca(*argv, cwd=tmp_path)
        assert proc.returncode == 2, (prefix, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"{prefix}: {expected}"), (prefix, proc.stderr)
        assert "keep an export's .safetensors and .json together" in lines[0]
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "fe").exists()
    debug = _veca(*commands["veca export"], "--debug", cwd=tmp_path)  # the project's --debug: the traceback
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "WeightsMismatchError" in debug.stderr


def test_missing_and_unexpected_tensors_are_named_too(tmp_path: Path) -> None:
    from veca_ssl.models.io import WeightsMismatchError

    (tmp_path / "deeper").mkdir()
    with pytest.raises(WeightsMismatchError) as info:  # the sidecar has a block the file lacks
        load_backbone(_export_with_sidecar(tmp_path / "deeper", depth=3))
    text = str(info.value)
    assert "\n" not in text and ("1 tensor(s) differ in shape: coord_alpha: expected (2), found (1) — 14 missing "
                                 "from the file: blocks.2.norm1.weight; blocks.2.norm1.bias; blocks.2.attn.qkv.weight "
                                 "(and 11 more).") in text
    (tmp_path / "shallower").mkdir()  # the file has a block the sidecar lacks
    with pytest.raises(ValueError, match=r": 15 not in the model: blocks\.1\.attn\.proj\.bias; "
                                         r"blocks\.1\.attn\.proj\.weight; blocks\.1\.attn\.qkv\.bias \(and 12 more\)\."):
        load_backbone(_export_with_sidecar(tmp_path / "shallower", depth=1))


def test_a_training_checkpoint_whose_backbone_config_was_changed(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_backbone("veca_tiny", patch_size=8, embed_dim=64, num_heads=2, depth=2, num_cores=16)
    state = {f"backbone.{k}": v for k, v in model.state_dict().items()}
    config = dict(model.config, num_cores=24)
    torch.save({"format": CHECKPOINT_FORMAT, "backbone_config": config, "teacher": state, "student": state},
               tmp_path / "checkpoint-00000002.pt")
    with pytest.raises(ValueError, match=r"checkpoint-00000002\.pt \(teacher\) does not fit the architecture in "
                                         r"its backbone_config \(veca .*num_cores=24.*\): 2 tensor\(s\) differ in "
                                         r"shape: cores: expected \(24, 64\), found \(16, 64\); core_coords: "
                                         r"expected \(24, 2\), found \(16, 2\)\."):
        load_backbone(tmp_path / "checkpoint-00000002.pt")
