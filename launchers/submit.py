"""``veca submit train|eval …`` / ``python -m launchers.submit …``: SLURM (or local) jobs via submitit.

  veca submit train --config configs/x.yaml [key=value …] --nodes 2 --gpus-per-node 8 \\
      --partition gpu --timeout 2-00:00:00 --output-dir runs/x
  veca submit eval knn --checkpoint runs/x --train imagefolder:/d/train --test imagefolder:/d/val \\
      --output-dir runs/x/eval [--array-over-widths --widths 8,16,32,64]

``veca submit train`` takes its own options, ``key=value`` config overrides and ``veca train``'s
``--debug``; anything else is refused before submission, and the config is validated exactly as
``veca train`` validates it (``veca_ssl.config.load_config``). ``veca submit eval`` hands the options
it does not know to ``veca eval <protocol>``.
Layout: ``<output_dir>/`` holds the training (or eval) outputs, ``<output_dir>/submitit/<job id>/``
the logs and pickles, ``<output_dir>/submitit/submissions.jsonl`` one line per submission.
Preempted or timed-out training jobs checkpoint and requeue themselves (``launchers.slurm.TrainJob``).
"""

from __future__ import annotations

import argparse
import difflib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from launchers.slurm import (
    EVAL_ENTRY,
    TRAIN_ENTRY,
    EvalJob,
    TrainJob,
    executor_parameters,
    make_executor,
    parse_timeout_min,
    record_submission,
    render_sbatch,
)
from veca_ssl.cli import HelpFormatter
from veca_ssl.widths import width_label

EVAL_PROTOCOLS = ("knn", "linear", "logreg", "dense", "all")


def _add_cluster_options(p: argparse.ArgumentParser, timeout: str) -> None:
    g = p.add_argument_group("resources (SLURM / submitit)")
    g.add_argument("--nodes", type=int, default=1, help="nodes, >= 1 (--cluster local: 1)")
    g.add_argument("--gpus-per-node", type=int, default=1, help="GPUs per node, >= 0")
    g.add_argument("--tasks-per-node", type=int, default=None,
                   help="processes per node, >= 1 (default: --gpus-per-node, at least 1; CPU jobs: set it)")
    g.add_argument("--cpus-per-task", type=int, default=8,
                   help="CPU cores per process, >= 1 (loader workers + the training's threads)")
    g.add_argument("--mem", default=None,
                   help="memory per node with a unit: 64G, 500M, 1.5T; a whole number of megabytes "
                        ">= 1 (default: the cluster's)")
    g.add_argument("--timeout", default=timeout,
                   help="time limit, >= 1 minute: minutes (90) or SLURM's [D-]HH:MM:SS (2-00:00:00), "
                        "minutes/seconds < 60, hours after D- < 24; training requeues on expiry")
    g.add_argument("--partition", default=None, help="SLURM partition (default: the cluster's)")
    g.add_argument("--account", default=None, help="SLURM account to charge")
    g.add_argument("--qos", default=None, help="SLURM quality of service")
    g.add_argument("--constraint", default=None, help="node features, e.g. 'h100|a100'")
    g.add_argument("--exclude", default=None, help="nodes to avoid, e.g. node[01-03]")
    g.add_argument("--job-name", default=None, help="job name (default: veca-train / veca-eval-<protocol>)")
    g.add_argument("--setup", action="append", default=[], metavar="CMD",
                   help="shell line run before the job (repeatable), e.g. 'module load cuda'")
    g.add_argument("--signal-delay", type=int, default=120,
                   help="seconds before the time limit at which the job is told to checkpoint; "
                        ">= 0 and less than --timeout")
    g.add_argument("--max-requeues", type=int, default=10, help="time-limit requeues allowed (SLURM), >= 0")
    s = p.add_argument_group("submission")
    s.add_argument("--cluster", choices=("slurm", "local", "debug"), default=None,
                   help="slurm | local (subprocesses on this machine) | debug (in this process) "
                        "(default: slurm when srun exists, else local)")
    s.add_argument("--output-dir", default=None,
                   help="outputs; logs go to <output-dir>/submitit/ (default: the config's output_dir "
                        "for train, eval_output for eval)")
    s.add_argument("--dry-run", action="store_true",
                   help="validate everything, print the sbatch script and the job's command, submit nothing")
    s.add_argument("--wait", action="store_true", help="block until the job(s) finish and print results")
    s.add_argument("--entry", default=None, metavar="MODULE:FUNCTION",
                   help="run this function(argv) instead of veca train/eval, e.g. launchers.slurm:smoke_train "
                        "(a tiny DDP job to check a cluster setup, preemption and requeue); gets the options "
                        "this command does not know, and --output-dir")


