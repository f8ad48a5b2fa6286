"""Files named by path or glob (corpus files, task files): expanded, checked, in sorted order."""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable
from pathlib import Path

from pipeline.errors import CorpusError

TEXT_SUFFIXES = {
    ".txt": "text",
    ".text": "text",
    ".md": "text",
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
}
"""Corpus file suffixes and the `datasets` builder that reads each."""


def expand_paths(
    patterns: Iterable[str], key: str = "corpus.paths", suffixes: Iterable[str] = tuple(TEXT_SUFFIXES)
) -> list[Path]:
    """Expand files/globs; every pattern must match at least one file with one of `suffixes`."""
    files: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        found = [Path(m) for m in matches if Path(m).is_file()]
        if not found:
            raise CorpusError(f"{key}: no file matches {pattern!r}; check the path or glob")
        files.extend(found)
    for f in files:
        if f.suffix.lower() not in suffixes:
            known = ", ".join(sorted(suffixes))
            raise CorpusError(f"{key}: {f} has an unsupported extension; use one of {known}")
    return files
