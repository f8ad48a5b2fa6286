import copy

import pytest
import torch
import torch.nn.functional as F

from student_train import losses
from teacher_cache.topk import topk_logsumexp

V = 97


def teacher_cache_of(teacher_logits: torch.Tensor, k: int, temperature: float, dtype=torch.float32):
    """What stage one stores for these logits: top-k values (rounded to dtype), ids, lse at T."""
    values, indices, lse = topk_logsumexp(teacher_logits.clone(), k, [temperature])
    return values.to(dtype).float(), indices, lse[:, 0]


def bucket_kl(student_logits, teacher_logits, indices, temperature):
    """Reference: explicit (k+1)-bucket distributions from the full softmaxes, KL between them."""
    p = F.softmax(teacher_logits.double() / temperature, -1)
    s = student_logits.double() / temperature
    p_top = p.gather(-1, indices)
    P = torch.cat([p_top, (1 - p_top.sum(-1, keepdim=True)).clamp_min(0)], -1)
    log_q = s.log_softmax(-1)
    # the student's tail mass as its own log-sum-exp: no 1 - sum(q_top) cancellation
    log_q_tail = s.scatter(-1, indices, float("-inf")).logsumexp(-1, keepdim=True) - s.logsumexp(-1, keepdim=True)
    log_Q = torch.cat([log_q.gather(-1, indices), log_q_tail.clamp_min(-1e300)], -1)
    return (torch.xlogy(P, P) - P * log_Q).sum(-1) * temperature**2


@pytest.fixture
def logits():
    torch.manual_seed(0)
    return torch.randn(64, V) * 3, torch.randn(64, V) * 3


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_k_equal_vocab_topk_tail_equals_exact_equals_full(logits, temperature):
    student, teacher = logits
    values, indices, lse = teacher_cache_of(teacher, V, temperature)
    full = losses.kd_full(student, teacher, temperature)
    tail = losses.kd_topk_tail(student, values, indices, lse, temperature)
    head = torch.nn.Identity()
    exact = losses.kd_exact(student, teacher, head, temperature, chunk_tokens=7)
    torch.testing.assert_close(tail, full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(exact, full, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("k", [1, 5, 20, 96])
@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_topk_tail_is_the_bucket_kl_and_a_lower_bound_of_the_full_kl(logits, k, temperature):
    student, teacher = logits
    student = student.clone().requires_grad_(True)
    values, indices, lse = teacher_cache_of(teacher, k, temperature)
    tail = losses.kd_topk_tail(student, values, indices, lse, temperature)
    ref = bucket_kl(student, teacher, indices, temperature)
    # float32 against a float64 reference: KL ~ 10 from terms ~ 10 that cancel
    torch.testing.assert_close(tail.double(), ref, rtol=1e-4, atol=1e-5)
    full = losses.kd_full(student, teacher, temperature)
    assert (tail <= full * (1 + 1e-5) + 1e-6).all(), "coarse-graining cannot increase KL"
    if k <= 20:
        assert (tail < full - 1e-3).all(), "with a real tail the bucket KL is strictly smaller here"
    (g,) = torch.autograd.grad(tail.sum(), student)
    (g_ref,) = torch.autograd.grad(ref.sum(), student)
    torch.testing.assert_close(g.double(), g_ref.double(), rtol=1e-4, atol=1e-6)  # tail = 1 - sum(p) in fp32


@pytest.mark.parametrize("k", [3, 20])
def test_topk_tail_survives_a_student_tail_that_underflows_float32(logits, k):
    """A confident student (one logit 300 above the rest at T = 1): exp of the tail underflows in
    float32, yet value and gradient match the float64 bucket reference."""
    student, teacher = logits
    student = student.clone()
    student[:8, 0] += 300.0
    student.requires_grad_(True)
    values, indices, lse = teacher_cache_of(teacher, k, 1.0)
    tail = losses.kd_topk_tail(student, values, indices, lse, 1.0)
    ref = bucket_kl(student, teacher, indices, 1.0)
    assert torch.isfinite(tail).all()
    torch.testing.assert_close(tail.double(), ref, rtol=1e-4, atol=1e-4)
    (g,) = torch.autograd.grad(tail.sum(), student)
    (g_ref,) = torch.autograd.grad(ref.sum(), student)
    assert torch.isfinite(g).all()
    torch.testing.assert_close(g.double(), g_ref.double(), rtol=1e-4, atol=1e-5)


def test_topk_tail_with_rounded_fp16_values_stays_finite_and_close(logits):
    student, teacher = logits
    values, indices, lse = teacher_cache_of(teacher, V, 1.0, dtype=torch.float16)
    tail = losses.kd_topk_tail(student, values, indices, lse, 1.0)
    assert torch.isfinite(tail).all()
    torch.testing.assert_close(tail, losses.kd_full(student, teacher, 1.0), rtol=2e-2, atol=2e-3)


def test_topk_renorm_renormalises_the_teacher_over_its_top_k(logits):
    student, teacher = logits
    values, indices, _ = teacher_cache_of(teacher, 10, 2.0)
    got = losses.kd_topk_renorm(student, values, indices, 2.0)
    p = F.softmax(teacher.gather(-1, indices) / 2.0, -1)
    log_q = F.log_softmax(student / 2.0, -1).gather(-1, indices)
    torch.testing.assert_close(got, (p * (p.log() - log_q)).sum(-1) * 4.0, rtol=1e-5, atol=1e-6)


def tiny_head(hidden_size: int = 16) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(hidden_size, hidden_size),
        torch.nn.GELU(),
        torch.nn.LayerNorm(hidden_size),
        torch.nn.Linear(hidden_size, V),
    )


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
@pytest.mark.parametrize("chunk", [8, 50, 1024])
def test_fused_exact_value_and_gradient_equal_kd_full_on_online_teacher_logits(temperature, chunk):
    """The fused exact KL (teacher logits rebuilt chunk by chunk, q - p kept for backward) against
    the unfused full KL on the same teacher logits: values and gradients within fp32 rounding."""
    torch.manual_seed(1)
    head = tiny_head()
    hidden = torch.randn(50, 16)
    student = (torch.randn(50, V) * 3).requires_grad_(True)
    with torch.no_grad():
        teacher = head(hidden) * 2
    online = losses.kd_full(student, teacher, temperature)
    exact = losses.kd_exact(student, hidden, lambda h: head(h) * 2, temperature, chunk_tokens=chunk)
    torch.testing.assert_close(exact, online, rtol=1e-5, atol=1e-6)
    weights = torch.rand(50)  # a non-uniform upstream gradient: each row's scale must reach its row
    (g,) = torch.autograd.grad((exact * weights).sum(), student)
    (g_ref,) = torch.autograd.grad((online * weights).sum(), student)
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-7)


