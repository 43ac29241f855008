"""Thread policy of `veca train` (train.num_threads): the rule itself, and the real CLI applying it."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from veca_ssl.threads import plan_threads, ranks_per_node


def test_auto_gives_each_rank_its_cores_minus_its_loader_workers() -> None:
    assert plan_threads(0, num_workers=1, env={}, cores=2).threads == 1  # the quickstart on 2 cores
    assert plan_threads(0, num_workers=0, env={}, cores=2).threads == 2
    assert plan_threads(0, num_workers=4, env={}, cores=2).threads == 1  # never below one
    # torchrun: 4 ranks share a 32-core mask -> 8 each, minus 3 workers
    plan = plan_threads(0, num_workers=3, env={"LOCAL_WORLD_SIZE": "4"}, cores=32)
    assert plan.threads == 5 and "32 cores available / 4 ranks on this node - 3 loader workers" in plan.reason
    # SLURM binds a task to its --cpus-per-task: no further division by the tasks of the node
    slurm = {"SLURM_JOB_ID": "7", "SLURM_CPUS_PER_TASK": "10", "SLURM_NTASKS_PER_NODE": "8"}
    assert plan_threads(0, num_workers=6, env=slurm, cores=10).threads == 4
    assert plan_threads(0, num_workers=6, env=slurm, cores=80).threads == 4  # unbound task: its share only
    # submitit's local executor: tasks per node from its own variables
    local = {"SUBMITIT_EXECUTOR": "local", "SUBMITIT_LOCAL_NTASKS": "2", "SUBMITIT_LOCAL_JOB_NUM_NODES": "1"}
    assert ranks_per_node(local) == 2 and plan_threads(0, 0, env=local, cores=8).threads == 4
    assert ranks_per_node({"SLURM_TASKS_PER_NODE": "8(x2)"}) == 8


def test_explicit_setting_and_omp_num_threads_win_over_auto() -> None:
    assert plan_threads(3, num_workers=2, env={"OMP_NUM_THREADS": "1"}, cores=2).threads == 3
    plan = plan_threads(0, num_workers=2, env={"OMP_NUM_THREADS": "6"}, cores=2)
    assert plan.threads == 6 and "OMP_NUM_THREADS" in plan.reason


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs Linux CPU affinity")
@pytest.mark.parametrize(("overrides", "env", "expected"), [
    (["data.num_workers=1"], {}, "cores-1"),           # auto: one core left to the loader worker
    (["train.num_threads=3"], {"OMP_NUM_THREADS": "1"}, "3"),  # explicit wins, even beyond the cores
])
def test_veca_train_applies_the_policy_at_start_up(overrides, env, expected) -> None:
    cores = sorted(os.sched_getaffinity(0))[:2]
    want = {"cores": len(cores), "cores-1": max(1, len(cores) - 1)}.get(expected) or int(expected)
    child_env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"} | env
    proc = subprocess.run([sys.executable, "-m", "veca_ssl.train.main", "--dry-run", *overrides],
                          env=child_env, capture_output=True, text=True, timeout=120,
                          preexec_fn=lambda: os.sched_setaffinity(0, cores))
    assert proc.returncode == 0, proc.stderr
    m = re.search(r"veca train: (\d+) intra-op CPU threads? \((.*)\)", proc.stdout)
    assert m is not None, proc.stdout[:500]
    assert int(m.group(1)) == want, m.group(0)


# ------------------------------------------------------------- the same policy where evaluation times
def test_every_command_that_times_or_extracts_takes_num_threads() -> None:
    from eval.config import build_parser as protocol_parser
    from eval.extract_cli import build_parser as extract_parser
    from eval.selection import build_parser as select_parser
    from veca_ssl.bench import backbone, ddp, knn, train

    parsers = [protocol_parser(p) for p in ("knn", "linear", "logreg", "dense")]
    parsers += [extract_parser(), select_parser()] + [m.build_parser() for m in (backbone, ddp, knn, train)]
    for parser in parsers:
        action = parser._option_string_actions.get("--num-threads")
        assert action is not None and action.metavar in (None, "N"), parser.prog  # one spelling everywhere


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs Linux CPU affinity")
def test_eval_select_extract_and_bench_apply_the_policy_and_state_it(tmp_path, capsys) -> None:
    import json

    cores = sorted(os.sched_getaffinity(0))[:2]
    want = max(1, len(cores) - 1)  # auto: the cores minus the one loader worker
    child_env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    model = ["--model", "veca_tiny", "--patch-size", "8", "--num-cores", "16", "--model-arg", "depth=1",
             "--model-arg", "embed_dim=32", "--model-arg", "num_heads=2", "--resolution", "16"]
    out = tmp_path / "ev"
    proc = subprocess.run([sys.executable, "-m", "veca_ssl.cli", "eval", "knn", *model, "--train", "digits@train",
                           "--test", "digits@val", "--num-workers", "1", "--no-progress", "--bootstrap", "0",
                           "--output-dir", str(out)], env=child_env, capture_output=True, text=True, timeout=180,
                          preexec_fn=lambda: os.sched_setaffinity(0, cores))
    assert proc.returncode == 0, proc.stderr
    line = (f"threads: {want} intra-op CPU thread{'s' if want > 1 else ''} (auto: {len(cores)} cores available - 1 "
            f"loader worker); --num-threads N to choose")
    assert line in proc.stderr.splitlines()
    report = json.loads((out / "knn" / "report.json").read_text())
    timing = report["timing_conditions"]
    assert timing["threads"] == want and timing["cores"] == len(cores) and len(timing["load_average"]) == 2
    assert re.search(rf"^- timing: {want} intra-op threads?, load average \d+\.\d\d(–\d+\.\d\d)? \(1 min, "
                     rf"{len(cores)} cores\)$", (out / "knn" / "report.md").read_text(), re.M)

    from eval.extract_cli import main as extract_main
    from eval.selection import main as select_main
    from veca_ssl.bench.knn import main as knn_main

    assert select_main(["--report", str(out / "knn"), "--num-threads", "1", "--speed-repeats", "2"]) == 0
    selection = json.loads((out / "knn" / "selection.json").read_text())
    assert selection["threads"] == 1 and len(selection["load_average"]) == 2
    printed = capsys.readouterr().out
    assert "(measured here; 1 intra-op thread, load average " in printed
    assert "- threads: 1 intra-op CPU thread (--num-threads=1); --num-threads N to choose" in printed
    assert extract_main([*model, "--data", "digits@val", "--output-dir", str(tmp_path / "fe"), "--num-threads", "1",
                         "--no-progress"]) == 0
    assert "threads: 1 intra-op CPU thread (--num-threads=1); --num-threads N to choose" in capsys.readouterr().out
    assert knn_main(["--bank", "300", "--queries", "40", "--dim", "8", "--classes", "4", "--backends", "floor,torch",
                     "--num-threads", "1", "--output-dir", str(tmp_path / "bench")]) == 0
    assert "veca bench knn: 1 intra-op CPU thread (--num-threads=1)" in capsys.readouterr().out
    rows = json.loads((tmp_path / "bench" / "knn.json").read_text())
    rows = rows["rows"] if isinstance(rows, dict) else rows
    assert [r["threads"] for r in rows] == [1, 1] and all(isinstance(r["load_avg"], float) for r in rows)
