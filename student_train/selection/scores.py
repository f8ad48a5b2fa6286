"""The math of sequence selection (pure functions): per-token signals from logits, their sums per
row, means per sequence over its mask views, and which sequences a fraction keeps."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def label_log_probs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(n,) float32 log-probability (T = 1) of each position's label under (n, V) logits."""
    return -F.cross_entropy(logits.float(), labels, reduction="none")


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """(n,) float32 entropy (T = 1) of each position's distribution."""
    log_p = F.log_softmax(logits.float(), -1)
    return -(log_p.exp() * log_p).sum(-1)


def per_row(values: torch.Tensor, rows: torch.Tensor, n_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """(sum, count) float64 of per-position `values` over the rows they belong to (`rows`, (n,))."""
    sums = torch.zeros(n_rows, dtype=torch.float64, device=values.device)
    sums.index_add_(0, rows, values.double())
    counts = torch.bincount(rows, minlength=n_rows).double()
    return sums.cpu().numpy(), counts.cpu().numpy()


def per_sequence(
    sequence_index: np.ndarray, sums: np.ndarray, counts: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sequences (ascending), their mean score over every view's tokens, each row's position in
    `sequences`): a sequence is scored over all its views together; one without a scored token
    scores NaN."""
    sequences, where = np.unique(sequence_index, return_inverse=True)
    total = np.bincount(where, weights=sums, minlength=len(sequences))
    count = np.bincount(where, weights=counts, minlength=len(sequences))
    with np.errstate(invalid="ignore", divide="ignore"):
        score = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    return sequences, score, where


def keep_sequences(score: np.ndarray, sequences: np.ndarray, fraction: float, highest: bool) -> np.ndarray:
    """(N,) bool: the ceil(fraction x N) best-scoring sequences (ties: the lower sequence index;
    NaN scores rank last either way)."""
    keep = math.ceil(len(score) * fraction - 1e-9)
    key = np.where(np.isnan(score), np.inf, -score if highest else score)
    order = np.lexsort((sequences, key))  # the last key sorts first
    kept = np.zeros(len(score), dtype=bool)
    kept[order[:keep]] = True
    return kept
