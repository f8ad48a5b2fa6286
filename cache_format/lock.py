"""Who is using a cache: one writer's lock, readers' leases and workers' shard leases.

The writer creates `locks/writer.json` exclusively (host, PID, start time, expiry); a second
writer exits with a message naming the holder. A reader (a training run, evaluate, inspect)
leaves a `locks/reader-*.json` lease while it runs, so `--overwrite` refuses to delete a cache
that is being read. Independent capture workers leave a `locks/worker-*.json` lease while they
run (so no one deletes a live worker's temp files as a killed writer's) and claim a shard by
creating `leases/<split>-<shard>.<generation>.json` exclusively. Every lock and lease carries an expiry
that a heartbeat thread renews while its process lives: one whose expiry passed, or whose
process is gone (same host, PID not running), is stale — a dead worker's shard is taken over
by creating the next generation. This works the same on a filesystem and on object storage
(exclusive create = conditional put).

Fencing: the token in a lock or lease file says who holds it. The heartbeat renews a writer lock
or a shard lease only while the file still holds its own token, so a process that was paused
past its expiry (a suspended laptop, a preempted VM) never takes back a lock another process
took meanwhile, and its `check()`, called before every shard write, commit and manifest, stops
it with an error: it writes nothing more. Expiries are absolute times, compared with the
observer's clock: a holder renews every TTL/4 to TTL from now, so clocks may disagree by up to
3/4 of the TTL (90 s at the default 120 s) before a live holder is judged expired.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid

from cache_format.storage import Storage
from cache_format.store import LOCKS
from pipeline.errors import CacheError

log = logging.getLogger(__name__)
WRITER = f"{LOCKS}/writer.json"
LEASES = "leases"


TTL_S = float(os.environ.get("DISTILCACHE_LEASE_TTL_S", "120"))
"""Seconds a lock or lease stays valid without renewal (renewed every TTL/4 while its process lives)."""


def _record(kind: str) -> dict:
    return {
        "kind": kind,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "token": uuid.uuid4().hex,
        "expires": time.time() + TTL_S,
    }


class LostLock(CacheError):
    """This process no longer holds the lock or lease it wrote under."""


class _Heartbeat:
    """One daemon thread per process renewing the expiry of every lock and lease it holds."""

    def __init__(self) -> None:
        self._held: dict[tuple[int, str], tuple[Storage, dict, bool]] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def hold(self, storage: Storage, key: str, record: dict, exclusive: bool = True) -> None:
        """Renew `key` while this process lives; an `exclusive` one (a writer lock, a shard lease)
        only while its file still holds this record's token."""
        with self._lock:
            self._held[(id(storage), key)] = (storage, record, exclusive)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="lease-heartbeat", daemon=True)
                self._thread.start()

    def drop(self, storage: Storage, key: str) -> None:
        with self._lock:
            self._held.pop((id(storage), key), None)

    def _run(self) -> None:
        while True:
            time.sleep(TTL_S / 4)
            with self._lock:
                held = list(self._held.items())
            for (_, key), (storage, record, exclusive) in held:
                with contextlib.suppress(OSError, RuntimeError):  # a missed beat: the next one retries
                    if exclusive and (_read(storage, key) or {}).get("token") != record["token"]:
                        self.drop(storage, key)  # taken over meanwhile: never write it back
                        continue
                    record["expires"] = time.time() + TTL_S
                    storage.write_bytes(key, json.dumps(record).encode())


HEARTBEAT = _Heartbeat()


