"""Every command example in README.md runs, as a user would type it, through the real CLI.

The examples are read from README.md's ```bash and ```python blocks at test time, so a new example is
covered as soon as it is written — or fails here until a rule below says how to run it. Rules:

- ``pip install …``: not run (no network in tests); the extras it names must exist in setup.cfg, and
  the test command must be the one CI runs (.ci/run).
- ``python -m pytest …``: not run (it is this suite); checked to be CI's command.
- ``veca train`` and ``torchrun … -m veca_ssl.train.main``: run for 2 steps of a tiny model
  (``TRAIN_TINY`` appended, so it wins over the example's values; the k-NN monitor stays on only in
  the README's first command, whose k-NN table is checked); torchrun with 1 process.
- ``veca eval``/``veca extract``: run with short probes (``EVAL_FAST``); on the stand-ins for released
  checkpoints at 64 px unless the example sets ``--resolution``.
- ``veca export``, ``veca data``, ``veca consolidate``: run as written (the README's checkpoint of step
  10000 stands for the newest checkpoint the 2-step torchrun example wrote: a single-file one, as one
  process here runs without FSDP2; the sharded path is tested in tests/test_parallel.py).
- ``veca select``: run as written, except that a ``--max-latency-ms`` budget (a property of the
  machine, not of the example) is lifted so that it is met here.
- ``veca submit``: run with ``--dry-run`` (no cluster): everything is validated, nothing queued.
- ```python blocks: run with ``images`` defined.
- An example whose comment says ``pip install -e ".[X]"`` runs when extra X is installed; without it,
  it must stop with one message naming ``[X]`` (no traceback).
- ``model.init_from=FILE`` examples keep the checkpoint's width (only the depth is cut to 2).
- A ``veca train`` example that does not name its ``output_dir`` and would share one with an earlier
  example gets its own (the examples are independent; a resume with another config is refused).
- A ``veca train`` example whose config trains on a dataset path of the user's (absent here) gets a
  stand-in of the same kind (``DATASET_STAND_INS``), so the rest of that config is still exercised.

Commands run in README order in one scratch directory (later examples use earlier outputs, e.g.
``outputs/quickstart``), which holds a link to the repository's ``configs/`` and small stand-ins for
the datasets the examples name (``PLACEHOLDERS``); see ``Runner`` for how they are launched.
"""

from __future__ import annotations

