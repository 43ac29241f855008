"""``veca doctor``: check a machine end to end before a long job — one table of checks (pass / fail /
skip with the reason) and their numbers, printed and written to <output-dir>/doctor.{json,md}.

Checks, in order (docs/DOCTOR.md says what each one measures and why):
  environment   device, torch / CUDA / cuDNN / NCCL / xformers / faiss versions
  attention     the SDPA kernel each network runs (profiler kernel names) and each call's inputs
                against the flash and memory-efficient kernels' conditions (and PyTorch's own verdict)
  bf16-step     a bf16-autocast training step of VECA-S/16 and ViT-S/16 at 224 px: finite, and within
                a stated tolerance of fp32
  throughput    VECA-B/16 at C = 64 and C = 16 vs ViT-B/16, forward and training step, bf16, at 224,
                512, 1024 and 2048 px side by side (warm-up, medians, spread, peak memory); on a GPU
                the goals: >= 1.7x the ViT's images/s at 1024 px and >= 4x at 2048 px, forward and
                step, and peak memory linear in the patch count
  compile       a torch.compile'd VECA block equals the eager one (forward and backward)
  knn           faiss k-NN (GPU index on 100k x 768 when faiss sees a GPU) equals the torch k-NN
  resume        a 20-step `veca train`, SIGTERM to its process group, resumed: bit-exact against a
                run that was never stopped
  resume-2proc  the same with 2 processes (NCCL on 2 GPUs, else gloo on the CPU)

On a CPU it runs what applies and says why it leaves the rest out: the throughput check measures
VECA-T/16 vs ViT-T/16 at 224 px there (larger networks and sizes with --bench-family and
--resolutions), and the goals are judged on a GPU only. Exit status: 0 when no check failed, 1 when
one did (the table says which), 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path

CHECKS: dict[str, str] = {
    "environment": "veca_ssl.bench.doctor.checks:check_environment",
    "attention": "veca_ssl.bench.doctor.checks:check_attention",
    "bf16-step": "veca_ssl.bench.doctor.checks:check_bf16_step",
    "throughput": "veca_ssl.bench.doctor.throughput:check_throughput",
    "compile": "veca_ssl.bench.doctor.checks:check_compile",
    "knn": "veca_ssl.bench.doctor.checks:check_knn",
    "resume": "veca_ssl.bench.doctor.resume:check_resume",
    "resume-2proc": "veca_ssl.bench.doctor.resume:check_resume_two_processes",
}
FAMILIES = ("tiny", "small", "base", "large")
DEFAULT_OUTPUT_DIR = "outputs/doctor"


def _names(values: list[str] | None) -> list[str]:
    """``--only a b,c`` -> [a, b, c]."""
    return [n.strip() for v in values or [] for n in v.split(",") if n.strip()]


def build_parser() -> argparse.ArgumentParser:
    from veca_ssl.bench import MIN_REPEATS, MIN_WARMUP
    from veca_ssl.cli import HelpFormatter

    p = argparse.ArgumentParser(prog="veca doctor", description=__doc__.strip(), formatter_class=HelpFormatter)
    p.add_argument("--only", nargs="+", metavar="CHECK", help=f"run only these checks ({', '.join(CHECKS)})")
    p.add_argument("--skip", nargs="+", metavar="CHECK", help="leave these checks out")
    p.add_argument("--device", default="auto", help="auto (cuda when available) | cpu | cuda | cuda:N")
    p.add_argument("--output-dir", default=DEFAULT_OUTPUT_DIR, help="doctor.json and doctor.md are written here")
    p.add_argument("--resolutions", type=int, nargs="+", default=None,
                   help="throughput: square sides in pixels, multiples of 16 (default: 224 512 1024 2048 on a "
                        "GPU, 224 on a CPU)")
    p.add_argument("--bench-family", choices=FAMILIES, default=None,
                   help="throughput: network size (default: base on a GPU, tiny on a CPU; the goals are for base)")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"throughput: images per call (default: 1 on a CPU; on a GPU "
                        f"{16384} / patches, so every size runs as many tokens)")
    p.add_argument("--step-family", choices=FAMILIES, default="small",
                   help="bf16-step, attention and compile: network size")
    p.add_argument("--step-batch", type=int, default=None, help="bf16-step: images (default: 8 on a GPU, 1 on a CPU)")
    p.add_argument("--knn-bank", type=int, default=None,
                   help="knn: bank size (default: 100000 with faiss on a GPU, 20000 with faiss-cpu)")
    p.add_argument("--knn-queries", type=int, default=None,
                   help="knn: queries (default: 10000 with faiss on a GPU, 1000 with faiss-cpu)")
    p.add_argument("--train-steps", type=int, default=20, help="resume checks: steps of each run")
    p.add_argument("--train-timeout", type=float, default=600, help="resume checks: seconds allowed per run")
    p.add_argument("--threads", type=int, default=0,
                   help="intra-op CPU threads; 0 = the policy of veca train (the cores this process may use; "
                        "OMP_NUM_THREADS wins when set)")
    p.add_argument("--warmup", type=int, default=MIN_WARMUP, help=f"throughput: untimed calls, >= {MIN_WARMUP}")
    p.add_argument("--repeats", type=int, default=MIN_REPEATS, help=f"throughput: timed calls, >= {MIN_REPEATS}")
    return p


def _check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse bad arguments before any work (argparse error: one message, exit 2)."""
    from veca_ssl.bench import MIN_REPEATS, MIN_WARMUP

    args.only, args.skip = _names(args.only), _names(args.skip)
    if unknown := [n for n in args.only + args.skip if n not in CHECKS]:
        p.error(f"unknown check {unknown[0]!r}; valid: {', '.join(CHECKS)}")
    if args.only and not set(args.only) - set(args.skip):
        p.error("--only and --skip leave no check to run")
    if bad := [r for r in args.resolutions or [] if r < 16 or r % 16]:
        p.error(f"--resolutions {bad[0]}: use positive multiples of the patch size 16 (e.g. 224, 512)")
    if args.threads < 0:
        p.error(f"--threads must be >= 0 (0 = automatic), got {args.threads}")
    for name in ("batch_size", "step_batch", "knn_bank", "knn_queries", "train_steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.train_steps < 6:
        p.error(f"--train-steps must be >= 6 (the stopped run takes the signal after 40 % of them and a "
                f"checkpoint is written every 5), got {args.train_steps}")
    if args.knn_bank is not None and args.knn_bank < 200:
        p.error(f"--knn-bank must be >= 200 (k = 200 neighbours), got {args.knn_bank}")
    if args.warmup < MIN_WARMUP or args.repeats < MIN_REPEATS:
        p.error(f"need --warmup >= {MIN_WARMUP} and --repeats >= {MIN_REPEATS} (warm up each shape, report the "
                f"median and spread), got --warmup {args.warmup} --repeats {args.repeats}")
    out = Path(args.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".doctor-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        p.error(f"--output-dir {str(out)!r} is not a writable directory ({exc.strerror or exc})")


def _device(p: argparse.ArgumentParser, spec: str):
    import torch

    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        p.error(f"--device {spec!r}: use auto, cpu, cuda or cuda:N")
    if device.type not in ("cpu", "cuda"):
        p.error(f"--device {spec!r}: use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            p.error(f"--device {spec}: this machine has no usable CUDA GPU (torch {torch.__version__}, "
                    f"built for CUDA {torch.version.cuda or 'none'}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            p.error(f"--device {spec}: there are {torch.cuda.device_count()} GPUs (cuda:0 …)")
        torch.cuda.set_device(device)
    return device


def _machine(device) -> object:
    import shutil

    import torch

    from veca_ssl.bench.doctor.checks import faiss_gpus
    from veca_ssl.bench.doctor.rules import Machine
    from veca_ssl.optional import available

    return Machine(device=device.type, gpus=torch.cuda.device_count() if device.type == "cuda" else 0,
                   faiss=available("faiss"), faiss_gpus=faiss_gpus() if device.type == "cuda" else 0,
                   compiler=any(shutil.which(c) for c in ("cc", "gcc", "g++", "clang", "c++")))


def _run_check(name: str, ctx) -> object:
    import importlib

    from veca_ssl.bench.doctor.report import Result

    module, func = CHECKS[name].split(":")
    t0 = time.perf_counter()
    try:
        result = getattr(importlib.import_module(module), func)(ctx)
    except Exception as exc:  # a check that breaks is a failed check, with its reason; the others still run
        first = (str(exc).strip().splitlines() or [""])[0]
        result = Result(name, "fail", "error", f"{type(exc).__name__}: {first}", traceback=traceback.format_exc())
    result.seconds = time.perf_counter() - t0
    return result


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    import platform
    import socket
    from datetime import datetime, timezone

    from veca_ssl.bench.doctor import report
    from veca_ssl.bench.doctor.checks import Context
    from veca_ssl.bench.doctor.rules import SKIP, exit_code, skip_reason
    from veca_ssl.threads import apply_thread_policy

    device = _device(parser, args.device)
    machine = _machine(device)
    # PyTorch's default of one thread per core of the machine oversubscribes a shared one (several
    # times slower steps, see veca_ssl.threads); the doctor measures with what veca train would use
    threads = apply_thread_policy(args.threads, 0)
    out = Path(args.output_dir)
    ctx = Context(device, machine, args, out / "work")
    header = {"host": socket.gethostname(), "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "device": str(device), "threads": threads.threads, "threads_reason": threads.reason,
              "python": platform.python_version(),
              "command": "veca doctor " + " ".join(sys.argv[1:] if argv is None else argv)}
    print(f"veca doctor: {header['device']} on {header['host']}, {threads.threads} intra-op CPU thread(s) "
          f"({threads.reason}); writing to {out}", flush=True)
    results = []
    for name in CHECKS:
        if (args.only and name not in args.only) or name in args.skip:
            why = "not selected (--only)" if args.only and name not in args.only else "left out (--skip)"
            results.append(report.Result(name, SKIP, reason=why))
            continue
        why = skip_reason(name, machine)
        if why is not None:
            results.append(report.Result(name, SKIP, reason=why))
            print(f"[{name}] skip: {why}", flush=True)
            continue
        print(f"[{name}] running …", flush=True)
        result = _run_check(name, ctx)
        results.append(result)
        print(f"[{name}] {result.status} ({result.seconds:.0f} s): {result.summary}"
              + (f" — {result.reason}" if result.reason else ""), flush=True)
    header["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    print()
    print(report.table(results))
    paths = report.write(results, header, out)
    print(f"\nwritten: {', '.join(str(p) for p in paths)}")
    code = exit_code([r.status for r in results])
    failed = [r.name for r in results if r.status == "fail"]
    print(f"veca doctor: {'failed: ' + ', '.join(failed) if failed else 'no check failed'}")
    return code


if __name__ == "__main__":
    sys.exit(main())
