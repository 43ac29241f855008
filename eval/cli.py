"""``veca eval <protocol>``: parse the options (before torch is imported), run, end errors in one line.

``knn | linear | logreg | dense`` take their options from ``eval.config`` and run through
``eval.run.evaluate``; ``all`` reads a YAML config (``eval.all``). A user error — bad option, bad
config value, missing file, unreadable checkpoint or data — ends with ``<prog>: error: <message>`` on
stderr and exit status 2; ``--debug`` (or ``VECA_DEBUG=1``) shows the traceback instead.
"""

from __future__ import annotations

import os
import pickle
import sys
from collections.abc import Callable, Sequence

from eval.config import PROTOCOL_INFO, parse_protocol_args
from eval.options import debug_requested

COMMANDS: dict[str, str] = {**{p: info[0] for p, info in PROTOCOL_INFO.items()},
                            "all": "every protocol of a YAML config (configs/eval/*.yaml), one report"}

#: Exit status of a user error (argparse uses the same).
USAGE_ERROR = 2


def is_user_error(exc: BaseException) -> bool:
    """Errors caused by options, files or data (one-line message), as opposed to bugs (traceback).

    RuntimeError counts: torch reports a foreign checkpoint's mismatched weights and the data layer an
    unreadable dataset with it.
    """
    if isinstance(exc, NotImplementedError | RecursionError):
        return False
    return isinstance(exc, ValueError | OSError | RuntimeError | pickle.UnpicklingError)


def error_message(exc: BaseException) -> str:
    """The exception as one line (first line of its message, or its type when it has none)."""
    from veca_ssl.fileio import describe_os_error

    text = describe_os_error(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    if type(exc).__name__ == "OutOfMemoryError":
        first += " — lower --batch-size"
    return first


def run_user_command(prog: str, fn: Callable[[], int | None], argv: Sequence[str] | None = None) -> int:
    """Run ``fn``; a user error prints one line and returns 2, Ctrl-C prints one line and returns 130."""
    debug = debug_requested(argv) or os.environ.get("VECA_DEBUG", "") not in ("", "0")
    try:
        return int(fn() or 0)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if debug or not is_user_error(exc):
            raise
        print(f"{prog}: error: {error_message(exc)}", file=sys.stderr)
        return USAGE_ERROR


def protocol_main(protocol: str, argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """``veca eval <protocol> ARGS``."""
    prog = prog or f"veca eval {protocol}"
    argv = list(sys.argv[1:] if argv is None else argv)

    def body() -> int:
        cfg, _ = parse_protocol_args(protocol, argv, prog)
        from eval.run import evaluate  # torch: only after the options parsed

        evaluate(cfg)
        return 0

    return run_user_command(prog, body, argv)


def check_argv(argv: Sequence[str]) -> None:
    """Reject now what ``veca eval ARGV`` would reject when it starts: options (argparse exits with status
    2 and one line), values, the checkpoint and dataset paths, and an earlier report in the output
    directory. ``veca submit eval`` calls it before queueing; nothing is loaded or written."""
    from eval.common import check_paths, guard_output

    protocol, rest = argv[0], list(argv[1:])
    if protocol == "all":
        from eval.all import build_parser as all_parser
        from eval.config import load_config

        args = all_parser().parse_args(rest)
        cfg = load_config(args.config, args.overrides)
    elif protocol in PROTOCOL_INFO:
        cfg, _ = parse_protocol_args(protocol, rest)
    else:
        raise ValueError(f"unknown protocol {protocol!r}; valid: {', '.join(COMMANDS)}")
    check_paths(cfg)
    guard_output(cfg.run_dir, cfg.overwrite, "yaml" if protocol == "all" else "cli")


def usage() -> str:
    lines = ["usage: veca eval <protocol> [options]", "", "protocols:"]
    lines += [f"  {name:<7} {text}" for name, text in COMMANDS.items()]
    lines += ["", "Run `veca eval <protocol> --help` for the options of one protocol."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name == "all":
        from eval.all import main as all_main

        return all_main(rest)
    if name not in PROTOCOL_INFO:
        print(f"veca eval: error: unknown protocol {name!r}; valid: {', '.join(COMMANDS)}", file=sys.stderr)
        return USAGE_ERROR
    return protocol_main(name, rest)


if __name__ == "__main__":
    sys.exit(main())
