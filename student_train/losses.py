"""Distillation losses (pure functions of tensors): KD in five modes, MLM, cosine.

Every KD function returns the per-token KL(teacher || student) at temperature T, multiplied by
T^2 (Hinton et al.; keeps gradient scale comparable across T), for (n, V) student logits of the
n positions being distilled.

- `kd_topk_tail`: the cache's top-k logits plus their log-sum-exp give the teacher's exact
  probabilities of k tokens and of everything else (one tail bucket); the student is
  coarsened the same way. This is the exact KL between the two (k+1)-bucket distributions,
  a lower bound of the full KL (coarse-graining never increases KL) that equals it at k = V.
- `kd_topk_renorm`: the teacher renormalised over its top-k, against the student's full
  softmax at those ids (what most sparse-KD tools do; biased, kept for comparison).
- `kd_sampled`: RS-KD (Anshumann et al., ACL 2025): tokens drawn from the teacher at T with
  their counts; sum_i (c_i / n) * -log q_i is an unbiased estimate of the cross-entropy
  H(p, q) = KL(p || q) + H(p), so its gradient is an unbiased estimate of the KL's. Its value
  is offset from the KL by the teacher's entropy (a constant of the student).
- `kd_topk_sampled`: the exact KL terms of the top-k plus the tail's cross-entropy estimated
  from the draws outside the top-k: unbiased like `kd_sampled`, with only the tail noisy.
- `kd_full` / `kd_exact`: the full-vocabulary KL; `exact` rebuilds the teacher logits from
  cached hidden states through the cached MLM head, in row chunks to bound memory.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cache_format.settings import IGNORE_INDEX


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
    head_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """(n,) full KL with teacher logits rebuilt as head(hidden) chunk by chunk (any T), fused.

    Each chunk's teacher logits live only inside the forward pass: the (n, V) tensor kept for
    backward is the gradient direction q - p, written over the student's own softmax pass (no
    teacher log-probabilities, no autograd copies). `head_dtype` is the dtype the head's GEMM
    runs in (bfloat16 on GPU: logits to ~3 significant digits, measured in docs/results/fidelity.md).
    """
    return _ExactKL.apply(student_logits, teacher_hidden, head, temperature, chunk_tokens, head_dtype)


class _ExactKL(torch.autograd.Function):
    """Per chunk, with t = head(h) / T and s = logits / T each shifted by its row max (so exp
    cannot overflow): KL = sum_v p (t - s) - log Z_t + log Z_s (as sum p = 1). Backward needs only
    q - p: it is kept as Z_s (q - p) = e^s - (Z_s / Z_t) e^t, written over the student's own
    exp pass, and backward scales each row by T / Z_s. Scale and shift are one pass per side, the
    teacher's straight from the head's (bf16) output."""

    @staticmethod
    def forward(ctx, logits, hidden, head, temperature, chunk_tokens, head_dtype):
        inv_t = 1.0 / temperature
        diff = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)  # becomes Z_s (q - p)
        kl = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        z_s = torch.empty_like(kl)
        for a in range(0, logits.shape[0], chunk_tokens):
            b = min(a + chunk_tokens, logits.shape[0])
            with torch.no_grad():
                raw = head(hidden[a:b].to(head_dtype))  # (c, V)
            # reused float32 buffers: a fresh (c, V) tensor per chunk costs more than the pass itself
            t = _shift_scale_(_WORKSPACE.get("t", raw.shape, logits.device).copy_(raw), inv_t)
            del raw
            p = torch.exp(t, out=_WORKSPACE.get("p", t.shape, logits.device))  # unnormalised, largest term 1
            z_t = p.sum(-1)
            s = _shift_scale_(diff[a:b].copy_(logits[a:b].detach()), inv_t)
            pv = p.unsqueeze(1)
            dot = torch.bmm(pv, t.unsqueeze(2)).view(-1) - torch.bmm(pv, s.unsqueeze(2)).view(-1)
            e = s.exp_()  # the student's unnormalised softmax, in the buffer
            z_s[a:b] = e.sum(-1)
            kl[a:b] = dot / z_t - z_t.log() + z_s[a:b].log()
            e.addcmul_(p, (-z_s[a:b] / z_t)[:, None])  # Z_s (q - p)
        ctx.save_for_backward(diff, z_s)
        ctx.temperature, ctx.dtype = temperature, logits.dtype
        return kl * temperature**2

    @staticmethod
    def backward(ctx, grad_out):
        diff, z_s = ctx.saved_tensors
        grad = diff.mul_((grad_out.float() * ctx.temperature / z_s)[:, None])  # diff is not needed any more
        return grad.to(ctx.dtype), None, None, None, None, None


def _shift_scale_(x: torch.Tensor, scale: float) -> torch.Tensor:
    """x <- scale * (x - max(x)) per row, in place: exp of it cannot overflow, its largest term is 1."""
    peak = x.amax(-1, keepdim=True)
    return torch.add(peak * -scale, x, alpha=scale, out=x)


class _Buffers:
    """Grow-only float32 scratch tensors, reused across calls (one training step at a time)."""

    def __init__(self) -> None:
        self._store: dict[tuple[str, torch.device], torch.Tensor] = {}

    def get(self, name: str, shape: torch.Size, device: torch.device) -> torch.Tensor:
        n = math.prod(shape)
        buf = self._store.get((name, device))
        if buf is None or buf.numel() < n:
            buf = self._store[(name, device)] = torch.empty(n, dtype=torch.float32, device=device)
        return buf[:n].view(shape)


_WORKSPACE = _Buffers()


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
    log_p_top, p_tail = teacher_topk_log_probs(values, lse, temperature)
    return _TopkTailKL.apply(student_logits, log_p_top, p_tail, indices, temperature)


class _TopkTailKL(torch.autograd.Function):
    """Fused bucket KL: one exp pass over the (n, V) student logits forward, one scaling pass
    backward, with the analytic gradient T * (q_j - p_j) on the k tokens and
    T * q_j * (1 - P_tail / Q_tail) on the rest (a third of the memory passes of autograd).

    Q_tail is summed over the tail's own terms (no 1 - sum(q_top) cancellation); rows whose
    whole tail underflows float32 fall back to an exact log-sum-exp over their tail logits.
    """

    @staticmethod
    def forward(ctx, logits, log_p_top, p_tail, indices, temperature):
        s = logits.detach().float() / temperature  # (n, V): becomes exp(s - m) in place
        m = s.max(-1, keepdim=True).values
        e = s.sub_(m).exp_()
        total = e.sum(-1)  # (n,)
        log_total = total.log()
        # from the logits, not log(e): a top-k token far below the max must not underflow to -inf
        log_q_top = logits.detach().gather(-1, indices).float() / temperature - m - log_total[:, None]
        has_tail = indices.shape[-1] < e.shape[-1]
        if has_tail:
            tail = e.scatter(-1, indices, 0.0).sum(-1) if e.shape[0] else total
            log_q_tail = tail.log() - log_total
            lost = (tail == 0) & (p_tail > 0)  # the tail underflowed: exact per row
            if bool(lost.any()):
                z = logits.detach()[lost].float() / temperature
                rest = z.scatter(-1, indices[lost], float("-inf"))
                log_q_tail[lost] = rest.logsumexp(-1) - z.logsumexp(-1)
        else:
            log_q_tail = torch.zeros_like(total)
        p_top = log_p_top.exp()
        kl = (p_top * (log_p_top - log_q_top)).sum(-1)
        tail_term = torch.xlogy(p_tail, p_tail) - p_tail * log_q_tail
        kl = kl + torch.where(p_tail > 0, tail_term, torch.zeros_like(tail_term))
        ctx.save_for_backward(e, total, p_top, log_q_top, p_tail, log_q_tail, indices, logits.detach())
        ctx.temperature, ctx.has_tail, ctx.dtype = temperature, has_tail, logits.dtype
        return kl * temperature**2

    @staticmethod
    def backward(ctx, grad_out):
        e, total, p_top, log_q_top, p_tail, log_q_tail, indices, logits = ctx.saved_tensors
        T = ctx.temperature
        g = grad_out.float() * T  # d(kl * T^2)/d(logit) = T * d kl / d s
        q_top = log_q_top.exp()
        # tail tokens: T * q_j * (1 - P_tail / Q_tail); q_j = e_j / total, Q_tail = exp(log_q_tail)
        ratio = torch.where(p_tail > 0, p_tail * torch.exp(-log_q_tail), torch.zeros_like(p_tail))
        scale = (1.0 - ratio) / total if ctx.has_tail else 1.0 / total
        grad = e.mul_((scale * g)[:, None])  # e is not needed any more: reuse its memory
        grad.scatter_(-1, indices, (q_top - p_top) * g[:, None])
        huge = ratio > 1e30  # underflowed tails: q_j * ratio overflowed; recompute those rows exactly
        if bool(huge.any()):
            z = logits[huge].float() / T
            rest = z.scatter(-1, indices[huge], float("-inf"))
            within = torch.exp(rest - rest.logsumexp(-1, keepdim=True))  # q_j / Q_tail on the tail
            q = torch.softmax(z, -1)
            rows = (q - p_tail[huge, None] * within) * g[huge, None]
            grad[huge] = rows.scatter(-1, indices[huge], (q_top[huge] - p_top[huge]) * g[huge, None])
        return grad.to(ctx.dtype), None, None, None, None


def kd_topk_renorm(
    student_logits: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, temperature: float
) -> torch.Tensor:
    """(n,) sum_i p~_i (log p~_i - log q_i) * T^2: teacher renormalised over its top-k ids,
    student's full softmax at those ids (the usual sparse-KD loss; ignores the tail)."""
    log_p = F.log_softmax(values.float() / temperature, dim=-1)  # (n, k)
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1).gather(-1, indices)
    return (log_p.exp() * (log_p - log_q)).sum(-1) * temperature**2


