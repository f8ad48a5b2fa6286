"""`pipeline cache-teacher`: the capture loop.

Plan the cache (identity, layout, path), create or resume it, then each process takes its
share of the pending shards: mask a batch, run the teacher, encode its outputs into the shard
buffer, and hand finished shards to the background writer. Rank 0 writes the manifest last.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import re
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipeline.config import to_dict
from pipeline.dist import DistEnv
from pipeline.log import human_bytes
from pipeline.versions import library_versions
from teacher_cache import report
from teacher_cache.config import CacheConfig, OutputsConfig
from teacher_cache.corpus import PackedCorpus, PackedSplit, prepare_corpus
from teacher_cache.encode import encode_hidden, encode_values
from teacher_cache.head import HEAD_FILE, find_head, save_head
from teacher_cache.layout import (
    FieldSpec,
    SplitLayout,
    field_specs,
    plan_rows,
    shard_rows_for,
    split_seed,
)
from teacher_cache.masking import IGNORE_INDEX, MaskSpec, make_spec, mask_batch
from teacher_cache.sampling import sample_uniforms
from teacher_cache.store import (
    FORMAT,
    FORMAT_VERSION,
    TEACHER_DIR,
    CacheError,
    CacheStore,
    ShardWriter,
)
from teacher_cache.teacher import Teacher, TeacherError, load_teacher

log = logging.getLogger(__name__)


@dataclass
class CachePlan:
    """Everything decided before the first forward: identity, path and geometry."""

    path: Path
    header: dict
    fields: list[FieldSpec]
    layouts: dict[str, SplitLayout]

    @property
    def fingerprint(self) -> str:
        return self.header["fingerprint"]


def build_plan(cfg: CacheConfig, teacher: Teacher, corpus: PackedCorpus) -> CachePlan:
    out = cfg.outputs
    ids_dtype = str(corpus.train.ids.dtype)
    fields = field_specs(
        cfg.corpus.max_seq_len,
        out.k,
        len(out.temperatures),
        teacher.hidden_size,
        ids_dtype,
        out.logits_dtype,
        out.hidden_dtype,
        out.logits,
        out.n_samples,
    )
    layouts = {}
    for name, packed, limit, views in (
        ("train", corpus.train, cfg.max_sequences, cfg.masking.views),
        ("eval", corpus.eval, cfg.max_eval_sequences, 1),
    ):
        if packed is None or len(packed.ids) == 0:
            continue
        n = len(packed.ids) if limit is None else min(limit, len(packed.ids))
        shard_rows = cfg.store.shard_rows or shard_rows_for(fields, cfg.store.block_rows, cfg.store.shard_mb, n * views)
        layouts[name] = SplitLayout(name, n, views, cfg.store.block_rows, shard_rows)
    identity = {
        "format_version": FORMAT_VERSION,
        "teacher": {
            "weights_sha256": teacher.weights_sha256,
            "dtype": str(teacher.dtype).removeprefix("torch."),
        },
        "tokenizer_sha256": teacher.tokenizer_sha256,
        "corpus": corpus.fingerprint,
        "seed": cfg.seed,
        "max_sequences": cfg.max_sequences,
        "max_eval_sequences": cfg.max_eval_sequences,
        "masking": asdict(cfg.masking),
        "outputs": asdict(cfg.outputs),
        "layout": {n: [lay.block_rows, lay.shard_rows] for n, lay in layouts.items()},
    }
    fingerprint = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(cfg.teacher.name.rstrip("/")).name) or "teacher"
    path = Path(cfg.store.output or Path(cfg.store.cache_dir) / f"{slug}-{fingerprint[:12]}").expanduser()
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "fingerprint": fingerprint,
        "identity": identity,
        "layout": {
            "splits": {n: lay.to_dict() for n, lay in layouts.items()},
            "fields": [asdict(f) for f in fields],
        },
        "teacher": _teacher_info(cfg, teacher),
        "tokenizer": _tokenizer_info(teacher),
        "corpus": corpus.meta,
        "config": to_dict(cfg),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    return CachePlan(path, header, fields, layouts)


def _teacher_info(cfg: CacheConfig, teacher: Teacher) -> dict:
    c = teacher.model.config
    return {
        "name": cfg.teacher.name,
        "model_type": c.model_type,
        "vocab_size": teacher.vocab_size,
        "hidden_size": teacher.hidden_size,
        "num_layers": getattr(c, "num_hidden_layers", None),
        "weights_sha256": teacher.weights_sha256,
        "dtype": str(teacher.dtype).removeprefix("torch."),
    }


def _tokenizer_info(teacher: Teacher) -> dict:
    tok = teacher.tokenizer
    return {
        "sha256": teacher.tokenizer_sha256,
        "pad_id": tok.pad_token_id,
        "mask_id": tok.mask_token_id,
        "special_ids": sorted(set(tok.all_special_ids)),
        "size": len(tok),
    }


def check_compatible(cfg: CacheConfig, teacher: Teacher) -> None:
    problems = []
    if cfg.outputs.k > teacher.vocab_size:
        problems.append(
            f"outputs.k={cfg.outputs.k} exceeds the teacher vocabulary ({teacher.vocab_size}); "
            f"use k <= {teacher.vocab_size}"
        )
    if cfg.corpus.max_seq_len > teacher.max_positions:
        problems.append(
            f"corpus.max_seq_len={cfg.corpus.max_seq_len} exceeds the teacher's "
            f"{teacher.max_positions} positions; use max_seq_len <= {teacher.max_positions}"
        )
    if cfg.outputs.logits == "none" and find_head(teacher.model) is None:
        problems.append(
            f"outputs.logits=none keeps no teacher logits, and stage two cannot rebuild them: the MLM head of "
            f"{teacher.model.config.model_type!r} is not a known module; set outputs.logits=topk, sampled or both"
        )
    if problems:
        raise TeacherError("; ".join(problems))


# ----------------------------------------------------------------------------- capture


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
    attention = np.arange(ids.shape[1])[None, :] < lengths[:, None]
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
) -> None:
    """Run the teacher over a shard's batches, encoding its outputs into `buf` (shard-sized)."""
    out_cfg = cfg.outputs
    chunk = teacher.chunk_tokens(cfg.teacher.head_chunk_tokens)
    for b in batches:
        ids = torch.from_numpy(b.input_ids.astype(np.int64))
        attention = torch.from_numpy(np.arange(ids.shape[1])[None, :] < b.lengths[:, None])
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
        codes, scale = encode_hidden(hidden, out_cfg.hidden_dtype)
        buf["hidden"][b.rows] = codes
        if scale is not None:
            buf["hidden_scale"][b.rows] = scale
        on_batch(b)


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


