"""Where documents come from: local text/jsonl/json/parquet files, a save_to_disk directory, a
hub dataset, or the built-in python-docs corpus, all through `datasets`; and their content hash."""

from __future__ import annotations

import codecs
import hashlib
import json
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from pipeline.errors import CorpusError, first_line
from pipeline.paths import TEXT_SUFFIXES, expand_paths
from teacher_cache.config import CorpusConfig
from teacher_cache.corpus.python_docs import iter_python_docs, stdlib_root

log = logging.getLogger(__name__)


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
            raise CorpusError(f"corpus: cannot read {group[0]}...: {first_line(exc)}") from None
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


def _load_disk(cfg: CorpusConfig, split: str):
    import datasets

    path = cfg.paths[0]
    if not Path(path).is_dir():
        raise CorpusError(f"corpus.paths: {path} is not a directory made by save_to_disk")
    try:
        ds = datasets.load_from_disk(path)
    except Exception as exc:
        raise CorpusError(f"corpus: cannot load {path} with load_from_disk: {first_line(exc)}") from None
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
            f"{first_line(exc)}; check the name, or that it is cached when offline"
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
