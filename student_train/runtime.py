"""Where a training process runs: its process group (torchrun, the deepspeed launcher, or one
process alone), its device, its precision and the dtype of the exact-KD head's GEMM."""

from __future__ import annotations

import atexit
import logging
import os
import socket

import torch
import torch.distributed as torch_dist

from pipeline.errors import DistilcacheError

LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
"""What torchrun / the deepspeed launcher set: a child started as its own job must not inherit them."""


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
