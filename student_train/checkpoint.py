"""Checkpoints of a training run: crash-safe to write, checked before a resume.

`checkpoints/step-N/` holds DeepSpeed's files, each rank's RNG state (plain tensors and numbers,
loaded with `weights_only=True`) and, written last by rank 0 once every rank has finished,
`complete.json` (step, world size, resolved config, reader state). `latest` names the newest
complete checkpoint and is written after it. A resume whose newest checkpoint is incomplete (a
kill during the write) falls back to the previous complete one and says so.

Loading a pickle can run code. So `complete.json` records the sha256 of every file of the
checkpoint, and a resume refuses any file whose hash differs or that was not recorded; DeepSpeed's
files then load with `weights_only=True` (plus the three DeepSpeed classes ZeRO stores, which
carry data only), and only a file that still needs another class is unpickled in full, having
matched the hash recorded when this tool wrote it.
"""

from __future__ import annotations

import json
import logging
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from cache_format.atomic import write_json_atomic, write_text_atomic
from cache_format.hashing import file_sha256
from pipeline.config import flatten
from pipeline.errors import DistilcacheError, first_line

log = logging.getLogger(__name__)
COMPLETE = "complete.json"
RESUMABLE_KEYS = {
    "output_dir",
    "log_every",
    "eval_every",
    "eval_sequences",
    "save_every",
    "keep_checkpoints",
    "data.num_workers",
    "data.prefetch_groups",
    "data.follow",
    "data.follow_timeout",
}
"""Keys a resumed run may change: where the run directory is (a moved or copied run resumes),
logging, evaluation and checkpoint cadence, reader workers, following a growing cache or not
(the data are the same). Everything else changes the data
order, the model, the optimizer or the schedule (the cache's path may change too when its
fingerprint does not)."""


def tag_of(step: int) -> str:
    return f"step-{step:07d}"


def rng_state() -> dict:
    """This process's RNG states as tensors and numbers (safe to load with weights_only=True)."""
    version, mt, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss)},
        "numpy_cached_gaussian": float(cached),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    np_state = state["numpy"]
    keys = np_state["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, np_state["pos"], np_state["has_gauss"], state["numpy_cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(engine, directory: Path, step: int, client: dict, rank: int, world: int, keep: int) -> Path:
    """Write one checkpoint; `latest` moves to it only once every rank's part is on disk."""
    import torch.distributed as torch_dist

    tag = tag_of(step)
    path = directory / tag
    path.mkdir(parents=True, exist_ok=True)
    torch.save(rng_state(), path / f"rng-rank{rank}.pt")
    engine.save_checkpoint(str(directory), tag=tag, client_state=client, save_latest=False)
    torch_dist.barrier()
    if rank == 0:
        files = {p.relative_to(path).as_posix(): file_sha256(p) for p in sorted(path.rglob("*")) if p.is_file()}
        write_json_atomic(path / COMPLETE, {"step": step, "world_size": world, **client, "files": files})
        write_text_atomic(directory / "latest", tag)
        complete = [p for p in sorted(directory.glob("step-*")) if (p / COMPLETE).is_file()]
        for old in complete[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    torch_dist.barrier()
    return path


def resumable(directory: Path) -> tuple[Path, dict]:
    """The checkpoint to resume from and its completion record: `latest` if complete, else the
    newest complete one (logged)."""
    complete = [p for p in sorted(directory.glob("step-*")) if (p / COMPLETE).is_file()]
    if not complete:
        raise DistilcacheError(f"--resume: no complete checkpoint in {directory}; start without --resume")
    latest = directory / "latest"
    named = directory / latest.read_text().strip() if latest.is_file() else None
    newest = sorted(directory.glob("step-*"))[-1]
    chosen = named if named is not None and named in complete and named == complete[-1] else complete[-1]
    if newest != chosen:
        log.warning("checkpoint %s is incomplete (interrupted while written); resuming from %s", newest.name, chosen)
    return chosen, json.loads((chosen / COMPLETE).read_text())


def resume_diff(saved: dict, current: dict, same_cache: bool = False) -> list[str]:
    """Config keys whose change would make a resumed run differ from an uninterrupted one
    (`same_cache`: the cache at the new path has the checkpoint's fingerprint)."""
    a, b = flatten(saved), flatten(current)
    free = RESUMABLE_KEYS | ({"cache"} if same_cache else set())
    changed = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k) and k not in free]
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in changed]


def check_files(path: Path, record: dict) -> None:
    """Refuse a checkpoint holding a file this tool did not write, or one changed since."""
    recorded = record.get("files")
    if not isinstance(recorded, dict):
        raise DistilcacheError(
            f"--resume: {path / COMPLETE} records no file hashes (written by an older distilcache, or edited); "
            "refusing to unpickle its files: start a new run with --overwrite"
        )
    present = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()} - {COMPLETE}
    for name in sorted(present - set(recorded)):
        raise DistilcacheError(f"--resume: {path / name} was not written with this checkpoint; refusing to load it")
    for name, digest in sorted(recorded.items()):
        if not (path / name).is_file() or file_sha256(path / name) != digest:
            raise DistilcacheError(
                f"--resume: {path / name} differs from the hash recorded when it was saved (or is missing); "
                "refusing to load it (unpickling can run code): resume from another checkpoint or start over"
            )


def _safe_globals() -> list:
    """The DeepSpeed classes a ZeRO checkpoint holds besides tensors: plain data carriers."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def load(engine, path: Path) -> None:
    """DeepSpeed's load of a checkpoint whose files `check_files` accepted, with weights_only."""

    def weights_only_load(file: str, map_location=None):
        with torch.serialization.safe_globals(_safe_globals()):
            try:
                return torch.load(file, map_location=map_location, weights_only=True)
            except pickle.UnpicklingError as exc:  # another class: the file's hash matched the recorded one
                log.debug("%s needs a full unpickle (%s)", file, str(exc).splitlines()[-1][:120])
                return torch.load(file, map_location=map_location, weights_only=False)

    engine.checkpoint_engine.load = weights_only_load
    loaded, _ = engine.load_checkpoint(str(path.parent), tag=path.name)
    if loaded is None:
        raise DistilcacheError(f"--resume: cannot load the checkpoint {path}")


def load_rng(path: Path, rank: int) -> None:
    rng = path / f"rng-rank{rank}.pt"
    if not rng.is_file():
        raise DistilcacheError(
            f"--resume: {rng} missing (the checkpoint was written by another number of processes); "
            "resume with the same launcher settings"
        )
    try:
        state = torch.load(rng, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, ValueError) as exc:
        raise DistilcacheError(
            f"--resume: {rng} is not a plain RNG state (refused to unpickle it: {first_line(exc, 120)}); "
            "resume only from checkpoints this tool wrote"
        ) from None
    set_rng_state(state)
