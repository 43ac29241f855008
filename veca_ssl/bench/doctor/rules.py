"""The doctor's decisions as pure functions of measurements and of what the machine has.

Nothing here measures: the checks hand in numbers, these functions turn them into pass / fail / skip
with the reason. So every branch — the GPU goals included — is unit-tested on any machine by
injecting measurements (``tests/test_doctor.py``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

PASS, FAIL, SKIP = "pass", "fail", "skip"

#: images/s of VECA-B/16 at C = 64 (bf16) over a flash-attention ViT-B/16, forward and training step
SPEED_GOALS: dict[int, float] = {1024: 1.7, 2048: 4.0}
GOAL_WIDTH = 64
GOAL_FAMILY = "base"

#: peak memory is judged linear in the patch count when the per-patch cost of the largest step up in
#: resolution is at most this many times that of the step before. Linear memory gives ~1; memory
#: quadratic in the patches (materialised N x N scores) gives (n3 + n2) / (n2 + n1) = 4 for each
#: doubling of the side; 1.5 sits between with room for allocator rounding.
LINEAR_SLOPE_RATIO = 1.5

DEFAULT_RESOLUTIONS = {"cuda": (224, 512, 1024, 2048), "cpu": (224,)}
TOKENS_PER_BATCH = 16384  # CUDA: images per batch = this / patches, so every resolution fills the GPU alike


@dataclass(frozen=True)
class Verdict:
    status: str
    detail: str


@dataclass(frozen=True)
class Machine:
    """What a check's skip rule needs to know about the machine (gathered once by the CLI)."""

    device: str  # "cuda" | "cpu"
    gpus: int = 0
    faiss: bool = False
    faiss_gpus: int = 0
    compiler: bool = True  # a C++ compiler for inductor's CPU code


def skip_reason(check: str, machine: Machine) -> str | None:
    """Why ``check`` cannot run on ``machine`` (None: it runs, perhaps in its CPU form)."""
    if check == "knn" and not machine.faiss:
        return ("faiss is not installed: pip install 'veca-ssl[faiss]' (CPU build) or 'veca-ssl[gpu]' "
                "(faiss-gpu) to compare it with the torch k-NN")
    if check == "compile" and machine.device == "cpu" and not machine.compiler:
        return "torch.compile's CPU backend (inductor) needs a C++ compiler; none found (install gcc or clang)"
    return None


def knn_mode(machine: Machine, bank: int | None) -> tuple[str, int, str | None]:
    """(faiss index kind, bank size, note): faiss GPU on 100k x 768 where faiss sees a GPU, else
    faiss-cpu on a smaller bank (exact flat search is O(bank x queries) on the CPU)."""
    if machine.faiss_gpus > 0:
        return "gpu", bank or 100_000, None
    note = (f"faiss sees no GPU here, so faiss-cpu on a {bank or 20_000}-vector bank (faiss GPU: 100k on a GPU "
            f"machine with faiss-gpu)")
    return "cpu", bank or 20_000, note


def two_process_backend(machine: Machine) -> tuple[str, str, str | None]:
    """(device, process-group backend, note) of the 2-process resume check: NCCL on two GPUs, gloo on
    the CPU otherwise (with why)."""
    if machine.device == "cuda" and machine.gpus >= 2:
        return "cuda", "nccl", None
    why = "one GPU" if machine.device == "cuda" else "no GPU"
    return "cpu", "gloo", f"{why}: 2 CPU processes under gloo (NCCL needs 2 GPUs)"


def plan_resolutions(requested: Sequence[int] | None, device: str) -> tuple[list[int], dict[int, str]]:
    """(resolutions to measure, {resolution: why not}). What is asked for runs; by default a CPU
    measures 224 px only and says why the goal resolutions are left out."""
    if requested:
        return sorted(set(int(r) for r in requested)), {}
    run = list(DEFAULT_RESOLUTIONS["cuda" if device == "cuda" else "cpu"])
    skipped = {r: "too slow on a CPU; ask for it with --resolutions" for r in DEFAULT_RESOLUTIONS["cuda"]
               if r not in run}
    return run, skipped


