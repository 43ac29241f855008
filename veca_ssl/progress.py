"""Progress of long loops: a tqdm bar in a terminal and periodic lines in the log.

A bar alone is lost in batch jobs (no terminal) and log files; log lines alone are noisy in a
terminal. :func:`track` gives both: the bar when ``bar`` is true and stderr is a terminal, and
``INFO`` lines on the ``veca_ssl.progress`` logger — at most one per ``min_interval_s`` for each tenth
of the work done, at least one per ``max_interval_s``, and one when the loop ends — which the
command decides where to write (a log file, stderr in batch jobs).
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

log = logging.getLogger("veca_ssl.progress")

T = TypeVar("T")


def progress_enabled(flag: bool) -> bool:
    """Progress bars only when asked for and stderr is a terminal."""
    return bool(flag) and sys.stderr.isatty()


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


class LogLines:
    """Decides when a loop of ``total`` units (None: unknown) logs a progress line."""

    def __init__(self, desc: str, total: int | None, unit: str, min_interval_s: float = 5.0,
                 max_interval_s: float = 60.0) -> None:
        self.desc, self.total, self.unit = desc, total, unit
        self.min_interval_s, self.max_interval_s = min_interval_s, max_interval_s
        self.start = self.last = time.perf_counter()
        self.done = 0
        self.logged_tenth = 0

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.perf_counter()
        since = now - self.last
        tenth = math.floor(10 * self.done / self.total) if self.total else 0
        if (tenth > self.logged_tenth and since >= self.min_interval_s) or since >= self.max_interval_s:
            if self.total is None or self.done < self.total:
                self._line(now)
            self.logged_tenth = tenth

    def _line(self, now: float) -> None:
        self.last = now
        elapsed = now - self.start
        rate = self.done / elapsed if elapsed > 0 else float("nan")
        if self.total:
            eta = (self.total - self.done) / rate if rate > 0 else float("nan")
            log.info("%s: %d/%d %s (%.0f%%), %.3g %s/s, elapsed %s, ETA %s", self.desc, self.done, self.total,
                     self.unit, 100 * self.done / self.total, rate, self.unit, _duration(elapsed),
                     _duration(eta) if math.isfinite(eta) else "?")
        else:
            log.info("%s: %d %s, %.3g %s/s, elapsed %s", self.desc, self.done, self.unit, rate, self.unit,
                     _duration(elapsed))

    def close(self) -> None:
        elapsed = time.perf_counter() - self.start
        log.info("%s: done in %.1f s (%d x %s)", self.desc, elapsed, self.done, self.unit)


def track(iterable: Iterable[T], desc: str, total: int | None = None, unit: str = "it", bar: bool = True,
          min_interval_s: float = 5.0, max_interval_s: float = 60.0) -> Iterator[T]:
    """Iterate ``iterable`` with a terminal bar (when ``bar`` and a terminal) and progress log lines."""
    if total is None:
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:  # streaming data: unknown length
            total = None
    lines = LogLines(desc, total, unit, min_interval_s, max_interval_s)
    with tqdm(iterable, desc=desc, total=total, unit=unit, disable=not progress_enabled(bar),
              dynamic_ncols=True, leave=False) as it:
        for item in it:
            yield item
            lines.update(1)
    lines.close()
