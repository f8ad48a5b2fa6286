"""`pipeline verify`: recompute every checksum of a cache and name what is missing or damaged.

Checked: every shard file against its commit record (size, sha256, path inside the cache), the
commit records against the manifest, the header against the manifest and its fingerprint, and
every other file the manifest records (cache.json, each zarr.json, the teacher files,
token_counts). `repair` removes exactly the damaged shards' commit records and the manifest, so
that rerunning the same `cache-teacher` recomputes only those shards.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from cache_format.manifest import HEADER_KEYS, fingerprint
from cache_format.reader import CacheReader, _safe_key
from cache_format.store import COMMITS, HEADER, MANIFEST, TEACHER_DIR


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)
    damaged_shards: set[tuple[str, int]] = field(default_factory=set)
    unrepairable: list[str] = field(default_factory=list)
    """Damage a shard recomputation cannot mend (the header, array metadata)."""
    shards: int = 0
    bytes: int = 0

    def shard(self, split: str, shard: int, what: str) -> None:
        self.problems.append(f"shard {split}-{shard:05d}: {what}")
        self.damaged_shards.add((split, shard))


def _check_file(reader: CacheReader, key: str, meta: dict) -> str | None:
    """What is wrong with one recorded file, or None."""
    if not _safe_key(key):
        return f"path {key} leaves the cache directory"
    size = reader.storage.size(key)
    if size is None:
        return f"missing ({key})"
    if size != meta["bytes"] or reader.storage.sha256(key) != meta["sha256"]:
        return f"corrupt (checksum mismatch in {key})"
    return None


def verify_cache(location: str | Path) -> Report:
    reader = CacheReader(location, require_complete=False, check=False)
    report = Report()
    manifest = reader.manifest
    committed = reader.store.committed()
    records = {(r["split"], r["shard"]): r for r in manifest["shards"]} if manifest else committed
    if manifest is None:
        report.problems.append(
            f"incomplete: no {MANIFEST} (the capture did not finish); rerun `pipeline cache-teacher` with the "
            "same config"
        )
    else:
        _check_metadata(reader, manifest, report)
        for key, record in records.items():
            if committed.get(key) != record:
                what = "no commit record" if key not in committed else "its commit record disagrees with the manifest"
                report.shard(*key, f"{what} ({COMMITS}/)")
    for split, lay in reader.layouts.items():
        for shard in range(lay.shards):
            record = records.get((split, shard))
            if record is None:
                report.shard(split, shard, "missing (never committed)")
                continue
            for name, meta in record["files"].items():
                problem = _check_file(reader, meta["path"], meta)
                if problem:
                    report.shard(split, shard, f"{name} {problem}")
                else:
                    report.bytes += meta["bytes"]
            report.shards += 1
    return report


def _check_metadata(reader: CacheReader, manifest: dict, report: Report) -> None:
    for key in HEADER_KEYS:
        if reader.header.get(key) != manifest.get(key):
            report.problems.append(f"{HEADER} and {MANIFEST} disagree on `{key}`")
            report.unrepairable.append(HEADER)
    if fingerprint(reader.header["identity"]) != reader.header["fingerprint"]:
        report.problems.append(f"{HEADER}: the identity does not hash to the fingerprint (edited)")
        report.unrepairable.append(HEADER)
    for group in ("metadata", "teacher_files"):
        for key, meta in manifest.get(group, {}).items():
            problem = _check_file(reader, key, meta)
            if problem:
                report.problems.append(f"{key}: {problem}")
                if not key.startswith(TEACHER_DIR) and "token_counts" not in key:
                    report.unrepairable.append(key)  # the teacher files are rewritten on resume
            else:
                report.bytes += meta["bytes"]


def repair(location: str | Path, report: Report) -> list[str]:
    """Remove the damaged shards' commit records and the manifest; what was removed."""
    reader = CacheReader(location, require_complete=False, check=False)
    removed = []
    for split, shard in sorted(report.damaged_shards):
        key = reader.store.commit_key(split, shard)
        if reader.storage.exists(key):
            reader.storage.delete(key)
            removed.append(key)
    if reader.storage.exists(MANIFEST):
        reader.storage.delete(MANIFEST)
        removed.append(MANIFEST)
    return removed
