"""A training run's directory: one run at a time, never mixed with an earlier run.

The first process of a run (rank 0) takes `lock.json` exclusively (host, PID, start time,
expiry, renewed while it lives); a second run on the same `output_dir` is refused naming the
holder, and the lock of a killed run is stale (its PID is gone, or its expiry passed). A fresh
run refuses an `output_dir` that holds an earlier run unless `--overwrite`, which removes only
the files a run writes there.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from cache_format.lock import WriterLock
from cache_format.storage import LocalStorage
from pipeline.errors import CacheError, DistilcacheError

LOCK = "lock.json"
SUMMARY_FILE = "summary.json"
RUN_FILES = ("checkpoints", "metrics.jsonl", SUMMARY_FILE, "final", "tensorboard", "eval_tokens.npz")
"""What a run writes besides its records (config.yaml, ds_config.json, run.json), which every
start rewrites."""


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.rank = int(os.environ.get("RANK", "0"))
        self._lock: WriterLock | None = None
        self._created = False

    def lock(self) -> None:
        """Take the run directory (rank 0), or refuse naming the run that holds it."""
        if self.rank != 0:
            return
        self._created = not self.path.exists()
        self.path.mkdir(parents=True, exist_ok=True)
        lock = WriterLock(LocalStorage(self.path), key=LOCK, kind="train-student")
        try:
            self._lock = lock.acquire()
        except CacheError as exc:
            raise DistilcacheError(f"output_dir {self.path} is in use: {exc}") from None

    def release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        if self._created and self.path.is_dir() and not any(self.path.iterdir()):
            self.path.rmdir()  # a run that failed before writing anything leaves nothing

    def clear_earlier_run(self, overwrite: bool) -> None:
        """A fresh run never mixes with an earlier one's checkpoints, metrics or summary."""
        stale = [self.path / n for n in RUN_FILES if (self.path / n).exists()]
        if stale and not overwrite:
            raise DistilcacheError(
                f"output_dir {self.path} holds an earlier run ({', '.join(p.name for p in stale)}); "
                "pass --resume to continue it, --overwrite to start over, or choose another output_dir"
            )
        if self.rank == 0:
            for p in stale:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
