"""`pipeline verify`: recompute every checksum of a cache and name what is missing or damaged.

Checked: every shard file against its commit record (size, sha256, each inner chunk's CRC32C),
each commit record against its own place (split, shard, fingerprint, the layout's file paths)
and against its row of the manifest's shard table, the manifest against the format (every required record present), the
header against the manifest and its fingerprint, and every other file the manifest records
(cache.json, each zarr.json, the teacher files, token_counts) with nothing unrecorded beside
them, and every selection beside the cache (its record, its data file, the cache it was made
from; `pipeline select`). A torn (unparsable) header, manifest or commit record is named like any other damage.

`repair` removes exactly the damaged shards' commit records (by their own file names, never by a
name read from inside a record) and the manifest, so that rerunning the same `cache-teacher`
recomputes only those shards; a torn header is restored from the copy the manifest keeps, when
that copy hashes to the header's recorded sha256.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from cache_format import shard_table
from cache_format.chunks import ChunkError, chunk_crcs, encode_crcs
from cache_format.manifest import HEADER_KEYS, fingerprint, manifest_problems
from cache_format.selection import selection_problems
from cache_format.storage import Storage, open_storage, safe_key
from cache_format.store import (
    COMMITS,
    DATA,
    FORMAT,
    FORMAT_VERSION,
    HEADER,
    MANIFEST,
    TEACHER_DIR,
    CacheStore,
    chunk_layout,
    chunks_in,
    json_or_torn,
)
from pipeline.errors import CacheError


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)
    damaged_shards: set[tuple[str, int]] = field(default_factory=set)
    bad_records: list[str] = field(default_factory=list)
    """Commit-record files that cannot vouch for any shard (torn, foreign, misnamed)."""
    unrepairable: list[str] = field(default_factory=list)
    """Damage a shard recomputation cannot mend (the header, array metadata)."""
    torn_manifest: bool = False
    """The manifest is unusable (torn, incomplete) or must be rewritten: repair removes it."""
    selections: list[str] = field(default_factory=list)
    """Problems of the selections beside the cache (`pipeline select`): the cache itself may be intact."""
    header_copy: bytes | None = None
    """The header's bytes as the manifest keeps them, when the header itself is torn."""
    shards: int = 0
    bytes: int = 0
    seconds: float = 0.0
    """Time spent checking the shard files (their bytes / seconds is the verify speed)."""

    def shard(self, split: str, shard: int, what: str) -> None:
        self.problems.append(f"shard {split}-{shard:05d}: {what}")
        self.damaged_shards.add((split, shard))


def _file_problem(
    storage: Storage, key: str, meta: dict, layout=None, n_chunks: int = 0, known: dict[str, str] | None = None
) -> str | None:
    """What is wrong with one recorded file, or None; `known` (sha256 -> the place recorded with
    it) names where bytes found in the wrong place belong."""
    if not safe_key(key):
        return f"path {key} leaves the cache directory"
    size = storage.size(key)
    if size is None:
        return f"missing ({key})"
    if size != meta["bytes"]:
        return f"corrupt (size {size}, {meta['bytes']} recorded, in {key})"
    with storage.view(key) as blob:
        digest = hashlib.sha256(blob).hexdigest()
        if digest != meta["sha256"]:
            if known and digest in known:
                return f"holds the bytes recorded for {known[digest]} (swapped or copied: {key})"
            return f"corrupt (checksum mismatch in {key})"
        if layout is not None:
            try:
                crcs = encode_crcs(chunk_crcs(blob, layout, n_chunks))
            except ChunkError as exc:
                return f"corrupt ({exc} in {key})"
            if crcs != meta["chunk_crc32c"]:
                return f"its chunk CRCs disagree with its commit record ({key})"
    return None


def verify_cache(location: str | Path, storage_options: dict | None = None) -> Report:
    storage = open_storage(location, storage_options)
    store = CacheStore(storage)
    if not store.is_cache():
        raise CacheError(
            f"{storage.url} is not a distilcache cache (no {HEADER}); build one with `pipeline cache-teacher`"
        )
    report = Report()
    manifest, torn = json_or_torn(storage, MANIFEST)
    if torn:
        report.torn_manifest = True
        report.problems.append(
            f"{MANIFEST} is torn (not valid JSON); `--repair` removes it and rerunning the same "
            "cache-teacher rewrites it"
        )
    header, header_torn = json_or_torn(storage, HEADER)
    if header_torn:
        if not _header_from_manifest(manifest, report):
            report.problems.append(f"{HEADER} is torn (not valid JSON) and no intact copy is recorded")
            report.unrepairable.append(HEADER)
            return report
        header = json.loads(report.header_copy)
        report.problems.append(f"{HEADER} is torn (not valid JSON); `--repair` restores it from {MANIFEST}")
    if header.get("format") != FORMAT or header.get("format_version") != FORMAT_VERSION:
        report.problems.append(f"format v{header.get('format_version')} is not v{FORMAT_VERSION}")
        report.unrepairable.append(HEADER)
        return report
    store._header = header
    committed = store.committed(strict=False)
    for key, problem in store.bad_records.items():
        report.problems.append(f"{key} {problem}")
        report.bad_records.append(key)
    if manifest is None:
        if not torn:
            report.problems.append(
                f"incomplete: no {MANIFEST} (the capture did not finish); rerun `pipeline cache-teacher` with the "
                "same config"
            )
        records = committed
    else:
        records = _check_manifest(store, manifest, committed, report)
    report.selections = selection_problems(storage, header["fingerprint"])
    report.problems += report.selections
    _check_shards(store, records, report)
    return report


