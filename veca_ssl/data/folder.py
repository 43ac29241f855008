"""Image files on disk: ``imagefolder:/path`` (class sub-folders) and ``filelist:/path/list.txt``."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .base import MapImageDataset
from .decode import IMAGE_EXTENSIONS, Prepare, has_image_extension, read_bytes

logger = logging.getLogger("veca_ssl.data")


def _images_under(folder: str) -> list[str]:
    """All image files below ``folder`` (recursively), as sorted absolute paths."""
    found: list[str] = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs.sort()
        found.extend(os.path.join(root, f) for f in sorted(files) if has_image_extension(f))
    return found


class PathTable:
    """Many file paths in two NumPy arrays (UTF-8 blob + offsets) instead of a list of ``str``.

    DataLoader workers are forked; reading a Python object touches its reference count, which copies
    the memory page holding it into every worker, so a million-path list slowly duplicates per worker.
    Plain arrays are never written and stay shared.
    """

    def __init__(self, paths: list[str]) -> None:
        encoded = [p.encode("utf-8", "surrogateescape") for p in paths]  # undecodable names survive
        self._offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(e) for e in encoded], out=self._offsets[1:])
        self._blob = np.frombuffer(b"".join(encoded), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, index: int) -> str:
        lo, hi = self._offsets[index], self._offsets[index + 1]
        return self._blob[lo:hi].tobytes().decode("utf-8", "surrogateescape")

    def __iter__(self):
        return (self[i] for i in range(len(self)))


class FileImageDataset(MapImageDataset):
    """Images read from ``paths`` (decoded on access) with integer ``targets``."""

    def __init__(self, paths: list[str], targets: list[int] | np.ndarray, **kwargs: Any) -> None:
        self._paths = PathTable(paths)
        self.targets = np.asarray(targets, dtype=np.int64)
        super().__init__(**kwargs)

    @property
    def paths(self) -> list[str]:
        """All file paths (a new list; use :meth:`path` for one)."""
        return list(self._paths)

    def path(self, index: int) -> str:
        """Path of item ``index``."""
        return self._paths[index]

    def _load_rgb(self, index: int, prepare: Prepare | None) -> Image.Image:
        return self.decoder.read(self._paths[index], prepare)

    def read_encoded(self, index: int) -> bytes:
        """The file's bytes as stored (the shard writer keeps JPEG/PNG bytes unchanged)."""
        return read_bytes(self._paths[index])

    def _name(self, index: int) -> str:
        return self._paths[index]


class ImageFolderDataset(FileImageDataset):
    """``imagefolder:/path`` — one sub-folder per class; labels are the sorted folder names' indices.

    Files with extensions jpg/jpeg/png/webp/bmp (any case) are collected recursively inside each class
    folder. A folder holding images but no class sub-folders is read as an *unlabelled* dataset
    (targets −1), the common case for self-supervised pretraining on one's own photos.

    Raises:
        FileNotFoundError: ``root`` does not exist or is not a directory.
        ValueError: no image file was found.
    """

    def __init__(self, root: str | Path, **kwargs: Any) -> None:
        root = os.path.expanduser(str(root))
        if not os.path.isdir(root):
            raise FileNotFoundError(f"imagefolder: directory {root!r} does not exist")
        self.root = root
        entries = sorted(os.scandir(root), key=lambda e: e.name)
        class_dirs = [e for e in entries if e.is_dir() and not e.name.startswith(".")]
        paths: list[str] = []
        targets: list[int] = []
        classes: list[str] = []
        for d in class_dirs:
            files = _images_under(d.path)
            if not files:
                continue
            classes.append(d.name)
            paths += files
            targets += [len(classes) - 1] * len(files)
        loose = [e.path for e in entries if e.is_file() and has_image_extension(e.name)]
        if classes and loose:
            logger.warning(
                "imagefolder %s: ignoring %d image(s) directly in the root; only class sub-folders are read",
                root,
                len(loose),
            )
        elif not classes:
            paths, targets = loose, [-1] * len(loose)
        if not paths:
            raise ValueError(
                f"imagefolder: no images ({'/'.join(IMAGE_EXTENSIONS)}) found in {root!r}; expected "
                "class sub-folders (root/<class>/<image>) or images directly in the folder"
            )
        self.classes = classes or None
        super().__init__(paths, targets, **kwargs)

    def extra_repr(self) -> str:
        return f"root={self.root!r}, classes={len(self.classes or [])}"


class FileListDataset(FileImageDataset):
    """``filelist:/path/list.txt`` — one image path per line, optionally ``path<TAB>label``.

    Relative paths are resolved against the list file's folder. Blank lines and lines starting with
    ``#`` are ignored. Lines without a label give target −1. Listed files are not checked up front
    (that would stat every file of a million-image list); a missing one is skipped and counted like
    a corrupt one (``FileNotFoundError`` is an ``OSError``).

    Raises:
        FileNotFoundError: the list file does not exist.
        ValueError: a label is not an integer, or the list is empty.
    """

    def __init__(self, list_path: str | Path, **kwargs: Any) -> None:
        list_path = os.path.expanduser(str(list_path))
        if not os.path.isfile(list_path):
            raise FileNotFoundError(f"filelist: list file {list_path!r} does not exist")
        self.list_path = list_path
        base = os.path.dirname(os.path.abspath(list_path))
        paths: list[str] = []
        targets: list[int] = []
        with open(list_path, encoding="utf-8") as f:
            for lineno, raw in enumerate(f, 1):
                line = raw.rstrip("\r\n")
                if not line.strip() or line.lstrip().startswith("#"):
                    continue
                path, _, label = line.partition("\t")
                try:
                    target = int(label) if label.strip() else -1
                except ValueError:
                    raise ValueError(
                        f"filelist {list_path}:{lineno}: label {label!r} is not an integer "
                        "(expected 'path<TAB>label' or just 'path')"
                    ) from None
                path = os.path.expanduser(path.strip())
                paths.append(path if os.path.isabs(path) else os.path.join(base, path))
                targets.append(target)
        if not paths:
            raise ValueError(f"filelist: {list_path!r} lists no images")
        super().__init__(paths, targets, **kwargs)
        self.classes = None

    def extra_repr(self) -> str:
        return f"list={self.list_path!r}"
