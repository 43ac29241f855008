"""One evaluation configuration: the CLI, the YAML of ``veca eval all`` and Python read the same dataclasses."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from eval.config import (
    DINOV2_LRS,
    KNN_KS,
    KNN_TEMPERATURE,
    PROTOCOL_INFO,
    SECTIONS,
    DataOptions,
    EvalConfig,
    EvalConfigError,
    KnnConfig,
    LinearProbeConfig,
    build_parser,
    check,
    load_config,
    parse_protocol_args,
)

ROOT = Path(__file__).resolve().parent.parent


def test_library_knn_defaults_are_the_eval_defaults() -> None:
    """eval.config restates veca_ssl.knn's protocol constants (torch-free --help); they must not drift."""
    from veca_ssl import knn

    assert KNN_KS == knn.KNN_KS and KNN_TEMPERATURE == knn.KNN_TEMPERATURE
    assert KnnConfig().backend in knn.BACKENDS and set(knn.BACKENDS) == set(dataclasses.fields(KnnConfig)[2]
                                                                               .metadata["choices"])


@pytest.mark.parametrize("protocol", list(PROTOCOL_INFO))
def test_every_cli_option_shows_the_dataclass_default(protocol) -> None:
    """The help text of each option carries the dataclass default (the only place defaults are written)."""
    text = build_parser(protocol).format_help()
    assert "SPEC §" not in text
    section = SECTIONS[protocol]
    for f in dataclasses.fields(section):
        if not f.metadata.get("cli", True):
            continue
        flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
        start = re.search(rf"\n  {flag}[ ,]", text).start()  # the option's own line, not the usage
        block = " ".join(text[start:start + 700].split())
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        shown = f.metadata.get("default_text")
        if shown is None:
            if isinstance(default, bool):
                shown = "on" if default else "off"
            elif isinstance(default, tuple):
                shown = ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in default)
            else:
                shown = f"{default:g}" if isinstance(default, float) else str(default)
        assert f"(default: {shown})" in block, (flag, block[:300])
    for flag in ("--widths", "--resolution", "--batch-size", "--output-dir", "--device", "--overwrite",
                 "--seed", "--bootstrap", "--debug"):
        assert flag in text


def test_cli_yaml_and_python_give_the_same_config(tmp_path) -> None:
    argv = ["--model", "veca_tiny", "--model-arg", "depth=2", "--train", "digits@train", "--test", "digits@val",
            "--epochs", "3", "--lrs", "0.01,0.1", "--probe-batch-size", "64", "--widths", "8,16",
            "--resolution", "32", "--no-speed", "--output-dir", str(tmp_path)]
    from_cli, debug = parse_protocol_args("linear", argv)
    assert not debug
    yaml = tmp_path / "lin.yaml"
    yaml.write_text(f"""
model: veca_tiny
model_args: {{depth: 2}}
protocols: [linear]
datasets: {{train: digits@train, test: digits@val}}
widths: [8, 16]
resolution: 32
output_dir: {tmp_path}
speed: {{enabled: false}}
linear: {{epochs: 3, lrs: [0.01, 0.1], batch_size: 64}}
""")
    from_yaml = load_config(yaml)
    from_python = check(EvalConfig(model="veca_tiny", model_args={"depth": 2}, protocols=("linear",),
                                   datasets=DataOptions(train="digits@train", test="digits@val"), widths=[8, 16],
                                   resolution=32, output_dir=str(tmp_path),
                                   speed=dataclasses.replace(EvalConfig().speed, enabled=False),
                                   linear=LinearProbeConfig(epochs=3, lrs=[0.01, 0.1], batch_size=64)))
    assert from_cli == from_yaml == from_python
    # what was not given keeps the one default
    assert from_cli.linear.val_fraction == LinearProbeConfig().val_fraction and from_cli.linear.epoch_length is None
    assert from_cli.batch_size == EvalConfig().batch_size and from_cli.run_dir == tmp_path / "linear"
    assert LinearProbeConfig().lrs == DINOV2_LRS


