"""Dense probes on frozen patch tokens: linear semantic segmentation (mIoU) and linear depth (RMSE).

Following the DINOv2 "linear" dense evaluations (arXiv:2304.07193, §7.4): a BatchNorm + 1×1 conv
head on the frozen patch tokens of the last block, logits bilinearly upsampled to the mask size and
trained with cross-entropy (255 = ignore); a depth head of the same form regresses depth on valid
pixels (depth > 0). Simplifications, stated: images and targets are resized to a square eval
resolution (no sliding window) by ``veca_ssl.data.transforms.DenseEvalTransform`` (image bicubic,
mask nearest, depth bilinear — the training data path's own resize), and depth is regressed directly
(MSE on standardised depth) instead of DINOv2's 256-bin classification. mIoU and RMSE get bootstrap
intervals over the test images.

Data: ``folder:/root[@split]`` (``images/`` + ``annotations/`` [+ ``depth/``] with the same file
stems, ADE20K/VOC style; loader here) and every dense spec of ``veca_ssl.data.build_dataset``
(``npz:`` with ``masks``/``depth``, ``synthetic:``) yielding ``(image, target, dense)``.

``veca eval dense --checkpoint CKPT --train SPEC --test SPEC`` (also ``python -m eval.dense``).
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from eval.common import SKIP_OPTION, few_threads_if_small, parse_dataset_spec
from eval.config import DenseProbeConfig
from eval.stats import bootstrap_ci, mean_ci, with_ci
from veca_ssl.data.decode import DECODE_ERRORS, DEFAULT_MAX_PIXELS, Decoder
from veca_ssl.data.errors import DataError, DataSkipError
from veca_ssl.data.transforms import DenseEvalTransform
from veca_ssl.progress import track
from veca_ssl.widths import width_label

__all__ = ["DenseProbeConfig", "DenseEvalDataset", "SegFolderDataset", "build_dense_dataset", "confusion_matrix",
           "confusion_matrices", "depth_metrics", "run_dense", "segmentation_metrics"]

log = logging.getLogger("eval")
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


def confusion_matrices(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                       ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Per-image confusion matrices (N, K, K); their sum over images is :func:`confusion_matrix`."""
    n = pred.shape[0]
    pred, target = pred.reshape(n, -1).long(), target.reshape(n, -1).long()
    keep = target != ignore_index
    if (target[keep] >= num_classes).any() or (target[keep] < 0).any():
        return confusion_matrix(pred, target, num_classes, ignore_index)[None]  # raises, naming the label
    image = torch.arange(n)[:, None].expand_as(target)
    flat = (image[keep] * num_classes + target[keep]) * num_classes + pred[keep].clamp(0, num_classes - 1)
    return torch.bincount(flat, minlength=n * num_classes * num_classes).reshape(n, num_classes, num_classes)


def miou_of_sums(conf: torch.Tensor) -> torch.Tensor:
    """mIoU (%) of a batch of summed confusion matrices (B, K, K), the convention of :func:`segmentation_metrics`."""
    tp = conf.diagonal(dim1=1, dim2=2)
    union = conf.sum(1) + conf.sum(2) - tp
    iou = torch.where(union > 0, tp / union.clamp_min(1e-12), torch.full_like(tp, float("nan")))
    return iou.nanmean(dim=1) * 100