import configparser
import json
import os
import re
import shlex
import subprocess
import sys
import time
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
    "train.checkpoint_every=1000", "train.knn_monitor.enabled=false",
]
MAIN_JOB_KEEPS = ["train.knn_monitor.enabled=false"]  # the README's first command promises the k-NN table
EVAL_FAST = {
    # knn/linear/logreg keep their latency columns: `veca select --latency-from-report` reads them
    "knn": ["--no-progress"],
    "linear": ["--epochs", "1", "--epoch-length", "5", "--no-progress"],
    "logreg": ["--cs", "1", "--max-iter", "50", "--no-progress"],
    "dense": ["--epochs", "1", "--no-speed", "--no-progress"],
    "all": ["linear.epochs=1", "linear.epoch_length=5", "logreg.cs=[1.0]", "speed.enabled=false"],
    "extract": ["--no-progress"],
}
# README text -> what stands in for it here ({ws} is the scratch directory)
PLACEHOLDERS = {
    "configs/experiments/<your experiment>.yaml": "configs/experiments/synthetic64_veca_tiny.yaml",
    # make-shards of the 32 stand-in images writes one shard, not ImageNet's 1282
    "/data/in1k-wds/shard-{000000..001281}.tar": "{ws}/data/in1k-wds/shard-{{000000..000000}}.tar",
    "/data/in1k": "{ws}/data/in1k",
    "folder:/data/ade@": "folder:{ws}/ade@",
    "folder:/ade@": "folder:{ws}/ade@",
    "--checkpoint CKPT": "--checkpoint outputs/quickstart",
    "path/to/veca-ssl": str(ROOT),
    "--checkpoint outputs/run ": "--checkpoint veca_base.pt ",  # a checkpoint with width 32
    "--features teacher ...": "--features teacher --data imagefolder:{ws}/data/in1k/val --output-dir feats_t/",
    "runs/vecaS16/checkpoints/checkpoint-00010000": "runs/vecaS16/checkpoints/checkpoint-00000002.pt",
}
# stand-ins for released VECA checkpoints (reference layout {"student", "config"}; depth cut to 2
# where the example allows it: the torch.hub one is checked against the full veca_small preset)
REFERENCE_CHECKPOINTS = {  # file: (family, depth, cores, output projection, wrapping)
    "veca_base.pt": ("base", 2, 32, None, "student"),
    "veca_small_distilled.pt": ("small", 2, 32, 768, "module.student"),
    "veca_s.pt": ("small", 12, 64, None, "student"),
}
# dataset kind -> stand-in, for experiment configs that name the user's own dataset path
DATASET_STAND_INS = {"imagefolder": "imagefolder:{ws}/data/in1k", "wds": "wds:{ws}/wds/shard-{{000000..000003}}.tar"}
# import names of the packages an extra installs, where they differ from the requirement's name
EXTRA_MODULES = {"faiss-cpu": "faiss", "faiss-gpu": "faiss"}
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
            for i in range(16 if split == "train" else 6):  # train: 32 images, 4 batches of 8 as shards
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
    import torch

    from tests.test_reference_veca import checkpoint, reference_state
    from veca_ssl.data import make_shards

    make_shards(str(ws / "data" / "in1k" / "train"), ws / "wds", shard_size=8, progress=False)  # 4 shards

    for name, (family, depth, cores, out_dim, wrap) in REFERENCE_CHECKPOINTS.items():
        sd = reference_state(family, depth=depth, num_cores=cores, out_dim=out_dim)
        extra = {"distill_output_dim": out_dim} if out_dim else {}
        torch.save(checkpoint(sd, family, wrap, nested_budgets=tuple(range(8, cores + 1, 8)), **extra), ws / name)


_DRIVER = r"""
import json, os, sys, tempfile, time, traceback
from veca_ssl.cli import main

results = []
for kind, payload in json.load(open(sys.argv[1])):
    out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    sys.stdout.flush(), sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    os.dup2(out.fileno(), 1), os.dup2(err.fileno(), 2)  # file descriptors: C-level output is caught too
    t0 = time.perf_counter()
    try:
        if kind == "veca":
            code = main(payload)
        else:
            exec(compile(payload, "README.md python block", "exec"), {"__name__": "__readme__"})
            code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush(), sys.stderr.flush()
        os.dup2(saved[0], 1), os.dup2(saved[1], 2)
    out.seek(0), err.seek(0)
    results.append({"code": code, "stdout": out.read(), "stderr": err.read(), "seconds": time.perf_counter() - t0})
json.dump(results, open(sys.argv[2], "w"))
"""


@dataclass
class Result:
    shown: str  # the command as run
    code: int
    stdout: str
    stderr: str
    seconds: float


