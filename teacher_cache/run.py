"""`pipeline cache-teacher`: plan the cache, then capture its shards on one of three engines.

- local / torchrun: rank 0 creates or resumes the cache under the writer lock; each process
  takes its share of the pending shards and hands finished ones to the background writer;
  rank 0 writes the manifest last.
- workers (`--worker I/N`): independent processes, no process group (Slurm arrays, Kubernetes
  indexed jobs, spot instances); each claims shards through leases (`engines.run_worker`).
- Ray (`--engine ray`): one capture actor per GPU (or CPU slot) (`engines.run_ray`).
Every engine produces the same bytes as one local process.
"""

from __future__ import annotations

import logging
import os
import time

import numpy as np
import torch
from tqdm import tqdm

from cache_format.lock import WriterLock
from cache_format.storage import Storage, open_storage
from cache_format.store import CacheError, CacheStore, open_for_capture
from pipeline.dist import DistEnv
from teacher_cache import report
from teacher_cache.capture import Batch, ShardCapture
from teacher_cache.config import CacheConfig
from teacher_cache.corpus import prepare_corpus
from teacher_cache.create import check_free_space, finalize, write_side_files
from teacher_cache.plan import CachePlan, build_plan, check_compatible
from teacher_cache.teacher import load_teacher
from teacher_cache.writer import ShardWriter

log = logging.getLogger(__name__)


def run_cache(
    cfg: CacheConfig,
    overwrite: bool = False,
    worker: tuple[int, int] | None = None,
    engine: str = "local",
    ray_address: str | None = None,
    finalize_only: bool = False,
) -> str:
    """Build (or resume, or reuse) the cache described by `cfg`; returns its location."""
    dist = DistEnv.from_env()
    dist.init()
    try:
        if cfg.store.output and open_storage(cfg.store.output, cfg.store.storage_options).is_foreign_file():
            raise CacheError(f"store.output {cfg.store.output} is a file; give a directory for the cache")
        if cfg.teacher.num_threads or dist.local_world_size > 1:
            torch.set_num_threads(cfg.teacher.num_threads or max(1, (os.cpu_count() or 1) // dist.local_world_size))
        teacher = load_teacher(cfg.teacher)
        check_compatible(cfg, teacher)
        corpus = dist.main_first(
            lambda: prepare_corpus(
                cfg.corpus, teacher.tokenizer, teacher.tokenizer_sha256, cfg.store.cache_dir, cfg.seed
            )
        )
        plan = build_plan(cfg, teacher, corpus)
        storage = open_storage(plan.location, cfg.store.storage_options)
        if finalize_only:
            return _finalize_only(cfg, storage, plan)
        if worker is not None or engine == "ray":
            from teacher_cache import engines

            capture = ShardCapture(cfg, teacher, corpus, plan)
            if worker is not None:
                engines.run_worker(cfg, capture, storage, *worker)
            else:
                engines.run_ray(cfg, capture, storage, ray_address)
            return plan.location
        _run_local(cfg, overwrite, dist, ShardCapture(cfg, teacher, corpus, plan), storage)
        return plan.location
    finally:
        dist.close()


def _run_local(cfg: CacheConfig, overwrite: bool, dist: DistEnv, capture: ShardCapture, storage: Storage) -> None:
    plan = capture.plan
    lock = WriterLock(storage)
    try:
        if dist.is_main:  # rank 0 holds the lock for the whole group
            lock.acquire()
            store, state = open_for_capture(storage, plan.header, overwrite, lock)
            log.info("cache %s: %s (fingerprint %s)", plan.location, state, plan.fingerprint[:12])
            if state != "complete":
                write_side_files(store, capture.teacher, capture.corpus)  # again on resume: a kill may cut them
                check_free_space(store, plan)
        dist.barrier()
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
                writer.submit(split, shard, *capture(split, shard, on_batch, **who))
        dist.barrier()
        if dist.is_main:
            finalize(cfg, store)
            log.info("%s", report.summary(store))
    finally:
        if dist.is_main:
            lock.release()


def progress(total: int, desc: str, enabled: bool = True) -> tuple[tqdm, callable]:
    """A sequences bar with throughput, and the per-batch callback that advances it."""
    bar = tqdm(total=int(total), unit="seq", disable=not enabled, dynamic_ncols=True, mininterval=1.0, desc=desc)
    state = {"tokens": 0, "start": time.perf_counter()}

    def on_batch(b: Batch) -> None:
        state["tokens"] += int(np.sum(b.lengths))
        bar.update(len(b.lengths))
        rate = state["tokens"] / (time.perf_counter() - state["start"])
        bar.set_postfix_str(f"{rate:,.0f} tok/s", refresh=False)

    return bar, on_batch


def _finalize_only(cfg: CacheConfig, storage: Storage, plan: CachePlan) -> str:
    """`cache-teacher --finalize`: write the manifest of a cache whose every shard is committed."""
    store = CacheStore(storage)
    if not store.is_cache() or store.header["fingerprint"] != plan.fingerprint:
        raise CacheError(f"{plan.location} holds no cache of this config; run cache-teacher (or its workers) first")
    if store.manifest is None:
        finalize(cfg, store)
    log.info("%s", report.summary(store))
    return plan.location
