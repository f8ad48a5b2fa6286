"""Held-out metrics: the headline agreement and KL are taken at masked positions only."""

import pytest
import torch

from student_train.evaluate import evaluate, table
from student_train.losses import IGNORE_INDEX, kd_full

V, H, B, L = 50, 8, 6, 12


@pytest.fixture
def rows():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, V, (B, L), generator=g)
    lengths = torch.tensor([12, 12, 10, 12, 7, 12])
    labels = torch.full((B, L), IGNORE_INDEX)
    masked = (torch.rand(B, L, generator=g) < 0.3) & (torch.arange(L)[None] < lengths[:, None])
    labels[masked] = torch.randint(5, V, (int(masked.sum()),), generator=g)
    return {"input_ids": ids, "labels": labels, "lengths": lengths, "hidden": torch.randn(B, L, H, generator=g)}


@pytest.fixture
def head():
    torch.manual_seed(1)
    return torch.nn.Linear(H, V).eval()


def student(logits: torch.Tensor):
    def forward(ids, attention):
        return logits[: len(ids)], None

    return forward


def run(rows, head, logits, with_head=True):
    return evaluate(student(logits), rows, head if with_head else None, "all", batch_size=B, device=torch.device("cpu"))


def test_headline_agreement_and_kl_ignore_unmasked_positions(rows, head):
    torch.manual_seed(2)
    logits = torch.randn(B, L, V)
    masked = rows["labels"] != IGNORE_INDEX
    valid = torch.arange(L)[None] < rows["lengths"][:, None]
    base = run(rows, head, logits)
    with torch.no_grad():
        teacher = head(rows["hidden"])
    changed = logits.clone()
    changed[~masked] = teacher[~masked]  # a student that copies the teacher wherever nothing is masked
    moved = run(rows, head, changed)
    for m in ("masked_accuracy", "perplexity", "teacher_top1_agreement", "kl_teacher_student"):
        assert moved["student"][m] == base["student"][m], m
    assert moved["student"]["teacher_top1_agreement_all"] > base["student"]["teacher_top1_agreement_all"] + 0.5
    assert moved["student"]["kl_teacher_student_all"] < base["student"]["kl_teacher_student_all"] / 2
    # the headline figures against a direct computation at masked positions
    agree = (logits.argmax(-1) == teacher.argmax(-1))[masked].float().mean()
    kl = kd_full(logits[masked], teacher[masked], 1.0).mean()
    assert base["student"]["teacher_top1_agreement"] == pytest.approx(float(agree), abs=1e-6)
    assert base["student"]["kl_teacher_student"] == pytest.approx(float(kl), rel=1e-5)
    agree_all = (logits.argmax(-1) == teacher.argmax(-1))[valid].float().mean()
    assert base["student"]["teacher_top1_agreement_all"] == pytest.approx(float(agree_all), abs=1e-6)
    assert base["masked_tokens"] == int(masked.sum())
    text = table(base)
    assert "metric (masked positions)" in text and "teacher_top1_agreement_all" in text


def test_without_a_head_the_cached_top1_serves_agreement(rows, head):
    """A cache without the head: agreement from the cached top-1, KL not available."""
    torch.manual_seed(3)
    logits = torch.randn(B, L, V)
    masked = rows["labels"] != IGNORE_INDEX
    top1 = torch.randint(0, V, (B, L))
    result = run({**rows, "teacher_top1": top1}, head, logits, with_head=False)
    expected = (logits.argmax(-1) == top1)[masked].float().mean()
    assert result["student"]["teacher_top1_agreement"] == pytest.approx(float(expected), abs=1e-6)
    assert result["student"]["kl_teacher_student"] != result["student"]["kl_teacher_student"]  # nan
    with pytest.raises(ValueError, match="neither the teacher's head nor cached logits"):
        run(rows, head, logits, with_head=False)
