"""`pipeline plan`: what a cache-teacher config will cost, before paying for it.

Nothing is built. The corpus is counted from its packed copy when one is cached, from every
document when there are few, else estimated from a seeded sample of documents (with its error);
`--tokens N` replaces the count. A pilot of a few packed sequences then runs the very capture
loop (masking, the teacher, encoding) twice: once with the config's outputs, timed, and once with
every sparse-logit field, so that each field's bytes per row come from Blosc on real teacher
outputs, not from a guess. The bytes of the choices that change them (views, hidden dtype, sparse
logits, k) come from the same pilot, with the KL by which each hidden dtype moves the rebuilt
logits.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from numcodecs import Blosc

from cache_format.fitted import CENTROIDS, FITTED_CODECS, check_codes, fit_hidden
from cache_format.head import find_head
from cache_format.hidden import HIDDEN_CODECS, Fit, codes_for, encode_hidden
from cache_format.layout import FieldSpec, valid_positions
from cache_format.rng import STREAM_SHUFFLE, permutation
from cache_format.store import blosc_for
from pipeline.errors import CorpusError
from pipeline.log import human_bytes, human_time
from teacher_cache.capture import capture_shard, prepare_batch
from teacher_cache.codec_fit import measure_codec
from teacher_cache.config import CacheConfig, CorpusConfig
from teacher_cache.corpus.packing import PackedSplit, Packer, special_frame
from teacher_cache.corpus.prepare import _split_documents
from teacher_cache.corpus.sources import load_documents
from teacher_cache.masking import make_spec, token_counts
from teacher_cache.plan import check_compatible, plan_fields, plan_layouts
from teacher_cache.teacher import Teacher, load_teacher

SAMPLE_DOCS = 2000
"""Documents tokenized to estimate a corpus; fewer than this are all counted (an exact count)."""
INDEX_OBJECTS = 6
"""Objects besides shard files and commit records: header, manifest, shard table, token counts."""


def _sample(docs, n: int, seed: int) -> tuple[list[list[int]], int]:
    """(token ids of up to n seeded documents, the corpus's document count)."""
    total = len(docs)
    rows = np.sort(permutation(seed, STREAM_SHUFFLE, total)[: min(n, total)]) if total > n else np.arange(total)
    return [list(map(int, x)) for x in docs.select(rows)["ids"]], total


def _tokenize(docs, tokenizer) -> object:
    def ids(batch: dict) -> dict:
        return {"ids": tokenizer(batch["text"], add_special_tokens=False)["input_ids"]}

    return docs.map(ids, batched=True, remove_columns=docs.column_names, desc="plan: tokenizing")


def count_corpus(cfg: CacheConfig, teacher: Teacher, tokens: float | None) -> tuple[dict, list[list[int]]]:
    """Documents, tokens and packed sequences per split (exact, estimated ± 2 SE, or given), and
    the sampled documents' ids for the pilot."""
    try:
        documents = load_documents(cfg.corpus, Path(cfg.store.cache_dir).expanduser())
        train, evaluation = _split_documents(*documents, cfg.corpus, cfg.seed)
    except CorpusError as exc:  # e.g. a hub corpus offline: with --tokens, the pilot needs text only
        if tokens is None:
            raise
        pilot = CorpusConfig(source="python-docs", max_seq_len=cfg.corpus.max_seq_len)
        train, evaluation = load_documents(pilot, Path(cfg.store.cache_dir).expanduser())[0], None
        note = f"pilot text from python-docs (the configured corpus did not load: {str(exc).splitlines()[0][:80]})"
    else:
        note = "pilot text from the configured corpus"
    prefix, suffix, sep = special_frame(teacher.tokenizer)
    content = cfg.corpus.max_seq_len - len(prefix) - len(suffix)
    out, sample = {"note": note}, []
    for name, docs in (("train", train), ("eval", evaluation)):
        if docs is None or len(docs) == 0:
            continue
        ids, n_docs = _sample(_tokenize(docs, teacher.tokenizer), SAMPLE_DOCS, cfg.seed)
        lengths = np.array([len(x) for x in ids], dtype=np.float64)
        exact = len(ids) == n_docs
        mean, se = lengths.mean(), (0.0 if exact else lengths.std(ddof=1) / math.sqrt(len(ids)))
        doc_tokens = tokens if (tokens is not None and name == "train") else n_docs * mean
        docs_est = doc_tokens / max(mean, 1e-9)
        stream = doc_tokens + (docs_est - 1 if sep is not None else 0)
        how = "given (--tokens)" if tokens is not None and name == "train" else ("exact" if exact else "estimated")
        out[name] = {
            "documents": round(docs_est),
            "tokens": round(doc_tokens),
            "tokens_error": 0 if how != "estimated" else round(2 * n_docs * se),
            "sequences": math.ceil(stream / content),
            "how": how,
        }
        sample += ids if name == "train" else []
    return out, sample


def _pilot_rows(sample: list[list[int]], teacher: Teacher, length: int, n: int) -> PackedSplit:
    prefix, suffix, sep = special_frame(teacher.tokenizer)
    pad = teacher.tokenizer.pad_token_id or 0
    packer, rows = Packer(length, prefix, suffix, sep, pad), []
    for doc in sample:
        rows.extend(packer.add(np.asarray(doc, dtype=np.int64), np.array([len(doc)])))
        if len(rows) >= n:
            break
    rows = np.asarray(rows[:n] or packer.finish(), dtype=np.int64)
    lengths = (rows != pad).sum(1).astype(np.int32)
    return PackedSplit(rows, lengths)


def _pilot(
    cfg: CacheConfig, teacher: Teacher, rows: PackedSplit, fields: list[FieldSpec], fit: Fit = None
) -> tuple[dict, float]:
    """The capture loop over the pilot rows: (field -> stored (n, ...) array, seconds)."""
    spec = make_spec(
        teacher.vocab_size,
        teacher.tokenizer.all_special_ids,
        teacher.tokenizer.mask_token_id,
        cfg.masking.mask_prob,
        cfg.masking.mask_token_prob,
        cfg.masking.random_token_prob,
        token_counts(rows.ids, teacher.vocab_size),
        cfg.masking.smoothing,
    )
    n, size = len(rows.ids), cfg.teacher.batch_size
    buf = {f.name: np.zeros((n, *f.row_shape), dtype=f.dtype) for f in fields}
    seq, view = np.arange(n), np.zeros(n, dtype=np.uint8)

    def batches(lo: int, hi: int):
        for a in range(lo, hi, size):
            b = min(a + size, hi)
            yield prepare_batch(rows, seq[a:b], view[a:b], cfg.seed, spec, cfg.outputs, slice(a, b))

    capture_shard(teacher, batches(0, min(size, n)), buf, cfg, lambda b: None, fit=fit)  # warm-up
    start = time.perf_counter()
    capture_shard(teacher, batches(0, n), buf, cfg, lambda b: None, fit=fit)
    return buf, time.perf_counter() - start


def stored_bytes(values: np.ndarray, codec: str, block_rows: int) -> float:
    """Bytes per row of a field as written: each block Blosc-compressed with the field's codec
    (or raw), plus its 4-byte CRC32C."""
    blosc = blosc_for(codec)
    total = 0
    for a in range(0, len(values), block_rows):
        block = np.ascontiguousarray(values[a : a + block_rows])
        if blosc is None:
            total += block.nbytes + 4
        else:
            c = blosc.to_dict()["configuration"]
            shuffle = {"noshuffle": Blosc.NOSHUFFLE, "shuffle": Blosc.SHUFFLE, "bitshuffle": Blosc.BITSHUFFLE}
            total += len(Blosc(c["cname"], c["clevel"], shuffle[c["shuffle"]]).encode(block)) + 4
    return total / len(values)


def _hidden_choices(cfg: CacheConfig, teacher: Teacher, hidden: np.ndarray, lengths: np.ndarray) -> list[dict]:
    """Bytes per token of each hidden codec and the KL (T = 1) by which it moves the rebuilt
    logits; the fitted codecs are fitted on the first half of the pilot and measured on the rest."""
    valid = torch.from_numpy(valid_positions(lengths, hidden.shape[1]))
    h = torch.from_numpy(hidden).float()
    half = max(1, len(h) // 2)
    fit_on, tokens = h[:half][valid[:half]], h[valid]
    held_out = h[half:][valid[half:]] if len(h) > 1 else tokens
    head = find_head(teacher.model)
    out = []
    for codec in HIDDEN_CODECS:
        codes = codes_for(h.shape[-1], cfg.outputs.hidden_codes) if codec in FITTED_CODECS else 0
        if codec in FITTED_CODECS and (check_codes(codec, h.shape[-1], codes) or len(fit_on) < CENTROIDS):
            continue
        fit = fit_hidden(codec, fit_on, codes, cfg.seed) if codec in FITTED_CODECS else None
        sample = held_out if fit is not None else tokens
        row = measure_codec(head, sample, codec, fit, teacher.device, teacher.dtype)
        stored, scale = encode_hidden(h, codec, fit)
        per_row = stored_bytes(stored, "raw", cfg.store.block_rows) + (
            stored_bytes(scale, "lse", cfg.store.block_rows) if scale is not None else 0
        )
        out.append({"hidden_dtype": codec, "codes": codes, "bytes_per_token": per_row / float(lengths.mean()), **row})
    return out


def _settled(cfg: CacheConfig, choices: list[dict], full: dict) -> tuple[CacheConfig, Fit]:
    """`cfg` with its hidden codec as capture would settle it (auto: the fewest bytes within the
    budget on this pilot) and, for a fitted codec, its fit on the whole pilot."""
    out = copy.deepcopy(cfg)
    if out.outputs.hidden_dtype == "auto":
        within = [c for c in choices if c["rebuilt_kl_t1"] <= cfg.outputs.fidelity_budget] or choices[-1:]
        out.outputs.hidden_dtype = min(within, key=lambda c: c["bytes_per_token"])["hidden_dtype"]
    if out.outputs.hidden_dtype not in FITTED_CODECS:
        return out, None
    h = torch.from_numpy(full["hidden"]).float()
    tokens = h[torch.from_numpy(valid_positions(full["lengths"], h.shape[1]))]
    out.outputs.hidden_codes = codes_for(h.shape[-1], cfg.outputs.hidden_codes)
    return out, fit_hidden(out.outputs.hidden_dtype, tokens, out.outputs.hidden_codes, cfg.seed)


def run_plan(cfg: CacheConfig, tokens: float | None = None, pilot_sequences: int = 128) -> dict:
    """The plan of `cfg` as a dict (see the module docstring)."""
    teacher = load_teacher(cfg.teacher)
    check_compatible(cfg, teacher)
    counts, sample = count_corpus(cfg, teacher, tokens)
    rows = _pilot_rows(sample, teacher, cfg.corpus.max_seq_len, pilot_sequences)
    both = copy.deepcopy(cfg)
    both.outputs.logits, both.outputs.hidden_dtype = ("both" if find_head(teacher.model) else "topk"), "float32"
    full_fields = plan_fields(both, teacher)
    full, _ = _pilot(both, teacher, rows, full_fields)
    hidden_choices = _hidden_choices(cfg, teacher, full["hidden"], full["lengths"])
    cfg, fit = _settled(cfg, hidden_choices, full)
    fields = plan_fields(cfg, teacher)
    buf, seconds = _pilot(cfg, teacher, rows, fields, fit)
    pilot_tokens = int(rows.lengths.sum())
    per_token_len = pilot_tokens / len(rows.ids)
    layouts = plan_layouts(cfg, fields, {n: c["sequences"] for n, c in counts.items() if n in ("train", "eval")})
    cached_rows = sum(lay.rows for lay in layouts.values())
    shards = sum(lay.shards for lay in layouts.values())
    # every shard file ends in its index: 16 bytes a chunk and a CRC
    index = sum(lay.shards * (16 * (lay.shard_rows // lay.block_rows) + 4) for lay in layouts.values())
    per_field = {}
    for f in fields:
        per_row = stored_bytes(buf[f.name], f.codec, cfg.store.block_rows)
        total = per_row * cached_rows + index
        per_field[f.name] = {"bytes": total, "bytes_per_token": total / (cached_rows * per_token_len)}
    total = sum(v["bytes"] for v in per_field.values())
    rate = pilot_tokens / seconds
    sparse = {
        f.name: stored_bytes(full[f.name], f.codec, cfg.store.block_rows) / per_token_len
        for f in full_fields
        if f.name in ("topk_values", "topk_indices", "logsumexp", "sample_ids", "sample_counts")
    }
    return {
        "config": {"teacher": cfg.teacher.name, "outputs": asdict(cfg.outputs), "views": cfg.masking.views},
        "corpus": counts,
        "layout": {n: lay.to_dict() for n, lay in layouts.items()},
        "rows": cached_rows,
        "tokens_cached": int(cached_rows * per_token_len),
        "shards": shards,
        "objects": shards * (len(fields) + 1) + len(fields) * len(layouts) + INDEX_OBJECTS,
        "fields": per_field,
        "bytes": total,
        "bytes_per_view": total / max(cfg.masking.views, 1),
        "pilot": {
            "sequences": len(rows.ids),
            "tokens": pilot_tokens,
            "seconds": seconds,
            "device": str(teacher.device),
        },
        "capture_tok_s": rate,
        "capture_seconds": cached_rows * per_token_len / rate,
        "choices": {
            "hidden": hidden_choices,
            "sparse_bytes_per_token": sparse,
            "k": cfg.outputs.k,
            "n_samples": cfg.outputs.n_samples,
        },
    }


def plan_text(p: dict) -> str:
    """The plan as tables."""
    lines = [f"pipeline plan: {p['config']['teacher']} ({p['corpus']['note']})", "", "corpus"]
    for name in ("train", "eval"):
        c = p["corpus"].get(name)
        if c:
            err = f" ± {c['tokens_error']:,}" if c["tokens_error"] else ""
            lines.append(f"  {name:<6}{c['tokens']:>16,} tokens{err} ({c['how']}), {c['sequences']:,} packed sequences")
    views = p["config"]["views"]
    lines += [
        "",
        f"cache: {p['rows']:,} rows ({views} view(s) of train), {p['tokens_cached']:,} tokens, {p['shards']:,} shards, "
        f"{p['objects']:,} files/objects",
        f"  {'field':<16}{'B/token':>10}{'bytes':>12}",
    ]
    for name, f in p["fields"].items():
        lines.append(f"  {name:<16}{f['bytes_per_token']:>10.1f}{human_bytes(f['bytes']):>12}")
    lines += [
        f"  {'total':<16}{p['bytes'] / max(p['tokens_cached'], 1):>10.1f}{human_bytes(p['bytes']):>12}"
        f"   ({human_bytes(p['bytes_per_view'])} per view)",
        "",
        f"capture: {p['capture_tok_s']:,.0f} tok/s on {p['pilot']['device']} (a pilot of "
        f"{p['pilot']['tokens']:,} tokens) -> {human_time(p['capture_seconds'])} for the cache on this device",
        "",
        "choices that change the bytes (B/token, from the same pilot)",
        f"  views: {views} now; each view adds the train split's rows again",
    ]
    for h in p["choices"]["hidden"]:
        kl = "n/a (no head)" if math.isnan(h["rebuilt_kl_t1"]) else f"{h['rebuilt_kl_t1']:.2e}"
        name = f"{h['hidden_dtype']}-{h['codes']}" if h["codes"] else h["hidden_dtype"]
        lines.append(f"  hidden_dtype {name:<8}{h['bytes_per_token']:>8.1f}   rebuilt-logit KL (T=1) {kl}")
    s = p["choices"]["sparse_bytes_per_token"]
    topk = sum(s.get(n, 0.0) for n in ("topk_values", "topk_indices", "logsumexp"))
    sampled = sum(s.get(n, 0.0) for n in ("sample_ids", "sample_counts"))
    lines += [
        f"  logits none: +0 (exact KD rebuilds them from the hidden states)   topk (k={p['choices']['k']}): "
        f"+{topk:.1f}   sampled ({p['choices']['n_samples']} draws): +{sampled:.1f}   both: +{topk + sampled:.1f}",
        "  top-k bytes scale with k (values and ids: about linear)",
    ]
    return "\n".join(lines)
