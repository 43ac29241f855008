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


class _Walk:
    """The image files below class folders, each directory read once.

    Directory symlinks are followed (as ``os.walk(followlinks=True)`` and torchvision's ImageFolder
    do), but a directory already read (a loop such as ``ln -s . self``, two links to one folder, a
    link into another class's folder) is not read again: its images would be duplicated, or filed
    under two classes. Each skipped link is logged once with what it points to.
    """

    def __init__(self, root: str, class_dirs: list[str]) -> None:
        self.root = root
        self.seen: dict[tuple[int, int], str] = {}  # (device, inode) -> the path it was read as
        self.class_of: dict[tuple[int, int], str] = {}
        for d in class_dirs:
            try:
                self.class_of[self._key(d)] = d
            except OSError:
                pass
        self.skipped: list[str] = []

    @staticmethod
    def _key(path: str) -> tuple[int, int]:
        st = os.stat(path)
        return st.st_dev, st.st_ino

    def images(self, class_dir: str) -> list[str]:
        """All image files below ``class_dir`` (recursively), in ``os.walk`` order (a folder's own files
        sorted, then its sub-folders sorted)."""
        found: list[str] = []
        key = self._key(class_dir)
        if key in self.seen:  # two class folders that are one directory
            self._skip(class_dir, f"already read as {self.seen[key]}")
        else:  # the dataset root is above every class folder: a link back to it is a loop too
            self._visit(class_dir, {self._key(self.root): self.root}, found)
        return found

    def _visit(self, folder: str, ancestors: dict[tuple[int, int], str], found: list[str]) -> None:
        key = self._key(folder)
        self.seen[key] = folder
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as err:  # an unreadable sub-folder: its images are missing, say which
            logger.warning("imagefolder %s: cannot list %s (%s); its images are left out", self.root, folder, err)
            return
        subdirs = []
        for e in entries:
            try:
                is_dir = e.is_dir()  # follows symlinks
            except OSError:
                is_dir = False
            if not is_dir:
                if has_image_extension(e.name):
                    found.append(e.path)
                continue
            subdirs.append(e)
        chain = {**ancestors, key: folder}
        for e in subdirs:
            try:
                sub = self._key(e.path)
            except OSError:
                continue
            if sub in chain:
                self._skip(e.path, f"a loop back to {chain[sub]}")
            elif sub in self.seen:
                self._skip(e.path, f"already read as {self.seen[sub]}")
            elif sub in self.class_of and self.class_of[sub] != folder:
                self._skip(e.path, f"the class folder {self.class_of[sub]}")
            else:
                self._visit(e.path, chain, found)

    def _skip(self, path: str, why: str) -> None:
        self.skipped.append(path)
        target = os.path.realpath(path)
        logger.warning("imagefolder %s: not following %s -> %s: %s (each folder is read once)", self.root, path,
                       target, why)


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

    As torchvision's ``ImageFolder``: the classes are the sorted names of the sub-folders (hidden ones,
    starting with ``.``, aside), and files with extensions jpg/jpeg/png/webp/bmp (any case) are
    collected recursively inside each class folder, following directory symlinks — each directory
    once (a symlink loop or a second link to a folder is logged and not read again). A class folder
    without any image is an error naming it (a class left out would shift every later label), unless
    ``allow_empty_classes``: then it stays a class with zero images. A folder holding images but no
    class sub-folders is read as an *unlabelled* dataset (targets −1), the common case for
    self-supervised pretraining on one's own photos.

    Raises:
        FileNotFoundError: ``root`` does not exist or is not a directory.
        ValueError: no image file was found, or a class folder holds none (without ``allow_empty_classes``).
    """

    def __init__(self, root: str | Path, allow_empty_classes: bool = False, **kwargs: Any) -> None:
        root = os.path.expanduser(str(root))
        if not os.path.isdir(root):
            raise FileNotFoundError(f"imagefolder: directory {root!r} does not exist")
        self.root = root
        entries = sorted(os.scandir(root), key=lambda e: e.name)
        class_dirs = [e for e in entries if e.is_dir() and not e.name.startswith(".")]
        walk = _Walk(root, [d.path for d in class_dirs])
        files_of = {d.name: walk.images(d.path) for d in class_dirs}
        classes = list(files_of)
        empty = [name for name, files in files_of.items() if not files]
        loose = [e.path for e in entries if e.is_file() and has_image_extension(e.name)]
        if empty and len(empty) < len(classes) and not allow_empty_classes:
            raise ValueError(
                f"imagefolder {root}: class folder{'s' if len(empty) > 1 else ''} {', '.join(empty)} "
                f"hold{'' if len(empty) > 1 else 's'} no image ({'/'.join(IMAGE_EXTENSIONS)}); leaving "
                f"{'them' if len(empty) > 1 else 'it'} out would shift the labels of every later class. Add "
                f"images, remove the folder, or keep it as a class with zero images (allow_empty_classes: "
                f"data.allow_empty_classes=true in training, --allow-empty-classes in eval, extract and data)")
        paths: list[str] = []
        targets: list[int] = []
        if len(empty) == len(classes):  # sub-folders without any image: no classes at all
            classes = []
        for label, name in enumerate(classes):
            paths += files_of[name]
            targets += [label] * len(files_of[name])
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


def check_same_classes(named: dict[str, list[str] | None], hint: str = "") -> None:
    """Refuse datasets whose class lists differ (``{"--train imagefolder:/a": classes, ...}``; ``None``
    = unknown, not compared): label ``k`` must mean the same class in each, or every score is wrong.
    ``hint`` ends the message (how to keep an empty class folder, in the caller's terms)."""
    known = [(name, list(classes)) for name, classes in named.items() if classes]
    for (name_a, a), (name_b, b) in zip(known, known[1:]):
        if a == b:
            continue
        only_a = [c for c in a if c not in b]
        only_b = [c for c in b if c not in a]
        parts = [f"only in {name}: {', '.join(c[:5])}{' …' if len(c) > 5 else ''}"
                 for name, c in ((name_a, only_a), (name_b, only_b)) if c]
        detail = "; ".join(parts) or "the same names in another order"
        raise ValueError(f"{name_a} has {len(a)} classes and {name_b} has {len(b)}, and they differ ({detail}): "
                         f"label k would name a different class in each. Give both the same class folders{hint}")
