"""iBOT block masks, SSL samples, multi-crop collation and the infinite distributed sampler."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from veca_ssl.data import (
    InfiniteSampler,
    MaskingGenerator,
    MultiCropTransform,
    SSLDataset,
    build_dataset,
    collate_multicrop,
    sample_seed,
)


@pytest.mark.parametrize("grid", [(14, 14), (4, 7), (2, 2), (1, 5)])
def test_mask_count_is_exact_for_every_target(grid):
    gen = MaskingGenerator(grid)
    n = grid[0] * grid[1]
    rng = np.random.default_rng(0)
    for k in [0, 1, n // 10, n // 3, n // 2, n - 1, n, n + 5, -3]:
        m = gen(k, rng)
        assert m.shape == grid and m.dtype == bool
        assert m.sum() == min(max(k, 0), n)


def test_default_ratio_bounds_and_blockiness():
    gen = MaskingGenerator((14, 14), min_ratio=0.1, max_ratio=0.5)
    rng = np.random.default_rng(1)
    ratios, isolated = [], []
    for _ in range(200):
        m = gen(None, rng)
        ratios.append(m.mean())
        pad = np.pad(m, 1)
        neighbours = pad[:-2, 1:-1] | pad[2:, 1:-1] | pad[1:-1, :-2] | pad[1:-1, 2:]
        isolated.append((m & ~neighbours).sum() / max(m.sum(), 1))
    assert min(ratios) >= int(0.1 * 196) / 196 and max(ratios) <= 0.5
    assert np.std(ratios) > 0.05  # the ratio really is drawn, not fixed
    assert np.mean(isolated) < 0.05  # block masking: masked patches come in connected blocks


def test_mask_is_deterministic_given_rng_and_validates_args():
    gen = MaskingGenerator((6, 6))
    assert np.array_equal(gen(12, np.random.default_rng(5)), gen(12, np.random.default_rng(5)))
    with pytest.raises(ValueError, match="min_ratio"):
        MaskingGenerator((6, 6), min_ratio=0.6, max_ratio=0.5)
    with pytest.raises(ValueError, match="grid"):
        MaskingGenerator((0, 6))


def _fake_sample(i: int, n_local: int, masked: list[int]) -> dict:
    masks = torch.zeros(2, 4, dtype=torch.bool)
    for crop, count in enumerate(masked):
        masks[crop, :count] = True
    return {
        "global": [torch.full((3, 4, 4), 10.0 * i + c) for c in range(2)],
        "local": [torch.full((3, 2, 2), 10.0 * i + 2 + c) for c in range(n_local)],
        "masks": masks,
        "label": i,
    }


def test_collate_is_crop_major_with_mask_weights():
    samples = [_fake_sample(i, 3, [i % 3, 0]) for i in range(3)]
    b = collate_multicrop(samples)
    assert b["global_crops"].shape == (6, 3, 4, 4) and b["local_crops"].shape == (9, 3, 2, 2)
    assert b["global_crops"][:, 0, 0, 0].tolist() == [0, 10, 20, 1, 11, 21]
    assert b["local_crops"][:, 0, 0, 0].tolist() == [2, 12, 22, 3, 13, 23, 4, 14, 24]
    assert b["masks"].dtype == torch.bool and b["masks"].shape == (6, 4)
    assert b["masks"].sum(1).tolist() == [0, 1, 2, 0, 0, 0]
    w = b["mask_weights"]
    assert w.dtype == torch.float32 and w.shape == (6, 4)
    assert torch.allclose(w[2], torch.tensor([0.5, 0.5, 0.0, 0.0])) and torch.allclose(w[1], torch.tensor([1.0, 0, 0, 0]))
    assert torch.equal(w.sum(1), torch.tensor([0.0, 1.0, 1.0, 0.0, 0.0, 0.0]))
    assert b["labels"].tolist() == [0, 1, 2] and b["labels"].dtype == torch.long
    empty = collate_multicrop([_fake_sample(i, 0, [1, 1]) for i in range(2)], local_size=2)
    assert empty["local_crops"].shape == (0, 3, 2, 2)


def test_ssl_dataset_sample_format_determinism_and_mask_statistics():
    base = build_dataset("digits", split="val")
    t = MultiCropTransform(global_size=32, local_size=16, num_local_crops=2)
    ds = SSLDataset(base, t, MaskingGenerator((4, 4)), patch_size=8, mask_probability=0.5, mask_ratio=(0.1, 0.5))
    s = ds[(3, 12345)]
    # masks are drawn per batch, in the collate; "skips" carries the unusable items it replaced
    assert set(s) == {"global", "local", "mask_seed", "label", "skips"} and s["skips"] == []
    assert s["label"] == int(base.targets[3])
    again = ds[(3, 12345)]
    assert all(torch.equal(a, b) for a, b in zip(s["global"] + s["local"], again["global"] + again["local"]))
    assert s["mask_seed"] == again["mask_seed"]
    assert torch.equal(ds[5]["global"][0], ds[5]["global"][0])  # int index: seed derived from it
    batches = [ds.collate_fn([ds[(i % len(ds), i)] for i in range(j, j + 10)]) for j in range(0, 150, 10)]
    assert all(b["masks"].shape == (20, 16) and b["masks"].dtype == torch.bool for b in batches)
    counts = torch.stack([b["masks"].sum(1) for b in batches]).flatten()
    masked = counts[counts > 0]
    assert len(masked) == len(counts) // 2  # exactly half of the global crops are masked
    assert masked.min() >= 1 and masked.max() <= 8  # ratio U(0.1, 0.5) of 16 patches, rounded down
    with pytest.raises(ValueError, match="patch grid"):
        SSLDataset(base, t, MaskingGenerator((2, 2)), patch_size=8)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        SSLDataset(base, t, None, patch_size=5)


def _positions(sampler: InfiniteSampler, n: int) -> list[tuple[int, int]]:
    it = iter(sampler)
    return [next(it) for _ in range(n)]


def test_sampler_world_size_invariance_resume_and_epochs():
    size, b, steps = 10, 3, 7
    one = _positions(InfiniteSampler(size, seed=4, world_size=1), 2 * b * steps)
    r0 = _positions(InfiniteSampler(size, seed=4, rank=0, world_size=2), b * steps)
    r1 = _positions(InfiniteSampler(size, seed=4, rank=1, world_size=2), b * steps)
    for s in range(steps):  # the same samples, with the same seeds, in every step
        single = sorted(one[2 * b * s : 2 * b * (s + 1)])
        split = sorted(r0[b * s : b * (s + 1)] + r1[b * s : b * (s + 1)])
        assert single == split
    resumed = _positions(InfiniteSampler(size, seed=4, rank=1, world_size=2, start=2 * b * 3), b * 2)
    assert resumed == r1[b * 3 : b * 5]
    for e in range(4):  # each epoch is a permutation; epochs differ
        assert sorted(i for i, _ in one[e * size : (e + 1) * size]) == list(range(size))
    assert [i for i, _ in one[:size]] != [i for i, _ in one[size : 2 * size]]
    seeds = [s for _, s in one]
    assert len(set(seeds)) == len(seeds) and all(0 <= s < 2**63 for s in seeds)
    assert one[5][1] == sample_seed(4, 5)
    ordered = _positions(InfiniteSampler(4, shuffle=False), 6)
    assert [i for i, _ in ordered] == [0, 1, 2, 3, 0, 1]
    with pytest.raises(ValueError, match="rank"):
        InfiniteSampler(4, rank=2, world_size=2)


def test_sampler_drives_a_dataloader_with_multicrop_collate():
    base = build_dataset("synthetic:n=8,size=32,classes=2")
    t = MultiCropTransform(global_size=32, local_size=16, num_local_crops=2)
    ds = SSLDataset(base, t, MaskingGenerator((2, 2)), patch_size=16)
    loader = DataLoader(ds, batch_size=4, sampler=InfiniteSampler(len(ds), seed=1), collate_fn=ds.collate_fn)
    it = iter(loader)
    b1, b2, b3 = next(it), next(it), next(it)
    assert b1["global_crops"].shape == (8, 3, 32, 32) and b3["local_crops"].shape == (8, 3, 16, 16)
    assert sorted(b1["labels"].tolist() + b2["labels"].tolist()) == [0, 0, 0, 0, 1, 1, 1, 1]  # one epoch
