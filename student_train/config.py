"""Stage-two config: `train` (pipeline train-student) and `evaluate` (pipeline evaluate)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from cache_format.kd_modes import KD_MODES
from cache_format.settings import DEFAULT_CACHE_DIR


@dataclass
class StudentConfig:
    """Which student to build and how to initialise it."""

    config: str | None = None
    """A Hugging Face masked-LM config (name or path) for the student; null derives a DistilBERT
    from the teacher's config (same width, vocabulary and positions, `layers` layers)."""
    layers: int = 6
    """Transformer layers of the derived DistilBERT student."""
    hidden_size: int | None = None
    """Width of the derived student (null: the teacher's); another width needs init: random and trains a
    projection for the cosine loss."""
    init: Literal["teacher", "random"] = "teacher"
    """`teacher`: copy embeddings, MLM head and every other teacher layer (reads the teacher's weights,
    never runs it); `random`: the config's own initialisation."""
    teacher: str | None = None
    """Teacher weights for init: teacher (name or path); null uses the name recorded in the cache. Their
    hash must match the cache's."""
    dropout: float | None = None
    """Override the student's dropout probabilities (null keeps the config's; 0 makes runs deterministic
    across data-parallel layouts)."""

    def check(self) -> list[str]:
        problems = []
        if self.layers < 1:
            problems.append("layers: must be at least 1")
        if self.hidden_size is not None and self.hidden_size < 1:
            problems.append("hidden_size: must be positive or null")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout: {self.dropout} must be in [0, 1)")
        return problems


@dataclass
class LossConfig:
    """The triple loss: alpha_ce * KD + alpha_mlm * MLM + alpha_cos * cosine."""

    kd_mode: str = "exact"
    """`exact`: full-vocabulary teacher logits rebuilt from cached hidden states through the cached MLM
    head (any temperature; trains the online student, docs/results/fidelity.md); `sampled`: RS-KD's unbiased
    estimator from the cached teacher samples (outputs.logits: sampled or both); `topk_tail`: exact KL
    over the k cached tokens plus one tail bucket; `topk_renorm`: teacher renormalised over its top-k;
    `topk_sampled`: exact top-k terms plus the tail estimated from the cached samples outside the
    top-k (unbiased; needs outputs.logits: both).
    `topk_tail` and `topk_renorm` are biased where the top-k hold little mass at T (measured in
    docs/results/fidelity.md)."""
    temperature: float = 2.0
    """KD temperature (topk modes need it among the cache's temperatures; `sampled` needs the
    cache's outputs.sample_temperature)."""
    topk: int | None = None
    """Use only the first `topk` of the cached top-k tokens (null: all); the tail bucket grows to
    match, so one k=64 cache serves k in {8, 16, 64} ablations."""
    kd_positions: Literal["all", "masked"] = "all"
    """Distil on every non-pad token (DistilBERT) or on masked tokens only. (Stage one's
    `outputs.logit_positions` says where a cache holds sparse logits; KD can only use those.)"""
    kd_tokens: Literal["all", "entropy", "confidence", "random", "tip"] = "all"
    """Which of those positions KD distils: all of them, or in each row the `kd_fraction` with the
    highest teacher entropy, the highest teacher top-1 probability, a seeded random subset (the
    control), or the highest student cross-entropy against the teacher (`tip`: entropy plus the
    student's divergence). The student's head runs only where a loss needs it, so fewer KD tokens
    is less compute (entropy, confidence and tip need exact KD or the online teacher)."""
    kd_fraction: float = 1.0
    """Share of each row's KD positions `kd_tokens` keeps (rounded up), in (0, 1]."""
    head_chunk_tokens: int = 128
    """Rows per chunk of the student's vocabulary head, fused with its losses in forward and backward
    (no (n, V) logits held: the memory of one chunk; 128 is as fast as 512 on a CPU at 0.17x the
    unfused head's peak, `benchmarks/bench_head.py`; on a GPU larger chunks, e.g. 4096); 0 builds
    the (n, V) logits at once (the unfused path; ZeRO-3 always takes it, its partitioned head weight
    gathered by the module's own hooks)."""
    alpha_ce: float = 5.0
    """Weight of the KD term (DistilBERT's name: the cross-entropy against the teacher's soft targets; the
    masked-LM cross-entropy is `alpha_mlm`)."""
    alpha_mlm: float = 2.0
    """Weight of the masked-LM cross-entropy on masked tokens."""
    alpha_cos: float = 1.0
    """Weight of the cosine loss between student and teacher last hidden states (non-pad tokens)."""
    exact_chunk_tokens: int = 1024
    """Tokens per chunk when `exact` rebuilds teacher logits (bounds memory)."""
    exact_head_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Dtype of the teacher-head GEMM in `exact` mode: auto = bfloat16 where the hardware multiplies it
    natively (CUDA with bf16, CPUs with AVX512-BF16 or AMX), else float32. bf16 moves the teacher's
    distribution by a KL of ~1e-5 nats (docs/results/fidelity.md)."""

    def check(self) -> list[str]:
        problems = []
        if self.kd_mode not in KD_MODES:  # the names come from the one table of KD modes
            problems.append(f"kd_mode: {self.kd_mode!r} is not one of {', '.join(repr(m) for m in KD_MODES)}")
        if self.temperature <= 0:
            problems.append(f"temperature: {self.temperature} must be positive")
        if self.topk is not None and self.topk < 1:
            problems.append(f"topk: {self.topk} must be at least 1 or null")
        if not 0 < self.kd_fraction <= 1:
            problems.append(f"kd_fraction: {self.kd_fraction} must be in (0, 1]")
        if self.kd_tokens == "all" and self.kd_fraction != 1:
            problems.append("kd_fraction: needs a score to keep by; set loss.kd_tokens (e.g. entropy or random)")
        if self.head_chunk_tokens < 0:
            problems.append(f"head_chunk_tokens: {self.head_chunk_tokens} must be 0 (unfused) or positive")
        if min(self.alpha_ce, self.alpha_mlm, self.alpha_cos) < 0:
            problems.append("alpha_*: weights must be non-negative")
        if self.alpha_ce + self.alpha_mlm + self.alpha_cos == 0:
            problems.append("alpha_*: at least one loss weight must be positive")
        return problems


@dataclass
class OptimConfig:
    """AdamW with linear warmup then linear decay (the DistilBERT recipe)."""

    lr: float = 5e-4
    """Peak learning rate."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    """AdamW betas."""
    eps: float = 1e-6
    """AdamW epsilon."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_fraction: float = 0.05
    """Fraction of the optimizer steps spent warming up linearly."""
    grad_clip: float = 5.0
    """Gradient-norm clipping (0 disables)."""

    def check(self) -> list[str]:
        problems = []
        if self.lr <= 0:
            problems.append("lr: must be positive")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            problems.append(f"betas: {self.betas} must be two numbers in [0, 1)")
        if not 0 <= self.warmup_fraction < 1:
            problems.append("warmup_fraction: must be in [0, 1)")
        return problems