def is_alive(record: dict) -> bool:
    """Whether the process behind a lock may still be running."""
    if record.get("expires") is not None and float(record["expires"]) < time.time():
        return False
    if record.get("host") != socket.gethostname():
        return True  # another machine: cannot tell, assume it runs
    try:
        os.kill(int(record["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read(storage: Storage, key: str) -> dict | None:
    try:
        return json.loads(storage.read_bytes(key))
    except (FileNotFoundError, ValueError):
        return None  # released meanwhile, or a torn write of a killed process


def describe(record: dict) -> str:
    return (
        f"{record.get('kind', 'process')} pid {record.get('pid')} on {record.get('host')} since {record.get('started')}"
    )


def live_holders(storage: Storage, exclude_token: str | None = None, kind: str | None = None) -> list[str]:
    """Descriptions of the live writer, readers and capture workers of a cache, or only those of
    one `kind` (stale locks are removed; stale shard leases stay, they number the next generation)."""
    holders = []
    for key in storage.list(LOCKS) + storage.list(LEASES):
        record = _read(storage, key)
        mine = exclude_token is not None and record is not None and record.get("token") == exclude_token
        if record is None or mine or kind not in (None, record.get("kind")):
            continue
        if is_alive(record):
            holders.append(describe(record))
        elif key.startswith(f"{LOCKS}/"):
            storage.delete(key)
    return holders


def _lost(storage: Storage, key: str, expires: float | None, what: str) -> LostLock:
    current = _read(storage, key)
    holder = describe(current) if current else "nobody: the file was removed"
    when = f" at {time.strftime('%H:%M:%S', time.localtime(expires))}" if expires else ""
    return LostLock(
        f"{storage.url}: this {what} lost its {key} (held now by {holder}; its lease expired{when}, e.g. while "
        "the process was paused) and stopped without writing anything more; rerun the same command once the "
        "other writer is done"
    )


class Fence:
    """Raises LostLock unless the writer lock still holds `token`: what every process of a capture
    group (rank 0 holds the lock) calls before it writes a shard, commits it or writes the manifest."""

    def __init__(self, storage: Storage, token: str, record: dict | None = None):
        self.storage, self.token, self.record = storage, token, record

    def __call__(self) -> None:
        if (_read(self.storage, WRITER) or {}).get("token") != self.token:
            expires = self.record["expires"] if self.record else None
            raise _lost(self.storage, WRITER, expires, "capture")


class WriterLock:
    """Exclusive right to write one cache (or, with another `key` and `kind`, one run directory);
    a context manager."""

    def __init__(self, storage: Storage, key: str = WRITER, kind: str = "writer"):
        self.storage, self.key = storage, key
        self.record = _record(kind)

    @property
    def token(self) -> str:
        return self.record["token"]

    def acquire(self) -> WriterLock:
        for _ in range(2):
            if self.storage.create(self.key, json.dumps(self.record).encode()):
                HEARTBEAT.hold(self.storage, self.key, self.record)
                return self
            other = _read(self.storage, self.key)
            if other is not None and is_alive(other):
                raise CacheError(
                    f"{self.storage.url} is being written by {describe(other)}; wait for it to finish, or, "
                    f"if that process is gone, delete {self.storage.url}/{self.key}"
                )
            log.warning("removing a stale lock (%s)", describe(other) if other else "unreadable")
            self.storage.delete(self.key)
        raise CacheError(f"could not lock {self.storage.url} for writing; retry")

    def check(self) -> None:
        """Raise LostLock unless the lock file still holds this writer's token (the fence before
        every shard write, commit and manifest)."""
        Fence(self.storage, self.token, self.record)()

    def release(self) -> None:
        HEARTBEAT.drop(self.storage, self.key)
        current = _read(self.storage, self.key)
        if current is not None and current.get("token") == self.token:
            self.storage.delete(self.key)

    def __enter__(self) -> WriterLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class PresenceLease:
    """A reader's or a capture worker's mark on a cache while it runs (removed on close and at exit)."""

    def __init__(self, storage: Storage, kind: str = "reader"):
        self.storage = storage
        self.record = _record(kind)
        self.key = f"{LOCKS}/{kind}-{self.record['host']}-{self.record['pid']}-{self.record['token'][:8]}.json"
        try:
            self.storage.write_bytes(self.key, json.dumps(self.record).encode())
            HEARTBEAT.hold(self.storage, self.key, self.record, exclusive=False)
        except (OSError, RuntimeError):  # a read-only cache: nobody can overwrite it either
            self.key = None
        atexit.register(self.close)

    def close(self) -> None:
        if self.key is not None:
            HEARTBEAT.drop(self.storage, self.key)
            with contextlib.suppress(OSError, RuntimeError):
                self.storage.delete(self.key)
            self.key = None


def _generation(key: str) -> int:
    return int(key.rsplit(".", 2)[-2])


class ShardLease:
    """A capture worker's claim on one shard (see the module docstring)."""

    def __init__(self, storage: Storage, key: str, record: dict):
        self.storage, self.key, self.record = storage, key, record
        HEARTBEAT.hold(storage, key, record)

    @classmethod
    def claim(cls, storage: Storage, split: str, shard: int) -> ShardLease | None:
        """The shard's lease, or None while another live worker holds it."""
        prefix = f"{LEASES}/{split}-{shard:05d}."
        keys = sorted(storage.list(LEASES), key=lambda k: _generation(k) if k.startswith(prefix) else -1)
        keys = [k for k in keys if k.startswith(prefix)]
        generation = 0
        if keys:
            current = _read(storage, keys[-1])
            if current is not None and is_alive(current):
                return None
            generation = _generation(keys[-1]) + 1
            if current is not None:
                log.warning("taking over %s shard %05d from %s (lease expired)", split, shard, describe(current))
        record = _record("worker")
        key = f"{prefix}{generation}.json"
        return cls(storage, key, record) if storage.create(key, json.dumps(record).encode()) else None

    def check(self) -> None:
        """Raise LostLock unless this lease file still holds this worker's token and no later
        generation claimed the shard (its lease expired and another worker took it over)."""
        prefix, mine = self.key.rsplit(".", 2)[0] + ".", _generation(self.key)
        newer = [k for k in self.storage.list(LEASES) if k.startswith(prefix) and _generation(k) > mine]
        if newer or (_read(self.storage, self.key) or {}).get("token") != self.record["token"]:
            raise _lost(self.storage, newer[0] if newer else self.key, self.record["expires"], "capture worker")

    def release(self) -> None:
        HEARTBEAT.drop(self.storage, self.key)
        if (_read(self.storage, self.key) or {}).get("token") == self.record["token"]:
            self.storage.delete(self.key)
