"""A cache's life around the capture loop: create, resume or reuse it (under the writer lock),
write the teacher's side files, check free space, and write the manifest last.

Torn metadata has a way out: a torn manifest of this config is rewritten once every shard is
committed, a torn header of this config (recognised by the fingerprint zarr's group keeps) is
rewritten from the plan, and `--overwrite` rebuilds a cache whose header is torn.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Callable

import numpy as np

from cache_format.chunks import ChunkError, parse_layout
from cache_format.lock import WriterLock, live_holders
from cache_format.manifest import build_manifest, manifest_problems, scan_commits
from cache_format.storage import LocalStorage, Storage
from cache_format.store import DATA, HEADER, LOCKS, MANIFEST, CacheStore, chunk_layout, json_or_torn
from pipeline.config import identity_diff
from pipeline.errors import CacheError
from pipeline.log import human_bytes
from pipeline.versions import library_versions
from teacher_cache.config import CacheConfig
from teacher_cache.corpus import PackedCorpus
from teacher_cache.plan import CachePlan, file_records, recorded

log = logging.getLogger(__name__)
COUNTS = "token_counts"


def _group_fingerprint(storage: Storage) -> str | None:
    """The fingerprint zarr's root group keeps (it marks a distilcache cache whose header is torn)."""
    group, _ = json_or_torn(storage, f"{DATA}/zarr.json")
    return ((group or {}).get("attributes", {}).get("distilcache") or {}).get("fingerprint")


def open_for_capture(storage: Storage, header: dict, overwrite: bool, lock: WriterLock) -> tuple[CacheStore, str]:
    """Create, resume or reuse the cache at `storage` (whose writer lock is held); refuse one built
    from another config unless `overwrite`. Returns the store and "new", "resume" or "complete"."""
    store = CacheStore(storage)
    if storage.is_foreign_file():
        raise CacheError(f"store.output {storage.url} is a file; give a directory for the cache")
    old, header_torn = json_or_torn(storage, HEADER)
    ours = old is not None or _group_fingerprint(storage) is not None
    if not ours and [k for k in storage.list() if not k.startswith(f"{LOCKS}/")]:
        raise CacheError(
            f"{storage.url} exists and is not a distilcache cache; choose another store.output "
            "(--overwrite never deletes foreign data)"
        )
    # no header at all: killed while the arrays were created, before anything could be committed
    if ours and not overwrite and (old is not None or header_torn):
        fingerprint = old.get("fingerprint") if old is not None else _group_fingerprint(storage)
        if fingerprint == header["fingerprint"]:
            return store, _resume(store, header, header_torn)
        if header_torn:
            raise CacheError(
                f"{storage.url}/{HEADER} is torn (not valid JSON) and the cache belongs to another config; run "
                f"`pipeline verify --repair {storage.url}` to restore it, or pass --overwrite to rebuild the cache"
            )
        manifest, manifest_torn = json_or_torn(storage, MANIFEST)
        if manifest is not None or manifest_torn or store.committed_names():
            diff = identity_diff(old.get("identity", {}), header["identity"])
            raise CacheError(
                f"{storage.url} holds a cache built with another config ({'; '.join(diff[:4]) or 'format'}"
                f"{'; ...' if len(diff) > 4 else ''}); pass --overwrite to replace it or choose another store.output"
            )
    if ours:
        others = live_holders(storage, exclude_token=lock.token)
        if others:
            raise CacheError(
                f"--overwrite refused: {storage.url} is in use ({'; '.join(others)}); wait for them to finish"
            )
        log.info(
            "%s %s", "overwriting" if overwrite else "replacing the empty cache (nothing committed) at", storage.url
        )
        storage.delete_all()  # renamed away first: readers never see a half-deleted cache
        lock.acquire()  # in the fresh directory
    store.create(header)
    return store, "new"


def _resume(store: CacheStore, header: dict, header_torn: bool) -> str:
    """ "complete" or "resume" for a cache of this config, mending torn metadata on the way."""
    storage = store.storage
    if header_torn:
        log.warning("%s/%s is torn; rewriting it from this config (the shards are kept)", storage.url, HEADER)
        storage.write_bytes(HEADER, json.dumps(header, indent=2).encode())
        storage.delete(MANIFEST)  # it hashed the old header: rewritten once every shard is committed
    manifest, torn = json_or_torn(storage, MANIFEST)
    if torn or (manifest is not None and manifest_problems(manifest)):
        log.warning("%s/%s is damaged; it is rewritten once every shard is committed", storage.url, MANIFEST)
        storage.delete(MANIFEST)
    elif manifest is not None:
        return "complete"
    # temp files of a killed writer: we hold the writer lock, so no other capture writes, unless
    # independent workers joined before us (they release the lock once joined; theirs are live)
    workers = live_holders(storage, kind="worker")
    if workers:
        log.info("leaving temp files to the live capture workers (%s)", "; ".join(workers))
    else:
        storage.remove_partials()
    return "resume"


