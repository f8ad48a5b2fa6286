"""One shard of the plan -> its arrays: mask the batches, run the teacher, encode its outputs.

A shard's content is a pure function of the plan (seed, corpus, layout) and the teacher, so any
process, worker or Ray actor that captures it produces the same bytes (same batch size and
hardware). Values are checked before a shard can be committed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np
import torch
from tqdm import tqdm

from cache_format.encode import encode_values
from cache_format.hidden import Fit, encode_hidden
from cache_format.layout import plan_rows, split_seed, valid_positions
from cache_format.settings import IGNORE_INDEX, OutputsConfig
from pipeline.errors import CacheError
from teacher_cache.codec_fit import HiddenChoice, choose_hidden
from teacher_cache.config import CacheConfig
from teacher_cache.corpus import PackedCorpus, PackedSplit, prepare_corpus
from teacher_cache.masking import MaskSpec, make_spec, mask_batch
from teacher_cache.plan import CachePlan, build_plan, check_compatible
from teacher_cache.sampling import sample_uniforms
from teacher_cache.teacher import Teacher, TeacherBatch, load_teacher


@dataclass
class Batch:
    rows: slice  # rows within the shard buffer
    input_ids: np.ndarray  # (n, L) masked, what the teacher sees
    labels: np.ndarray  # (n, L) original ids at targets, IGNORE_INDEX elsewhere
    lengths: np.ndarray  # (n,)
    sequence_index: np.ndarray  # (n,)
    view: np.ndarray  # (n,)
    positions: np.ndarray  # (n, L) bool: positions whose logits are cached
    draws: np.ndarray | None = None  # (positions, S) uniforms of the sampled logits


def prepare_batch(
    packed: PackedSplit,
    seq: np.ndarray,
    view: np.ndarray,
    seed: int,
    spec: MaskSpec,
    outputs: OutputsConfig,
    rows: slice,
) -> Batch:
    """Gather and mask one batch of rows, and draw its sampling uniforms (pure given its inputs)."""
    ids = np.asarray(packed.ids[seq])
    lengths = packed.lengths[seq]
    masked, labels = mask_batch(ids, seq, view, seed, spec)
    attention = valid_positions(lengths, ids.shape[1])
    positions = attention if outputs.logit_positions == "all" else labels != IGNORE_INDEX
    draws = None
    if outputs.logits in ("sampled", "both"):
        draws = sample_uniforms(seed, seq, view, ids.shape[1], outputs.n_samples)[positions]
    return Batch(rows, masked, labels, lengths, seq, view, positions, draws)


def capture_shard(
    teacher: Teacher,
    batches: Iterable[Batch],
    buf: dict[str, np.ndarray],
    cfg: CacheConfig,
    on_batch: Callable[[Batch], None],
    split: str = "train",
    fit: Fit = None,
) -> None:
    """Run the teacher over a shard's batches, encoding its outputs into `buf` (shard-sized);
    stops at the first non-finite or unstorable value (the shard is never committed). `fit`: the
    fitted tensors of a `pq` or `pca` hidden codec."""
    out_cfg = cfg.outputs
    chunk = teacher.chunk_tokens(cfg.teacher.head_chunk_tokens)
    for b in batches:
        ids = torch.from_numpy(b.input_ids.astype(np.int64))
        attention = torch.from_numpy(valid_positions(b.lengths, ids.shape[1]))
        positions = torch.from_numpy(b.positions)
        draws = None if b.draws is None else (torch.from_numpy(b.draws), out_cfg.sample_temperature)
        k = 0 if out_cfg.logits == "none" else out_cfg.k
        out = teacher.forward(ids, attention.long(), positions, k, out_cfg.temperatures, chunk, draws)
        sel = b.positions
        buf["input_ids"][b.rows] = b.input_ids
        buf["labels"][b.rows] = b.labels
        buf["lengths"][b.rows] = b.lengths
        buf["sequence_index"][b.rows] = b.sequence_index
        buf["view"][b.rows] = b.view
        if "logsumexp" in buf:
            buf["logsumexp"][b.rows][sel] = out.lse.cpu().numpy()
        if "topk_values" in buf:
            buf["topk_values"][b.rows][sel] = encode_values(out.values, out_cfg.logits_dtype)
            buf["topk_indices"][b.rows][sel] = out.indices.cpu().numpy().astype(buf["topk_indices"].dtype)
        if out.sample_ids is not None:
            buf["sample_ids"][b.rows][sel] = out.sample_ids.cpu().numpy().astype(buf["sample_ids"].dtype)
            buf["sample_counts"][b.rows][sel] = out.sample_counts.cpu().numpy().astype(buf["sample_counts"].dtype)
        hidden = out.hidden.float().masked_fill(~attention.to(out.hidden.device)[..., None], 0.0)
        codes, scale = encode_hidden(hidden, out_cfg.hidden_dtype, fit)
        buf["hidden"][b.rows] = codes
        if scale is not None:
            buf["hidden_scale"][b.rows] = scale
        check_values(b, out, buf, out_cfg, split)
        on_batch(b)


def check_values(b: Batch, out: TeacherBatch, buf: dict[str, np.ndarray], outputs: OutputsConfig, split: str) -> None:
    """Teacher outputs must be finite, and fit the storage dtype (fp16 ends at 65,504)."""
    at_positions = np.nonzero(b.positions)[0]  # the row of each selected position
    for name, values, rows in (
        ("hidden", out.hidden.reshape(len(b.lengths), -1), np.arange(len(b.lengths))),
        ("topk_values", out.values, at_positions),
        ("logsumexp", out.lse, at_positions),
    ):
        if values is not None and values.numel() and not bool(torch.isfinite(values).all()):
            row = rows[int(torch.nonzero(~torch.isfinite(values).reshape(len(values), -1).all(1))[0])]
            raise CacheError(
                f"the teacher's {name} is not finite at {split} sequence {b.sequence_index[row]}; "
                "check the teacher's weights and teacher.dtype (float32 is the safe choice); no shard was committed"
            )
    for name, fix in (
        ("topk_values", "set outputs.logits_dtype=bfloat16"),
        ("hidden", "set outputs.hidden_dtype=int8 or float32"),
        ("hidden_scale", "set outputs.hidden_dtype=float32"),
    ):
        stored = buf.get(name)
        if stored is None or stored.dtype != np.float16:
            continue
        bad = ~np.isfinite(stored[b.rows].reshape(len(b.lengths), -1)).all(1)
        if bad.any():
            raise CacheError(
                f"the teacher's {name} overflow float16 (|x| > 65,504) at {split} sequence "
                f"{b.sequence_index[int(np.flatnonzero(bad)[0])]}; {fix}; no shard was committed"
            )


def prefetch(items: Iterable, fn: Callable, depth: int = 2) -> Iterator:
    """Yield fn(item) for each item, computing up to `depth` ahead in a background thread."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch") as pool:
        futures = []
        for item in items:
            futures.append(pool.submit(fn, item))
            if len(futures) > depth:
                yield futures.pop(0).result()
        for fut in futures:
            yield fut.result()


