"""The header (what a cache is, written first) and the manifest (what it holds, written last).

The fingerprint hashes the identity: everything that determines the cached values. The
manifest adds the commit record of every shard and the size and sha256 of every other file —
the header, each array's zarr.json, the teacher files and token_counts — so that `verify`
can check every byte and a reader can refuse edited metadata.
"""

from __future__ import annotations

import hashlib
import json
import platform
import time

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


def counts(store: CacheStore, records: dict) -> dict:
    """Per split: sequences, rows, tokens, positions with logits, seconds; per field: bytes."""
    out: dict = {"splits": {}, "fields": {}}
    for name, lay in store.layouts().items():
        recs = [r for (s, _), r in records.items() if s == name]
        out["splits"][name] = {
            "sequences": lay.sequences,
            "views": lay.views,
            "rows": lay.rows,
            "shards": lay.shards,
            "tokens": sum(r["tokens"] for r in recs),
            "logit_positions": sum(r["logit_positions"] for r in recs),
            "teacher_seconds": round(sum(r["seconds"] for r in recs), 3),
        }
    if records:  # from the first shard's start to the last commit (spans resumes, if any)
        first = min(r["committed"] - r["seconds"] for r in records.values())
        out["wall_seconds"] = round(max(r["committed"] for r in records.values()) - first, 3)
    for f in store.fields():
        stored = sum(r["files"][f.name]["bytes"] for r in records.values())
        raw = sum(f.row_bytes * (r["rows"][1] - r["rows"][0]) for r in records.values())
        out["fields"][f.name] = {"bytes": stored, "raw_bytes": raw}
    return out


def missing_shards(store: CacheStore, records: dict) -> list[str]:
    return [f"{s}-{i:05d}" for s, lay in store.layouts().items() for i in range(lay.shards) if (s, i) not in records]


def build_manifest(store: CacheStore, records: dict, config: dict, versions: dict) -> dict:
    """The manifest of a cache whose every shard is committed (`records`, read by
    `store.committed()`, which also keeps their digests); writes the shard table first."""
    header = store.header
    fields = [f.name for f in store.fields()]
    table = shard_table.to_bytes(shard_table.build(store.layouts(), fields, records, store.record_digests))
    store.storage.write_bytes(shard_table.FILE, table)
    table_record = {"path": shard_table.FILE, "bytes": len(table), "sha256": hashlib.sha256(table).hexdigest()}
    return {
        **{k: header[k] for k in (*HEADER_KEYS, "created")},
        "completed": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "head": store.storage.exists(f"{TEACHER_DIR}/{HEAD_FILE}"),
        "teacher_files": store.file_records(store.side_keys()),
        "metadata": store.file_records(store.metadata_keys()),
        "counts": counts(store, records),
        "versions": {**versions, "python": platform.python_version()},
        "config": config,
        "shard_table": table_record,
        "header": header,  # the header as written: `verify --repair` restores a torn one from it
    }
