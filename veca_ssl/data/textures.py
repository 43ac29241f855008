"""``textures:…`` — procedural oriented gratings: the class is *what* the texture is (orientation and
spatial frequency), everything else is what self-supervised augmentations vary.

Spec options (as ``synthetic:``; all optional)::

    textures:n=2048,val_n=512,size=32,classes=8,seed=0

Class ``k`` (``0 <= k < classes <= 8``) fixes the orientation of a square-ish grating, ``(k % 4) × 45°``
(± 7.5°), and its frequency band, ``k // 4``: 1–1.5 or 3–4 cycles per half image (more than the
1.6× a 0.4–1 random-resized crop can change it). Per image and independent of the class: the two
colours the grating mixes (each drifting smoothly across the image), its phase (wandering
smoothly across the image too), a weaker
multiplicative grating of random orientation and frequency (illumination), and pixel noise. Item ``i`` of split ``s`` is drawn from
``numpy.random.default_rng([seed, s, i])`` (s = 0 train / 1 val), labels are ``i % classes``.

Why it exists: it is the CPU quickstart's data, a task on which pretraining has to *win*. On
scikit-learn's digits raw pixels already score 97% with k-NN and 96% with logistic regression —
higher than any feature a few CPU minutes of self-supervised training produce. Here the class
survives every augmentation (crops keep orientation and frequency band, colour jitter and grayscale
keep the geometry) while the pixels of two images of one class disagree (random phase, colours and
illumination), so raw pixels and an untrained network sit far below what view-invariant features
reach (measured numbers: README and ``configs/quickstart.yaml``). Do not flip these images
(a mirror swaps 45° and 135°).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from .base import MapImageDataset
from .decode import Prepare
from .synthetic import parse_synthetic_options

#: Orientations (multiples of 45°) and frequency bands (cycles per half image): 8 classes at most.
ORIENTATIONS = 4
BANDS = ((1.0, 1.5), (3.0, 4.0))


def parse_texture_options(spec: str, options: str) -> dict[str, Any]:
    """``n``, ``val_n``, ``size``, ``classes`` (1–8, default 8) and ``seed``, as ``synthetic:``."""
    out = parse_synthetic_options(spec, options)
    if not any(part.strip().startswith("classes=") for part in options.split(",")):
        out["classes"] = ORIENTATIONS * len(BANDS)
    if out.pop("hue_jitter"):
        raise ValueError(f"malformed dataset spec {spec!r}: textures has no hue_jitter option")
    if not 1 <= out["classes"] <= ORIENTATIONS * len(BANDS):
        raise ValueError(f"malformed dataset spec {spec!r}: classes must be in 1..8, got {out['classes']}")
    return out


def _smooth_field(rng: np.random.Generator, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """A smooth random field in about [-1, 1]: two sinusoids of at most one cycle per image."""
    out = np.zeros(np.broadcast(x, y).shape)
    for _ in range(2):
        fx, fy = rng.uniform(-0.5, 0.5, size=2)
        out += np.sin(np.pi * (fx * x + fy * y) * 2 + rng.uniform(0, 2 * np.pi))
    return out / 2


def render_texture(rng: np.random.Generator, label: int, height: int, width: int) -> np.ndarray:
    """One RGB uint8 H×W×3 grating of class ``label`` (module docstring)."""
    y = np.linspace(-1.0, 1.0, height, endpoint=False)[:, None]
    x = np.linspace(-1.0, 1.0, width, endpoint=False)[None, :]
    theta = np.deg2rad((label % ORIENTATIONS) * 180.0 / ORIENTATIONS + rng.uniform(-7.5, 7.5))
    freq = rng.uniform(*BANDS[label // ORIENTATIONS])
    # the phase wanders smoothly over the image (up to ±π): orientation and frequency stay those of the
    # class, but no two images of a class line up pixel for pixel, however many there are
    phase = rng.uniform(0, 2 * np.pi) + np.pi * _smooth_field(rng, x, y)
    grating = np.tanh(3 * np.sin(2 * np.pi * freq * (x * np.cos(theta) + y * np.sin(theta)) + phase))
    light_theta, light_freq = rng.uniform(0, np.pi), rng.uniform(0.25, 0.5)  # shading, coarser than any class
    light = np.sin(2 * np.pi * light_freq * (x * np.cos(light_theta) + y * np.sin(light_theta))
                   + rng.uniform(0, 2 * np.pi))
    # the two colours drift across the image (one cycle at most), so two crops of one image rarely
    # share them: colour cannot be what matches two views, the grating has to be
    c1, c2 = (np.clip(rng.uniform(0.2, 0.8, 3) + 0.35 * np.stack([_smooth_field(rng, x, y) for _ in range(3)], -1),
                      0.0, 1.0) for _ in range(2))
    img = c1 + (c2 - c1) * ((grating + 1) / 2)[..., None]
    img = img * (1 + 0.25 * light[..., None]) + rng.normal(0.0, 0.03, img.shape)
    return np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)


class TexturesDataset(MapImageDataset):
    """Procedural oriented gratings; items ``(image, label)`` (see the module docstring)."""

    def __init__(self, n: int = 2048, size: int | tuple[int, int] = 32, classes: int = 8, seed: int = 0,
                 split: str | None = None, val_n: int | None = None, **kwargs: Any) -> None:
        if split not in (None, "train", "val"):
            raise ValueError(f"textures: unknown split {split!r}; use 'train', 'val' or None (= train)")
        self.height, self.width = (size, size) if isinstance(size, int) else tuple(size)
        self.num_classes_, self.seed, self.split = int(classes), int(seed), split or "train"
        count = n if self.split == "train" else (val_n if val_n is not None else max(1, n // 4))
        self.targets = np.arange(count, dtype=np.int64) % self.num_classes_
        self.classes = [f"{(k % ORIENTATIONS) * 45}deg-band{k // ORIENTATIONS}" for k in range(self.num_classes_)]
        super().__init__(**kwargs)

    def _load_rgb(self, index: int, prepare: Prepare | None) -> Image.Image:
        rng = np.random.default_rng([self.seed, 0 if self.split == "train" else 1, int(index)])
        return Image.fromarray(render_texture(rng, int(self.targets[index]), self.height, self.width), "RGB")

    def extra_repr(self) -> str:
        return f"split={self.split!r}, size={self.height}x{self.width}, classes={self.num_classes_}"
