"""Content hashes that identify a cache's inputs and guard its files: teacher weights, the
tokenizer's definition, and files on disk (streamed, never read whole into memory)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def weights_sha256(model: torch.nn.Module) -> str:
    """Hash of every parameter and buffer (name, dtype, shape, bytes), in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        if t.numel():
            digest.update(t.view(torch.uint8).numpy())
    return digest.hexdigest()


def tokenizer_sha256(tokenizer) -> str:
    """Hash of the fast tokenizer's full definition (vocabulary, normaliser, special tokens)."""
    digest = hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode())
    digest.update(repr(sorted(tokenizer.all_special_tokens)).encode())
    return digest.hexdigest()
