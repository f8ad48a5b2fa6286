"""Sampled sparse logits (RS-KD): the draws, their storage form and the unbiased KD estimator."""

import numpy as np
import pytest
import torch

from student_train import losses
from teacher_cache.sampling import sample_counts, sample_uniforms

T = 2.0
V = 6
DRAWS = 16
REPEATS = 4000


@pytest.fixture
def logits() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(V, generator=g, dtype=torch.float64) * 2
    student = torch.randn(V, generator=g, dtype=torch.float64)
    return teacher, student


def draw(teacher: torch.Tensor, repeats: int, n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    u = torch.rand(repeats, n, generator=torch.Generator().manual_seed(seed))
    return sample_counts(teacher.expand(repeats, V), u, T)


def test_counts_are_distinct_ascending_ids_packed_left(logits):
    ids, counts = draw(logits[0], 200, DRAWS)
    assert (counts.sum(-1) == DRAWS).all()
    used = counts > 0
    assert (used[:, :-1] | ~used[:, 1:]).all(), "used slots come first"
    for row_ids, row_used in zip(ids, used, strict=True):
        kept = row_ids[row_used]
        assert (kept[1:] > kept[:-1]).all(), "distinct and ascending"
    assert (ids[~used] == 0).all()


def test_draws_follow_the_teacher_distribution_at_T(logits):
    ids, counts = draw(logits[0], REPEATS, DRAWS)
    freq = torch.zeros(V, dtype=torch.float64).index_add_(0, ids.flatten(), counts.flatten().double())
    freq /= REPEATS * DRAWS
    p = torch.softmax(logits[0] / T, -1)
    se = (p * (1 - p) / (REPEATS * DRAWS)).sqrt()
    assert ((freq - p).abs() <= 5 * se).all(), (freq, p)  # 5 sigma per token


def gradient(loss_fn, student: torch.Tensor) -> torch.Tensor:
    s = student.clone().requires_grad_(True)
    loss_fn(s).backward()
    return s.grad


def test_sampled_kd_is_unbiased_for_the_full_kl_gradient(logits):
    """Mean estimator gradient over REPEATS draws of DRAWS samples = the exact KL gradient.

    Tolerance: 5 standard errors per logit. The estimator's gradient is T * (q - c/n), so its
    standard error is T * sqrt(p (1 - p) / (REPEATS * DRAWS)); the renormalised top-2 estimator,
    which is biased, must fail the same tolerance."""
    teacher, student = logits
    ids, counts = draw(teacher, REPEATS, DRAWS)
    sampled = gradient(lambda s: losses.kd_sampled(s.expand(REPEATS, V), ids, counts.float(), T).mean(), student)
    full = gradient(lambda s: losses.kd_full(s[None], teacher[None], T).sum(), student)
    p = torch.softmax(teacher / T, -1)
    se = T * (p * (1 - p) / (REPEATS * DRAWS)).sqrt()
    assert ((sampled - full).abs() <= 5 * se).all(), (sampled, full)
    values, top = teacher.topk(2)
    renorm = gradient(lambda s: losses.kd_topk_renorm(s[None], values[None], top[None], T).sum(), student)
    assert ((renorm - full).abs() > 5 * se).any(), "the test must be able to tell a biased estimator"


def test_sampled_kd_value_estimates_kl_plus_teacher_entropy(logits):
    teacher, student = logits
    ids, counts = draw(teacher, REPEATS, DRAWS)
    value = losses.kd_sampled(student.expand(REPEATS, V), ids, counts.float(), T)
    p = torch.softmax(teacher / T, -1)
    entropy = -(p * p.log()).sum() * T**2
    kl = losses.kd_full(student[None], teacher[None], T)[0]
    se = value.std() / REPEATS**0.5
    assert abs(float(value.mean() - (kl + entropy))) <= 5 * float(se)


@pytest.mark.parametrize("n", [4, 16, 64])
def test_sampled_kd_standard_deviation_over_draws_is_the_stated_variance_cost(logits, n):
    """The spread of the RS-KD loss over independent draws (the price of its small cache) is
    T^2 * sqrt(Var_p[log q] / n), as `kd_sampled_std` reports and bench_fidelity prints: the
    empirical std over REPEATS draw sets is within 5 standard errors of it (the std of a
    sample std is about std / sqrt(2 * REPEATS)), and it halves when the draws quadruple."""
    teacher, student = logits
    ids, counts = draw(teacher, REPEATS, n)
    value = losses.kd_sampled(student.expand(REPEATS, V), ids, counts.float(), T)
    stated = float(losses.kd_sampled_std(student[None], teacher[None], T, n)[0])
    se = stated / (2 * REPEATS) ** 0.5
    assert abs(float(value.std()) - stated) <= 5 * se, (float(value.std()), stated)
    quadrupled = float(losses.kd_sampled_std(student[None], teacher[None], T, 4 * n)[0])
    assert quadrupled == pytest.approx(stated / 2, rel=1e-6)


def per_row_gradients(loss_fn, student: torch.Tensor) -> torch.Tensor:
    """(REPEATS, V) gradient of each draw set's estimate (one student copy per row)."""
    rows = student.expand(REPEATS, V).clone().requires_grad_(True)
    loss_fn(rows).sum().backward()
    return rows.grad


def hybrid(rows: torch.Tensor, teacher: torch.Tensor, ids: torch.Tensor, counts: torch.Tensor, k: int = 2):
    values, top = teacher.topk(k)
    lse = torch.logsumexp(teacher / T, -1)
    n = rows.shape[0]
    return losses.kd_topk_sampled(rows, values.expand(n, k), top.expand(n, k), lse.expand(n), ids, counts.float(), T)


def test_hybrid_topk_sampled_kd_is_unbiased_with_less_variance_than_sampled(logits):
    """Exact top-k terms + the tail from the draws outside the top-k: the mean gradient over
    REPEATS draw sets is the exact KL gradient (5 standard errors of the per-set gradients), and
    the per-set spread is below RS-KD's from the same draws (the top-k part is not sampled)."""
    teacher, student = logits
    ids, counts = draw(teacher, REPEATS, DRAWS)
    got = per_row_gradients(lambda r: hybrid(r, teacher, ids, counts), student)
    rs_kd = per_row_gradients(lambda r: losses.kd_sampled(r, ids, counts.float(), T), student)
    full = gradient(lambda s: losses.kd_full(s[None], teacher[None], T).sum(), student)
    se = got.std(0) / REPEATS**0.5
    assert ((got.mean(0) - full).abs() <= 5 * se + 1e-12).all(), (got.mean(0), full)
    assert (got.std(0) < rs_kd.std(0)).all(), (got.std(0), rs_kd.std(0))
    values, top = teacher.topk(2)  # the same test tells the biased top-2 renorm apart
    renorm = gradient(lambda s: losses.kd_topk_renorm(s[None], values[None], top[None], T).sum(), student)
    assert ((renorm - full).abs() > 5 * se).any()


def test_hybrid_value_estimates_kl_plus_the_tail_entropy(logits):
    teacher, student = logits
    ids, counts = draw(teacher, REPEATS, DRAWS)
    value = hybrid(student.expand(REPEATS, V), teacher, ids, counts)
    p = torch.softmax(teacher / T, -1)
    tail = torch.ones(V, dtype=torch.bool)
    tail[teacher.topk(2).indices] = False
    tail_entropy = -(p[tail] * p[tail].log()).sum() * T**2
    kl = losses.kd_full(student[None], teacher[None], T)[0]
    se = value.std() / REPEATS**0.5
    assert abs(float(value.mean() - (kl + tail_entropy))) <= 5 * float(se)
    everything = hybrid(student[None], teacher, torch.zeros(1, 1, dtype=torch.int64), torch.zeros(1, 1), k=V)
    assert float(everything[0]) == pytest.approx(float(kl), rel=1e-6)  # k = V: no tail, the exact KL


def test_rows_without_samples_give_zero():
    ids = torch.zeros(2, 4, dtype=torch.int64)
    counts = torch.tensor([[3.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    ids[0, :2] = torch.tensor([1, 4])
    out = losses.kd_sampled(torch.randn(2, V), ids, counts, T)
    assert out[1] == 0 and out[0] > 0


def test_uniforms_are_a_pure_function_of_sequence_view_and_position():
    seq, view = np.array([5, 9, 5]), np.array([0, 0, 1])
    u = sample_uniforms(3, seq, view, 8, 4)
    assert u.shape == (3, 8, 4) and u.dtype == np.float32 and ((u > 0) & (u < 1)).all()
    np.testing.assert_array_equal(sample_uniforms(3, seq[1:2], view[1:2], 8, 4)[0], u[1])
    assert not np.array_equal(u[0], u[2]), "another view draws anew"
