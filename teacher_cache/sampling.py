"""Sampled sparse teacher logits (RS-KD, Anshumann et al., ACL 2025): draws with counts.

Per position, `n` tokens are drawn with replacement from softmax(z / T) by inverse-CDF
sampling against counter-based uniforms (`rng.uniforms`), so the draws are a pure function of
(seed, sequence, view, position) whatever the batch size. The distinct ids are stored with
their counts; counts / n is an unbiased estimate of the teacher's distribution, which makes
sum_i (c_i / n) * -log q_i an unbiased estimate of the cross-entropy (and of the KL's gradient).
"""

from __future__ import annotations

import numpy as np
import torch

from cache_format.rng import STREAM_SAMPLES, uniforms


def sample_uniforms(seed: int, sequence_index: np.ndarray, view: np.ndarray, length: int, n_samples: int) -> np.ndarray:
    """(rows, length, n_samples) float32 uniforms for the draws of every position."""
    u = uniforms(seed, STREAM_SAMPLES, view, sequence_index, length * n_samples).astype(np.float32)
    np.minimum(u, np.nextafter(np.float32(1), np.float32(0)), out=u)  # float32 rounding may reach 1
    return u.reshape(len(sequence_index), length, n_samples)


def sample_counts(logits: torch.Tensor, u: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(m, V) logits and (m, n) uniforms -> distinct drawn ids (m, n) and their counts (m, n).

    Ids are ascending per row and packed to the left; unused slots hold id 0 and count 0.
    Does not modify `logits`.
    """
    z = logits.float() / temperature
    cdf = z.sub_(z.max(-1, keepdim=True).values).exp_().cumsum_(-1)  # in place on the fresh z; unnormalised
    target = u.to(cdf.device, cdf.dtype) * cdf[:, -1:]
    drawn = torch.searchsorted(cdf, target).clamp_(max=logits.shape[-1] - 1)
    drawn, _ = drawn.sort(-1)
    starts = torch.ones_like(drawn, dtype=torch.bool)
    starts[:, 1:] = drawn[:, 1:] != drawn[:, :-1]
    slot = starts.long().cumsum(-1) - 1  # slot of each draw's distinct id
    ids = torch.zeros_like(drawn).scatter_(-1, slot, drawn)
    counts = torch.zeros_like(drawn).scatter_add_(-1, slot, torch.ones_like(drawn))
    return ids, counts
