"""`pipeline cache-teacher`: plan the cache, then capture its shards on one of three engines
(`engines.run_local` for one process or a torchrun group, `engines.run_worker` for
`--worker I/N`, `engines.run_ray` for `--engine ray`). Every engine produces the same bytes as
one local process."""

from __future__ import annotations

import logging
import os

import torch

from cache_format.storage import Storage, open_storage
from cache_format.store import CacheStore
from pipeline.errors import CacheError
from teacher_cache import engines, report
from teacher_cache.capture import build_capture
from teacher_cache.config import CacheConfig
from teacher_cache.create import finalize
from teacher_cache.group import DistEnv
from teacher_cache.plan import CachePlan

log = logging.getLogger(__name__)


def run_cache(
    cfg: CacheConfig,
    *,
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
        capture = build_capture(cfg, dist.main_first)
        plan = capture.plan
        storage = open_storage(plan.location, cfg.store.storage_options)
        if finalize_only:
            _finalize_only(cfg, storage, plan)
        elif worker is not None:
            engines.run_worker(cfg, capture, storage, *worker)
        elif engine == "ray":
            engines.run_ray(cfg, capture, storage, ray_address)
        else:
            engines.run_local(cfg, overwrite, dist, capture, storage)
        return plan.location
    finally:
        dist.close()


def _finalize_only(cfg: CacheConfig, storage: Storage, plan: CachePlan) -> None:
    """`cache-teacher --finalize`: write the manifest of a cache whose every shard is committed."""
    store = CacheStore(storage)
    if not store.is_cache() or store.header["fingerprint"] != plan.fingerprint:
        raise CacheError(f"{plan.location} holds no cache of this config; run cache-teacher (or its workers) first")
    if not finalize(cfg, store, once=True):
        missing = len(store.pending())
        raise CacheError(f"{plan.location}: {missing} shard(s) are not committed yet; run the workers to the end first")
    log.info("%s", report.summary(store))
