"""Downstream config: `finetune` (pipeline finetune) — a task, a recipe, the models to compare."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

METRICS = {
    "classification": ("accuracy", "f1", "mcc"),
    "regression": ("pearson", "spearman"),
}


@dataclass
class TaskConfig:
    """A sequence classification or regression task, read through `datasets`."""

    source: Literal["files", "disk", "hub"] = "files"
    """`files` (local .csv/.tsv/.jsonl/.json/.parquet), `disk` (a save_to_disk directory) or `hub`."""
    name: str | None = None
    """Hub dataset name (source `hub`), e.g. glue, imdb."""
    subset: str | None = None
    """Hub dataset configuration, e.g. sst2 (source `hub`)."""
    paths: list[str] = field(default_factory=list)
    """Training files or globs (source `files`), or one save_to_disk directory (source `disk`)."""
    validation_paths: list[str] = field(default_factory=list)
    """Separate validation files (source `files`); else `validation_split`, else `validation_fraction`."""
    split: str = "train"
    """Training split (hub, disk)."""
    validation_split: str | None = None
    """Validation split (hub, disk), e.g. validation."""
    validation_fraction: float = 0.0
    """Seeded fraction of the training examples held out for validation when there is no other."""
    split_seed: int = 0
    """Seed of that hold-out (fixed across models and recipe seeds)."""
    text_column: str = "sentence"
    """Column holding the text."""
    text_pair_column: str | None = None
    """Optional second text column (sentence pairs: NLI, paraphrase)."""
    label_column: str = "label"
    """Labels: integers, strings (mapped to ids, the mapping recorded) or floats (regression)."""
    type: Literal["auto", "classification", "regression"] = "auto"
    """auto: regression for float labels that are not all integral, else classification."""
    metrics: list[str] = field(default_factory=list)
    """Metrics to report (accuracy, f1, mcc; pearson, spearman); empty: accuracy and f1, or pearson and
    spearman. The first is the primary one (retention, ablation deltas)."""
    max_train_examples: int | None = None
    """Use at most this many training examples (a seeded subset); null uses all."""
    max_eval_examples: int | None = None
    """Validate on at most this many examples (a seeded subset); null uses all."""

    def check(self) -> list[str]:
        problems = []
        if self.source in ("files", "disk") and not self.paths:
            problems.append(f"paths: source '{self.source}' needs at least one path")
        if self.source == "hub" and not self.name:
            problems.append("name: source 'hub' needs a dataset name, e.g. glue")
        if not 0.0 <= self.validation_fraction < 1.0:
            problems.append(f"validation_fraction: {self.validation_fraction} must be in [0, 1)")
        known = {m for ms in METRICS.values() for m in ms}
        unknown = [m for m in self.metrics if m not in known]
        if unknown:
            problems.append(f"metrics: {unknown} unknown; choose from {sorted(known)}")
        for key in ("max_train_examples", "max_eval_examples"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                problems.append(f"{key}: must be positive or null")
        return problems


@dataclass
class RecipeConfig:
    """The same fine-tuning recipe for every model: AdamW, linear warmup then linear decay."""

    lr: float = 5e-5
    """Peak learning rate."""
    epochs: float = 3.0
    """Passes over the training examples (fractional allowed)."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (overrides epochs when smaller)."""
    batch_size: int = 32
    """Examples per optimizer step."""
    warmup_fraction: float = 0.06
    """Fraction of the steps spent warming up linearly."""
    weight_decay: float = 0.01
    """AdamW weight decay (not on biases and LayerNorms)."""
    max_seq_len: int = 128
    """Tokens per example (truncated), special tokens included."""
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    """One fine-tuning run per seed (classifier init, dropout, example order); mean ± std are reported."""
    device: str = "auto"
    """auto (CUDA when present), cpu, cuda or cuda:N."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """auto: bf16 autocast on CUDA, fp32 on CPU."""
    eval_batch_size: int = 128
    """Examples per validation forward."""
    save_models: bool = False
    """Keep each fine-tuned model (save_pretrained) beside its results."""
    num_threads: int | None = None
    """CPU threads for torch (null: torch's default)."""

    def check(self) -> list[str]:
        problems = []
        if self.lr <= 0:
            problems.append("lr: must be positive")
        if self.epochs <= 0:
            problems.append("epochs: must be positive")
        if self.max_steps is not None and self.max_steps < 1:
            problems.append("max_steps: must be positive or null")
        for key in ("batch_size", "eval_batch_size", "max_seq_len"):
            if getattr(self, key) < 1:
                problems.append(f"{key}: must be at least 1")
        if not 0 <= self.warmup_fraction < 1:
            problems.append("warmup_fraction: must be in [0, 1)")
        if not self.seeds:
            problems.append("seeds: give at least one, e.g. [1, 2, 3]")
        if any(not 0 <= s < 2**32 for s in self.seeds):
            problems.append(f"seeds: {self.seeds} must be in [0, 2^32)")
        return problems


@dataclass
class SpeedConfig:
    """How size and speed are measured: the same batches for every model, in one run."""

    batch_sizes: list[int] = field(default_factory=lambda: [1, 64])
    """Batch sizes timed (latency per batch; throughput at the largest)."""
    repeats: int = 10
    """Timed forwards per batch size (the median is reported)."""
    warmup: int = 3
    """Untimed forwards first."""
    num_threads: int | None = None
    """CPU threads, pinned for every model (null: all cores)."""

    def check(self) -> list[str]:
        problems = []
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            problems.append("batch_sizes: give positive batch sizes, e.g. [1, 64]")
        if self.repeats < 1 or self.warmup < 0:
            problems.append("repeats/warmup: repeats >= 1, warmup >= 0")
        return problems


@dataclass
class FinetuneConfig:
    """`pipeline finetune`: fine-tune models on a task with one recipe and seeds, side by side."""

    output_dir: str = "runs/finetune"
    """Results (results.md/.csv/.json, speed.json) and one directory per (model, seed)."""
    models: dict[str, str] = field(default_factory=dict)
    """Name -> model directory or hub name (an exported student, the teacher, any masked LM); also
    `--model NAME=PATH`."""
    reference: str | None = None
    """The model retention is measured against (default: `teacher` when present, else the first)."""
    cache: str | None = None
    """A teacher cache: models whose vocabulary or tokenizer differ from it are refused."""
    storage_options: dict[str, Any] = field(default_factory=dict)
    """Object-store options for a remote `cache` (as `train.data.storage_options`)."""
    task: TaskConfig = field(default_factory=TaskConfig)
    recipe: RecipeConfig = field(default_factory=RecipeConfig)
    speed: SpeedConfig = field(default_factory=SpeedConfig)

    def check(self) -> list[str]:
        if self.reference is not None and self.models and self.reference not in self.models:
            return [f"reference: {self.reference!r} is not one of the models ({', '.join(self.models)})"]
        return []
