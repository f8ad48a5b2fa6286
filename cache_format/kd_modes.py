"""The KD modes stage two offers, in one table: which cache fields each reads, what it needs from
the cache and the run, and which mode is faithful for a given cache. Adding a mode touches this
table and `student_train.losses.KD_LOSSES`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from cache_format.settings import CacheSettings

BASE_FIELDS = ("input_ids", "labels", "lengths", "sequence_index", "view")
"""Read by every run (the cosine loss adds `hidden`)."""
HIDDEN_FIELDS = ("hidden", "hidden_scale")


@dataclass(frozen=True)
class Run:
    """What a KD mode's checks need to know about the run."""

    temperature: float
    topk: int | None
    kd_positions: str


def _topk_problems(s: CacheSettings, run: Run, mode: str) -> list[str]:
    out = s.outputs
    problems = []
    if not s.has_topk:
        held = "sampled ones only" if out.logits == "sampled" else "none (outputs.logits=none: hidden states only)"
        problems.append(
            f"loss.kd_mode={mode} needs cached top-k logits, the cache holds {held}; use "
            f"loss.kd_mode={'sampled' if out.logits == 'sampled' else 'exact'} or recache with outputs.logits=both"
        )
        return problems
    if mode in ("topk_tail", "topk_sampled") and s.lse_column(run.temperature) is None:
        problems.append(
            f"loss.temperature={run.temperature} is not cached (cache has {[float(t) for t in out.temperatures]}); "
            "use one of them, loss.kd_mode=exact, or recache with it in outputs.temperatures"
        )
    if run.topk is not None and run.topk > out.k:
        problems.append(f"loss.topk={run.topk} exceeds the cached k={out.k}; use at most {out.k}")
    return problems + _position_problems(s, run, mode)


def _position_problems(s: CacheSettings, run: Run, mode: str) -> list[str]:
    if run.kd_positions == "all" and s.outputs.logit_positions == "masked":
        return [
            f"loss.kd_mode={mode} with loss.kd_positions=all needs logits at every position, the cache holds them "
            "at masked positions only (outputs.logit_positions=masked); set loss.kd_positions=masked or use "
            "loss.kd_mode=exact"
        ]
    return []


def _sampled_problems(s: CacheSettings, run: Run, mode: str) -> list[str]:
    out = s.outputs
    if not s.has_samples:
        return [
            f"loss.kd_mode={mode} needs sampled teacher logits, the cache holds "
            f"{'top-k only' if out.logits == 'topk' else 'none (hidden states only)'}; use loss.kd_mode=exact "
            "or recache with outputs.logits=sampled or both"
        ]
    problems = []
    if float(run.temperature) != float(out.sample_temperature):
        problems.append(
            f"loss.temperature={run.temperature} but the cache sampled the teacher at T={out.sample_temperature}; "
            f"set loss.temperature={out.sample_temperature}"
        )
    return problems + _position_problems(s, run, mode)


def _hybrid_problems(s: CacheSettings, run: Run, mode: str) -> list[str]:
    both = _topk_problems(s, run, mode) + _sampled_problems(s, run, mode)
    return list(dict.fromkeys(both))  # the position problem once


def _exact_problems(s: CacheSettings, run: Run, mode: str) -> list[str]:
    if s.head:
        return []
    return [
        f"loss.kd_mode=exact needs the teacher's MLM head, which the cache lacks ({s.teacher.model_type}); "
        "use topk_tail or sampled"
    ]


@dataclass(frozen=True)
class KDMode:
    name: str
    fields: tuple[str, ...]
    """Cache fields the KD term reads (absent optional ones, like hidden_scale, are skipped)."""
    check: Callable[[CacheSettings, Run, str], list[str]]
    faithful: bool
    """Trains the online student (exact or unbiased); the others are biased where the top-k
    hold little of the teacher's mass (docs/results/fidelity.md)."""

    def problems(self, settings: CacheSettings, run: Run) -> list[str]:
        return self.check(settings, run, self.name)


KD_MODES = {
    m.name: m
    for m in (
        KDMode("exact", HIDDEN_FIELDS, _exact_problems, faithful=True),
        KDMode("sampled", ("sample_ids", "sample_counts"), _sampled_problems, faithful=True),
        KDMode("topk_tail", ("topk_values", "topk_indices", "logsumexp"), _topk_problems, faithful=False),
        KDMode("topk_renorm", ("topk_values", "topk_indices"), _topk_problems, faithful=False),
        KDMode(
            "topk_sampled",
            ("topk_values", "topk_indices", "logsumexp", "sample_ids", "sample_counts"),
            _hybrid_problems,
            faithful=True,
        ),
    )
}


def topk_mass(values: torch.Tensor, lse: torch.Tensor, temperature: float) -> torch.Tensor:
    """(...,) probability the teacher's cached top-k hold at T, from (..., k) values and (...,) lse_T."""
    return torch.exp(values / temperature - lse[..., None]).sum(-1)


def kd_advice(settings: CacheSettings, k: int, temperature: float, mass_masked: float, mass_all: float) -> str:
    """Which KD mode reproduces online distillation with this cache, given how much of the
    teacher's mass its top-k hold at the KD temperature."""
    faithful = []
    if settings.head:
        faithful.append("loss.kd_mode=exact (exact logits from the cached hidden states: no extra bytes)")
    if settings.has_samples and float(settings.outputs.sample_temperature) == float(temperature):
        faithful.append("loss.kd_mode=sampled or topk_sampled (unbiased)")
    use = "; use " + " or ".join(faithful) if faithful else "; recache with outputs.logits=sampled"
    return (
        f"top-{k} holds {100 * mass_masked:.0f} % of the teacher's mass at masked positions at "
        f"T = {temperature:g} ({100 * mass_all:.0f} % over all): topk_tail lumps the rest into one bucket and "
        f"trains a measurably different student than online KD{use}"
    )
