"""Capture engines: one process or a torchrun group, coordinator-free workers, and Ray.

All rely on what makes a shard safe to compute anywhere: its bytes are a pure function of the
plan, and its commit record is published by an exclusive create, so a shard is committed
exactly once whoever computes it (a duplicate loses the race and is dropped). Every process
fences its writes: before writing a shard, committing it and writing the manifest it checks that
it still holds its lock (local) or its shard lease (workers), and stops otherwise.

- `run_local` (one process, or `torchrun`): rank 0 creates or resumes the cache under the writer
  lock; each process takes its share of the pending shards and hands finished ones to the
  background writer; rank 0 writes the manifest last.
- `run_worker` (`cache-teacher --worker I/N`): independent processes sharing only the cache's
  storage. The first to arrive creates the cache under the writer lock. Each worker then claims
  uncommitted shards through leases, its own share (shard index mod N == I) first and then any
  other whose lease is free or expired, so a dead worker's shards are taken over. Whoever finds
  every shard committed writes the manifest (an exclusive create: once); `--finalize` does it
  explicitly.
- `run_ray` (`cache-teacher --engine ray`): the driver creates the cache; capture actors (one
  GPU each on GPU clusters) load the teacher once and commit the shards they are handed; Ray
  restarts failed actors and retries their shards; progress shows on the driver.
"""

from __future__ import annotations

import logging
import time

from cache_format.lock import TTL_S, Fence, PresenceLease, ShardLease, WriterLock
from cache_format.storage import Storage, open_storage
from cache_format.store import AlreadyCommitted, CacheStore
from pipeline.config import from_dict, to_dict
from pipeline.errors import CacheError
from teacher_cache import report
from teacher_cache.capture import ShardCapture, build_capture, progress
from teacher_cache.config import CacheConfig
from teacher_cache.create import finalize, open_for_capture, prepare
from teacher_cache.group import DistEnv
from teacher_cache.writer import ShardWriter

log = logging.getLogger(__name__)


def run_local(cfg: CacheConfig, overwrite: bool, dist: DistEnv, capture: ShardCapture, storage: Storage) -> None:
    """One process, or every rank of a torchrun group (see the module docstring)."""
    plan = capture.plan
    lock = WriterLock(storage)
    try:
        if dist.is_main:  # rank 0 holds the lock for the whole group
            lock.acquire()
            store, state = open_for_capture(storage, plan.header, overwrite, lock)
            log.info("cache %s: %s (fingerprint %s)", plan.location, state, plan.fingerprint[:12])
            if state != "complete":
                prepare(store, plan, capture.corpus)
        fence = Fence(storage, dist.broadcast(lock.token), lock.record if dist.is_main else None)
        store = CacheStore(storage)
        if store.manifest is not None:
            if dist.is_main:
                log.info("cache is complete; reusing it (use --overwrite to rebuild)\n%s", report.summary(store))
            return
        pending = store.pending()
        dist.barrier()  # everyone has listed the pending shards before anyone commits one
        skipped = sum(lay.shards for lay in plan.layouts.values()) - len(pending)
        if dist.is_main and skipped:
            log.info("resuming: skipping %d complete shard(s), %d to go", skipped, len(pending))
        mine = pending[dist.rank :: dist.world_size]
        who = {"rank": dist.rank, "world_size": dist.world_size}
        name = f"cache-teacher{f' rank 0/{dist.world_size}' if dist.world_size > 1 else ''}"
        bar, on_batch = progress(sum(capture.rows_of(s, i) for s, i in mine), name, dist.is_main)
        with ShardWriter(store) as writer, bar:  # the bar closes first, so errors print on a fresh line
            for split, shard in mine:
                writer.submit(split, shard, *capture(split, shard, on_batch, **who), fence=fence)
        dist.barrier()
        if dist.is_main:
            if not finalize(cfg, store, fence):
                missing = ", ".join(f"{s}-{i:05d}" for s, i in store.pending()[:5])
                raise CacheError(
                    f"shards {missing or 'with torn records'} are missing after the run; rerun the same command"
                )
            log.info("%s", report.summary(store))
    finally:
        if dist.is_main:
            lock.release()


def join_cache(storage: Storage, capture: ShardCapture, wait_s: float = 600.0) -> tuple[CacheStore, PresenceLease]:
    """Create the cache (the first worker, under the writer lock) or join the one that exists; the
    worker's presence lease, left before the lock is released, tells later joiners that its temp
    files are live."""
    deadline = time.time() + wait_s
    while True:
        lock = WriterLock(storage)
        try:
            lock.acquire()
        except CacheError:
            if time.time() > deadline:
                raise
            time.sleep(0.5)  # another worker is creating it
            continue
        try:
            store, state = open_for_capture(storage, capture.plan.header, overwrite=False, lock=lock)
            if state != "complete":
                prepare(store, capture.plan, capture.corpus)
            return store, PresenceLease(storage, "worker")
        finally:
            lock.release()


