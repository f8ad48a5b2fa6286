"""A field's chunks read straight from its shard files, each bound to its place.

zarr writes every array as Zarr v3 shards (`sharding_indexed`, index at the end of the file:
one little-endian (offset, nbytes) uint64 pair per inner chunk, then the index's CRC32C). An
inner chunk is the row block's little-endian bytes, Blosc-compressed for some fields, then its
CRC32C (4 bytes, little-endian). That CRC makes a flipped byte an error, but it says nothing
about where the chunk belongs: two shard files of the same size swapped, or a shard copied in
from another cache of the same shape, pass it. So a shard's commit record holds the CRC of
every inner chunk of every field (`chunk_crcs`), and a chunk is used only when its own CRC
both matches its bytes and equals the one recorded for that (split, field, shard, chunk).

Reading here rather than through zarr also spares zarr's per-call overhead (~1-2 ms a call):
a block of one field is one ranged read of the shard file plus a decode.
"""

from __future__ import annotations

from dataclasses import dataclass

import google_crc32c
import numpy as np
from numcodecs import blosc

EMPTY = 2**64 - 1
"""Index entry of a chunk that was never written."""


class ChunkError(ValueError):
    """A chunk or shard index whose bytes do not check out (the caller names the place)."""


@dataclass(frozen=True)
class ChunkLayout:
    """How one array's chunks are stored, from its zarr.json."""

    dtype: np.dtype
    chunk_shape: tuple[int, ...]
    shard_rows: int
    """Rows per shard file (chunk rows when the array is not sharded)."""
    compressed: bool
    sharded: bool

    @property
    def chunk_rows(self) -> int:
        return self.chunk_shape[0]

    @property
    def chunks_per_shard(self) -> int:
        return self.shard_rows // self.chunk_rows

    @property
    def index_bytes(self) -> int:
        return 16 * self.chunks_per_shard + 4

    @property
    def chunk_nbytes(self) -> int:
        return int(np.prod(self.chunk_shape, dtype=np.int64)) * self.dtype.itemsize


def _inner_codecs(codecs: list[dict]) -> tuple[bool, str | None]:
    """(Blosc-compressed, byte order) of a [bytes, (blosc), crc32c] chain; ChunkError otherwise."""
    names = [c["name"] for c in codecs]
    if names not in (["bytes", "crc32c"], ["bytes", "blosc", "crc32c"]):
        raise ChunkError(f"unsupported codec chain {names}")
    endian = codecs[0].get("configuration", {}).get("endian")
    return len(names) == 3, endian


def parse_layout(meta: dict) -> ChunkLayout:
    """The layout of an array from its zarr.json, refusing any layout this module does not write."""
    if meta.get("zarr_format") != 3 or meta.get("node_type") != "array":
        raise ChunkError("not a Zarr v3 array")
    dtype = np.dtype(meta["data_type"])
    shard_shape = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])
    codecs = meta["codecs"]
    if len(codecs) == 1 and codecs[0]["name"] == "sharding_indexed":
        conf = codecs[0]["configuration"]
        if conf.get("index_location", "end") != "end" or [c["name"] for c in conf["index_codecs"]] != [
            "bytes",
            "crc32c",
        ]:
            raise ChunkError("unsupported shard index")
        compressed, endian = _inner_codecs(conf["codecs"])
        chunk_shape = tuple(conf["chunk_shape"])
        if shard_shape[1:] != chunk_shape[1:] or shard_shape[0] % chunk_shape[0]:
            raise ChunkError(f"shard shape {shard_shape} is not whole chunks of {chunk_shape}")
        layout = ChunkLayout(dtype, chunk_shape, shard_shape[0], compressed, True)
    else:
        compressed, endian = _inner_codecs(codecs)
        layout = ChunkLayout(dtype, shard_shape, shard_shape[0], compressed, False)
    if dtype.itemsize > 1 and endian not in ("little", None):
        raise ChunkError(f"unsupported byte order {endian}")
    return layout