def test_fused_exact_keeps_no_teacher_log_probs_for_backward():
    """Besides the student's logits, backward keeps one (n, V) float32 buffer (Z_s (q - p)) and the
    (n,) row sums Z_s, where autograd through kd_full keeps the teacher's and the student's
    log-probabilities."""
    head = tiny_head()
    student = torch.randn(40, V, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        losses.kd_exact(student, torch.randn(40, 16), head, 2.0, chunk_tokens=16)
    assert [tuple(t.shape) for t in saved] == [(40, V), (40,)]


def test_bf16_head_moves_the_exact_kl_by_a_stated_tolerance():
    """exact_head_dtype=bfloat16: the teacher head in bf16 against fp32, on peaked logits."""
    torch.manual_seed(2)
    head = tiny_head()
    hidden = torch.randn(64, 16)
    student = torch.randn(64, V) * 3
    fp32 = losses.kd_exact(student, hidden, head, 2.0)
    bf16 = losses.kd_exact(student, hidden, copy.deepcopy(head).to(torch.bfloat16), 2.0, head_dtype=torch.bfloat16)
    assert (bf16 - fp32).abs().mean() < 1e-3 * fp32.mean()


def test_mlm_and_cosine():
    logits = torch.randn(4, 6, V)
    labels = torch.full((4, 6), losses.IGNORE_INDEX)
    labels[0, 1], labels[2, 3] = 5, 7
    expected = F.cross_entropy(torch.stack([logits[0, 1], logits[2, 3]]), torch.tensor([5, 7]))
    torch.testing.assert_close(losses.mlm_loss(logits, labels), expected)
    a = torch.randn(10, 8)
    torch.testing.assert_close(losses.cosine_loss(a, 3 * a), torch.zeros(10), atol=1e-6, rtol=0)
    torch.testing.assert_close(losses.cosine_loss(a, -a), torch.full((10,), 2.0), atol=1e-6, rtol=0)
