"""The hidden codec of a capture, settled before its first shard: a pilot of the plan's first
train sequences runs through the teacher; fitted codecs (`pq`, `pca`) are fitted on it, and
`hidden_dtype: auto` measures every codec on it and keeps the fewest bytes within
`outputs.fidelity_budget`.

The pilot is the first `outputs.pilot_sequences` rows of the train plan, masked as view 0
(what shard 0 begins with), so every process that plans the cache fits the same tensors.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import dataclass, replace

import numpy as np
import torch

from cache_format.fitted import CENTROIDS, FITTED_CODECS, check_codes, fit_bytes, fit_hidden
from cache_format.head import find_head
from cache_format.hidden import HIDDEN_CODECS, Fit, codes_for, decode_hidden_tensor, encode_hidden, storage_dtype
from cache_format.hidden import stored_hidden_width as hidden_width
from cache_format.layout import plan_rows, split_seed, valid_positions
from cache_format.settings import OutputsConfig
from pipeline.errors import ConfigError
from teacher_cache.config import CacheConfig
from teacher_cache.corpus import PackedCorpus
from teacher_cache.masking import MaskSpec, mask_batch
from teacher_cache.teacher import Teacher

log = logging.getLogger(__name__)
HEAD_CHUNK = 1024
"""Pilot tokens whose rebuilt logits are held at once (1024 x V fp32: 125 MB at V = 30,522)."""


@dataclass
class HiddenChoice:
    """The resolved hidden codec: its outputs settings, fitted tensors and what the header records."""

    outputs: OutputsConfig
    fit: Fit = None
    fit_file: bytes | None = None
    record: dict | None = None
    """The header's `hidden_codec`: codec, code bytes, fit sha256, pilot, and (auto) every candidate."""


def pilot_hidden(cfg: CacheConfig, teacher: Teacher, corpus: PackedCorpus, spec: MaskSpec) -> tuple[torch.Tensor, int]:
    """(the teacher's last hidden states (N, H) float32 at the non-pad tokens of the pilot rows,
    the number of rows)."""
    seed = split_seed(cfg.seed, "train")
    lay_n = min(len(corpus.train.ids), cfg.max_sequences or len(corpus.train.ids))
    seq, view = plan_rows(seed, len(corpus.train.ids), lay_n, 1)
    seq, view = seq[: cfg.outputs.pilot_sequences], view[: cfg.outputs.pilot_sequences]
    out = []
    for a in range(0, len(seq), cfg.teacher.batch_size):
        s, v = seq[a : a + cfg.teacher.batch_size], view[a : a + cfg.teacher.batch_size]
        ids = np.asarray(corpus.train.ids[s])
        masked, _ = mask_batch(ids, s, v, seed, spec)
        attention = torch.from_numpy(valid_positions(corpus.train.lengths[s], ids.shape[1]))
        with torch.no_grad():
            batch = teacher.forward(torch.from_numpy(masked.astype(np.int64)), attention.long(), attention, 0, [1.0], 1)
        out.append(batch.hidden.float().cpu()[attention])
    return torch.cat(out), len(seq)


def codec_bytes(hidden_size: int, codec: str, codes: int = 0) -> float:
    """Raw bytes a token of a hidden codec (codes and scales)."""
    width, scales = hidden_width(hidden_size, codec, codes)
    return width * np.dtype(storage_dtype(codec)[0]).itemsize + 2 * (scales or 0)


def measure_codec(head: torch.nn.Module | None, h: torch.Tensor, codec: str, fit: Fit, device, dtype) -> dict:
    """Reconstruction (cosine, relative error) and the rebuilt-logit KL(exact ‖ rebuilt) at T = 1
    and 2 and top-1 flips of one codec on hidden states `h` (N, H)."""
    stored, scale = encode_hidden(h, codec, fit)
    back = decode_hidden_tensor(
        torch.from_numpy(stored), None if scale is None else torch.from_numpy(scale), codec, fit
    )
    out = {
        "cosine": float(torch.nn.functional.cosine_similarity(back, h, dim=-1).mean()),
        "relative_error": float((back - h).norm() / h.norm().clamp(min=1e-30)),
        "rebuilt_kl_t1": math.nan,
        "rebuilt_kl_t2": math.nan,
        "top1_flips": math.nan,
    }
    if head is not None:
        sums = {1: 0.0, 2: 0.0, "flips": 0}
        for a in range(0, len(h), HEAD_CHUNK):  # (chunk, V) logits at a time, not (N, V)
            with torch.no_grad():
                ref = head(h[a : a + HEAD_CHUNK].to(device, dtype)).float()
                got = head(back[a : a + HEAD_CHUNK].to(device, dtype)).float()
            for t in (1, 2):
                p, q = torch.log_softmax(ref / t, -1), torch.log_softmax(got / t, -1)
                sums[t] += float((p.exp() * (p - q)).sum())
            sums["flips"] += int((ref.argmax(-1) != got.argmax(-1)).sum())
        for t in (1, 2):
            out[f"rebuilt_kl_t{t}"] = max(0.0, sums[t] / len(h))
        out["top1_flips"] = sums["flips"] / len(h)
    return out


