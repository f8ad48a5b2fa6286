"""Corpus -> packed fixed-length token sequences, cached on disk.

Documents come through `datasets` (local text/jsonl/json/parquet files, a save_to_disk
directory, a hub dataset, or the built-in standard-library docstrings), are tokenized with the
teacher's fast tokenizer (batched map), and packed across document boundaries into sequences
of exactly `max_seq_len` tokens wrapped in the model's special tokens. The packed arrays are
cached under `<cache_dir>/corpus/<fingerprint>/`, keyed by the corpus content, the tokenizer
and the packing parameters.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import json
import logging
import os
import shutil
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import DistilcacheError
from teacher_cache.config import CorpusConfig
from teacher_cache.docstrings import iter_python_docs, stdlib_root
from teacher_cache.masking import token_counts
from teacher_cache.rng import STREAM_EVAL_SPLIT, permutation

log = logging.getLogger(__name__)

TEXT_SUFFIXES = {
    ".txt": "text",
    ".text": "text",
    ".md": "text",
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
}
CORPUS_FORMAT = 1


class CorpusError(DistilcacheError):
    """The corpus cannot be read or yields no text."""


@dataclass
class PackedSplit:
    """(N, L) token ids padded with pad_id, and the non-pad length of each row."""

    ids: np.ndarray
    lengths: np.ndarray


@dataclass
class PackedCorpus:
    fingerprint: str
    """Hash of the corpus content, tokenizer and packing parameters."""
    meta: dict
    train: PackedSplit
    eval: PackedSplit | None
    counts: np.ndarray
    """(V,) token occurrences over the train split (for frequency-smoothed masking)."""


# ----------------------------------------------------------------------------- sources


def expand_paths(patterns: Iterable[str], key: str = "corpus.paths") -> list[Path]:
    """Expand files/globs; every pattern must match at least one file."""
    files: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        found = [Path(m) for m in matches if Path(m).is_file()]
        if not found:
            raise CorpusError(f"{key}: no file matches {pattern!r}; check the path or glob")
        files.extend(found)
    for f in files:
        if f.suffix.lower() not in TEXT_SUFFIXES:
            known = ", ".join(sorted(TEXT_SUFFIXES))
            raise CorpusError(f"{key}: {f} has an unsupported extension; use one of {known}")
    return files


def hash_files(files: list[Path]) -> str:
    """Content hash of files, checking that text formats are valid UTF-8 on the way."""
    digest = hashlib.sha256()
    for f in files:
        digest.update(f"{f.name}\0{f.stat().st_size}\0".encode())
        decoder = None if f.suffix.lower() == ".parquet" else codecs.getincrementaldecoder("utf-8")()
        offset = 0
        with f.open("rb") as fh:
            while block := fh.read(1 << 20):
                digest.update(block)
                if decoder is not None:
                    _check_text_block(f, block, decoder, offset)
                offset += len(block)
        if decoder is not None:
            _check_text_block(f, b"", decoder, offset, final=True)
    return digest.hexdigest()


def _check_text_block(f: Path, block: bytes, decoder, offset: int, final: bool = False) -> None:
    if b"\0" in block:
        raise CorpusError(
            f"corpus: {f} looks binary (NUL byte near offset {offset}); give text, jsonl or parquet files"
        )
    try:
        decoder.decode(block, final=final)
    except UnicodeDecodeError as exc:
        raise CorpusError(
            f"corpus: {f} is not UTF-8 text (invalid byte at offset {offset + exc.start}); "
            "convert it to UTF-8 or remove it"
        ) from None


def _text_documents(files: list[str], sample_by: str, content_hash: str) -> Iterator[dict]:
    """Documents of text files: each line, each paragraph (whitespace-only lines separate
    paragraphs) or each whole file. `content_hash` only keys the datasets cache."""
    del content_hash
    for name in files:
        with open(name, encoding="utf-8") as fh:
            if sample_by == "document":
                yield {"text": fh.read()}
                continue
            para: list[str] = []
            for line in fh:
                if sample_by == "line":
                    yield {"text": line.rstrip("\n")}
                elif line.strip():
                    para.append(line)
                elif para:
                    yield {"text": "".join(para)}
                    para = []
            if para:
                yield {"text": "".join(para)}


def _load_files(files: list[Path], cfg: CorpusConfig):
    import datasets

    parts = []
    by_builder: dict[str, list[str]] = {}
    for f in files:
        by_builder.setdefault(TEXT_SUFFIXES[f.suffix.lower()], []).append(str(f))
    for builder, group in by_builder.items():
        try:
            if builder == "text":
                if next(_text_documents(group, cfg.sample_by, ""), None) is None:
                    continue  # only blank text: nothing to read (an all-blank corpus fails below)
                content = hash_files([Path(g) for g in group])
                ds = datasets.Dataset.from_generator(
                    _text_documents,
                    gen_kwargs={
                        "files": group,
                        "sample_by": cfg.sample_by,
                        "content_hash": content,
                    },
                )
            else:
                ds = datasets.load_dataset(builder, data_files=group, split="train")
        except CorpusError:
            raise
        except Exception as exc:  # datasets raises many types for malformed files
            raise CorpusError(f"corpus: cannot read {group[0]}...: {_first_line(exc)}") from None
        parts.append(_text_column(ds, cfg.text_column if builder != "text" else "text", group[0]))
    if not parts:
        raise CorpusError(f"corpus: no text found in {', '.join(str(f) for f in files)}; point corpus.paths at text")
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def _text_column(ds, column: str, where: str):
    """Keep only the text column, renamed `text`; a missing or non-string column is an error."""
    if column not in ds.column_names:
        raise CorpusError(
            f"corpus: column {column!r} not found in {where} (columns: "
            f"{', '.join(ds.column_names)}); set corpus.text_column"
        )
    dtype = getattr(ds.features[column], "dtype", None)
    if dtype not in ("string", "large_string"):
        raise CorpusError(
            f"corpus: column {column!r} in {where} holds {dtype}, not text; set corpus.text_column to a string column"
        )
    ds = ds.select_columns([column])
    return ds.rename_column(column, "text") if column != "text" else ds


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


def _load_disk(cfg: CorpusConfig, split: str):
    import datasets

    path = cfg.paths[0]
    if not Path(path).is_dir():
        raise CorpusError(f"corpus.paths: {path} is not a directory made by save_to_disk")
    try:
        ds = datasets.load_from_disk(path)
    except Exception as exc:
        raise CorpusError(f"corpus: cannot load {path} with load_from_disk: {_first_line(exc)}") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise CorpusError(f"corpus: split {split!r} not in {path} (splits: {', '.join(ds)})")
        ds = ds[split]
    return _text_column(ds, cfg.text_column, path), str(ds._fingerprint)


def _load_hub(cfg: CorpusConfig, split: str):
    import datasets

    try:
        ds = datasets.load_dataset(cfg.name, cfg.subset, split=split)
    except Exception as exc:
        raise CorpusError(
            f"corpus: cannot load hub dataset {cfg.name!r} ({cfg.subset or 'default'}, {split}): "
            f"{_first_line(exc)}; check the name, or that it is cached when offline"
        ) from None
    return _text_column(ds, cfg.text_column, cfg.name), str(ds._fingerprint)


def _python_docs(cache_dir: Path) -> tuple[list[str], str]:
    """Stdlib docstrings, cached per Python build (collecting them parses the whole stdlib)."""
    key = hashlib.sha256(f"{sys.version}|{stdlib_root()}".encode()).hexdigest()[:16]
    path = cache_dir / "corpus" / f"python-docs-{key}.json"
    if path.is_file():
        docs = json.loads(path.read_text(encoding="utf-8"))
    else:
        docs = list(iter_python_docs())
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(docs), encoding="utf-8")
        tmp.replace(path)
    digest = hashlib.sha256("\0".join(docs).encode()).hexdigest()
    return docs, digest


def source_fingerprint(cfg: CorpusConfig, cache_dir: Path) -> str:
    """Hash of the corpus content (files are read in full; datasets give their fingerprint)."""
    if cfg.source == "files":
        files = expand_paths(cfg.paths)
        eval_files = expand_paths(cfg.eval_paths, "corpus.eval_paths") if cfg.eval_paths else []
        fp = hash_files(files) + hash_files(eval_files)
    elif cfg.source == "disk":
        fp = _load_disk(cfg, cfg.split)[1] + (_load_disk(cfg, cfg.eval_split)[1] if cfg.eval_split else "")
    elif cfg.source == "hub":
        fp = _load_hub(cfg, cfg.split)[1] + (_load_hub(cfg, cfg.eval_split)[1] if cfg.eval_split else "")
    else:
        fp = _python_docs(cache_dir)[1]
    return hashlib.sha256(f"{cfg.source}|{fp}".encode()).hexdigest()


def load_documents(cfg: CorpusConfig, cache_dir: Path) -> tuple[object, object | None]:
    """(train documents, eval documents or None) as Datasets with one `text` column."""
    import datasets

    evaluation = None
    if cfg.source == "files":
        train = _load_files(expand_paths(cfg.paths), cfg)
        if cfg.eval_paths:
            evaluation = _load_files(expand_paths(cfg.eval_paths, "corpus.eval_paths"), cfg)
    elif cfg.source in ("disk", "hub"):
        load = _load_disk if cfg.source == "disk" else _load_hub
        train = load(cfg, cfg.split)[0]
        if cfg.eval_split:
            evaluation = load(cfg, cfg.eval_split)[0]
    else:
        train = datasets.Dataset.from_dict({"text": _python_docs(cache_dir)[0]})
    return train, evaluation


# ----------------------------------------------------------------------------- packing


def special_frame(tokenizer) -> tuple[list[int], list[int], int | None]:
    """(prefix, suffix, separator) special ids the model wraps a sequence in, e.g. [CLS] .. [SEP]."""
    probe = tokenizer("hello world", add_special_tokens=False)["input_ids"]
    full = tokenizer("hello world", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(probe) + 1):
        if full[start : start + len(probe)] == probe:
            prefix, suffix = full[:start], full[start + len(probe) :]
            break
    else:
        raise CorpusError("tokenizer: cannot locate its special tokens around a sequence")
    sep = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    return prefix, suffix, sep


class Packer:
    """Streams documents into rows of `length` tokens: prefix + content + suffix, then padding.

    Documents are joined by the separator token and cut into equal content windows, carrying
    the remainder across calls, so the result does not depend on how documents are batched.
    """

    def __init__(self, length: int, prefix: list[int], suffix: list[int], sep: int | None, pad: int):
        self.length, self.prefix, self.suffix, self.sep, self.pad = length, prefix, suffix, sep, pad
        self.content = length - len(prefix) - len(suffix)
        self._carry = np.zeros(0, dtype=np.int64)
        self._started = False

    def add(self, flat: np.ndarray, doc_lengths: np.ndarray) -> np.ndarray:
        """Append documents (concatenated ids and their lengths); return the complete rows."""
        if len(doc_lengths) == 0:
            return np.zeros((0, self.length), dtype=np.int64)
        stream = flat.astype(np.int64)
        if self.sep is not None:
            starts = np.concatenate([[0], np.cumsum(doc_lengths)[:-1]])
            if not self._started:
                starts = starts[1:]  # no separator before the very first document
            stream = np.insert(stream, starts, self.sep)
        self._started = True
        stream = np.concatenate([self._carry, stream])
        n_rows = len(stream) // self.content
        self._carry = stream[n_rows * self.content :]
        return self._frame(stream[: n_rows * self.content].reshape(n_rows, self.content))

    def finish(self) -> np.ndarray:
        """The last, shorter row (padded), if any tokens are left."""
        if len(self._carry) == 0:
            return np.zeros((0, self.length), dtype=np.int64)
        row = np.concatenate([self.prefix, self._carry, self.suffix]).astype(np.int64)
        self._carry = np.zeros(0, dtype=np.int64)
        return np.pad(row, (0, self.length - len(row)), constant_values=self.pad)[None, :]

    def _frame(self, content: np.ndarray) -> np.ndarray:
        n = content.shape[0]
        pre = np.broadcast_to(np.asarray(self.prefix, dtype=np.int64), (n, len(self.prefix)))
        suf = np.broadcast_to(np.asarray(self.suffix, dtype=np.int64), (n, len(self.suffix)))
        return np.concatenate([pre, content, suf], axis=1)


def _tokenize(docs, tokenizer, num_proc: int, fingerprint: str):
    """Drop blank documents, tokenize the rest without special tokens (batched map)."""

    def encode(batch: dict) -> dict:
        texts = [t for t in batch["text"] if t and not t.isspace()]
        ids = tokenizer(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
        return {"ids": [x for x in ids if x]}

    return docs.map(
        encode,
        batched=True,
        batch_size=1000,
        num_proc=num_proc if num_proc > 1 else None,
        remove_columns=docs.column_names,
        new_fingerprint=fingerprint,
        desc="tokenizing",
    )


def _iter_token_batches(tokenized, batch_docs: int = 10_000) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    column = tokenized.data.column("ids")
    for start in range(0, len(tokenized), batch_docs):
        chunk = column.slice(start, batch_docs).combine_chunks()
        yield chunk.flatten().to_numpy(), chunk.value_lengths().to_numpy()


def pack_split(tokenized, tokenizer, length: int, out: Path, name: str) -> PackedSplit:
    """Pack a tokenized split into `<out>/<name>.npy` and `<name>_lengths.npy`.

    Rows go straight into a memory-mapped file sized from the token count, so corpora larger
    than memory pack in bounded memory.
    """
    prefix, suffix, sep = special_frame(tokenizer)
    if length <= len(prefix) + len(suffix):
        raise CorpusError(f"corpus.max_seq_len={length} leaves no room beside special tokens")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max else np.int32
    packer = Packer(length, prefix, suffix, sep, pad)
    doc_lengths = tokenized.data.column("ids").combine_chunks().value_lengths().to_numpy()
    stream = int(doc_lengths.sum()) + (max(len(doc_lengths) - 1, 0) if sep is not None else 0)
    n_rows = -(-stream // packer.content)
    ids = np.lib.format.open_memmap(out / f"{name}.npy", mode="w+", dtype=dtype, shape=(n_rows, length))
    row = 0
    for flat, lengths in _iter_token_batches(tokenized):
        block = packer.add(flat, lengths)
        ids[row : row + len(block)] = block
        row += len(block)
    last = packer.finish()
    ids[row : row + len(last)] = last
    assert row + len(last) == n_rows, "packed row count differs from the planned count"
    lens = np.full(n_rows, length, dtype=np.int32)
    if len(last):
        lens[-1] = len(prefix) + (stream - (n_rows - 1) * packer.content) + len(suffix)
    ids.flush()
    np.save(out / f"{name}_lengths.npy", lens)
    return PackedSplit(np.load(out / f"{name}.npy", mmap_mode="r"), lens)


# ----------------------------------------------------------------------------- entry point


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
        _build(cfg, tokenizer, key, fp, out, cache_dir, seed)
    else:
        log.info("packed corpus: reusing %s", out)
    return _open(out)


def _build(cfg, tokenizer, key: dict, fp: str, out: Path, cache_dir: Path, seed: int) -> None:
    train, evaluation = _split_documents(*load_documents(cfg, cache_dir), cfg, seed)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    meta = {"fingerprint": fp, "key": key, "documents": {}, "sequences": {}, "tokens": {}}
    splits = {"train": train, "eval": evaluation}
    for name, docs in splits.items():
        if docs is None:
            continue
        tokenized = _tokenize(docs, tokenizer, cfg.num_proc, f"{fp[:16]}-{name}")
        packed = pack_split(tokenized, tokenizer, cfg.max_seq_len, tmp, name)
        if name == "train" and len(packed.ids) == 0:
            raise CorpusError(f"corpus: {_describe(cfg)} yields no tokens; give it real text")
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
