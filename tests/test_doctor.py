"""``veca doctor``: the decisions (goals, linear memory, skip rules) with injected measurements — so the
GPU branches are tested on this CPU — and the real command in a subprocess with a cheap selection."""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch

from veca_ssl.bench.doctor import rules
from veca_ssl.bench.doctor.rules import FAIL, PASS, SKIP, Machine

ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------ rules
def _rows(ratios: dict[int, float]) -> list[dict]:
    """Bench rows at each resolution: the dense ViT, VECA C64 with the given images/s ratio, VECA C16."""
    out = []
    for res, ratio in ratios.items():
        out += [{"resolution": res, "model": "vit_base (dense)", "cores": None, "speedup_vs_dense": 1.0},
                {"resolution": res, "model": "veca_base C64", "cores": 64, "speedup_vs_dense": ratio},
                {"resolution": res, "model": "veca_base C16", "cores": 16, "speedup_vs_dense": ratio * 2}]
    return out


def test_speed_goals_on_a_gpu_pass_and_fail_at_their_targets():
    goals = rules.speed_goals(_rows({224: 0.9, 1024: 1.70, 2048: 4.5}), "forward", "base", judged=True)
    assert [(g["resolution"], g["status"]) for g in goals] == [(1024, PASS), (2048, PASS)]
    goals = rules.speed_goals(_rows({1024: 1.69, 2048: 3.9}), "train step", "base", judged=True)
    assert [g["status"] for g in goals] == [FAIL, FAIL]
    assert goals[0]["reason"] == "1.69x < 1.7x" and goals[1]["measured"] == 3.9
    assert goals[0]["goal"] == "train step 1024px: VECA-B/16 C64 >= 1.7x ViT images/s"
    nan = rules.speed_goals(_rows({1024: float("nan"), 2048: 5.0}), "forward", "base", judged=True)
    assert [g["status"] for g in nan] == [FAIL, PASS]


def test_speed_goals_are_skipped_with_the_reason_off_a_gpu_or_off_the_goal_sizes():
    cpu = rules.speed_goals(_rows({1024: 9.0, 2048: 9.0}), "forward", "base", judged=False)
    assert {g["status"] for g in cpu} == {SKIP} and cpu[0]["reason"] == "goals are judged on a GPU"
    missing = rules.speed_goals(_rows({224: 1.0, 1024: 2.0}), "forward", "base", judged=True)
    assert [g["status"] for g in missing] == [PASS, SKIP]
    assert missing[1]["reason"] == "2048 px not measured (--resolutions)"
    tiny = rules.speed_goals(_rows({1024: 2.0, 2048: 5.0}), "forward", "tiny", judged=True)
    assert {g["status"] for g in tiny} == {SKIP} and "VECA-B/16" in tiny[0]["reason"]


PATCHES = [196, 1024, 4096, 16384]  # 224, 512, 1024, 2048 px at patch 16


def test_linear_memory_passes_and_quadratic_memory_fails():
    linear = rules.memory_linearity([(n, 50e6 + 30e3 * n) for n in PATCHES])
    assert linear.status == PASS and "ratio 1.00" in linear.detail
    # a flash-free dense ViT: the N x N score matrix on top of linear activations
    quadratic = rules.memory_linearity([(n, 50e6 + 30e3 * n + 2 * 12 * n * n) for n in PATCHES])
    assert quadratic.status == FAIL and "linear if <= 1.5" in quadratic.detail
    # the slope ratio of a pure square law between doubling sides is (n3 + n2) / (n2 + n1) = 4
    pure = rules.memory_linearity([(n, float(n * n)) for n in PATCHES])
    assert "ratio 4.00" in pure.detail
    # the two largest steps decide: noise at the small sizes does not
    assert rules.memory_linearity([(196, 9e6), (1024, 8e6), (4096, 1.3e8), (16384, 5e8)]).status == PASS


def test_linear_memory_needs_three_readings_and_growth():
    assert rules.memory_linearity([(196, 1e6), (1024, 2e6)]).status == SKIP
    assert rules.memory_linearity([(196, 1e6), (1024, None), (4096, 3e6)]).status == SKIP
    flat = rules.memory_linearity([(196, 1e6), (1024, 1e6), (4096, 1e6)])
    assert flat.status == FAIL and "not resolved" in flat.detail


