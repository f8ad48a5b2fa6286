"""Training while the cache is captured (`data.follow`): wait for what the run needs next.

A follower reads only committed shards; each is checked as it becomes readable, as in a complete
cache. When the next one is not committed yet, it polls with backoff and prints one progress line
("waiting for train shard 00017 of 00064 (capture at 14/64, 2.1 shards/min)"). It stops with a
clear error when the cache is replaced, or when no shard has been committed for
`data.follow_timeout` seconds (the capture died): the trainer then saves a checkpoint to resume
from once the capture is resumed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from cache_format.reader import CacheReader, NotCommitted
from pipeline.errors import CacheError

log = logging.getLogger(__name__)
T = TypeVar("T")
POLL_S = (0.05, 2.0)
"""First and longest pause between two looks at a growing cache."""
REPORT_S = 10.0
"""Seconds between two progress lines while waiting."""


class CaptureStalled(CacheError):
    """No shard was committed for `data.follow_timeout` seconds: the capture is not running."""


class Follower:
    """Waits on one reader's growing cache (one per process: the trainer and each data worker)."""

    def __init__(self, reader: CacheReader, timeout: float):
        self.reader, self.timeout = reader, timeout
        self.waited_s = 0.0

    def wait(self, fn: Callable[[], T], split: str | None = None, shard: int | None = None) -> T:
        """fn() once it no longer raises NotCommitted (what it reads is committed)."""
        try:
            return fn()
        except NotCommitted as first:
            reason = str(first)
        start = time.monotonic()
        pause, seen, since, reported = POLL_S[0], self._count(), start, start - REPORT_S  # a line at once
        history = [(start, seen)]
        while True:
            time.sleep(pause)
            pause = min(pause * 1.5, POLL_S[1])
            self.reader.refresh()  # refuses a replaced cache; complete: every check of an open
            try:
                result = fn()
            except NotCommitted as exc:
                reason = str(exc)
            else:
                self.waited_s += time.monotonic() - start
                return result
            now, count = time.monotonic(), self._count()
            if count != seen:
                seen, since = count, now
                history.append((now, count))
            if now - since > self.timeout:
                raise CaptureStalled(self._stalled(reason))
            if now - reported >= REPORT_S:
                reported = now
                log.info("%s", self._line(split, shard, reason, history))

    def _count(self) -> int:
        return len(self.reader.committed())

    def _line(self, split: str | None, shard: int | None, reason: str, history: list) -> str:
        total = sum(lay.shards for lay in self.reader.layouts.values())
        (t0, c0), (t1, c1) = history[0], history[-1]
        rate = f", {60 * (c1 - c0) / (t1 - t0):.1f} shards/min" if t1 > t0 else ""
        capture = f"(capture at {c1}/{total}{rate})"
        if split is not None:
            return f"waiting for {split} shard {shard:05d} of {self.reader.layouts[split].shards:05d} {capture}"
        return f"waiting: {reason} {capture}"

    def _stalled(self, reason: str) -> str:
        committed = sorted(self.reader.committed())
        last = f"the last is {committed[-1][0]} shard {committed[-1][1]:05d}" if committed else "none yet"
        total = sum(lay.shards for lay in self.reader.layouts.values())
        return (
            f"{self.reader.url}: no shard committed for {self.timeout:g} s ({len(committed)}/{total} committed, "
            f"{last}; {reason}): the capture is not running; resume it (rerun cache-teacher), then this run "
            "with --resume"
        )
