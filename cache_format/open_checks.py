"""What opening a complete cache checks, with a constant number of requests and bounded memory
whatever its shard count: the header against the manifest and its fingerprint, every metadata
file against its recorded hash with none unrecorded, each array's zarr.json against the header,
and every shard file's size against the shard table, in one streamed listing (one request per
1,000 objects on a bucket; nothing held per file). Each check raises the reader's one-line
"damaged" error naming the file."""

from __future__ import annotations

import hashlib
import json

import numpy as np

from cache_format.chunks import ChunkError, parse_layout
from cache_format.manifest import HEADER_KEYS, fingerprint
from cache_format.store import DATA, HEADER, MANIFEST, shard_key


def check_open(reader) -> None:
    """`reader`: the CacheReader being opened (its header, manifest, table and storage)."""
    m, header = reader.manifest, reader.header
    for key in HEADER_KEYS:
        if header.get(key) != m.get(key):
            raise reader.damaged(f"{HEADER} and {MANIFEST} disagree on `{key}` (one of them was edited)")
    if fingerprint(header["identity"]) != header["fingerprint"]:
        raise reader.damaged(f"the identity in {HEADER} does not hash to its fingerprint (it was edited)")
    metadata = _check_listing(reader)
    unrecorded = sorted(({HEADER} | metadata) - set(m["metadata"]))
    if unrecorded:
        raise reader.damaged(f"{unrecorded[0]} is not recorded in {MANIFEST} (added, or the record was removed)")
    for key, meta in m["metadata"].items():
        blob = reader.storage.read_bytes(key) if reader.storage.exists(key) else None
        if blob is None or len(blob) != meta["bytes"] or hashlib.sha256(blob).hexdigest() != meta["sha256"]:
            raise reader.damaged(f"{key} differs from the manifest's record (edited or damaged)")
        if key.endswith("zarr.json") and key.count("/") == 3:  # data.zarr/<split>/<field>/zarr.json
            _check_array_metadata(reader, key, blob)


def _check_listing(reader) -> set[str]:
    """Every shard file listed with the size its table row records; the zarr.json keys found."""
    names = list(reader.fields)
    column = {name: i for i, name in enumerate(names)}
    rows = reader.table_rows
    seen = np.zeros((len(reader.table), len(names)), dtype=bool)
    metadata = set()
    for key, size in reader.storage.iter_sizes(DATA):
        if key.endswith("zarr.json"):
            metadata.add(key)
            continue
        parts = key.split("/")  # data.zarr/<split>/<field>/c/<shard>/0...
        if len(parts) < 5 or parts[1] not in rows or parts[2] not in column or not parts[4].isdigit():
            continue
        split, name, shard = parts[1], parts[2], int(parts[4])
        if shard >= reader.layouts[split].shards or key != shard_key(split, reader.fields[name], shard):
            continue
        row = rows[split] + shard
        recorded = int(reader.table["bytes"][row, column[name]])
        if size != recorded:
            raise reader.damaged(
                f"{split} shard {shard:05d}: the {name} file has {size} bytes, {recorded} recorded ({key})"
            )
        seen[row, column[name]] = True
    missing = np.argwhere(~seen)
    if len(missing):
        row, col = (int(x) for x in missing[0])
        split = max((s for s in rows if rows[s] <= row), key=lambda s: rows[s])
        shard, name = row - rows[split], names[col]
        key = shard_key(split, reader.fields[name], shard)
        raise reader.damaged(f"{split} shard {shard:05d}: the {name} file is missing ({key})")
    return metadata


def _check_array_metadata(reader, key: str, blob: bytes) -> None:
    _, split, name, _ = key.split("/")
    try:
        stored = parse_layout(json.loads(blob))
    except (ChunkError, KeyError, TypeError, ValueError) as exc:
        raise reader.damaged(f"{key} describes a layout this reader does not write ({exc})") from None
    if (split, name) in reader.chunk_layouts and stored != reader.chunk_layouts[(split, name)]:
        raise reader.damaged(f"{key} disagrees with {HEADER} on how {split}/{name} is stored")
