"""Every command example in README.md runs, as a user would type it, through the real CLI.

The examples are read from README.md's ```bash and ```python blocks at test time, so a new example is
covered as soon as it is written — or fails here until a rule below says how to run it. Rules:

- ``pip install …``: not run (no network in tests); the extras it names must exist in setup.cfg, and
  the test command must be the one CI runs (.ci/run).
- ``python -m pytest …``: not run (it is this suite); checked to be CI's command.
- ``veca train`` and ``torchrun … -m veca_ssl.train.main``: run for 2 steps of a tiny model
  (``TRAIN_TINY`` appended, so it wins over the example's values); torchrun with 1 process.
- ``veca eval``/``veca extract``: run with short probes and no speed measurement (``EVAL_FAST``).
- ``veca submit``: run with ``--dry-run`` (no cluster): everything is validated, nothing queued.
- ```python blocks: run with ``images`` defined.

Commands run in README order in one scratch directory (later examples use earlier outputs, e.g.
``outputs/quickstart``), which holds a link to the repository's ``configs/`` and small stand-ins for
the datasets the examples name (``PLACEHOLDERS``).
"""

from __future__ import annotations

import configparser
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

TRAIN_TINY = [
    "train.max_steps=2", "optim.batch_size_per_gpu=8", "data.num_workers=0", "train.progress=false",
    "model.overrides={embed_dim: 32, depth: 2, num_heads: 2}", "crops.global_size=32", "crops.local_size=16",
    "dino.head_out_dim=64", "dino.head_hidden_dim=64", "dino.head_bottleneck_dim=32", "ibot.head_out_dim=64",
    "train.checkpoint_every=1000",
]
EVAL_FAST = {
    "knn": ["--no-speed", "--no-progress"],
    "linear": ["--epochs", "1", "--epoch-length", "5", "--no-speed", "--no-progress"],
    "logreg": ["--cs", "1", "--max-iter", "50", "--no-speed", "--no-progress"],
    "dense": ["--epochs", "1", "--no-speed", "--no-progress"],
    "all": ["linear.epochs=1", "linear.epoch_length=5", "logreg.cs=[1.0]", "speed.enabled=false"],
    "extract": ["--no-progress"],
}
# README text -> what stands in for it here ({ws} is the scratch directory)
PLACEHOLDERS = {
    "configs/experiments/<your experiment>.yaml": "configs/experiments/synthetic64_veca_tiny.yaml",
    "imagefolder:/data/in1k/": "imagefolder:{ws}/data/in1k/",
    "folder:/ade@": "folder:{ws}/ade@",
    "--checkpoint CKPT": "--checkpoint outputs/quickstart",
}
PYTHON_PRELUDE = "import torch\nimages = torch.randn(2, 3, 64, 64)\n"


@dataclass
class Example:
    """One README example: a shell command line (continuations joined) or a python block."""

    kind: str  # "bash" | "python"
    text: str
    line: int

    @property
    def id(self) -> str:
        words = self.text.split()[:4] if self.kind == "bash" else ["python", "block"]
        return f"L{self.line}:" + " ".join(words)


def readme_examples() -> list[Example]:
    text = README.read_text()
    out: list[Example] = []
    for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M):
        lang, body = m.group(1), m.group(2)
        first = text[: m.start()].count("\n") + 2
        if lang == "python":
            out.append(Example("python", body, first))
        elif lang in ("bash", "sh", "shell", "console"):
            lines, start = "", first
            for i, raw in enumerate(body.splitlines()):
                if not lines:
                    start = first + i
                lines += raw.rstrip()
                if lines.endswith("\\"):
                    lines = lines[:-1] + " "
                    continue
                if lines.strip() and not lines.strip().startswith("#"):
                    out.append(Example("bash", lines.strip(), start))
                lines = ""
        else:
            raise AssertionError(f"README block at line {first} is ```{lang}: add a rule for it here")
    return out


EXAMPLES = readme_examples()


def _ci_test_command() -> str:
    line = next(x for x in (ROOT / ".ci" / "run").read_text().splitlines() if "pytest" in x and "pip" in x)
    return line.strip()


def _make_fixtures(ws: Path) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):  # a 2-class ImageNet-style folder
        for cls in ("n01", "n02"):
            d = ws / "data" / "in1k" / split / cls
            d.mkdir(parents=True)
            for i in range(6):
                Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(d / f"{i}.jpg")
    for split in ("training", "validation"):  # an ADE20K-style segmentation folder
        (ws / "ade" / "images" / split).mkdir(parents=True)
        (ws / "ade" / "annotations" / split).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(
                ws / "ade" / "images" / split / f"{i}.jpg")
            mask = np.zeros((32, 32), np.uint8)
            mask[:, 16:], mask[16:, :8] = 1 + i % 3, 4
            Image.fromarray(mask).save(ws / "ade" / "annotations" / split / f"{i}.png")
    (ws / "configs").symlink_to(ROOT / "configs")  # the README runs from a checkout


