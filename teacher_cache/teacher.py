"""Teacher runtime: load any Hugging Face masked LM and run it for the cache.

The forward runs the encoder once, then the MLM head fused with top-k and log-sum-exp in row
chunks over the selected positions only (see `topk.chunked_logit_stats`), so the full
(batch, length, vocab) logits tensor is never materialised.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from cache_format.family import hidden_size, position_offset
from cache_format.hashing import tokenizer_sha256, weights_sha256
from cache_format.head import LOAD_ERRORS, find_head
from pipeline.errors import TeacherError, first_line
from teacher_cache.config import TeacherConfig
from teacher_cache.topk import chunked_logit_stats

log = logging.getLogger(__name__)

CHUNK_BYTES = 128 * 2**20
"""Default size of one chunk of fp32 logits in the fused head: 1,024-row chunks ran the head GEMM ~10 %
faster than 256-row ones on CPU (it re-reads the decoder matrix once per chunk)."""


@dataclass
class TeacherBatch:
    """Teacher outputs for one batch: logits statistics at the selected positions only."""

    hidden: torch.Tensor  # (B, L, H) last hidden states
    values: torch.Tensor | None = None  # (n, k) fp32 top-k logits (None: no sparse logits asked for)
    indices: torch.Tensor | None = None  # (n, k) int64 token ids
    lse: torch.Tensor | None = None  # (n, T) fp32 log-sum-exp per temperature
    sample_ids: torch.Tensor | None = None  # (n, S) distinct sampled ids, when draws were given
    sample_counts: torch.Tensor | None = None  # (n, S) their counts


@dataclass
class Teacher:
    name: str
    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    dtype: torch.dtype
    weights_sha256: str
    tokenizer_sha256: str

    @property
    def vocab_size(self) -> int:
        return int(self.model.config.vocab_size)

    @property
    def hidden_size(self) -> int:
        return hidden_size(self.model.config)

    @property
    def max_positions(self) -> int:
        return int(self.model.config.max_position_embeddings) - position_offset(self.model.config)

    def chunk_tokens(self, configured: int | None) -> int:
        """Rows per fused head chunk: configured, or ~128 MB of fp32 logits (large GEMMs, bounded memory)."""
        return configured or max(64, CHUNK_BYTES // (4 * self.vocab_size))

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        positions: torch.Tensor,
        k: int,
        temperatures: list[float],
        chunk_tokens: int,
        draws: tuple[torch.Tensor, float] | None = None,
    ) -> TeacherBatch:
        """Hidden states for the batch and top-k/lse (and samples, given (n, S) uniforms and a
        temperature as `draws`) at `positions` ((B, L) bool). k = 0 and no draws: the encoder
        only (outputs.logits none; stage two rebuilds the logits from the hidden states)."""
        input_ids = input_ids.to(self.device, non_blocking=True)
        attention_mask = attention_mask.to(self.device, non_blocking=True)
        positions = positions.to(self.device, non_blocking=True)
        if draws is not None:
            draws = (draws[0].to(self.device, non_blocking=True), draws[1])
        head = find_head(self.model)
        if head is not None:
            hidden = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            if k == 0 and draws is None:
                return TeacherBatch(hidden)
            selected = hidden[positions]

            def logits_of(a: int, b: int) -> torch.Tensor:
                return head(selected[a:b])
        else:  # unknown head: run the whole model, then reduce its logits chunk by chunk
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
            hidden = out.hidden_states[-1]
            logits = out.logits[positions]  # a copy: chunks of it may be reduced in place

            def logits_of(a: int, b: int) -> torch.Tensor:
                return logits[a:b]

        n = int(positions.sum())
        stats = chunked_logit_stats(logits_of, n, k, temperatures, chunk_tokens, draws)
        return TeacherBatch(hidden, *stats)


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise TeacherError(f"teacher.device={spec} but no CUDA device is visible; use auto or cpu")
    return torch.device(spec)


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    if spec == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and spec == "float16":
        raise TeacherError("teacher.dtype=float16 is not supported on CPU; use float32 or bfloat16")
    return getattr(torch, spec)


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or os.sep in name.strip("/").split("/", 1)[0]


def load_teacher(cfg: TeacherConfig) -> Teacher:
    """Load tokenizer and masked LM, checking that it is a usable teacher (clear errors if not)."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    name = os.path.expanduser(cfg.name)
    if _looks_like_path(cfg.name) and not Path(name).exists():
        raise TeacherError(
            f"teacher.name: {cfg.name} does not exist; give an existing model directory or a Hugging Face model name"
        )
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as exc:
        raise TeacherError(
            f"teacher.name: cannot load a tokenizer from {cfg.name!r} ({first_line(exc)}); "
            "check the name or path (offline: use a local directory)"
        ) from None
    if not getattr(tokenizer, "is_fast", False) or tokenizer.mask_token_id is None:
        raise TeacherError(f"teacher.name: {cfg.name} needs a fast tokenizer with a mask token")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the load report is checked below instead
    try:
        model, info = AutoModelForMaskedLM.from_pretrained(name, attn_implementation="sdpa", output_loading_info=True)
    except ValueError as exc:
        if "Unrecognized configuration class" in str(exc):
            raise TeacherError(
                f"teacher.name: {cfg.name} is not a masked language model; use a model that "
                "AutoModelForMaskedLM loads (BERT, RoBERTa, DistilBERT, ...)"
            ) from None
        raise TeacherError(f"teacher.name: cannot load {cfg.name!r}: {first_line(exc)}") from None
    except LOAD_ERRORS as exc:
        raise TeacherError(
            f"teacher.name: cannot load {cfg.name!r} ({first_line(exc)}); check the name or path (offline: use a local "
            "directory), or, if its weight files are damaged, download or save them again"
        ) from None
    finally:
        hf_logging.set_verbosity(verbosity)
    missing = sorted(info.get("missing_keys", []))
    if missing:  # from_pretrained fills these randomly: a teacher must have them all
        raise TeacherError(
            f"teacher.name: {cfg.name} has no trained weights for {missing[0]} "
            f"({len(missing)} missing, e.g. an encoder without MLM head); adapt it with "
            "`pipeline adapt-teacher` or choose a masked LM checkpoint"
        )
    weights = weights_sha256(model)
    model = model.to(device=device, dtype=dtype).eval()
    return Teacher(cfg.name, model, tokenizer, device, dtype, weights, tokenizer_sha256(tokenizer))
