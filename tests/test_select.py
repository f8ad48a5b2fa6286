"""Less student work for the same student: the head fused with its losses chunk by chunk, and the
KD positions chosen from the cached teacher signals (`loss.kd_tokens`, `loss.kd_fraction`)."""

import json

import numpy as np
import pytest
import torch

from pipeline.config import from_dict
from pipeline.errors import ConfigError, DistilcacheError
from student_train.config import LossConfig, TrainConfig
from student_train.head_loss import HeadLoss, chunked_head_loss
from student_train.losses import ExactHead
from student_train.token_select import distribution_scores, keep_top, random_scores
from tests.test_train import losses_of, raw_cfg, train

IGNORE = -100


def _problem(n=300, h=16, v=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, h, generator=g, dtype=torch.float64).requires_grad_()
    w = (0.3 * torch.randn(v, h, generator=g, dtype=torch.float64)).requires_grad_()
    b = (0.1 * torch.randn(v, generator=g, dtype=torch.float64)).requires_grad_()
    teacher_head = torch.nn.Linear(h, v).double()
    teacher_hidden = torch.randn(n, h, generator=g, dtype=torch.float64)
    labels = torch.where(torch.rand(n, generator=g) < 0.3, torch.randint(0, v, (n,), generator=g), IGNORE)
    kd_rows = torch.rand(n, generator=g) < 0.6
    return x, w, b, teacher_head, teacher_hidden, labels, kd_rows


@pytest.mark.parametrize("chunk", [1, 64, 300, 1000])
def test_the_fused_chunked_head_equals_the_unfused_one_in_value_and_gradients(chunk):
    x, w, b, head, hidden, labels, kd_rows = _problem()
    cfg = LossConfig(kd_mode="exact", temperature=2.0)
    exact = ExactHead(head, torch.float64, 128)

    def make():
        return HeadLoss(kd_rows, labels, {"hidden": hidden}, cfg, exact, (5.0 / 180, 2.0 / 90))

    ref_loss = make()
    ref = ref_loss(torch.nn.functional.linear(x, w, b), 0, len(x))
    ref_grads = torch.autograd.grad(ref, (x, w, b))
    fused_loss = make()
    fused = chunked_head_loss(x, w, b, fused_loss, chunk)
    grads = torch.autograd.grad(fused, (x, w, b))
    torch.testing.assert_close(fused.double(), ref.double(), rtol=1e-6, atol=1e-9)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-8)
    assert float(fused_loss.kd) == pytest.approx(float(ref_loss.kd), rel=1e-6)
    assert float(fused_loss.mlm) == pytest.approx(float(ref_loss.mlm), rel=1e-6)
    # the reference by formula: T^2 KL(p_T || q_T) summed at KD rows, CE summed at labelled rows
    s, t = torch.nn.functional.linear(x, w, b), head(hidden)
    log_q, log_p = (torch.log_softmax(z / 2.0, -1) for z in (s, t))
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)[kd_rows].sum() * 4.0
    ce = torch.nn.functional.cross_entropy(s[labels != IGNORE], labels[labels != IGNORE], reduction="sum")
    assert float(fused_loss.kd) == pytest.approx(float(kl.detach()), rel=1e-5)
    assert float(fused_loss.mlm) == pytest.approx(float(ce.detach()), rel=1e-6)


def test_keep_top_keeps_the_rounded_up_fraction_of_each_rows_candidates():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.7, 0.3], [1.0, 1.0, 1.0, 1.0, 1.0], [5.0, 4.0, 3.0, 2.0, 1.0]])
    candidates = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [0, 0, 1, 1, 0]], dtype=torch.bool)
    kept = keep_top(scores, candidates, 0.5)
    assert kept.tolist() == [
        [False, True, True, True, False],  # ceil(2.5) = 3: 0.9, 0.7, 0.5
        [True, True, False, False, False],  # ceil(1.5) = 2 of 3 ties: the earlier positions
        [False, False, True, False, False],  # ceil(1.0) = 1 of 2, never a non-candidate
    ]
    assert keep_top(scores, candidates, 1.0).equal(candidates)


def test_random_scores_are_a_pure_function_of_seed_view_and_row():
    seq, view = np.array([7, 3, 11, 3]), np.array([0, 0, 1, 1])
    whole = random_scores(5, view, seq, 16)
    for i in range(4):  # the same row alone, in any batch: the same draws
        assert torch.equal(random_scores(5, view[i : i + 1], seq[i : i + 1], 16)[0], whole[i])
    assert not torch.equal(whole[1], whole[3]), "another view of a sequence draws anew"
    assert not torch.equal(random_scores(6, view, seq, 16), whole)
    kept = keep_top(whole, torch.ones(4, 16, dtype=torch.bool), 0.25)
    assert kept.sum(1).tolist() == [4, 4, 4, 4]


def test_distribution_scores_are_entropy_confidence_and_the_students_cross_entropy():
    g = torch.Generator().manual_seed(1)
    t, s = torch.randn(37, 20, generator=g), torch.randn(37, 20, generator=g)
    p, log_q = torch.softmax(t, -1), torch.log_softmax(s, -1)
    want = {
        "entropy": -(p * p.log()).sum(-1),
        "confidence": p.amax(-1),
        "tip": -(p * log_q).sum(-1),
    }
    for kind, ref in want.items():
        got = distribution_scores(kind, 37, lambda a, b: t[a:b], lambda a, b: s[a:b], 8)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_selection_settings_are_checked_at_load(tiny_cache, tmp_path):
    with pytest.raises(ConfigError, match="kd_fraction: needs a score"):
        from_dict(TrainConfig, raw_cfg(tiny_cache, tmp_path, **{"loss.kd_fraction": 0.5}))
    with pytest.raises(ConfigError, match=r"kd_fraction: 0.0 must be in \(0, 1\]"):
        from_dict(TrainConfig, raw_cfg(tiny_cache, tmp_path, **{"loss.kd_tokens": "random", "loss.kd_fraction": 0}))
    with pytest.raises(DistilcacheError, match=r"loss\.kd_tokens=entropy scores tokens by the teacher's full"):
        train(tiny_cache, tmp_path / "topk", **{"loss.kd_mode": "topk_tail", "loss.kd_tokens": "entropy"})


@pytest.mark.integration
def test_the_fused_head_trains_the_unfused_student_and_selection_distils_the_fraction(tiny_cache, tmp_path):
    train(tiny_cache, tmp_path / "unfused", **{"loss.head_chunk_tokens": 0})
    train(tiny_cache, tmp_path / "fused", **{"loss.head_chunk_tokens": 7})
    torch.testing.assert_close(
        torch.tensor(losses_of(tmp_path / "fused")), torch.tensor(losses_of(tmp_path / "unfused")), rtol=1e-5, atol=1e-6
    )
    counts = {}
    for kind in ("entropy", "confidence", "random", "tip"):
        out = tmp_path / kind
        train(tiny_cache, out, **{"loss.kd_tokens": kind, "loss.kd_fraction": 0.25})
        records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        counts[kind] = [r["kd_tokens"] for r in records if "kd_tokens" in r]
    records = [json.loads(x) for x in (tmp_path / "fused" / "metrics.jsonl").read_text().splitlines()]
    every = [r["kd_tokens"] for r in records if "kd_tokens" in r]
    for kind, kept in counts.items():
        assert all(0.25 * e <= k < 0.25 * e + 4 * 4 for k, e in zip(kept, every, strict=True)), kind
