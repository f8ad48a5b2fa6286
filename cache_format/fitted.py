"""Hidden-state codecs with a fitted part (pure): product quantisation (`pq`) and a low-rank
basis (`pca`), both fitted on a pilot sample of the teacher's last hidden states at capture start.

The fitted tensors (codebooks or basis) are part of the cache: saved beside the MLM head, in the
fingerprint and the manifest, checked like every other file. A fit is a pure function of its
sample and seed (float64 arithmetic, a seeded start, a fixed number of steps), so the same
config gives the same bytes on the same hardware.

- `pq`: M sub-vectors of H/M elements, each coded by one byte against its own codebook of 256
  centroids (Lloyd's k-means from a seeded start). Centroid 0 is fixed at zero, so padding
  decodes to zeros. M bytes a token.
- `pca`: r components of an uncentred principal basis (the top eigenvectors of E[h hᵀ], so that
  zero stays zero), the coefficients stored as int8 with a per-token float16 scale. r + 2 bytes
  a token; the relative squared error of the projection is the discarded share of E[|h|²].
"""

from __future__ import annotations

import logging

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from cache_format.encode import dequantize_int8, quantize_int8
from cache_format.rng import STREAM_FIT, permutation

FITTED_CODECS = ("pq", "pca")
FIT_FILE = "hidden_codec.safetensors"
"""The fitted tensors of the cache's hidden codec, under the cache's teacher directory."""
CENTROIDS = 256
KMEANS_STEPS = 25
ASSIGN_CHUNK = 4096
"""Tokens assigned to centroids in one compiled call (the last chunk zero-padded to it, so one
shape compiles once): one capture batch of 32 x 128."""
EAGER_CHUNK = 256
"""Tokens a chunk without the compiler: a (M, chunk, 256) distance tensor of 25 MB at M = 96, the
fastest of 16-2,048 on a CPU (measured)."""
log = logging.getLogger(__name__)


