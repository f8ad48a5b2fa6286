"""Distillation losses (pure functions of tensors): KD in three modes, MLM, cosine.

Every KD function returns the per-token KL(teacher || student) at temperature T, multiplied by
T^2 (Hinton et al.; keeps gradient scale comparable across T), for (n, V) student logits of the
n positions being distilled.

- `kd_topk_tail`: the cache's top-k logits plus their log-sum-exp give the teacher's exact
  probabilities of k tokens and of everything else (one tail bucket); the student is
  coarsened the same way. This is the exact KL between the two (k+1)-bucket distributions,
  a lower bound of the full KL (coarse-graining never increases KL) that equals it at k = V.
- `kd_topk_renorm`: the teacher renormalised over its top-k, against the student's full
  softmax at those ids (what most sparse-KD tools do; biased, kept for comparison).
- `kd_full` / `kd_exact`: the full-vocabulary KL; `exact` rebuilds the teacher logits from
  cached hidden states through the cached MLM head, in row chunks to bound memory.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def kd_full(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """(n,) KL(softmax(t/T) || softmax(s/T)) * T^2 over the full vocabulary."""
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1) * temperature**2


def kd_exact(
    student_logits: torch.Tensor,
    teacher_hidden: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    temperature: float,
    chunk_tokens: int = 1024,
) -> torch.Tensor:
    """(n,) full KL with teacher logits rebuilt as head(hidden), chunk by chunk (any T)."""
    parts = []
    for start in range(0, student_logits.shape[0], chunk_tokens):
        stop = start + chunk_tokens
        with torch.no_grad():
            teacher_logits = head(teacher_hidden[start:stop].float())
        parts.append(kd_full(student_logits[start:stop], teacher_logits, temperature))
    return torch.cat(parts) if parts else student_logits.new_zeros(0)


def teacher_topk_log_probs(
    values: torch.Tensor, lse: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher (n, k) log-probabilities of the top-k ids and (n,) tail probability at T.

    Stored values are rounded (fp16/bf16), so the k probabilities can sum to a hair above 1:
    the k + 1 buckets are renormalised to sum to exactly 1.
    """
    log_p = values.float() / temperature - lse.float().unsqueeze(-1)  # (n, k)
    top = log_p.exp().sum(-1)
    tail = (1.0 - top).clamp_min(0.0)
    total = top + tail  # 1, or slightly more after rounding
    return log_p - total.log().unsqueeze(-1), tail / total


def kd_topk_tail(
    student_logits: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    lse: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """(n,) exact KL between teacher and student (k+1)-bucket coarsenings at T, * T^2.

    values/indices: (n, k) cached top-k logits and ids; lse: (n,) cached log-sum-exp at T.
    """
    s = student_logits.float() / temperature  # (n, V)
    s_lse = torch.logsumexp(s, dim=-1)  # (n,)
    log_q_top = s.gather(-1, indices) - s_lse.unsqueeze(-1)  # (n, k)
    log_p_top, p_tail = teacher_topk_log_probs(values, lse, temperature)
    kl = (log_p_top.exp() * (log_p_top - log_q_top)).sum(-1)
    if indices.shape[-1] < s.shape[-1]:  # k < V: there is a tail bucket
        rest = s.scatter(-1, indices, float("-inf"))  # the student's logits outside the top-k
        log_q_tail = torch.logsumexp(rest, dim=-1) - s_lse  # stable even when the tail is tiny
        tail_term = torch.xlogy(p_tail, p_tail) - p_tail * log_q_tail
        kl = kl + torch.where(p_tail > 0, tail_term, torch.zeros_like(tail_term))
    return kl * temperature**2


def kd_topk_renorm(
    student_logits: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, temperature: float
) -> torch.Tensor:
    """(n,) sum_i p~_i (log p~_i - log q_i) * T^2: teacher renormalised over its top-k ids,
    student's full softmax at those ids (the usual sparse-KD loss; ignores the tail)."""
    log_p = F.log_softmax(values.float() / temperature, dim=-1)  # (n, k)
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1).gather(-1, indices)
    return (log_p.exp() * (log_p - log_q)).sum(-1) * temperature**2


def mlm_loss(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy against the original tokens at masked positions (labels != -100)."""
    return F.cross_entropy(
        student_logits.float().reshape(-1, student_logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX
    )


def cosine_loss(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor) -> torch.Tensor:
    """(n,) 1 - cos(student, teacher) per position (CosineEmbeddingLoss with target 1)."""
    return 1.0 - F.cosine_similarity(student_hidden.float(), teacher_hidden.float(), dim=-1)
