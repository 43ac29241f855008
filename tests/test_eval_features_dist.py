"""Distributed feature extraction: each rank a contiguous shard, all-gathered in dataset order."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from veca_ssl.features import extract_features
from veca_ssl.models import build_backbone


def _setup():
    torch.manual_seed(0)
    model = build_backbone("veca_tiny", patch_size=8, num_cores=16, depth=2, embed_dim=32, num_heads=2).eval()
    g = torch.Generator().manual_seed(3)
    data = [(torch.randn(3, 16, 16, generator=g), i) for i in range(7)]  # 7 items: uneven shards 3/4
    return model, data


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model, data = _setup()
        feats = extract_features(model, data, None, 16, batch_size=2, device="cpu", with_patches=True,
                                 progress=False)
        torch.save({w: (fs.image, fs.patches, fs.labels, fs.indices) for w, fs in feats.items()},
                   f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_gather_the_same_features_as_one_process(tmp_path) -> None:
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    model, data = _setup()
    ref = extract_features(model, data, None, 16, batch_size=2, device="cpu", with_patches=True, progress=False)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert list(got) == [8, 16]
        for w, (image, patches, labels, indices) in got.items():
            assert indices.tolist() == list(range(7)) and labels.tolist() == list(range(7))
            torch.testing.assert_close(image, ref[w].image, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(patches, ref[w].patches, rtol=1e-5, atol=1e-5)
