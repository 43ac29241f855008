"""Config paths as the README writes them, from any directory, and what `veca eval all --config digits`
says where the quickstart's run is not; output directories that cannot be created."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _veca(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "veca_ssl.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))


def test_readme_config_path_runs_outside_the_checkout(tmp_path: Path, monkeypatch) -> None:
    proc = _veca("train", "--config", "configs/experiments/synthetic64_veca_tiny.yaml", "--dry-run",
                 f"output_dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "model:\n  name: veca_tiny" in proc.stdout and "--dry-run: config valid" in proc.stdout
    assert not (tmp_path / "run").exists()
    # a local file of that name still wins over the shipped one
    from veca_ssl import CONFIG_DIR
    from veca_ssl.config import resolve_config_path

    local = tmp_path / "configs" / "experiments" / "synthetic64_veca_tiny.yaml"
    local.parent.mkdir(parents=True)
    local.write_text("optim: {epochs: 30}\n")
    monkeypatch.chdir(tmp_path)
    assert resolve_config_path("configs/experiments/synthetic64_veca_tiny.yaml").resolve() == local
    local.unlink()
    assert resolve_config_path("configs/experiments/synthetic64_veca_tiny.yaml") == (
        CONFIG_DIR / "experiments" / "synthetic64_veca_tiny.yaml")


def test_eval_all_digits_without_the_quickstart_run_names_the_key_and_the_way_out(tmp_path: Path) -> None:
    for config in ("digits", "configs/eval/digits.yaml"):
        proc = _veca("eval", "all", "--config", config, cwd=tmp_path)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert proc.stderr.strip().splitlines() == [
            f"veca eval all: error: checkpoint=outputs/quickstart/export/teacher.safetensors (set in "
            f"{ROOT / 'configs' / 'eval' / 'digits.yaml'}) does not exist in {tmp_path}: run `veca train --config "
            f"quickstart` in this directory first (it writes outputs/quickstart/export/teacher.safetensors), or pass "
            f"checkpoint=PATH (a run directory, checkpoint or export), or checkpoint=null model=PRESET for a "
            f"random-init baseline"]


def test_eval_all_advises_the_overrides_it_takes(tmp_path: Path, monkeypatch, capsys) -> None:
    from eval.all import main as all_main
    from eval.cli import check_argv

    monkeypatch.chdir(tmp_path)
    argv = ["--config", "digits", "checkpoint=null", "model=veca_tiny", "output_dir=ev", "protocols=[knn]"]
    (tmp_path / "ev" / "knn").mkdir(parents=True)
    (tmp_path / "ev" / "knn" / "report.json").write_text("{}")
    assert all_main(argv) == 2
    err = capsys.readouterr().err
    assert err.strip() == ("veca eval all: error: ev/knn/report.json already holds an earlier run's results; pass "
                           "overwrite=true to replace it, or choose another output_dir=DIR or name=NAME")
    check_argv(["all", *argv, "overwrite=true"])  # what it advises is accepted (and passes the guard)
    with pytest.raises(FileExistsError, match="pass overwrite=true"):  # veca submit eval all says the same
        check_argv(["all", *argv])


@pytest.mark.skipif(not Path("/proc/self").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("dry_run", [False, True])
def test_an_output_dir_that_cannot_be_created_is_refused_with_the_key(tmp_path: Path, dry_run: bool) -> None:
    proc = _veca("train", "--config", "quickstart", "output_dir=/proc/x", *(["--dry-run"] if dry_run else []),
                 cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "veca train: config error: output_dir=/proc/x cannot be created: /proc refuses new directories (No such "
        "file or directory); choose another output_dir"]
