"""Costs that must not grow with the corpus: opening a cache of 10^5 shards (7 x 10^5 shard files)
holds no Python object per shard or file, and planning one holds none per sequence. Measured with
tracemalloc (numpy's allocations included), against fixed bounds: a regression to a dict of the
listing or a list of commit records would take hundreds of MB here."""

import hashlib
import json
import tracemalloc

import numpy as np

from cache_format import shard_table
from cache_format.layout import SplitLayout, field_specs
from cache_format.manifest import HEADER_KEYS, make_header
from cache_format.reader import CacheReader
from cache_format.storage import LocalStorage
from cache_format.store import HEADER, MANIFEST, shard_key
from pipeline.config import from_dict
from teacher_cache.config import CacheConfig
from teacher_cache.plan import plan_layouts

SHARDS = 100_000
FILE_BYTES = 100


def synthetic_cache(root, shards: int = SHARDS):
    """A complete cache's metadata for `shards` shards; its shard files exist only in a listing."""
    fields = field_specs(8, 1, 1, 4, "uint16", "float16", "int8", "none")
    layouts = {"train": SplitLayout("train", 4 * shards, 1, 4, 4)}
    identity = {"seed": 0, "masking": {}, "outputs": {}}
    teacher = {"name": "t", "model_type": "bert", "vocab_size": 300, "hidden_size": 4, "num_layers": 1,
               "weights_sha256": "0" * 64, "dtype": "float32"}  # fmt: skip
    tokenizer = {"sha256": "0" * 64, "pad_id": 0, "mask_id": 4, "special_ids": [0, 1, 2, 3, 4], "size": 300}
    header = make_header(identity, layouts, fields, teacher, tokenizer, {}, {})
    storage = LocalStorage(root)
    blob = json.dumps(header, indent=2).encode()
    storage.write_bytes(HEADER, blob)
    table = np.zeros(shards, dtype=shard_table.dtype(len(fields)))
    table["bytes"] = FILE_BYTES
    table_blob = shard_table.to_bytes(table)
    storage.write_bytes(shard_table.FILE, table_blob)
    record = lambda b: {"bytes": len(b), "sha256": hashlib.sha256(b).hexdigest()}  # noqa: E731
    manifest = {
        **{k: header[k] for k in (*HEADER_KEYS, "created")},
        "completed": "now",
        "head": False,
        "teacher_files": {"teacher/config.json": {"bytes": 2, "sha256": "0" * 64}},
        "metadata": {HEADER: record(blob)},
        "counts": {"splits": {}, "fields": {}},
        "versions": {},
        "config": {},
        "shard_table": {"path": shard_table.FILE, **record(table_blob)},
        "header": header,
    }
    storage.write_bytes(MANIFEST, json.dumps(manifest).encode())
    listing = lambda self, prefix="": (  # noqa: E731
        (shard_key("train", f, s), FILE_BYTES) for s in range(shards) for f in fields
    )
    return listing


def test_opening_a_cache_of_1e5_shards_holds_nothing_per_shard(tmp_path, monkeypatch):
    monkeypatch.setattr(LocalStorage, "iter_sizes", synthetic_cache(tmp_path))
    tracemalloc.start()
    reader = CacheReader(tmp_path)  # every open-time check, the listing of 7 x 10^5 files included
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert sum(lay.shards for lay in reader.layouts.values()) == SHARDS
    assert peak < 32e6, f"opening took {peak / 1e6:.1f} MB of Python memory (the shard table is 8.8 MB)"


def test_planning_1e5_shards_holds_nothing_per_sequence():
    fields = field_specs(128, 64, 2, 768, "uint16", "float16", "int8", "none")
    raw = {"teacher": {"name": "t"}, "corpus": {"paths": ["c"]}, "store": {"shard_rows": 32}, "masking": {"views": 3}}
    cfg = from_dict(CacheConfig, raw)
    tracemalloc.start()
    layouts = plan_layouts(cfg, fields, {"train": 25_000_000 // 3, "eval": 10_000})
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert layouts["train"].shards > SHARDS
    assert peak < 1e6
