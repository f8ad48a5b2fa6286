"""The shard table: one fixed-width row per shard, written once at finalize beside the manifest.

A row holds the sha256 of the shard's commit record and the size of each of its field files. The
manifest records the table's own size and sha256, so a reader opens a cache with a constant
number of requests whatever its shard count (the manifest, the table, one listing page per 1,000
objects), checks every shard file's size against the listing without any commit record, and reads
a shard's commit record (its paths and chunk CRCs) only when it first reads that shard, checking it
against its row. At 10^5 shards of 7 fields the table is 8.8 MB of numpy, not 10^5 parsed records.
"""

from __future__ import annotations

import io

import numpy as np

from cache_format.layout import SplitLayout

FILE = "shards.npy"


def dtype(n_fields: int) -> np.dtype:
    return np.dtype([("record_sha256", "u1", (32,)), ("bytes", "<u8", (n_fields,))])


def offsets(layouts: dict[str, SplitLayout]) -> dict[str, int]:
    """The table row of each split's shard 0 (splits in header order)."""
    out, row = {}, 0
    for name, lay in layouts.items():
        out[name] = row
        row += lay.shards
    return out


def to_bytes(table: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, table, allow_pickle=False)
    return buf.getvalue()


def from_bytes(blob: bytes, rows: int, n_fields: int) -> np.ndarray:
    """The table, refused (ValueError) unless it has the expected rows and columns."""
    table = np.load(io.BytesIO(blob), allow_pickle=False)
    if table.dtype != dtype(n_fields) or table.shape != (rows,):
        raise ValueError(f"a table of {table.shape} {table.dtype}, not {rows} rows of {n_fields} fields")
    return table
