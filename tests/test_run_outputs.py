"""What a finished `veca train` leaves and says, as a batch job sees it (stdout/stderr are files): progress
lines instead of a bar's carriage returns, the outputs line naming only what was written, and `veca
consolidate` refusing to replace the run's export silently. Also: README's extras list is setup.cfg's."""

from __future__ import annotations

import configparser
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_train import TINY  # tests/ is on sys.path (no package, pytest prepend mode)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def run_without_tensorboard(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """A 4-step run of the real CLI without the [tensorboard] extra, stdout and stderr to files."""
    out = tmp_path_factory.mktemp("run") / "run"
    overrides = [o for o in TINY if not o.startswith("train.progress")] + ["train.max_steps=4", f"output_dir={out}"]
    code = ("import sys; sys.modules['tensorboard'] = None; from veca_ssl.cli import main; "
            f"sys.exit(main(['train', *{overrides!r}]))")
    logs = out.parent
    with open(logs / "out.log", "w") as stdout, open(logs / "err.log", "w") as stderr:
        proc = subprocess.run([sys.executable, "-c", code], stdout=stdout, stderr=stderr, timeout=300,
                              env=dict(os.environ, OMP_NUM_THREADS="1"))
    proc.stdout, proc.stderr = (logs / "out.log").read_text(), (logs / "err.log").read_text()
    assert proc.returncode == 0, proc.stderr
    return out, proc


def test_progress_in_a_log_file_is_lines_not_carriage_returns(run_without_tensorboard) -> None:
    _, proc = run_without_tensorboard
    assert "\r" not in proc.stderr and "\r" not in proc.stdout  # a bar's updates would all stay in the file
    assert any(line.startswith("train: done in ") and line.endswith("(4 x step), loss " + line.split("loss ")[-1])
               for line in proc.stderr.splitlines()), proc.stderr


def test_the_outputs_line_lists_only_what_was_written(run_without_tensorboard) -> None:
    out, proc = run_without_tensorboard
    assert not (out / "tensorboard").exists()
    last = proc.stdout.strip().splitlines()[-1]
    assert last == (f"outputs: {out} (config.yaml, metrics.jsonl, checkpoints/); teacher backbone: "
                    f"{out / 'export' / 'teacher.safetensors'}")


def test_consolidate_refuses_to_replace_the_export_silently(run_without_tensorboard, capsys) -> None:
    from veca_ssl.consolidate import main as consolidate_main

    out, _ = run_without_tensorboard
    export = out / "export" / "teacher.safetensors"
    before = (export.read_bytes(), export.with_suffix(".json").read_bytes())
    assert consolidate_main([str(out)]) == 2
    assert capsys.readouterr().err.strip() == (f"veca consolidate: {export} already exists (the weights of step 4); "
                                               f"pass --overwrite to replace it, or --out PATH to write elsewhere")
    assert (export.read_bytes(), export.with_suffix(".json").read_bytes()) == before
    assert consolidate_main([str(out), "--out", str(out / "other.safetensors")]) == 0  # elsewhere: fine
    assert consolidate_main([str(out), "--overwrite"]) == 0
    assert f"-> {export}" in capsys.readouterr().out


def test_readme_lists_every_extra_in_setup_cfg() -> None:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    readme = (ROOT / "README.md").read_text()
    listing = readme[readme.index("Optional parts are extras"):]
    listing = listing[:listing.index("\n\n")]
    for extra in sorted(set(cfg["options.extras_require"]) - {"test"}):  # [test]: the README's test command
        assert f"`[{extra}]`" in listing, f"README's extras list lacks [{extra}]"


def test_export_veca_reference_refusal_exits_non_zero(run_without_tensorboard, tmp_path) -> None:
    """The README's `veca export --checkpoint outputs/run --format veca-reference …` on a run whose width
    no reference family has: refused with one line and exit 2, nothing written."""
    out, _ = run_without_tensorboard
    proc = subprocess.run([sys.executable, "-m", "veca_ssl.cli", "export", "--checkpoint", str(out), "--format",
                           "veca-reference", "--out", str(tmp_path / "veca_ref.pt")], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "veca export: cannot write the reference layout: embed_dim=32, num_heads=2, SwiGLU hidden 85 match no "
        "reference family (small 384-d/6 heads, splus 384-d/6 heads, base 768-d/12 heads, large 1024-d/16 heads)"]
    assert not list(tmp_path.iterdir())
