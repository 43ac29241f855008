"""Linear probe on frozen features — the DINOv2 protocol (arXiv:2304.07193, §7 and its eval code).

Many ``nn.Linear`` heads are trained at once in one module, one per (feature set, learning rate):
feature sets are the image feature of the last block or the concatenation over the last 4 blocks, each
with or without the mean patch token of the last block; learning rates span the DINOv2 grid scaled by
``batch / 256``. SGD with momentum 0.9 and a cosine schedule, heads initialised N(0, 0.01). The head
with the best top-1 on a validation split (held out of train with a fixed seed when none is given) is
then reported on the test set. Features are cached, so each epoch is a few matrix products.

``python -m eval.linear --checkpoint CKPT --train SPEC --test SPEC`` / ``veca eval linear``.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from eval.common import few_threads_if_small
from veca_ssl.features import FeatureSet
from veca_ssl.knn import topk_accuracy

#: DINOv2 learning-rate grid (``eval/linear.py``), scaled by batch size / 256.
DINOV2_LRS: tuple[float, ...] = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2,
                                 5e-2, 1e-1)


@dataclass
class LinearProbeConfig:
    """Hyper-parameters of the linear probe (defaults follow DINOv2 where it has one)."""

    epochs: int = 10
    epoch_length: int | None = 1250  # DINOv2: iterations per "epoch"; None = one pass over the data
    batch_size: int = 128
    lrs: Sequence[float] = DINOV2_LRS
    momentum: float = 0.9
    weight_decay: float = 0.0
    val_fraction: float = 0.1  # held out of train when no validation set is given
    seed: int = 0
    n_last_blocks: Sequence[int] = field(default_factory=lambda: (1, 4))
    avgpool: Sequence[bool] = (False, True)


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
                cfg: LinearProbeConfig, device: torch.device | str = "cpu") -> LinearHeads:
    """Train every head together: SGD with momentum, per-head learning rate, per-iteration cosine decay.

    The update is ``torch.optim.SGD``'s (``buf = momentum·buf + grad + wd·w; w -= lr·buf``), applied
    to the fused weights with a learning-rate vector over heads instead of one parameter group per head.
    """
    device = torch.device(device)
    torch.manual_seed(cfg.seed)
    heads = LinearHeads({k: v.shape[1] for k, v in inputs.items()}, cfg.lrs, num_classes).to(device)
    # DINOv2 scales the grid by (batch × world) / 256.
    base_lr = torch.tensor(heads.lrs, device=device) * cfg.batch_size / 256
    n = labels.shape[0]
    steps_per_epoch = cfg.epoch_length or math.ceil(n / cfg.batch_size)
    total = max(1, cfg.epochs * steps_per_epoch)
    x = {k: v.to(device).float() for k, v in inputs.items()}
    y = labels.to(device).long()
    n_heads = len(heads.lrs)
    heads.train()
    step_flops = 6 * cfg.batch_size * sum(v.shape[1] for v in x.values()) * n_heads * num_classes
    with few_threads_if_small(step_flops):
        _sgd_loop(heads, x, y, base_lr, cfg, total, num_classes, n)
    return heads.eval()


def _sgd_loop(heads: LinearHeads, x: dict[str, torch.Tensor], y: torch.Tensor, base_lr: torch.Tensor,
              cfg: LinearProbeConfig, total: int, num_classes: int, n: int) -> None:
    params = list(heads.parameters())
    bufs = [torch.zeros_like(p) for p in params]
    n_heads = len(heads.lrs)
    gen = torch.Generator().manual_seed(cfg.seed)
    order, cursor = torch.randperm(n, generator=gen), 0
    device = y.device
    for step in range(total):
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
def evaluate_heads(heads: LinearHeads, inputs: dict[str, torch.Tensor], labels: torch.Tensor,
                   batch_size: int = 4096) -> dict[str, dict[str, float]]:
    """``{head: {"top1": %, "top5": %}}`` of every head."""
    device = next(heads.parameters()).device
    logits: dict[str, list[torch.Tensor]] = {}
    for start in range(0, labels.shape[0], batch_size):
        out = heads.logits_by_head({k: v[start:start + batch_size].to(device).float() for k, v in inputs.items()})
        for name, lg in out.items():
            logits.setdefault(name, []).append(lg.cpu())
    y = labels.cpu().long()
    return {name: {"top1": topk_accuracy(torch.cat(lg), y, 1), "top5": topk_accuracy(torch.cat(lg), y, 5)}
            for name, lg in logits.items()}


def linear_probe(train: FeatureSet, test: FeatureSet, val: FeatureSet | None = None,
                 cfg: LinearProbeConfig | None = None, num_classes: int | None = None,
                 device: torch.device | str = "cpu") -> dict[str, float | str]:
    """Train all heads on ``train``, pick the best on ``val`` (or a held-out split), report on ``test``.

    Returns ``{"linear_top1", "linear_top5", "linear_val_top1", "linear_head"}`` (accuracies in %).
    """
    cfg = cfg or LinearProbeConfig()
    train_x = linear_inputs(train, cfg.n_last_blocks, cfg.avgpool)
    test_x = linear_inputs(test, cfg.n_last_blocks, cfg.avgpool)
    train_y, test_y = train.labels, test.labels
    if val is not None:
        val_x, val_y = linear_inputs(val, cfg.n_last_blocks, cfg.avgpool), val.labels
    else:
        tr_idx, va_idx = split_holdout(len(train), cfg.val_fraction, cfg.seed)
        val_x, val_y = {k: v[va_idx] for k, v in train_x.items()}, train_y[va_idx]
        train_x, train_y = {k: v[tr_idx] for k, v in train_x.items()}, train_y[tr_idx]
    if num_classes is None:
        num_classes = int(max(train_y.max(), val_y.max(), test_y.max())) + 1
    heads = train_heads(train_x, train_y, num_classes, cfg, device)
    val_scores = evaluate_heads(heads, val_x, val_y)
    # Best val top-1; ties go to the earlier head (smaller feature set, smaller lr) deterministically.
    best = max(val_scores, key=lambda name: val_scores[name]["top1"])
    test_scores = evaluate_heads(heads, {k: v for k, v in test_x.items()}, test_y)[best]
    return {"linear_top1": test_scores["top1"], "linear_top5": test_scores["top5"],
            "linear_val_top1": val_scores[best]["top1"], "linear_head": best}


def run_linear(train_sets: dict, test_sets: dict, val_sets: dict | None = None,
               cfg: LinearProbeConfig | None = None, device: torch.device | str = "cpu") -> dict:
    """Linear probe at every width: ``{width: metrics}``."""
    return {w: linear_probe(train_sets[w], test_sets[w], val_sets[w] if val_sets else None, cfg,
                            device=device) for w in train_sets}


def build_parser() -> argparse.ArgumentParser:
    from eval.common import add_data_args, add_model_args, add_run_args

    p = argparse.ArgumentParser(prog="veca eval linear", description=__doc__.split("\n")[0])
    add_model_args(p)
    add_data_args(p)
    add_run_args(p)
    g = p.add_argument_group("linear probe")
    g.add_argument("--epochs", type=int, default=10)
    g.add_argument("--epoch-length", type=int, default=1250,
                   help="iterations per epoch (DINOv2: 1250); 0 = one pass over the training data")
    g.add_argument("--probe-batch-size", type=int, default=128, help="batch size of head training")
    g.add_argument("--lrs", default=",".join(f"{lr:g}" for lr in DINOV2_LRS), help="base lr grid")
    g.add_argument("--val-fraction", type=float, default=0.1, help="held out of train without --val")
    return p


def config_from_args(args: argparse.Namespace) -> LinearProbeConfig:
    return LinearProbeConfig(epochs=args.epochs, epoch_length=args.epoch_length or None,
                             batch_size=args.probe_batch_size,
                             lrs=tuple(float(x) for x in args.lrs.split(",") if x.strip()),
                             val_fraction=args.val_fraction, seed=args.seed)


def main(argv: list[str] | None = None) -> int:
    from eval.common import classification_features, setup
    from eval.report import finish_report

    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    ctx = setup(args)
    train_sets, test_sets, val_sets = classification_features(
        ctx, args, n_last_blocks=max(cfg.n_last_blocks), patch_mean=True)
    metrics = run_linear(train_sets, test_sets, val_sets, cfg, ctx.device)
    finish_report(ctx, args, metrics, title="Linear probe", protocol="linear")
    return 0


if __name__ == "__main__":
    sys.exit(main())
