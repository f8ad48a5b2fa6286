"""Checkpoints of a training run: crash-safe to write, checked before a resume.

`checkpoints/step-N/` holds DeepSpeed's files, each rank's RNG state (plain tensors and numbers,
loaded with `weights_only=True`) and, written last by rank 0 once every rank has finished,
`complete.json` (step, world size, resolved config, reader state). `latest` names the newest
complete checkpoint and is written after it. A resume whose newest checkpoint is incomplete (a
kill during the write) falls back to the previous complete one and says so. DeepSpeed's own
loader unpickles its files: run and checkpoint directories must be trusted.
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
from pipeline.config import flatten
from pipeline.errors import DistilcacheError

log = logging.getLogger(__name__)
COMPLETE = "complete.json"
RESUMABLE_KEYS = {
    "log_every",
    "eval_every",
    "eval_sequences",
    "save_every",
    "keep_checkpoints",
    "data.num_workers",
    "data.prefetch_groups",
}
"""Keys a resumed run may change: logging, evaluation and checkpoint cadence, reader workers.
Everything else changes the data order, the model, the optimizer or the schedule."""


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
        write_json_atomic(path / COMPLETE, {"step": step, "world_size": world, **client})
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


def resume_diff(saved: dict, current: dict) -> list[str]:
    """Config keys whose change would make a resumed run differ from an uninterrupted one."""
    a, b = flatten(saved), flatten(current)
    changed = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k) and k not in RESUMABLE_KEYS]
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in changed]


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
            f"--resume: {rng} is not a plain RNG state (refused to unpickle it: {str(exc).splitlines()[0][:120]}); "
            "resume only from checkpoints this tool wrote"
        ) from None
    set_rng_state(state)
