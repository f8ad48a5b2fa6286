"""Crash-safe file writes: write a temp file beside the target, fsync it, then rename (or, for an
exclusive create, hard-link) it into place and fsync the directory. A reader sees the old file
or the new one, never a torn one; a kill leaves at most a `*.partial` temp file behind."""

from __future__ import annotations

import contextlib
import json
import os
import threading
from pathlib import Path
from typing import Any

PARTIAL = ".partial"


def write_bytes_atomic(path: Path, data: bytes, exclusive: bool = False) -> None:
    """Publish `data` at `path` atomically; `exclusive` fails with FileExistsError if it exists."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}{PARTIAL}")
    with tmp.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    try:
        if exclusive:
            os.link(tmp, path)  # fails if the target exists: two writers never both win
        else:
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def write_json_atomic(path: Path, obj: Any, exclusive: bool = False) -> None:
    write_bytes_atomic(path, json.dumps(obj, indent=2).encode(), exclusive)


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
