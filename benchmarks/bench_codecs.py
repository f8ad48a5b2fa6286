"""Compression ratio and speed of candidate codecs for every cache field, on a real cache.

    python benchmarks/bench_codecs.py CACHE [--blocks 16] [--json OUT]

Each field is compressed chunk by chunk (one chunk = `block_rows` sequences, the unit zarr
compresses inside a shard) with numcodecs' Blosc, the library behind zarr's BloscCodec. Ratios
are raw bytes / compressed bytes; speeds are MB of raw data per second on this machine. The
"delta16" variant reinterprets 16-bit data as uint16 and stores differences along the last
axis (what a Delta filter would do), for comparison only.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from numcodecs import Blosc

from cache_format.reader import CacheReader

CANDIDATES = {
    "none": None,
    "lz4-shuffle": Blosc("lz4", 5, Blosc.SHUFFLE),
    "zstd1-shuffle": Blosc("zstd", 1, Blosc.SHUFFLE),
    "zstd3-shuffle": Blosc("zstd", 3, Blosc.SHUFFLE),
    "zstd3-bitshuffle": Blosc("zstd", 3, Blosc.BITSHUFFLE),
}


def measure(chunks: list[np.ndarray], codec) -> dict:
    raw = sum(c.nbytes for c in chunks)
    if codec is None:
        return {"ratio": 1.0, "encode_MBps": None, "decode_MBps": None}
    start = time.perf_counter()
    encoded = [codec.encode(np.ascontiguousarray(c)) for c in chunks]
    enc = time.perf_counter() - start
    start = time.perf_counter()
    for e in encoded:
        codec.decode(e)
    dec = time.perf_counter() - start
    return {
        "ratio": round(raw / sum(len(e) for e in encoded), 3),
        "encode_MBps": round(raw / enc / 1e6),
        "decode_MBps": round(raw / dec / 1e6),
    }


def delta16(c: np.ndarray) -> np.ndarray:
    bits = np.ascontiguousarray(c).view(np.uint16)
    out = bits.copy()
    out[..., 1:] = np.diff(bits, axis=-1)  # wraps modulo 2^16: lossless
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("cache", type=Path)
    p.add_argument("--blocks", type=int, default=16)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    reader = CacheReader(args.cache)
    lay = reader.layouts["train"]
    results: dict = {}
    names = list(reader.fields)
    blocks = [reader.read_block("train", b, names) for b in range(min(args.blocks, lay.blocks))]
    print(f"{'field':<15}{'variant':<24}{'ratio':>8}{'enc MB/s':>10}{'dec MB/s':>10}")
    for name in names:
        chunks = [b[name] for b in blocks]
        variants = {k: (chunks, c) for k, c in CANDIDATES.items()}
        if chunks[0].dtype.itemsize == 2 and chunks[0].ndim == 3:
            variants["delta16+zstd3-shuffle"] = (
                [delta16(c) for c in chunks],
                CANDIDATES["zstd3-shuffle"],
            )
        for variant, (data, codec) in variants.items():
            r = measure(data, codec)
            results.setdefault(name, {})[variant] = r
            enc, dec = r["encode_MBps"] or "-", r["decode_MBps"] or "-"
            print(f"{name:<15}{variant:<24}{r['ratio']:>8.2f}{enc:>10}{dec:>10}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