def build_parser(kind: str) -> argparse.ArgumentParser:
    """The parser of ``veca submit train`` (kind='train') or ``veca submit eval`` (kind='eval')."""
    if kind == "train":
        p = argparse.ArgumentParser(
            prog="veca submit train", allow_abbrev=False, formatter_class=HelpFormatter,
            usage="veca submit train [--config CONFIG] [key=value ...] [options]",
            description="Submit `veca train` as a SLURM (or local) job. The config and its key=value "
                        "overrides are validated\nhere first, exactly as `veca train` does, so a bad value "
                        "fails now, not in the queue. An option\nthis command does not know is refused. "
                        "The job checkpoints and requeues itself on preemption or\ntimeout and resumes "
                        "from <output-dir>.")
        p.add_argument("--config", default=None,
                       help="experiment YAML: a path or a named config, as for `veca train` "
                            "(default: veca train's, quickstart)")
        p.add_argument("--debug", action="store_true",
                       help="passed to `veca train`: full tracebacks in the job's log")
        _add_cluster_options(p, timeout="1440")
    elif kind == "eval":
        p = argparse.ArgumentParser(
            prog="veca submit eval", allow_abbrev=False, formatter_class=HelpFormatter,
            description="Submit `veca eval <protocol>` as a SLURM (or local) job: one job for every core "
                        "width, or a job array\nwith one task per width. Options this command does not "
                        "know go to `veca eval <protocol>` (see its --help)\nand are checked here, before "
                        "anything is queued.")
        p.add_argument("protocol", choices=EVAL_PROTOCOLS, help="evaluation protocol")
        p.add_argument("--widths", default=None,
                       help="core widths, e.g. 8,16,64 (passed to the eval; default: every width)")
        p.add_argument("--array-over-widths", action="store_true",
                       help="one array task per width, each writing <output-dir>/C<width>/ (e.g. C16/)")
        _add_cluster_options(p, timeout="240")
    else:
        raise ValueError(f"unknown submit kind {kind!r}; expected 'train' or 'eval'")
    return p


def _overrides(rest: Sequence[str]) -> list[str]:
    return [a for a in rest if "=" in a and not a.startswith("-")]


def check_train_arguments(parser: argparse.ArgumentParser, rest: Sequence[str]) -> None:
    """What ``veca submit train`` leaves unparsed must be config overrides: refuse anything else now,
    before it would fail inside the queued job (a misspelt option, a stray word)."""
    known = [o for a in parser._actions for o in a.option_strings]
    for arg in rest:
        if arg.startswith("-"):
            name = arg.split("=", 1)[0]
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.75)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ValueError(f"unknown option {name}{hint} (`veca submit train --help` lists the options; "
                             "config values are given as key=value)")
        if "=" not in arg:
            raise ValueError(f"unexpected argument {arg!r}: veca submit train takes options and key=value "
                             "config overrides (e.g. optim.epochs=100)")


