"""The training data loader: multi-crop SSL samples with iBOT masks, from map-style or streaming data."""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from veca_ssl import distributed as dist
from veca_ssl import signals
from veca_ssl.train.multires import MultiResSchedule


def build_train_loader(cfg: DictConfig, dataset, patch_size: int, info: dist.DistInfo, start_sample: int,
                       multires: MultiResSchedule | None = None, start_step: int = 0):
    """Multi-crop + masks per sample, seeded by the sample's global position (map-style data: exact
    resume and world-size independent crops), or streamed from WebDataset shards. With ``multires``
    (a ``veca_ssl.train.multires.MultiResSchedule``) each step's global crop side and batch size follow
    the schedule from ``start_step`` on (``start_sample`` is then unused: the schedule knows it)."""
    from veca_ssl.data import (
        InfiniteSampler,
        MaskingGenerator,
        MultiCropTransform,
        SSLDataset,
        SSLIterableDataset,
    )

    c, a = cfg.crops, cfg.augment
    mask_kw = dict(mask_probability=cfg.ibot.mask_probability, mask_ratio=tuple(cfg.ibot.mask_ratio))

    def transform_and_masks(global_size: int) -> tuple[MultiCropTransform, MaskingGenerator]:
        transform = MultiCropTransform(
            global_size=global_size, local_size=c.local_size, num_local_crops=c.num_local,
            global_scale=tuple(c.global_scale), local_scale=tuple(c.local_scale),
            color_jitter=tuple(a.color_jitter), jitter_p=a.jitter_p, grayscale_p=a.grayscale_p, flip_p=a.flip_p,
            global_blur_p=tuple(a.global_blur_p), local_blur_p=a.local_blur_p, solarize_p=a.solarize_p,
            jitter_mode=a.jitter_mode)
        grid = global_size // patch_size
        return transform, MaskingGenerator(grid=(grid, grid), min_ratio=cfg.ibot.mask_ratio[0],
                                           max_ratio=cfg.ibot.mask_ratio[1])

    nw = cfg.data.num_workers
    # a private generator: creating the loader must not consume the global RNG (exact resume)
    loader_kw = dict(num_workers=nw, pin_memory=info.device.type == "cuda", persistent_workers=nw > 0,
                     prefetch_factor=4 if nw > 0 else None, generator=torch.Generator().manual_seed(cfg.seed),
                     worker_init_fn=signals.ignore_in_worker)  # stop signals: the main process decides
    if multires is not None:  # one SSL dataset per global crop side; the batch sampler picks per step
        from veca_ssl.data.multires import MultiResBatchSampler, MultiResSSLDataset

        ssl_data = MultiResSSLDataset({size: SSLDataset(dataset, *transform_and_masks(size), patch_size,
                                                        seed=cfg.seed, **mask_kw) for size in multires.sizes})
        batches = MultiResBatchSampler(len(dataset), multires, seed=cfg.seed, rank=info.rank,
                                       world_size=info.world_size, start_step=start_step)
        return torch.utils.data.DataLoader(ssl_data, batch_sampler=batches, collate_fn=ssl_data.collate_fn,
                                           **loader_kw)
    loader_kw.update(batch_size=cfg.optim.batch_size_per_gpu, drop_last=True)
    transform, mask_gen = transform_and_masks(c.global_size)
    if isinstance(dataset, torch.utils.data.IterableDataset):  # streaming shards (split by node/worker)
        ssl_data = SSLIterableDataset(dataset, transform, mask_gen, patch_size, **mask_kw)
        return torch.utils.data.DataLoader(ssl_data, collate_fn=ssl_data.collate_fn, **loader_kw)
    ssl_data = SSLDataset(dataset, transform, mask_gen, patch_size, seed=cfg.seed, **mask_kw)
    sampler = InfiniteSampler(len(dataset), seed=cfg.seed, rank=info.rank, world_size=info.world_size,
                              shuffle=True, start=start_sample)
    return torch.utils.data.DataLoader(ssl_data, sampler=sampler, collate_fn=ssl_data.collate_fn, **loader_kw)