def _fit(outputs: OutputsConfig, sample: torch.Tensor, seed: int) -> tuple[Fit, int]:
    codes = codes_for(sample.shape[1], outputs.hidden_codes)
    problem = check_codes(outputs.hidden_dtype, sample.shape[1], codes)
    if outputs.hidden_dtype == "pq" and len(sample) < CENTROIDS:
        problem = (
            f"outputs.hidden_dtype=pq fits 256 centroids but the pilot has {len(sample)} tokens; "
            "raise outputs.pilot_sequences"
        )
    if problem:
        raise ConfigError(problem)
    return fit_hidden(outputs.hidden_dtype, sample, codes, seed), codes


def choose_hidden(cfg: CacheConfig, teacher: Teacher, corpus: PackedCorpus, spec: MaskSpec) -> HiddenChoice:
    """Settle `cfg.outputs.hidden_dtype`: as configured (fitted on the pilot where it needs it), or
    under `auto` the codec of fewest bytes a token whose pilot KL is within the budget."""
    outputs = cfg.outputs
    if outputs.hidden_dtype not in (*FITTED_CODECS, "auto"):
        return HiddenChoice(outputs)
    start = time.perf_counter()
    sample, rows = pilot_hidden(cfg, teacher, corpus, spec)
    pilot = {"sequences": rows, "tokens": len(sample), "teacher_seconds": round(time.perf_counter() - start, 3)}
    record: dict = {"pilot": pilot}
    if outputs.hidden_dtype == "auto":
        outputs, candidates = _auto(cfg, teacher, sample)
        record.update(budget=cfg.outputs.fidelity_budget, candidates=candidates)
    record["codec"] = outputs.hidden_dtype
    if outputs.hidden_dtype not in FITTED_CODECS:
        return HiddenChoice(outputs, record=record)
    start = time.perf_counter()
    fit, codes = _fit(outputs, sample, cfg.seed)
    blob = fit_bytes(fit)
    outputs = replace(outputs, hidden_codes=codes)
    record.update(codes=codes, fit_sha256=hashlib.sha256(blob).hexdigest())
    record["fit_seconds"] = round(time.perf_counter() - start, 3)  # a one-off, before the first shard
    return HiddenChoice(outputs, fit, blob, record)


def _auto(cfg: CacheConfig, teacher: Teacher, sample: torch.Tensor) -> tuple[OutputsConfig, list[dict]]:
    head = find_head(teacher.model)
    if head is None:
        raise ConfigError(
            "outputs.hidden_dtype=auto measures the rebuilt logits, but the teacher's MLM head is not a known "
            "module; choose outputs.hidden_dtype explicitly (int8 is the default)"
        )
    candidates = []
    for codec in HIDDEN_CODECS:
        trial = replace(cfg.outputs, hidden_dtype=codec)
        if codec in FITTED_CODECS and check_codes(
            codec, sample.shape[1], codes_for(sample.shape[1], trial.hidden_codes)
        ):
            continue
        fit, codes = _fit(trial, sample, cfg.seed) if codec in FITTED_CODECS else (None, 0)
        row = {"codec": codec, "bytes_per_token": codec_bytes(sample.shape[1], codec, codes)}
        row.update(measure_codec(head, sample, codec, fit, teacher.device, teacher.dtype))
        candidates.append(row)
    within = [c for c in candidates if c["rebuilt_kl_t1"] <= cfg.outputs.fidelity_budget]
    if not within:
        raise ConfigError(
            f"outputs.fidelity_budget={cfg.outputs.fidelity_budget:g}: no hidden codec is within it on the pilot "
            f"(float32 moves the rebuilt logits by {candidates[-1]['rebuilt_kl_t1']:.2e}); raise the budget"
        )
    best = min(within, key=lambda c: (c["bytes_per_token"], c["rebuilt_kl_t1"]))
    for c in candidates:
        log.info(
            "hidden codec %-8s %7.1f B/token  rebuilt KL (T=1) %.2e%s", c["codec"], c["bytes_per_token"],
            c["rebuilt_kl_t1"], "  <- chosen" if c is best else "",
        )  # fmt: skip
    return replace(cfg.outputs, hidden_dtype=best["codec"]), candidates