def kd_sampled(
    student_logits: torch.Tensor, ids: torch.Tensor, counts: torch.Tensor, temperature: float
) -> torch.Tensor:
    """(n,) sum_i (c_i / sum c) * -log softmax(s / T)_i * T^2 over each position's sampled ids
    (n, S); slots with count 0 are padding. Rows without samples give 0."""
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1).gather(-1, ids)  # (n, S)
    counts = counts.float()
    weights = counts / counts.sum(-1, keepdim=True).clamp_min(1.0)
    return -(weights * log_q).sum(-1) * temperature**2


def kd_topk_sampled(
    student_logits: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    lse: torch.Tensor,
    ids: torch.Tensor,
    counts: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """(n,) hybrid KD: the exact KL terms of the k cached top tokens, plus the tail's cross-entropy
    estimated from the cached teacher draws that fell outside the top-k, * T^2.

    A draw x ~ p lands in the tail with probability P_tail, so (1/n) sum over tail draws of
    -log q_x is an unbiased estimate of -sum_tail p_j log q_j: the whole gradient is unbiased,
    and only the tail is noisy (the draws that hit the top-k cost nothing). The value estimates
    KL + T^2 * H_tail (the tail's share of the teacher entropy), as `kd_sampled` includes T^2 * H.
    """
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)  # (n, V)
    log_p_top, _ = teacher_topk_log_probs(values, lse, temperature)
    top = (log_p_top.exp() * (log_p_top - log_q.gather(-1, indices))).sum(-1)
    counts = counts.float()
    in_tail = (ids[:, :, None] != indices[:, None, :]).all(-1)  # (n, S): the draw is not a top-k id
    weights = counts * in_tail / counts.sum(-1, keepdim=True).clamp_min(1.0)
    return (top - (weights * log_q.gather(-1, ids)).sum(-1)) * temperature**2