def progress(total: int, desc: str, enabled: bool = True) -> tuple[tqdm, Callable[[Batch], None]]:
    """A sequences bar with throughput, and the per-batch callback that advances it."""
    bar = tqdm(total=int(total), unit="seq", disable=not enabled, dynamic_ncols=True, mininterval=1.0, desc=desc)
    state = {"tokens": 0, "start": time.perf_counter()}

    def on_batch(b: Batch) -> None:
        state["tokens"] += int(np.sum(b.lengths))
        bar.update(len(b.lengths))
        rate = state["tokens"] / (time.perf_counter() - state["start"])
        bar.set_postfix_str(f"{rate:,.0f} tok/s", refresh=False)

    return bar, on_batch


def build_capture(cfg: CacheConfig, main_first: Callable = lambda fn: fn()) -> ShardCapture:
    """Load the teacher, pack the corpus (`main_first`: rank 0 first, so the others reuse its
    packed copy) and plan the cache: what every engine, the Ray actors included, captures with."""
    teacher = load_teacher(cfg.teacher)
    check_compatible(cfg, teacher)
    corpus = main_first(
        lambda: prepare_corpus(cfg.corpus, teacher.tokenizer, teacher.tokenizer_sha256, cfg.store.cache_dir, cfg.seed)
    )
    spec = capture_spec(cfg, teacher, corpus)
    choice = choose_hidden(cfg, teacher, corpus, spec)
    return ShardCapture(cfg, teacher, corpus, build_plan(cfg, teacher, corpus, choice), spec, choice)


