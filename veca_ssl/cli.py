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
    "extract": ("eval.extract_cli", "extract frozen image/patch features of a dataset to shards"),
    "select": ("eval.selection", "pick the core width to deploy from an eval report and a latency budget"),
    "export": ("veca_ssl.export", "export a backbone at one core width: safetensors | torchscript | onnx | "
                                  "veca-reference"),
    "bench": ("veca_ssl.bench", "benchmarks: backbone | data | train | knn"),
    "submit": ("launchers.submit", "submit train/eval jobs to SLURM (or locally) through submitit"),
    "data": ("veca_ssl.data.cli", "dataset tools: make-shards | inspect"),
    "consolidate": ("veca_ssl.train.sharded_checkpoint",
                    "convert a sharded (FSDP2) training checkpoint into the single-file backbone export"),
}


def dispatch(commands: dict[str, tuple[str, str]], argv: list[str] | None, prog: str) -> int:
    """Run ``commands[argv[0]]``'s module ``main(argv[1:])`` (imported lazily), or print the usage.

    ``commands`` maps a sub-command to ``(module, one-line help)``; ``veca``, ``veca eval`` and
    ``veca bench`` all dispatch through here.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        lines = [f"usage: {prog} <command> [args...]", "", "commands:"]
        lines += [f"  {name:<9} {helptext}" for name, (_, helptext) in commands.items()]
        lines += ["", f"Run `{prog} <command> --help` for the options of one command."]
        print("\n".join(lines))
        return 0
    name, rest = argv[0], argv[1:]
    if name not in commands:
        print(f"{prog}: unknown command {name!r}; valid commands: {', '.join(commands)}", file=sys.stderr)
        return 2
    return int(importlib.import_module(commands[name][0]).main(rest) or 0)


def main(argv: list[str] | None = None) -> int:
    return dispatch(COMMANDS, argv, "veca")


if __name__ == "__main__":
    sys.exit(main())