class Runner:
    """Runs the README's examples in order in one scratch directory; each at most once."""

    def __init__(self, ws: Path) -> None:
        self.ws, self.done = ws, 0
        self.results: dict[int, tuple[list[str], subprocess.CompletedProcess]] = {}
        self.env = {**os.environ, "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1"}

    def upto(self, index: int) -> tuple[list[str], subprocess.CompletedProcess | None]:
        while self.done <= index:
            ex = EXAMPLES[self.done]
            runs = self._runs(ex)
            for argv in runs:
                proc = subprocess.run(argv, cwd=self.ws, env=self.env, capture_output=True, text=True, timeout=600)
                self.results[self.done] = (argv, proc)
                if proc.returncode != 0:
                    break
            self.done += 1
        return self.results.get(index, ([], None))

    def _substitute(self, text: str) -> str:
        for old, new in PLACEHOLDERS.items():
            text = text.replace(old, new.format(ws=self.ws))
        return text

    def _runs(self, ex: Example) -> list[list[str]]:
        if ex.kind == "python":
            return [[sys.executable, "-c", PYTHON_PRELUDE + ex.text]]
        runs = []
        for part in " ".join(shlex.split(self._substitute(ex.text), comments=True)).split(" && "):
            argv = shlex.split(part)
            if argv[:2] == ["pip", "install"]:
                _check_pip_install(argv)
            elif argv[:3] == ["python", "-m", "pytest"]:
                assert ex.text.strip() == _ci_test_command(), f"README test command {ex.text!r} is not CI's"
            elif argv[0] == "veca":
                runs.append(self._veca(argv))
            elif argv[0] == "torchrun":
                runs.append(self._torchrun(argv))
            else:
                raise AssertionError(f"README line {ex.line}: no rule to run {argv[0]!r} examples; add one here")
        return runs

    def _veca(self, argv: list[str]) -> list[str]:
        cli = [sys.executable, "-m", "veca_ssl.cli"]
        cmd = argv[1]
        if cmd == "train":
            return cli + argv[1:] + TRAIN_TINY
        if cmd == "eval":
            return cli + argv[1:] + EVAL_FAST[argv[2]]
        if cmd == "extract":
            return cli + argv[1:] + EVAL_FAST["extract"]
        if cmd == "submit":
            return cli + argv[1:] + ([] if "--dry-run" in argv else ["--dry-run"])
        raise AssertionError(f"no rule to run `veca {cmd}` examples; add one in tests/test_readme_examples.py")

    def _torchrun(self, argv: list[str]) -> list[str]:
        args = argv[1:]
        if "--nproc-per-node" in args:  # one CPU process here; 2-process training is tested elsewhere
            args[args.index("--nproc-per-node") + 1] = "1"
        return [sys.executable, "-m", "torch.distributed.run", *args, *TRAIN_TINY]


def _check_pip_install(argv: list[str]) -> None:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    extras = set(cfg["options.extras_require"])
    for arg in argv[2:]:
        m = re.fullmatch(r"\.(?:\[([\w,]+)\])?", arg.strip("'\""))
        if m and m.group(1):
            unknown = set(m.group(1).split(",")) - extras
            assert not unknown, f"README installs unknown extras {unknown}; setup.cfg has {sorted(extras)}"
    assert argv[2].startswith("torch==") and argv[2] in _ci_test_command(), "README pins a torch CI does not"


@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory) -> Runner:
    ws = tmp_path_factory.mktemp("readme")
    _make_fixtures(ws)
    return Runner(ws)


def test_readme_has_examples_and_two_commands_at_the_top() -> None:
    kinds = [e.kind for e in EXAMPLES]
    assert kinds.count("bash") >= 10 and "python" in kinds
    top = [e.text for e in EXAMPLES[:2]]
    assert top[0].startswith("pip install") and "veca train --config quickstart" in top[0]
    assert top[1] == _ci_test_command()


@pytest.mark.parametrize("index", range(len(EXAMPLES)), ids=[e.id for e in EXAMPLES])
def test_readme_example_runs(index: int, runner: Runner) -> None:
    argv, proc = runner.upto(index)
    if proc is None:
        return  # checked statically (pip, pytest)
    shown = " ".join(shlex.quote(a) for a in argv)
    assert proc.returncode == 0, f"{shown}\nexit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    example = EXAMPLES[index].text
    if example.startswith("veca submit"):
        assert "#SBATCH" in proc.stdout or "executor parameters" in proc.stdout
    if example.startswith("pip install torch==2.13.0 -e . && veca train --config quickstart"):
        assert "k-NN top-1" in proc.stdout and "outputs/quickstart" in proc.stdout  # the main job's promise
