"""``synthetic:…`` — procedural shapes on textured backgrounds, with class, mask and depth labels.

Spec options (comma-separated ``key=value`` after the colon; all optional)::

    synthetic:n=512,val_n=128,size=64,classes=4,seed=0

``n``        items in the ``train`` split (default 512); ``split=None`` also means ``train``.
``val_n``    items in the ``val`` split (default ``max(1, n // 4)``).
``size``     image side in pixels, or ``HxW`` (e.g. ``48x64``); default 64, at least 16.
``classes``  number of object classes K (default 4, 1–64).
``hue_jitter`` degrees of random hue added to each shape's class hue (default 0; 360 = any hue, so
             colour no longer tells the class and only the shape does).
``seed``     base seed (default 0). Item ``i`` of split ``s`` is drawn from
             ``numpy.random.default_rng([seed, s, i])`` with s = 0 (train) / 1 (val), so splits never
             share an item and every item is reproducible on its own, in any order, on any worker.

Each item: the image label is ``i % K`` (balanced classes). The image shows one large *main* shape of
that class and, half of the time, a smaller, farther *distractor* of another class behind it. A class
fixes the shape (disc, square, triangle, ring, cross, diamond — cycling when K > 6) and the hue
(``class / K`` around the colour wheel). Dense targets:

``mask``   uint8 H×W: 0 = background, ``k + 1`` = a pixel of a class-``k`` shape (K + 1 segmentation
           classes; the ignore value 255 never occurs).
``depth``  float32 H×W, smooth, in scene units: a tilted background plane (≈ 5–9) with shapes in
           front of it (main ≈ 2–3.5, distractor ≈ 4–5), each slightly domed.
"""

from __future__ import annotations

import colorsys
from typing import Any

import numpy as np
from PIL import Image

from .base import MapImageDataset
from .decode import Prepare

SHAPES = ("disc", "square", "triangle", "ring", "cross", "diamond")
_DEFAULTS = {"n": 512, "val_n": None, "size": 64, "classes": 4, "seed": 0, "hue_jitter": 0}


