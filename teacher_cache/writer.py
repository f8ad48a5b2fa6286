"""The background shard writer: the capture loop hands over whole shards and never waits on disk."""

from __future__ import annotations

import errno
import logging
import queue
import threading
from collections.abc import Callable

import numpy as np

from cache_format.store import AlreadyCommitted, CacheStore
from pipeline.errors import CacheError

log = logging.getLogger(__name__)


class ShardWriter:
    """Background writer: the teacher hands over whole shards and never waits on disk.

    At most `max_pending` finished shards wait in memory; a writer error (disk full, ...)
    surfaces on the next `submit` or on exit, and nothing unfinished is ever committed.
    """

    def __init__(self, store: CacheStore, max_pending: int = 1):
        self.store = store
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="shard-writer", daemon=True)
        self.records: list[dict] = []

    def __enter__(self) -> ShardWriter:
        self._thread.start()
        return self

    def submit(
        self,
        split: str,
        shard: int,
        data: dict[str, np.ndarray],
        info: dict,
        done: Callable[[], None] | None = None,
        fence: Callable[[], None] | None = None,
    ) -> None:
        """Queue a finished shard; `done` runs once it is committed (or another writer committed it);
        `fence` raises when this process may no longer write (see `CacheStore.write_shard`)."""
        self._raise_if_failed()
        self._queue.put((split, shard, data, info, done, fence))

    def __exit__(self, exc_type, exc, tb) -> None:
        self._queue.put(None)
        self._thread.join()
        if exc_type is None:
            self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is not None:
                continue  # drain: after a failure nothing more is written
            split, shard, data, info, done, fence = item
            try:
                self.records.append(self.store.write_shard(split, shard, data, info, fence))
            except AlreadyCommitted:  # a worker whose lease expired raced another: same bytes, keep theirs
                log.warning("%s shard %05d was committed by another worker meanwhile; keeping theirs", split, shard)
            except OSError as exc:
                self._error = _disk_error(exc, self.store.url, split, shard)
            except BaseException as exc:  # surfaced in the main thread
                self._error = exc
            if done is not None and self._error is None:
                done()


def _disk_error(exc: OSError, path: str, split: str, shard: int) -> Exception:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return CacheError(
            f"disk full while writing {split} shard {shard:05d} to {path}; free space and rerun "
            "the same command to resume from the last complete shard"
        )
    return CacheError(f"cannot write {split} shard {shard:05d} to {path}: {exc}; rerun the same command to resume")
