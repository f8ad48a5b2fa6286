"""The packed corpus, built once per (content, tokenizer, packing) and cached on disk under
`<cache_dir>/corpus/<fingerprint>/`; the held-out split is a seeded set of documents."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np

from cache_format.rng import STREAM_EVAL_SPLIT, permutation
from pipeline.errors import CorpusError
from teacher_cache.config import CorpusConfig
from teacher_cache.corpus.packing import PackedCorpus, PackedSplit, _tokenize, pack_split
from teacher_cache.corpus.sources import load_documents, source_fingerprint
from teacher_cache.masking import token_counts

log = logging.getLogger(__name__)

CORPUS_FORMAT = 1


def _drop_blank(docs):
    return docs.filter(
        lambda batch: [bool(t) and not t.isspace() for t in batch["text"]],
        batched=True,
        desc="dropping blank documents",
    )


def _split_documents(train, evaluation, cfg: CorpusConfig, seed: int):
    """Apply max_documents and carve the eval_fraction hold-out (a seeded set of documents)."""
    train = _drop_blank(train)
    if evaluation is not None:
        evaluation = _drop_blank(evaluation)
    if cfg.max_documents is not None:
        train = train.select(range(min(cfg.max_documents, len(train))))
    if len(train) == 0:
        raise CorpusError(f"corpus: no text found in {_describe(cfg)}; point corpus.paths at text")
    if cfg.eval_fraction:
        if len(train) < 2:
            raise CorpusError("corpus.eval_fraction needs at least 2 documents")
        n_eval = max(1, round(cfg.eval_fraction * len(train)))
        held = np.sort(permutation(seed, STREAM_EVAL_SPLIT, len(train))[:n_eval])
        keep = np.setdiff1d(np.arange(len(train)), held)
        train, evaluation = train.select(keep), train.select(held)
    return train, evaluation


def _describe(cfg: CorpusConfig) -> str:
    if cfg.source in ("files", "disk"):
        return ", ".join(cfg.paths)
    return cfg.name or cfg.source


def prepare_corpus(cfg: CorpusConfig, tokenizer, tokenizer_hash: str, cache_dir: str | Path, seed: int) -> PackedCorpus:
    """Packed train (and eval) sequences for this corpus and tokenizer, built once and cached."""
    cache_dir = Path(cache_dir).expanduser()
    key = {
        "format": CORPUS_FORMAT,
        "source": source_fingerprint(cfg, cache_dir),
        "tokenizer": tokenizer_hash,
        "max_seq_len": cfg.max_seq_len,
        "sample_by": cfg.sample_by,
        "text_column": cfg.text_column,
        "max_documents": cfg.max_documents,
        "eval_fraction": cfg.eval_fraction,
        "eval_seed": seed if cfg.eval_fraction else None,
    }
    fp = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    out = cache_dir / "corpus" / fp[:20]
    if not (out / "meta.json").is_file():
        tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
        try:
            _build(cfg, tokenizer, key, fp, out, tmp, cache_dir, seed)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # a failed build leaves nothing behind
    else:
        log.info("packed corpus: reusing %s", out)
    return _open(out)


def _build(cfg, tokenizer, key: dict, fp: str, out: Path, tmp: Path, cache_dir: Path, seed: int) -> None:
    train, evaluation = _split_documents(*load_documents(cfg, cache_dir), cfg, seed)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    meta = {"fingerprint": fp, "key": key, "documents": {}, "sequences": {}, "tokens": {}}
    splits = {"train": train, "eval": evaluation}
    for name, docs in splits.items():
        if docs is None:
            continue
        tokenized = _tokenize(docs, tokenizer, cfg.num_proc, f"{fp[:16]}-{name}")
        if len(tokenized) == 0 or "ids" not in tokenized.column_names:  # every document tokenized to nothing
            raise CorpusError(
                f"corpus: the {name} documents of {_describe(cfg)} ({len(docs)} non-blank) yield no tokens with the "
                "teacher's tokenizer (control or zero-width characters only?); give it real text"
            )
        packed = pack_split(tokenized, tokenizer, cfg.max_seq_len, tmp, name)
        meta["documents"][name] = len(docs)
        meta["sequences"][name] = len(packed.ids)
        meta["tokens"][name] = int(packed.lengths.sum())
        if name == "train":
            np.save(tmp / "train_counts.npy", token_counts(packed.ids, len(tokenizer)))
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    log.info(
        "packed corpus: %s train sequences (%s tokens) -> %s", meta["sequences"]["train"], meta["tokens"]["train"], out
    )


def _open(out: Path) -> PackedCorpus:
    meta = json.loads((out / "meta.json").read_text())

    def split(name: str) -> PackedSplit | None:
        if not (out / f"{name}.npy").is_file():
            return None
        return PackedSplit(np.load(out / f"{name}.npy", mmap_mode="r"), np.load(out / f"{name}_lengths.npy"))

    train = split("train")
    assert train is not None
    return PackedCorpus(meta["fingerprint"], meta, train, split("eval"), np.load(out / "train_counts.npy"))