def test_skip_rules_and_modes_follow_the_machine():
    cpu = Machine("cpu", faiss=True, compiler=True)
    assert rules.skip_reason("knn", cpu) is None and rules.skip_reason("resume", cpu) is None
    assert "pip install 'veca-ssl[faiss]'" in rules.skip_reason("knn", Machine("cpu", faiss=False))
    assert "C++ compiler" in rules.skip_reason("compile", Machine("cpu", compiler=False))
    assert rules.skip_reason("compile", Machine("cuda", gpus=1, compiler=False)) is None  # Triton on a GPU
    assert rules.knn_mode(Machine("cuda", gpus=1, faiss=True, faiss_gpus=1), None) == ("gpu", 100_000, None)
    kind, bank, note = rules.knn_mode(Machine("cuda", gpus=1, faiss=True), None)
    assert (kind, bank) == ("cpu", 20_000) and "faiss sees no GPU" in note
    assert rules.knn_mode(cpu, 5000)[1] == 5000
    assert rules.two_process_backend(Machine("cuda", gpus=2)) == ("cuda", "nccl", None)
    assert rules.two_process_backend(Machine("cuda", gpus=1))[:2] == ("cpu", "gloo")
    assert "one GPU" in rules.two_process_backend(Machine("cuda", gpus=1))[2]
    assert rules.two_process_backend(cpu)[:2] == ("cpu", "gloo")


def test_resolutions_and_batches():
    assert rules.plan_resolutions(None, "cuda") == ([224, 512, 1024, 2048], {})
    run, left_out = rules.plan_resolutions(None, "cpu")
    assert run == [224] and sorted(left_out) == [512, 1024, 2048]
    assert "--resolutions" in left_out[2048]
    assert rules.plan_resolutions([512, 224, 512], "cpu") == ([224, 512], {})
    assert [rules.batch_for(r, 16, "cuda") for r in (224, 512, 1024, 2048)] == [83, 16, 4, 1]
    assert rules.batch_for(2048, 16, "cpu") == 1 and rules.batch_for(224, 16, "cuda", requested=5) == 5


def test_tolerances_and_exit_codes():
    assert rules.within({"a": 0.01, "b": 0.2}, {"a": 0.02, "b": 0.3}).status == PASS
    over = rules.within({"a": 0.03}, {"a": 0.02})
    assert over.status == FAIL and over.detail == "a = 0.03 > 0.02"
    assert rules.within({"a": math.nan}, {"a": 1.0}).status == FAIL
    assert rules.overall([PASS, SKIP]) == PASS and rules.overall([SKIP]) == SKIP
    assert rules.overall([PASS, FAIL, SKIP]) == FAIL
    assert rules.exit_code([PASS, SKIP]) == 0 and rules.exit_code([PASS, FAIL]) == 1