# ----------------------------------------------------------------------------- side files


def _changed(storage: Storage, files: dict[str, bytes]) -> dict[str, bytes]:
    """The files whose stored copy is missing or differs (a kill may have cut one short)."""
    out = {}
    for key, data in files.items():
        size = storage.size(key)
        if size != len(data) or storage.sha256(key) != hashlib.sha256(data).hexdigest():
            out[key] = data
    return out


def prepare(store: CacheStore, plan: CachePlan, corpus: PackedCorpus) -> None:
    """Write the side files (the teacher's, and the plan's fitted codec) that are missing or differ,
    once free space for them and for every pending shard has been checked. They must be the files
    the header records (a follower checks them against it before the manifest exists)."""
    files = _changed(store.storage, plan.side_files)
    in_header, planned = store.header.get("side_files"), file_records(plan.side_files)
    if in_header is not None and in_header != planned:
        differ = sorted(k for k in set(in_header) | set(planned) if in_header.get(k) != planned.get(k))
        raise CacheError(
            f"{store.url}: this environment writes other teacher files ({', '.join(differ)}) than the capture "
            "that started the cache (another transformers version?); finish it where it started, or --overwrite"
        )
    counts = np.asarray(corpus.counts, dtype=np.int64)
    counts_key = f"{DATA}/{COUNTS}/c/0"
    rewrite_counts = not store.storage.exists(counts_key) or not _same_counts(store, counts)
    extra = sum(len(b) for b in files.values()) + (counts.nbytes if rewrite_counts else 0)
    check_free_space(store, plan, extra)
    for key, data in files.items():
        store.storage.write_bytes(key, data)
    if rewrite_counts:
        store.write_extra_array(COUNTS, counts)


def _same_counts(store: CacheStore, counts: np.ndarray) -> bool:
    import zarr

    try:
        stored = zarr.open_array(store=store.storage.zarr_store(read_only=True), path=f"{DATA}/{COUNTS}", mode="r")
        return bool(np.array_equal(stored[...], counts))
    except (OSError, ValueError, KeyError, RuntimeError):
        return False  # unreadable: rewritten


def check_free_space(store: CacheStore, plan: CachePlan, extra: int = 0) -> None:
    """Refuse to start when the pending shards (raw bytes, an upper bound) plus `extra` bytes of
    side files cannot fit."""
    if not isinstance(store.storage, LocalStorage):
        return  # object storage has no free-space figure to check
    row_bytes = sum(f.row_bytes for f in plan.fields)
    needed = sum(np.diff(plan.layouts[s].shard_range(i))[0] for s, i in store.pending()) * row_bytes + extra
    free = shutil.disk_usage(store.storage.local_path(HEADER).parent).free
    if needed > free:
        raise CacheError(
            f"the rest of the cache needs up to {human_bytes(needed)} but only {human_bytes(free)} "
            f"is free at {store.url}; free space or set store.output on a larger disk"
        )


# ----------------------------------------------------------------------------- the manifest


def finalize(cfg: CacheConfig, store: CacheStore, fence: Callable[[], None] | None = None, once: bool = False) -> bool:
    """Write the manifest if every shard is committed; True when the cache is complete. `once`
    (independent workers): publish it by an exclusive create, so that only the first one writes;
    `fence` raises when this writer lost its lock. Array metadata that disagrees with the header
    is refused rather than recorded."""
    if store.manifest is not None:
        return True
    scan = scan_commits(store)  # every record, read once, here only
    for key, problem in scan.bad.items():  # torn or foreign: its shard is captured again
        log.warning("%s/%s %s: removed; rerun to capture that shard again", store.url, key, problem)
        store.storage.delete(key)
    if scan.bad or scan.missing:
        return False
    _check_array_metadata(store)
    manifest = json.dumps(build_manifest(store, scan, recorded(cfg), library_versions()), indent=2).encode()
    if fence is not None:
        fence()
    if not once:
        store.storage.write_bytes(MANIFEST, manifest)
    elif store.storage.create(MANIFEST, manifest):  # else another worker wrote it first
        log.info("every shard is committed: manifest written")
    return True


def _check_array_metadata(store: CacheStore) -> None:
    for split, lay in store.layouts().items():
        for f in store.fields():
            key = f"{DATA}/{split}/{f.name}/zarr.json"
            try:
                stored = parse_layout(json.loads(store.storage.read_bytes(key)))
            except (ChunkError, KeyError, TypeError, ValueError, FileNotFoundError) as exc:
                stored = exc
            if stored != chunk_layout(f, lay):
                raise CacheError(
                    f"{store.url}/{key} does not describe {split}/{f.name} as {HEADER} does (edited?); the cache "
                    "cannot be completed: rebuild it with cache-teacher --overwrite"
                )
