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

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from cache_format.chunks import ChunkLayout, chunk_crcs, encode_crcs
from cache_format.layout import FieldSpec, SplitLayout
from cache_format.settings import IGNORE_INDEX
from cache_format.storage import Storage
from pipeline.errors import CacheError

log = logging.getLogger(__name__)

FORMAT = "distilcache-teacher-cache"
FORMAT_VERSION = 3
"""v2: a CRC32C on every inner chunk, `labels` filled with -100, metadata hashes in the manifest.
v3: commit records carry the cache fingerprint and every inner chunk's CRC32C (a chunk is bound
to its place); the manifest's checks are required, not optional."""
HEADER, MANIFEST, DATA, TEACHER_DIR, COMMITS, LOCKS = (
    "cache.json",
    "manifest.json",
    "data.zarr",
    "teacher",
    "commits",
    "locks",
)

_BLOSC: dict[str, BloscCodec | None] = {
    # chosen by benchmarks/bench_codecs.py on real teacher outputs (docs/cache-format.md):
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


def blosc_for(codec: str) -> BloscCodec | None:
    """The Blosc codec of a field's codec name (None: stored raw)."""
    return _BLOSC[codec]


def compressors(codec: str) -> list:
    """The byte codecs of a field's inner chunks: its compressor (if any), then a CRC32C."""
    blosc = _BLOSC[codec]
    return [blosc, Crc32cCodec()] if blosc is not None else [Crc32cCodec()]


def chunk_layout(field: FieldSpec, split: SplitLayout) -> ChunkLayout:
    """How `field`'s chunks of `split` are stored (what its zarr.json says, from the header alone)."""
    shape = (split.block_rows, *field.row_shape)
    return ChunkLayout(np.dtype(field.dtype), shape, split.shard_rows, _BLOSC[field.codec] is not None, True)


def shard_key(split: str, field: FieldSpec, shard: int) -> str:
    """The storage key of one field's shard file (zarr's default chunk key encoding)."""
    return f"{DATA}/{split}/{field.name}/c/{shard}" + "/0" * len(field.row_shape)


def chunks_in(split: SplitLayout, shard: int) -> int:
    """Inner chunks of `shard` that lie inside the split (the last shard may hold fewer)."""
    start, stop = split.shard_range(shard)
    return -(-(stop - start) // split.block_rows)


class AlreadyCommitted(CacheError):
    """Another writer committed this shard first (its bytes are the same: shards are pure)."""


def record_problem(
    record: dict, fingerprint: str, layouts: dict[str, SplitLayout], fields: list[FieldSpec]
) -> str | None:
    """Why a commit record cannot vouch for the shard it names, or None: every name in it must be
    one the layout has (no name from a record is ever joined into a path unchecked), it must carry
    this cache's fingerprint, and each field's file must sit exactly where the layout puts it."""
    if not isinstance(record, dict):
        return "is not a commit record"
    split, shard = record.get("split"), record.get("shard")
    if not isinstance(split, str) or split not in layouts:
        return f"names the split {split!r}, which the cache does not have ({', '.join(layouts)})"
    lay = layouts[split]
    if not isinstance(shard, int) or isinstance(shard, bool) or not 0 <= shard < lay.shards:
        return f"names {split} shard {shard!r}, outside 0..{lay.shards - 1}"
    if record.get("fingerprint") != fingerprint:
        return (
            f"belongs to another cache (fingerprint {str(record.get('fingerprint'))[:12]}, this one {fingerprint[:12]})"
        )
    if record.get("rows") != list(lay.shard_range(shard)):
        return f"records rows {record.get('rows')}, {split} shard {shard:05d} holds {list(lay.shard_range(shard))}"
    files = record.get("files")
    if not isinstance(files, dict) or set(files) != {f.name for f in fields}:
        return "does not record exactly one file per field"
    for f in fields:
        meta, expected = files[f.name], shard_key(split, f, shard)
        if not isinstance(meta, dict) or meta.get("path") != expected:
            path = meta.get("path") if isinstance(meta, dict) else meta
            return f"places the {f.name} file at {path!r}, the layout at {expected}"
        crcs = meta.get("chunk_crc32c")
        valid = isinstance(meta.get("bytes"), int) and isinstance(meta.get("sha256"), str)
        if not valid or not isinstance(crcs, str) or len(crcs) != 8 * chunks_in(lay, shard):
            return f"lacks the size, sha256 or chunk CRCs of its {f.name} file"
    return None


def json_or_torn(storage: Storage, key: str) -> tuple[dict | None, bool]:
    """(parsed JSON, torn): (None, False) when the file is absent, (None, True) when it does not
    parse (a torn or damaged metadata file, which the caller names or mends)."""
    if not storage.exists(key):
        return None, False
    try:
        return json.loads(storage.read_bytes(key)), False
    except (ValueError, UnicodeDecodeError):
        return None, True


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

    def iter_committed(self) -> Iterator[tuple[str, dict | None, str | None, str | None]]:
        """(key, record, sha256 of its bytes, problem) of every commit record, one at a time: a
        record that is torn, belongs to another cache or names another place than its own file comes
        with its problem and no record."""
        fingerprint, layouts, fields = self.header["fingerprint"], self.layouts(), self.fields()
        for key in self.storage.list(COMMITS):
            if not key.endswith(".json"):
                continue
            blob = self.storage.read_bytes(key)
            try:
                record = json.loads(blob)
            except (ValueError, UnicodeDecodeError):
                yield key, None, None, "is torn (not valid JSON)"
                continue
            problem = record_problem(record, fingerprint, layouts, fields)
            if problem is None and self.commit_key(record["split"], record["shard"]) != key:
                problem = f"describes {record['split']} shard {record['shard']:05d}, not its own file's shard"
            yield key, (record if problem is None else None), hashlib.sha256(blob).hexdigest(), problem

    def committed(self, strict: bool = True) -> dict[tuple[str, int], dict]:
        """Every valid commit record by (split, shard) (`record_digests` keeps their sha256); an
        invalid one is an error (`strict`), or is left out (`bad_records` names it)."""
        out, self.bad_records, self.record_digests = {}, {}, {}
        for key, record, digest, problem in self.iter_committed():
            if problem is None:
                out[(record["split"], record["shard"])] = record
                self.record_digests[(record["split"], record["shard"])] = digest
            elif strict:
                raise CacheError(f"{self.url}/{key} {problem}; run `pipeline verify --repair {self.url}`")
            else:
                self.bad_records[key] = problem
        return out

    def committed_names(self) -> set[tuple[str, int]]:
        """(split, shard) of every commit record, from the listing alone (a resume reads no record:
        its cost grows with what is left to do, not with what is done; finalize checks them all)."""
        out = set()
        for key in self.storage.list(COMMITS):
            split, _, shard = key.removeprefix(f"{COMMITS}/").removesuffix(".json").rpartition("-")
            if key.endswith(".json") and shard.isdigit():
                out.add((split, int(shard)))
        return out

    def pending(self) -> list[tuple[str, int]]:
        done = self.committed_names()
        return [(name, s) for name, lay in self.layouts().items() for s in range(lay.shards) if (name, s) not in done]

    def write_shard(
        self, split: str, shard: int, data: dict[str, np.ndarray], info: dict, fence: Callable[[], None] | None = None
    ) -> dict:
        """Write every field's slice of one shard, make it durable, checksum it, then publish its
        commit record exclusively (CacheError if another writer committed the shard first).
        `fence` raises when this writer may no longer write (it lost its lock): it runs before each
        field is written and before the commit."""
        layout = self.layouts()[split]
        start, stop = layout.shard_range(shard)
        store = self.storage.zarr_store()
        fields = {f.name: f for f in self.fields()}
        for name, values in data.items():
            assert values.shape[0] == stop - start, f"{name}: {values.shape[0]} rows for {stop - start}"
            if fence is not None:
                fence()
            # runtime config is not persisted: reopen with write_empty_chunks so that an
            # all-zero shard still gets its file (and its checksum)
            arr = zarr.open_array(store=store, path=f"{DATA}/{split}/{name}", mode="r+").with_config(_ARRAY_CONFIG)
            arr[start:stop] = values
        files = {}
        for name, f in fields.items():
            key = shard_key(split, f, shard)
            self.storage.fsync(key)
            with self.storage.view(key) as blob:
                crcs = chunk_crcs(blob, chunk_layout(f, layout), chunks_in(layout, shard))
                digest = hashlib.sha256(blob).hexdigest()
                files[name] = {"path": key, "bytes": len(blob), "sha256": digest, "chunk_crc32c": encode_crcs(crcs)}
        record = {"split": split, "shard": shard, "fingerprint": self.header["fingerprint"], "rows": [start, stop]}
        record |= {"files": files, **info, "committed": time.time()}
        if fence is not None:
            fence()
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
