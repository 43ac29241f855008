"""Decoding: EXIF orientation everywhere (plain, reduced-scale JPEG, shards, inspect sizes), the pixel
limit checked on the header (a 13000² palette PNG is never decoded), decompression bombs in inspect."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from veca_ssl.data import (
    Decoder,
    MaskingGenerator,
    MultiCropTransform,
    SSLDataset,
    UnreadableItem,
    build_dataset,
    make_shards,
)
from veca_ssl.data.inspection import inspect_dataset

ORIENTATION = 0x0112


def _with_orientation(arr: np.ndarray, fmt: str, orientation: int) -> bytes:
    img = Image.fromarray(arr)
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    buf = io.BytesIO()
    img.save(buf, format=fmt, exif=exif.tobytes(), **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _stored_and_upright() -> tuple[np.ndarray, np.ndarray]:
    """A 30×20 (W×H) stored image and how it looks after EXIF orientation 6 (rotate 90° clockwise)."""
    stored = np.zeros((20, 30, 3), np.uint8)
    stored[:, :10] = (255, 0, 0)  # left third red
    stored[:5, 10:] = (0, 0, 255)  # a blue bar along the top of the rest
    upright = np.rot90(stored, k=-1).copy()  # orientation 6: the stored top row becomes the right column
    return stored, upright


@pytest.mark.parametrize("orientation, k", [(3, 2), (6, -1), (8, 1)])
def test_exif_orientation_is_applied_when_decoding(orientation, k):
    stored, _ = _stored_and_upright()
    img = Decoder().decode(_with_orientation(stored, "PNG", orientation), "x.png")
    assert np.array_equal(np.asarray(img), np.rot90(stored, k=k))


def test_exif_orientation_in_folders_shards_training_crops_and_inspect(tmp_path):
    stored, upright = _stored_and_upright()
    (tmp_path / "f" / "c").mkdir(parents=True)
    (tmp_path / "f" / "c" / "rot.png").write_bytes(_with_orientation(stored, "PNG", 6))
    folder = build_dataset(f"imagefolder:{tmp_path / 'f'}")
    assert np.array_equal(np.asarray(folder[0][0]), upright)  # evaluation/extraction path
    shards = make_shards(str(tmp_path / "f"), tmp_path / "s", shard_size=4, progress=False)
    (img, _), = list(build_dataset(shards["spec"]))  # the original bytes travel; shards decode upright
    assert np.array_equal(np.asarray(img), upright)
    summary = inspect_dataset(f"imagefolder:{tmp_path / 'f'}")
    assert summary["sizes"]["width"]["max"] == 20 and summary["sizes"]["height"]["max"] == 30

    # training crops with a reduced-scale JPEG decode (draft) planned in the upright frame: a JPEG with
    # orientation 6 gives the same crops as the same picture stored upright
    rng = np.random.default_rng(0)
    big = np.asarray(Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize((800, 600)))
    for name, data in (("rot", _with_orientation(big, "JPEG", 6)), ("up", _with_orientation(np.rot90(big, -1).copy(), "JPEG", 1))):
        (tmp_path / name / "c").mkdir(parents=True)
        (tmp_path / name / "c" / "x.jpg").write_bytes(data)
    t = MultiCropTransform(global_size=32, local_size=16, num_local_crops=1, use_draft=True)
    crops = {}
    for name in ("rot", "up"):
        ds = SSLDataset(build_dataset(f"imagefolder:{tmp_path / name}"), t, MaskingGenerator((4, 4)), 8)
        crops[name] = ds[(0, 7)]
    for a, b in zip(crops["rot"]["global"] + crops["rot"]["local"], crops["up"]["global"] + crops["up"]["local"]):
        assert float((a - b).abs().mean()) < 0.05  # same content up to JPEG block differences


def _png(width: int, height: int, idat: bytes) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 3, 0, 0, 0)  # 8-bit palette
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"PLTE", b"\x00\x00\x00\xff\xff\xff")
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def palette_13000() -> bytes:
    """A valid ~160 KB palette PNG of 13000 × 13000 pixels (~169 MB once decoded)."""
    c = zlib.compressobj(1)
    row = b"\x00" * 13001
    return _png(13000, 13000, b"".join(c.compress(row) for _ in range(13000)) + c.flush())


def test_images_above_the_pixel_limit_are_never_decoded(palette_13000, tmp_path, monkeypatch):
    def refuse(self):
        raise AssertionError("the 13000² PNG was decoded")

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", refuse)
    with pytest.raises(UnreadableItem, match=r"13000x13000 = 169000000 pixels is above data\.max_pixels") as err:
        Decoder().decode(palette_13000, "big.png")
    assert err.value.kind == "too large"
    root = tmp_path / "f"
    (root / "c").mkdir(parents=True)
    (root / "c" / "0_big.png").write_bytes(palette_13000)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "c" / "1_ok.jpg")
    base = build_dataset(f"imagefolder:{root}")
    ds = SSLDataset(base, MultiCropTransform(global_size=16, local_size=8, num_local_crops=1), None, 8)
    sample = ds[(0, 1)]  # training: replaced by the next readable image, recorded as too large
    assert [r["kind"] for r in sample["skips"]] == ["too large"]
    summary = inspect_dataset(f"imagefolder:{root}", num_samples=2)
    assert summary["skipped"] >= 1 and summary["skipped_items"][0]["kind"] == "too large"
    monkeypatch.undo()
    lifted = Decoder(max_pixels=0).open(palette_13000, "big.png")  # 0 = no limit of ours
    assert lifted.size == (13000, 13000)


def test_decompression_bomb_is_reported_by_inspect_not_a_crash(tmp_path, capsys):
    from veca_ssl.data.cli import main as data_main

    root = tmp_path / "f"
    (root / "c").mkdir(parents=True)
    (root / "c" / "bomb.png").write_bytes(_png(14000, 14000, zlib.compress(b"\x00" * 100)))  # > PIL's 2x limit
    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(root / "c" / f"ok{i}.png")
    assert data_main(["inspect", f"imagefolder:{root}", "--out", str(tmp_path / "g.png")]) == 0
    text = capsys.readouterr().out
    # one file, counted once although both the header probe and the grid tried it
    assert "skipped unreadable: 1" in text and "bomb.png (too large" in text
    assert Path(tmp_path / "g.png").is_file()