def default_codes(hidden_size: int) -> int:
    """Code bytes a token when `outputs.hidden_codes` is 0: H/4 (0.25 B an element)."""
    return max(1, hidden_size // 4)


def check_codes(codec: str, hidden_size: int, codes: int) -> str | None:
    """Why `codes` bytes a token cannot code H = hidden_size with `codec` (None when it can)."""
    if codec == "pq" and hidden_size % codes:
        return f"outputs.hidden_codes={codes} must divide the teacher's hidden size {hidden_size} (pq sub-vectors)"
    if codec == "pca" and not 1 <= codes <= hidden_size:
        return f"outputs.hidden_codes={codes} must be in [1, {hidden_size}] (pca components)"
    return None


# ----------------------------------------------------------------------------- fitting


def fit_pq(sample: torch.Tensor, subvectors: int, seed: int) -> dict[str, torch.Tensor]:
    """k-means codebooks (M, 256, H/M) float32 of `sample` (N, H), centroid 0 fixed at zero.
    Assignments are float32 (as encoding computes them), centroid means float64."""
    n = len(sample)
    if n < CENTROIDS:
        raise ValueError(f"pq needs a pilot of at least {CENTROIDS} tokens, got {n}")
    x = sample.float().view(n, subvectors, -1).transpose(0, 1).contiguous()  # (M, N, d)
    x64 = x.double()
    start = torch.from_numpy(permutation(seed, STREAM_FIT, n)[: CENTROIDS - 1])
    book = torch.cat((torch.zeros(subvectors, 1, x.shape[-1], dtype=torch.float64), x64[:, start]), 1)
    for _ in range(KMEANS_STEPS):
        codes = _assign(x, book.float())
        sums = torch.zeros_like(book).scatter_add_(1, codes[..., None].expand_as(x64), x64)
        counts = torch.zeros(book.shape[:2], dtype=torch.float64).scatter_add_(1, codes, torch.ones_like(x64[..., 0]))
        moved = torch.where(counts[..., None] > 0, sums / counts.clamp(min=1)[..., None], book)
        moved[:, 0] = 0.0  # the zero code stays zero
        book = moved
    return {"codebook": book.float().contiguous()}


def _nearest(x: torch.Tensor, book: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """argmin over centroids of |c|² - 2 x·c: (M, n, d), (M, K, d), (M, 1, K) -> (M, n). Compiled,
    it is one loop that never holds the (M, n, K) distances: 2-3x the batched GEMM + argmin on a
    CPU, where that tensor's memory traffic is the cost (benchmarks/bench_codecs.py)."""
    return (norms - 2 * (x[:, :, None, :] * book[:, None, :, :]).sum(-1)).argmin(-1)


_nearest_compiled = torch.compile(_nearest, dynamic=False)
_compiler = {"failed": False}


def _assign(x: torch.Tensor, book: torch.Tensor) -> torch.Tensor:
    """Nearest centroid of every sub-vector: (M, N, d), (M, K, d) -> (M, N) int64. Compiled where
    torch.compile works (TORCHDYNAMO_DISABLE=1 turns it off), else in chunks of batched GEMMs."""
    norms = (book * book).sum(-1)[:, None, :]  # (M, 1, K)
    if not _compiler["failed"]:
        try:
            return _assign_compiled(x, book, norms)
        except Exception as e:  # no C++ compiler, an unsupported device: the same nearest centroids, slower
            log.warning("pq: torch.compile failed (%s); assigning centroids without it", str(e).splitlines()[0])
            _compiler["failed"] = True
    return assign_eager(x, book, norms)


def _assign_compiled(x: torch.Tensor, book: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    out = []
    for a in range(0, x.shape[1], ASSIGN_CHUNK):
        chunk = x[:, a : a + ASSIGN_CHUNK]
        n = chunk.shape[1]
        if n < ASSIGN_CHUNK:
            chunk = torch.nn.functional.pad(chunk, (0, 0, 0, ASSIGN_CHUNK - n))
        out.append(_nearest_compiled(chunk, book, norms)[:, :n])
    return torch.cat(out, 1)


def assign_eager(x: torch.Tensor, book: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """`_assign` without the compiler: (M, chunk, K) distances from a batched GEMM, then argmin."""
    out = []
    for a in range(0, x.shape[1], EAGER_CHUNK):
        chunk = x[:, a : a + EAGER_CHUNK]
        out.append(torch.baddbmm(norms, chunk, book.transpose(1, 2), alpha=-2.0).argmin(-1))
    return torch.cat(out, 1)


def fit_pca(sample: torch.Tensor, components: int) -> dict[str, torch.Tensor]:
    """The top `components` eigenvectors (H, r) float32 of E[h hᵀ] over `sample` (N, H), each
    signed so that its largest entry is positive (eigenvectors are defined up to sign)."""
    x = sample.double()
    values, vectors = torch.linalg.eigh(x.T @ x / len(x))
    basis = vectors[:, values.argsort(descending=True)[:components]]
    signs = torch.sign(basis.gather(0, basis.abs().argmax(0, keepdim=True)))
    return {"basis": (basis * signs).float().contiguous()}


def fit_hidden(codec: str, sample: torch.Tensor, codes: int, seed: int) -> dict[str, torch.Tensor]:
    """The fitted tensors of `codec` for `codes` bytes a token, from a pilot sample (N, H)."""
    if codec == "pq":
        return fit_pq(sample, codes, seed)
    return fit_pca(sample, codes)


def fit_bytes(fit: dict[str, torch.Tensor]) -> bytes:
    """The file a fit is stored as (safetensors: the same bytes for the same tensors)."""
    return save_safetensors(fit)


def fit_from_bytes(blob: bytes) -> dict[str, torch.Tensor]:
    return load_safetensors(blob)


# ----------------------------------------------------------------------------- coding


def fitted_width(codec: str, codes: int) -> tuple[int, int | None]:
    """(stored `hidden` elements a token, `hidden_scale` elements a token or None)."""
    return codes, (1 if codec == "pca" else None)


def encode_fitted(
    h: torch.Tensor, codec: str, fit: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(..., H) -> pq: uint8 codes (..., M); pca: int8 coefficients (..., r) and float16 scale (...)."""
    flat = h.float().reshape(-1, h.shape[-1])
    if codec == "pca":
        codes, scale = quantize_int8(flat @ fit["basis"].to(flat.device))
        return codes.view(*h.shape[:-1], -1), scale.view(h.shape[:-1])
    book = fit["codebook"].to(flat.device)
    x = flat.view(len(flat), book.shape[0], -1).transpose(0, 1)
    return _assign(x, book).T.to(torch.uint8).reshape(*h.shape[:-1], -1), None


def decode_fitted(
    stored: torch.Tensor, scale: torch.Tensor | None, codec: str, fit: dict[str, torch.Tensor]
) -> torch.Tensor:
    """Inverse of `encode_fitted` (on any device): float32 (..., H)."""
    if codec == "pca":
        assert scale is not None, "pca hidden states need their scale"
        basis = fit["basis"].to(stored.device)
        return dequantize_int8(stored, scale) @ basis.T
    book = fit["codebook"].to(stored.device)  # (M, K, d)
    m = book.shape[0]
    picked = book[torch.arange(m, device=stored.device), stored.long()]  # (..., M, d)
    return picked.reshape(*stored.shape[:-1], -1)
