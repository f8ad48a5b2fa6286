"""Deterministic BERT masking: the mask of (seed, view, sequence index) is a pure function.

Randomness comes from a counter-based hash of (seed, stream, view, sequence index, position)
(`rng.uniforms`), never from a stateful generator, so a sequence gets the same mask whatever
the batch it lands in, the number of processes, the order of work or the resume point.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cache_format.rng import STREAM_ACTION, STREAM_RANDOM, STREAM_SELECT, uniforms
from cache_format.settings import IGNORE_INDEX


def token_counts(sequences: np.ndarray, vocab_size: int, rows: int = 65_536) -> np.ndarray:
    """Occurrences of every token id in a (N, L) corpus array (int64, length vocab_size), counted
    `rows` rows at a time: a memory-mapped corpus is never widened to int64 whole."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for a in range(0, len(sequences), rows):
        block = np.asarray(sequences[a : a + rows]).ravel()
        counts += np.bincount(block, minlength=vocab_size)[:vocab_size]
    return counts


def selection_weights(
    vocab_size: int,
    special_ids: Sequence[int],
    counts: np.ndarray | None = None,
    smoothing: float = 0.0,
) -> np.ndarray:
    """Per-token-id weight of being chosen: max(count, 1)^-smoothing, 0 for special ids.

    smoothing 0 gives uniform choice among non-special tokens; 0.7 is DistilBERT's smoothing,
    which masks rare tokens more often than frequent ones.
    """
    if smoothing and counts is None:
        raise ValueError("smoothing needs token counts")
    if smoothing:
        weights = np.maximum(np.asarray(counts, dtype=np.float64), 1.0) ** -smoothing
    else:
        weights = np.ones(vocab_size, dtype=np.float64)
    weights[list(special_ids)] = 0.0
    return weights


@dataclass(frozen=True)
class MaskSpec:
    """Resolved masking parameters for one tokenizer and corpus."""

    mask_prob: float
    mask_token_prob: float
    random_token_prob: float
    mask_id: int
    weights: np.ndarray
    """(V,) selection weight per token id; 0 means never chosen (special and pad tokens)."""
    random_ids: np.ndarray
    """Token ids a random replacement is drawn from (all non-special ids)."""


def make_spec(
    vocab_size: int,
    special_ids: Sequence[int],
    mask_id: int,
    mask_prob: float = 0.15,
    mask_token_prob: float = 0.8,
    random_token_prob: float = 0.1,
    counts: np.ndarray | None = None,
    smoothing: float = 0.0,
) -> MaskSpec:
    weights = selection_weights(vocab_size, special_ids, counts, smoothing)
    random_ids = np.setdiff1d(np.arange(vocab_size), np.asarray(list(special_ids)))
    return MaskSpec(mask_prob, mask_token_prob, random_token_prob, mask_id, weights, random_ids)


def mask_batch(
    input_ids: np.ndarray, seq_ids: np.ndarray, view: int | np.ndarray, seed: int, spec: MaskSpec
) -> tuple[np.ndarray, np.ndarray]:
    """Mask (n, L) sequences; returns (masked input ids, labels with IGNORE_INDEX off-target).

    `seq_ids` (n,) are the sequences' corpus indices and `view` the view of each (or of all).

    Each row gets exactly max(1, round(mask_prob * candidates)) targets, drawn without
    replacement with probability proportional to the token weights (Gumbel top-k, i.e.
    sequential weighted sampling). Targets become the mask token, a random token or stay.
    """
    ids = np.asarray(input_ids)
    length = ids.shape[1]
    weights = spec.weights[ids]  # (n, L)
    candidate = weights > 0
    n_cand = candidate.sum(axis=1)
    n_target = np.where(n_cand > 0, np.maximum(1, np.rint(spec.mask_prob * n_cand)), 0).astype(int)

    u = uniforms(seed, STREAM_SELECT, view, seq_ids, length)
    with np.errstate(divide="ignore"):
        keys = np.where(candidate, np.log(weights) - np.log(-np.log(u)), -np.inf)
    ranks = np.argsort(np.argsort(-keys, axis=1, kind="stable"), axis=1, kind="stable")
    chosen = (ranks < n_target[:, None]) & candidate

    action = uniforms(seed, STREAM_ACTION, view, seq_ids, length)
    pick = uniforms(seed, STREAM_RANDOM, view, seq_ids, length)
    random_tok = spec.random_ids[(pick * len(spec.random_ids)).astype(np.int64)]
    to_mask = chosen & (action < spec.mask_token_prob)
    to_random = chosen & ~to_mask & (action < spec.mask_token_prob + spec.random_token_prob)

    masked = ids.copy()
    masked[to_mask] = spec.mask_id
    masked[to_random] = random_tok[to_random].astype(ids.dtype)
    labels = np.where(chosen, ids.astype(np.int32), IGNORE_INDEX)  # int32 first: -100 must not wrap
    return masked, labels