def parse_synthetic_options(spec: str, options: str) -> dict[str, Any]:
    """Parse ``n=…,size=…`` into typed options; ``ValueError`` naming ``spec`` when malformed."""
    out: dict[str, Any] = dict(_DEFAULTS)
    for part in filter(None, (p.strip() for p in options.split(","))):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in _DEFAULTS:
            raise ValueError(
                f"malformed dataset spec {spec!r}: {part!r} is not one of "
                f"{', '.join(k + '=…' for k in _DEFAULTS)} (e.g. 'synthetic:n=512,size=64,classes=4,seed=0')"
            )
        try:
            if key == "size":
                h, _, w = value.lower().partition("x")
                out[key] = (int(h), int(w or h))
            else:
                out[key] = int(value)
        except ValueError:
            raise ValueError(f"malformed dataset spec {spec!r}: {key}={value!r} is not an integer") from None
    size = out["size"] if isinstance(out["size"], tuple) else (out["size"], out["size"])
    out["size"] = size
    if out["val_n"] is None:
        out["val_n"] = max(1, out["n"] // 4)
    if out["n"] < 1 or out["val_n"] < 1:
        raise ValueError(f"malformed dataset spec {spec!r}: n and val_n must be >= 1")
    if min(size) < 16:
        raise ValueError(f"malformed dataset spec {spec!r}: size must be at least 16 pixels, got {size}")
    if not 1 <= out["classes"] <= 64:
        raise ValueError(f"malformed dataset spec {spec!r}: classes must be in 1..64, got {out['classes']}")
    if not 0 <= out["hue_jitter"] <= 360:
        raise ValueError(f"malformed dataset spec {spec!r}: hue_jitter must be in 0..360 degrees, got {out['hue_jitter']}")
    if out["seed"] < 0:
        raise ValueError(f"malformed dataset spec {spec!r}: seed must be >= 0, got {out['seed']}")
    return out


def _shape_mask(kind: str, u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    """Boolean mask of a shape of radius ``r`` in local (rotated, centred) coordinates u, v."""
    if kind == "disc":
        return u * u + v * v <= r * r
    if kind == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.8 * r
    if kind == "triangle":  # equilateral, inradius r/2: inside all three edge half-planes
        s = np.sqrt(3.0) / 2.0
        return (v <= 0.5 * r) & (-s * u - 0.5 * v <= 0.5 * r) & (s * u - 0.5 * v <= 0.5 * r)
    if kind == "ring":
        d2 = u * u + v * v
        return (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)
    if kind == "cross":
        a, b = np.abs(u), np.abs(v)
        return ((a <= 0.3 * r) & (b <= r)) | ((b <= 0.3 * r) & (a <= r))
    if kind == "diamond":
        return np.abs(u) + np.abs(v) <= r
    raise ValueError(f"unknown shape {kind!r}")


def _smooth_field(rng: np.random.Generator, x: np.ndarray, y: np.ndarray, terms: int, max_freq: float) -> np.ndarray:
    """Sum of random low-frequency sinusoids in roughly [-1, 1] (a cheap smooth texture)."""
    out = np.zeros(np.broadcast(x, y).shape, dtype=np.float64)
    for _ in range(terms):
        fx, fy = rng.uniform(-max_freq, max_freq, size=2)
        out += np.sin(np.pi * (fx * x + fy * y) + rng.uniform(0, 2 * np.pi))
    return out / terms


def render_synthetic(
    rng: np.random.Generator, label: int, height: int, width: int, classes: int, hue_jitter: float = 0.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw one scene; return (RGB uint8 H×W×3, mask uint8 H×W, depth float32 H×W). ``hue_jitter``
    (degrees) draws one extra number per shape, so ``0`` renders exactly the scenes it always did."""
    y = np.linspace(-1.0, 1.0, height)[:, None] * (height / max(height, width))
    x = np.linspace(-1.0, 1.0, width)[None, :] * (width / max(height, width))
    base = rng.uniform(0.25, 0.65, size=3)
    texture = _smooth_field(rng, x, y, terms=3, max_freq=3.0)
    stripes = np.sin(np.pi * rng.uniform(4, 10) * (np.cos(t := rng.uniform(0, np.pi)) * x + np.sin(t) * y))
    img = base[None, None, :] + 0.12 * texture[..., None] + 0.05 * stripes[..., None] * rng.uniform(-1, 1, size=3)
    tilt = rng.uniform(-1, 1, size=2)
    depth = 7.0 + 1.5 * (tilt[0] * x + tilt[1] * y) + 0.3 * _smooth_field(rng, x, y, terms=2, max_freq=1.5)
    mask = np.zeros((height, width), dtype=np.uint8)

    objects = []  # (class, radius, depth) drawn far to near so nearer shapes occlude farther ones
    if classes > 1 and rng.random() < 0.5:
        other = (label + 1 + int(rng.integers(classes - 1))) % classes
        objects.append((other, rng.uniform(0.16, 0.24), rng.uniform(4.0, 5.0)))
    objects.append((label, rng.uniform(0.38, 0.55), rng.uniform(2.0, 3.0)))
    for cls, radius, z in objects:
        cy, cx = (rng.uniform(-1 + radius, 1 - radius) * s for s in (y.max(), x.max()))
        angle = rng.uniform(-0.5, 0.5)
        du, dv = x - cx, y - cy
        u = np.cos(angle) * du + np.sin(angle) * dv
        v = -np.sin(angle) * du + np.cos(angle) * dv
        inside = _shape_mask(SHAPES[cls % len(SHAPES)], u, v, radius)
        hue = cls / classes + (rng.uniform(-0.5, 0.5) * hue_jitter / 360.0 if hue_jitter else 0.0)
        colour = np.array(colorsys.hsv_to_rgb(hue % 1.0, rng.uniform(0.6, 0.9), rng.uniform(0.75, 1.0)))
        shade = 0.85 + 0.15 * np.clip((u - v) / (2 * radius), -1, 1)
        img[inside] = (colour[None, None, :] * shade[..., None])[inside]
        depth[inside] = (z + 0.4 * (u * u + v * v) / (radius * radius))[inside]
        mask[inside] = cls + 1
    img = img * 255.0 + rng.normal(0.0, 3.0, size=img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), mask, depth.astype(np.float32)


class SyntheticDataset(MapImageDataset):
    """Procedural dense dataset; items ``(image, label, {"mask", "depth"})`` (see module docstring)."""

    def __init__(
        self,
        n: int = 512,
        size: int | tuple[int, int] = 64,
        classes: int = 4,
        seed: int = 0,
        split: str | None = None,
        val_n: int | None = None,
        hue_jitter: int = 0,
        **kwargs: Any,
    ) -> None:
        if split not in (None, "train", "val"):
            raise ValueError(f"synthetic: unknown split {split!r}; use 'train', 'val' or None (= train)")
        self.height, self.width = (size, size) if isinstance(size, int) else tuple(size)
        self.num_classes_ = int(classes)
        self.seed = int(seed)
        self.hue_jitter = int(hue_jitter)
        self.split = split or "train"
        count = n if self.split == "train" else (val_n if val_n is not None else max(1, n // 4))
        self.targets = np.arange(count, dtype=np.int64) % self.num_classes_
        self.classes = [f"{SHAPES[c % len(SHAPES)]}-{c}" for c in range(self.num_classes_)]
        self.has_dense = True
        super().__init__(**kwargs)

    @property
    def num_mask_classes(self) -> int:
        """Segmentation classes: background + K object classes."""
        return self.num_classes_ + 1

    def render(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(image, mask, depth) arrays of item ``index``; pure function of (seed, split, index)."""
        cached = getattr(self, "_last_render", None)
        if cached is not None and cached[0] == index:  # image and dense labels come from one render
            return cached[1]
        rng = np.random.default_rng([self.seed, 0 if self.split == "train" else 1, int(index)])
        arrays = render_synthetic(rng, int(self.targets[index]), self.height, self.width, self.num_classes_,
                                  self.hue_jitter)
        self._last_render = (index, arrays)
        return arrays

    def _load_rgb(self, index: int, prepare: Prepare | None) -> Image.Image:
        return Image.fromarray(self.render(index)[0], "RGB")

    def _dense(self, index: int) -> dict[str, np.ndarray]:
        _, mask, depth = self.render(index)
        return {"mask": mask, "depth": depth}

    def extra_repr(self) -> str:
        return f"split={self.split!r}, size={self.height}x{self.width}, classes={self.num_classes_}"
