"""Storage encodings of teacher outputs (pure): float16/bfloat16 logits; hidden states as int8
(per-token absmax) or 4-bit (Walsh-Hadamard-rotated, group-wise absmax, uniform `int4` or
NormalFloat `nf4` levels, two codes a byte).

Zarr has no bfloat16 dtype, so bfloat16 values are stored as their uint16 bit patterns and
the array's `logical_dtype` attribute says how to read them back.
"""

from __future__ import annotations

import functools
import math

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


INT4_GROUP = 128
"""Hidden elements that share one float16 scale in the 4-bit codecs (fewer where H is not a multiple)."""
ROTATION_BLOCK = 256
"""Largest Walsh-Hadamard block of the 4-bit codecs' rotation."""
FOUR_BIT_LEVELS = {
    # uniform: codes -7..7 of absmax / 7 (the 16th level, -8/7, is never the nearest)
    "int4": tuple((i - 8) / 7 for i in range(16)),
    # NormalFloat4 (Dettmers et al. 2023, QLoRA): quantiles of a normal distribution, exact zero;
    # rotated hidden states are close to normal, so these levels give ~1.5x less rebuilt-logit KL
    "nf4": (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
            -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
            0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
            0.7229568362236023, 1.0),
}  # fmt: skip
"""The 16 levels (times a group's absmax) of each 4-bit hidden codec."""


def int4_group(hidden_size: int) -> int:
    """Elements per 4-bit scale: 128, or the largest power of two dividing H below that."""
    return math.gcd(hidden_size, INT4_GROUP)


@functools.lru_cache(maxsize=8)
def _rotation_signs(hidden_size: int) -> torch.Tensor:
    """Fixed random signs of the rotation (a constant of the codec, not a fitted parameter)."""
    g = torch.Generator().manual_seed(0x1A74)
    return torch.where(torch.rand(hidden_size, generator=g) < 0.5, -1.0, 1.0)


def _walsh_hadamard(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal Walsh-Hadamard transform of the last dimension in blocks of gcd(H, 256), as
    butterflies: additions only, so every element's result is independent of the batch shape."""
    shape, block = x.shape, math.gcd(x.shape[-1], ROTATION_BLOCK)
    y = x.reshape(-1, block)
    h = 1
    while h < block:
        y = y.view(-1, block // (2 * h), 2, h)
        y = torch.stack((y[:, :, 0] + y[:, :, 1], y[:, :, 0] - y[:, :, 1]), 2)
        h *= 2
    return y.reshape(shape) * (1.0 / math.sqrt(block))


def rotate(h: torch.Tensor) -> torch.Tensor:
    """h (..., H) -> h R with R = diag(signs) W orthogonal: spreads outlier dimensions over a
    block, so a group's absmax is close to its typical magnitude."""
    return _walsh_hadamard(h * _rotation_signs(h.shape[-1]).to(h.device))


def unrotate(y: torch.Tensor) -> torch.Tensor:
    """Inverse of `rotate` (W is symmetric and orthonormal)."""
    return _walsh_hadamard(y) * _rotation_signs(y.shape[-1]).to(y.device)


def quantize_4bit(h: torch.Tensor, codec: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotated, group-wise absmax 4-bit: (..., H) -> (uint8 (..., H/2), two codes a byte, low
    nibble first; float16 absmax (..., H/G)). A code is the index of the nearest level of
    `FOUR_BIT_LEVELS[codec]` to value / absmax, against the rounded absmax."""
    y = rotate(h.float())
    g = y.view(*y.shape[:-1], -1, int4_group(h.shape[-1]))
    scale = g.abs().amax(dim=-1).to(torch.float16)
    safe = torch.where(scale > 0, scale.float(), torch.ones_like(scale, dtype=torch.float32))
    levels = torch.tensor(FOUR_BIT_LEVELS[codec], device=h.device)
    codes = torch.bucketize(g / safe.unsqueeze(-1), (levels[1:] + levels[:-1]) / 2).to(torch.uint8).view(y.shape)
    return codes[..., 0::2] | (codes[..., 1::2] << 4), scale


def dequantize_4bit(packed: torch.Tensor, scale: torch.Tensor, codec: str) -> torch.Tensor:
    """uint8 (..., H/2) and float16 absmax (..., H/G) -> float32 (..., H)."""
    codes = torch.stack((packed & 15, packed >> 4), -1).view(*packed.shape[:-1], -1).long()
    values = torch.tensor(FOUR_BIT_LEVELS[codec], device=packed.device)[codes]
    g = values.view(*scale.shape, -1) * scale.float().unsqueeze(-1)
    return unrotate(g.view(values.shape))
