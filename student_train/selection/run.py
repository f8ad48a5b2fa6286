"""`pipeline select`: read every block of a split once, score each sequence, write the selection.

The teacher's signals come from the cache (exact logits rebuilt from the cached hidden states
through the cached head, only at the positions a score needs); the `miniplm` reference runs on the
cached (masked) input ids. Nothing in the cache is rewritten: the selection is two files under
`selections/` (cache_format.selection).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import MISSING, fields

import numpy as np
import torch
from tqdm import tqdm

from cache_format.head import LOAD_ERRORS
from cache_format.hidden import decode_hidden_tensor
from cache_format.layout import valid_positions
from cache_format.reader import CacheReader
from cache_format.rng import STREAM_SEQUENCES, uniforms
from cache_format.selection import (
    FORMAT,
    FORMAT_VERSION,
    encode_arrays,
    list_selections,
    read_record,
    record_key,
    write_selection,
)
from cache_format.settings import IGNORE_INDEX
from pipeline.config import to_dict
from pipeline.errors import DistilcacheError, first_line
from pipeline.versions import library_versions
from student_train.model import head_logits, load_cached_teacher
from student_train.selection import scores
from student_train.selection.config import SelectConfig

log = logging.getLogger(__name__)
IDENTITY_KEYS = ("split", "score", "keep", "fraction", "reference", "seed", "token_scores")
"""The config keys that decide a selection's contents (with the cache's fingerprint)."""
IDENTITY_DEFAULTS = {
    f.name: f.default for f in fields(SelectConfig) if f.name in IDENTITY_KEYS and f.default is not MISSING
}
"""A record written before a key existed was made with its default (e.g. `token_scores` false)."""

Reference = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""(input ids (B, L), attention mask (B, L), positions (B, L) bool) -> (n, V) logits there."""


def run_select(cfg: SelectConfig, overwrite: bool = False) -> dict:
    """Score, select, write; returns the selection's record (an identical existing one is reused)."""
    reader = CacheReader(cfg.cache, storage_options=cfg.storage_options or None)
    name, fp = cfg.selection_name, reader.settings.fingerprint
    if cfg.split not in reader.splits:
        splits = ", ".join(reader.splits)
        raise DistilcacheError(f"split {cfg.split!r} is not in the cache (splits: {splits}); pick one")
    if reader.storage.exists(record_key(name)) and not overwrite:
        old = read_record(reader.storage, name)
        identity = {**IDENTITY_DEFAULTS, **old.get("config", {}).get("identity", {})}
        if old.get("cache_fingerprint") == fp and identity == _identity(cfg):
            log.info("selection %s exists with the same config: reused", name)
            return old
        raise DistilcacheError(
            f"selection {name!r} exists beside {reader.url} with another config or cache; "
            "pick another name (--name) or replace it with --overwrite"
        )
    if cfg.score != "random" and not reader.settings.head:
        raise DistilcacheError(
            f"score {cfg.score} rebuilds the teacher's logits through the cached MLM head, and {reader.url} has none; "
            "use --score random or a cache built with the head"
        )
    device = torch.device(cfg.device if cfg.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    start = time.perf_counter()
    sequence_index, sums, counts, token_score = _score_rows(reader, cfg, device)
    sequences, score, where = scores.per_sequence(sequence_index, sums, counts)
    if cfg.score == "random":
        score = uniforms(cfg.seed, STREAM_SEQUENCES, 0, sequences, 1)[:, 0]
    kept = scores.keep_sequences(score, sequences, cfg.fraction, cfg.keep == "highest")
    keep_rows = kept[where]
    record = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": name,
        "cache": reader.url,
        "cache_fingerprint": fp,
        "split": cfg.split,
        "unit": "sequence (every mask view of a kept sequence is kept)",
        "score": cfg.score,
        "keep": cfg.keep,
        "fraction": cfg.fraction,
        "reference": cfg.reference,
        "sequences": len(sequences),
        "kept_sequences": int(kept.sum()),
        "rows": len(keep_rows),
        "kept_rows": int(keep_rows.sum()),
        "token_scores": cfg.token_scores,
        "score_mean": {"kept": _mean(score[kept]), "dropped": _mean(score[~kept])},
        "seconds": round(time.perf_counter() - start, 2),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": library_versions(),
        "config": {"identity": _identity(cfg), "select": to_dict(cfg)},
    }
    data = encode_arrays(keep_rows, sequences, score.astype(np.float32), kept, token_score)
    record = write_selection(reader.storage, record, data)
    means = {k: "none" if v is None else f"{v:.4g}" for k, v in record["score_mean"].items()}  # none: all kept
    log.info(
        "selection %s: kept %d of %d sequences (%d of %d rows) by %s (%s), mean score kept %s vs dropped %s, "
        "in %.1f s; train with --set data.selection=%s",
        name, record["kept_sequences"], record["sequences"], record["kept_rows"], record["rows"], cfg.score,
        cfg.keep, means["kept"], means["dropped"], record["seconds"], name,
    )  # fmt: skip
    others = [n for n in list_selections(reader.storage) if n != name]
    if others:
        log.info("other selections beside this cache: %s", ", ".join(others))
    return record


def _identity(cfg: SelectConfig) -> dict:
    return {k: getattr(cfg, k) for k in IDENTITY_KEYS}


def _mean(x: np.ndarray) -> float | None:
    x = x[~np.isnan(x)]
    return float(x.mean()) if len(x) else None


