"""Every collective gets its tensors on the device the process group's backend serves.

On a GPU machine NCCL only takes CUDA tensors: one CPU tensor handed to an all-reduce stops every
job at its first step ("No backend type associated with device type cpu"). A gloo test cannot see
that by itself -- gloo accepts CPU tensors -- so the ranks here run with ``collective_spy`` as their
``sitecustomize``: it wraps every torch.distributed collective, records each tensor's device and fails
the rank (exit 97, the call site named) when a tensor is not on the device ``veca_ssl.distributed``'s
helpers were told the backend serves. Twice: declared as the process's own device (the CPU), and as
a different, fake accelerator, where only tensors the helpers placed count as on it -- there a CPU
tensor given to an "accelerator backend" fails, as on a GPU machine.

What runs is what users run: ``veca train`` on 2 gloo ranks (environment rendezvous, as torchrun and
srun start them; a DataLoader worker each) on an image folder with unreadable images (skip counting),
with the k-NN monitor, periodic checkpoints and a stop signal reaching one rank; the same command
again resumes, finishes and prints the final k-NN table; then ``veca eval knn`` and ``veca extract``
on 2 ranks through the SLURM job entry (``launchers.slurm``), which initialises the group first.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from veca_ssl.spawn import find_free_port

ROOT = Path(__file__).resolve().parent.parent
SPY = Path(__file__).resolve().parent / "collective_spy.py"

TRAIN = [
    "model.name=veca_tiny", "model.patch_size=8", "model.num_cores=16",
    "model.overrides={embed_dim: 32, depth: 2, num_heads: 2}",
    "crops.global_size=32", "crops.local_size=16", "crops.num_local=2",
    "dino.head_out_dim=64", "dino.head_hidden_dim=64", "dino.head_bottleneck_dim=32", "ibot.head_out_dim=64",
    "optim.batch_size_per_gpu=4", "optim.epochs=1", "optim.warmup_epochs=0", "optim.base_lr=0.002",
    "optim.lr_scaling=none", "train.progress=false", "train.log_every=1", "train.checkpoint_every=2",
    "train.keep_last=10", "data.num_workers=1", "data.max_skip_fraction=0.5",
    "train.knn_monitor.enabled=true", "train.knn_monitor.every=2", "train.knn_monitor.k=5",
    "train.knn_monitor.dataset=synthetic:n=24,val_n=8,size=32,classes=4,seed=1",
    "train.knn_monitor.resolution=32", "device=cpu", "train.parallel=ddp",
]
STOP_AT = 3  # rank 1 gets SIGUSR1 during step 3 (of 5): both ranks stop after it, the checkpoint is step 3's
RANKS = 2
EXIT_SPY = 97


def _folder(root: Path, n: int = 40, bad: int = 3) -> Path:
    """``n`` small JPEGs in 2 class folders; ``bad`` of them unreadable (each rank skips and counts some)."""
    rng = np.random.default_rng(0)
    for i in range(n):
        d = root / f"class{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        if i % 13 == 5 and bad > 0:
            bad -= 1
            (d / f"{i:03d}.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
        else:
            Image.fromarray(rng.integers(0, 256, (36, 40, 3), dtype=np.uint8)).save(d / f"{i:03d}.jpg", quality=90)
    return root


def _ranks(cmd: list[str], tmp: Path, name: str, mode: str, extra_env: dict[str, str] | None = None,
           timeout: float = 240) -> list[tuple[int, str, str]]:
    """``cmd`` as ranks 0..RANKS-1 of one gloo job, the spy loaded; (exit code, stdout, stderr) per rank.
    When one rank fails, the others are stopped (they would wait in their next collective)."""
    site = tmp / "spy-site"
    site.mkdir(exist_ok=True)
    shutil.copy(SPY, site / "sitecustomize.py")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", WORLD_SIZE=str(RANKS),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(find_free_port()),
               PYTHONPATH=os.pathsep.join([str(site), str(ROOT), os.environ.get("PYTHONPATH", "")]),
               VECA_SPY_DEVICE=mode, VECA_SPY_LOG=str(tmp / f"spy-{name}"), **(extra_env or {}))
    procs, logs = [], []
    for r in range(RANKS):
        out, err = open(tmp / f"{name}{r}.out", "w"), open(tmp / f"{name}{r}.err", "w")
        logs.append((out, err))
        procs.append(subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=err, start_new_session=True,
                                      env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}))
    deadline = time.monotonic() + timeout
    try:
        while any(p.poll() is None for p in procs):
            if any(p.poll() not in (None, 0) for p in procs) or time.monotonic() > deadline:
                for p in procs:
                    if p.poll() is None:
                        os.killpg(p.pid, signal.SIGKILL)
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        for out, err in logs:
            out.close()
            err.close()
    return [(p.returncode, (tmp / f"{name}{r}.out").read_text(), (tmp / f"{name}{r}.err").read_text())
            for r, p in enumerate(procs)]


def _check(results: list[tuple[int, str, str]], what: str) -> None:
    spied = [line for code, _, err in results if code == EXIT_SPY for line in err.splitlines()
             if line.startswith("collective spy")]
    if spied:
        pytest.fail(f"{what}:\n" + "\n".join(spied), pytrace=False)
    for r, (code, out, err) in enumerate(results):
        assert code == 0 and "Traceback" not in err, f"{what}, rank {r} (exit {code}):\n{out[-2000:]}\n{err[-3000:]}"


def _calls(tmp: Path, name: str) -> list[dict]:
    return [json.loads(line) for r in range(RANKS) if (tmp / f"spy-{name}.rank{r}.jsonl").exists()
            for line in (tmp / f"spy-{name}.rank{r}.jsonl").read_text().splitlines()]


def _job(entry: str) -> list[str]:
    """The SLURM job's entry as a command: initialise the group from the rank variables, run ``entry``."""
    return [sys.executable, "-c", "import sys; from launchers.slurm import _ArgvJob; "
            f"_ArgvJob(sys.argv[1:], entry={entry!r})()"]


