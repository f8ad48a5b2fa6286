"""Counter-based randomness: pure functions of (seed, stream, view, index, position).

A splitmix64 hash replaces stateful generators wherever results must not depend on batch
size, process count, order of work or library versions (masks, shuffles, held-out splits).
"""

from __future__ import annotations

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)

STREAM_SELECT, STREAM_ACTION, STREAM_RANDOM = 1, 2, 3
"""Masking streams: which tokens are targets, what happens to them, which random token."""
STREAM_SHUFFLE, STREAM_EVAL_SPLIT = 4, 5
"""Corpus streams: the order of sequences, which documents are held out."""
STREAM_BLOCKS, STREAM_ROWS = 6, 7
"""Training streams: the order of blocks in an epoch, the order of rows in a group of blocks."""
STREAM_SAMPLES = 8
"""Sampled teacher logits: the uniforms behind each position's draws."""
STREAM_TASK = 9
"""Downstream tasks: the seeded hold-out, subsets and example order of `pipeline finetune`."""
STREAM_FIT = 10
"""Fitted hidden codecs: the pilot tokens k-means starts from."""
STREAM_KD_TOKENS = 11
"""Token selection: the uniforms of `loss.kd_tokens: random`."""
STREAM_SEQUENCES = 12
"""Sequence selection: the uniforms of `pipeline select --score random`."""


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a bijection on uint64 with full avalanche."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def uniforms(seed: int, stream: int, view: int | np.ndarray, ids: np.ndarray, length: int) -> np.ndarray:
    """(n, length) float64 uniforms in (0, 1), a pure function of every argument and position.

    `view` is one view for all rows or an (n,) array of per-row views.
    """
    with np.errstate(over="ignore"):
        key = _mix64(np.array([seed], dtype=np.uint64) + _GOLDEN * np.uint64(stream))
        key = _mix64(key ^ np.asarray(view, dtype=np.uint64))  # (1,) or (n,)
        rows = _mix64(key ^ np.asarray(ids, dtype=np.uint64))  # (n,)
        pos = np.arange(1, length + 1, dtype=np.uint64) * _GOLDEN  # (L,)
        bits = _mix64(rows[:, None] + pos[None, :])  # (n, L)
    # 53 high bits -> [0, 1); the half-ulp offset keeps log(u) finite.
    return ((bits >> np.uint64(11)).astype(np.float64) + 0.5) / float(1 << 53)


def permutation(seed: int, stream: int, n: int, view: int = 0) -> np.ndarray:
    """A seeded permutation of range(n) (int64), stable across numpy versions and platforms."""
    keys = uniforms(seed, stream, view, np.arange(n), 1)[:, 0]
    return np.argsort(keys, kind="stable").astype(np.int64)


def derive_seed(*values: int) -> int:
    """A 63-bit seed that is a pure function of several integers (e.g. seed, epoch, stream, group)."""
    key = np.array([len(values)], dtype=np.uint64)
    with np.errstate(over="ignore"):
        for v in values:
            key = _mix64(key * _GOLDEN + np.uint64(v & 0xFFFFFFFFFFFFFFFF))
    return int(key[0] >> np.uint64(1))