def _header_from_manifest(manifest: dict | None, report: Report) -> bool:
    copy = (manifest or {}).get("header")
    recorded = (manifest or {}).get("metadata", {}).get(HEADER, {})
    if not isinstance(copy, dict):
        return False
    blob = json.dumps(copy, indent=2).encode()
    if hashlib.sha256(blob).hexdigest() != recorded.get("sha256"):
        return False
    report.header_copy = blob
    return True


def _check_manifest(store: CacheStore, manifest: dict, committed: dict, report: Report) -> dict:
    """Manifest and metadata checks; the shard records the manifest vouches for."""
    problems = manifest_problems(manifest)
    if problems:
        report.problems += [f"{MANIFEST} {p}" for p in problems]
        report.torn_manifest = True  # unusable as a record: repair removes it, the rerun rewrites it
        return committed
    header = store.header
    for key in HEADER_KEYS:
        if header.get(key) != manifest.get(key):
            report.problems.append(f"{HEADER} and {MANIFEST} disagree on `{key}`")
            report.unrepairable.append(HEADER)
    if fingerprint(header["identity"]) != header["fingerprint"]:
        report.problems.append(f"{HEADER}: the identity does not hash to the fingerprint (edited)")
        report.unrepairable.append(HEADER)
    listed = store.storage.list(DATA) + store.storage.list(TEACHER_DIR)
    expected = {HEADER} | {k for k in listed if k.endswith("zarr.json")}
    sides = {k for k in listed if k.startswith(f"{TEACHER_DIR}/") or k.startswith(f"{DATA}/token_counts/")}
    for group, keys in (("metadata", expected), ("teacher_files", sides)):
        recorded = manifest[group]
        for key in sorted(keys - set(recorded)):
            report.problems.append(f"{key}: not recorded in {MANIFEST}")
            report.unrepairable.append(key)
        for key, meta in recorded.items():
            if key == HEADER and report.header_copy is not None:
                continue  # torn, restored by repair
            problem = _file_problem(store.storage, key, meta)
            if problem:
                report.problems.append(f"{key}: {problem}")
                if group == "metadata":
                    report.unrepairable.append(key)
                else:  # the teacher files are rewritten by the rerun, which then writes a new manifest
                    report.torn_manifest = True
            else:
                report.bytes += meta["bytes"]
    table = _table(store, manifest["shard_table"], report)
    if table is None:
        return committed
    rows = shard_table.offsets(store.layouts())
    for split, shard in committed:
        recorded = bytes(table[rows[split] + shard]["record_sha256"]).hex()
        if store.record_digests[(split, shard)] != recorded:
            report.shard(split, shard, f"its commit record differs from the manifest's shard table ({COMMITS}/)")
    return committed


def _table(store: CacheStore, meta: dict, report: Report):
    """The shard table, or None (then reported, and the manifest is removed by repair)."""
    problem = _file_problem(store.storage, meta["path"], meta)
    if problem is None:
        rows = sum(lay.shards for lay in store.layouts().values())
        try:
            return shard_table.from_bytes(store.storage.read_bytes(meta["path"]), rows, len(store.fields()))
        except ValueError as exc:
            problem = f"does not fit the layout ({exc})"
    report.problems.append(f"{meta['path']} (the shard table): {problem}")
    report.torn_manifest = True
    return None


def _check_shards(store: CacheStore, records: dict, report: Report, threads: int | None = None) -> None:
    """Every shard's files, on a thread per core (hashing releases the GIL), with a progress bar."""
    fields = store.fields()
    known = {
        m["sha256"]: f"{r['split']} shard {r['shard']:05d} ({name})"
        for r in records.values()
        for name, m in r["files"].items()
    }
    total = sum(m["bytes"] for r in records.values() for m in r["files"].values())
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="verify", disable=None, mininterval=1.0)

    def check(split: str, shard: int) -> list[tuple[str, str | None, int]]:
        record, lay = records[(split, shard)], store.layouts()[split]
        out = []
        for f in fields:
            meta = record["files"][f.name]
            layout, n = chunk_layout(f, lay), chunks_in(lay, shard)
            out.append((f.name, _file_problem(store.storage, meta["path"], meta, layout, n, known), meta["bytes"]))
            bar.update(meta["bytes"])
        return out

    start = time.perf_counter()
    places = [(split, shard) for split, lay in store.layouts().items() for shard in range(lay.shards)]
    with bar, ThreadPoolExecutor(threads or os.cpu_count() or 1) as pool:
        results = pool.map(lambda p: check(*p) if p in records else None, places)
        for (split, shard), result in zip(places, results, strict=True):
            if result is None:
                report.shard(split, shard, "missing (never committed)")
                continue
            for name, problem, nbytes in result:
                if problem:
                    report.shard(split, shard, f"{name} {problem}")
                else:
                    report.bytes += nbytes
            report.shards += 1
    report.seconds = time.perf_counter() - start


def repair(location: str | Path, report: Report, storage_options: dict | None = None) -> str:
    """Restore a torn header from the manifest's copy, remove the damaged shards' commit records and
    the manifest; says what was done."""
    storage = open_storage(location, storage_options)
    store = CacheStore(storage)
    done = []
    if report.header_copy is not None:
        storage.write_bytes(HEADER, report.header_copy)
        done.append(f"restored {HEADER} from {MANIFEST}")
    removed = []
    keys = {store.commit_key(split, shard) for split, shard in report.damaged_shards} | set(report.bad_records)
    for key in sorted(keys):
        if storage.exists(key):
            storage.delete(key)
            removed.append(key)
    if (report.damaged_shards or report.bad_records or report.torn_manifest) and storage.exists(MANIFEST):
        storage.delete(MANIFEST)
        removed.append(MANIFEST)
    if removed:
        done.append(f"removed {', '.join(removed)}")
    return "; ".join(done)