def batch_for(resolution: int, patch_size: int, device: str, tokens: int = TOKENS_PER_BATCH,
              requested: int | None = None) -> int:
    """Images per batch: ``requested``, else 1 on a CPU, else enough images for ``tokens`` patches."""
    if requested:
        return int(requested)
    if device != "cuda":
        return 1
    patches = (resolution // patch_size) ** 2
    return max(1, min(256, tokens // patches))


def speed_goals(rows: Sequence[dict], kind: str, family: str, judged: bool,
                goals: dict[int, float] = SPEED_GOALS, width: int = GOAL_WIDTH) -> list[dict]:
    """One record per goal resolution: VECA at ``width`` vs the dense ViT, images/s ratio against the
    target. ``rows`` hold ``resolution``, ``cores`` (None for the dense ViT) and ``speedup_vs_dense``.
    ``judged`` is False off a GPU: the goals are GPU goals, so the records then say skip."""
    out = []
    for res, target in goals.items():
        name = f"{kind} {res}px: VECA-{family[0].upper()}/16 C{width} >= {target:g}x ViT images/s"
        row = next((r for r in rows if r["resolution"] == res and r.get("cores") == width), None)
        measured = None if row is None else float(row["speedup_vs_dense"])
        if row is None:
            status, why = SKIP, f"{res} px not measured (--resolutions)"
        elif not judged:
            status, why = SKIP, "goals are judged on a GPU"
        elif family != GOAL_FAMILY:
            status, why = SKIP, f"goals are defined for VECA-B/16 vs ViT-B/16, this run measured {family}"
        elif not math.isfinite(measured):
            status, why = FAIL, "ratio is not finite"
        else:
            status, why = (PASS, "") if measured >= target else (FAIL, f"{measured:.2f}x < {target:g}x")
        out.append({"goal": name, "kind": kind, "resolution": res, "target": target, "measured": measured,
                    "status": status, "reason": why})
    return out


def memory_linearity(points: Sequence[tuple[int, float | None]],
                     max_ratio: float = LINEAR_SLOPE_RATIO) -> Verdict:
    """Is peak memory (bytes, per image) linear in the patch count? ``points``: (patches, bytes).

    The per-patch slope of the largest step up is compared with the step before it; needs three
    resolutions. Memory that does not grow at all is reported as not resolved (what a CPU's
    high-water mark gives for tiny activations), not as linear.
    """
    pts = sorted((int(n), float(m)) for n, m in points if m is not None and math.isfinite(float(m)))
    if len(pts) < 3:
        return Verdict(SKIP, f"needs 3 resolutions with a memory reading, got {len(pts)}")
    (n1, m1), (n2, m2), (n3, m3) = pts[-3:]
    before, last = (m2 - m1) / (n2 - n1), (m3 - m2) / (n3 - n2)
    per_k = f"{before * 1024 / 2**20:.3g} then {last * 1024 / 2**20:.3g} MiB per 1k patches"
    if before <= 0 or last <= 0:
        return Verdict(FAIL, f"memory does not grow with the patches ({per_k}): not resolved")
    ratio = last / before
    status = PASS if ratio <= max_ratio else FAIL
    return Verdict(status, f"{per_k} (ratio {ratio:.2f}, linear if <= {max_ratio:g})")


def within(measured: dict[str, float], tolerances: dict[str, float]) -> Verdict:
    """Every ``measured[k] <= tolerances[k]`` (finite); the detail names the first that is not."""
    for key, tol in tolerances.items():
        value = measured.get(key)
        if value is None or not math.isfinite(value):
            return Verdict(FAIL, f"{key} is {value}")
        if value > tol:
            return Verdict(FAIL, f"{key} = {value:.3g} > {tol:g}")
    return Verdict(PASS, ", ".join(f"{k} {measured[k]:.2g} <= {t:g}" for k, t in tolerances.items()))


def overall(statuses: Sequence[str]) -> str:
    """A check made of parts: fail if any part failed, else pass if any passed, else skip."""
    if FAIL in statuses:
        return FAIL
    return PASS if PASS in statuses else SKIP


def exit_code(statuses: Sequence[str]) -> int:
    """0 when nothing failed (skips are fine), 1 when a check failed."""
    return 1 if FAIL in statuses else 0
