"""``veca submit eval`` checks the protocol's arguments before anything is queued (``--dry-run`` too)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from launchers import submit

ROOT = Path(__file__).resolve().parent.parent


def test_readme_knn_example_without_test_set_is_refused_before_queueing(tmp_path) -> None:
    """The old README example (`--val` instead of `--test`) fails at submission, not inside the job."""
    ckpt = tmp_path / "run"
    ckpt.mkdir()
    out = tmp_path / "eval"
    proc = subprocess.run([sys.executable, "-m", "veca_ssl.cli", "submit", "eval", "knn", "--checkpoint", str(ckpt),
                           "--train", "digits@train", "--val", "digits@val", "--output-dir", str(out), "--dry-run"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr == ("veca eval knn: error: the following arguments are required: --test "
                           "(see veca eval knn --help)\n"), proc.stderr
    assert not out.exists()  # nothing written, nothing queued


@pytest.mark.parametrize("args, message", [
    (["knn", "--model", "veca_tiny", "--train", "digits@train"], "the following arguments are required: --test"),
    (["linear", "--model", "veca_tiny", "--train", "digits@train", "--test", "digits@val", "--epochs", "0"],
     "--epochs must be >= 1, got 0"),
    (["knn", "--checkpoint", "/no/such/run", "--train", "digits@train", "--test", "digits@val"],
     "checkpoint not found: '/no/such/run'"),
    (["dense", "--model", "veca_tiny", "--train", "folder:/no/such/ade@train", "--test", "digits@val"],
     "does not exist"),
    (["knn", "--model", "veca_tiny", "--train", "digits@train", "--test", "digits@val", "--nodse", "2"],
     "unrecognized arguments: --nodse 2"),
    (["all", "--config", "configs/eval/digits.yaml", "knn.kk=3"], "unknown key 'knn.kk'"),
])
def test_bad_eval_arguments_stop_the_submission(args, message, tmp_path, capsys) -> None:
    try:
        rc = submit.main(["eval", *args, "--output-dir", str(tmp_path / "o"), "--dry-run"])
    except SystemExit as exc:  # argparse's own exit for option errors
        rc = exc.code
    assert rc == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()


def test_an_earlier_report_stops_the_submission_unless_overwrite(tmp_path, capsys) -> None:
    out = tmp_path / "ev"
    (out / "knn").mkdir(parents=True)
    (out / "knn" / "report.json").write_text(json.dumps({"rows": []}))
    base = ["eval", "knn", "--model", "veca_tiny", "--train", "digits@train", "--test", "digits@val",
            "--output-dir", str(out), "--dry-run"]
    assert submit.main(base) == 2
    assert "already holds an earlier run's results; pass --overwrite" in capsys.readouterr().err
    assert submit.main([*base, "--overwrite"]) == 0


def test_eval_all_gets_its_output_dir_and_widths_as_overrides(tmp_path, capsys) -> None:
    out = tmp_path / "ev"
    assert submit.main(["eval", "all", "--config", "configs/eval/digits.yaml", "checkpoint=null", "model=veca_tiny",
                        "--widths", "8,16", "--output-dir", str(out), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert (f"veca eval all --config configs/eval/digits.yaml checkpoint=null model=veca_tiny widths=[8,16] "
            f"output_dir={out}") in text
