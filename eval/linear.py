"""Linear probe on frozen features — the DINOv2 protocol (arXiv:2304.07193, §7 and its eval code).

Many ``nn.Linear`` heads are trained at once in one module, one per (feature set, learning rate):
feature sets are the image feature of the last block or the concatenation over the last 4 blocks, each
with or without the mean patch token of the last block; learning rates span the DINOv2 grid scaled by
``batch / 256``. SGD with momentum 0.9 and a cosine schedule, heads initialised N(0, 0.01). The head
with the best top-1 on a validation split (held out of train with a fixed seed when none is given) is
then reported on the test set, with a bootstrap interval over the test images. Features are cached,
so each iteration is a few matrix products. Training length: ``epochs`` (10, DINOv2's) epochs of one
pass over the training split each, at least 125 iterations (:func:`iterations_per_epoch`; DINOv2's
1250 iterations are one pass over ImageNet-1k).

``veca eval linear --checkpoint CKPT --train SPEC --test SPEC`` (also ``python -m eval.linear``).
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from eval.common import few_threads_if_small
from eval.config import DINOV2_LRS, MIN_EPOCH_LENGTH, LinearProbeConfig
from eval.stats import mean_ci, with_ci
from veca_ssl.features import FeatureSet
from veca_ssl.knn import topk_accuracy
from veca_ssl.progress import track
from veca_ssl.widths import width_label

__all__ = ["DINOV2_LRS", "LinearProbeConfig", "LinearHeads", "linear_inputs", "linear_probe", "run_linear",
           "split_holdout", "train_heads", "evaluate_heads", "iterations_per_epoch"]

log = logging.getLogger("eval")


def iterations_per_epoch(n_train: int, cfg: LinearProbeConfig) -> int:
    """``cfg.epoch_length``, or by default one pass over the ``n_train`` training items, ceil(N / batch),
    but at least ``MIN_EPOCH_LENGTH`` (125).

    DINOv2 fixes 1250 iterations per "epoch" at 128 images per GPU on 8 GPUs: 1.28M images, one pass over
    ImageNet-1k's 1,281,167. The same 1250 on a few thousand images is hundreds of passes (and minutes of
    training), so the default keeps DINOv2's meaning — an epoch is one pass — rather than its number;
    the floor keeps enough SGD steps on small sets, where one pass is only a handful of iterations.
    """
    return cfg.epoch_length or max(MIN_EPOCH_LENGTH, math.ceil(n_train / cfg.batch_size))


def linear_inputs(fs: FeatureSet, n_last_blocks: Sequence[int] = (1, 4),
                  avgpool: Sequence[bool] = (False, True)) -> dict[str, torch.Tensor]:
    """DINOv2 ``create_linear_input`` for every feature set: ``{"blocks4+avgpool": (N, 5D), …}``.

    ``n`` larger than the number of extracted blocks is clipped (shallow test models); duplicates
    after clipping are dropped.
    """
    out: dict[str, torch.Tensor] = {}
    available = fs.cls.shape[1]
    for n in dict.fromkeys(min(n, available) for n in n_last_blocks):
        cls = fs.cls[:, -n:].flatten(1).float()
        for pool in avgpool:
            if pool and fs.patch_mean is None:
                continue
            name = f"blocks{n}" + ("+avgpool" if pool else "")
            out[name] = torch.cat([cls, fs.patch_mean.float()], dim=1) if pool else cls
    return out


class LinearHeads(nn.Module):
    """Every probe head in one fused module: per feature set one (H, D, C) weight for its H learning rates.

    ``forward(inputs)`` → ``{feature_set: logits (H, B, C)}``; head ``h`` of a feature set is the
    linear classifier trained with ``lrs[h]``. One matrix product per feature set serves all heads.
    """

    def __init__(self, in_dims: dict[str, int], lrs: Sequence[float], num_classes: int):
        super().__init__()
        self.lrs = tuple(float(lr) for lr in lrs)
        self.features = list(in_dims)
        self.weight = nn.ParameterList()
        self.bias = nn.ParameterList()
        for dim in in_dims.values():
            w = torch.empty(len(self.lrs), dim, num_classes)
            nn.init.normal_(w, std=0.01)  # DINOv2 LinearClassifier init: N(0, 0.01), zero bias
            self.weight.append(nn.Parameter(w))
            self.bias.append(nn.Parameter(torch.zeros(len(self.lrs), num_classes)))

    @property
    def head_names(self) -> list[str]:
        return [f"{feat}_lr{lr:g}" for feat in self.features for lr in self.lrs]

    def forward(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {feat: torch.einsum("bd,hdc->hbc", inputs[feat], w) + b[:, None, :]
                for feat, w, b in zip(self.features, self.weight, self.bias)}

    def logits_by_head(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{head_name: logits (B, C)}`` in :attr:`head_names` order."""
        out = {}
        for feat, logits in self.forward(inputs).items():
            for lr, lg in zip(self.lrs, logits):
                out[f"{feat}_lr{lr:g}"] = lg
        return out