def parse_index(raw: bytes, layout: ChunkLayout) -> np.ndarray:
    """(chunks, 2) uint64 offsets and lengths from the tail of a shard file (its CRC checked)."""
    if len(raw) != layout.index_bytes:
        raise ChunkError(f"shard index of {len(raw)} bytes, {layout.index_bytes} expected (truncated?)")
    if google_crc32c.value(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
        raise ChunkError("shard index fails its CRC32C")
    return np.frombuffer(raw, dtype="<u8", count=2 * layout.chunks_per_shard).reshape(-1, 2)


def _u8(raw) -> np.ndarray:
    """A zero-copy uint8 view (google_crc32c takes bytes or arrays, not memoryviews)."""
    return raw if isinstance(raw, np.ndarray) else np.frombuffer(raw, dtype=np.uint8)


def stored_crc(raw_chunk) -> int:
    """The CRC32C an encoded chunk carries (its last 4 bytes)."""
    return int.from_bytes(_u8(raw_chunk)[-4:].tobytes(), "little")


def chunk_crcs(shard_file, layout: ChunkLayout, n_chunks: int) -> list[int]:
    """The stored CRC32C of the first `n_chunks` inner chunks of a whole shard file (those inside
    the array: the last shard's chunks past its end are never written), for its commit record."""
    shard_file = _u8(shard_file)
    if not layout.sharded:
        return [stored_crc(shard_file)]
    index = parse_index(shard_file[-layout.index_bytes :].tobytes(), layout)
    crcs = []
    for offset, nbytes in index[:n_chunks].tolist():
        if offset == EMPTY:
            raise ChunkError("a chunk of the shard was never written")
        crcs.append(stored_crc(shard_file[offset + nbytes - 4 : offset + nbytes]))
    return crcs


def decode_chunk(raw, layout: ChunkLayout, expected_crc: int) -> np.ndarray:
    """One encoded inner chunk -> its (chunk rows, ...) array, after checking that its CRC32C
    matches its bytes (ChunkError "damaged") and equals the recorded one (bytes from another place)."""
    raw = _u8(raw)
    if len(raw) < 4:
        raise ChunkError("damaged (truncated chunk)")
    crc = stored_crc(raw)
    if google_crc32c.value(raw[:-4]) != crc:
        raise ChunkError("damaged (CRC32C mismatch)")
    if crc != expected_crc:
        raise ChunkError(
            "not the data committed there (its CRC32C differs from the commit record's: a shard file moved, swapped "
            "or copied in from another cache)"
        )
    body = raw[:-4]
    dtype = layout.dtype.newbyteorder("<")
    if layout.compressed:
        out = np.empty(layout.chunk_shape, dtype=dtype)
        try:
            held = int.from_bytes(body[4:8].tobytes(), "little")  # Blosc header: uncompressed size
            if len(body) < 16 or held != layout.chunk_nbytes:
                raise ValueError(f"it holds {held} bytes, {layout.chunk_nbytes} expected")
            blosc.decompress(body, out)
        except (RuntimeError, ValueError) as exc:
            raise ChunkError(f"damaged (does not decompress: {exc})") from None
        return out
    if len(body) != layout.chunk_nbytes:
        raise ChunkError(f"damaged ({len(body)} bytes, {layout.chunk_nbytes} expected)")
    out = body.view(dtype).reshape(layout.chunk_shape)
    return out if out.flags.writeable else out.copy()  # arrays handed on are writable (torch wants so)


def encode_crcs(crcs: list[int]) -> str:
    """Chunk CRCs as the hex string a commit record stores (8 hex digits a chunk)."""
    return np.asarray(crcs, dtype="<u4").tobytes().hex()


def decode_crcs(text: str) -> np.ndarray:
    return np.frombuffer(bytes.fromhex(text), dtype="<u4")