@dataclass
class DataConfig:
    """How blocks of the cache become micro-batches."""

    split: str = "train"
    """Cache split to train on."""
    micro_batch_size: int = 32
    """Sequences per micro-batch per process."""
    grad_accum_steps: int = 1
    """Micro-batches per optimizer step."""
    mix_blocks: int = 8
    """Chunk-aligned blocks whose rows are shuffled together (per stream)."""
    order: Literal["global", "windowed"] = "global"
    """Block order of an epoch: one seeded permutation of all blocks (global), or a seeded permutation
    inside each window of `window_shards` consecutive shards, window after window (windowed: what a
    cache still being written can serve, `follow`)."""
    window_shards: int = 8
    """Shards per window of the windowed order (more: better mixing, longer waits when following)."""
    selection: str | None = None
    """A sequence selection beside the cache (`pipeline select`): the run reads only its rows, in the same
    seeded order; null reads every row of the split. A selection made from another cache is refused."""
    follow: bool = False
    """Train while the cache is being captured: read only committed shards, waiting for the next one
    the order needs (`train-student --follow`); needs the windowed order."""
    follow_timeout: float = 600.0
    """Seconds without a new commit after which a follower stops (with a checkpoint to resume from)."""
    streams: int | None = None
    """Canonical data streams (null: one per process). Micro-batches are identical for every process
    count that divides it: set it (e.g. 8) to compare or resume runs across cluster sizes."""
    num_workers: int = 2
    """DataLoader worker processes (each opens the store lazily); 0 reads in the training process."""
    prefetch_groups: int = 2
    """Block groups each worker prepares ahead (and, for a remote cache, whose shards it fetches ahead)."""
    storage_options: dict[str, Any] = field(default_factory=dict)
    """Object-store options for a remote `cache` (s3://, gs://, az://) beside the standard environment
    (AWS_*, AWS_ENDPOINT_URL, ...), e.g. {endpoint: ..., region: ...}."""
    local_cache_dir: str | None = None
    """Local disk cache of a remote cache's shard files, shared by DataLoader workers and ranks on a node
    (null: $DISTILCACHE_HOME/mirror, ~/.cache/distilcache/mirror)."""
    local_cache_gb: float = 64.0
    """Bound of the local disk cache (least recently used shard files go first); 0 reads the bucket
    directly."""

    def check(self) -> list[str]:
        problems = []
        for key in ("micro_batch_size", "grad_accum_steps", "mix_blocks", "prefetch_groups"):
            if getattr(self, key) < 1:
                problems.append(f"{key}: must be at least 1")
        if self.streams is not None and self.streams < 1:
            problems.append("streams: must be positive or null")
        if self.num_workers < 0:
            problems.append("num_workers: must be >= 0")
        if self.window_shards < 1:
            problems.append("window_shards: must be at least 1")
        if self.follow and self.selection:
            problems.append("selection: a selection scores a complete cache; drop data.follow or data.selection")
        if self.follow and self.order != "windowed":
            problems.append("follow: a growing cache serves only the windowed order; set data.order=windowed")
        if self.follow_timeout <= 0:
            problems.append("follow_timeout: must be positive (seconds)")
        if self.local_cache_gb < 0:
            problems.append("local_cache_gb: must be >= 0 (0 disables the local cache)")
        return problems


