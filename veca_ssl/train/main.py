"""``veca train --config FILE [key=value ...]`` (also ``python -m veca_ssl.train.main``)."""

from __future__ import annotations

import argparse
import sys

from veca_ssl.config import ConfigError, load_config


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="veca train", description="Pretrain a VECA backbone (SPEC §3).")
    p.add_argument("--config", default="quickstart",
                   help="experiment YAML (a path, or a name under configs/, e.g. quickstart)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.epochs=10")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"veca train: config error: {exc}", file=sys.stderr)
        return 2
    from veca_ssl import distributed as dist
    from veca_ssl import signals
    from veca_ssl.train.loop import train
    from veca_ssl.train.monitor import KnnMonitor

    signals.install_preemption_handler()
    try:
        summary = train(cfg)
    except ConfigError as exc:
        print(f"veca train: config error: {exc}", file=sys.stderr)
        return 2
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
        print(f"\noutputs: {summary['output_dir']} (config.yaml, metrics.jsonl, tensorboard/, checkpoints/); "
              f"teacher backbone: {summary['export']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
