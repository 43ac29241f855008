"""Progress of long loops: a tqdm bar in a terminal and periodic lines in the log.

A bar alone is lost in batch jobs (no terminal) and log files; log lines alone are noisy in a
terminal. :func:`track` gives both: the bar when ``bar`` is true and stderr is a terminal, and
``INFO`` lines on the ``veca_ssl.progress`` logger — at most one per ``min_interval_s`` for each tenth
of the work done, at least one per ``max_interval_s``, and one when the loop ends — which the
command decides where to write (a log file, stderr in batch jobs). Training, which logs nothing through
``logging``, gives :class:`LogLines` an ``emit`` that prints: in a batch job its stderr gets these lines
at that rate instead of a bar's carriage-return updates (one every few milliseconds, all kept by a
log file).
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator
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
    """Decides when a loop of ``total`` units (None: unknown) logs a progress line.

    ``initial``: units already done before this process started (a resumed run); the rate and the ETA
    count only this process's. ``emit`` takes each line (default: ``INFO`` on ``veca_ssl.progress``).
    """

    def __init__(self, desc: str, total: int | None, unit: str, min_interval_s: float = 5.0,
                 max_interval_s: float = 60.0, initial: int = 0,
                 emit: Callable[[str], None] | None = None) -> None:
        self.desc, self.total, self.unit = desc, total, unit
        self.min_interval_s, self.max_interval_s = min_interval_s, max_interval_s
        self.start = self.last = time.perf_counter()
        self.initial = self.done = initial
        self.logged_tenth = math.floor(10 * initial / total) if total else 0
        self.emit = emit or log.info
        self.postfix = ""

    def update(self, n: int = 1, postfix: str | None = None) -> None:
        self.done += n
        if postfix is not None:
            self.postfix = postfix
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
        rate = (self.done - self.initial) / elapsed if elapsed > 0 else float("nan")
        extra = f", {self.postfix}" if self.postfix else ""
        if self.total:
            eta = (self.total - self.done) / rate if rate > 0 else float("nan")
            self.emit(f"{self.desc}: {self.done}/{self.total} {self.unit} ({100 * self.done / self.total:.0f}%), "
                      f"{rate:.3g} {self.unit}/s, elapsed {_duration(elapsed)}, "
                      f"ETA {_duration(eta) if math.isfinite(eta) else '?'}{extra}")
        else:
            self.emit(f"{self.desc}: {self.done} {self.unit}, {rate:.3g} {self.unit}/s, "
                      f"elapsed {_duration(elapsed)}{extra}")

    def close(self) -> None:
        elapsed = time.perf_counter() - self.start
        extra = f", {self.postfix}" if self.postfix else ""
        self.emit(f"{self.desc}: done in {elapsed:.1f} s ({self.done - self.initial} x {self.unit}){extra}")


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
