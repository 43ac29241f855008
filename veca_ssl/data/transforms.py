"""Training (multi-crop) and evaluation transforms, PIL → normalised float tensors, no torchvision.

:class:`MultiCropTransform` implements the DINOv2 multi-crop recipe (arXiv:2304.07193):
2 global crops (scale 0.32–1) and ``n`` local crops (scale 0.05–0.32), each resized once with bicubic
interpolation straight from the source box, flipped (p 0.5), colour-jittered (0.4, 0.4, 0.2, 0.1;
p 0.8), grayscaled (p 0.2), blurred (global 1: p 1.0, global 2: p 0.1, locals: p 0.5) and, for the
second global crop only, solarised (p 0.2).

Crop boxes are drawn *before* the pixels are decoded (:meth:`MultiCropTransform.prepare`), so a large
JPEG can be decoded at 1/2, 1/4 or 1/8 scale when every crop still has at least as many source pixels
as output pixels — the same crops at a fraction of the decoding and resampling cost.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from . import augment
from .augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Box,
    Normalize,
    crop_resize,
    gaussian_blur,
    grayscale,
    random_resized_crop_box,
    solarize,
)
from .decode import to_rgb

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MultiCropTransform",
    "CropPlan",
    "EvalTransform",
    "DenseEvalTransform",
    "make_eval_transform",
    "make_dense_eval_transform",
    "Normalize",
]


def _check_scale(name: str, scale: Sequence[float]) -> tuple[float, float]:
    lo, hi = (float(s) for s in scale)
    if not 0 < lo <= hi <= 1:
        raise ValueError(f"{name} must satisfy 0 < min <= max <= 1, got {tuple(scale)}")
    return lo, hi


@dataclass
class CropPlan:
    """Crop boxes drawn for one image (original-pixel coordinates) and the decode scale chosen."""

    source_size: tuple[int, int]
    global_boxes: list[Box]
    local_boxes: list[Box]
    reduce: int = 1  # JPEG draft reduction actually applied (1, 2, 4 or 8)


class MultiCropTransform:
    """DINOv2 multi-crop augmentation; ``__call__(img, rng) -> {"global": [t0, t1], "local": [...]}``.

    Each tensor is float (3, size, size), normalised with ``mean``/``std``. All randomness comes from
    ``rng`` (a ``numpy.random.Generator``), so a per-sample seed reproduces a sample exactly.

    Args:
        global_size / local_size: output side of the global / local crops (pixels).
        num_local_crops: number of local crops (0 allowed).
        global_scale / local_scale: area fraction range of the crops.
        color_jitter: (brightness, contrast, saturation, hue) strengths, applied with ``jitter_p``.
        use_draft: allow reduced-scale JPEG decoding when the crops allow it (see module docstring).
        jitter_mode: ``"exact"`` — torchvision's ColorJitter on PIL (HSV hue shift, clip after each
            step), as in DINOv2; ``"fused"`` — the same random draws composed into one colour matrix
            with a YIQ hue rotation (:func:`~veca_ssl.data.augment.color_jitter_fused`), ~5× cheaper
            per crop, visually equivalent but not bit-identical.
    """

    def __init__(
        self,
        global_size: int = 224,
        local_size: int = 96,
        num_local_crops: int = 8,
        global_scale: tuple[float, float] = (0.32, 1.0),
        local_scale: tuple[float, float] = (0.05, 0.32),
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1),
        jitter_p: float = 0.8,
        grayscale_p: float = 0.2,
        flip_p: float = 0.5,
        global_blur_p: tuple[float, float] = (1.0, 0.1),
        local_blur_p: float = 0.5,
        solarize_p: float = 0.2,
        use_draft: bool = True,
        jitter_mode: str = "exact",
    ) -> None:
        if global_size < 1 or local_size < 1 or num_local_crops < 0:
            raise ValueError(
                f"need global_size, local_size >= 1 and num_local_crops >= 0, got "
                f"{global_size}, {local_size}, {num_local_crops}"
            )
        self.global_size, self.local_size = int(global_size), int(local_size)
        self.num_local_crops = int(num_local_crops)
        self.global_scale = _check_scale("global_scale", global_scale)
        self.local_scale = _check_scale("local_scale", local_scale)
        self.jitter = tuple(float(x) for x in color_jitter)
        if len(self.jitter) != 4 or min(self.jitter) < 0 or self.jitter[3] > 0.5:
            raise ValueError(f"color_jitter must be 4 strengths >= 0 with hue <= 0.5, got {color_jitter}")
        self.jitter_p, self.grayscale_p, self.flip_p = float(jitter_p), float(grayscale_p), float(flip_p)
        self.global_blur_p = tuple(float(p) for p in global_blur_p)
        self.local_blur_p, self.solarize_p = float(local_blur_p), float(solarize_p)
        self.use_draft = bool(use_draft)
        if jitter_mode not in ("exact", "fused"):
            raise ValueError(f"jitter_mode must be 'exact' or 'fused', got {jitter_mode!r}")
        self.jitter_mode = jitter_mode
        # the `color_jitter` argument shadows the function of that name here, hence `augment.`
        self._jitter_fn = augment.color_jitter if jitter_mode == "exact" else augment.color_jitter_fused
        self.normalize = Normalize(mean, std)

    # -- before decoding -----------------------------------------------------------------------
    def plan(self, size: tuple[int, int], rng: np.random.Generator) -> CropPlan:
        """Draw the 2 global and ``num_local_crops`` local boxes for an image of ``size`` (W, H)."""
        if size[0] < 1 or size[1] < 1:
            raise ValueError(f"cannot crop an empty image of size {size}")
        g = [random_resized_crop_box(size, rng, self.global_scale) for _ in range(2)]
        loc = [random_resized_crop_box(size, rng, self.local_scale) for _ in range(self.num_local_crops)]
        return CropPlan((int(size[0]), int(size[1])), g, loc)

    def draft_reduction(self, plan: CropPlan) -> int:
        """Largest JPEG reduction (1, 2, 4, 8) leaving every crop >= its output size in pixels."""
        ratios = [min(b[2], b[3]) / self.global_size for b in plan.global_boxes]
        ratios += [min(b[2], b[3]) / self.local_size for b in plan.local_boxes]
        limit = min(ratios)
        return next((k for k in (8, 4, 2) if k <= limit), 1)

    def prepare(self, img: Image.Image, rng: np.random.Generator) -> CropPlan:
        """Draw the crop plan from the header size and, for a not-yet-decoded JPEG, set draft mode."""
        plan = self.plan(img.size, rng)
        k = self.draft_reduction(plan) if self.use_draft else 1
        if k > 1 and img.format == "JPEG":
            w, h = img.size
            result = img.draft("RGB", (math.ceil(w / k), math.ceil(h / k)))
            if result is not None:  # None: already decoded (or not a plain JPEG) — full size it is
                plan.reduce = int(round(w / result[1][2]))
        return plan

    # -- after decoding ------------------------------------------------------------------------
    def _augment(self, crop: Image.Image, rng: np.random.Generator, blur_p: float, solarize_p: float) -> torch.Tensor:
        if rng.random() < self.flip_p:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        if rng.random() < self.jitter_p:
            crop = self._jitter_fn(crop, rng, *self.jitter)
        if rng.random() < self.grayscale_p:
            crop = grayscale(crop)
        if rng.random() < blur_p:
            crop = gaussian_blur(crop, rng)
        if solarize_p > 0 and rng.random() < solarize_p:
            crop = solarize(crop)
        return self.normalize(crop)

    def apply(self, img: Image.Image, plan: CropPlan, rng: np.random.Generator) -> dict[str, list[torch.Tensor]]:
        """Cut, resize and augment the planned crops of the decoded RGB image ``img``."""
        img = to_rgb(img)
        sx, sy = img.size[0] / plan.source_size[0], img.size[1] / plan.source_size[1]
        if plan.reduce > 1:  # DCT-scaled decode maps original pixel x to x / reduce exactly
            sx = sy = 1.0 / plan.reduce
        out_g = []
        for i, box in enumerate(plan.global_boxes):
            crop = crop_resize(img, box, self.global_size, (sx, sy))
            out_g.append(self._augment(crop, rng, self.global_blur_p[i], self.solarize_p if i == 1 else 0.0))
        out_l = [
            self._augment(crop_resize(img, box, self.local_size, (sx, sy)), rng, self.local_blur_p, 0.0)
            for box in plan.local_boxes
        ]
        return {"global": out_g, "local": out_l}

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> dict[str, list[torch.Tensor]]:
        """Multi-crop ``img`` (PIL, any mode, possibly not yet decoded) with randomness from ``rng``."""
        if not isinstance(rng, np.random.Generator):
            raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
        plan = self.prepare(img, rng)
        return self.apply(img, plan, rng)

    def __repr__(self) -> str:
        return (
            f"MultiCropTransform(global={self.global_size}x2 {self.global_scale}, local={self.local_size}"
            f"x{self.num_local_crops} {self.local_scale}, jitter={self.jitter} {self.jitter_mode})"
        )


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if h < 1 or w < 1:
        raise ValueError(f"size must be positive, got {size}")
    return h, w


class EvalTransform:
    """Deterministic evaluation transform: resize (bicubic) then centre crop, then normalise.

    ``resize=None`` scales the image just enough to cover ``size`` (so an image already of that size
    is left untouched); ``resize=r`` first scales the *shorter side* to ``r`` (DINOv2 evaluates with
    ``resize=256, size=224``). Resize and crop are done in one resampling pass (the crop box is mapped
    back to source pixels), which is both faster and sharper than resizing the whole image first.
    """

    def __init__(
        self,
        size: int | Sequence[int],
        resize: int | None = None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        self.size = _pair(size)
        if resize is not None and resize < 1:
            raise ValueError(f"resize must be a positive shorter-side length or None, got {resize}")
        self.resize = resize
        self.normalize = Normalize(mean, std)

    def crop_image(self, img: Image.Image) -> Image.Image:
        """The resized, centre-cropped PIL image (before normalisation)."""
        img = to_rgb(img)
        (H, W), (w, h) = self.size, img.size
        s = self.resize / min(w, h) if self.resize is not None else max(H / h, W / w)
        s = max(s, H / h, W / w)  # never crop outside the image
        if (w, h) == (W, H) and abs(s - 1.0) < 1e-12:
            return img
        left = (w * s - W) / 2.0
        top = (h * s - H) / 2.0
        box = (left / s, top / s, (left + W) / s, (top + H) / s)
        return img.resize((W, H), Image.BICUBIC, box=box)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return self.normalize(self.crop_image(img))

    def __repr__(self) -> str:
        return f"EvalTransform(size={self.size}, resize={self.resize})"


def make_eval_transform(size: int | Sequence[int], resize: int | None = None) -> EvalTransform:
    """PIL image → normalised (3,H,W) tensor: resize (shorter side ``resize``, or just enough to cover
    ``size`` when ``None``) then centre crop to ``size`` (int or (H, W))."""
    return EvalTransform(size, resize)


class DenseEvalTransform:
    """Joint transform for dense evaluation: image (bicubic), mask (nearest) and depth (bilinear) are
    resized to the same ``size`` (int or (H, W); ``None`` keeps the native size), so they stay aligned.

    Called as ``transform(image, dense) -> (tensor (3,H,W), {"mask": int64 (H,W), "depth": float32 (H,W)})``;
    the mask keeps 255 as its ignore value. Datasets recognise it by ``joint = True``.
    """

    joint = True

    def __init__(
        self,
        size: int | Sequence[int] | None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        self.size = None if size is None else _pair(size)
        self.normalize = Normalize(mean, std)

    def __call__(self, img: Image.Image, dense: dict[str, np.ndarray]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        img = to_rgb(img)
        wh = img.size if self.size is None else (self.size[1], self.size[0])
        if img.size != wh:
            img = img.resize(wh, Image.BICUBIC)
        return self.normalize(img), self.targets(dense, wh)

    def targets(self, dense: dict[str, np.ndarray], wh: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
        """The mask/depth half of ``__call__`` alone, resized to ``wh`` = (W, H) (default: ``size``), so
        targets can be read without decoding their image."""
        if wh is None:
            if self.size is None:
                raise ValueError("DenseEvalTransform(size=None) keeps the image's size: pass wh")
            wh = (self.size[1], self.size[0])
        out: dict[str, torch.Tensor] = {}
        if "mask" in dense:
            mask = Image.fromarray(np.asarray(dense["mask"], dtype=np.uint8), "L")
            if mask.size != wh:
                mask = mask.resize(wh, Image.NEAREST)
            out["mask"] = torch.from_numpy(np.array(mask, dtype=np.int64))
        if "depth" in dense:
            depth = Image.fromarray(np.asarray(dense["depth"], dtype=np.float32), "F")
            if depth.size != wh:
                depth = depth.resize(wh, Image.BILINEAR)
            out["depth"] = torch.from_numpy(np.array(depth, dtype=np.float32))
        return out

    def __repr__(self) -> str:
        return f"DenseEvalTransform(size={self.size})"


def make_dense_eval_transform(size: int | Sequence[int] | None) -> DenseEvalTransform:
    """See :class:`DenseEvalTransform`."""
    return DenseEvalTransform(size)
