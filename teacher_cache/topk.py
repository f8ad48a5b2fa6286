"""Top-k logits plus the full-vocabulary log-sum-exp at several temperatures, fused and chunked.

With lse_T = logsumexp(z / T) stored beside the top-k values, stage two gets each top-k token's
exact probability p_T(i) = exp(z_i / T - lse_T) and the tail's exact total mass. The teacher's
MLM head runs here chunk by chunk so that the full (tokens, vocab) logits never exist at once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from teacher_cache.sampling import sample_counts

SAFE_EXPONENT = 60.0
"""exp(60) * 2^24 vocabulary entries stays far below float32's max (3.4e38), and exp(-60)
stays a normal float: within this range the log-sum-exp needs no max subtraction."""


def topk_logsumexp(
    logits: torch.Tensor, k: int, temperatures: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(n, V) logits -> top-k values (n, k) fp32, ids (n, k), log-sum-exp (n, T) fp32.

    Consumes ``logits`` (it is overwritten to save a pass over memory).
    """
    logits = logits.float()
    values, indices = logits.topk(k, dim=-1)  # (n, k), sorted descending
    peak = values[:, :1].clone()  # (n, 1): the row max
    if logits.is_cuda or float(peak.abs().max()) > SAFE_EXPONENT * min(temperatures):
        shifted = logits.sub_(peak)  # (n, V), all <= 0: exp cannot overflow
    else:  # |z / T| <= 60 for the row maxima: exp(z / T) cannot overflow and the dominant
        peak = torch.zeros_like(peak)  # terms stay normal floats, so the shift pass is skipped
        shifted = logits
    sums = _sum_exp(shifted, temperatures)  # (n, T)
    inv_t = torch.tensor([1.0 / t for t in temperatures], device=logits.device)
    lse = peak * inv_t + sums.log()
    return values, indices, lse


def _sum_exp(shifted: torch.Tensor, temperatures: Sequence[float]) -> torch.Tensor:
    """(n, T) sums over the vocabulary of exp(shifted / T), overwriting `shifted`.

    exp(x / T)^2 = exp(x / (T/2)): temperatures form halving chains (e.g. [2, 1]) that share
    one exp pass, squared in place for each next link. Work happens in place because a fresh
    (chunk, vocab) tensor per step costs as much as the exp itself (measured on CPU).
    """
    temps = set(temperatures)
    roots = sorted((t for t in temps if 2.0 * t not in temps), reverse=True)
    sums: dict[float, torch.Tensor] = {}
    for n, root in enumerate(roots):
        x = shifted if n == len(roots) - 1 else shifted.clone()  # the last chain may consume it
        e = (x if root == 1.0 else x.mul_(1.0 / root)).exp_()
        t = root
        while True:
            sums[t] = e.sum(-1)
            if t / 2.0 not in temps:
                break
            e.square_()
            t /= 2.0
    return torch.stack([sums[t] for t in temperatures], dim=-1)


def chunked_logit_stats(
    logits_of: Callable[[int, int], torch.Tensor],
    n: int,
    k: int,
    temperatures: Sequence[float],
    chunk_tokens: int,
    draws: tuple[torch.Tensor, float] | None = None,
) -> tuple[torch.Tensor, ...]:
    """Reduce the logits of n positions, produced chunk by chunk by ``logits_of(start, stop)``
    (e.g. the MLM head on those hidden states), to top-k values (n, k) fp32, ids (n, k) int64,
    log-sum-exp (n, T) fp32 and, given ``draws`` = ((n, S) uniforms, temperature), the sampled
    ids and counts (n, S) int64 (see `sampling.sample_counts`)."""
    first = logits_of(0, min(chunk_tokens, n)) if n else None
    dev = first.device if first is not None else torch.device("cpu")
    out = [
        torch.empty(n, k, dtype=torch.float32, device=dev),
        torch.empty(n, k, dtype=torch.int64, device=dev),
        torch.empty(n, len(temperatures), dtype=torch.float32, device=dev),
    ]
    if draws is not None:
        out += [torch.empty(n, draws[0].shape[-1], dtype=torch.int64, device=dev) for _ in range(2)]
    for start in range(0, n, chunk_tokens):
        stop = min(start + chunk_tokens, n)
        logits = first if start == 0 else logits_of(start, stop)
        parts: tuple[torch.Tensor, ...] = ()
        if draws is not None:  # before topk_logsumexp, which consumes the logits
            parts = sample_counts(logits, draws[0][start:stop], draws[1])
        parts = (*topk_logsumexp(logits, k, temperatures), *parts)
        for buf, part in zip(out, parts, strict=True):
            buf[start:stop] = part
    return tuple(out)