class Runner:
    """Runs the README's examples in order in one scratch directory, each once.

    ``veca …`` commands and python blocks run in one fresh interpreter per stretch of consecutive
    examples, through ``veca_ssl.cli.main`` — the function the ``veca`` console script calls — with
    their output captured at the file-descriptor level; this spares a torch import per example.
    Other programs (torchrun) run as their own process.
    """

    def __init__(self, ws: Path) -> None:
        self.ws = ws
        self.env = {**os.environ, "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1"}
        self.plans: list[list[tuple[str, object, str | None]] | AssertionError] = []
        self._train_outputs: set[str] = set()  # output_dir of every training example planned so far
        for ex in EXAMPLES:
            try:
                self.plans.append(self._plan(ex))
            except AssertionError as exc:  # reported by that example's test
                self.plans.append(exc)
        self.results: dict[int, list[Result]] = {}
        self._run_all()

    def _run_all(self) -> None:
        batch: list[tuple[int, str, object]] = []
        for index, plan in enumerate(self.plans):
            for kind, payload, _ in plan if isinstance(plan, list) else []:
                if kind == "external":
                    self._flush(batch)
                    t0 = time.perf_counter()
                    proc = subprocess.run(payload, cwd=self.ws, env=self.env, capture_output=True, text=True,
                                          timeout=900)
                    self.results.setdefault(index, []).append(
                        Result(shlex.join(payload), proc.returncode, proc.stdout, proc.stderr, time.perf_counter() - t0))
                else:
                    batch.append((index, kind, payload))
        self._flush(batch)

    def _flush(self, batch: list[tuple[int, str, object]]) -> None:
        if not batch:
            return
        todo, done = self.ws / "driver_in.json", self.ws / "driver_out.json"
        todo.write_text(json.dumps([[kind, payload] for _, kind, payload in batch]))
        proc = subprocess.run([sys.executable, "-c", _DRIVER, str(todo), str(done)], cwd=self.ws, env=self.env,
                              capture_output=True, text=True, timeout=1800)
        assert proc.returncode == 0, f"README driver failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        for (index, kind, payload), res in zip(batch, json.loads(done.read_text())):
            shown = "veca " + shlex.join(payload) if kind == "veca" else "python block"
            self.results.setdefault(index, []).append(
                Result(shown, res["code"], res["stdout"], res["stderr"], res["seconds"]))
        batch.clear()

    def _substitute(self, text: str) -> str:
        """One pass, longest placeholder first, so a replacement is never replaced again."""
        olds = sorted(PLACEHOLDERS, key=len, reverse=True)
        pattern = re.compile("|".join(re.escape(o) for o in olds))
        return pattern.sub(lambda m: PLACEHOLDERS[m.group(0)].format(ws=self.ws), text)

    def _plan(self, ex: Example) -> list[tuple[str, object, str | None]]:
        """(kind, payload, extra): ``extra`` names an extra the example needs that is not installed,
        so the example must fail with a message naming it."""
        if ex.kind == "python":
            return [("python", self._substitute(PYTHON_PRELUDE + ex.text), None)]
        needs = re.search(r"#.*pip install (?:-e )?[\"']?\.\[(\w+)\]", ex.text)
        missing = needs.group(1) if needs and not _extra_installed(needs.group(1)) else None
        steps: list[tuple[str, object, str | None]] = []
        for part in " ".join(shlex.split(self._substitute(ex.text), comments=True)).split(" && "):
            argv = shlex.split(part)
            if argv[:2] == ["pip", "install"]:
                _check_pip_install(argv)
            elif argv[:3] == ["python", "-m", "pytest"]:
                assert ex.text.strip() == _ci_test_command(), f"README test command {ex.text!r} is not CI's"
            elif argv[0] == "veca":
                args = self._veca(argv[1:])
                if ex is EXAMPLES[0]:
                    args = [a for a in args if a not in MAIN_JOB_KEEPS]
                steps.append(("veca", args, missing))
            elif argv[0] == "torchrun":
                steps.append(("external", self._torchrun(argv), missing))
            else:
                raise AssertionError(f"README line {ex.line}: no rule to run {argv[0]!r} examples; add one here")
        return steps

    def _veca(self, args: list[str]) -> list[str]:
        cmd = args[0]
        if cmd == "train":
            args = args + self._dataset_stand_in(args) + self._own_output_dir(args)
            if any(a.startswith("model.init_from=") for a in args):  # the checkpoint fixes the width
                return args + [a for a in TRAIN_TINY if not a.startswith("model.overrides=")] + [
                    "model.overrides={depth: 2}"]
            return args + TRAIN_TINY
        stand_in = any(a in REFERENCE_CHECKPOINTS for a in args)  # base-width networks: keep them cheap
        small = ["--resolution", "64"] if stand_in and "--resolution" not in args else []
        if cmd == "eval":
            return args + EVAL_FAST[args[1]] + (small if args[1] != "all" else [])
        if cmd == "extract":
            return args + EVAL_FAST["extract"] + small
        if cmd in ("export", "data", "consolidate"):
            return args
        if cmd == "select":
            if "--max-latency-ms" in args:
                args = list(args)
                args[args.index("--max-latency-ms") + 1] = "100000"
            return args
        if cmd == "submit":
            return args + ([] if "--dry-run" in args else ["--dry-run"])
        raise AssertionError(f"no rule to run `veca {cmd}` examples; add one in tests/test_readme_examples.py")

    def _own_output_dir(self, args: list[str]) -> list[str]:
        """README examples are independent illustrations: one that does not name its output_dir and
        would land in the run of an earlier example (with another config, which a resume refuses)
        gets a directory of its own. Named directories are left alone (reusing one means resuming)."""
        from omegaconf import OmegaConf

        from veca_ssl.config import resolve_config_path

        named = [a.split("=", 1)[1] for a in args if a.startswith("output_dir=")]
        if named:
            self._train_outputs.add(named[-1])
            return []
        name = args[args.index("--config") + 1] if "--config" in args else "quickstart"
        out = str(OmegaConf.select(OmegaConf.load(resolve_config_path(name)), "output_dir", default="outputs/run"))
        if out not in self._train_outputs:
            self._train_outputs.add(out)
            return []
        fresh = f"{out}_example{len(self._train_outputs)}"
        self._train_outputs.add(fresh)
        return [f"output_dir={fresh}"]

    def _dataset_stand_in(self, args: list[str]) -> list[str]:
        """``data.train=<stand-in>`` when the example's config reads an absolute path that is not here."""
        from omegaconf import OmegaConf

        from veca_ssl.config import resolve_config_path

        if any(a.startswith("data.train=") for a in args):
            return []
        name = args[args.index("--config") + 1] if "--config" in args else "quickstart"
        spec = str(OmegaConf.select(OmegaConf.load(resolve_config_path(name)), "data.train", default=""))
        kind, _, path = spec.partition(":")
        if not path.startswith("/") or Path(path.split("{")[0]).parent.exists():
            return []
        assert kind in DATASET_STAND_INS, f"{name} trains on {spec}: add a {kind} stand-in to DATASET_STAND_INS"
        return [f"data.train={DATASET_STAND_INS[kind].format(ws=self.ws)}"]

    @staticmethod
    def _torchrun(argv: list[str]) -> list[str]:
        args = argv[1:]
        if "--nproc-per-node" in args:  # one CPU process here; 2-process training is tested elsewhere
            args[args.index("--nproc-per-node") + 1] = "1"
        return [sys.executable, "-m", "torch.distributed.run", *args, *TRAIN_TINY]


