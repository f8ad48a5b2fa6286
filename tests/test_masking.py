import numpy as np
import pytest

from cache_format.layout import plan_rows
from cache_format.rng import permutation, uniforms
from teacher_cache.masking import IGNORE_INDEX, make_spec, mask_batch, selection_weights

V, PAD, CLS, SEP, MASK = 200, 0, 2, 3, 4
SPECIALS = [PAD, 1, CLS, SEP, MASK]


def corpus(n=400, length=64, seed=0) -> np.ndarray:
    """uint16 rows [CLS] tokens [SEP] with some padded rows (as packed corpora are stored)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, V, size=(n, length)).astype(np.uint16)
    ids[:, 0], ids[:, -1] = CLS, SEP
    ids[::7, 40:] = PAD
    return ids


@pytest.fixture
def spec():
    return make_spec(V, SPECIALS, MASK)


def test_targets_exact_count_never_special_labels_hold_originals(spec):
    ids = corpus()
    masked, labels = mask_batch(ids, np.arange(len(ids)), 0, 56, spec)
    assert labels.dtype == np.int32
    target = labels != IGNORE_INDEX
    candidates = ~np.isin(ids, SPECIALS)
    assert not (target & ~candidates).any(), "special or pad tokens were chosen"
    expected = np.maximum(1, np.rint(0.15 * candidates.sum(1)))
    np.testing.assert_array_equal(target.sum(1), expected)
    np.testing.assert_array_equal(labels[target], ids[target].astype(np.int32))
    np.testing.assert_array_equal(masked[~target], ids[~target])


def test_80_10_10_split(spec):
    ids = corpus(n=3000)
    masked, labels = mask_batch(ids, np.arange(len(ids)), 0, 1, spec)
    target = labels != IGNORE_INDEX
    n = target.sum()
    to_mask = (masked == MASK) & target
    unchanged = (masked == ids) & target
    random = target & ~to_mask & ~unchanged
    # binomial standard error at n ~ 25k is < 0.003; allow 4 sigma. Random draws that hit the
    # original token (1/195) count as unchanged.
    assert to_mask.sum() / n == pytest.approx(0.8, abs=0.012)
    assert random.sum() / n == pytest.approx(0.1 * (1 - 1 / 195), abs=0.01)
    assert unchanged.sum() / n == pytest.approx(0.1 + 0.1 / 195, abs=0.01)
    assert not np.isin(masked[random], SPECIALS).any()


def test_mask_is_a_pure_function_of_seed_view_and_sequence(spec):
    ids = corpus()
    seq = np.arange(len(ids))
    whole = mask_batch(ids, seq, 1, 56, spec)
    # other batch sizes, another order, per-row view arrays: same masks row by row
    for size in (1, 3, 64):
        parts = [mask_batch(ids[a : a + size], seq[a : a + size], 1, 56, spec) for a in range(0, len(ids), size)]
        np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), whole[0])
        np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), whole[1])
    order = np.random.default_rng(3).permutation(len(ids))
    shuffled = mask_batch(ids[order], seq[order], np.full(len(ids), 1), 56, spec)
    np.testing.assert_array_equal(shuffled[1], whole[1][order])
    other_view = mask_batch(ids, seq, 2, 56, spec)[1]
    other_seed = mask_batch(ids, seq, 1, 57, spec)[1]
    assert (other_view != whole[1]).any() and (other_seed != whole[1]).any()


def test_frequency_smoothing_prefers_rare_tokens():
    counts = np.ones(V, dtype=np.int64)
    counts[10], counts[11] = 10_000, 10
    weights = selection_weights(V, SPECIALS, counts, smoothing=0.7)
    assert weights[PAD] == 0 and weights[MASK] == 0
    assert weights[11] / weights[10] == pytest.approx(1000**0.7)
    # a sequence of half token 10, half token 11: smoothing targets 11 far more often
    ids = np.full((2000, 40), 10, dtype=np.uint16)
    ids[:, 20:] = 11
    spec = make_spec(V, SPECIALS, MASK, counts=counts, smoothing=0.7)
    _, labels = mask_batch(ids, np.arange(len(ids)), 0, 5, spec)
    chosen = labels[labels != IGNORE_INDEX]
    assert (chosen == 11).mean() > 0.95
    uniform = make_spec(V, SPECIALS, MASK)
    _, labels = mask_batch(ids, np.arange(len(ids)), 0, 5, uniform)
    assert (labels[labels != IGNORE_INDEX] == 11).mean() == pytest.approx(0.5, abs=0.02)


def test_uniforms_and_permutations():
    u = uniforms(56, 1, 0, np.arange(1000), 64)
    assert u.shape == (1000, 64) and u.min() > 0 and u.max() < 1
    assert abs(u.mean() - 0.5) < 0.01
    p = permutation(56, 4, 1000)
    np.testing.assert_array_equal(np.sort(p), np.arange(1000))
    assert not np.array_equal(p, permutation(57, 4, 1000))


def test_views_share_the_subset_in_different_orders():
    seq, view = plan_rows(56, n_packed=100, n_select=30, views=3)
    assert len(seq) == 90 and list(np.bincount(view)) == [30, 30, 30]
    views = [seq[view == v] for v in range(3)]
    assert all(set(v) == set(views[0]) for v in views) and len(set(views[0])) == 30
    assert not np.array_equal(views[0], views[1])
