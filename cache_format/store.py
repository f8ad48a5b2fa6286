"""The cache on its storage: a sharded Zarr v3 store plus commit records and a manifest.

    <cache>/cache.json        identity header, written first (what this cache is)
    <cache>/data.zarr/        zarr group: train/<field>, eval/<field>, token_counts
    <cache>/teacher/          teacher config, MLM head weights, tokenizer
    <cache>/commits/          <split>-<shard>.json, one per finished shard (sizes, checksums)
    <cache>/locks/            the writer's lock and readers' leases while they run
    <cache>/manifest.json     written last: the cache is complete iff it exists

Zarr rewrites a whole shard on any write into it, so every array is created at its final
shape once, each shard is written by exactly one process in one call per field, and its
commit record is published exclusively (it appears once, after its data). Every inner chunk
carries a CRC32C, so a flipped byte is an error when it is read, not a wrong number.
"""

from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from cache_format.layout import FieldSpec, SplitLayout
from cache_format.settings import IGNORE_INDEX
from cache_format.storage import Storage
from pipeline.errors import DistilcacheError

if TYPE_CHECKING:
    from cache_format.lock import WriterLock

log = logging.getLogger(__name__)

FORMAT = "distilcache-teacher-cache"
FORMAT_VERSION = 2
"""v2: a CRC32C on every inner chunk, `labels` filled with -100, metadata hashes in the manifest."""
HEADER, MANIFEST, DATA, TEACHER_DIR, COMMITS, LOCKS = (
    "cache.json",
    "manifest.json",
    "data.zarr",
    "teacher",
    "commits",
    "locks",
)

_BLOSC: dict[str, BloscCodec | None] = {
    # chosen by benchmarks/bench_codecs.py on real teacher outputs (README, "Cache format"):
    # zstd-3 where arrays are small and compress well, zstd-1 on the large top-k fields (ratio
    # within 4 % of zstd-3 at 2-4x the encode speed), nothing on hidden states (1.07x at a
    # third of the read speed) and on the one-byte view ids (Blosc headers outweigh them).
    "ids": BloscCodec(cname="zstd", clevel=3, shuffle="shuffle"),
    "labels": BloscCodec(cname="zstd", clevel=3, shuffle="shuffle"),
    "small": BloscCodec(cname="zstd", clevel=3, shuffle="shuffle"),
    "values": BloscCodec(cname="zstd", clevel=1, shuffle="shuffle"),
    "indices": BloscCodec(cname="zstd", clevel=1, shuffle="shuffle"),
    "lse": BloscCodec(cname="zstd", clevel=1, shuffle="shuffle"),
    "raw": None,
}
_ARRAY_CONFIG = {"write_empty_chunks": True}


def compressors(codec: str) -> list:
    """The byte codecs of a field's inner chunks: its compressor (if any), then a CRC32C."""
    blosc = _BLOSC[codec]
    return [blosc, Crc32cCodec()] if blosc is not None else [Crc32cCodec()]


class CacheError(DistilcacheError):
    """The cache is missing, incomplete, corrupt or belongs to another config."""


class AlreadyCommitted(CacheError):
    """Another writer committed this shard first (its bytes are the same: shards are pure)."""


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def identity_diff(old: dict, new: dict) -> list[str]:
    """Human-readable differences between two identity dicts (`key: old -> new`)."""
    a, b = flatten(old), flatten(new)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def read_json(storage: Storage, key: str) -> dict:
    try:
        return json.loads(storage.read_bytes(key))
    except (ValueError, UnicodeDecodeError) as exc:
        raise CacheError(f"{storage.url}/{key} is damaged ({exc}); run `pipeline verify {storage.url}`") from None


