"""The README's evaluation examples, run as written (paths swapped for a tiny trained-looking run).

The ``veca eval knn/linear``, ``veca select``, ``veca extract`` and Python lines run for real on digits;
the lines that need data or a cluster this machine lacks (an ADE20K folder, SLURM) are parsed and
checked exactly as their commands would before starting.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _section(title: str) -> str:
    start = README.index(title)
    nxt = README.find("\n## ", start + 1)
    return README[start:nxt if nxt > 0 else None]


def _blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def _commands(block: str) -> list[list[str]]:
    """Shell lines of a block (continuations joined, comments dropped) as argv lists."""
    joined = block.replace("\\\n", " ")
    return [shlex.split(line, comments=True) for line in joined.splitlines() if line.strip()]


@pytest.fixture()
def workdir(tmp_path, monkeypatch):
    """``outputs/quickstart`` as a tiny run (export + config.yaml at 32 px) in a fresh working directory."""
    from veca_ssl.models import build_backbone, save_backbone

    torch.manual_seed(0)
    run = tmp_path / "outputs" / "quickstart"
    save_backbone(build_backbone("veca_tiny", patch_size=8, num_cores=16, depth=1, embed_dim=32, num_heads=2),
                  run / "export" / "teacher.safetensors")
    (run / "config.yaml").write_text("crops: {global_size: 32}\n")
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_evaluation_section_commands_run(workdir) -> None:
    from eval.cli import main as eval_main
    from eval.config import load_config, parse_protocol_args
    from eval.extract_cli import main as extract_main
    from eval.selection import main as select_main

    lines = _commands(_blocks(_section("## Evaluation"), "bash")[0])
    assert [argv[:3] for argv in lines][:5] == [["veca", "eval", p] for p in ("knn", "linear", "logreg", "dense",
                                                                                 "all")]
    for argv in lines:
        assert argv[0] == "veca"
        if argv[1:3] in (["eval", "knn"], ["eval", "linear"]):
            assert eval_main(argv[2:]) == 0
        elif argv[1:3] in (["eval", "logreg"], ["eval", "dense"]):
            parse_protocol_args(argv[2], argv[3:])  # options as the command checks them (no ADE20K here)
        elif argv[1:3] == ["eval", "all"]:
            load_config(argv[argv.index("--config") + 1])
        elif argv[1] == "select":
            assert select_main(argv[2:] + ["--speed-repeats", "2"]) == 0
        elif argv[1] == "extract":
            assert extract_main(argv[2:]) == 0
        else:
            raise AssertionError(f"unexpected README command {argv}")
    selection = json.loads((workdir / "outputs/eval/linear/selection.json").read_text())
    manifest = json.loads((workdir / "outputs/features/manifest.json").read_text())
    assert manifest["width"] == selection["width"] and manifest["resolution"] == 32 == selection["resolution"]
    assert json.loads((workdir / "outputs/eval/knn/report.json").read_text())["resolution"] == 32  # from the run


def test_select_section_commands_parse() -> None:
    from eval.options import check_fields, from_mapping, namespace_to_mapping
    from eval.selection import SelectOptions, build_parser

    text = _section("### Choosing the width to deploy")
    for argv in _commands(_blocks(text, "bash")[0]):
        assert argv[:2] == ["veca", "select"]
        data = namespace_to_mapping(build_parser().parse_args(argv[2:]))
        data.pop("model", None)
        check_fields(from_mapping(SelectOptions, data))


def test_python_example_runs(workdir) -> None:
    code = _blocks(_section("## Evaluation"), "python")[0]
    code = code.replace("LinearProbeConfig(epochs=5)", "LinearProbeConfig(epochs=1)")  # the one speed-up
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    result = scope["result"]
    assert result.run_dir == Path("outputs/eval/py") and (result.run_dir / "report.json").is_file()
    assert [r["width"] for r in result.rows] == ["C8", "C16"]
    assert all("knn_k20_top1" in r and "linear_top1" in r for r in result.rows)


def test_submit_eval_example_is_accepted_and_the_old_one_refused(tmp_path) -> None:
    from launchers import submit

    block = next(b for b in _blocks(README, "bash") if "veca submit eval knn" in b)
    argv = _commands(block)[0]
    assert "--test" in argv and "--val" not in argv
    args, rest = submit.build_parser("eval").parse_known_args(argv[3:])
    assert args.protocol == "knn" and rest[rest.index("--test") + 1] == "imagefolder:/data/in1k/val"
    from eval.config import parse_protocol_args

    parse_protocol_args("knn", rest)  # what `veca submit eval` checks before queueing (paths aside)
    old = [a if a != "--test" else "--val" for a in rest]
    with pytest.raises(SystemExit):
        parse_protocol_args("knn", old)
