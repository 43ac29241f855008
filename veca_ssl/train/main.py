"""``veca train --config FILE [key=value ...]`` (also ``python -m veca_ssl.train.main``).

Every failure ends as one message on stderr and a non-zero exit, without a traceback: 2 for what the
user can fix (a config value, a locked or unusable output directory, a refused resume, a diverged
run, a full disk), 1 for anything unexpected, 130 after a second Ctrl-C. ``--debug`` shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import sys

from veca_ssl.config import ConfigError, load_config

PROG = "veca train"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Pretrain a VECA backbone (self-supervised or distillation).")
    p.add_argument("--config", default="quickstart",
                   help="experiment YAML (a path, or a name under configs/, e.g. quickstart)")
    p.add_argument("--debug", action="store_true", help="on an error, show the Python traceback too")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.epochs=10")
    return p


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors whose message already says what happened and what to do."""
    from veca_ssl.data.errors import DataError
    from veca_ssl.train.checkpoint import CheckpointError
    from veca_ssl.train.lock import RunLockedError
    from veca_ssl.train.loop import NonFiniteLossError
    from veca_ssl.train.metrics import MetricsWriteError

    # DataError: too many unusable samples, a half-replaced shard set, ...
    return ConfigError, CheckpointError, RunLockedError, NonFiniteLossError, MetricsWriteError, DataError


def _train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    from veca_ssl import distributed as dist
    from veca_ssl import signals
    from veca_ssl.train.loop import train
    from veca_ssl.train.monitor import KnnMonitor

    signals.install_preemption_handler()
    try:
        summary = train(cfg)
    finally:
        dist.cleanup()
    if "knn" in summary:
        print("\nk-NN top-1 (%) of the EMA teacher on the monitor split, per core width:")
        print(KnnMonitor.table(summary["knn"]))
    if "distill_report" in summary:
        from veca_ssl.train.distill_report import report_table

        print("\nstudent (EMA) vs frozen teacher, per core width:")
        print(report_table(summary["distill_report"]))
    if "export" in summary:
        print(f"\noutputs: {summary['output_dir']} (config.yaml, metrics.jsonl, tensorboard/, checkpoints/); "
              f"teacher backbone: {summary['export']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _train(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"{PROG}: interrupted by a second stop signal before the step ended; the checkpoints on disk are "
              f"intact: rerun the same command to resume from the newest", file=sys.stderr)
        return 130
    except ConfigError as exc:
        if args.debug:
            raise
        print(f"{PROG}: config error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        if args.debug:
            raise
        if isinstance(exc, _user_errors()):
            from veca_ssl.data.errors import DataError

            kind = "data error: " if isinstance(exc, DataError) else ""
            print(f"{PROG}: {kind}{exc}", file=sys.stderr)
            return 2
        first = str(exc).strip().splitlines()
        print(f"{PROG}: error: {type(exc).__name__}: {first[0] if first else ''} (rerun with --debug for the "
              f"traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