class CacheStore:
    """A cache being written or read: header, commit records, manifest, shard files."""

    def __init__(self, storage: Storage):
        self.storage = storage
        self._header: dict | None = None

    @property
    def url(self) -> str:
        return self.storage.url

    @property
    def header(self) -> dict:
        if self._header is None:
            self._header = read_json(self.storage, HEADER)
        return self._header

    @property
    def manifest(self) -> dict | None:
        return read_json(self.storage, MANIFEST) if self.storage.exists(MANIFEST) else None

    def is_cache(self) -> bool:
        return self.storage.exists(HEADER)

    def layouts(self) -> dict[str, SplitLayout]:
        return {
            name: SplitLayout(**{k: v for k, v in d.items() if k not in ("rows", "shards")})
            for name, d in self.header["layout"]["splits"].items()
        }

    def fields(self) -> list[FieldSpec]:
        return [FieldSpec(**{**f, "row_shape": tuple(f["row_shape"])}) for f in self.header["layout"]["fields"]]

    # -- creation ------------------------------------------------------------------------

    def create(self, header: dict) -> None:
        """Every array at its final shape, then the header (a header means the arrays exist)."""
        root = zarr.open_group(
            store=self.storage.zarr_store(),
            path=DATA,
            mode="w",
            attributes={"distilcache": {k: header[k] for k in ("format", "format_version", "fingerprint")}},
        )
        fields = [FieldSpec(**{**f, "row_shape": tuple(f["row_shape"])}) for f in header["layout"]["fields"]]
        for name, split in header["layout"]["splits"].items():
            group = root.create_group(name)
            for f in fields:
                group.create_array(
                    f.name,
                    shape=(split["rows"], *f.row_shape),
                    dtype=f.dtype,
                    chunks=(split["block_rows"], *f.row_shape),
                    shards=(split["shard_rows"], *f.row_shape),
                    compressors=compressors(f.codec),
                    # padding only: a label of -100 is never a prediction target
                    fill_value=IGNORE_INDEX if f.name == "labels" else 0,
                    attributes={"logical_dtype": f.logical_dtype or f.dtype},
                )
        self.storage.write_bytes(HEADER, json.dumps(header, indent=2).encode())
        self._header = header

    def write_extra_array(self, name: str, data: np.ndarray) -> None:
        """A small root-level array (e.g. token_counts), written in one piece."""
        root = zarr.open_group(store=self.storage.zarr_store(), path=DATA, mode="a")
        arr = root.create_array(
            name,
            shape=data.shape,
            dtype=data.dtype,
            chunks=data.shape,
            compressors=compressors("small"),
            overwrite=True,
        )
        arr[...] = data

    # -- shards and commits --------------------------------------------------------------

    @staticmethod
    def commit_key(split: str, shard: int) -> str:
        return f"{COMMITS}/{split}-{shard:05d}.json"

    def committed(self) -> dict[tuple[str, int], dict]:
        out = {}
        for key in self.storage.list(COMMITS):
            if key.endswith(".json"):
                record = read_json(self.storage, key)
                out[(record["split"], record["shard"])] = record
        return out

    def pending(self) -> list[tuple[str, int]]:
        done = self.committed()
        return [(name, s) for name, lay in self.layouts().items() for s in range(lay.shards) if (name, s) not in done]

    def shard_keys(self, split: str, shard: int) -> dict[str, str]:
        """The storage key of the file holding shard `shard` of each field of `split`."""
        group = zarr.open_group(store=self.storage.zarr_store(read_only=True), path=f"{DATA}/{split}", mode="r")
        out = {}
        for f in self.fields():
            chunk = group[f.name].metadata.encode_chunk_key((shard,) + (0,) * len(f.row_shape))
            out[f.name] = f"{DATA}/{split}/{f.name}/{chunk}"
        return out

    def write_shard(self, split: str, shard: int, data: dict[str, np.ndarray], info: dict) -> dict:
        """Write every field's slice of one shard, make it durable, checksum it, then publish its
        commit record exclusively (CacheError if another writer committed the shard first)."""
        start, stop = self.layouts()[split].shard_range(shard)
        store = self.storage.zarr_store()
        for name, values in data.items():
            assert values.shape[0] == stop - start, f"{name}: {values.shape[0]} rows for {stop - start}"
            # runtime config is not persisted: reopen with write_empty_chunks so that an
            # all-zero shard still gets its file (and its checksum)
            arr = zarr.open_array(store=store, path=f"{DATA}/{split}/{name}", mode="r+").with_config(_ARRAY_CONFIG)
            arr[start:stop] = values
        files = {}
        for name, key in self.shard_keys(split, shard).items():
            self.storage.fsync(key)
            files[name] = {"path": key, "bytes": self.storage.size(key), "sha256": self.storage.sha256(key)}
        record = {"split": split, "shard": shard, "rows": [start, stop], "files": files, **info}
        record["committed"] = time.time()
        if not self.storage.create(self.commit_key(split, shard), json.dumps(record, indent=2).encode()):
            raise AlreadyCommitted(f"{split} shard {shard:05d} was committed by another writer meanwhile")
        return record

    def file_records(self, keys: list[str]) -> dict[str, dict]:
        """Size and sha256 of each file (streamed)."""
        return {k: {"bytes": self.storage.size(k), "sha256": self.storage.sha256(k)} for k in keys}

    def side_keys(self) -> list[str]:
        """Teacher files (head, config, tokenizer) and token_counts: written once, read by stage two."""
        return self.storage.list(TEACHER_DIR) + self.storage.list(f"{DATA}/token_counts")

    def metadata_keys(self) -> list[str]:
        """The header and every zarr.json (array and group metadata)."""
        return [HEADER] + [k for k in self.storage.list(DATA) if k.endswith("zarr.json")]

    def finalize(self, manifest: dict) -> None:
        self.storage.write_bytes(MANIFEST, json.dumps(manifest, indent=2).encode())


