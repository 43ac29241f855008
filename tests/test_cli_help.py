"""Command-line help: instant (nothing heavy imported before parsing), defaults and rules shown, one
option vocabulary, no references to documents or files the repository does not have."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from veca_ssl.cli import COMMANDS

ROOT = Path(__file__).resolve().parent.parent

HELP_COMMANDS = [[], ["train"], ["submit"], ["submit", "train"], ["submit", "eval"], ["data"],
                 ["data", "make-shards"], ["data", "inspect"], ["bench"], ["bench", "backbone"],
                 ["bench", "data"], ["bench", "train"], ["bench", "knn"], ["bench", "ddp"], ["export"],
                 ["consolidate"], ["doctor"]]

_HELP_SCRIPT = """
import contextlib, io, json, sys
from veca_ssl.cli import main
texts = {}
for argv in json.loads(sys.argv[1]):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        try:
            code = main(argv + ["--help"])
        except SystemExit as exc:
            code = exc.code
    texts[" ".join(argv)] = {"code": code, "text": buf.getvalue()}
heavy = sorted(m for m in ("torch", "sklearn", "scipy", "matplotlib", "submitit", "webdataset") if m in sys.modules)
print(json.dumps({"texts": texts, "heavy": heavy}))
"""


@pytest.fixture(scope="module")
def helps() -> dict:
    """Every command's --help, all printed by one fresh interpreter, with what it had imported."""
    proc = subprocess.run([sys.executable, "-c", _HELP_SCRIPT, json.dumps(HELP_COMMANDS)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_help_is_instant_no_heavy_import_before_parsing(helps: dict) -> None:
    assert helps["heavy"] == [], f"--help imported {helps['heavy']}: import them after parsing"
    for cmd, res in helps["texts"].items():
        assert res["code"] in (0, None), cmd
        assert "usage:" in res["text"], cmd


def test_help_cites_no_spec_sections_and_lists_every_bench(helps: dict) -> None:
    from veca_ssl.bench import BENCHES

    for cmd, res in helps["texts"].items():
        assert "SPEC" not in res["text"] and "§" not in res["text"], f"`veca {cmd} --help` cites the spec"
    for name in BENCHES:  # `veca --help` and `veca bench --help` name every bench, ddp included
        assert name in helps["texts"][""]["text"] and name in helps["texts"]["bench"]["text"]
    assert COMMANDS["bench"][1].endswith(" | ".join(BENCHES))


def _parsers() -> dict[str, argparse.ArgumentParser]:
    from launchers.submit import build_parser as submit_parser
    from veca_ssl.bench import BENCHES
    from veca_ssl.bench.doctor import build_parser as doctor_parser
    from veca_ssl.consolidate import build_parser as consolidate_parser
    from veca_ssl.data.cli import _parser as data_parser
    from veca_ssl.export import build_parser as export_parser
    from veca_ssl.train.main import build_parser as train_parser

    out = {"train": train_parser(), "submit train": submit_parser("train"), "submit eval": submit_parser("eval"),
           "export": export_parser(), "consolidate": consolidate_parser(), "doctor": doctor_parser()}
    data = data_parser()
    sub = next(a for a in data._actions if isinstance(a, argparse._SubParsersAction))
    out.update({f"data {name}": p for name, p in sub.choices.items()})
    for name, (module, _) in BENCHES.items():
        out[f"bench {name}"] = __import__(module, fromlist=["build_parser"]).build_parser()
    return out


def test_every_option_has_help_and_shows_its_default() -> None:
    for cmd, parser in _parsers().items():
        formatter = parser._get_formatter()
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            text = formatter._expand_help(action) if action.help else ""
            assert text.strip(), f"veca {cmd} {action.option_strings or action.dest}: no help text"
            default = action.default
            if default not in (None, False, [], argparse.SUPPRESS) and (action.option_strings or action.nargs in ("?", "*")):
                assert "default" in text.lower(), f"veca {cmd} {action.option_strings}: default not shown"
                if "(default: " in text:
                    assert f"(default: {default})" in text


def test_one_vocabulary_and_rules_stated_where_enforced(capsys: pytest.CaptureFixture) -> None:
    parsers = _parsers()
    for name in ("backbone", "data", "train", "knn", "ddp"):
        parser = parsers[f"bench {name}"]
        options = {o for a in parser._actions for o in a.option_strings}
        assert "--output-dir" in options and not options & {"--out", "--output"}, name
        # the rule that refuses a value is in the help of that option
        warmup = next(a for a in parser._actions if "--warmup" in a.option_strings)
        repeats = next(a for a in parser._actions if "--repeats" in a.option_strings)
        assert ">= 3" in warmup.help and ">= 5" in repeats.help
        module = __import__(f"veca_ssl.bench.{name}", fromlist=["main"])
        with pytest.raises(SystemExit) as exc:
            module.main(["--warmup", "1"])
        assert exc.value.code == 2 and "--warmup >= 3" in capsys.readouterr().err
        # descriptions are whole paragraphs, never cut mid-sentence
        assert parser.description.rstrip().endswith("."), f"bench {name}: {parser.description[-60:]!r}"
    for cmd in ("train", "submit train", "submit eval"):
        options = {o for a in parsers[cmd]._actions for o in a.option_strings}
        assert not options & {"--out", "--output"}


def test_bench_speed_wording_says_faster_or_slower() -> None:
    from veca_ssl.bench.backbone import summarize, times_faster

    assert times_faster(2.3) == "2.30× faster" and times_faster(1 / 2.3) == "2.30× slower"
    rows = [{"resolution": 224, "model": m, "patches": 196, "cores": c, "latency_ms": t, "times_ms": [t] * 5,
             "speedup_vs_dense": s, "x_limit": 1.5, "peak_mem_mb": 0.4, "peak_mem_resolved": False}
            for m, c, t, s in (("vit", None, 10.0, 1.0), ("veca C8", 8, 20.0, 0.5), ("veca C64", 64, 23.0, 0.43))]
    text = "\n".join(summarize(rows))
    assert "C64 is 2.33× slower than dense" in text and "faster" not in text
    assert "peak memory under 1 MB at 224px" in text  # the tiny figure is explained, not left bare


def test_readme_cites_no_spec_or_missing_files() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "SPEC §" not in readme and "../" not in readme
    top = {p.name for p in ROOT.iterdir()}
    refs = re.findall(r"[`\s(]((?:[\w.-]+/)+[\w.-]+\.(?:ya?ml|py|md|txt|cfg|toml))", readme)
    checked = [r for r in refs if r.split("/")[0] in top]  # paths into the repository (not run outputs)
    assert any(r.startswith("configs/") for r in checked)
    for ref in checked:
        assert (ROOT / ref).exists(), f"README cites {ref}, which the repository does not have"


def test_bench_refuses_an_unwritable_output_dir_before_measuring(tmp_path, capsys) -> None:
    from veca_ssl.bench import backbone

    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit) as exc:
        backbone.main(["--quick", "--output-dir", str(tmp_path / "a_file" / "bench")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "--output-dir" in err and "cannot create it" in err
