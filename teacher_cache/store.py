"""The cache on disk: a sharded Zarr v3 store plus commit records and a manifest.

    <cache>/cache.json        identity header, written first (what this cache is)
    <cache>/data.zarr/        zarr group: train/<field>, eval/<field>, token_counts
    <cache>/teacher/          teacher config, MLM head weights, tokenizer
    <cache>/commits/          <split>-<shard>.json, one per finished shard (sizes, checksums)
    <cache>/manifest.json     written last: the cache is complete iff it exists

Zarr rewrites a whole shard on any write into it, so every array is created at its final
shape once, each shard is written by exactly one process in one call per field, and its
commit record is published (fsynced, then hard-linked into place) only after its data.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import queue
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from pipeline.errors import DistilcacheError
from teacher_cache.layout import FieldSpec, SplitLayout

log = logging.getLogger(__name__)

FORMAT = "distilcache-teacher-cache"
FORMAT_VERSION = 1
HEADER, MANIFEST, DATA, TEACHER_DIR, COMMITS = ("cache.json", "manifest.json", "data.zarr", "teacher", "commits")

_CODECS: dict[str, Any] = {
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


class CacheError(DistilcacheError):
    """The cache on disk is missing, incomplete, corrupt or belongs to another config."""


def _write_json_atomic(path: Path, obj: Any, exclusive: bool = False) -> None:
    """Write JSON to a temp file, fsync it, then move (or, exclusively, hard-link) it into place."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.partial")
    with tmp.open("w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=2, sort_keys=False)
        fh.flush()
        os.fsync(fh.fileno())
    try:
        if exclusive:
            os.link(tmp, path)  # fails if the record exists: two writers never both win
        else:
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


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


@dataclass
class CacheStore:
    """A cache directory being written or read (commit records, header, manifest)."""

    path: Path

    @property
    def header(self) -> dict:
        return json.loads((self.path / HEADER).read_text())

    @property
    def manifest(self) -> dict | None:
        p = self.path / MANIFEST
        return json.loads(p.read_text()) if p.is_file() else None

    def layouts(self) -> dict[str, SplitLayout]:
        return {
            name: SplitLayout(**{k: v for k, v in d.items() if k not in ("rows", "shards")})
            for name, d in self.header["layout"]["splits"].items()
        }

    def fields(self) -> list[FieldSpec]:
        return [FieldSpec(**{**f, "row_shape": tuple(f["row_shape"])}) for f in self.header["layout"]["fields"]]

    # -- creation ------------------------------------------------------------------------

    @staticmethod
    def is_cache(path: Path) -> bool:
        return (path / HEADER).is_file()

    @classmethod
    def open_for_capture(cls, path: Path, header: dict, overwrite: bool) -> tuple[CacheStore, str]:
        """Create, resume or reuse the cache at `path`; refuse one built from another config.

        Returns the store and its state: "new", "resume" or "complete".
        """
        if path.exists() and not cls.is_cache(path):
            if any(path.iterdir()):
                raise CacheError(
                    f"{path} exists and is not a distilcache cache; choose another "
                    "store.output (--overwrite never deletes foreign data)"
                )
        elif path.exists():
            store = cls(path)
            old = store.header
            if old.get("fingerprint") == header["fingerprint"] and not overwrite:
                state = "complete" if store.manifest is not None else "resume"
                if state == "resume":
                    store.remove_partials()
                return store, state
            if not overwrite:
                diff = identity_diff(old.get("identity", {}), header["identity"])
                raise CacheError(
                    f"{path} holds a cache built with another config ({'; '.join(diff[:4]) or 'format'}"
                    f"{'; ...' if len(diff) > 4 else ''}); pass --overwrite to replace it or choose "
                    "another store.output"
                )
            log.info("overwriting %s", path)
            shutil.rmtree(path)
        store = cls(path)
        store._create(header)
        return store, "new"

    def _create(self, header: dict) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / COMMITS).mkdir(exist_ok=True)
        root = zarr.open_group(
            self.path / DATA,
            mode="w",
            attributes={
                "distilcache": {
                    "format": FORMAT,
                    "format_version": FORMAT_VERSION,
                    "fingerprint": header["fingerprint"],
                }
            },
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
                    compressors=_CODECS[f.codec],
                    fill_value=0,
                    attributes={"logical_dtype": f.logical_dtype or f.dtype},
                )
        _write_json_atomic(self.path / HEADER, header)  # last: a header means the arrays exist

    def write_extra_array(self, name: str, data: np.ndarray) -> None:
        """A small root-level array (e.g. token_counts), written in one piece."""
        root = zarr.open_group(self.path / DATA, mode="a")
        arr = root.create_array(
            name, shape=data.shape, dtype=data.dtype, chunks=data.shape, compressors=_CODECS["small"], overwrite=True
        )
        arr[...] = data

    def remove_partials(self) -> None:
        """Delete temp files a killed writer left behind (zarr's and ours end in `.partial`)."""
        for p in self.path.rglob("*.partial"):
            p.unlink(missing_ok=True)

    # -- shards and commits --------------------------------------------------------------

    def commit_path(self, split: str, shard: int) -> Path:
        return self.path / COMMITS / f"{split}-{shard:05d}.json"

    def committed(self) -> dict[tuple[str, int], dict]:
        out = {}
        for p in sorted((self.path / COMMITS).glob("*.json")):
            record = json.loads(p.read_text())
            out[(record["split"], record["shard"])] = record
        return out

    def pending(self) -> list[tuple[str, int]]:
        done = self.committed()
        return [(name, s) for name, lay in self.layouts().items() for s in range(lay.shards) if (name, s) not in done]

    def shard_files(self, split: str, shard: int) -> dict[str, Path]:
        """The file holding shard `shard` of each field of `split`."""
        out = {}
        group = zarr.open_group(self.path / DATA / split, mode="r")
        for f in self.fields():
            arr = group[f.name]
            key = arr.metadata.encode_chunk_key((shard,) + (0,) * len(f.row_shape))
            out[f.name] = self.path / DATA / split / f.name / key
        return out

    def write_shard(self, split: str, shard: int, data: dict[str, np.ndarray], info: dict) -> dict:
        """Write every field's slice of one shard, fsync, checksum, then publish its commit."""
        lay = self.layouts()[split]
        start, stop = lay.shard_range(shard)
        for name, values in data.items():
            assert values.shape[0] == stop - start, f"{name}: {values.shape[0]} rows for {stop - start}"
            # runtime config is not persisted: reopen with write_empty_chunks so that an
            # all-zero shard still gets its file (and its checksum)
            arr = zarr.open_array(self.path / DATA / split / name, mode="r+").with_config(_ARRAY_CONFIG)
            arr[start:stop] = values
        files = {}
        for name, path in self.shard_files(split, shard).items():
            with path.open("rb") as fh:
                os.fsync(fh.fileno())
            files[name] = {
                "path": str(path.relative_to(self.path)),
                "bytes": path.stat().st_size,
                "sha256": file_sha256(path),
            }
        record = {
            "split": split,
            "shard": shard,
            "rows": [start, stop],
            "files": files,
            **info,
            "committed": time.time(),
        }
        _write_json_atomic(self.commit_path(split, shard), record, exclusive=True)
        return record

    def side_file_records(self) -> dict[str, dict]:
        """Size and sha256 of every file under teacher/ (head, config, tokenizer) and token_counts."""
        files = sorted((self.path / TEACHER_DIR).rglob("*")) + sorted((self.path / DATA / "token_counts").rglob("*"))
        return {
            str(p.relative_to(self.path)): {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
            for p in files
            if p.is_file()
        }

    def finalize(self, manifest: dict) -> None:
        _write_json_atomic(self.path / MANIFEST, manifest)


class ShardWriter:
    """Background writer: the teacher hands over whole shards and never waits on disk.

    At most `max_pending` finished shards wait in memory; a writer error (disk full, ...)
    surfaces on the next `submit` or on exit, and nothing unfinished is ever committed.
    """

    def __init__(self, store: CacheStore, max_pending: int = 1):
        self.store = store
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="shard-writer", daemon=True)
        self.records: list[dict] = []

    def __enter__(self) -> ShardWriter:
        self._thread.start()
        return self

    def submit(self, split: str, shard: int, data: dict[str, np.ndarray], info: dict) -> None:
        self._raise_if_failed()
        self._queue.put((split, shard, data, info))

    def __exit__(self, exc_type, exc, tb) -> None:
        self._queue.put(None)
        self._thread.join()
        if exc_type is None:
            self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is not None:
                continue  # drain: after a failure nothing more is written
            split, shard, data, info = item
            try:
                self.records.append(self.store.write_shard(split, shard, data, info))
            except OSError as exc:
                self._error = _disk_error(exc, self.store.path, split, shard)
            except BaseException as exc:  # surfaced in the main thread
                self._error = exc


