"""A bounded local copy of a remote cache's files, shared by every process on a node.

Training from s3:// (or gs://, az://) reads through this mirror: a shard file is downloaded
once per node (a file lock serialises the DataLoader workers and ranks that want it at the
same time), its size checked against the manifest, and read from local disk afterwards, with
every chunk's CRC32C still verified by zarr. Shards the reader will need next are fetched
ahead in background threads. When the mirror outgrows its budget, the least recently used
shard files are removed (never one used in the last minute, so a reader never loses a file
between fetching and reading it).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from cache_format.atomic import PARTIAL
from cache_format.storage import ObjectStorage
from pipeline.errors import CacheError

log = logging.getLogger(__name__)
RECENT_S = 60.0
"""A shard file used this recently is never evicted."""


class ShardMirror:
    def __init__(self, storage: ObjectStorage, root: Path, max_bytes: int, read_ahead: int = 4):
        self.storage, self.root, self.max_bytes = storage, Path(root), int(max_bytes)
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / ".locks").mkdir(exist_ok=True)
        self._pool = ThreadPoolExecutor(max_workers=read_ahead, thread_name_prefix="mirror")
        self._ahead: dict[str, Future] = {}
        self.fetched_bytes = 0

    def path(self, key: str) -> Path:
        return self.root / key

    def ensure(self, key: str, size: int, sha256: str) -> Path:
        """The local copy of `key` (downloaded if absent or of another size), marked as just used."""
        future = self._ahead.pop(key, None)
        if future is not None:
            future.result()
        target = self.path(key)
        if _size(target) != size:
            with self._locked(key):
                if _size(target) != size:  # another process may have fetched it meanwhile
                    self._download(key, target, size, sha256)
        os.utime(target)  # recency, for eviction
        return target

    def prefetch(self, files: list[tuple[str, int, str]]) -> None:
        """Fetch these files in the background (read-ahead of the next blocks)."""
        for key, size, sha256 in files:
            if key not in self._ahead and _size(self.path(key)) != size:
                self._ahead[key] = self._pool.submit(self.ensure_quietly, key, size, sha256)

    def ensure_quietly(self, key: str, size: int, sha256: str) -> None:
        with contextlib.suppress(Exception), self._locked(key):  # a failed read-ahead: the read retries
            target = self.path(key)
            if _size(target) != size:
                self._download(key, target, size, sha256)

    def _download(self, key: str, target: Path, size: int, sha256: str) -> None:
        """Fetch one shard file; its bytes must be the ones its commit record hashed (an object
        replaced or copied in from elsewhere is refused before anything reads it)."""
        data = self.storage.read_bytes(key)
        if len(data) != size or hashlib.sha256(data).hexdigest() != sha256:
            what = (
                f"has {len(data)} bytes, the manifest records {size}"
                if len(data) != size
                else "differs from its record"
            )
            raise CacheError(f"{self.storage.url}/{key} {what}; run `pipeline verify {self.storage.url}`")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}{PARTIAL}")
        tmp.write_bytes(data)
        os.replace(tmp, target)
        self.fetched_bytes += size
        self._evict()

    @contextlib.contextmanager
    def _locked(self, key: str):
        lock = self.root / ".locks" / hashlib.sha1(key.encode()).hexdigest()
        with lock.open("a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _evict(self) -> None:
        shard_files = (p for p in self.root.rglob("*") if "/c/" in p.as_posix() and not p.name.startswith("."))
        files = [p for p in shard_files if p.is_file()]
        total = sum(p.stat().st_size for p in files)
        if total <= self.max_bytes:
            return
        now = time.time()
        for p in sorted(files, key=lambda p: p.stat().st_mtime):
            if total <= self.max_bytes:
                break
            stat = p.stat()
            if now - stat.st_mtime < RECENT_S:
                break  # everything left is in use
            p.unlink(missing_ok=True)
            total -= stat.st_size


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return None
