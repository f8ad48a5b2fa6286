"""A cache's life around the capture loop: create, resume or reuse it (under the writer lock),
write the teacher's side files, check free space, and write the manifest last."""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np

from cache_format.head import save_head
from cache_format.manifest import build_manifest, missing_shards
from cache_format.storage import LocalStorage
from cache_format.store import HEADER, TEACHER_DIR, CacheError, CacheStore
from pipeline.log import human_bytes
from pipeline.versions import library_versions
from teacher_cache.config import CacheConfig
from teacher_cache.corpus import PackedCorpus
from teacher_cache.plan import CachePlan, recorded
from teacher_cache.teacher import Teacher

log = logging.getLogger(__name__)


def write_side_files(store: CacheStore, teacher: Teacher, corpus: PackedCorpus) -> None:
    """Teacher head + config + tokenizer (stage two needs them, not the teacher) and token counts."""
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        if not save_head(teacher.model, directory):
            teacher.model.config.save_pretrained(directory)
            log.warning(
                "unknown MLM head for %s: the cache cannot rebuild exact logits (kd mode `exact`)",
                teacher.model.config.model_type,
            )
        teacher.tokenizer.save_pretrained(directory)
        for path in sorted(directory.rglob("*")):
            if path.is_file():
                store.storage.write_bytes(f"{TEACHER_DIR}/{path.relative_to(directory)}", path.read_bytes())
    store.write_extra_array("token_counts", np.asarray(corpus.counts, dtype=np.int64))


def check_free_space(store: CacheStore, plan: CachePlan) -> None:
    if not isinstance(store.storage, LocalStorage):
        return  # object storage has no free-space figure to check
    row_bytes = sum(f.row_bytes for f in plan.fields)
    needed = sum(np.diff(plan.layouts[s].shard_range(i))[0] for s, i in store.pending()) * row_bytes
    free = shutil.disk_usage(store.storage.local_path(HEADER).parent).free
    if needed > free:
        raise CacheError(
            f"the remaining shards need up to {human_bytes(needed)} but only {human_bytes(free)} "
            f"is free at {store.url}; free space or set store.output on a larger disk"
        )


def finalize(cfg: CacheConfig, store: CacheStore) -> None:
    """Write the manifest, once every shard is committed."""
    records = store.committed()
    missing = missing_shards(store, records)
    if missing:
        raise CacheError(f"shards {', '.join(missing[:5])} are missing after the run; rerun the same command")
    store.finalize(build_manifest(store, records, recorded(cfg), library_versions()))
