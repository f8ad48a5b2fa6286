"""`select` config: which sequences of a cache a selection keeps, and how they are scored."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from cache_format.selection import NAME

SCORES = ("teacher_loss", "entropy", "miniplm", "random")


@dataclass
class SelectConfig:
    """`pipeline select`: score every sequence of a cache split from the teacher's cached outputs and
    keep a fraction of them, as a selection beside the cache (the cache is never rewritten)."""

    cache: str = ""
    """The complete teacher cache to select from (a path or an object-store URL); also `--cache`."""
    name: str | None = None
    """The selection's name (what `train.data.selection` names); null: `<score>-<percent>`, e.g.
    `teacher_loss-50`."""
    split: str = "train"
    """Cache split whose sequences are scored."""
    score: Literal["teacher_loss", "entropy", "miniplm", "random"] = "teacher_loss"
    """Per sequence, over its mask views: `teacher_loss`, the teacher's cross-entropy at masked tokens
    (from the exact logits rebuilt through the cached head); `entropy`, the teacher's mean entropy over
    non-pad tokens; `miniplm`, the teacher's log-likelihood of the masked tokens minus a small reference
    MLM's (MiniPLM's difference sampling: kept where the teacher knows what the reference does not;
    `reference`); `random`, a seeded uniform draw (the control every score is measured against)."""
    keep: Literal["highest", "lowest"] = "highest"
    """Keep the highest- or the lowest-scoring sequences (a sequence without a scored token is kept last)."""
    fraction: float = 0.5
    """Share of the split's sequences kept (rounded up), in (0, 1]."""
    reference: str | None = None
    """The reference MLM of `miniplm`: `teacher:N` (the cached teacher's first N layers under its own cached
    head) or a Hugging Face masked LM (name or path) with the teacher's tokenizer."""
    teacher: str | None = None
    """Teacher weights for `reference: teacher:N` (null: the name the cache records); their hash must match
    the cache's."""
    token_scores: bool = False
    """Also store the teacher's entropy at every token (score `entropy` only; 2 B a token): a run with
    `loss.kd_tokens: entropy` and `data.selection` naming it reads these instead of rebuilding the
    teacher's logits over every token each step (with `fraction: 1`, token selection alone)."""
    seed: int = 56
    """Seed of the `random` score."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the rebuilt logits and the reference run (auto: CUDA when available)."""
    chunk_tokens: int = 1024
    """Tokens per chunk of rebuilt logits (bounds memory)."""
    storage_options: dict[str, Any] = field(default_factory=dict)
    """Object-store options for a remote `cache` (as `train.data.storage_options`)."""

    @property
    def selection_name(self) -> str:
        return self.name or f"{self.score}-{round(100 * self.fraction):d}"

    def check(self) -> list[str]:
        problems = []
        if not self.cache:
            problems.append("cache: required; --cache PATH (the teacher cache to select from)")
        if not 0 < self.fraction <= 1:
            problems.append(f"fraction: {self.fraction} must be in (0, 1]")
        if self.name is not None and not NAME.match(self.name):
            problems.append(f"name: {self.name!r} must be letters, digits, '.', '_' or '-' (at most 100)")
        if self.score == "miniplm" and not self.reference:
            problems.append("reference: `miniplm` needs a reference MLM: teacher:N or a model name or path")
        if self.reference and self.score != "miniplm":
            problems.append(f"reference: only `miniplm` uses one (score is {self.score})")
        if self.reference and self.reference.startswith("teacher:") and not self.reference[8:].isdigit():
            problems.append(f"reference: {self.reference!r}; write teacher:N with N the layers kept, e.g. teacher:2")
        if self.token_scores and self.score != "entropy":
            problems.append(f"token_scores: stores the teacher's entropy a token; set score: entropy, not {self.score}")
        if self.chunk_tokens < 1:
            problems.append("chunk_tokens: must be at least 1")
        return problems