def run_cache(cfg: CacheConfig, overwrite: bool = False) -> Path:
    """Build (or resume, or reuse) the cache described by `cfg`; returns its path."""
    dist = DistEnv.from_env()
    dist.init()
    try:
        return _run(cfg, overwrite, dist)
    finally:
        dist.close()


def _run(cfg: CacheConfig, overwrite: bool, dist: DistEnv) -> Path:
    if cfg.teacher.num_threads or dist.local_world_size > 1:
        torch.set_num_threads(cfg.teacher.num_threads or max(1, (os.cpu_count() or 1) // dist.local_world_size))
    teacher = load_teacher(cfg.teacher)
    check_compatible(cfg, teacher)
    corpus = dist.main_first(
        lambda: prepare_corpus(cfg.corpus, teacher.tokenizer, teacher.tokenizer_sha256, cfg.store.cache_dir, cfg.seed)
    )
    plan = build_plan(cfg, teacher, corpus)
    if dist.is_main:
        store, state = CacheStore.open_for_capture(plan.path, plan.header, overwrite)
        log.info("cache %s: %s (fingerprint %s)", plan.path, state, plan.fingerprint[:12])
        if state != "complete":
            _write_side_files(store, teacher, corpus)  # again on resume: a kill may have cut them short
            _check_free_space(store, plan)
    dist.barrier()
    store = CacheStore(plan.path)
    if store.manifest is not None:
        if dist.is_main:
            log.info("cache is complete; reusing it (use --overwrite to rebuild)\n%s", report.summary(store))
        return plan.path
    pending = store.pending()
    dist.barrier()  # everyone has listed the pending shards before anyone commits one
    skipped = sum(lay.shards for lay in plan.layouts.values()) - len(pending)
    if dist.is_main and skipped:
        log.info("resuming: skipping %d complete shard(s), %d to go", skipped, len(pending))
    _capture(cfg, teacher, corpus, plan, store, pending[dist.rank :: dist.world_size], dist)
    dist.barrier()
    if dist.is_main:
        _finalize(cfg, store, plan)
        log.info("%s", report.summary(store))
    return plan.path


def _capture(
    cfg: CacheConfig,
    teacher: Teacher,
    corpus: PackedCorpus,
    plan: CachePlan,
    store: CacheStore,
    mine: list[tuple[str, int]],
    dist: DistEnv,
) -> None:
    """Capture this process's shards, handing each finished one to the background writer."""
    spec = make_spec(
        teacher.vocab_size,
        teacher.tokenizer.all_special_ids,
        teacher.tokenizer.mask_token_id,
        cfg.masking.mask_prob,
        cfg.masking.mask_token_prob,
        cfg.masking.random_token_prob,
        corpus.counts,
        cfg.masking.smoothing,
    )
    rows_plan = {
        n: plan_rows(split_seed(cfg.seed, n), len(getattr(corpus, n).ids), lay.sequences, lay.views)
        for n, lay in plan.layouts.items()
    }
    total = sum(np.diff(plan.layouts[s].shard_range(i))[0] for s, i in mine)
    bar = tqdm(
        total=int(total),
        unit="seq",
        disable=not dist.is_main,
        dynamic_ncols=True,
        mininterval=1.0,
        desc=f"cache-teacher{f' rank 0/{dist.world_size}' if dist.world_size > 1 else ''}",
    )
    tokens, start = 0, time.perf_counter()

    def on_batch(b: Batch) -> None:
        nonlocal tokens
        tokens += int(b.lengths.sum())
        bar.update(len(b.lengths))
        bar.set_postfix_str(f"{tokens / (time.perf_counter() - start):,.0f} tok/s", refresh=False)

    with ShardWriter(store) as writer, bar:  # the bar closes first, so errors print on a fresh line
        for split, shard in mine:
            lay, packed = plan.layouts[split], getattr(corpus, split)
            lo, hi = lay.shard_range(shard)
            t0 = time.perf_counter()
            buf = {f.name: np.zeros((hi - lo, *f.row_shape), dtype=f.dtype) for f in plan.fields}
            batches = _shard_batches(packed, *rows_plan[split], lo, hi, split_seed(cfg.seed, split), spec, cfg)
            capture_shard(teacher, batches, buf, cfg, on_batch)
            writer.submit(split, shard, buf, _shard_info(buf, cfg, teacher, dist, time.perf_counter() - t0))


def _shard_info(buf: dict, cfg: CacheConfig, teacher: Teacher, dist: DistEnv, seconds: float) -> dict:
    """What the commit record says about how a shard was made."""
    tokens = int(buf["lengths"].sum())
    masked = cfg.outputs.logit_positions == "masked"
    return {
        "tokens": tokens,
        "logit_positions": int(np.count_nonzero(buf["labels"] != IGNORE_INDEX)) if masked else tokens,
        "seconds": round(seconds, 3),
        "batch_size": cfg.teacher.batch_size,
        "device": str(teacher.device),
        "rank": dist.rank,
        "world_size": dist.world_size,
    }


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


def _write_side_files(store: CacheStore, teacher: Teacher, corpus: PackedCorpus) -> None:
    """Teacher head + config + tokenizer (stage two needs them, not the teacher) and token counts."""
    directory = store.path / TEACHER_DIR
    if not save_head(teacher.model, directory):
        teacher.model.config.save_pretrained(directory)
        log.warning(
            "unknown MLM head for %s: the cache cannot rebuild exact logits (kd mode `exact`)",
            teacher.model.config.model_type,
        )
    teacher.tokenizer.save_pretrained(directory)
    store.write_extra_array("token_counts", np.asarray(corpus.counts, dtype=np.int64))


def _check_free_space(store: CacheStore, plan: CachePlan) -> None:
    row_bytes = sum(f.row_bytes for f in plan.fields)
    needed = sum(np.diff(plan.layouts[s].shard_range(i))[0] for s, i in store.pending()) * row_bytes
    free = shutil.disk_usage(store.path).free
    if needed > free:
        raise CacheError(
            f"the remaining shards need up to {human_bytes(needed)} but only {human_bytes(free)} "
            f"is free at {store.path}; free space or set store.output on a larger disk"
        )


def _finalize(cfg: CacheConfig, store: CacheStore, plan: CachePlan) -> None:
    records = store.committed()
    missing = [f"{s}-{i:05d}" for s, lay in plan.layouts.items() for i in range(lay.shards) if (s, i) not in records]
    if missing:
        raise CacheError(f"shards {', '.join(missing[:5])} are missing after the run; rerun the same command")
    manifest = {
        **{
            k: plan.header[k]
            for k in (
                "format",
                "format_version",
                "fingerprint",
                "identity",
                "layout",
                "teacher",
                "tokenizer",
                "corpus",
                "created",
            )
        },
        "completed": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "head": (store.path / TEACHER_DIR / HEAD_FILE).is_file(),
        "teacher_files": store.side_file_records(),
        "counts": report.counts(store, records),
        "versions": {**library_versions(), "python": platform.python_version()},
        "config": to_dict(cfg),
        "shards": [records[k] for k in sorted(records)],
    }
    store.finalize(manifest)