def _disk_error(exc: OSError, path: Path, split: str, shard: int) -> Exception:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return CacheError(
            f"disk full while writing {split} shard {shard:05d} to {path}; free space and rerun "
            "the same command to resume from the last complete shard"
        )
    return CacheError(f"cannot write {split} shard {shard:05d} to {path}: {exc}; rerun the same command to resume")


# ----------------------------------------------------------------------------- reading


class CacheReader:
    """Read access to a complete cache (what stage two, verify and inspect use)."""

    def __init__(self, path: str | Path, require_complete: bool = True):
        self.path = Path(path).expanduser()
        if not CacheStore.is_cache(self.path):
            raise CacheError(
                f"{self.path} is not a distilcache cache (no {HEADER}); build one with `pipeline cache-teacher`"
            )
        self.store = CacheStore(self.path)
        self.header = self.store.header
        version = self.header.get("format_version")
        if self.header.get("format") != FORMAT or version != FORMAT_VERSION:
            raise CacheError(
                f"{self.path}: cache format {self.header.get('format')} v{version} is "
                f"not supported (this distilcache reads v{FORMAT_VERSION}); rebuild it"
            )
        self.manifest = self.store.manifest
        if require_complete and self.manifest is None:
            raise CacheError(
                f"{self.path} is incomplete (no {MANIFEST}); rerun `pipeline "
                "cache-teacher` with the same config to finish it"
            )
        self.fields = {f.name: f for f in self.store.fields()}
        self.layouts = self.store.layouts()
        self._root = zarr.open_group(self.path / DATA, mode="r")

    @property
    def splits(self) -> list[str]:
        return list(self.layouts)

    @property
    def identity(self) -> dict:
        return self.header["identity"]

    def array(self, split: str, name: str) -> zarr.Array:
        return self._root[split][name]

    def token_counts(self) -> np.ndarray:
        return self._root["token_counts"][...]

    def read_rows(self, split: str, start: int, stop: int, names: list[str] | None = None) -> dict[str, np.ndarray]:
        """Raw stored arrays for rows [start, stop) (decode with teacher_cache.encode)."""
        group = self._root[split]
        return {n: group[n][start:stop] for n in (names or list(self.fields))}

    def read_block(self, split: str, block: int, names: list[str] | None = None) -> dict[str, np.ndarray]:
        """One chunk-aligned block of rows: the unit of fast reads."""
        lay = self.layouts[split]
        start = block * lay.block_rows
        return self.read_rows(split, start, min(start + lay.block_rows, lay.rows), names)

    def iter_blocks(self, split: str, names: list[str] | None = None) -> Iterator[dict[str, np.ndarray]]:
        for b in range(self.layouts[split].blocks):
            yield self.read_block(split, b, names)
