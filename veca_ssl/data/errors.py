"""Skipping unreadable images: count them, log each once, stop when there are too many.

SPEC §4: a corrupt or unreadable image is skipped, counted and logged; the run goes on, and stops with
a clear error only when skips pass a configured fraction (config key ``data.max_skip_fraction``,
default 1%). One :class:`SkipCounter` is shared by everything that decodes images for one dataset
(map-style loaders, WebDataset members, the shard writer). DataLoader worker processes each hold their
own copy, so the fraction is checked per worker — over the stream that worker actually read.
"""

from __future__ import annotations

import logging
import struct
import zlib

from PIL import Image

logger = logging.getLogger("veca_ssl.data")

#: Exceptions that mean "these bytes are not a readable image" (as opposed to a bug in our code).
#: PIL raises UnidentifiedImageError (an OSError) for non-images, OSError for truncated files,
#: SyntaxError for broken PNG chunks, and struct/zlib errors for some damaged headers.
DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    struct.error,
    zlib.error,
    Image.DecompressionBombError,
)

#: Config key named in the error so the user knows what to change.
SKIP_CONFIG_KEY = "data.max_skip_fraction"


class SkipCounter:
    """Counts decoded (``ok``) and skipped images and raises once skips are too frequent.

    Args:
        max_skip_fraction: largest tolerated ``skipped / seen`` (0–1), checked once at least
            ``min_seen`` images have been attempted.
        min_seen: attempts needed before the fraction is judged (a 1-in-20 corrupt file in a tiny
            dataset should not stop a run).
        fail_fast: if every one of the first ``fail_fast`` attempts fails, raise at once — the path,
            format or permissions are wrong, not a few damaged files.

    Raises (from :meth:`skip` / :meth:`ok`):
        RuntimeError naming the count, the fraction, the threshold and ``data.max_skip_fraction``.
    """

    def __init__(self, max_skip_fraction: float = 0.01, min_seen: int = 100, fail_fast: int = 10) -> None:
        if not 0.0 <= float(max_skip_fraction) <= 1.0:
            raise ValueError(
                f"{SKIP_CONFIG_KEY} must be a fraction in [0, 1], got {max_skip_fraction!r} "
                "(e.g. 0.01 tolerates 1% unreadable images)"
            )
        if min_seen < 1 or fail_fast < 1:
            raise ValueError(f"min_seen and fail_fast must be >= 1, got {min_seen}, {fail_fast}")
        self.max_skip_fraction = float(max_skip_fraction)
        self.min_seen = int(min_seen)
        self.fail_fast = int(fail_fast)
        self.seen = 0
        self.skipped = 0
        self.skipped_items: set[str] = set()

    @property
    def fraction(self) -> float:
        """Fraction of attempted images that were skipped so far."""
        return self.skipped / self.seen if self.seen else 0.0

    def ok(self) -> None:
        """Record one successfully decoded image."""
        self.seen += 1
        if self.skipped and self.seen == self.min_seen:
            self.check()

    def skip(self, item: str, error: BaseException | str) -> None:
        """Record one unreadable image ``item`` (a path or shard member); log it the first time."""
        self.seen += 1
        self.skipped += 1
        if item not in self.skipped_items:
            self.skipped_items.add(item)
            logger.warning("skipping unreadable image %s: %s", item, error)
        self.check()

    def check(self) -> None:
        """Raise if the skip budget is exhausted (see class docstring)."""
        if self.skipped == self.seen and self.seen >= self.fail_fast:
            raise RuntimeError(
                f"all of the first {self.seen} images failed to load (e.g. {sorted(self.skipped_items)[:3]}); "
                "check the dataset path, file format and permissions"
            )
        if self.seen >= self.min_seen and self.fraction > self.max_skip_fraction:
            raise RuntimeError(
                f"{self.skipped} of {self.seen} images were unreadable ({self.fraction:.2%}), more than "
                f"{SKIP_CONFIG_KEY}={self.max_skip_fraction:g}; repair or remove the files logged above, "
                f"or raise {SKIP_CONFIG_KEY}"
            )

    def wds_handler(self, error: BaseException) -> bool:
        """WebDataset exception handler: count the unreadable shard/member, then keep going."""
        where = " ".join(str(a) for a in getattr(error, "args", ())[1:] if isinstance(a, str))
        self.skip(where or repr(error)[:200], error)
        return True

    def state(self) -> dict[str, float]:
        """Counts for logs and metrics."""
        return {"seen": self.seen, "skipped": self.skipped, "fraction": self.fraction}

    def __repr__(self) -> str:
        return (
            f"SkipCounter(seen={self.seen}, skipped={self.skipped}, "
            f"max_skip_fraction={self.max_skip_fraction}, min_seen={self.min_seen})"
        )