@torch.no_grad()
def _score_rows(reader: CacheReader, cfg: SelectConfig, device: torch.device):
    """(sequence index, score sum, scored tokens) of every row of the split, block by block, and with
    `token_scores` each token's signal ((rows, L) float16, NaN where unscored)."""
    layout = reader.layouts[cfg.split]
    teacher = cfg.score != "random"
    names = ["input_ids", "labels", "lengths", "sequence_index"]
    if teacher:
        names += [n for n in ("hidden", "hidden_scale") if n in reader.fields]
    head = reader.head(device) if teacher else None
    fit = reader.hidden_fit()
    fit = None if fit is None else {k: v.to(device) for k, v in fit.items()}
    reference = _reference(reader, cfg, device) if cfg.score == "miniplm" else None
    sequence_index = np.empty(layout.rows, dtype=np.int64)
    sums, counts = np.zeros(layout.rows), np.zeros(layout.rows)
    length = reader.fields["input_ids"].row_shape[0]
    token_score = np.full((layout.rows, length), np.nan, np.float16) if cfg.token_scores else None
    dtype = reader.settings.outputs.hidden_dtype
    bar = tqdm(total=layout.rows, unit="seq", desc=f"select {cfg.score}", mininterval=1.0)
    for block in range(layout.blocks):
        d = reader.read_block(cfg.split, block, names)
        a = block * layout.block_rows
        n = len(d["lengths"])
        sequence_index[a : a + n] = d["sequence_index"]
        bar.update(n)
        if not teacher:
            continue
        ids = torch.from_numpy(d["input_ids"].astype(np.int64)).to(device)
        labels = torch.from_numpy(d["labels"].astype(np.int64)).to(device)
        valid = valid_positions(torch.from_numpy(d["lengths"]).to(device), ids.shape[1])
        at = valid if cfg.score == "entropy" else (labels != IGNORE_INDEX) & valid
        scale = d.get("hidden_scale")
        hidden = decode_hidden_tensor(
            torch.from_numpy(d["hidden"]).to(device), None if scale is None else torch.from_numpy(scale).to(device),
            dtype, fit,
        )[at]  # fmt: skip
        target = labels[at]
        values = torch.cat([
            _signal(cfg.score, head(hidden[i : i + cfg.chunk_tokens]), target[i : i + cfg.chunk_tokens])
            for i in range(0, len(hidden), cfg.chunk_tokens)
        ]) if len(hidden) else torch.zeros(0, device=device)  # fmt: skip
        if reference is not None:
            ref = reference(ids, valid.long(), at)
            values = values - torch.cat([
                scores.label_log_probs(ref[i : i + cfg.chunk_tokens], target[i : i + cfg.chunk_tokens])
                for i in range(0, len(ref), cfg.chunk_tokens)
            ]) if len(ref) else values  # fmt: skip
        row_sums, row_counts = scores.per_row(values, at.nonzero()[:, 0], n)
        sums[a : a + n], counts[a : a + n] = row_sums, row_counts
        if token_score is not None:
            token_score[a : a + n][at.cpu().numpy()] = values.cpu().numpy().astype(np.float16)
    bar.close()
    return sequence_index, sums, counts, token_score


def _signal(score: str, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The teacher's per-token signal of a score: its loss, its entropy, or its log-likelihood."""
    if score == "entropy":
        return scores.entropy(logits)
    log_p = scores.label_log_probs(logits, labels)
    return -log_p if score == "teacher_loss" else log_p


def _reference(reader: CacheReader, cfg: SelectConfig, device: torch.device) -> Reference:
    """The reference MLM of `miniplm` as a function of a block's inputs: the cached teacher cut to
    its first N layers under the cached head (`teacher:N`), or a model given by name or path."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from cache_format.hashing import tokenizer_sha256

    spec = str(cfg.reference)
    if spec.startswith("teacher:"):
        layers = int(spec.split(":", 1)[1])
        model = load_cached_teacher(reader.settings.teacher, cfg.teacher, "select.teacher", "reference: teacher:N")
        encoder = model.base_model.encoder.layer
        if not 1 <= layers < len(encoder):
            raise DistilcacheError(
                f"reference teacher:{layers}: the teacher has {len(encoder)} layers; keep 1 to {len(encoder) - 1}"
            )
        model.base_model.encoder.layer = encoder[:layers]
        head = reader.head(device)
        base = model.base_model.to(device).eval()
        return lambda ids, mask, at: head(base(input_ids=ids, attention_mask=mask).last_hidden_state[at])
    try:
        model = AutoModelForMaskedLM.from_pretrained(spec)
        tokenizer = AutoTokenizer.from_pretrained(spec)
    except LOAD_ERRORS as exc:
        raise DistilcacheError(
            f"reference {spec!r} does not load as a masked LM with its tokenizer ({first_line(exc)}); "
            "give a save_pretrained directory holding both, or teacher:N"
        ) from None
    if tokenizer_sha256(tokenizer) != reader.settings.tokenizer.sha256:
        raise DistilcacheError(
            f"reference {spec!r} uses another tokenizer than the cache's teacher (its ids would mean other tokens); "
            "give a reference trained with the teacher's tokenizer, or teacher:N"
        )
    model = model.to(device).eval()
    return lambda ids, mask, at: head_logits(model, model.base_model(input_ids=ids, attention_mask=mask)[0][at])
