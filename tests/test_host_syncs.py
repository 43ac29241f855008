"""One host synchronisation per training step.

On an accelerator every ``.item()``, ``.tolist()``, ``float(t)``, ``if t.any():`` or boolean-mask index
makes the CPU wait until the device has finished everything queued before it: the step runs at the
pace of its slowest round trip. The loop gathers what the host must know (the finiteness check, the
logged losses and gradient norms, the skip counts, the stop flag) into one tensor and reads it once.

The spy wraps the tensor methods that copy device values to the host, plus the operations whose
output size depends on tensor values (``nonzero``, ``masked_select``, boolean-mask indexing), and counts
their calls inside ``train_step``. Not counted: loading the batch (CPU work of the data pipeline),
writing a checkpoint (saving weights needs them on the host) and the optimiser's step counters,
which PyTorch keeps on the CPU by design (``torch.optim.AdamW`` reads them with ``.item()``; so does
``ElasticAdamW``), so reading them never waits for the device.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from pathlib import Path

import pytest
import torch
from test_train import TINY

from veca_ssl.config import load_config
from veca_ssl.models import build_backbone, save_backbone
from veca_ssl.train import loop
from veca_ssl.train.data import TrainData

STEPS = 4
_METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__", "nonzero",
            "masked_select")
_FUNCTIONS = ("nonzero", "masked_select", "argwhere")


def _bool_index(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(torch.is_tensor(i) and i.dtype == torch.bool for i in items)


class SyncSpy:
    """Counts host syncs (by kind) while ``active``; the optimiser's step counters are host-resident."""

    def __init__(self) -> None:
        self.active = False
        self.calls: Counter[str] = Counter()
        self.optimizer: torch.optim.Optimizer | None = None

    def _host_resident(self, t: torch.Tensor) -> bool:
        if self.optimizer is None:
            return False
        counters = {s["step"].untyped_storage().data_ptr() for s in self.optimizer.state.values()
                    if torch.is_tensor(s.get("step"))}
        return t.untyped_storage().data_ptr() in counters

    def wrap_method(self, name: str, original):
        spy = self

        def wrapper(t, *args, **kwargs):
            if spy.active and not spy._host_resident(t):
                spy.calls[name] += 1
            return original(t, *args, **kwargs)
        return wrapper

    def wrap_index(self, name: str, original):
        spy = self

        def wrapper(t, index, *args):
            if spy.active and _bool_index(index):
                spy.calls[f"{name}[bool mask]"] += 1
            return original(t, index, *args)
        return wrapper

    def wrap_function(self, name: str, original):
        spy = self

        def wrapper(*args, **kwargs):
            if spy.active:
                spy.calls[f"torch.{name}"] += 1
            return original(*args, **kwargs)
        return wrapper

    @contextlib.contextmanager
    def paused(self):
        was, self.active = self.active, False
        try:
            yield
        finally:
            self.active = was


@pytest.fixture
def spy(monkeypatch) -> SyncSpy:
    spy = SyncSpy()
    for name in _METHODS:
        monkeypatch.setattr(torch.Tensor, name, spy.wrap_method(name, getattr(torch.Tensor, name)))
    for name in ("__getitem__", "__setitem__"):
        monkeypatch.setattr(torch.Tensor, name, spy.wrap_index(name, getattr(torch.Tensor, name)))
    for name in _FUNCTIONS:
        monkeypatch.setattr(torch, name, spy.wrap_function(name, getattr(torch, name)))
    # loading a batch and writing a checkpoint are not part of the step's computation
    next_batch, save = TrainData.__next__, loop._save_checkpoint

    def next_paused(self):
        with spy.paused():
            return next_batch(self)

    def save_paused(*args, **kwargs):
        with spy.paused():
            return save(*args, **kwargs)

    monkeypatch.setattr(TrainData, "__next__", next_paused)
    monkeypatch.setattr(loop, "_save_checkpoint", save_paused)
    return spy


def _syncs_per_step(spy: SyncSpy, overrides: list[str]) -> list[Counter]:
    cfg = load_config(None, overrides)
    run = loop.setup(cfg)
    spy.optimizer = run.optimizer
    per_step = []
    try:
        for step in range(STEPS):
            spy.calls = Counter()
            spy.active = True
            try:
                loop.train_step(run, step)
            finally:
                spy.active = False
            per_step.append(spy.calls)
        loop.finish(run, STEPS)
    finally:
        if run.lock is not None:
            run.lock.release()
    return per_step


@pytest.fixture(scope="module")
def frozen_teacher(tmp_path_factory) -> str:
    torch.manual_seed(0)
    teacher = build_backbone("vit_tiny", patch_size=8, embed_dim=32, depth=2, num_heads=2)
    return str(save_backbone(teacher, tmp_path_factory.mktemp("frozen") / "teacher.safetensors"))


RUNS = {
    "ssl-veca": [],
    "ssl-vit": ["model.name=vit_tiny", "model.overrides={embed_dim: 32, depth: 2, num_heads: 2}"],
    "ssl-veca-sandwich-sinkhorn": ["widths.policy=sandwich", "dino.centering=sinkhorn_knopp"],
    "distill-veca": ["mode=distill", "crops.num_local=0", "widths.policy=sandwich"],
}


@pytest.mark.parametrize("log_every", [1, 100])
@pytest.mark.parametrize("kind", list(RUNS))
def test_one_host_sync_per_training_step(tmp_path: Path, spy: SyncSpy, frozen_teacher: str, kind: str,
                                         log_every: int) -> None:
    extra = [f"distill.teacher={frozen_teacher}"] if kind.startswith("distill") else []
    overrides = [*TINY, *RUNS[kind], *extra, f"train.log_every={log_every}", "train.checkpoint_every=1000",
                 f"train.max_steps={STEPS}", f"output_dir={tmp_path / 'run'}"]
    per_step = _syncs_per_step(spy, overrides)
    print(kind, f"log_every={log_every}", [dict(c) for c in per_step])
    for step, calls in enumerate(per_step):
        assert sum(calls.values()) == 1, f"step {step}: host syncs {dict(calls)}"


def test_masked_patches_by_index_are_the_boolean_mask_selection_bit_for_bit():
    """The collate's indices give exactly ``patches[masks]`` and ``mask_weights[masks]``: same rows, same
    order (row-major over the batch), so the iBOT loss is unchanged to the last bit."""
    from veca_ssl.data import MaskingGenerator, MultiCropTransform, SSLDataset, build_dataset
    from veca_ssl.method.ssl import masked_patches, with_mask_index

    base = build_dataset("synthetic:n=16,size=32,classes=4,seed=0")
    data = SSLDataset(base, MultiCropTransform(global_size=32, local_size=16, num_local_crops=0),
                      MaskingGenerator((4, 4)), patch_size=8, mask_probability=0.5, mask_ratio=(0.1, 0.5))
    batch = data.collate_fn([data[(i, 100 + i)] for i in range(8)])
    masks = batch["masks"]
    assert 0 < batch["n_masked_patches"] == int(masks.sum()) < masks.numel()  # some images masked, not all
    patches = torch.randn(*masks.shape, 5)
    assert torch.equal(masked_patches(patches, masks, batch["mask_indices"]), patches[masks])
    assert torch.equal(batch["masked_patch_weights"], batch["mask_weights"][masks])
    derived = with_mask_index({k: v for k, v in batch.items() if k not in ("mask_indices", "masked_patch_weights",
                                                                           "n_masked_patches")})
    assert torch.equal(derived["mask_indices"], batch["mask_indices"])  # a batch built by hand gets the same