def test_yaml_errors_name_the_key(tmp_path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: veca_tiny\ndatasets: {train: digits@train, test: digits@val}\nlinear: {epoch: 3}\n")
    with pytest.raises(EvalConfigError, match=r"unknown key 'linear.epoch'; valid keys of linear: epochs, "):
        load_config(bad)
    bad.write_text("model: veca_tiny\ndatasets: {train: digits@train, test: digits@val}\nbatch_size: many\n")
    with pytest.raises(EvalConfigError, match="batch_size must be an integer, got 'many'"):
        load_config(bad)
    bad.write_text("model: veca_tiny\ndatasets: {train: digits@train}\n")
    with pytest.raises(EvalConfigError, match=r"protocol 'knn' needs datasets.test \(--test SPEC"):
        load_config(bad)
    bad.write_text("- a list\n")
    with pytest.raises(EvalConfigError, match="must be a mapping"):
        load_config(bad)
    bad.write_text("model: [unclosed\n")
    with pytest.raises(EvalConfigError, match="cannot read eval config"):
        load_config(bad)
    with pytest.raises(EvalConfigError, match="not key=value"):
        load_config(None, ["model"])


@pytest.mark.parametrize("change, message", [
    ({"knn": KnnConfig(temperature=0)}, "knn.temperature must be > 0, got 0.0"),
    ({"knn": KnnConfig(ks=())}, "knn.ks is empty"),
    ({"linear": LinearProbeConfig(val_fraction=1.0)}, r"linear.val_fraction must be in \(0, 1\)"),
    ({"batch_size": 0}, "batch_size must be >= 1, got 0"),
    ({"device": "gpu"}, "device 'gpu' is not one of"),
    ({"protocols": ("knn", "knn")}, "lists a protocol twice"),
    ({"checkpoint": "x"}, "give exactly one of"),
    ({"name": "../up"}, "plain directory name"),
])
def test_python_api_is_checked_like_the_cli(change, message) -> None:
    base = {"model": "veca_tiny", "protocols": ("knn",), "datasets": DataOptions(train="a", test="b")}
    with pytest.raises(EvalConfigError, match=message):
        check(EvalConfig(**{**base, **change}))


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("command", [["eval", "knn"], ["eval", "linear"], ["eval", "logreg"], ["eval", "dense"],
                                     ["eval", "all"], ["eval"], ["extract"], ["select"]])
def test_help_is_instant_and_imports_no_torch(command) -> None:
    code = ("import sys, time; t = time.perf_counter(); from veca_ssl.cli import main\n"
            f"try:\n    main({command + ['--help']!r})\nexcept SystemExit:\n    pass\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', time.perf_counter() - t)")
    start = time.perf_counter()
    proc = _run(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1].startswith("NO-TORCH"), proc.stdout[-500:]
    assert "usage:" in proc.stdout and "SPEC §" not in proc.stdout
    assert time.perf_counter() - start < 30  # generous on a busy machine; torch alone takes longer there


@pytest.mark.parametrize("protocol", list(PROTOCOL_INFO))
@pytest.mark.parametrize("argv, message", [
    (["--model", "veca_tiny", "--train", "digits@train"], "the following arguments are required: --test"),
    (["--model", "veca_tiny", "--train", "digits@train", "--test", "digits@val", "--batch-size", "0"],
     "--batch-size must be >= 1, got 0"),
    (["--model", "veca_tiny", "--train", "digits@train", "--test", "digits@val", "--widths", "8,x"],
     "argument --widths: must be an integer, got 'x'"),
    (["--checkpoint", "/no/such/ckpt", "--train", "digits@train", "--test", "digits@val"],
     "checkpoint not found: '/no/such/ckpt'"),
    (["--model", "veca_tiny", "--train", "imagefolder:/no/such/data", "--test", "digits@val"],
     "dataset 'imagefolder:/no/such/data': '/no/such/data' does not exist"),
    (["--model", "veca_tiny", "--train", "digits@train", "--test", "digits@val", "--unknown", "1"],
     "unrecognized arguments: --unknown 1"),
])
def test_user_errors_are_one_line_and_exit_2(protocol, argv, message, tmp_path) -> None:
    proc = subprocess.run([sys.executable, "-m", "veca_ssl.cli", "eval", protocol, *argv, "--output-dir",
                           str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(f"veca eval {protocol}: error: ") and message in proc.stderr, proc.stderr
    assert not any(tmp_path.iterdir())  # nothing written


def test_debug_shows_the_traceback(tmp_path) -> None:
    proc = subprocess.run([sys.executable, "-m", "veca_ssl.cli", "eval", "knn", "--checkpoint", "/no/such/ckpt",
                           "--train", "digits@train", "--test", "digits@val", "--debug"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "FileNotFoundError" in proc.stderr


@pytest.mark.parametrize("argv, message", [
    (["extract", "--model", "veca_tiny", "--data", "digits@train"],
     "veca extract: error: the following arguments are required: --output-dir"),
    (["extract", "--checkpoint", "/no/such/ckpt", "--data", "digits@train", "--output-dir", "OUT"],
     "veca extract: error: checkpoint not found: '/no/such/ckpt'"),
    (["extract", "--model", "veca_tiny", "--data", "digits@train", "--output-dir", "OUT", "--width", "8",
      "--width-from", "s.json"], "veca extract: error: give --width or --width-from, not both"),
    (["extract", "--model", "veca_tiny", "--data", "digits@train", "--output-dir", "OUT", "--width-from",
      "/no/such/selection.json"], "veca extract: error: selection file not found"),
    (["select", "--report", "/no/such/run"], "veca select: error: eval report not found: '/no/such/run'"),
    (["select", "--report", "x", "--max-gflops", "-1"], "veca select: error: --max-gflops must be > 0, got -1.0"),
])
def test_extract_and_select_user_errors_are_one_line(argv, message, tmp_path) -> None:
    argv = [str(tmp_path / "out") if a == "OUT" else a for a in argv]
    proc = subprocess.run([sys.executable, "-m", "veca_ssl.cli", *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(message), proc.stderr
    assert not (tmp_path / "out").exists()


def test_a_shipped_eval_config_is_found_by_name_from_any_directory(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # no configs/ here: the name resolves to the package's copy
    random_init = ["checkpoint=null", "model=veca_tiny", "model_args={patch_size: 8, num_cores: 16, depth: 4}"]
    by_name = load_config("digits", random_init)
    by_path = load_config(ROOT / "configs" / "eval" / "digits.yaml", random_init)
    assert by_name == by_path and by_name.datasets.test == "digits@val"
    with pytest.raises(EvalConfigError, match=r"eval config not found: 'nope' .*named eval configs: digits"):
        load_config("nope")


@pytest.mark.parametrize("argv", [
    ["extract", "--model", "veca_tiny", "--model-arg", "depth=1", "--patch-size", "8", "--data",
     "synthetic:n=4,size=16", "--resolution", "16", "--output-dir", "FILE/x"],
    ["eval", "knn", "--model", "veca_tiny", "--model-arg", "depth=1", "--patch-size", "8", "--train",
     "synthetic:n=8,size=16@train", "--test", "synthetic:n=8,size=16@val", "--resolution", "16", "--no-speed",
     "--output-dir", "FILE"],
    ["data", "inspect", "synthetic:n=4,size=16", "--out", "FILE/grid.png"],
])
def test_an_output_path_blocked_by_a_file_is_named_with_the_way_out(argv, tmp_path) -> None:
    (tmp_path / "FILE").write_text("")
    proc = subprocess.run([sys.executable, "-m", "veca_ssl.cli", *argv], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "a file is in the way" in proc.stderr and "'FILE" in proc.stderr, proc.stderr
