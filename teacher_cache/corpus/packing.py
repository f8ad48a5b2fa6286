"""Documents -> fixed-length token sequences: tokenized (batched map) and packed across document
boundaries, each sequence wrapped in the model's special tokens."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import CorpusError

log = logging.getLogger(__name__)


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


def _iter_token_batches(
    tokenized, batch_docs: int = 10_000, ids: bool = True
) -> Iterator[tuple[np.ndarray | None, np.ndarray]]:
    """(concatenated ids, document lengths) of `batch_docs` documents at a time (bounded memory)."""
    column = tokenized.data.column("ids")
    for start in range(0, len(tokenized), batch_docs):
        chunk = column.slice(start, batch_docs).combine_chunks()
        yield (chunk.flatten().to_numpy() if ids else None), chunk.value_lengths().to_numpy()


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
    # the token count, chunk by chunk: combining the column first would copy every id into memory
    total = sum(int(np.sum(lengths)) for _, lengths in _iter_token_batches(tokenized, ids=False))
    stream = total + (max(len(tokenized) - 1, 0) if sep is not None else 0)
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
