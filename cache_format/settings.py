"""What a cache is, as typed objects: the stage-one settings that shaped its content (masking,
outputs) and what it records about its teacher and tokenizer. `CacheReader.settings` loads them
from the header with the same `from_dict` the stage configs use, so every reader of a cache
works with validated dataclasses, never raw dicts."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

DEFAULT_CACHE_DIR = os.environ.get("DISTILCACHE_HOME", "~/.cache/distilcache")
"""Root of derived cache paths, the packed-corpus cache and local copies of remote caches' files."""
IGNORE_INDEX = -100
"""`labels` value at positions that are not prediction targets (and the fill value of padding)."""


@dataclass
class MaskingConfig:
    """BERT masking, applied deterministically per (seed, view, sequence)."""

    mask_prob: float = 0.15
    """Fraction of candidate (non-special) tokens chosen as prediction targets."""
    mask_token_prob: float = 0.8
    """Of the chosen tokens, the fraction replaced by the mask token."""
    random_token_prob: float = 0.1
    """Of the chosen tokens, the fraction replaced by a random token (the rest stay unchanged)."""
    smoothing: float = 0.0
    """DistilBERT token-frequency smoothing: choose tokens with weight count^-smoothing (0.7 in the paper;
    0 = uniform)."""
    views: int = 1
    """Independently masked copies of every sequence (a fixed-seed stand-in for dynamic masking)."""

    def check(self) -> list[str]:
        problems = []
        if not 0.0 < self.mask_prob < 1.0:
            problems.append(f"mask_prob: {self.mask_prob} must be in (0, 1)")
        if self.mask_token_prob < 0 or self.random_token_prob < 0:
            problems.append("mask_token_prob/random_token_prob: must be non-negative")
        if self.mask_token_prob + self.random_token_prob > 1.0:
            problems.append("mask_token_prob + random_token_prob must not exceed 1")
        if self.smoothing < 0:
            problems.append(f"smoothing: {self.smoothing} must be >= 0")
        if not 1 <= self.views <= 255:
            problems.append(f"views: {self.views} must be between 1 and 255")
        return problems


@dataclass
class OutputsConfig:
    """What is cached per token."""

    k: int = 64
    """Top-k teacher logits kept per position (logits: topk or both)."""
    temperatures: list[float] = field(default_factory=lambda: [1.0, 2.0])
    """Temperatures at which the full-vocabulary log-sum-exp is stored (exact tail mass)."""
    logit_positions: Literal["all", "masked"] = "all"
    """Positions with cached logits: every non-pad token (DistilBERT) or masked tokens only."""
    logits_dtype: Literal["float16", "bfloat16"] = "float16"
    """Storage dtype of the top-k logit values."""
    hidden_dtype: Literal["auto", "pq", "pca", "nf4", "int4", "int8", "float16", "float32"] = "int8"
    """Storage of last hidden states: int8 with a per-token float16 scale (half the bytes of float16; the
    teacher's logits rebuilt from them move by a KL of ~2e-5, docs/results/fidelity.md); nf4 or int4 (a fixed
    Walsh-Hadamard rotation, then 4-bit codes, NormalFloat or uniform levels, with a float16 absmax per
    128 elements: 0.52 B an element, a quarter of float16); pq (product quantisation: `hidden_codes`
    sub-vectors, a byte each against 256 centroids fitted at capture start) or pca (`hidden_codes` int8
    coefficients on a basis fitted at capture start); float16; float32; or auto (the fewest bytes whose
    rebuilt-logit KL on the pilot is within `fidelity_budget`)."""
    hidden_codes: int = 0
    """Code bytes a token of the fitted codecs: pq sub-vectors (must divide H) or pca components;
    0 = H/4 (0.25 B an element)."""
    fidelity_budget: float = 1e-4
    """hidden_dtype auto: the largest rebuilt-logit KL (T = 1, mean over the pilot's tokens) a codec may
    cost; int8 costs ~2e-5, nf4 ~2e-3 at H = 384."""
    pilot_sequences: int = 64
    """Train sequences (the first of the plan, view 0) that fitted codecs are fitted on and auto
    measures candidates on."""
    logits: Literal["none", "topk", "sampled", "both"] = "none"
    """Sparse teacher logits besides the hidden states: `none` (stage two's `exact` KD rebuilds the full
    logits from the hidden states through the cached head: no extra bytes), top-k with the log-sum-exp
    (`topk`), tokens sampled from the teacher's distribution with their counts (`sampled`, RS-KD,
    Anshumann et al. 2025), or both."""
    n_samples: int = 64
    """Draws per position with logits: sampled (with replacement; distinct ids stored with counts)."""
    sample_temperature: float = 1.0
    """Temperature of the teacher distribution the samples are drawn from (= the KD temperature
    that stage two's `sampled` mode uses)."""

    def check(self) -> list[str]:
        problems = []
        if self.k < 1:
            problems.append(f"k: {self.k} must be at least 1")
        if not 1 <= self.n_samples <= 65535:
            problems.append(f"n_samples: {self.n_samples} must be in [1, 65535]")
        if self.sample_temperature <= 0:
            problems.append(f"sample_temperature: {self.sample_temperature} must be positive")
        if not self.temperatures:
            problems.append("temperatures: give at least one, e.g. [1.0, 2.0]")
        if any(t <= 0 for t in self.temperatures):
            problems.append(f"temperatures: {self.temperatures} must all be positive")
        if self.hidden_codes < 0:
            problems.append(f"hidden_codes: {self.hidden_codes} must be >= 0 (0 = H/4)")
        if not self.fidelity_budget > 0:
            problems.append(f"fidelity_budget: {self.fidelity_budget} must be positive")
        if self.pilot_sequences < 1:
            problems.append(f"pilot_sequences: {self.pilot_sequences} must be at least 1")
        if len(set(self.temperatures)) != len(self.temperatures):
            problems.append(f"temperatures: {self.temperatures} has duplicates")
        return problems


@dataclass
class TeacherInfo:
    """The teacher a cache was built from (manifest `teacher`)."""

    name: str
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int | None
    weights_sha256: str
    dtype: str


@dataclass
class TokenizerInfo:
    """The tokenizer a cache was built with (manifest `tokenizer`)."""

    sha256: str
    pad_id: int | None
    mask_id: int | None
    special_ids: list[int]
    size: int


@dataclass
class CacheSettings:
    """A cache's typed identity: how its rows were made and what its teacher fields hold."""

    format_version: int
    fingerprint: str
    seed: int
    masking: MaskingConfig
    outputs: OutputsConfig
    teacher: TeacherInfo
    tokenizer: TokenizerInfo
    head: bool = False
    """The teacher's MLM head is cached (exact logits can be rebuilt from the hidden states)."""
    splits: list[str] = field(default_factory=list)

    def lse_column(self, temperature: float) -> int | None:
        """Index of `temperature` in the cached log-sum-exp columns (None when not cached)."""
        temps = [float(t) for t in self.outputs.temperatures]
        return temps.index(float(temperature)) if float(temperature) in temps else None

    @property
    def has_topk(self) -> bool:
        return self.outputs.logits in ("topk", "both")

    @property
    def has_samples(self) -> bool:
        return self.outputs.logits in ("sampled", "both")
