"""Capture engines beyond one process group: coordinator-free workers, and Ray.

Both rely on what makes a shard safe to compute anywhere: its bytes are a pure function of the
plan, and its commit record is published by an exclusive create, so a shard is committed
exactly once whoever computes it (a duplicate loses the race and is dropped).

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

import json
import logging
import time

from cache_format.lock import TTL_S, ShardLease, WriterLock
from cache_format.manifest import build_manifest, missing_shards
from cache_format.storage import Storage
from cache_format.store import MANIFEST, AlreadyCommitted, CacheError, CacheStore, open_for_capture
from pipeline.config import from_dict, to_dict
from pipeline.versions import library_versions
from teacher_cache import report
from teacher_cache.capture import ShardCapture
from teacher_cache.config import CacheConfig
from teacher_cache.create import write_side_files
from teacher_cache.plan import recorded
from teacher_cache.writer import ShardWriter

log = logging.getLogger(__name__)


def join_cache(storage: Storage, capture: ShardCapture, wait_s: float = 600.0) -> CacheStore:
    """Create the cache (the first worker, under the writer lock) or join the one that exists."""
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
            if state == "new":
                write_side_files(store, capture.teacher, capture.corpus)
            return store
        finally:
            lock.release()


def finalize_once(cfg: CacheConfig, store: CacheStore) -> bool:
    """Write the manifest if every shard is committed and nobody wrote it yet; True when complete."""
    if store.manifest is not None:
        return True
    records = store.committed()
    if missing_shards(store, records):
        return False
    manifest = build_manifest(store, records, recorded(cfg), library_versions())
    if store.storage.create(MANIFEST, json.dumps(manifest, indent=2).encode()):
        log.info("every shard is committed: manifest written\n%s", report.summary(store))
    return True


def run_worker(cfg: CacheConfig, capture: ShardCapture, storage: Storage, index: int, count: int) -> None:
    """One coordinator-free capture worker (see the module docstring)."""
    if not 0 <= index < count:
        raise CacheError(f"--worker {index}/{count}: the index must be in [0, {count}); e.g. --worker 0/{count}")
    store = join_cache(storage, capture)
    if finalize_once(cfg, store):
        log.info("worker %d/%d: the cache is complete", index, count)
        return
    layouts = capture.plan.layouts
    every = [(s, i) for s, lay in layouts.items() for i in range(lay.shards)]
    order = [k for n, k in enumerate(every) if n % count == index] + [
        k for n, k in enumerate(every) if n % count != index
    ]
    from teacher_cache.run import progress

    bar, on_batch = progress(sum(capture.rows_of(*k) for k in order[: len(every) // count]), f"worker {index}/{count}")
    done = 0
    with ShardWriter(store) as writer, bar:
        while True:
            committed = store.committed()
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
                writer.submit(split, shard, buf, info, done=lease.release)
                took += 1
            done += took
            if not took:
                time.sleep(min(2.0, TTL_S / 8))  # the rest is leased: wait for commits or expiries
    log.info("worker %d/%d: captured %d shard(s)", index, count, done)
    finalize_once(cfg, store)


class CaptureActor:
    """A Ray actor that loads the teacher once and captures the shards it is handed."""

    def __init__(self, cfg: dict, location: str, fingerprint: str):
        from cache_format.storage import open_storage
        from teacher_cache.corpus import prepare_corpus
        from teacher_cache.plan import build_plan
        from teacher_cache.teacher import load_teacher

        self.cfg = from_dict(CacheConfig, cfg)
        teacher = load_teacher(self.cfg.teacher)
        corpus = prepare_corpus(
            self.cfg.corpus, teacher.tokenizer, teacher.tokenizer_sha256, self.cfg.store.cache_dir, self.cfg.seed
        )
        plan = build_plan(self.cfg, teacher, corpus)
        if plan.fingerprint != fingerprint:  # another teacher or corpus on this node
            raise CacheError(f"actor's plan {plan.fingerprint[:12]} != driver's {fingerprint[:12]}")
        self.capture = ShardCapture(self.cfg, teacher, corpus, plan)
        self.store = CacheStore(open_storage(location, self.cfg.store.storage_options))

    def capture_shard(self, split: str, shard: int) -> int:
        """Capture and commit one shard; its token count."""
        if self.store.storage.exists(self.store.commit_key(split, shard)):
            return 0  # a retried task whose first attempt committed
        buf, info = self.capture(split, shard, lambda b: None, engine="ray")
        try:
            self.store.write_shard(split, shard, buf, info)
        except AlreadyCommitted:
            return 0
        return info["tokens"]


def run_ray(cfg: CacheConfig, capture: ShardCapture, storage: Storage, address: str | None) -> None:
    """Capture every pending shard on Ray actors (see the module docstring)."""
    try:
        import ray
        from ray.util import ActorPool
    except ImportError:
        raise CacheError("--engine ray needs Ray: pip install 'distilcache[ray]'") from None
    store = join_cache(storage, capture)
    if finalize_once(cfg, store):
        return
    committed = store.committed()
    pending = [(s, i) for s, lay in capture.plan.layouts.items() for i in range(lay.shards) if (s, i) not in committed]
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    actors = gpus or max(1, int(ray.cluster_resources().get("CPU", 1)) // max(1, cfg.teacher.num_threads or 1))
    remote = ray.remote(num_gpus=1 if gpus else 0, num_cpus=0 if gpus else 1, max_restarts=3, max_task_retries=3)
    pool = ActorPool(
        [
            remote(CaptureActor).remote(to_dict(cfg), capture.plan.location, capture.plan.fingerprint)
            for _ in range(actors)
        ]
    )
    log.info("ray: %d shard(s) on %d actor(s) (%s)", len(pending), actors, "GPU" if gpus else "CPU")
    from teacher_cache.run import progress

    bar, _ = progress(len(pending), "cache-teacher ray")
    bar.unit = "shard"
    with bar:
        for _ in pool.map_unordered(lambda actor, key: actor.capture_shard.remote(*key), pending):
            bar.update(1)
    if not finalize_once(cfg, store):
        raise CacheError(f"shards {', '.join(missing_shards(store, store.committed())[:5])} are missing; rerun")
