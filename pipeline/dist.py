"""Process-group helpers for runs under torchrun or the deepspeed launcher (or alone)."""

from __future__ import annotations

import atexit
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as torch_dist

from pipeline.errors import DistilcacheError

T = TypeVar("T")
LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
"""What torchrun / the deepspeed launcher set: a child started as its own job must not inherit them."""


@dataclass(frozen=True)
class DistEnv:
    """Rank and world size as set by the launcher (RANK, WORLD_SIZE, LOCAL_RANK ...)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @classmethod
    def from_env(cls) -> DistEnv:
        env = os.environ
        world = int(env.get("WORLD_SIZE", 1))
        return cls(
            int(env.get("RANK", 0)), world, int(env.get("LOCAL_RANK", 0)), int(env.get("LOCAL_WORLD_SIZE", world))
        )

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def init(self, timeout_s: float = 3600.0) -> None:
        """Join the (gloo) process group used for barriers; a no-op for one process."""
        if self.world_size > 1 and not torch_dist.is_initialized():
            torch_dist.init_process_group("gloo", timeout=timedelta(seconds=timeout_s))

    def barrier(self) -> None:
        if self.world_size > 1:
            torch_dist.barrier()

    def broadcast(self, value: T) -> T:
        """Rank 0's `value` on every rank (e.g. the writer lock's token, for the others' fences)."""
        if self.world_size == 1:
            return value
        box = [value if self.is_main else None]
        torch_dist.broadcast_object_list(box, src=0)
        return box[0]

    def main_first(self, fn: Callable[[], T]) -> T:
        """Run `fn` on rank 0 first (it fills caches), then on the other ranks (they reuse them)."""
        result = fn() if self.is_main else None
        self.barrier()
        if not self.is_main:
            result = fn()
        self.barrier()
        return result  # type: ignore[return-value]

    def close(self) -> None:
        if self.world_size > 1 and torch_dist.is_initialized():
            torch_dist.destroy_process_group()


def init_training() -> tuple[int, int, torch.device]:
    """Join the process group of a DeepSpeed run (gloo on CPU, NCCL on GPU): under torchrun or the
    deepspeed launcher, or as one process without a launcher. Returns (rank, world size, device)."""
    cpu = not torch.cuda.is_available()
    if cpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "RANK" not in os.environ:  # one process without a launcher
        os.environ.update(
            RANK="0",
            LOCAL_RANK="0",
            WORLD_SIZE="1",
            LOCAL_WORLD_SIZE="1",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(_free_port()),
        )
    import deepspeed

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    if not torch_dist.is_initialized():
        deepspeed.init_distributed(dist_backend="gloo" if cpu else "nccl")
        # one group per process, destroyed at exit: DeepSpeed caches group handles globally, so a
        # second run in the same process (tests, notebooks) must reuse the group, not recreate it
        atexit.register(_destroy_process_group)
    rank, world = torch_dist.get_rank(), torch_dist.get_world_size()
    if cpu:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
        return rank, world, torch.device("cpu")
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    torch.cuda.set_device(device)
    return rank, world, device


def _destroy_process_group() -> None:
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resolve_precision(spec: str, cpu: bool) -> str:
    """train.precision -> fp32 / bf16 / fp16: auto is bf16 on CUDA (fp16 without bf16), fp32 on CPU."""
    p = spec if spec != "auto" else ("fp32" if cpu else ("bf16" if torch.cuda.is_bf16_supported() else "fp16"))
    if cpu and p == "fp16":
        raise DistilcacheError("precision=fp16 is not supported on CPU; use fp32 or bf16")
    return p


def resolve_head_dtype(spec: str, device: torch.device) -> torch.dtype:
    """loss.exact_head_dtype -> dtype: `auto` is bfloat16 where the hardware multiplies it natively."""
    if spec != "auto":
        return getattr(torch, spec)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    native = (
        getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
        or getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    )
    return torch.bfloat16 if native else torch.float32