def _per_image_depth(pred: torch.Tensor, gt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image RMSE and AbsRel on valid pixels (gt > 0) of the images that have any."""
    pred, gt = pred.double().reshape(-1, *gt.shape[-2:]), gt.double().reshape(-1, *gt.shape[-2:])
    rmse, absrel = [], []
    for p, g in zip(pred, gt):
        valid = g > 0
        if not valid.any():
            continue
        d = p[valid] - g[valid]
        rmse.append(float(d.pow(2).mean().sqrt()))
        absrel.append(float((d.abs() / g[valid]).mean()))
    return torch.tensor(rmse, dtype=torch.float64), torch.tensor(absrel, dtype=torch.float64)


def depth_metrics(pred: torch.Tensor, gt: torch.Tensor) -> dict[str, float]:
    """RMSE and AbsRel on valid pixels (gt > 0), per image then averaged over images (NYUv2 convention).

    ``pred``/``gt``: (N, H, W) or (H, W). Images without a valid pixel are skipped.
    """
    rmse, absrel = _per_image_depth(pred, gt)
    if rmse.numel() == 0:
        return {"depth_rmse": float("nan"), "depth_absrel": float("nan")}
    return {"depth_rmse": float(rmse.mean()), "depth_absrel": float(absrel.mean())}


# ------------------------------------------------------------------------------------------- data
class SegFolderDataset(Dataset):
    """``root/images[/split]/X.jpg`` + ``root/annotations[/split]/X.png`` [+ ``root/depth[/split]/X.npy``].

    Items are ``(PIL image, -1, {"mask": uint8 HxW, "depth": float32 HxW})``. ``reduce_zero_label``
    maps label 0 to 255 and shifts the others down by one (ADE20K's "other" class).

    Images are decoded like every other image of the data path (``veca_ssl.data.decode.Decoder``: EXIF
    orientation, the pixel limit): an unreadable one raises ``UnreadableItem``, so feature extraction
    leaves it out and lists it (``--max-skip-fraction``). Masks and depth maps are annotations, read
    as stored; a damaged one is an error naming the file.
    """

    _SPLIT_ALIASES = {"train": ("train", "training"), "val": ("val", "validation"), "test": ("test",)}
    _IMAGE_DIRS = ("images", "JPEGImages")
    _MASK_DIRS = ("annotations", "SegmentationClass")

    def __init__(self, root: str | Path, split: str | None = None, reduce_zero_label: bool = False,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS):
        self.root = Path(root)
        self.decoder = Decoder(max_pixels)
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
        return self.decoder.read(self.images[i]), -1, self.dense_targets(i)

    @staticmethod
    def _annotation(path: Path) -> np.ndarray:
        try:
            with Image.open(path) as img:
                return np.array(img)
        except (*DECODE_ERRORS, Image.DecompressionBombError) as err:
            raise DataError(f"annotation {path} is unreadable ({type(err).__name__}: {err}); fix or remove it "
                            f"together with its image") from None

    def dense_targets(self, i: int) -> dict[str, np.ndarray]:
        dense: dict[str, np.ndarray] = {}
        if self.masks is not None:
            mask = self._annotation(self.masks[i]).astype(np.int64)
            if self.reduce_zero_label:
                mask = np.where(mask == 0, 256, mask) - 1  # 0 → 255 (ignore), k → k-1
            dense["mask"] = mask.clip(0, 255).astype(np.uint8)
        if self.depths is not None:
            p = self.depths[i]
            # .png depth is 16-bit millimetres (NYUv2 convention); .npy is metres.
            dense["depth"] = (np.load(p) if p.suffix == ".npy" else self._annotation(p) / 1000.0
                              ).astype(np.float32)
        return dense


def build_dense_dataset(text: str, reduce_zero_label: bool = False, max_pixels: int | None = None) -> Dataset:
    """``folder:/root[@split]`` (or a directory holding ``images/``), else ``veca_ssl.data.build_dataset``;
    ``max_pixels``: the decoder's pixel limit (None: the data path's default)."""
    limit = {} if max_pixels is None else {"max_pixels": max_pixels}
    spec, split = parse_dataset_spec(text)
    if spec.startswith("folder:") or (Path(spec).is_dir() and not spec.startswith(("npz:", "synthetic"))):
        return SegFolderDataset(spec.removeprefix("folder:"), split, reduce_zero_label, **limit)
    from veca_ssl.data import build_dataset  # npz: (masks/depth keys), synthetic:, …

    if spec.startswith("wds:"):  # shards carry images and class labels, not masks or depth maps
        raise ValueError(f"dense evaluation needs masks or depth maps, which {spec!r} (WebDataset shards of images "
                         "and labels) does not hold; use folder:/root (images/ + masks/ or depth/), npz: or synthetic:")
    return build_dataset(spec, split=split, **limit)


class DenseEvalDataset(Dataset):
    """A dense dataset at the square eval resolution, through ``DenseEvalTransform`` (the data path's
    joint resize: image bicubic, mask nearest, depth bilinear).

    Items for the feature engine: ``(normalised image tensor, target)``; :meth:`targets` stacks the
    masks/depth maps of chosen items, reading them without decoding images when the base dataset can.
    """

    def __init__(self, base: Dataset, resolution: int, spec: str = "dataset"):
        self.base, self.resolution, self.spec = base, resolution, spec
        self.transform = DenseEvalTransform(resolution)

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def _item(self, i: int) -> tuple[Image.Image, int, dict]:
        item = self.base[i]
        if not isinstance(item, tuple | list) or len(item) < 3 or not isinstance(item[2], dict):
            raise ValueError(f"dataset {self.spec!r} has no masks/depth (items are not (image, target, dense)); "
                             "dense eval needs segmentation masks or depth maps")
        return item[0], int(item[1]), item[2]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image, target, _ = self._item(i)
        if isinstance(image, torch.Tensor):
            raise ValueError(f"dense dataset {self.spec!r} must yield PIL images (build it without transform)")
        x, _ = self.transform(image, {})
        return x, target

    def _dense(self, i: int) -> dict:
        read = getattr(self.base, "dense_targets", None)  # folder datasets: no image decode
        return read(i) if read is not None else self._item(i)[2]

    def targets(self, indices: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
        """``{"mask": (N,r,r) uint8, "depth": (N,r,r) float32}`` of items ``indices`` (default: all), with
        the keys every item has; ValueError when none has masks or depth."""
        indices = range(len(self)) if indices is None else [int(i) for i in indices]
        out: dict[str, list[torch.Tensor] | None] = {"mask": [], "depth": []}
        for i in indices:
            dense = {k: v for k, v in self._dense(i).items() if v is not None}
            resized = self.transform.targets(dense)
            for key in ("mask", "depth"):
                if key in resized and out[key] is not None:
                    value = resized[key]
                    out[key].append(value.to(torch.uint8) if key == "mask" else value)  # masks are 0..255
                else:
                    out[key] = None  # a key missing from any item is unusable
        found = {k: torch.stack(v) for k, v in out.items() if v}
        if not found:
            raise ValueError(f"dataset {self.spec!r} has no masks/depth; dense eval needs 'mask' or 'depth'")
        return found


# ------------------------------------------------------------------------------------------- probes
def _head(dim: int, out: int) -> nn.Module:
    # BatchNorm then 1×1 conv = a linear layer on normalised patch features (DINOv2 linear head).
    return nn.Sequential(nn.BatchNorm2d(dim), nn.Conv2d(dim, out, kernel_size=1))


def _as_maps(patches: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(N, Hp*Wp, D) → (N, D, Hp, Wp)."""
    n, _, d = patches.shape
    return patches.reshape(n, grid[0], grid[1], d).permute(0, 3, 1, 2)


def _train(head: nn.Module, maps: torch.Tensor, target: torch.Tensor, loss_fn, cfg: DenseProbeConfig,
           device: torch.device, seed: int, progress: bool, desc: str) -> nn.Module:
    torch.manual_seed(seed)
    head = head.to(device).train()
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    n = maps.shape[0]
    total, step = max(1, cfg.epochs * math.ceil(n / cfg.batch_size)), 0
    gen = torch.Generator().manual_seed(seed)
    out_ch = head[-1].out_channels
    step_flops = 6 * cfg.batch_size * maps[0].numel() * out_ch + 6 * cfg.batch_size * target[0].numel() * out_ch
    with few_threads_if_small(step_flops):
        for _ in track(range(cfg.epochs), desc=desc, unit="epoch", bar=progress):
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
                       device: torch.device, seed: int = 0, bootstrap: int = 0, progress: bool = False,
                       desc: str = "segmentation probe") -> dict[str, float]:
    """Train the linear segmentation head; ``{"seg_miou", "seg_pixel_acc"}`` on the test set."""
    loss = nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX)
    head = _train(_head(train_maps.shape[1], num_classes), train_maps, train_masks.long(),
                  lambda lg, y: loss(lg, y), cfg, device, seed, progress, desc)
    pred = _predict(head, test_maps, tuple(test_masks.shape[-2:]), device).argmax(1)
    per_image = confusion_matrices(pred, test_masks, num_classes)
    out = segmentation_metrics(per_image.sum(0))
    if bootstrap:
        with_ci(out, "seg_miou", bootstrap_ci(per_image, miou_of_sums, bootstrap, seed=seed))
    return out


