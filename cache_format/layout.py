"""What goes where in a cache (pure planning): rows, shards and the per-field schema.

A split holds `views` x `sequences` rows. View v occupies rows [v*S, (v+1)*S); the sequences
are a seeded random subset of the packed corpus in a seeded order that differs per view, so
blocks of consecutive rows are close to i.i.d. samples and mix differently in every epoch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from cache_format.hidden import storage_dtype, stored_hidden_width
from cache_format.rng import STREAM_SHUFFLE, permutation

_EVAL_SALT = 0x5EED_E7A1
"""Mixed into the seed of the eval split so its masks are independent of the train masks."""


def split_seed(seed: int, split: str) -> int:
    """Seed of a split's order and masks (train uses the configured seed unchanged)."""
    return seed if split == "train" else seed ^ _EVAL_SALT


def plan_rows(seed: int, n_packed: int, n_select: int, views: int) -> tuple[np.ndarray, np.ndarray]:
    """(sequence_index, view) of every row: the same seeded subset of the corpus in each view,
    in a different seeded order per view."""
    base = permutation(seed, STREAM_SHUFFLE, n_packed)[:n_select]
    order = [base] + [base[permutation(seed, STREAM_SHUFFLE, n_select, view=v)] for v in range(1, views)]
    sequence_index = np.concatenate(order).astype(np.int64)
    view = np.repeat(np.arange(views, dtype=np.uint8), n_select)
    return sequence_index, view


@dataclass(frozen=True)
class FieldSpec:
    """One array of a split: per-row shape, storage dtype and codec name."""

    name: str
    row_shape: tuple[int, ...]
    dtype: str
    codec: str
    logical_dtype: str | None = None
    """How to read the stored values when that differs from dtype (bfloat16 kept as uint16 bits)."""

    @property
    def row_bytes(self) -> int:
        return int(np.dtype(self.dtype).itemsize * np.prod(self.row_shape, dtype=np.int64))


def field_specs(
    length: int,
    k: int,
    n_temps: int,
    hidden_size: int,
    ids_dtype: str,
    logits_dtype: str,
    hidden_dtype: str,
    logits: str = "topk",
    n_samples: int = 0,
    hidden_codes: int = 0,
) -> list[FieldSpec]:
    """The public schema of a split (see docs/cache-format.md)."""
    index_dtype = "uint16" if ids_dtype == "uint16" else "int32"
    fields = [
        FieldSpec("input_ids", (length,), ids_dtype, "ids"),
        FieldSpec("labels", (length,), "int32", "labels"),
        FieldSpec("lengths", (), "int32", "small"),
        FieldSpec("sequence_index", (), "int64", "small"),
        FieldSpec("view", (), "uint8", "raw"),
    ]
    if logits != "none":
        fields.append(FieldSpec("logsumexp", (length, n_temps), "float32", "lse"))
    width, scales = stored_hidden_width(hidden_size, hidden_dtype, hidden_codes)
    stored, logical = storage_dtype(hidden_dtype)
    fields.append(FieldSpec("hidden", (length, width), stored, "raw", logical))
    if logits in ("topk", "both"):
        fields += [
            FieldSpec(
                "topk_values",
                (length, k),
                "float16" if logits_dtype == "float16" else "uint16",
                "values",
                None if logits_dtype == "float16" else "bfloat16",
            ),
            FieldSpec("topk_indices", (length, k), index_dtype, "indices"),
        ]
    if logits in ("sampled", "both"):
        fields += [
            FieldSpec("sample_ids", (length, n_samples), index_dtype, "indices"),
            FieldSpec("sample_counts", (length, n_samples), "uint8" if n_samples <= 255 else "uint16", "labels"),
        ]
    if scales is not None:  # per token (int8, pca) or per group of a token (4-bit)
        scale_shape = (length,) if hidden_dtype in ("int8", "pca") else (length, scales)
        fields.append(FieldSpec("hidden_scale", scale_shape, "float16", "lse"))
    return fields


@dataclass(frozen=True)
class SplitLayout:
    """Row and shard geometry of one split."""

    name: str
    sequences: int
    views: int
    block_rows: int
    shard_rows: int

    @property
    def rows(self) -> int:
        return self.sequences * self.views

    @property
    def shards(self) -> int:
        return -(-self.rows // self.shard_rows)

    @property
    def blocks(self) -> int:
        return -(-self.rows // self.block_rows)

    def shard_range(self, shard: int) -> tuple[int, int]:
        return shard * self.shard_rows, min((shard + 1) * self.shard_rows, self.rows)

    def to_dict(self) -> dict:
        return {**asdict(self), "rows": self.rows, "shards": self.shards}


def shard_rows_for(fields: list[FieldSpec], block_rows: int, shard_mb: int, rows: int) -> int:
    """Rows per shard so that the largest field's shard is about `shard_mb` MB (whole blocks)."""
    widest = max(f.row_bytes for f in fields)
    blocks = max(1, int(shard_mb * 1e6 // (widest * block_rows)))
    needed = -(-rows // block_rows)
    return block_rows * min(blocks, max(needed, 1))


def valid_positions(lengths, length: int):
    """(n, length) bool: the non-pad positions of cached rows (position < the row's `lengths`), the
    attention mask; a torch tensor for a tensor of lengths, else a numpy array."""
    import torch

    if isinstance(lengths, torch.Tensor):
        return torch.arange(length, device=lengths.device)[None, :] < lengths[:, None]
    return np.arange(length)[None, :] < np.asarray(lengths)[:, None]
