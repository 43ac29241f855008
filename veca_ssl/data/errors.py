"""Unusable inputs: what they are (:class:`UnreadableItem`), how they are counted (:class:`SkipCounter`).

A corrupt or unreadable image is skipped, counted and logged; the run goes on, and stops with
a clear error only when skips pass a configured fraction (config key ``data.max_skip_fraction``,
default 1%).

Counting has to be global to mean anything: DataLoader worker processes each hold their own copy of a
dataset, so a counter inside the dataset only sees that worker's share. Every sample therefore carries
what it cost (attempts and the skipped items behind it) into the main process, where one
:class:`SkipCounter` per process sums them; ranks sum theirs at log time (``veca_ssl.train.data``).
The threshold is judged on that aggregate only. Counters in worker processes just record (``enforce``
off) so that a worker never stops the run on a partial view.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

logger = logging.getLogger("veca_ssl.data")

#: Config key named in the error so the user knows what to change.
SKIP_CONFIG_KEY = "data.max_skip_fraction"

#: Kinds of unusable sample, as they appear in logs, metrics and reports.
SKIP_KINDS: tuple[str, ...] = (
    "unreadable",  # bytes that no decoder accepts (corrupt, truncated, not an image)
    "too large",  # header says more pixels than the configured limit; never decoded
    "missing",  # a listed file that does not exist or cannot be opened
    "bad label",  # the label member/file cannot be parsed
    "lost",  # a sample a shard's manifest promises but the (truncated) tar file does not hold
)


class DataError(RuntimeError):
    """A data problem that ends the run with one clear message (too many skips, broken shard set)."""


class DataSkipError(DataError):
    """Raised when unusable samples pass ``data.max_skip_fraction`` (judged on the aggregate count)."""


class UnreadableItem(Exception):
    """One sample that cannot be used, with the item's name, a reason and a kind (:data:`SKIP_KINDS`)."""

    def __init__(self, item: str, reason: str, kind: str = "unreadable") -> None:
        if kind not in SKIP_KINDS:
            raise ValueError(f"unknown skip kind {kind!r}; valid: {SKIP_KINDS}")
        super().__init__(f"{kind}: {item}: {reason}")
        self.item, self.reason, self.kind = item, reason, kind

    def record(self) -> dict[str, str]:
        """Plain ``{"item", "kind", "reason"}`` for logs, reports and collation across processes."""
        return {"item": self.item, "kind": self.kind, "reason": self.reason}