def _extra_installed(extra: str) -> bool:
    from veca_ssl.optional import available

    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    reqs = [re.split(r"[<>=!~\[;\s]", r)[0] for r in cfg["options.extras_require"][extra].split()]
    return all(available(EXTRA_MODULES.get(r, r.replace("-", "_"))) for r in reqs)


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
def test_readme_example_runs(index: int, runner: Runner, record_property) -> None:
    plan = runner.plans[index]
    if isinstance(plan, AssertionError):
        raise plan
    results = runner.results.get(index, [])
    assert len(results) == len(plan)  # pip / pytest parts are checked statically and not run
    for res, (_, _, missing) in zip(results, plan):
        record_property("seconds", round(res.seconds, 2))  # in --junitxml reports: which example is slow
        if missing:  # the extra is not installed: one clear message naming it
            assert res.code != 0 and f"[{missing}]" in res.stderr and "Traceback" not in res.stderr, res.stderr
            continue
        assert res.code == 0, f"{res.shown}\nexit {res.code}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
        assert "Traceback" not in res.stderr, res.stderr[-3000:]
    example = EXAMPLES[index].text
    if example.startswith("veca submit"):
        assert "#SBATCH" in results[0].stdout or "executor parameters" in results[0].stdout
    if example.startswith("pip install torch==2.13.0 -e . && veca train --config quickstart"):
        # the promise: per width, k-NN and the probe of the trained network next to the untrained one and raw pixels
        out = results[0].stdout
        assert "weighted k-NN" in out and "untrained network and raw pixels" in out and "outputs/quickstart" in out