def kd_sampled_std(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float, n_samples: int
) -> torch.Tensor:
    """(n,) standard deviation of `kd_sampled` over independent sets of `n_samples` draws from the
    teacher at T: the estimate is a mean of n draws of -log q_x * T^2, so it is
    T^2 * sqrt(Var_{x ~ p}[log q_x] / n). The price of RS-KD's small cache, per position."""
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    p = F.softmax(teacher_logits.float() / temperature, dim=-1)
    mean = (p * log_q).sum(-1, keepdim=True)
    var = (p * (log_q - mean).square()).sum(-1)
    return (var / n_samples).sqrt() * temperature**2


@dataclass(frozen=True)
class ExactHead:
    """The cached MLM head as `exact` KD uses it: the module, its GEMM dtype, rows per chunk."""

    head: Callable[[torch.Tensor], torch.Tensor]
    dtype: torch.dtype = torch.float32
    chunk_tokens: int = 1024


KDLoss = Callable[[torch.Tensor, Mapping[str, torch.Tensor], float, "ExactHead | None"], torch.Tensor]

KD_LOSSES: dict[str, KDLoss] = {
    "exact": lambda s, t, T, h: kd_exact(s, t["hidden"], h.head, T, h.chunk_tokens, h.dtype),
    "sampled": lambda s, t, T, h: kd_sampled(s, t["sample_ids"], t["sample_counts"], T),
    "topk_tail": lambda s, t, T, h: kd_topk_tail(s, t["topk_values"], t["topk_indices"], t["logsumexp"], T),
    "topk_renorm": lambda s, t, T, h: kd_topk_renorm(s, t["topk_values"], t["topk_indices"], T),
    "topk_sampled": lambda s, t, T, h: kd_topk_sampled(
        s, t["topk_values"], t["topk_indices"], t["logsumexp"], t["sample_ids"], t["sample_counts"], T
    ),
}
"""Per-token KD of each mode (cache_format.kd_modes.KD_MODES) from (n, V) student logits and the
teacher fields the mode reads (decoded, at the same n positions)."""


def mlm_loss(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy against the original tokens at masked positions (labels != -100)."""
    return F.cross_entropy(
        student_logits.float().reshape(-1, student_logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX
    )


def cosine_loss(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor) -> torch.Tensor:
    """(n,) 1 - cos(student, teacher) per position (CosineEmbeddingLoss with target 1)."""
    return 1.0 - F.cosine_similarity(student_hidden.float(), teacher_hidden.float(), dim=-1)