def capture_spec(cfg: CacheConfig, teacher: Teacher, corpus: PackedCorpus) -> MaskSpec:
    """The masking of every row (the corpus's token counts drive frequency smoothing)."""
    m = cfg.masking
    return make_spec(
        teacher.vocab_size,
        teacher.tokenizer.all_special_ids,
        teacher.tokenizer.mask_token_id,
        m.mask_prob,
        m.mask_token_prob,
        m.random_token_prob,
        corpus.counts,
        m.smoothing,
    )


class ShardCapture:
    """Captures shards of one plan with one teacher (what every engine calls per shard). Its `cfg`
    holds the settled hidden codec (`auto` resolved)."""

    def __init__(
        self,
        cfg: CacheConfig,
        teacher: Teacher,
        corpus: PackedCorpus,
        plan: CachePlan,
        spec: MaskSpec,
        choice: HiddenChoice,
    ):
        self.cfg = replace(cfg, outputs=choice.outputs)
        self.teacher, self.corpus, self.plan, self.spec, self.fit = teacher, corpus, plan, spec, choice.fit
        self.rows = {
            n: plan_rows(split_seed(cfg.seed, n), len(getattr(corpus, n).ids), lay.sequences, lay.views)
            for n, lay in plan.layouts.items()
        }

    def rows_of(self, split: str, shard: int) -> int:
        lo, hi = self.plan.layouts[split].shard_range(shard)
        return hi - lo

    def __call__(self, split: str, shard: int, on_batch: Callable[[Batch], None], **who) -> tuple[dict, dict]:
        """The shard's arrays and what its commit record says about how they were made."""
        lo, hi = self.plan.layouts[split].shard_range(shard)
        t0 = time.perf_counter()
        buf = {f.name: np.zeros((hi - lo, *f.row_shape), dtype=f.dtype) for f in self.plan.fields}
        packed = getattr(self.corpus, split)
        batches = _shard_batches(
            packed, *self.rows[split], lo, hi, split_seed(self.cfg.seed, split), self.spec, self.cfg
        )
        capture_shard(self.teacher, batches, buf, self.cfg, on_batch, split, self.fit)
        tokens = int(buf["lengths"].sum())
        masked = self.cfg.outputs.logit_positions == "masked"
        info = {
            "tokens": tokens,
            "logit_positions": int(np.count_nonzero(buf["labels"] != IGNORE_INDEX)) if masked else tokens,
            "seconds": round(time.perf_counter() - t0, 3),
            "batch_size": self.cfg.teacher.batch_size,
            "device": str(self.teacher.device),
            **who,
        }
        return buf, info


def _shard_batches(
    packed: PackedSplit,
    seq: np.ndarray,
    view: np.ndarray,
    lo: int,
    hi: int,
    seed: int,
    spec: MaskSpec,
    cfg: CacheConfig,
) -> Iterator[Batch]:
    """The masked batches of shard rows [lo, hi), prepared one or two ahead of the teacher."""
    size = cfg.teacher.batch_size

    def make(a: int) -> Batch:
        b = min(a + size, hi)
        return prepare_batch(packed, seq[a:b], view[a:b], seed, spec, cfg.outputs, slice(a - lo, b - lo))

    return prefetch(range(lo, hi, size), make)