def open_for_capture(storage: Storage, header: dict, overwrite: bool, lock: WriterLock) -> tuple[CacheStore, str]:
    """Create, resume or reuse the cache at `storage` (whose writer lock is held); refuse one built
    from another config unless `overwrite`. Returns the store and "new", "resume" or "complete"."""
    store = CacheStore(storage)
    foreign = [k for k in storage.list() if not k.startswith(f"{LOCKS}/")]
    if storage.is_foreign_file():
        raise CacheError(f"store.output {storage.url} is a file; give a directory for the cache")
    if foreign and not store.is_cache():
        raise CacheError(
            f"{storage.url} exists and is not a distilcache cache; choose another store.output "
            "(--overwrite never deletes foreign data)"
        )
    if store.is_cache():
        old = store.header
        if old.get("fingerprint") == header["fingerprint"] and not overwrite:
            if store.manifest is not None:
                return store, "complete"
            storage.remove_partials()  # temp files of a killed writer (we hold the lock: none is running)
            return store, "resume"
        empty = store.manifest is None and not store.committed()  # a capture that stopped before any commit
        if not overwrite and not empty:
            diff = identity_diff(old.get("identity", {}), header["identity"])
            raise CacheError(
                f"{storage.url} holds a cache built with another config ({'; '.join(diff[:4]) or 'format'}"
                f"{'; ...' if len(diff) > 4 else ''}); pass --overwrite to replace it or choose another store.output"
            )
        from cache_format.lock import live_holders  # (lock imports this module)

        others = live_holders(storage, exclude_token=lock.token)
        if others:
            raise CacheError(
                f"--overwrite refused: {storage.url} is in use ({'; '.join(others)}); wait for them to finish"
            )
        log.info(
            "%s %s", "overwriting" if overwrite else "replacing the empty cache (no shard committed) at", storage.url
        )
        storage.delete_all()  # renamed away first: readers never see a half-deleted cache
        lock.acquire()  # in the fresh directory
    store.create(header)
    return store, "new"
