"""Hidden-state codecs by name: one entry point for what every codec stores and how it decodes
(float16/float32, int8, the 4-bit `nf4`/`int4`, the fitted `pq`/`pca`), on the host or inside
the training step."""

from __future__ import annotations

import numpy as np
import torch

from cache_format.encode import (
    FOUR_BIT_LEVELS,
    decode_values,
    dequantize_4bit,
    dequantize_int8,
    encode_values,
    int4_group,
    quantize_4bit,
    quantize_int8,
)
from cache_format.fitted import FITTED_CODECS, decode_fitted, default_codes, encode_fitted, fitted_width

Fit = dict[str, torch.Tensor] | None
"""A fitted codec's tensors (None for the others)."""
HIDDEN_CODECS = ("pq", "pca", "nf4", "int4", "int8", "float16", "float32")
"""Every hidden codec, fewest bytes a token first (at the default `hidden_codes`)."""


def codes_for(hidden_size: int, codes: int) -> int:
    """The configured code bytes a token of a fitted codec (0 = its default)."""
    return codes or default_codes(hidden_size)


def stored_hidden_width(hidden_size: int, dtype: str, codes: int = 0) -> tuple[int, int | None]:
    """(elements per token of the stored `hidden`, of `hidden_scale` or None) for a hidden codec."""
    if dtype in FITTED_CODECS:
        return fitted_width(dtype, codes_for(hidden_size, codes))
    if dtype in FOUR_BIT_LEVELS:
        return hidden_size // 2, hidden_size // int4_group(hidden_size)
    return hidden_size, (None if dtype != "int8" else 1)


def storage_dtype(dtype: str) -> tuple[str, str | None]:
    """(numpy dtype of the stored `hidden`, the codec name when it differs from that dtype)."""
    if dtype in FOUR_BIT_LEVELS or dtype == "pq":
        return "uint8", dtype
    if dtype == "pca":
        return "int8", dtype
    return dtype, None


def encode_hidden(h: torch.Tensor, dtype: str, fit: Fit = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Hidden states (..., H) -> (stored array, per-token or per-group scale or None)."""
    if dtype in FITTED_CODECS:
        assert fit is not None, f"{dtype} hidden states need their fitted tensors"
        codes, scale = encode_fitted(h, dtype, fit)
    elif dtype == "int8" or dtype in FOUR_BIT_LEVELS:
        codes, scale = quantize_int8(h) if dtype == "int8" else quantize_4bit(h, dtype)
    else:
        return encode_values(h, dtype), None
    return codes.cpu().numpy(), None if scale is None else scale.cpu().numpy()


def decode_hidden_tensor(stored: torch.Tensor, scale: torch.Tensor | None, dtype: str, fit: Fit = None) -> torch.Tensor:
    """Stored hidden states (on any device) -> float32: the one decoding, on the host or inside
    the training step."""
    if dtype in FITTED_CODECS:
        assert fit is not None, f"{dtype} hidden states need their fitted tensors"
        return decode_fitted(stored, scale, dtype, fit)
    if dtype == "int8" or dtype in FOUR_BIT_LEVELS:
        assert scale is not None, f"{dtype} hidden states need their scale"
        return dequantize_int8(stored, scale) if dtype == "int8" else dequantize_4bit(stored, scale, dtype)
    return stored.float()


def decode_hidden(a: np.ndarray, scale: np.ndarray | None, dtype: str, fit: Fit = None) -> torch.Tensor:
    """Stored hidden states (numpy) -> float32 tensor."""
    if dtype in ("float16", "float32", "bfloat16"):
        return decode_values(a, dtype)
    scale_t = None if scale is None else torch.from_numpy(np.ascontiguousarray(scale))
    return decode_hidden_tensor(torch.from_numpy(np.ascontiguousarray(a)), scale_t, dtype, fit)
