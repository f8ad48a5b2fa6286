"""Sequence selections: small, fingerprinted indexes written beside a cache (`pipeline select`),
read by `train-student --set data.selection=NAME`. A selection never rewrites the cache.

Two files under `selections/`, the data first and the record last (the record's presence makes a
selection exist):
- `NAME.<sha16>.safetensors`: `keep_rows` (the split's row mask, packed little-endian bits, the
  index a run reads), `sequence_index`, `score` and `kept` (one entry per sequence of the split),
  and with `token_scores` also `token_score` ((rows, L) float16: the teacher's entropy at every
  non-pad token, NaN elsewhere; what `loss.kd_tokens: entropy` reads instead of rebuilding the
  logits each step); its name carries its hash, so replacing a selection never leaves a record
  naming other bytes;
- `NAME.json`: what made it (cache fingerprint, split, score, fraction, reference), the data
  file's size and sha256, and `record_sha256`, the hash of everything else in the record.
A reader refuses a selection whose record or data was edited or damaged, or that was made from
a cache with another fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import re

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from cache_format.storage import Storage
from pipeline.errors import CacheError

SELECTIONS = "selections"
FORMAT = "distilcache-selection"
FORMAT_VERSION = 1
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
ARRAYS = ("keep_rows", "sequence_index", "score", "kept")
TOKEN_SCORE = "token_score"
SELECTION_KEYS = (
    "name", "score", "keep", "fraction", "reference", "sequences", "kept_sequences", "kept_rows", "token_scores",
)  # fmt: skip
"""What a run records of the selection it read (with its data file's sha256)."""


def record_key(name: str) -> str:
    return f"{SELECTIONS}/{name}.json"


def check_name(name: str) -> str:
    if not NAME.match(name) or name.endswith(".json"):
        raise CacheError(f"selection name {name!r}: use letters, digits, '.', '_' or '-' (at most 100)")
    return name


def record_digest(record: dict) -> str:
    """sha256 of a record without its own `record_sha256` (canonical JSON)."""
    body = {k: v for k, v in record.items() if k != "record_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def encode_arrays(
    keep_rows: np.ndarray,
    sequence_index: np.ndarray,
    score: np.ndarray,
    kept: np.ndarray,
    token_score: np.ndarray | None = None,
) -> bytes:
    """The data file (safetensors: the same bytes for the same arrays)."""
    packed = np.packbits(keep_rows.astype(bool), bitorder="little")
    tensors = {
        "keep_rows": torch.from_numpy(packed),
        "sequence_index": torch.from_numpy(np.ascontiguousarray(sequence_index, dtype=np.int64)),
        "score": torch.from_numpy(np.ascontiguousarray(score, dtype=np.float32)),
        "kept": torch.from_numpy(np.ascontiguousarray(kept, dtype=np.uint8)),
    }
    if token_score is not None:
        tensors[TOKEN_SCORE] = torch.from_numpy(np.ascontiguousarray(token_score, dtype=np.float16))
    return save_safetensors(tensors)


def write_selection(storage: Storage, record: dict, data: bytes) -> dict:
    """Publish a selection: its data file, then its record (completed here with the data file's
    name, size and hash and the record's own hash), then remove the data file of the record it
    replaced. A crash leaves the old selection or the new one, never a mix."""
    name = check_name(record["name"])
    old = read_record(storage, name) if storage.exists(record_key(name)) else None
    digest = hashlib.sha256(data).hexdigest()
    path = f"{SELECTIONS}/{name}.{digest[:16]}.safetensors"
    record = {**record, "data": {"path": path, "bytes": len(data), "sha256": digest}}
    record["record_sha256"] = record_digest(record)
    storage.write_bytes(path, data)
    storage.write_bytes(record_key(name), json.dumps(record, indent=2, sort_keys=True).encode())
    stale = (old or {}).get("data", {}).get("path")
    if isinstance(stale, str) and stale != path and stale.startswith(f"{SELECTIONS}/{name}."):
        storage.delete(stale)
    return record


def read_record(storage: Storage, name: str) -> dict:
    """A selection's record, checked against its own hash (not yet its data or its cache)."""
    key = record_key(check_name(name))
    if not storage.exists(key):
        listed = ", ".join(list_selections(storage)) or "none"
        raise CacheError(
            f"no selection {name!r} beside {storage.url} (selections: {listed}); make it with `pipeline select`"
        )
    try:
        record = json.loads(storage.read_bytes(key))
    except ValueError:
        raise CacheError(
            f"{storage.url}/{key} is not JSON (torn or edited); rerun `pipeline select --overwrite`"
        ) from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise CacheError(f"{storage.url}/{key} is not a selection record; rerun `pipeline select --overwrite`")
    if record.get("format_version") != FORMAT_VERSION:
        raise CacheError(
            f"{storage.url}/{key}: selection format v{record.get('format_version')} is not supported "
            f"(this distilcache reads v{FORMAT_VERSION}); rerun `pipeline select --overwrite`"
        )
    if record.get("record_sha256") != record_digest(record):
        raise CacheError(
            f"{storage.url}/{key} does not hash to its recorded sha256 (edited or damaged); "
            "rerun `pipeline select --overwrite`"
        )
    return record


def load_selection(
    storage: Storage, name: str, fingerprint: str, split: str, rows: int
) -> tuple[dict, np.ndarray, np.ndarray | None]:
    """(record, (rows,) bool mask of the split's kept rows, (rows, L) float16 token scores or None):
    every check a run makes before using a selection: its record, its data file, the cache it was
    made from and the split's size."""
    record = read_record(storage, name)
    where = _where(storage, name)
    if record.get("cache_fingerprint") != fingerprint:
        raise CacheError(
            f"{where} was made from cache {str(record.get('cache_fingerprint'))[:12]}, this cache is "
            f"{fingerprint[:12]}; run `pipeline select` on this cache"
        )
    if record.get("split") != split or record.get("rows") != rows:
        raise CacheError(
            f"{where} selects {record.get('rows')} rows of split {record.get('split')!r}, the run reads split "
            f"{split!r} ({rows} rows); set data.split to the selection's split or select this split"
        )
    arrays = read_arrays(storage, record, where)
    keep = np.unpackbits(arrays["keep_rows"], count=rows, bitorder="little").astype(bool)
    if int(keep.sum()) != record.get("kept_rows"):
        raise CacheError(f"{where}: its row mask keeps {int(keep.sum())} rows, its record {record.get('kept_rows')}")
    token_score = arrays.get(TOKEN_SCORE)
    if token_score is not None and len(token_score) != rows:
        raise CacheError(f"{where}: its token scores cover {len(token_score)} rows, the split has {rows}")
    return record, keep, token_score


def _where(storage: Storage, name: str) -> str:
    return f"selection {name!r} ({storage.url}/{record_key(name)})"


def read_arrays(storage: Storage, record: dict, where: str) -> dict[str, np.ndarray]:
    """The data file's arrays, checked against the record's size and sha256."""
    meta = record.get("data") or {}
    path = meta.get("path")
    if not isinstance(path, str) or not path.startswith(f"{SELECTIONS}/") or not storage.exists(path):
        raise CacheError(f"{where}: its data file {path} is missing; rerun `pipeline select --overwrite`")
    blob = storage.read_bytes(path)
    if len(blob) != meta.get("bytes") or hashlib.sha256(blob).hexdigest() != meta.get("sha256"):
        raise CacheError(
            f"{where}: its data file {path} differs from the record (edited or damaged); "
            "rerun `pipeline select --overwrite`"
        )
    try:
        tensors = load_safetensors(blob)
    except SafetensorError as exc:  # a hash match makes this a format mismatch, not damage
        raise CacheError(f"{where}: its data file does not load ({exc}); rerun `pipeline select --overwrite`") from None
    expected = {*ARRAYS, TOKEN_SCORE} if record.get("token_scores") else set(ARRAYS)
    if set(tensors) != expected:
        raise CacheError(f"{where}: its data file holds {sorted(tensors)}, not {sorted(expected)}")
    return {k: v.numpy() for k, v in tensors.items()}


def list_selections(storage: Storage) -> list[str]:
    """Names of the selection records beside a cache."""
    keys = storage.list(SELECTIONS)
    return [k[len(SELECTIONS) + 1 : -len(".json")] for k in keys if k.endswith(".json") and k.count("/") == 1]


def selection_problems(storage: Storage, fingerprint: str) -> list[str]:
    """What `verify` reports about the selections beside a cache (every record and data file,
    and data files no record names)."""
    problems, named = [], set()
    for name in list_selections(storage):
        try:
            record = read_record(storage, name)
            named.add(record.get("data", {}).get("path"))
            if record.get("cache_fingerprint") != fingerprint:
                raise CacheError(
                    f"{_where(storage, name)} was made from another cache "
                    f"({str(record.get('cache_fingerprint'))[:12]}); delete it or rerun `pipeline select --overwrite`"
                )
            read_arrays(storage, record, _where(storage, name))
        except CacheError as exc:
            problems.append(str(exc))
    for key in storage.list(SELECTIONS):
        if not key.endswith(".json") and key not in named:
            problems.append(f"{key}: no selection record names it (left by an interrupted `pipeline select`)")
    return problems
