"""How sure a delta between two variants is (pure functions, for `pipeline ablate`).

With several student seeds a delta is the mean of the per-seed differences (the same seed gives
both variants the same data order: the differences are paired) and its standard error is their
standard deviation / sqrt(N). With one seed, a paired bootstrap over the held-out tokens (or
downstream examples) both variants were evaluated on gives the standard error. A delta is
compared with the paper's only when it is resolved: |Δ| >= 2 SE.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from student_train.metrics import MASKED_METRICS

RESOLVED_SE = 2.0


def paired_delta(variant: list[float], baseline: list[float]) -> tuple[float, float]:
    """(mean of the per-seed differences, its standard error); SE is nan with one pair."""
    diffs = np.asarray(variant, float) - np.asarray(baseline, float)
    if not len(diffs) or not np.isfinite(diffs).all():
        return math.nan, math.nan
    se = float(diffs.std(ddof=1) / math.sqrt(len(diffs))) if len(diffs) > 1 else math.nan
    return float(diffs.mean()), se


def bootstrap_delta(
    metric: Callable[[dict[str, np.ndarray], np.ndarray], float],
    variant: dict[str, np.ndarray],
    baseline: dict[str, np.ndarray],
    n: int,
    rounds: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """(metric(variant) - metric(baseline), the standard deviation of that difference over `rounds`
    resamples of the n shared items, the same items for both: a paired bootstrap)."""
    everything = np.arange(n)
    delta = metric(variant, everything) - metric(baseline, everything)
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(rounds):
        idx = rng.integers(0, n, n)
        diffs.append(metric(variant, idx) - metric(baseline, idx))
    return float(delta), float(np.std(diffs, ddof=1))


TOKEN_METRICS = {name: m.from_tokens for name, m in MASKED_METRICS.items() if m.from_tokens is not None}
"""Held-out metrics as functions of the per-masked-token values `evaluate` saves (eval_tokens.npz)."""


def verdict(delta: float, se: float, paper: float, higher_is_better: bool) -> str:
    """agrees / disagrees with the paper's delta, or not resolved (|Δ| < 2 SE, or no SE)."""
    if math.isnan(se) or math.isnan(delta) or abs(delta) < RESOLVED_SE * se:
        return "not resolved (|Δ| < 2 SE)"
    ours = delta if higher_is_better else -delta
    return "agrees" if math.copysign(1.0, ours) == math.copysign(1.0, paper) else "disagrees"