@pytest.mark.parametrize("mode", ["own", "fakeacc"])
def test_every_collective_gets_its_tensors_on_the_backend_device(tmp_path, mode):
    data = _folder(tmp_path / "images")
    out = tmp_path / "run"
    train = [sys.executable, "-m", "veca_ssl.train.main", *TRAIN,
             f"data.train=imagefolder:{data}", f"output_dir={out}"]

    # 1. trains, checkpoints, monitors, counts skips; a signal reaching rank 1 stops both after step 3
    results = _ranks(train, tmp_path, "stop", mode, {"VECA_SPY_STOP_RANK": "1", "VECA_SPY_STOP_AT": str(STOP_AT)})
    _check(results, "veca train (stopped by a signal)")
    assert f"checkpoint at step {STOP_AT} written" in results[0][1], results[0][1]
    assert f"stopped after step {STOP_AT}" in results[1][1], results[1][1]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(r.get("data_skipped", 0) for r in records) > 0, "no unreadable image was counted"

    # 2. the same command resumes, finishes: export, final k-NN table at every width
    results = _ranks(train, tmp_path, "resume", mode)
    _check(results, "veca train (resumed)")
    assert "resumed from" in results[0][1] and "per core width" in results[0][1], results[0][1]
    assert (out / "export" / "teacher.safetensors").exists()

    # 3. k-NN evaluation and feature extraction on 2 ranks, as a SLURM job runs them
    knn = ["knn", "--checkpoint", str(out), "--train", "synthetic:n=24,val_n=8,size=32,classes=4,seed=2@train",
           "--test", "synthetic:n=24,val_n=8,size=32,classes=4,seed=2@val", "--widths", "8,16", "--ks", "5",
           "--no-speed", "--bootstrap", "0", "--batch-size", "8", "--device", "cpu", "--no-progress",
           "--output-dir", str(tmp_path / "eval")]
    _check(_ranks([*_job("eval.cli:main"), *knn], tmp_path, "knn", mode), "veca eval knn")
    assert (tmp_path / "eval" / "knn" / "report.json").exists()
    extract = ["--checkpoint", str(out), "--data", f"imagefolder:{data}", "--width", "8", "--batch-size", "8",
               "--max-skip-fraction", "0.5", "--device", "cpu", "--output-dir", str(tmp_path / "feats"),
               "--no-progress"]
    _check(_ranks([*_job("eval.extract_cli:main"), *extract], tmp_path, "extract", mode), "veca extract")
    assert json.loads((tmp_path / "feats" / "manifest.json").read_text())["complete"]

    # the spy saw the traffic it is there for (a spy that saw nothing would pass vacuously)
    calls = {name: _calls(tmp_path, name) for name in ("stop", "resume", "knn", "extract")}
    checked = [c for cs in calls.values() for c in cs if c.get("devices")]
    assert checked and all(c["declared"] == ("fakeacc:0" if mode == "fakeacc" else "cpu") for c in checked)
    sites = {c["site"].split(":")[0] for c in calls["stop"]}
    assert {"veca_ssl/train/readout.py", "veca_ssl/loss/centering.py", "veca_ssl/features.py",
            "veca_ssl/train/rundir.py", "veca_ssl/train/data.py"} <= sites, sites
    for name in ("knn", "extract"):
        assert any(c["site"].startswith("veca_ssl/features.py") and c["devices"] for c in calls[name]), name