def prepare_train(args: argparse.Namespace, rest: list[str]) -> tuple[Path, list[list[str]]]:
    """Validate the config now (before queueing) and fix the output dir: (output_dir, [job argv])."""
    overrides = _overrides(rest)
    given = [o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0] == "output_dir"]
    if given and args.output_dir and Path(given[-1]).resolve() != Path(args.output_dir).resolve():
        raise ValueError(f"--output-dir {args.output_dir} contradicts the override output_dir={given[-1]}; "
                         "give only one")
    argv = [a for a in rest if not (a in overrides and a.startswith("output_dir="))]
    argv += ["--debug"] if args.debug else []
    from veca_ssl.config import load_config, resolve_config_path

    config = args.config
    if config is None:  # validate what `veca train` itself would load without --config
        from veca_ssl.train.main import build_parser as train_parser

        config = train_parser().get_default("config")
    config_path = resolve_config_path(config).resolve() if config is not None else None
    cli = [o for o in overrides if not o.startswith("output_dir=")]
    out_override = args.output_dir or (given[-1] if given else None)
    # local=False: the job runs on the cluster's machines, so this machine's GPUs are not the judge
    cfg = load_config(config_path, cli + ([f"output_dir={out_override}"] if out_override else []), local=False)
    output_dir = Path(str(cfg.output_dir)).resolve()
    job_argv = (["--config", str(config_path)] if config_path else []) + argv + [f"output_dir={output_dir}"]
    return output_dir, [job_argv]


def _eval_budgets(rest: list[str]) -> tuple[int, ...]:
    """The core widths of the backbone named by the eval options (--checkpoint or --model)."""
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    p.add_argument("--checkpoint")
    p.add_argument("--model")
    p.add_argument("--patch-size", type=int, default=16)
    p.add_argument("--num-cores", type=int, default=None)
    known, _ = p.parse_known_args(rest)
    from veca_ssl.models import build_backbone, load_backbone

    if known.checkpoint:
        return tuple(load_backbone(known.checkpoint).budgets)
    if known.model:
        return tuple(build_backbone(known.model, patch_size=known.patch_size, num_cores=known.num_cores).budgets)
    raise ValueError("--array-over-widths needs the widths: pass --widths 8,16,... or --checkpoint/--model")


def prepare_eval(args: argparse.Namespace, rest: list[str]) -> tuple[Path, list[list[str]]]:
    """The eval jobs' argv, each checked now as the job will parse it (options, values, paths, and no
    earlier report in its output directory): (output_dir, [job argv])."""
    output_dir = Path(args.output_dir or "eval_output").resolve()
    base = [args.protocol, *rest]

    def place(widths: str | None, out: Path) -> list[str]:
        if args.protocol == "all":  # `veca eval all` takes key=value overrides, not options
            return ([f"widths=[{widths}]"] if widths and widths != "all" else []) + [f"output_dir={out}"]
        return (["--widths", widths] if widths else []) + ["--output-dir", str(out)]

    if not args.array_over_widths:
        argvs = [base + place(args.widths, output_dir)]
    else:
        if args.widths in (None, "all"):
            widths = list(_eval_budgets(rest))
            if not widths:
                raise ValueError("--array-over-widths: this backbone has no elastic widths (dense ViT); drop the flag")
        else:
            try:
                widths = [int(w) for w in args.widths.split(",") if w.strip()]
            except ValueError:
                raise ValueError(f"--widths {args.widths!r}: expected integers like 8,16,64") from None
        argvs = [base + place(str(w), output_dir / width_label(w)) for w in widths]
    from eval.cli import check_argv

    for argv in argvs:
        check_argv(argv)
    return output_dir, argvs