def run_worker(cfg: CacheConfig, capture: ShardCapture, storage: Storage, index: int, count: int) -> None:
    """One coordinator-free capture worker (see the module docstring)."""
    if not 0 <= index < count:
        raise CacheError(f"--worker {index}/{count}: the index must be in [0, {count}); e.g. --worker 0/{count}")
    store, presence = join_cache(storage, capture)
    try:
        _capture_leased(cfg, capture, store, index, count)
    finally:
        presence.close()


def _capture_leased(cfg: CacheConfig, capture: ShardCapture, store: CacheStore, index: int, count: int) -> None:
    """Claim and capture uncommitted shards, own share first, until every shard is committed."""
    storage = store.storage
    if finalize(cfg, store, once=True):
        log.info("worker %d/%d: the cache is complete", index, count)
        return
    layouts = capture.plan.layouts
    every = [(s, i) for s, lay in layouts.items() for i in range(lay.shards)]
    order = [k for n, k in enumerate(every) if n % count == index] + [
        k for n, k in enumerate(every) if n % count != index
    ]
    bar, on_batch = progress(sum(capture.rows_of(*k) for k in order[: len(every) // count]), f"worker {index}/{count}")
    done = 0
    with ShardWriter(store) as writer, bar:
        while True:
            committed = store.committed_names()
            pending = [k for k in order if k not in committed]
            if not pending:
                break
            took = 0
            for split, shard in pending:
                lease = ShardLease.claim(storage, split, shard)
                if lease is None:
                    continue  # held by a live worker (or by us, being written)
                if store.storage.exists(store.commit_key(split, shard)):
                    lease.release()
                    continue
                buf, info = capture(split, shard, on_batch, worker=f"{index}/{count}")
                writer.submit(split, shard, buf, info, done=lease.release, fence=lease.check)
                took += 1
            done += took
            if not took:
                time.sleep(min(2.0, TTL_S / 8))  # the rest is leased: wait for commits or expiries
    log.info("worker %d/%d: captured %d shard(s)", index, count, done)
    finalize(cfg, store, once=True)


class CaptureActor:
    """A Ray actor that loads the teacher once and captures the shards it is handed."""

    def __init__(self, cfg: dict, location: str, fingerprint: str):
        self.cfg = from_dict(CacheConfig, cfg)
        self.capture = build_capture(self.cfg)
        if self.capture.plan.fingerprint != fingerprint:  # another teacher or corpus on this node
            raise CacheError(f"actor's plan {self.capture.plan.fingerprint[:12]} != driver's {fingerprint[:12]}")
        self.store = CacheStore(open_storage(location, self.cfg.store.storage_options))

    def capture_shard(self, split: str, shard: int, token: str) -> int:
        """Capture and commit one shard, fenced by the driver's writer lock; its token count."""
        if self.store.storage.exists(self.store.commit_key(split, shard)):
            return 0  # a retried task whose first attempt committed
        buf, info = self.capture(split, shard, lambda b: None, engine="ray")
        try:
            self.store.write_shard(split, shard, buf, info, Fence(self.store.storage, token))
        except AlreadyCommitted:
            return 0
        return info["tokens"]


def run_ray(cfg: CacheConfig, capture: ShardCapture, storage: Storage, address: str | None) -> None:
    """Capture every pending shard on Ray actors, under the driver's writer lock."""
    try:
        import ray
        from ray.util import ActorPool
    except ImportError:
        raise CacheError("--engine ray needs Ray: pip install 'distilcache[ray]'") from None
    lock = WriterLock(storage).acquire()
    try:
        store, state = open_for_capture(storage, capture.plan.header, overwrite=False, lock=lock)
        if state == "complete":
            return
        prepare(store, capture.plan, capture.corpus)
        pending = store.pending()
        if not ray.is_initialized():
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        gpus = int(ray.cluster_resources().get("GPU", 0))
        actors = gpus or max(1, int(ray.cluster_resources().get("CPU", 1)) // max(1, cfg.teacher.num_threads or 1))
        remote = ray.remote(num_gpus=1 if gpus else 0, num_cpus=0 if gpus else 1, max_restarts=3, max_task_retries=3)
        location, fingerprint = capture.plan.location, capture.plan.fingerprint
        pool = ActorPool([remote(CaptureActor).remote(to_dict(cfg), location, fingerprint) for _ in range(actors)])
        log.info("ray: %d shard(s) on %d actor(s) (%s)", len(pending), actors, "GPU" if gpus else "CPU")
        bar, _ = progress(len(pending), "cache-teacher ray")
        bar.unit = "shard"
        with bar:
            for _ in pool.map_unordered(lambda actor, key: actor.capture_shard.remote(*key, lock.token), pending):
                bar.update(1)
        if not finalize(cfg, store, lock.check):
            missing = ", ".join(f"{s}-{i:05d}" for s, i in store.pending()[:5])
            raise CacheError(f"shards {missing or 'with torn records'} are missing; rerun")
        log.info("%s", report.summary(store))
    finally:
        lock.release()
