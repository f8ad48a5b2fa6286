"""Which positions KD distils (`loss.kd_tokens`, `loss.kd_fraction`): pure functions of the cached
teacher signals, the seed and the cache row (and the student, for `tip`), so resume stays exact.

Each row keeps the ceil(fraction x candidates) highest-scoring of its candidate positions
(`loss.kd_positions`: every non-pad token or the masked ones), so a selection never depends on
the micro-batch size or the process count. Scores, all at T = 1:
- `entropy`: the teacher's entropy H(p) (distil where the teacher is unsure; TIP's first signal);
- `confidence`: the teacher's top-1 probability (distil where the teacher is sure);
- `random`: a seeded uniform draw per (seed, view, sequence, position) — the control every score
  is measured against;
- `tip`: the student's cross-entropy against the teacher, H(p) + KL(p ‖ q): teacher entropy plus
  the current student's divergence (TIP, arXiv 2604.14084), from a gradient-free head pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from cache_format.rng import STREAM_KD_TOKENS, uniforms

KD_TOKENS = ("all", "entropy", "confidence", "random", "tip")
TEACHER_SCORES = ("entropy", "confidence", "tip")
"""Scores that need the teacher's full distribution (exact KD or the online teacher)."""

Logits = Callable[[int, int], torch.Tensor]
"""(first row, end row) -> (c, V) logits of those candidate rows."""


def keep_top(scores: torch.Tensor, candidates: torch.Tensor, fraction: float) -> torch.Tensor:
    """(B, L) bool: in each row, the ceil(fraction x its candidates) highest-scoring candidates
    (ties: the earlier position)."""
    keep = torch.ceil(candidates.sum(1).double() * fraction).long()
    ranked = scores.float().masked_fill(~candidates, -math.inf).argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(ranked).scatter_(1, ranked, torch.arange(scores.shape[1]).expand_as(ranked))
    return (rank < keep[:, None]) & candidates


def random_scores(seed: int, view: np.ndarray, sequence_index: np.ndarray, length: int) -> torch.Tensor:
    """(B, L) seeded uniforms of each (view, sequence, position): the same for a row whatever batch
    or process it lands in."""
    return torch.from_numpy(uniforms(seed, STREAM_KD_TOKENS, view, sequence_index, length))


@torch.no_grad()
def distribution_scores(kind: str, n: int, teacher: Logits, student: Logits | None, chunk_tokens: int) -> torch.Tensor:
    """(n,) float32 scores of n candidate rows from their teacher (and, for `tip`, student) logits,
    built `chunk_tokens` rows at a time."""
    out = []
    for a in range(0, n, chunk_tokens):
        b = min(a + chunk_tokens, n)
        log_p = F.log_softmax(teacher(a, b).float(), -1)
        p = log_p.exp()
        if kind == "confidence":
            score = p.amax(-1)
        elif kind == "entropy":
            score = -(p * log_p).sum(-1)
        else:  # tip: H(p, q) = H(p) + KL(p || q)
            assert student is not None, "tip needs the student's logits"
            score = -(p * F.log_softmax(student(a, b).float(), -1)).sum(-1)
        out.append(score)
    return torch.cat(out) if out else torch.zeros(0)