def _print_dry_run(kind: str, cluster: str | None, folder: Path, params: dict[str, Any],
                   jobs: list[Any]) -> None:
    print(f"# veca submit {kind}: dry run, nothing submitted")
    print(f"# logs: {folder}")
    for job in jobs:
        print(f"# job ({job.entry}): veca {kind} {' '.join(job.argv)}")
    if cluster in (None, "slurm"):
        script, command = render_sbatch(folder, params, array_size=len(jobs))
        print(f"# submitit command: {command}\n# sbatch script:")
        print(script)
    else:
        print(f"# {cluster} executor parameters: {params}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help") or argv[0] not in ("train", "eval"):
        print("usage: veca submit {train,eval} [options]\n\n"
              "  train  `veca train` as a SLURM (or local) job; config validated before queueing\n"
              "  eval   `veca eval <protocol>` as a job, or a job array with one task per core width\n\n"
              "Run `veca submit train --help` or `veca submit eval --help` for the options.")
        if argv and argv[0] not in ("-h", "--help", "help"):
            print(f"veca submit: unknown job kind {argv[0]!r}; expected 'train' or 'eval'", file=sys.stderr)
            return 2
        return 0
    kind = argv[0]
    parser = build_parser(kind)
    args, rest = parser.parse_known_args(argv[1:])
    for name in ("nodes", "gpus_per_node", "cpus_per_task", "max_requeues", "signal_delay"):
        value = getattr(args, name)
        if value is not None and value < (1 if name in ("nodes", "cpus_per_task") else 0):
            parser.error(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.tasks_per_node is not None and args.tasks_per_node < 1:
        parser.error(f"--tasks-per-node must be at least 1, got {args.tasks_per_node}")
    try:
        if kind == "train" and not args.entry:
            check_train_arguments(parser, rest)
        if args.signal_delay >= 60 * parse_timeout_min(args.timeout):
            raise ValueError(f"--signal-delay {args.signal_delay} s leaves the job no time within --timeout "
                             f"{args.timeout}: lower it or raise --timeout")
        if kind == "train" and args.entry:  # a custom script: argv as given, no config validation
            output_dir = Path(args.output_dir or "outputs/submit").resolve()
            config = ["--config", args.config] if args.config else []
            argvs = [config + rest + ["--output-dir", str(output_dir)]]
            job_cls, default_entry = TrainJob, TRAIN_ENTRY
        elif kind == "train":
            output_dir, argvs = prepare_train(args, rest)
            job_cls, default_entry = TrainJob, TRAIN_ENTRY
        else:
            output_dir, argvs = prepare_eval(args, rest)
            job_cls, default_entry = EvalJob, EVAL_ENTRY
        args.job_name = args.job_name or (f"veca-{kind}" if kind == "train" else f"veca-eval-{args.protocol}")
        params = executor_parameters(args)
    except (ValueError, OSError) as exc:  # OSError: missing paths, an earlier eval report
        print(f"veca submit {kind}: {exc}", file=sys.stderr)
        return 2
    jobs = [job_cls(a, entry=args.entry or default_entry) for a in argvs]
    folder = output_dir / "submitit" / "%j"
    if args.dry_run:
        _print_dry_run(kind, args.cluster, folder, params, jobs)
        return 0

    try:
        executor = make_executor(folder, args.cluster, params, args.max_requeues)
    except (ValueError, RuntimeError) as exc:  # e.g. local with several nodes, slurm without srun
        print(f"veca submit {kind}: {exc}", file=sys.stderr)
        return 2
    if len(jobs) == 1:
        submitted = [executor.submit(jobs[0])]
    else:
        with executor.batch():  # one SLURM job array
            submitted = [executor.submit(job) for job in jobs]
    ids = [str(j.job_id) for j in submitted]
    record_submission(output_dir, {"kind": kind, "cluster": executor.cluster, "job_ids": ids,
                                   "params": params, "argv": [j.argv for j in jobs]})
    print(f"submitted {len(ids)} {kind} job(s) to {executor.cluster}: {', '.join(ids)}")
    print(f"outputs: {output_dir}\nlogs:    {output_dir / 'submitit'}")
    if args.wait or executor.cluster == "debug":
        for job in submitted:  # results(): one per task; task 0 speaks for the job
            print(f"job {job.job_id} finished: {job.results()[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
