"""The ``veca`` console command.

Every sub-command lives in its own module exposing ``main(argv: list[str] | None) -> int | None``;
this file only dispatches, importing the target lazily so ``veca --help`` stays fast.
"""

from __future__ import annotations

import importlib
import sys

# sub-command -> (module, one-line help). Nested groups (eval, bench, data) dispatch again.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("veca_ssl.train.main", "pretrain (self-supervised or distillation) from a YAML config"),
    "eval": ("eval.cli", "evaluate a backbone at every core width: knn | linear | logreg | dense | all"),
    "extract": ("eval.extract", "extract frozen image/patch features of a dataset to shards"),
    "bench": ("veca_ssl.bench", "benchmarks: backbone | data | train | knn"),
    "submit": ("launchers.submit", "submit train/eval jobs to SLURM (or locally) through submitit"),
    "data": ("veca_ssl.data.cli", "dataset tools: make-shards | inspect"),
}


def _usage() -> str:
    lines = ["usage: veca <command> [args...]", "", "commands:"]
    lines += [f"  {name:<9} {helptext}" for name, (_, helptext) in COMMANDS.items()]
    lines += ["", "Run `veca <command> --help` for the options of one command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"veca: unknown command {name!r}; valid commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    result = module.main(rest)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