@dataclass
class TrainConfig:
    """`pipeline train-student`: a student trained with DeepSpeed ZeRO from a teacher cache."""

    cache: str = ""
    """Path of a complete teacher cache (pipeline cache-teacher)."""
    output_dir: str = "runs/student"
    """Run directory: resolved config, metrics.jsonl, checkpoints/, the exported model in final/."""
    seed: int = 56
    """Seed of initialisation, dropout and block order."""
    epochs: float = 3.0
    """Passes over the split (fractional allowed); epoch e reads mask view e mod views."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (overrides epochs when smaller)."""
    deepspeed_config: str = "configs/deepspeed/zero2.json"
    """DeepSpeed JSON; batch sizes, optimizer, scheduler, clipping and precision marked "auto" are filled
    from this config, explicit values must agree with it."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """auto: bf16 on CUDA (fp16 where bf16 is unsupported), fp32 on CPU."""
    log_every: int = 10
    """Optimizer steps between step lines (metrics.jsonl gets every step)."""
    eval_every: int = 0
    """Optimizer steps between evaluations on the held-out split (0: only at the end)."""
    eval_sequences: int = 256
    """Held-out sequences used by the periodic evaluation."""
    save_every: int = 0
    """Optimizer steps between checkpoints (0: only at the end)."""
    keep_checkpoints: int = 2
    """Most recent checkpoints kept."""
    student: StudentConfig = field(default_factory=StudentConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def check(self) -> list[str]:
        problems = []
        if not self.cache:
            problems.append("cache: required; the path of a cache made by `pipeline cache-teacher`")
        if not 0 <= self.seed < 2**32:
            problems.append(f"seed: {self.seed} must be in [0, 2^32) (numpy's seed range)")
        if self.epochs <= 0:
            problems.append("epochs: must be positive")
        if self.max_steps is not None and self.max_steps < 1:
            problems.append("max_steps: must be positive or null")
        for key in ("log_every", "eval_sequences", "keep_checkpoints"):
            if getattr(self, key) < 1:
                problems.append(f"{key}: must be at least 1")
        for key in ("eval_every", "save_every"):
            if getattr(self, key) < 0:
                problems.append(f"{key}: must be >= 0")
        return problems


def reader_options(data: DataConfig) -> dict:
    """CacheReader keyword arguments for a run's cache: object-store options, the local disk cache,
    following a growing cache."""
    directory = data.local_cache_dir or f"{DEFAULT_CACHE_DIR}/mirror"
    return {
        "storage_options": data.storage_options or None,
        "local_cache": (directory, data.local_cache_gb),
        "follow": data.follow,
    }


@dataclass
class EvaluateConfig:
    """`pipeline evaluate`: held-out metrics of an exported student beside the teacher's, and both
    models' size and speed on identical batches."""

    model: str = ""
    """An exported student (a save_pretrained directory, e.g. runs/student/final); also `--model`."""
    cache: str = ""
    """The teacher cache to evaluate against (a path or an object-store URL); also `--cache`."""
    split: str = "eval"
    """Cache split whose first rows are evaluated."""
    sequences: int = 512
    """Sequences evaluated (the split's first rows, in the cache's seeded order)."""
    batch_size: int = 32
    """Sequences per forward."""
    output_json: str | None = None
    """Also write the results to this JSON file; also `--json`."""
    teacher: str | None = None
    """Teacher to measure size and speed against (null: the cache's, when it is a local directory)."""
    speed: bool = True
    """Measure size and speed beside the teacher."""
    speed_only: bool = False
    """Only size and speed, no metrics."""
    storage_options: dict[str, Any] = field(default_factory=dict)
    """Object-store options for a remote `cache` (as `train.data.storage_options`)."""

    def check(self) -> list[str]:
        problems = []
        if not self.model:
            problems.append("model: required; --model DIR (an exported student)")
        if not self.cache:
            problems.append("cache: required; --cache PATH (the teacher cache to evaluate against)")
        return problems
