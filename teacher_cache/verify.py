"""`pipeline verify`: recompute every shard file's checksum and name what is missing or corrupt."""

from __future__ import annotations

from pathlib import Path

from teacher_cache.store import MANIFEST, CacheReader, file_sha256


def verify_cache(path: str | Path) -> tuple[list[str], dict]:
    """(problems, stats); no problems means every expected shard is committed and intact."""
    reader = CacheReader(path, require_complete=False)
    store = reader.store
    records = (
        {(r["split"], r["shard"]): r for r in reader.manifest["shards"]}
        if reader.manifest is not None
        else store.committed()
    )
    problems: list[str] = []
    if reader.manifest is None:
        problems.append(
            f"incomplete: no {MANIFEST} (the capture did not finish); rerun "
            "`pipeline cache-teacher` with the same config to resume it"
        )
    checked = nbytes = 0
    for split, lay in reader.layouts.items():
        for shard in range(lay.shards):
            name = f"{split}-{shard:05d}"
            record = records.get((split, shard))
            if record is None:
                problems.append(f"shard {name}: missing (never committed)")
                continue
            for field, meta in record["files"].items():
                file = reader.path / meta["path"]
                if not file.is_file():
                    problems.append(f"shard {name}: {field} file missing ({meta['path']})")
                elif file.stat().st_size != meta["bytes"] or file_sha256(file) != meta["sha256"]:
                    problems.append(f"shard {name}: {field} corrupt (checksum mismatch in {meta['path']})")
                else:
                    nbytes += meta["bytes"]
            checked += 1
    for rel, meta in (reader.manifest or {}).get("teacher_files", {}).items():
        file = reader.path / rel
        if not file.is_file():
            problems.append(f"{rel}: missing")
        elif file.stat().st_size != meta["bytes"] or file_sha256(file) != meta["sha256"]:
            problems.append(f"{rel}: corrupt (checksum mismatch)")
        else:
            nbytes += meta["bytes"]
    return problems, {"shards": checked, "bytes": nbytes}
