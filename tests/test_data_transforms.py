"""Multi-crop augmentation, evaluation transforms and their primitives (veca_ssl.data.transforms/augment)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from veca_ssl.data import augment, transforms
from veca_ssl.data.augment import IMAGENET_MEAN, IMAGENET_STD, Normalize, random_resized_crop_box
from veca_ssl.data.transforms import DenseEvalTransform, MultiCropTransform, make_eval_transform

MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def _noise_image(w: int, h: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    shape = (h, w, 3) if mode == "RGB" else (h, w)
    return Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8), mode)


def _plain(**kw) -> MultiCropTransform:
    """A transform with every photometric op off unless switched on in ``kw``."""
    base = dict(jitter_p=0.0, grayscale_p=0.0, flip_p=0.0, global_blur_p=(0.0, 0.0), local_blur_p=0.0, solarize_p=0.0)
    base.update(kw)
    return MultiCropTransform(**base)


def test_multicrop_counts_shapes_and_dtype():
    t = MultiCropTransform(global_size=32, local_size=16, num_local_crops=3)
    out = t(_noise_image(50, 40), np.random.default_rng(0))
    assert set(out) == {"global", "local"}
    assert [x.shape for x in out["global"]] == [torch.Size([3, 32, 32])] * 2
    assert [x.shape for x in out["local"]] == [torch.Size([3, 16, 16])] * 3
    assert all(x.dtype == torch.float32 and x.is_contiguous() for x in out["global"] + out["local"])
    none = MultiCropTransform(global_size=32, local_size=16, num_local_crops=0)(_noise_image(50, 40), np.random.default_rng(0))
    assert none["local"] == [] and len(none["global"]) == 2


def test_multicrop_is_deterministic_given_the_rng_and_varies_with_it():
    t = MultiCropTransform(global_size=32, local_size=16, num_local_crops=2)
    img = _noise_image(64, 48)
    a, b = t(img, np.random.default_rng(7)), t(img, np.random.default_rng(7))
    c = t(img, np.random.default_rng(8))
    flat = lambda o: o["global"] + o["local"]  # noqa: E731
    assert all(torch.equal(x, y) for x, y in zip(flat(a), flat(b)))
    assert not all(torch.equal(x, y) for x, y in zip(flat(a), flat(c)))
    with pytest.raises(TypeError, match="numpy.random.Generator"):
        t(img, 3)  # type: ignore[arg-type]


def test_grayscale_source_becomes_three_channels():
    t = MultiCropTransform(global_size=16, local_size=8, num_local_crops=1)
    out = t(_noise_image(30, 30, mode="L"), np.random.default_rng(0))
    assert out["global"][0].shape == (3, 16, 16)
    # de-normalised channels are identical up to jitter, which keeps gray pixels gray (saturation/hue)
    rgb = out["global"][1] * STD + MEAN
    assert torch.allclose(rgb[0], rgb[1], atol=0.02) and torch.allclose(rgb[1], rgb[2], atol=0.02)


def test_normalize_matches_hand_formula():
    img = _noise_image(5, 4)
    ref = (torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255 - MEAN) / STD
    assert torch.allclose(Normalize()(img), ref, atol=1e-6)


def test_flip_rate_is_about_half():
    t = _plain(global_size=8, local_size=8, num_local_crops=0, flip_p=0.5, global_scale=(1.0, 1.0))
    arr = np.zeros((8, 8, 3), dtype=np.uint8)
    arr[:, 4:] = 255  # dark left half, bright right half: a flip swaps them
    img = Image.fromarray(arr)
    flips = []
    for seed in range(300):
        g = t(img, np.random.default_rng(seed))["global"]
        flips += [bool(x[:, :, :4].mean() > x[:, :, 4:].mean()) for x in g]
    assert 0.44 < np.mean(flips) < 0.56


def test_grayscale_rate_is_about_a_fifth():
    t = _plain(global_size=8, local_size=8, num_local_crops=2, grayscale_p=0.2)
    img = Image.new("RGB", (8, 8), (220, 30, 40))
    gray = []
    for seed in range(200):
        out = t(img, np.random.default_rng(seed))
        for x in out["global"] + out["local"]:
            rgb = x * STD + MEAN
            gray.append(bool(torch.allclose(rgb[0], rgb[1], atol=1e-3)))
    assert 0.16 < np.mean(gray) < 0.24


def test_blur_and_solarize_probabilities_per_crop(monkeypatch):
    """DINOv2 recipe: blur global0 always, global1 10%, locals 50%; solarize global1 only, 20%."""
    calls: list[tuple[str, int]] = []
    real_blur, real_solarize = transforms.gaussian_blur, transforms.solarize
    monkeypatch.setattr(transforms, "gaussian_blur", lambda im, rng: (calls.append(("blur", im.size[0])), real_blur(im, rng))[1])
    monkeypatch.setattr(transforms, "solarize", lambda im: (calls.append(("sol", im.size[0])), real_solarize(im))[1])
    t = MultiCropTransform(global_size=12, local_size=6, num_local_crops=2)
    n = 300
    per_sample = []
    for seed in range(n):
        calls.clear()
        t(_noise_image(20, 20, seed), np.random.default_rng(seed))
        per_sample.append(list(calls))
    # each sample: crops are processed global0, global1, locals — blur of global0 is always first
    assert all(s and s[0] == ("blur", 12) for s in per_sample)
    g1_blur = np.mean([sum(1 for c in s if c == ("blur", 12)) - 1 for s in per_sample])
    sol = np.mean([sum(1 for c in s if c[0] == "sol") for s in per_sample])
    local_blur = np.mean([sum(1 for c in s if c == ("blur", 6)) for s in per_sample]) / 2
    assert all(c[1] == 12 for s in per_sample for c in s if c[0] == "sol")
    assert 0.05 < g1_blur < 0.16
    assert 0.14 < sol < 0.27
    assert 0.42 < local_blur < 0.58


def test_random_resized_crop_box_respects_scale_and_ratio():
    rng = np.random.default_rng(0)
    for _ in range(500):
        left, top, w, h = random_resized_crop_box((200, 150), rng, (0.05, 0.32))
        assert 0 <= left and left + w <= 200 and 0 <= top and top + h <= 150
        area = w * h / (200 * 150)
        assert 0.045 < area < 0.33  # rounding of w, h to pixels widens the range slightly
        assert 3 / 4 - 0.05 < w / h < 4 / 3 + 0.05
    # impossible aspect (very thin image) falls back to a centred crop inside the image
    left, top, w, h = random_resized_crop_box((400, 10), np.random.default_rng(1), (0.9, 1.0))
    assert (w, h) == (13, 10) and top == 0 and left == (400 - 13) // 2


def test_color_jitter_primitives():
    img = _noise_image(16, 16)
    same = augment.color_jitter(img, np.random.default_rng(0), 0.0, 0.0, 0.0, 0.0)
    assert np.array_equal(np.asarray(same), np.asarray(img))
    red = Image.new("RGB", (4, 4), (255, 0, 0))
    cyan = np.asarray(augment.adjust_hue(red, 0.5))[0, 0]
    assert cyan[0] < 10 and cyan[1] > 240 and cyan[2] > 240
    assert np.asarray(augment.solarize(Image.new("RGB", (2, 2), (200, 100, 0))))[0, 0].tolist() == [55, 100, 0]
    g = np.asarray(augment.grayscale(red))[0, 0]
    assert g[0] == g[1] == g[2] == 76  # ITU-R 601-2 luma of pure red


def _jpeg(img: Image.Image, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def test_jpeg_draft_decodes_at_reduced_scale_with_the_same_crops():
    x = np.linspace(0, 1, 800)
    smooth = (np.stack([np.outer(np.sin(6 * x), np.cos(4 * x))] * 3, -1) * 120 + 128).astype(np.uint8)
    data = _jpeg(Image.fromarray(smooth))
    t = MultiCropTransform(global_size=48, local_size=24, num_local_crops=2)
    lazy = Image.open(io.BytesIO(data))
    plan = t.prepare(lazy, np.random.default_rng(3))
    assert plan.reduce == t.draft_reduction(plan) and plan.reduce >= 2
    assert lazy.size == (800 // plan.reduce, 800 // plan.reduce)  # decoded smaller, before any pixel work
    fast = t(Image.open(io.BytesIO(data)), np.random.default_rng(3))
    full = MultiCropTransform(global_size=48, local_size=24, num_local_crops=2, use_draft=False)(
        Image.open(io.BytesIO(data)), np.random.default_rng(3)
    )
    for a, b in zip(fast["global"] + fast["local"], full["global"] + full["local"]):
        assert (a - b).abs().mean() < 0.05  # same boxes, same augmentations; only resampling differs
    # a crop too small for any reduction keeps full-resolution decoding
    small = MultiCropTransform(global_size=400, local_size=200, num_local_crops=1)
    assert small.prepare(Image.open(io.BytesIO(data)), np.random.default_rng(0)).reduce == 1


def test_eval_transform_no_op_when_size_matches_and_centre_crop():
    img = _noise_image(40, 20)
    assert torch.equal(make_eval_transform((20, 40))(img), Normalize()(img))
    centre = make_eval_transform(20)(img)  # covers 20x20 without scaling: exact centre crop
    assert torch.allclose(centre, Normalize()(img.crop((10, 0, 30, 20))), atol=1e-5)
    out = make_eval_transform(224, resize=256)(_noise_image(300, 200))
    assert out.shape == (3, 224, 224)
    assert make_eval_transform((32, 48))(_noise_image(100, 30)).shape == (3, 32, 48)
    with pytest.raises(ValueError, match="resize"):
        make_eval_transform(32, resize=0)


def test_dense_eval_transform_keeps_mask_and_depth_aligned():
    mask = np.zeros((8, 12), dtype=np.uint8)
    mask[2:6, 3:9] = 3
    mask[0, 0] = 255
    img = Image.fromarray(np.where(mask[..., None] == 3, 200, 20).astype(np.uint8).repeat(3, -1))
    depth = np.tile(np.linspace(1.0, 2.0, 12, dtype=np.float32), (8, 1))
    t = DenseEvalTransform((16, 24))
    x, dense = t(img, {"mask": mask, "depth": depth})
    assert x.shape == (3, 16, 24) and dense["mask"].shape == (16, 24) and dense["depth"].shape == (16, 24)
    assert dense["mask"].dtype == torch.int64 and dense["depth"].dtype == torch.float32
    assert set(dense["mask"].unique().tolist()) == {0, 3, 255}  # nearest: no invented labels
    assert torch.equal(dense["mask"], torch.from_numpy(mask.repeat(2, 0).repeat(2, 1)).long())
    bright = (x * STD + MEAN)[0] > 0.5
    assert (bright == (dense["mask"] == 3)).float().mean() > 0.95  # image and mask stay aligned
    assert 1.0 <= dense["depth"].min() and dense["depth"].max() <= 2.0
    assert torch.all(dense["depth"][:, 1:] >= dense["depth"][:, :-1] - 1e-6)  # bilinear keeps the ramp


def test_fused_jitter_matches_exact_without_hue_and_draws_the_same_numbers():
    x = np.linspace(0, 1, 48)
    arr = np.stack([np.outer(np.sin(3 * x), np.cos(2 * x)) * 100 + 128, np.outer(x, x) * 200 + 20, np.outer(1 - x, x) * 150 + 50], -1)
    img = Image.fromarray(arr.astype(np.uint8))
    for seed in range(5):
        r1, r2 = np.random.default_rng(seed), np.random.default_rng(seed)
        exact = np.asarray(augment.color_jitter(img, r1, 0.4, 0.4, 0.2, 0.0)).astype(float)
        fused = np.asarray(augment.color_jitter_fused(img, r2, 0.4, 0.4, 0.2, 0.0)).astype(float)
        assert np.abs(exact - fused).mean() < 3.0  # only rounding/clipping order differs
        assert r1.random() == r2.random()  # identical random draws: switching modes keeps the recipe
    same = augment.color_jitter_fused(img, np.random.default_rng(0), 0.0, 0.0, 0.0, 0.0)
    assert np.array_equal(np.asarray(same), np.asarray(img))
    red = Image.new("RGB", (2, 2), (200, 30, 30))
    for jitter in (augment.color_jitter, augment.color_jitter_fused):  # +hue: red turns towards yellow
        r, g, b = np.asarray(jitter(red, np.random.default_rng(0), 0.0, 0.0, 0.0, 0.1))[0, 0].astype(int)
        assert g > 30 and g > b
    t = MultiCropTransform(global_size=16, local_size=8, num_local_crops=1, jitter_mode="fused")
    assert t(img, np.random.default_rng(0))["global"][0].shape == (3, 16, 16)
    with pytest.raises(ValueError, match="jitter_mode"):
        MultiCropTransform(jitter_mode="fast")
