"""Everything decided before the first forward: the cache's identity, location and geometry."""

from __future__ import annotations

import hashlib
import logging
import re
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from safetensors.torch import save as safetensors_bytes

from cache_format.fitted import FIT_FILE, FITTED_CODECS
from cache_format.head import HEAD_FILE, find_head, head_state
from cache_format.layout import FieldSpec, SplitLayout, field_specs, shard_rows_for
from cache_format.manifest import make_header
from cache_format.settings import OutputsConfig
from cache_format.store import FORMAT_VERSION, TEACHER_DIR
from pipeline.config import to_dict
from pipeline.errors import TeacherError
from teacher_cache.codec_fit import HiddenChoice
from teacher_cache.config import CacheConfig
from teacher_cache.corpus import PackedCorpus
from teacher_cache.teacher import Teacher

log = logging.getLogger(__name__)


@dataclass
class CachePlan:
    """Everything decided before the first forward: identity, path and geometry."""

    location: str
    """Where the cache goes: store.output, or <cache_dir>/<teacher>-<fingerprint[:12]>."""
    header: dict
    fields: list[FieldSpec]
    layouts: dict[str, SplitLayout]
    side_files: dict[str, bytes] = field(default_factory=dict)
    """The teacher files stage two needs (config, MLM head, tokenizer, a fitted hidden codec's
    tensors) by storage key, in memory: nothing is written before free space has been checked."""

    @property
    def fingerprint(self) -> str:
        return self.header["fingerprint"]


def plan_fields(cfg: CacheConfig, teacher: Teacher, outputs: OutputsConfig | None = None) -> list[FieldSpec]:
    """The fields a cache of `cfg` (or of other `outputs`) stores for this teacher."""
    out = outputs or cfg.outputs
    # every id that can be stored: the tokenizer's, and the model's (random replacement tokens,
    # top-k and sampled ids range over its vocabulary, which may be larger)
    largest_id = max(teacher.vocab_size, len(teacher.tokenizer)) - 1
    ids_dtype = "uint16" if largest_id <= np.iinfo(np.uint16).max else "int32"
    return field_specs(
        cfg.corpus.max_seq_len,
        out.k,
        len(out.temperatures),
        teacher.hidden_size,
        ids_dtype,
        out.logits_dtype,
        out.hidden_dtype,
        out.logits,
        out.n_samples,
        out.hidden_codes,
    )


def plan_layouts(cfg: CacheConfig, fields: list[FieldSpec], packed: dict[str, int]) -> dict[str, SplitLayout]:
    """Rows and shards of each split, from the packed sequences each has (`packed`)."""
    layouts = {}
    for name, limit, views in (("train", cfg.max_sequences, cfg.masking.views), ("eval", cfg.max_eval_sequences, 1)):
        if not packed.get(name):
            continue
        n = packed[name] if limit is None else min(limit, packed[name])
        shard_rows = cfg.store.shard_rows or shard_rows_for(fields, cfg.store.block_rows, cfg.store.shard_mb, n * views)
        layouts[name] = SplitLayout(name, n, views, cfg.store.block_rows, shard_rows)
    return layouts


def identity_outputs(outputs: OutputsConfig) -> dict:
    """The outputs settings that shape the cached values: the pilot and code bytes only for a fitted
    codec, the budget never (what `auto` chose is the codec itself)."""
    out = asdict(outputs)
    out.pop("fidelity_budget")
    if outputs.hidden_dtype not in FITTED_CODECS:
        out.pop("hidden_codes")
        out.pop("pilot_sequences")
    return out


def build_plan(
    cfg: CacheConfig, teacher: Teacher, corpus: PackedCorpus, choice: HiddenChoice | None = None
) -> CachePlan:
    """The plan of `cfg`, with its hidden codec settled by `choice` (the configured one if None)."""
    choice = choice or HiddenChoice(cfg.outputs)
    fields = plan_fields(cfg, teacher, choice.outputs)
    packed = {n: len(split.ids) for n, split in (("train", corpus.train), ("eval", corpus.eval)) if split is not None}
    layouts = plan_layouts(cfg, fields, packed)
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
        "outputs": identity_outputs(choice.outputs),
        "layout": {n: [lay.block_rows, lay.shard_rows] for n, lay in layouts.items()},
    }
    side = teacher_files(teacher)
    if choice.fit_file is not None:  # the fitted tensors are part of what the cache is
        identity["hidden_fit_sha256"] = choice.record["fit_sha256"]
        side[f"{TEACHER_DIR}/{FIT_FILE}"] = choice.fit_file
    header = make_header(
        identity, layouts, fields, _teacher_info(cfg, teacher), _tokenizer_info(teacher), corpus.meta, recorded(cfg)
    )
    if choice.record is not None:
        header["hidden_codec"] = choice.record
    header["side_files"] = file_records(side)  # what a follower checks them against before the manifest
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(cfg.teacher.name.rstrip("/")).name) or "teacher"
    default = Path(cfg.store.cache_dir).expanduser() / f"{slug}-{header['fingerprint'][:12]}"
    return CachePlan(str(cfg.store.output or default), header, fields, layouts, side)


def teacher_files(teacher: Teacher) -> dict[str, bytes]:
    """The teacher's config, MLM head and tokenizer files by storage key."""
    files: dict[str, bytes] = {}
    head = find_head(teacher.model)
    if head is None:
        log.warning(
            "unknown MLM head for %s: the cache cannot rebuild exact logits (kd mode `exact`)",
            teacher.model.config.model_type,
        )
    else:
        files[f"{TEACHER_DIR}/{HEAD_FILE}"] = safetensors_bytes(head_state(head))
    with tempfile.TemporaryDirectory() as tmp:  # config and tokenizer files: a few MB at most
        directory = Path(tmp)
        teacher.model.config.save_pretrained(directory)
        teacher.tokenizer.save_pretrained(directory)
        for path in sorted(directory.rglob("*")):
            if path.is_file():
                files[f"{TEACHER_DIR}/{path.relative_to(directory).as_posix()}"] = path.read_bytes()
    return files


def file_records(files: dict[str, bytes]) -> dict[str, dict]:
    """{key: {bytes, sha256}} of in-memory files (what the header and the manifest record)."""
    return {k: {"bytes": len(v), "sha256": hashlib.sha256(v).hexdigest()} for k, v in sorted(files.items())}


def recorded(cfg: CacheConfig) -> dict:
    """The resolved config as the header and manifest record it: without storage options (endpoints
    and credentials belong to the machine that reads, not to the cache)."""
    out = to_dict(cfg)
    out["store"].pop("storage_options", None)
    return out


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
    if len(teacher.tokenizer) > teacher.vocab_size:
        problems.append(
            f"teacher.name: its tokenizer has {len(teacher.tokenizer):,} tokens but the model's vocabulary "
            f"{teacher.vocab_size:,}: ids from {teacher.vocab_size:,} up have no embedding; use the tokenizer the "
            "model was trained with, or resize its embeddings and save it again"
        )
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
