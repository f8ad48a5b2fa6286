"""The header (what a cache is, written first) and the manifest (what it holds, written last).

The fingerprint hashes the identity: everything that determines the cached values. The
manifest adds the commit record of every shard and the size and sha256 of every other file —
the header, each array's zarr.json, the teacher files and token_counts — so that `verify`
can check every byte and a reader can refuse edited metadata.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import time
from dataclasses import dataclass, field

import numpy as np

from cache_format import shard_table
from cache_format.head import HEAD_FILE
from cache_format.layout import FieldSpec, SplitLayout
from cache_format.storage import safe_key
from cache_format.store import FORMAT, FORMAT_VERSION, HEADER, TEACHER_DIR, CacheStore

HEADER_KEYS = ("format", "format_version", "fingerprint", "identity", "layout", "teacher", "tokenizer", "corpus")
"""What the header and the manifest both hold: they must agree."""


MANIFEST_KEYS = (
    *HEADER_KEYS,
    "created",
    "completed",
    "head",
    "teacher_files",
    "metadata",
    "counts",
    "versions",
    "config",
    "shard_table",
    "header",
)
"""Every key a v3 manifest holds. One that is missing is refused, never read as "nothing to check"."""
_FILE_GROUPS = ("metadata", "teacher_files")


def manifest_problems(manifest: dict) -> list[str]:
    """What makes a manifest unusable as the record of a cache (empty when it is complete)."""
    if not isinstance(manifest, dict):
        return ["is not a JSON object"]
    missing = [k for k in MANIFEST_KEYS if k not in manifest]
    if missing:
        return [f"lacks `{missing[0]}`, which the format requires (edited or truncated)"]
    problems = []
    for group in _FILE_GROUPS:
        records = manifest[group]
        if not isinstance(records, dict) or not records:
            problems.append(f"`{group}` records no file")
            continue
        for key, meta in records.items():
            if not safe_key(key):
                problems.append(f"`{group}` names a path outside the cache ({key})")
            elif not isinstance(meta, dict) or not isinstance(meta.get("bytes"), int) or not meta.get("sha256"):
                problems.append(f"`{group}` has no size and sha256 for {key}")
    if HEADER not in manifest["metadata"]:
        problems.append(f"`metadata` does not record {HEADER}")
    table = manifest["shard_table"]
    if not isinstance(table, dict) or table.get("path") != shard_table.FILE or not table.get("sha256"):
        problems.append(f"`shard_table` does not record {shard_table.FILE} with its size and sha256")
    return problems


def fingerprint(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]


def make_header(
    identity: dict,
    layouts: dict[str, SplitLayout],
    fields: list[FieldSpec],
    teacher: dict,
    tokenizer: dict,
    corpus: dict,
    config: dict,
) -> dict:
    from dataclasses import asdict

    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "fingerprint": fingerprint(identity),
        "identity": identity,
        "layout": {
            "splits": {n: lay.to_dict() for n, lay in layouts.items()},
            "fields": [asdict(f) for f in fields],
        },
        "teacher": teacher,
        "tokenizer": tokenizer,
        "corpus": corpus,
        "config": config,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


@dataclass
class CommitScan:
    """One pass over every commit record, nothing kept per shard but a shard-table row: what
    finalize needs at any shard count (10^5 parsed records would be hundreds of MB)."""

    table: np.ndarray
    counts: dict
    bad: dict[str, str] = field(default_factory=dict)
    """Commit-record files that vouch for no shard, and why."""
    missing: list[str] = field(default_factory=list)


def scan_commits(store: CacheStore) -> CommitScan:
    layouts, fields = store.layouts(), store.fields()
    names = [f.name for f in fields]
    rows = shard_table.offsets(layouts)
    table = np.zeros(sum(lay.shards for lay in layouts.values()), dtype=shard_table.dtype(len(names)))
    found = np.zeros(len(table), dtype=bool)
    splits = {n: {"tokens": 0, "logit_positions": 0, "teacher_seconds": 0.0} for n in layouts}
    stored = dict.fromkeys(names, 0)
    first, last, bad = math.inf, -math.inf, {}
    for key, record, digest, problem in store.iter_committed():
        if problem is not None:
            bad[key] = problem
            continue
        row = rows[record["split"]] + record["shard"]
        found[row] = True
        table[row]["record_sha256"] = np.frombuffer(bytes.fromhex(digest), dtype=np.uint8)
        table[row]["bytes"] = [record["files"][n]["bytes"] for n in names]
        split = splits[record["split"]]
        split["tokens"] += record["tokens"]
        split["logit_positions"] += record["logit_positions"]
        split["teacher_seconds"] += record["seconds"]
        for n in names:
            stored[n] += record["files"][n]["bytes"]
        first, last = min(first, record["committed"] - record["seconds"]), max(last, record["committed"])
    out: dict = {"splits": {}, "fields": {}}
    for name, lay in layouts.items():
        s = splits[name]
        out["splits"][name] = {"sequences": lay.sequences, "views": lay.views, "rows": lay.rows, "shards": lay.shards,
                               **s, "teacher_seconds": round(s["teacher_seconds"], 3)}  # fmt: skip
    if math.isfinite(first):  # from the first shard's start to the last commit (spans resumes, if any)
        out["wall_seconds"] = round(last - first, 3)
    rows_total = sum(lay.rows for lay in layouts.values())
    for f in fields:
        out["fields"][f.name] = {"bytes": stored[f.name], "raw_bytes": f.row_bytes * rows_total}
    missing = [
        f"{split}-{i:05d}" for split, lay in layouts.items() for i in range(lay.shards) if not found[rows[split] + i]
    ]
    return CommitScan(table, out, bad, missing)


def build_manifest(store: CacheStore, scan: CommitScan, config: dict, versions: dict) -> dict:
    """The manifest of a cache whose every shard is committed (`scan`); writes the shard table first."""
    header = store.header
    table = shard_table.to_bytes(scan.table)
    store.storage.write_bytes(shard_table.FILE, table)
    table_record = {"path": shard_table.FILE, "bytes": len(table), "sha256": hashlib.sha256(table).hexdigest()}
    return {
        **{k: header[k] for k in (*HEADER_KEYS, "created")},
        "completed": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "head": store.storage.exists(f"{TEACHER_DIR}/{HEAD_FILE}"),
        "teacher_files": store.file_records(store.side_keys()),
        "metadata": store.file_records(store.metadata_keys()),
        "counts": scan.counts,
        "versions": {**versions, "python": platform.python_version()},
        "config": config,
        "shard_table": table_record,
        "header": header,  # the header as written: `verify --repair` restores a torn one from it
    }
