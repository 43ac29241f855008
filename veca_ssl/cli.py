"""The ``veca`` console command.

Every sub-command lives in its own module exposing ``main(argv: list[str] | None) -> int | None``;
this file only dispatches, importing the target lazily so ``veca --help`` stays fast. It also holds
the help formatter every ``veca`` parser uses (this module imports nothing heavy, so a parser built
with it can print ``--help`` before torch is imported).
"""

from __future__ import annotations

import argparse
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
    # the bench list mirrors veca_ssl.bench.BENCHES (a test keeps them equal); the library layer does
    # not import the bench package, so it is spelled out here
    "bench": ("veca_ssl.bench", "benchmarks: backbone | data | train | knn | ddp"),
    "submit": ("launchers.submit", "submit train/eval jobs to SLURM (or locally) through submitit"),
    "data": ("veca_ssl.data.cli", "dataset tools: make-shards | inspect"),
    "consolidate": ("veca_ssl.consolidate",
                    "convert a sharded (FSDP2) training checkpoint into the single-file backbone export"),
    "doctor": ("veca_ssl.bench.doctor", "check this machine end to end (versions, attention kernels, bf16, "
                                        "speed and memory goals, compile, faiss, stop/resume): one table"),
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Help layout of every ``veca`` command: descriptions keep their line breaks and paragraphs, and
    each option shows its default (unless it has none, is a plain on/off flag, or names it already)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (default is None or default is False or default == [] or default is argparse.SUPPRESS
                or "%(default)" in text or "default" in text.lower()):
            return text
        if not action.option_strings and action.nargs not in ("?", "*"):
            return text  # a required positional has no default to show
        return f"{text} (default: %(default)s)"


def dispatch(commands: dict[str, tuple[str, str]], argv: list[str] | None, prog: str) -> int:
    """Run ``commands[argv[0]]``'s module ``main(argv[1:])`` (imported lazily), or print the usage.

    ``commands`` maps a sub-command to ``(module, one-line help)``; ``veca``, ``veca eval`` and
    ``veca bench`` all dispatch through here.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        lines = [f"usage: {prog} <command> [args...]", "", "commands:"]
        width = max(map(len, commands))
        lines += [f"  {name:<{width}} {helptext}" for name, (_, helptext) in commands.items()]
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
