"""``veca train [--config FILE] [key=value ...]`` (also ``python -m veca_ssl.train.main``).

Every failure ends as one message on stderr and a non-zero exit, without a traceback: 2 for what the
user can fix (a config value, a locked or unusable output directory, a refused resume, a diverged
run, a failed write: a full disk, a read-only or unwritable directory), 1 for anything unexpected
(its traceback also goes to ``<output_dir>/error.log``), 130 after a second Ctrl-C. ``--debug`` shows the traceback instead. At start-up the process sets its
CPU threads by ``train.num_threads`` (``veca_ssl.threads``).
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
import traceback
from pathlib import Path

from veca_ssl import CONFIG_DIR
from veca_ssl.cli import HelpFormatter
from veca_ssl.config import ConfigError, load_config

PROG = "veca train"

DESCRIPTION = """\
Pretrain a VECA (or dense ViT) backbone: self-supervised DINO + iBOT + KoLeo, or distillation from a
frozen teacher (mode=distill). One process, or one per GPU under torchrun / veca submit.

The config is layered: default.yaml (every key documented) -> models/<model.name>.yaml -> the
--config file -> the key=value overrides. Any bad key, type or value stops before any work, with one
message naming it. Rerunning the same command resumes from the latest checkpoint in output_dir."""


def _named_configs() -> str:
    names = sorted(str(p.relative_to(CONFIG_DIR).with_suffix("")) for p in CONFIG_DIR.rglob("*.yaml")
                   if p.parent.name not in ("models", "eval") and p.name != "default.yaml")
    return ", ".join(names)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description=DESCRIPTION, formatter_class=HelpFormatter,
        epilog=textwrap.fill(f"named configs (in {CONFIG_DIR}): {_named_configs()}", width=100,
                             break_on_hyphens=False))
    p.add_argument("--config", default="quickstart",
                   help="experiment YAML: a path, or a named config (see below), e.g. quickstart")
    p.add_argument("--dry-run", action="store_true",
                   help="validate the config, print it resolved and the thread count, and exit "
                        "(creates nothing)")
    p.add_argument("--debug", action="store_true",
                   help="on an error, show the full Python traceback instead of one message")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. optim.epochs=10 output_dir=outputs/x "
                        "'model.overrides={depth: 4}'")
    return p


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors whose message already says what happened and what to do."""
    from veca_ssl.data.errors import DataError
    from veca_ssl.fileio import WriteError
    from veca_ssl.train.checkpoint import CheckpointError
    from veca_ssl.train.lock import RunLockedError
    from veca_ssl.train.loop import NonFiniteLossError
    from veca_ssl.train.metrics import MetricsWriteError

    # DataError: too many unusable samples, a half-replaced shard set, ...; WriteError: a full disk, a
    # read-only or unwritable directory
    return (ConfigError, CheckpointError, RunLockedError, NonFiniteLossError, MetricsWriteError, DataError,
            WriteError)


def _is_main_process() -> bool:
    """Rank 0 (or a single process), judged from the launcher's variables before distributed starts."""
    for var in ("RANK", "SLURM_PROCID", "SUBMITIT_LOCAL_GLOBALID"):
        if var in os.environ:
            return os.environ[var].strip() == "0"
    return True


def _unexpected(exc: BaseException, output_dir: str | None) -> int:
    """One line for an error nobody anticipated; the traceback goes to <output_dir>/error.log when
    that directory exists (a job's log then still has it), and --debug prints it."""
    first = str(exc).strip().splitlines()
    where = "rerun with --debug for the traceback"
    if output_dir and Path(output_dir).is_dir():
        log = Path(output_dir) / "error.log"
        try:
            with open(log, "a") as f:
                f.write("".join(traceback.format_exception(exc)) + "\n")
            where = f"traceback in {log}; rerun with --debug to see it here"
        except OSError:
            pass
    print(f"{PROG}: error: {type(exc).__name__}: {first[0] if first else ''} ({where})", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)
    if bad := [o for o in args.overrides if "=" not in o]:
        parser.error(f"expected key=value overrides, got {' '.join(bad)} (options start with --)")
    output_dir = None
    try:
        cfg = load_config(args.config, args.overrides)
        output_dir = str(cfg.output_dir)
        from veca_ssl.threads import apply_thread_policy

        plan = apply_thread_policy(int(cfg.train.num_threads), int(cfg.data.num_workers))
        if _is_main_process():
            print(f"{PROG}: {plan.threads} intra-op CPU thread{'s' if plan.threads > 1 else ''} "
                  f"({plan.reason}); train.num_threads=N to choose", flush=True)
        if args.dry_run:
            from omegaconf import OmegaConf

            print(OmegaConf.to_yaml(cfg, resolve=True), end="")
            print(f"# {PROG} --dry-run: config valid, nothing run (outputs would go to {output_dir})")
            return 0
        return _train(cfg)
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
        return _unexpected(exc, output_dir)


def _train(cfg) -> int:
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
        print(f"\n{KnnMonitor.caption(summary['knn'])}, per core width:")
        print(KnnMonitor.table(summary["knn"]))
    if "distill_report" in summary:
        from veca_ssl.train.distill_report import report_table

        print("\nstudent (EMA) vs frozen teacher, per core width:")
        print(report_table(summary["distill_report"]))
    if "export" in summary:
        from pathlib import Path

        out = Path(summary["output_dir"])
        written = [name for name in ("config.yaml", "metrics.jsonl", "tensorboard/", "checkpoints/")
                   if (out / name).exists()]  # tensorboard/ only where the extra is installed and enabled
        print(f"\noutputs: {out} ({', '.join(written)}); teacher backbone: {summary['export']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