# ------------------------------------------------------------------------------ GPU branches, injected
def _bench(ratios: dict[int, float], mib_per_patch: float, quadratic: float = 0.0) -> tuple[list, list]:
    """Forward and step rows as veca bench backbone / train return them, at GPU batch sizes."""
    forward, step = [], []
    for res, ratio in ratios.items():
        n = (res // 16) ** 2
        batch = rules.batch_for(res, 16, "cuda")
        for model, cores, speed in (("vit_base (dense)", None, 1.0), ("veca_base C64", 64, ratio),
                                    ("veca_base C16", 16, ratio * 1.5),
                                    ("veca_base C16 no-attention (limit)", 16, ratio * 2)):
            mem = batch * (5 + mib_per_patch * n + quadratic * n * n)
            base = {"resolution": res, "model": model, "cores": cores, "speedup_vs_dense": speed,
                    "images_per_s": 100.0 * speed, "peak_mem_mb": mem}
            forward.append(dict(base, patches=n, latency_ms=10.0, latency_min_ms=9.0, latency_max_ms=11.0,
                                batch=batch))
            if "limit" not in model:
                step.append(dict(base, step_ms=30.0, min_ms=29.0, max_ms=31.0, batch=batch))
    return forward, step


def _ctx(device: str, tmp_path: Path, **args):
    from veca_ssl.bench.doctor.checks import Context

    defaults = dict(bench_family=None, resolutions=None, batch_size=None, warmup=3, repeats=5)
    return Context(torch.device(device), Machine(device, gpus=1 if device == "cuda" else 0),
                   argparse.Namespace(**{**defaults, **args}), tmp_path)


def test_throughput_on_a_gpu_judges_the_goals_and_the_memory(tmp_path, monkeypatch):
    from veca_ssl.bench.doctor import throughput

    measured = _bench({224: 0.8, 512: 1.3, 1024: 2.1, 2048: 5.2}, mib_per_patch=0.02)
    monkeypatch.setattr(throughput, "measure", lambda ctx, family, res: measured)
    result = throughput.check_throughput(_ctx("cuda", tmp_path))  # a CUDA device object needs no GPU
    assert result.status == PASS, result.reason
    assert [g["status"] for g in result.goals] == [PASS] * 4
    assert "flash attention for both" in result.summary and "ratio 1.00" in result.summary
    assert result.numbers["fwd_2048px_C64_x_dense"] == 5.2
    assert len(result.rows) == 16 and {r["batch"] for r in result.rows} == {83, 16, 4, 1}

    slow = _bench({224: 0.8, 512: 1.3, 1024: 1.5, 2048: 5.2}, mib_per_patch=0.02, quadratic=1e-5)
    monkeypatch.setattr(throughput, "measure", lambda ctx, family, res: slow)
    result = throughput.check_throughput(_ctx("cuda", tmp_path))
    assert result.status == FAIL
    assert "forward 1024px: VECA-B/16 C64 >= 1.7x ViT images/s: 1.50x < 1.7x" in result.reason
    assert "linear if <= 1.5" in result.reason  # the quadratic term shows in the memory verdict


def test_throughput_on_a_cpu_measures_and_leaves_the_goals_to_a_gpu(tmp_path, monkeypatch):
    from veca_ssl.bench.doctor import throughput

    seen = {}

    def fake(ctx, family, res):
        seen.update(family=family, res=res)
        return _bench({224: 0.7}, mib_per_patch=0.02)

    monkeypatch.setattr(throughput, "measure", fake)
    result = throughput.check_throughput(_ctx("cpu", tmp_path))
    assert seen == {"family": "tiny", "res": [224]}
    assert result.status == PASS and {g["status"] for g in result.goals} == {SKIP}
    assert "goals are judged on a GPU" in result.reason and "not measured: 512 px, 1024 px, 2048 px" in result.reason


def test_neighbour_agreement_allows_only_boundary_ties():
    from veca_ssl.bench.doctor.checks import neighbours_agree

    sims = torch.tensor([[0.9, 0.8, 0.7], [0.9, 0.5, 0.30001]])
    idx = torch.tensor([[1, 2, 3], [4, 5, 6]])
    assert neighbours_agree(sims, idx, sims, idx) == (True, 0.0, 0)
    tie = idx.clone()
    tie[1, 2] = 7  # another item at the k-th similarity, within the tolerance
    ok, _, boundary = neighbours_agree(sims, idx, torch.tensor([[0.9, 0.8, 0.7], [0.9, 0.5, 0.3]]), tie)
    assert ok and boundary == 1
    miss = idx.clone()
    miss[0, 0] = 9  # the nearest neighbour itself differs: a real disagreement
    assert not neighbours_agree(sims, idx, sims, miss)[0]
    assert not neighbours_agree(sims, idx, sims + 1e-3, idx)[0]


def test_checkpoint_trees_are_compared_bit_for_bit():
    from veca_ssl.bench.doctor.resume import diff_states

    a = {"student": {"w": torch.ones(3)}, "step": 20, "rng": {"torch": torch.arange(4, dtype=torch.uint8)}}
    assert diff_states(a, {"student": {"w": torch.ones(3)}, "step": 20,
                           "rng": {"torch": torch.arange(4, dtype=torch.uint8)}}) == []
    b = {"student": {"w": torch.ones(3) + 1e-7}, "step": 20, "rng": {}}
    assert diff_states(a, b) == ["/rng/torch: only in one", "/student/w: tensors differ"]
    assert diff_states([1, 2], [1, 2, 3]) == [": lengths 2 != 3"]
    assert diff_states({"x": torch.zeros(2)}, {"x": torch.zeros(2, dtype=torch.float64)}) == ["/x: tensors differ"]


# ------------------------------------------------------------------------------ the command
def _doctor(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "veca_ssl.cli", "doctor", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=env)


def test_doctor_on_the_cpu_writes_its_table_as_json_and_markdown(tmp_path):
    out = tmp_path / "doctor"
    proc = _doctor("--only", "environment", "attention", "knn", "throughput", "--knn-bank", "1000",
                   "--knn-queries", "100", "--bench-family", "tiny", "--resolutions", "16",
                   "--output-dir", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    doc = json.loads((out / "doctor.json").read_text())
    checks = {c["name"]: c for c in doc["checks"]}
    assert list(checks) == ["environment", "attention", "bf16-step", "throughput", "compile", "knn", "resume",
                            "resume-2proc"]
    assert doc["format"] == "veca-doctor" and doc["status"] == PASS and doc["device"] == "cpu"
    assert {n: c["status"] for n, c in checks.items()} == {
        "environment": PASS, "attention": PASS, "bf16-step": SKIP, "throughput": PASS, "compile": SKIP,
        "knn": PASS, "resume": SKIP, "resume-2proc": SKIP}
    assert checks["resume"]["reason"] == "not selected (--only)"
    env = checks["environment"]["numbers"]
    assert env["torch"] == torch.__version__ and env["gpus"] == 0 and env["faiss"]
    assert checks["attention"]["numbers"] == {"veca_small_kernels": "flash", "vit_small_kernels": "flash"}
    assert all(r["flash blockers"] == "none" and r["efficient blockers"] == "none"
               for r in checks["attention"]["rows"])
    knn = checks["knn"]["numbers"]
    assert knn["faiss_index"] == "cpu" and knn["bank"] == 1000 and knn["accuracies_equal"] is True
    assert knn["max_similarity_diff"] <= 1e-4
    tp = checks["throughput"]
    assert {g["status"] for g in tp["goals"]} == {SKIP}
    assert all(g["reason"] == "goals are judged on a GPU" for g in tp["goals"] if g["measured"] is not None)
    rows = tp["rows"]
    assert {(r["px"], r["network"]) for r in rows} >= {(16, "vit_tiny (dense)"), (16, "veca_tiny C64"),
                                                        (16, "veca_tiny C16")}
    for r in rows:
        assert math.isfinite(r["fwd img/s"]) and r["fwd img/s"] > 0
        if "limit" not in r["network"]:
            assert math.isfinite(r["step img/s"]) and r["step img/s"] > 0
    assert all(math.isfinite(v) for v in tp["numbers"].values())
    md = (out / "doctor.md").read_text()
    assert "| check | status | result | reason | s |" in md and "| resume | skip |" in md
    assert "## throughput: pass" in md and "goals are judged on a GPU" in md
    assert "| knn | pass |" in proc.stdout  # the same table on the terminal


def test_bad_arguments_exit_2_with_one_message(tmp_path):
    for args, message in ((["--only", "speed"], "unknown check 'speed'"),
                          (["--resolutions", "100"], "--resolutions 100: use positive multiples"),
                          (["--only", "knn", "--skip", "knn"], "leave no check to run"),
                          (["--train-steps", "3"], "--train-steps must be >= 6"),
                          (["--warmup", "1"], "--warmup >= 3"),
                          (["--device", "cuda"], "no usable CUDA GPU"),
                          (["--device", "tpu"], "use auto, cpu, cuda or cuda:N")):
        if args[:2] == ["--device", "cuda"] and torch.cuda.is_available():
            continue
        proc = _doctor(*args, "--output-dir", str(tmp_path / "d"), timeout=60)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        assert message in proc.stderr and "Traceback" not in proc.stderr, (args, proc.stderr)
    (tmp_path / "file").write_text("")
    proc = _doctor("--output-dir", str(tmp_path / "file" / "d"), timeout=60)
    assert proc.returncode == 2 and "--output-dir" in proc.stderr and "not a writable directory" in proc.stderr


def test_a_failing_check_fails_the_run_and_the_table_says_which(tmp_path, monkeypatch, capsys):
    from veca_ssl.bench import doctor
    from veca_ssl.bench.doctor import checks

    def broken(ctx):
        raise RuntimeError("faiss index exploded\nsecond line")

    monkeypatch.setattr(checks, "check_knn", broken)
    code = doctor.main(["--only", "environment", "knn", "--output-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 1
    assert "| knn | FAIL | error | RuntimeError: faiss index exploded |" in out
    assert "veca doctor: failed: knn" in out
    doc = json.loads((tmp_path / "doctor.json").read_text())
    knn = next(c for c in doc["checks"] if c["name"] == "knn")
    assert doc["status"] == FAIL and "Traceback" in knn["traceback"] and "second line" in knn["traceback"]
    assert next(c for c in doc["checks"] if c["name"] == "environment")["status"] == PASS  # the others still ran


def test_the_checker_is_compared_with_pytorchs_own_verdict():
    from veca_ssl.bench.doctor.checks import _pytorch_verdicts, disagreements

    assert disagreements({"flash": [], "efficient": []}, {"flash": True, "efficient": True}) == []
    assert disagreements({"flash": ["check_for_attn_mask: …"], "efficient": []},
                         {"flash": False, "efficient": True}) == []
    assert disagreements({"flash": [], "efficient": []}, {"flash": False, "efficient": True}) == [
        "PyTorch says can_use_flash=False, the checker says eligible"]
    assert disagreements({"flash": ["check_head_dim_size_flash: …"]}, {"flash": True}) == [
        "PyTorch says can_use_flash=True, the checker says blocked (check_head_dim_size_flash: …)"]
    # our own stricter rules are not PyTorch's gates: no disagreement when PyTorch would pad or take a mask
    assert disagreements({"flash": ["pad_last_dim<8>: …"], "efficient": ["no materialised bias: …"]},
                         {"flash": True, "efficient": True}) == []
    # the GPU-side query itself runs here too (PyTorch answers False for CPU tensors)
    q = torch.randn(1, 2, 4, 8)
    assert _pytorch_verdicts(q, q, q, attn_mask=None, dropout_p=0.0) == {"flash": False, "efficient": False}
