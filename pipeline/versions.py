"""Library versions and the git commit, recorded beside every artifact."""

from __future__ import annotations

import importlib.metadata
import subprocess
from pathlib import Path

_LIBRARIES = (
    "distilcache",
    "torch",
    "transformers",
    "datasets",
    "pyarrow",
    "zarr",
    "numcodecs",
    "numpy",
    "deepspeed",
    "tokenizers",
    "safetensors",
)


def library_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in _LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    out["git_sha"] = git_sha()
    return out


def git_sha() -> str | None:
    """The commit of the source tree distilcache runs from, if it is a git checkout."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None if result.returncode == 0 else None
