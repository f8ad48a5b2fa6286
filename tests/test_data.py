"""The block reader: whole-block reads, seeded order, views per epoch, disjoint ranks, exact resume."""

import itertools

import numpy as np
import pytest
import torch

from cache_format.reader import CacheReader
from student_train.config import DataConfig
from student_train.data import CacheBatches, DevicePrefetch, FieldSelection, plan_epoch, view_blocks
from student_train.follow import CaptureStalled

FIELDS = FieldSelection(("topk_values", "topk_indices", "logsumexp", "hidden"), lse_column=1)


def batches(cache, n, rank=0, world=1, streams=2, micro=4, workers=0, state=None, mix=2):
    it = CacheBatches(
        CacheReader(cache),
        DataConfig(micro_batch_size=micro, mix_blocks=mix, num_workers=workers),
        FIELDS,
        seed=56,
        streams=streams,
        rank=rank,
        world=world,
    )
    if state is not None:
        it.load_state_dict(state)
    out = list(itertools.islice(iter(it), n))
    return out, it


def rows(batch) -> list[tuple[int, int]]:
    return list(zip(batch["view"].tolist(), batch["sequence_index"].tolist(), strict=True))


def test_epochs_walk_the_views_without_repeats(tiny_cache):
    reader = CacheReader(tiny_cache)
    lay = reader.layouts["train"]
    per_epoch = plan_epoch(lay, 56, 0, 2, 2, 4).batches
    out, _ = batches(tiny_cache, 3 * per_epoch)
    epochs = [out[e * per_epoch : (e + 1) * per_epoch] for e in range(3)]
    for e, epoch in enumerate(epochs):
        seen = [r for b in epoch for r in rows(b)]
        assert {v for v, _ in seen} == {e % 2}, "epoch e reads view e mod views"
        assert len(seen) == len(set(seen)), "no row twice in an epoch"
        assert len(seen) >= lay.sequences - 2 * 2 * lay.block_rows, "at most a group per stream left unread"
    order0 = [r for b in epochs[0] for r in rows(b)]
    order2 = [r for b in epochs[2] for r in rows(b)]
    assert sorted(order0) != order0 and order0 != order2, "blocks and rows are shuffled, differently per epoch"
    # the cached fields travel with their rows
    data = reader.read_rows("train", 0, lay.rows)
    b = out[0]
    for i, (v, seq) in enumerate(rows(b)):
        r = int(np.flatnonzero((data["view"] == v) & (data["sequence_index"] == seq))[0])
        assert torch.equal(b["input_ids"][i].long(), torch.from_numpy(data["input_ids"][r].astype(np.int64)))
        assert torch.equal(b["logsumexp"][i], torch.from_numpy(data["logsumexp"][r][..., 1]))
        assert torch.equal(b["hidden"][i], torch.from_numpy(data["hidden"][r]))


def test_reads_whole_blocks_once_per_epoch(tiny_cache, monkeypatch):
    calls = []
    original = CacheReader.read_block

    def spy(self, split, block, names=None):
        calls.append(block)
        return original(self, split, block, names)

    lay = CacheReader(tiny_cache).layouts["train"]
    original_rows = CacheReader.read_rows

    def aligned(self, split, start, stop, names=None):
        assert start % lay.block_rows == 0 and stop - start in (lay.block_rows, lay.rows - start), "unaligned read"
        return original_rows(self, split, start, stop, names)

    monkeypatch.setattr(CacheReader, "read_block", spy)
    monkeypatch.setattr(CacheReader, "read_rows", aligned)
    per_epoch = plan_epoch(lay, 56, 0, 2, 2, 4).batches
    batches(tiny_cache, per_epoch)
    assert len(calls) == len(set(calls)) and set(calls) <= set(view_blocks(lay, 0)[0].tolist())


def test_ranks_are_disjoint_and_together_equal_one_process(tiny_cache):
    one, _ = batches(tiny_cache, 12, world=1, micro=4, streams=2)
    r0, _ = batches(tiny_cache, 12, rank=0, world=2, micro=2, streams=2)
    r1, _ = batches(tiny_cache, 12, rank=1, world=2, micro=2, streams=2)
    for a, b, c in zip(one, r0, r1, strict=True):
        assert not set(rows(b)) & set(rows(c))
        for key in a:
            assert torch.equal(a[key], torch.cat([b[key], c[key]])), key


def test_resume_mid_epoch_and_across_epochs_repeats_nothing(tiny_cache):
    reference, _ = batches(tiny_cache, 40)
    for cut in (5, 17, 23):
        _, it = batches(tiny_cache, cut)
        resumed, _ = batches(tiny_cache, 40 - cut, state=it.state_dict())
        for a, b in zip(reference[cut:], resumed, strict=True):
            assert rows(a) == rows(b)
            assert torch.equal(a["topk_values"], b["topk_values"])


def test_a_batch_fetched_ahead_is_not_in_the_position_a_checkpoint_records(tiny_cache):
    # DevicePrefetch reads one micro-batch ahead on a GPU (`ahead=True` runs that path on a CPU):
    # a checkpoint taken after k batches must resume at batch k, not k + 1
    reference, _ = batches(tiny_cache, 40)
    _, source = batches(tiny_cache, 0)
    feed = DevicePrefetch(source, torch.device("cpu"), ahead=True)
    states = {}
    for k in range(1, 24):
        assert rows(next(feed)) == rows(reference[k - 1])
        assert feed.state_dict() != source.state_dict(), "the reader is a batch ahead"
        states[k] = feed.state_dict()
    for cut in (5, 17, 23):
        resumed, _ = batches(tiny_cache, 40 - cut, state=states[cut])
        assert [rows(b) for b in resumed] == [rows(b) for b in reference[cut:]]


def test_an_error_reading_ahead_is_raised_when_its_batch_is_asked_for():
    class Stalls:  # two batches, then the capture stops committing
        def __init__(self):
            self.batch = 0

        def state_dict(self) -> dict:
            return {"batch": self.batch}

        def __iter__(self):
            for i in range(2):
                self.batch = i + 1
                yield {"x": torch.tensor([i])}
            raise CaptureStalled("waited 1 s for train shard 00001")

    feed = DevicePrefetch(Stalls(), torch.device("cpu"), ahead=True)
    assert next(feed)["x"].item() == 0 and feed.state_dict() == {"batch": 1}
    assert next(feed)["x"].item() == 1 and feed.state_dict() == {"batch": 2}, "handed out before the error"
    with pytest.raises(CaptureStalled, match="waited 1 s for train shard 00001"):
        next(feed)
    assert feed.state_dict() == {"batch": 2}


def test_worker_processes_give_the_same_batches(tiny_cache):
    inline, _ = batches(tiny_cache, 10, workers=0)
    workers, _ = batches(tiny_cache, 10, workers=2)
    for a, b in zip(inline, workers, strict=True):
        for key in a:
            assert torch.equal(a[key], b[key]), key


def test_streams_must_fit_the_processes(tiny_cache):
    with pytest.raises(ValueError, match=r"data\.streams=3 must be a multiple of the 2 process"):
        batches(tiny_cache, 1, world=2, streams=3)
