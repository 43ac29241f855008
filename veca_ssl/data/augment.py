"""Random image operations of the DINO/DINOv2 recipe on PIL images, without torchvision.

Every random choice is drawn from an explicit ``numpy.random.Generator`` (never a global RNG), so one
per-sample seed reproduces a sample exactly in any process. The operations follow torchvision's
definitions (used by DINOv2, arXiv:2304.07193): ``RandomResizedCrop``'s 10-attempt sampler,
``ColorJitter``'s random order of brightness / contrast / saturation / hue, ITU-R 601-2 luma
grayscale, and solarisation at 128. All pixel work is done by PIL's C code or NumPy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter, ImageOps, ImageStat

#: ImageNet channel statistics (RGB, 0–1 scale) used by every normalisation in the project.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

#: A crop box in source-pixel coordinates: (left, top, width, height).
Box = tuple[float, float, float, float]


def random_resized_crop_box(
    size: tuple[int, int],
    rng: np.random.Generator,
    scale: tuple[float, float],
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> Box:
    """Sample a crop box covering ``scale`` of the area with aspect ``ratio`` (torchvision's algorithm).

    Up to 10 attempts at a random area and log-uniform aspect ratio; if none fits, fall back to the
    largest centred crop whose aspect is clamped into ``ratio``.
    """
    width, height = size
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return (left, top, w, h)
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return ((width - w) // 2, (height - h) // 2, w, h)


def crop_resize(img: Image.Image, box: Box, out_size: int, scale_xy: tuple[float, float] = (1.0, 1.0)) -> Image.Image:
    """Crop ``box`` and resize it to ``out_size``² in one bicubic resampling pass.

    ``scale_xy`` maps box coordinates of the original image onto ``img`` when it was decoded at a
    reduced size (JPEG draft mode); PIL accepts fractional boxes, so no precision is lost.
    """
    left, top, w, h = box
    sx, sy = scale_xy
    return img.resize((out_size, out_size), Image.BICUBIC, box=(left * sx, top * sy, (left + w) * sx, (top + h) * sy))


def adjust_hue(img: Image.Image, hue_factor: float) -> Image.Image:
    """Rotate the hue by ``hue_factor`` turns (in [-0.5, 0.5]) through PIL's HSV conversion."""
    h, s, v = img.convert("HSV").split()
    shifted = (np.asarray(h, dtype=np.uint8) + np.uint8(int(round(hue_factor * 255)) % 256)).astype(np.uint8)
    return Image.merge("HSV", (Image.fromarray(shifted, "L"), s, v)).convert("RGB")


def color_jitter(
    img: Image.Image,
    rng: np.random.Generator,
    brightness: float,
    contrast: float,
    saturation: float,
    hue: float,
) -> Image.Image:
    """torchvision ``ColorJitter``: factors drawn first, then applied in a random order.

    Brightness/contrast/saturation factors are uniform in ``[max(0, 1-x), 1+x]``; the hue shift is
    uniform in ``[-hue, hue]``. A zero strength leaves that adjustment out.
    """
    factors = [rng.uniform(max(0.0, 1 - brightness), 1 + brightness) if brightness > 0 else None,
               rng.uniform(max(0.0, 1 - contrast), 1 + contrast) if contrast > 0 else None,
               rng.uniform(max(0.0, 1 - saturation), 1 + saturation) if saturation > 0 else None,
               rng.uniform(-hue, hue) if hue > 0 else None]  # fmt: skip
    for op in rng.permutation(4):
        f = factors[op]
        if f is None:
            continue
        if op == 0:
            img = ImageEnhance.Brightness(img).enhance(f)
        elif op == 1:
            img = ImageEnhance.Contrast(img).enhance(f)
        elif op == 2:
            img = ImageEnhance.Color(img).enhance(f)
        else:
            img = adjust_hue(img, f)
    return img


_LUMA = np.array([0.299, 0.587, 0.114])
_RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ_TO_RGB = np.linalg.inv(_RGB_TO_YIQ)


def _hue_rotation(hue_factor: float) -> np.ndarray:
    """3×3 RGB matrix rotating chroma in the YIQ plane by ``hue_factor`` turns (luma preserved).

    The angle is negated so that a positive factor moves hues the same way as an HSV hue increase
    (red → yellow → green), matching :func:`adjust_hue`.
    """
    theta = -2.0 * math.pi * hue_factor
    c, s = math.cos(theta), math.sin(theta)
    rot = np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])
    return _YIQ_TO_RGB @ rot @ _RGB_TO_YIQ