class SkipCounter:
    """Counts attempted and skipped samples, keeps the first few skipped items, enforces the threshold.

    Args:
        max_skip_fraction: largest tolerated ``skipped / seen`` (0–1), checked once at least
            ``min_seen`` samples have been attempted.
        min_seen: attempts needed before the fraction is judged (a 1-in-20 corrupt file in a tiny
            dataset should not stop a run).
        fail_fast: if every one of the first ``fail_fast`` attempts fails, raise at once — the path,
            format or permissions are wrong, not a few damaged files.
        enforce: raise :class:`DataSkipError` when the threshold is passed (off in worker processes,
            whose counts are summed elsewhere).
        keep: how many skipped items are remembered (with their reasons) for reports.
        log: log each skipped item the first time (off for counters that sum records from processes
            that logged them already).
        option: the setting named in the error (``data.max_skip_fraction`` in training; a command's
            ``--max-skip-fraction``).

    Raises (from :meth:`skip`, :meth:`ok` and :meth:`add` when ``enforce``; :meth:`check` always):
        DataSkipError naming the counts, the fraction, the threshold, ``option`` and the first bad items.
    """

    def __init__(self, max_skip_fraction: float = 0.01, min_seen: int = 100, fail_fast: int = 10,
                 enforce: bool = True, keep: int = 10, log: bool = True, option: str = SKIP_CONFIG_KEY) -> None:
        if not 0.0 <= float(max_skip_fraction) <= 1.0:
            raise ValueError(
                f"{option} must be a fraction in [0, 1], got {max_skip_fraction!r} "
                "(e.g. 0.01 tolerates 1% unreadable images)"
            )
        self.option = option
        if min_seen < 1 or fail_fast < 1:
            raise ValueError(f"min_seen and fail_fast must be >= 1, got {min_seen}, {fail_fast}")
        self.max_skip_fraction = float(max_skip_fraction)
        self.min_seen, self.fail_fast, self.enforce, self.keep = int(min_seen), int(fail_fast), bool(enforce), int(keep)
        self.log = bool(log)
        self.seen = 0
        self.skipped = 0
        self.by_kind: dict[str, int] = {}
        self.first: list[dict[str, str]] = []
        self._logged: set[str] = set()

    @property
    def fraction(self) -> float:
        """Fraction of attempted samples that were skipped so far."""
        return self.skipped / self.seen if self.seen else 0.0

    def ok(self, n: int = 1) -> None:
        """Record ``n`` usable samples."""
        before = self.seen
        self.seen += int(n)
        if self.enforce and self.skipped and before < self.min_seen <= self.seen:
            self.check()

    def skip(self, item: str | UnreadableItem, error: BaseException | str = "", kind: str | None = None) -> None:
        """Record one unusable sample (an :class:`UnreadableItem`, or a name plus the error)."""
        if isinstance(item, UnreadableItem):
            rec = item.record()
        elif isinstance(error, UnreadableItem):
            rec = error.record()
        else:
            rec = {"item": str(item), "kind": kind or "unreadable", "reason": str(error)}
        self.add(1, [rec])

    def add(self, seen: int, records: Iterable[Mapping[str, str]] = (), skipped: int | None = None) -> None:
        """Merge counts from elsewhere (a batch, a worker, a rank): ``seen`` attempts, ``records`` skips.

        ``skipped`` overrides the number of skips when ``records`` holds only some of them.
        """
        records = list(records)
        n_skipped = len(records) if skipped is None else int(skipped)
        self.seen += int(seen)
        self.skipped += n_skipped
        for rec in records:
            kind = rec.get("kind", "unreadable")
            self.by_kind[kind] = self.by_kind.get(kind, 0) + 1
            if self.log and rec["item"] not in self._logged and len(self._logged) < 1000:
                self._logged.add(rec["item"])
                logger.warning("skipping %s sample %s: %s", kind, rec["item"], rec.get("reason", ""))
            if len(self.first) < self.keep and all(r["item"] != rec["item"] for r in self.first):
                self.first.append({"item": rec["item"], "kind": kind, "reason": str(rec.get("reason", ""))})
        if n_skipped and self.enforce:
            self.check()

    def check(self) -> None:
        """Raise :class:`DataSkipError` if the skip budget is exhausted (see class docstring)."""
        if self.skipped and self.skipped == self.seen and self.seen >= self.fail_fast:
            raise DataSkipError(
                f"all of the first {self.seen} samples were unusable (e.g. {self._examples()}); "
                "check the dataset path, file format and permissions"
            )
        if self.seen >= self.min_seen and self.fraction > self.max_skip_fraction:
            raise DataSkipError(
                f"{self.skipped} of {self.seen} samples were unusable ({self.fraction:.2%}), more than "
                f"{self.option}={self.max_skip_fraction:g} (first: {self._examples()}); repair or "
                f"remove those files, or raise {self.option}"
            )

    def _examples(self, n: int = 3) -> str:
        return "; ".join(f"{r['item']} ({r['kind']})" for r in self.first[:n]) or "none recorded"

    def state(self) -> dict[str, Any]:
        """Counts and the first skipped items, for metrics, summaries, reports and manifests."""
        return {"seen": self.seen, "skipped": self.skipped, "fraction": self.fraction,
                "by_kind": dict(self.by_kind), "first": [dict(r) for r in self.first]}

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Continue from :meth:`state` (e.g. the counts saved in a checkpoint)."""
        self.seen, self.skipped = int(state.get("seen", 0)), int(state.get("skipped", 0))
        self.by_kind = {str(k): int(v) for k, v in dict(state.get("by_kind", {})).items()}
        self.first = [dict(r) for r in state.get("first", [])][: self.keep]
        self._logged = {r["item"] for r in self.first}

    def __repr__(self) -> str:
        return (
            f"SkipCounter(seen={self.seen}, skipped={self.skipped}, "
            f"max_skip_fraction={self.max_skip_fraction}, min_seen={self.min_seen})"
        )
