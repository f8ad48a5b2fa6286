"""Storage encodings of teacher outputs (pure): float16/bfloat16 logits, int8 hidden states.

Zarr has no bfloat16 dtype, so bfloat16 values are stored as their uint16 bit patterns and
the array's `logical_dtype` attribute says how to read them back.
"""

from __future__ import annotations

import numpy as np
import torch

STORAGE_DTYPES = {
    "float16": np.float16,
    "bfloat16": np.uint16,
    "float32": np.float32,
    "int8": np.int8,
}


def encode_values(x: torch.Tensor, dtype: str) -> np.ndarray:
    """fp32 tensor -> numpy in the storage dtype of `dtype` (float16, bfloat16 bits, float32)."""
    if dtype == "bfloat16":
        return x.to(torch.bfloat16).view(torch.int16).cpu().numpy().view(np.uint16)
    return x.to(getattr(torch, dtype)).cpu().numpy()


def decode_values(a: np.ndarray, dtype: str) -> torch.Tensor:
    """Inverse of `encode_values`: storage array -> float32 tensor."""
    if dtype == "bfloat16":
        bits = torch.from_numpy(np.ascontiguousarray(a).view(np.int16))
        return bits.view(torch.bfloat16).float()
    return torch.from_numpy(np.ascontiguousarray(a)).float()


def teacher_top1(data: dict[str, np.ndarray]) -> torch.Tensor:
    """The teacher's top-1 id per position (int64): the first top-k id, or in a sampled-only
    cache the most drawn id. `data` holds `topk_indices` or `sample_ids` + `sample_counts`."""
    if "topk_indices" in data:
        return torch.from_numpy(data["topk_indices"][..., 0].astype(np.int64))
    counts = torch.from_numpy(data["sample_counts"].astype(np.int64))
    ids = torch.from_numpy(data["sample_ids"].astype(np.int64))
    return ids.gather(-1, counts.argmax(-1, keepdim=True))[..., 0]


def quantize_int8(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token absmax int8: (..., H) -> (int8 codes (..., H), float16 scale (...)).

    h ~= codes * scale with scale = max|h| / 127 rounded to float16; the codes are computed
    against the rounded scale so that the stored pair decodes consistently.
    """
    absmax = h.abs().amax(dim=-1).float()
    scale = (absmax / 127.0).to(torch.float16)
    safe = torch.where(scale > 0, scale.float(), torch.ones_like(absmax))
    codes = torch.clamp(torch.round(h.float() / safe.unsqueeze(-1)), -127, 127).to(torch.int8)
    return codes, scale


def dequantize_int8(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """int8 codes (..., H) and float16 scale (...) -> float32 (..., H)."""
    return codes.float() * scale.float().unsqueeze(-1)


def encode_hidden(h: torch.Tensor, dtype: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Hidden states (..., H) -> (stored array, per-token scale or None)."""
    if dtype == "int8":
        codes, scale = quantize_int8(h)
        return codes.cpu().numpy(), scale.cpu().numpy()
    return encode_values(h, dtype), None


def decode_hidden(a: np.ndarray, scale: np.ndarray | None, dtype: str) -> torch.Tensor:
    """Stored hidden states -> float32 tensor."""
    if dtype == "int8":
        assert scale is not None, "int8 hidden states need their scale"
        return dequantize_int8(torch.from_numpy(np.ascontiguousarray(a)), torch.from_numpy(scale))
    return decode_values(a, dtype)