def color_jitter_fused(
    img: Image.Image,
    rng: np.random.Generator,
    brightness: float,
    contrast: float,
    saturation: float,
    hue: float,
) -> Image.Image:
    """Fast colour jitter: the four adjustments composed into one affine colour matrix, applied once.

    Draws exactly the same random numbers as :func:`color_jitter` (factors, then order). Brightness,
    contrast (towards the mean luma) and saturation (towards per-pixel luma) are the same linear maps
    as PIL's ``ImageEnhance``; hue is a rotation in the YIQ chroma plane instead of an HSV shift, and
    values are clipped once at the end instead of after every step. One ``convert`` with a matrix
    replaces two HSV conversions and three blends (≈10× less work on a 224² crop).
    """
    factors = [rng.uniform(max(0.0, 1 - brightness), 1 + brightness) if brightness > 0 else None,
               rng.uniform(max(0.0, 1 - contrast), 1 + contrast) if contrast > 0 else None,
               rng.uniform(max(0.0, 1 - saturation), 1 + saturation) if saturation > 0 else None,
               rng.uniform(-hue, hue) if hue > 0 else None]  # fmt: skip
    order = rng.permutation(4)
    mat, off = np.eye(3), np.zeros(3)
    mean_rgb: np.ndarray | None = None
    for op in order:
        f = factors[op]
        if f is None:
            continue
        if op == 0:
            mat, off = f * mat, f * off
        elif op == 1:
            if mean_rgb is None:
                mean_rgb = np.asarray(ImageStat.Stat(img).mean[:3])
            m = float(_LUMA @ (mat @ mean_rgb + off))
            mat, off = f * mat, f * off + (1.0 - f) * m
        else:
            step = f * np.eye(3) + (1.0 - f) * np.outer(np.ones(3), _LUMA) if op == 2 else _hue_rotation(f)
            mat, off = step @ mat, step @ off
    matrix = tuple(float(v) for row in np.hstack([mat, off[:, None]]) for v in row)
    return img.convert("RGB", matrix)


def grayscale(img: Image.Image) -> Image.Image:
    """Luma grayscale (ITU-R 601-2, PIL's ``L``), kept as 3 identical channels."""
    return img.convert("L").convert("RGB")


def gaussian_blur(img: Image.Image, rng: np.random.Generator, sigma: tuple[float, float] = (0.1, 2.0)) -> Image.Image:
    """Gaussian blur with standard deviation uniform in ``sigma`` (pixels), as in DINO/DINOv2."""
    return img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(sigma[0], sigma[1]))))


def solarize(img: Image.Image, threshold: int = 128) -> Image.Image:
    """Invert every channel value >= ``threshold`` (BYOL/DINO solarisation)."""
    return ImageOps.solarize(img, threshold)


class Normalize:
    """PIL RGB image → contiguous float tensor (3,H,W): ``(x/255 - mean) / std`` as one multiply-add."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean and std need 3 values with std > 0, got mean={mean}, std={std}")
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self._scale = np.array([1.0 / (255.0 * s) for s in self.std], dtype=np.float32).reshape(3, 1, 1)
        self._shift = np.array([-m / s for m, s in zip(self.mean, self.std)], dtype=np.float32).reshape(3, 1, 1)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        if img.mode != "RGB":
            img = img.convert("RGB")
        # NumPy on one core beats torch here: no thread-pool hand-off for a 150k-element multiply-add.
        chw = np.asarray(img).transpose(2, 0, 1).astype(np.float32, order="C")
        chw *= self._scale
        chw += self._shift
        return torch.from_numpy(chw)

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean}, std={self.std})"
