"""Dense probes on frozen patch tokens: linear semantic segmentation (mIoU) and linear depth (RMSE).

Following the DINOv2 "linear" dense evaluations (arXiv:2304.07193, §7.4): a BatchNorm + 1×1 conv
head on the frozen patch tokens of the last block, logits bilinearly upsampled to the mask size and
trained with cross-entropy (255 = ignore); a depth head of the same form regresses depth on valid
pixels (depth > 0). Simplifications, stated: images and targets are resized to a square eval
resolution (no sliding window), and depth is regressed directly (MSE on standardised depth) instead
of DINOv2's 256-bin classification.

Data: ``folder:/root[@split]`` (``images/`` + ``annotations/`` [+ ``depth/``] with the same file
stems, ADE20K/VOC style; loader here) and every dense spec of ``veca_ssl.data.build_dataset``
(``npz:`` with ``masks``/``depth``, ``synthetic:``) yielding ``(image, target, dense)``.

``python -m eval.dense --checkpoint CKPT --train SPEC --test SPEC`` / ``veca eval dense``.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from eval.common import few_threads_if_small, parse_dataset_spec
from veca_ssl.data.transforms import IMAGENET_MEAN, IMAGENET_STD

IGNORE_INDEX = 255
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


# ------------------------------------------------------------------------------------------- metrics
def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """(K, K) int64 counts, rows = ground truth, columns = prediction; ignored pixels dropped."""
    pred, target = pred.reshape(-1).long(), target.reshape(-1).long()
    keep = target != ignore_index
    if (target[keep] >= num_classes).any() or (target[keep] < 0).any():
        bad = int(target[keep][(target[keep] >= num_classes) | (target[keep] < 0)][0])
        raise ValueError(f"mask label {bad} outside [0, {num_classes}) and not ignore_index {ignore_index}; "
                         "set --num-classes (dense.num_classes) to the number of segmentation classes")
    flat = target[keep] * num_classes + pred[keep].clamp(0, num_classes - 1)
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def segmentation_metrics(conf: torch.Tensor) -> dict[str, float]:
    """mIoU (%) over classes present (union > 0, the mmsegmentation convention) and pixel accuracy (%)."""
    conf = conf.double()
    tp = conf.diag()
    union = conf.sum(0) + conf.sum(1) - tp
    present = union > 0
    miou = float((tp[present] / union[present]).mean() * 100) if present.any() else float("nan")
    total = conf.sum()
    acc = float(tp.sum() / total * 100) if total > 0 else float("nan")
    return {"seg_miou": miou, "seg_pixel_acc": acc}


def depth_metrics(pred: torch.Tensor, gt: torch.Tensor) -> dict[str, float]:
    """RMSE and AbsRel on valid pixels (gt > 0), per image then averaged over images (NYUv2 convention).

    ``pred``/``gt``: (N, H, W) or (H, W). Images without a valid pixel are skipped.
    """
    pred, gt = pred.double().reshape(-1, *gt.shape[-2:]), gt.double().reshape(-1, *gt.shape[-2:])
    rmse, absrel = [], []
    for p, g in zip(pred, gt):
        valid = g > 0
        if not valid.any():
            continue
        d = p[valid] - g[valid]
        rmse.append(float(d.pow(2).mean().sqrt()))
        absrel.append(float((d.abs() / g[valid]).mean()))
    if not rmse:
        return {"depth_rmse": float("nan"), "depth_absrel": float("nan")}
    return {"depth_rmse": float(np.mean(rmse)), "depth_absrel": float(np.mean(absrel))}


# ------------------------------------------------------------------------------------------- data
class SegFolderDataset(Dataset):
    """``root/images[/split]/X.jpg`` + ``root/annotations[/split]/X.png`` [+ ``root/depth[/split]/X.npy``].

    Items are ``(PIL image, -1, {"mask": uint8 HxW, "depth": float32 HxW})``. ``reduce_zero_label``
    maps label 0 to 255 and shifts the others down by one (ADE20K's "other" class).
    """

    _SPLIT_ALIASES = {"train": ("train", "training"), "val": ("val", "validation"), "test": ("test",)}
    _IMAGE_DIRS = ("images", "JPEGImages")
    _MASK_DIRS = ("annotations", "SegmentationClass")

    def __init__(self, root: str | Path, split: str | None = None, reduce_zero_label: bool = False):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"dense folder dataset not found: {str(self.root)!r}")
        image_dir = self._find(self._IMAGE_DIRS, split)
        if image_dir is None:
            raise FileNotFoundError(f"no {'/'.join(self._IMAGE_DIRS)}[/{split or ''}] folder under {str(root)!r}")
        self.images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_EXTS)
        if not self.images:
            raise ValueError(f"no images in {str(image_dir)!r}")
        mask_dir, depth_dir = self._find(self._MASK_DIRS, split), self._find(("depth",), split)
        self.masks = self._match(mask_dir, (".png",))
        self.depths = self._match(depth_dir, (".npy", ".png"))
        self.reduce_zero_label = reduce_zero_label

    def _find(self, names: tuple[str, ...], split: str | None) -> Path | None:
        subs = self._SPLIT_ALIASES.get(split, (split,)) if split else ("",)
        for name in names:
            for sub in subs:
                d = self.root / name / sub if sub else self.root / name
                if d.is_dir():
                    return d
        return None

    def _match(self, folder: Path | None, exts: tuple[str, ...]) -> list[Path] | None:
        if folder is None:
            return None
        out = []
        for img in self.images:
            found = [folder / (img.stem + e) for e in exts if (folder / (img.stem + e)).exists()]
            if not found:
                raise FileNotFoundError(f"no annotation for {img.name} in {str(folder)!r} (same stem expected)")
            out.append(found[0])
        return out

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Image.Image, int, dict[str, np.ndarray]]:
        return Image.open(self.images[i]).convert("RGB"), -1, self.dense_targets(i)

    def dense_targets(self, i: int) -> dict[str, np.ndarray]:
        dense: dict[str, np.ndarray] = {}
        if self.masks is not None:
            mask = np.array(Image.open(self.masks[i])).astype(np.int64)
            if self.reduce_zero_label:
                mask = np.where(mask == 0, 256, mask) - 1  # 0 → 255 (ignore), k → k-1
            dense["mask"] = mask.clip(0, 255).astype(np.uint8)
        if self.depths is not None:
            p = self.depths[i]
            # .png depth is 16-bit millimetres (NYUv2 convention); .npy is metres.
            dense["depth"] = (np.load(p) if p.suffix == ".npy" else np.array(Image.open(p)) / 1000.0
                              ).astype(np.float32)
        return dense


def build_dense_dataset(text: str, reduce_zero_label: bool = False) -> Dataset:
    """``folder:/root[@split]`` (or a directory holding ``images/``), else ``veca_ssl.data.build_dataset``."""
    spec, split = parse_dataset_spec(text)
    if spec.startswith("folder:") or (Path(spec).is_dir() and not spec.startswith(("npz:", "synthetic"))):
        return SegFolderDataset(spec.removeprefix("folder:"), split, reduce_zero_label)
    from veca_ssl.data import build_dataset  # npz: (masks/depth keys), synthetic:, …

    if spec.startswith("wds:"):  # shards carry images and class labels, not masks or depth maps
        raise ValueError(f"dense evaluation needs masks or depth maps, which {spec!r} (WebDataset shards of images "
                         "and labels) does not hold; use folder:/root (images/ + masks/ or depth/), npz: or synthetic:")
    return build_dataset(spec, split=split)


class DenseEvalDataset(Dataset):
    """Resizes image (bicubic) and targets (nearest) of a dense dataset to the square eval resolution.

    Items for the feature engine: ``(normalised image tensor, target)``; :meth:`targets` stacks the
    masks/depth maps once.
    """

    def __init__(self, base: Dataset, resolution: int, spec: str = "dataset"):
        self.base, self.resolution, self.spec = base, resolution, spec
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def _item(self, i: int) -> tuple[Image.Image, int, dict]:
        item = self.base[i]
        if not isinstance(item, tuple | list) or len(item) < 3 or not isinstance(item[2], dict):
            raise ValueError(f"dataset {self.spec!r} has no masks/depth (items are not (image, target, dense))")
        return item[0], int(item[1]), item[2]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image, target, _ = self._item(i)
        if isinstance(image, torch.Tensor):
            raise ValueError(f"dense dataset {self.spec!r} must yield PIL images (build it without transform)")
        r = self.resolution
        arr = np.asarray(image.convert("RGB").resize((r, r), Image.BICUBIC), dtype=np.float32) / 255.0
        x = (torch.from_numpy(arr).permute(2, 0, 1) - self.mean) / self.std
        return x, target

    def targets(self) -> dict[str, torch.Tensor]:
        """``{"mask": (N,r,r) uint8, "depth": (N,r,r) float32}`` with the keys every item has."""
        r, out = self.resolution, {"mask": [], "depth": []}
        # Datasets that can read targets without decoding the image (folder/npz here) skip the decode.
        read = getattr(self.base, "dense_targets", None)
        for i in range(len(self)):
            dense = read(i) if read is not None else self._item(i)[2]
            for key in ("mask", "depth"):
                if key in dense and dense[key] is not None and out[key] is not None:
                    img = Image.fromarray(np.asarray(dense[key]))
                    out[key].append(torch.from_numpy(np.array(img.resize((r, r), Image.NEAREST))))
                else:
                    out[key] = None  # a key missing from any item is unusable
        found = {k: torch.stack(v) for k, v in out.items() if v}
        if not found:
            raise ValueError(f"dataset {self.spec!r} has no masks/depth; dense eval needs 'mask' or 'depth'")
        return found


# ------------------------------------------------------------------------------------------- probes
@dataclass
class DenseProbeConfig:
    epochs: int = 20
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-4
    seed: int = 0


def _head(dim: int, out: int) -> nn.Module:
    # BatchNorm then 1×1 conv = a linear layer on normalised patch features (DINOv2 linear head).
    return nn.Sequential(nn.BatchNorm2d(dim), nn.Conv2d(dim, out, kernel_size=1))


def _as_maps(patches: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(N, Hp*Wp, D) → (N, D, Hp, Wp)."""
    n, _, d = patches.shape
    return patches.reshape(n, grid[0], grid[1], d).permute(0, 3, 1, 2)


def _train(head: nn.Module, maps: torch.Tensor, target: torch.Tensor, loss_fn, cfg: DenseProbeConfig,
           device: torch.device) -> nn.Module:
    torch.manual_seed(cfg.seed)
    head = head.to(device).train()
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    n = maps.shape[0]
    total, step = max(1, cfg.epochs * math.ceil(n / cfg.batch_size)), 0
    gen = torch.Generator().manual_seed(cfg.seed)
    out_ch = head[-1].out_channels
    step_flops = 6 * cfg.batch_size * maps[0].numel() * out_ch + 6 * cfg.batch_size * target[0].numel() * out_ch
    with few_threads_if_small(step_flops):
        for _ in range(cfg.epochs):
            perm = torch.randperm(n, generator=gen)
            step = _epoch(head, opt, maps, target, perm, loss_fn, cfg, device, step, total)
    return head.eval()


def _epoch(head: nn.Module, opt: torch.optim.Optimizer, maps: torch.Tensor, target: torch.Tensor,
           perm: torch.Tensor, loss_fn, cfg: DenseProbeConfig, device: torch.device, step: int,
           total: int) -> int:
    """One pass over ``perm``: AdamW steps with a per-step cosine learning rate; returns the step count."""
    for start in range(0, maps.shape[0], cfg.batch_size):
        b = perm[start:start + cfg.batch_size]
        for g in opt.param_groups:
            g["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * step / total))
        x, y = maps[b].to(device).float(), target[b].to(device)
        logits = F.interpolate(head(x), size=y.shape[-2:], mode="bilinear", align_corners=False)
        loss = loss_fn(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
    return step


@torch.no_grad()
def _predict(head: nn.Module, maps: torch.Tensor, size: tuple[int, int], device: torch.device,
             batch_size: int = 32) -> torch.Tensor:
    outs = [F.interpolate(head(maps[s:s + batch_size].to(device).float()), size=size, mode="bilinear",
                          align_corners=False).cpu() for s in range(0, maps.shape[0], batch_size)]
    return torch.cat(outs)


def segmentation_probe(train_maps: torch.Tensor, train_masks: torch.Tensor, test_maps: torch.Tensor,
                       test_masks: torch.Tensor, num_classes: int, cfg: DenseProbeConfig,
                       device: torch.device) -> dict[str, float]:
    """Train the linear segmentation head; ``{"seg_miou", "seg_pixel_acc"}`` on the test set."""
    loss = nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX)
    head = _train(_head(train_maps.shape[1], num_classes), train_maps, train_masks.long(),
                  lambda lg, y: loss(lg, y), cfg, device)
    pred = _predict(head, test_maps, tuple(test_masks.shape[-2:]), device).argmax(1)
    return segmentation_metrics(confusion_matrix(pred, test_masks, num_classes))


def depth_probe(train_maps: torch.Tensor, train_depth: torch.Tensor, test_maps: torch.Tensor,
                test_depth: torch.Tensor, cfg: DenseProbeConfig, device: torch.device) -> dict[str, float]:
    """Train the linear depth head (MSE on standardised valid depth); ``{"depth_rmse", "depth_absrel"}``."""
    valid = train_depth[train_depth > 0]
    if valid.numel() == 0:
        raise ValueError("training depth maps have no valid (> 0) pixel")
    mu, sigma = float(valid.mean()), float(valid.std().clamp_min(1e-6))

    def loss_fn(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
        m = gt > 0
        return F.mse_loss(pred[:, 0][m], (gt[m] - mu) / sigma)

    head = _train(_head(train_maps.shape[1], 1), train_maps, train_depth.float(), loss_fn, cfg, device)
    pred = _predict(head, test_maps, tuple(test_depth.shape[-2:]), device)[:, 0] * sigma + mu
    return depth_metrics(pred.clamp_min(1e-3), test_depth)


def run_dense(train_sets: dict, test_sets: dict, train_targets: dict[str, torch.Tensor],
              test_targets: dict[str, torch.Tensor], tasks: tuple[str, ...] = ("seg", "depth"),
              num_classes: int | None = None, cfg: DenseProbeConfig | None = None,
              device: torch.device | str = "cpu") -> dict:
    """Dense probes at every width from ``{width: FeatureSet}`` with patch tokens."""
    cfg, device = cfg or DenseProbeConfig(), torch.device(device)
    need = {"seg": "mask", "depth": "depth"}
    for task in tasks:
        if task not in need:
            raise ValueError(f"unknown dense task {task!r}; valid: seg, depth")
        if need[task] not in train_targets or need[task] not in test_targets:
            raise ValueError(f"dense task {task!r} needs '{need[task]}' targets in both train and test data")
    if "seg" in tasks and num_classes is None:
        m = train_targets["mask"]
        num_classes = int(m[m != IGNORE_INDEX].max()) + 1
    out = {}
    for w, train in train_sets.items():
        test, row = test_sets[w], {}
        tr_maps, te_maps = _as_maps(train.patches, train.grid), _as_maps(test.patches, test.grid)
        if "seg" in tasks:
            row.update(segmentation_probe(tr_maps, train_targets["mask"], te_maps, test_targets["mask"],
                                          num_classes, cfg, device))
        if "depth" in tasks:
            row.update(depth_probe(tr_maps, train_targets["depth"], te_maps, test_targets["depth"], cfg, device))
        out[w] = row
    return out


def build_parser() -> argparse.ArgumentParser:
    from eval.common import add_data_args, add_model_args, add_run_args

    p = argparse.ArgumentParser(prog="veca eval dense", description=__doc__.split("\n")[0])
    add_model_args(p)
    add_data_args(p, names=("train", "test"))
    add_run_args(p)
    g = p.add_argument_group("dense probes")
    g.add_argument("--tasks", default="auto", help="seg,depth or auto (whatever the data has)")
    g.add_argument("--num-classes", type=int, default=None, help="segmentation classes (default: from masks)")
    g.add_argument("--reduce-zero-label", action="store_true", help="ADE20K: label 0 → ignore")
    g.add_argument("--epochs", type=int, default=20)
    g.add_argument("--probe-batch-size", type=int, default=16)
    g.add_argument("--lr", type=float, default=1e-3)
    return p


def dense_features(ctx, train_spec: str, test_spec: str, resolution: int, batch_size: int,
                   num_workers: int = 0, reduce_zero_label: bool = False) -> tuple:
    """Build dense train/test sets, their resized targets, and patch features at every width."""
    from veca_ssl.features import extract_features

    sets = {}
    for name, spec in (("train", train_spec), ("test", test_spec)):
        ds = DenseEvalDataset(build_dense_dataset(spec, reduce_zero_label), resolution, spec)
        targets = ds.targets()  # fails early (before extraction) on data without masks/depth
        feats = extract_features(ctx.model, ds, ctx.widths, resolution, batch_size, ctx.device,
                                 with_patches=True, num_workers=num_workers, progress=ctx.progress,
                                 max_skip_fraction=getattr(ctx, "max_skip_fraction", 0.01))
        rows = next(iter(feats.values()))
        if rows.skipped:  # unusable images are left out of the features: keep their targets out too
            targets = {k: v[rows.indices] for k, v in targets.items()}
            if hasattr(ctx, "data_skips"):
                from veca_ssl.features import skip_summary

                ctx.data_skips[name] = skip_summary(rows)
        sets[name] = (feats, targets)
    return sets["train"][0], sets["test"][0], sets["train"][1], sets["test"][1]


def resolve_tasks(text: str, train_targets: dict, test_targets: dict) -> tuple[str, ...]:
    if text == "auto":
        tasks = tuple(t for t, k in (("seg", "mask"), ("depth", "depth")) if k in train_targets and k in test_targets)
        if not tasks:
            raise ValueError("dense data has neither masks nor depth in both --train and --test")
        return tasks
    return tuple(t.strip() for t in text.split(",") if t.strip())


def main(argv: list[str] | None = None) -> int:
    from eval.common import setup
    from eval.report import finish_report

    args = build_parser().parse_args(argv)
    ctx = setup(args)
    train_sets, test_sets, train_t, test_t = dense_features(
        ctx, args.train, args.test, args.resolution, args.batch_size, args.num_workers, args.reduce_zero_label)
    cfg = DenseProbeConfig(epochs=args.epochs, batch_size=args.probe_batch_size, lr=args.lr, seed=args.seed)
    metrics = run_dense(train_sets, test_sets, train_t, test_t, resolve_tasks(args.tasks, train_t, test_t),
                        args.num_classes, cfg, ctx.device)
    finish_report(ctx, args, metrics, title="Dense probes", protocol="dense")
    return 0


if __name__ == "__main__":
    sys.exit(main())