def depth_probe(train_maps: torch.Tensor, train_depth: torch.Tensor, test_maps: torch.Tensor,
                test_depth: torch.Tensor, cfg: DenseProbeConfig, device: torch.device, seed: int = 0,
                bootstrap: int = 0, progress: bool = False, desc: str = "depth probe") -> dict[str, float]:
    """Train the linear depth head (MSE on standardised valid depth); ``{"depth_rmse", "depth_absrel"}``."""
    valid = train_depth[train_depth > 0]
    if valid.numel() == 0:
        raise ValueError("training depth maps have no valid (> 0) pixel")
    mu, sigma = float(valid.mean()), float(valid.std().clamp_min(1e-6))

    def loss_fn(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
        m = gt > 0
        return F.mse_loss(pred[:, 0][m], (gt[m] - mu) / sigma)

    head = _train(_head(train_maps.shape[1], 1), train_maps, train_depth.float(), loss_fn, cfg, device, seed,
                  progress, desc)
    pred = _predict(head, test_maps, tuple(test_depth.shape[-2:]), device)[:, 0] * sigma + mu
    pred = pred.clamp_min(1e-3)
    out = depth_metrics(pred, test_depth)
    if bootstrap:
        with_ci(out, "depth_rmse", mean_ci(_per_image_depth(pred, test_depth)[0], bootstrap, seed=seed))
    return out


def resolve_tasks(tasks: Sequence[str] | None, train_targets: dict, test_targets: dict) -> tuple[str, ...]:
    """``tasks`` as given, or (None) every task whose targets both train and test data have."""
    if tasks is None:
        found = tuple(t for t, k in (("seg", "mask"), ("depth", "depth")) if k in train_targets and k in test_targets)
        if not found:
            raise ValueError("dense data has neither masks nor depth in both --train and --test")
        return found
    return tuple(tasks)


def run_dense(train_sets: dict, test_sets: dict, train_targets: dict[str, torch.Tensor],
              test_targets: dict[str, torch.Tensor], tasks: Sequence[str] | None = ("seg", "depth"),
              num_classes: int | None = None, cfg: DenseProbeConfig | None = None,
              device: torch.device | str = "cpu", seed: int = 0, bootstrap: int = 0, progress: bool = False) -> dict:
    """Dense probes at every width from ``{width: FeatureSet}`` with patch tokens (``tasks`` None: auto)."""
    cfg, device = cfg or DenseProbeConfig(), torch.device(device)
    tasks = resolve_tasks(tasks, train_targets, test_targets)
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
        label = width_label(w)
        if "seg" in tasks:
            row.update(segmentation_probe(tr_maps, train_targets["mask"], te_maps, test_targets["mask"],
                                          num_classes, cfg, device, seed, bootstrap, progress,
                                          f"segmentation probe {label}"))
        if "depth" in tasks:
            row.update(depth_probe(tr_maps, train_targets["depth"], te_maps, test_targets["depth"], cfg, device,
                                   seed, bootstrap, progress, f"depth probe {label}"))
        log.info("dense probes %s: %s", label, ", ".join(f"{k} {v:.4g}" for k, v in row.items() if "_ci_" not in k))
        out[w] = row
    return out


def dense_features(model: torch.nn.Module, widths: list, train_spec: str, test_spec: str, resolution: int,
                   batch_size: int, device: torch.device, num_workers: int = 0, reduce_zero_label: bool = False,
                   progress: bool = False, max_skip_fraction: float | None = 0.01,
                   max_pixels: int | None = None) -> tuple:
    """Build dense train/test sets, patch features at every width, and the targets of the extracted items.

    Targets are stacked for the dataset indices the features came from, so feature row ``i`` and target
    ``i`` are always the same image.
    """
    from veca_ssl.features import extract_features

    sets = {}
    for name, spec in (("train", train_spec), ("test", test_spec)):
        ds = DenseEvalDataset(build_dense_dataset(spec, reduce_zero_label, max_pixels), resolution, spec)
        ds.targets([0])  # fails early (before extraction) on data without masks/depth
        log.info("extracting dense %s features of %s at %d px", name, spec, resolution)
        try:
            feats = extract_features(model, ds, widths, resolution, batch_size, device, with_patches=True,
                                     num_workers=num_workers, progress=progress, max_skip_fraction=max_skip_fraction,
                                     skip_option=SKIP_OPTION)
        except DataSkipError as exc:  # over the whole set, after the pass: say which set
            raise DataSkipError(f"dense {name} set {spec}: {exc}") from None
        sets[name] = (feats, ds.targets(next(iter(feats.values())).indices.tolist()))
    return sets["train"][0], sets["test"][0], sets["train"][1], sets["test"][1]


def main(argv: list[str] | None = None) -> int:
    from eval.cli import protocol_main

    return protocol_main("dense", argv)


if __name__ == "__main__":
    sys.exit(main())