def split_holdout(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed-seed random split of ``range(n)`` into (train, held-out) index tensors."""
    if not 0 < fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {fraction}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = max(1, round(n * fraction))
    if n_val >= n:
        raise ValueError(f"training set of {n} items is too small to hold out a validation split")
    return perm[n_val:], perm[:n_val]


def train_heads(inputs: dict[str, torch.Tensor], labels: torch.Tensor, num_classes: int,
                cfg: LinearProbeConfig, device: torch.device | str = "cpu", seed: int = 0,
                progress: bool = False, desc: str = "linear probe") -> LinearHeads:
    """Train every head together: SGD with momentum, per-head learning rate, per-iteration cosine decay.

    The update is ``torch.optim.SGD``'s (``buf = momentum·buf + grad + wd·w; w -= lr·buf``), applied
    to the fused weights with a learning-rate vector over heads instead of one parameter group per head.
    ``epochs × iterations_per_epoch(N)`` steps; ``seed`` fixes the initial weights and the batch order.
    """
    device = torch.device(device)
    torch.manual_seed(seed)
    heads = LinearHeads({k: v.shape[1] for k, v in inputs.items()}, cfg.lrs, num_classes).to(device)
    # DINOv2 scales the grid by (batch × world) / 256.
    base_lr = torch.tensor(heads.lrs, device=device) * cfg.batch_size / 256
    n = labels.shape[0]
    total = cfg.epochs * iterations_per_epoch(n, cfg)
    x = {k: v.to(device).float() for k, v in inputs.items()}
    y = labels.to(device).long()
    n_heads = len(heads.lrs)
    heads.train()
    step_flops = 6 * cfg.batch_size * sum(v.shape[1] for v in x.values()) * n_heads * num_classes
    with few_threads_if_small(step_flops):
        _sgd_loop(heads, x, y, base_lr, cfg, total, num_classes, n, seed, progress, desc)
    return heads.eval()


def _sgd_loop(heads: LinearHeads, x: dict[str, torch.Tensor], y: torch.Tensor, base_lr: torch.Tensor,
              cfg: LinearProbeConfig, total: int, num_classes: int, n: int, seed: int, progress: bool,
              desc: str) -> None:
    params = list(heads.parameters())
    bufs = [torch.zeros_like(p) for p in params]
    n_heads = len(heads.lrs)
    gen = torch.Generator().manual_seed(seed)
    order, cursor = torch.randperm(n, generator=gen), 0
    device = y.device
    for step in track(range(total), desc=desc, unit="step", bar=progress):
        if cursor + cfg.batch_size > n and cursor > 0:  # reshuffle once the data is used up
            order, cursor = torch.randperm(n, generator=gen), 0
        batch = order[cursor:cursor + cfg.batch_size].to(device)
        cursor += cfg.batch_size
        yb = y[batch].repeat(n_heads)
        # Heads are independent, so the sum of their mean losses gives each head exactly its own gradient.
        loss = sum(F.cross_entropy(lg.reshape(-1, num_classes), yb) * n_heads
                   for lg in heads({k: v[batch] for k, v in x.items()}).values())
        for p in params:
            p.grad = None
        loss.backward()
        lr = base_lr * 0.5 * (1 + math.cos(math.pi * step / total))
        with torch.no_grad():
            for p, buf in zip(params, bufs):
                g = p.grad if cfg.weight_decay == 0 else p.grad + cfg.weight_decay * p
                buf.mul_(cfg.momentum).add_(g)
                p.sub_(lr.view(-1, *([1] * (p.ndim - 1))) * buf)


@torch.no_grad()
def head_logits(heads: LinearHeads, inputs: dict[str, torch.Tensor], batch_size: int = 4096) -> dict[str, torch.Tensor]:
    """``{head: logits (N, C)}`` of every head, on the CPU."""
    device = next(heads.parameters()).device
    n = next(iter(inputs.values())).shape[0]
    logits: dict[str, list[torch.Tensor]] = {}
    for start in range(0, n, batch_size):
        out = heads.logits_by_head({k: v[start:start + batch_size].to(device).float() for k, v in inputs.items()})
        for name, lg in out.items():
            logits.setdefault(name, []).append(lg.cpu())
    return {name: torch.cat(lg) for name, lg in logits.items()}


def evaluate_heads(heads: LinearHeads, inputs: dict[str, torch.Tensor], labels: torch.Tensor,
                   batch_size: int = 4096) -> dict[str, dict[str, float]]:
    """``{head: {"top1": %, "top5": %}}`` of every head."""
    y = labels.cpu().long()
    return {name: {"top1": topk_accuracy(lg, y, 1), "top5": topk_accuracy(lg, y, 5)}
            for name, lg in head_logits(heads, inputs, batch_size).items()}


def linear_probe(train: FeatureSet, test: FeatureSet, val: FeatureSet | None = None,
                 cfg: LinearProbeConfig | None = None, num_classes: int | None = None,
                 device: torch.device | str = "cpu", seed: int = 0, bootstrap: int = 0, progress: bool = False,
                 desc: str = "linear probe") -> dict[str, float | str]:
    """Train all heads on ``train``, pick the best on ``val`` (or a held-out split), report on ``test``.

    Returns ``{"linear_top1", "linear_top5", "linear_val_top1", "linear_head", "linear_iterations"}``
    (accuracies in %), and ``linear_top1_ci_lo``/``_ci_hi`` with ``bootstrap > 0`` resamples.
    """
    cfg = cfg or LinearProbeConfig()
    train_x = linear_inputs(train, cfg.n_last_blocks, cfg.avgpool)
    test_x = linear_inputs(test, cfg.n_last_blocks, cfg.avgpool)
    train_y, test_y = train.labels, test.labels
    if val is not None:
        val_x, val_y = linear_inputs(val, cfg.n_last_blocks, cfg.avgpool), val.labels
    else:
        tr_idx, va_idx = split_holdout(len(train), cfg.val_fraction, seed)
        val_x, val_y = {k: v[va_idx] for k, v in train_x.items()}, train_y[va_idx]
        train_x, train_y = {k: v[tr_idx] for k, v in train_x.items()}, train_y[tr_idx]
    if num_classes is None:
        num_classes = int(max(train_y.max(), val_y.max(), test_y.max())) + 1
    iterations = cfg.epochs * iterations_per_epoch(len(train_y), cfg)
    heads = train_heads(train_x, train_y, num_classes, cfg, device, seed=seed, progress=progress, desc=desc)
    val_scores = evaluate_heads(heads, val_x, val_y)
    # Best val top-1; ties go to the earlier head (smaller feature set, smaller lr) deterministically.
    best = max(val_scores, key=lambda name: val_scores[name]["top1"])
    logits = head_logits(heads, test_x)[best]
    y = test_y.cpu().long()
    out: dict[str, float | str] = {"linear_top1": topk_accuracy(logits, y, 1), "linear_top5": topk_accuracy(logits, y, 5),
                                   "linear_val_top1": val_scores[best]["top1"], "linear_head": best,
                                   "linear_iterations": iterations}
    if bootstrap and y.numel():
        hits = (logits.argmax(1) == y).float()
        with_ci(out, "linear_top1", mean_ci(hits, bootstrap, seed=seed, scale=100.0))
    return out


def run_linear(train_sets: dict, test_sets: dict, val_sets: dict | None = None,
               cfg: LinearProbeConfig | None = None, device: torch.device | str = "cpu", seed: int = 0,
               bootstrap: int = 0, progress: bool = False) -> dict:
    """Linear probe at every width: ``{width: metrics}``."""
    cfg = cfg or LinearProbeConfig()
    out = {}
    for w in train_sets:
        n = len(train_sets[w]) if val_sets else len(split_holdout(len(train_sets[w]), cfg.val_fraction, seed)[0])
        per_epoch = iterations_per_epoch(n, cfg)
        log.info("linear probe %s: %d epochs x %d iterations at batch %d (%d training items), %d learning rates",
                 width_label(w), cfg.epochs, per_epoch, cfg.batch_size, n, len(cfg.lrs))
        out[w] = linear_probe(train_sets[w], test_sets[w], val_sets[w] if val_sets else None, cfg, device=device,
                              seed=seed, bootstrap=bootstrap, progress=progress,
                              desc=f"linear probe {width_label(w)}")
        log.info("linear probe %s: top-1 %.2f%% (head %s)", width_label(w), out[w]["linear_top1"],
                 out[w]["linear_head"])
    return out


def main(argv: list[str] | None = None) -> int:
    from eval.cli import protocol_main

    return protocol_main("linear", argv)


if __name__ == "__main__":
    sys.exit(main())