def test_the_spy_fails_the_rank_that_hands_a_cpu_tensor_to_an_accelerator_backend(tmp_path):
    """The spy itself: through the helpers a CPU tensor is fine; handed to torch.distributed as it is,
    the rank exits 97 naming the line -- what the training test above relies on."""
    script = ("import torch, torch.distributed\n"
              "from veca_ssl import distributed as vd\n"
              "vd.init_distributed('cpu')\n"
              "assert vd.all_reduce(torch.ones(2)).tolist() == [2.0, 2.0]\n"
              "assert vd.all_gather_tensor(torch.ones(1, 3)).shape == (2, 3)\n"
              "torch.distributed.all_reduce(torch.ones(2))\n")
    results = _ranks([sys.executable, "-c", script], tmp_path, "direct", "fakeacc", timeout=120)
    for code, _, err in results:
        assert code == EXIT_SPY, err
        assert ("torch.distributed.all_reduce at <string>:6 in <module>" in err
                and "is on cpu, not placed on the communication device the backend serves (fakeacc:0)" in err), err
    helped = [c for c in _calls(tmp_path, "direct") if c.get("site", "").startswith("<string>:4")]
    assert helped and all(c["placed"] == [True] for c in helped)  # the helper's tensor: placed, accepted


# ------------------------------------------------------------------------------- the helpers themselves
def _helpers_worker() -> dict:
    import torch

    from veca_ssl import distributed as vd

    rank = vd.get_rank()
    mine = torch.tensor([rank + 1.0])
    out = {"device": str(vd.communication_device()), "max": vd.all_reduce(mine, "max").tolist(),
           "min": vd.all_reduce(mine, "min").tolist(), "untouched": mine.tolist()}
    strided = torch.full((3, 2), float(rank + 1)).t()  # not contiguous: reduced through a copy, written back
    out["in_place_same"] = vd.all_reduce_(strided) is strided
    out["in_place"] = strided.tolist()
    out["objects"] = vd.all_gather_object({"rank": rank})
    out["from0"], out["from1"] = vd.broadcast_object(f"r{rank}", src=0), vd.broadcast_object(f"r{rank}", src=1)
    out["uneven"] = vd.all_gather_tensor(torch.full((rank + 1, 2), float(rank)), uneven=True).tolist()
    try:
        vd.all_reduce(mine, "avg")
    except ValueError as exc:
        out["bad_op"] = str(exc)
    vd.barrier()
    return out


def test_helpers_reduce_gather_and_broadcast_on_two_ranks():
    from veca_ssl.spawn import run_two_process

    for rank, r in enumerate(run_two_process(_helpers_worker)):
        assert r["device"] == "cpu" and r["max"] == [2.0] and r["min"] == [1.0] and r["untouched"] == [rank + 1.0]
        assert r["in_place_same"] and r["in_place"] == [[3.0] * 3] * 2
        assert r["objects"] == [{"rank": 0}, {"rank": 1}] and (r["from0"], r["from1"]) == ("r0", "r1")
        assert r["uneven"] == [[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]
        assert "unknown reduction 'avg'" in r["bad_op"]


def test_helpers_are_identities_in_one_process():
    import torch

    from veca_ssl import distributed as vd

    t = torch.ones(2)
    assert vd.all_reduce(t, "max") is t and vd.all_reduce_(t) is t and vd.all_gather_tensor(t) is t
    assert vd.all_gather_object(3) == [3] and vd.broadcast_object("x") == "x"
    assert vd.communication_device().type == "cpu"
