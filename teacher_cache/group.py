"""The process group of a capture under torchrun (or one process alone): ranks, barriers, and
rank 0's values shared with the others."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch.distributed as torch_dist

T = TypeVar("T")


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
