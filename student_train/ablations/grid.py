"""A sweep's grid: shared overrides, variants in order, the baseline, the paper's deltas, and each
run's resolved TrainConfig, validated against the cache before any run starts."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import apply_mapping, from_dict, load_yaml
from pipeline.errors import ConfigError
from student_train.checks import preflight
from student_train.config import TrainConfig

GRID_KEYS = {"name", "description", "base", "baseline", "primary_metric", "variants", "paper"}


@dataclass
class Grid:
    """A parsed grid file: shared overrides, variants in order, the baseline and an optional paper reference."""

    name: str
    variants: dict[str, dict[str, Any]]
    base: dict[str, Any] = field(default_factory=dict)
    baseline: str = ""
    primary_metric: str = "masked_accuracy"
    description: str = ""
    paper: dict[str, Any] | None = None


def load_grid(path: str | Path) -> Grid:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"grid file {path} not found; see configs/ablations/ for examples")
    doc = load_yaml(path.read_text(encoding="utf-8"), f"grid file {path}") or {}
    if not isinstance(doc, dict):
        raise ConfigError(f"grid file {path} must be a mapping with `variants`")
    unknown = sorted(set(doc) - GRID_KEYS)
    if unknown:
        known = ", ".join(sorted(GRID_KEYS))
        raise ConfigError(f"grid file {path}: unknown key(s) {', '.join(unknown)}; known: {known}")
    variants = doc.get("variants") or {}
    if not isinstance(variants, dict) or not variants:
        raise ConfigError(f"grid file {path}: `variants` must map variant names to overrides (at least one)")
    bad = [n for n in variants if not str(n).replace("-", "").replace("_", "").isalnum()]
    if bad:
        raise ConfigError(f"grid file {path}: variant names {bad} must be letters, digits, '-' or '_'")
    grid = Grid(
        name=str(doc.get("name") or path.stem),
        variants={str(n): dict(v or {}) for n, v in variants.items()},
        base=dict(doc.get("base") or {}),
        baseline=str(doc.get("baseline") or next(iter(variants))),
        primary_metric=str(doc.get("primary_metric", "masked_accuracy")),
        description=str(doc.get("description", "")),
        paper=doc.get("paper"),
    )
    if grid.baseline not in grid.variants:
        raise ConfigError(f"grid file {path}: baseline {grid.baseline!r} is not a variant ({', '.join(variants)})")
    return grid


def resolve_variants(
    grid: Grid, base_train: dict[str, Any], cache: str | None, out: Path, seeds: int = 1, opened: dict | None = None
) -> dict[str, TrainConfig]:
    """Each run's TrainConfig: --config/--set train section < grid base < variant; cache and
        output_dir set by the sweep. With `seeds` > 1, each variant runs `seeds` times (`variant/seed-K`,
        train.seed + K) from the same cache. All problems of all variants are reported at once. `opened`
    collects the caches opened on the way (once each), for the rest of the command."""
    configs, problems = {}, []
    for name, overrides in grid.variants.items():
        raw = apply_mapping(apply_mapping(copy.deepcopy(base_train), grid.base), overrides)
        if cache:
            raw["cache"] = cache
        for k in range(seeds):
            run = name if seeds == 1 else f"{name}/seed-{k}"
            raw_k = {**raw, "output_dir": str(out / "runs" / run), "seed": int(raw.get("seed", 56)) + k}
            try:
                configs[run] = from_dict(TrainConfig, raw_k, prefix="train.")
            except ConfigError as exc:
                problems.append(f"variant {name}: {exc}")
                break
    for name, cfg in configs.items():
        problems += [f"variant {name}: {p}" for p in preflight(cfg, opened=opened)]
    if problems:
        raise ConfigError("; ".join(problems))
    return configs
