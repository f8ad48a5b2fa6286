"""Tiny, self-contained fixtures: real English text from a few standard-library docstrings, the
committed WordPiece tokenizer trained on it (tests/assets), and 2-layer BERT masked LMs (hidden
32). No network."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SEQ_LEN = 32


TOKENIZER = Path(__file__).resolve().parent / "assets" / "tokenizer"
"""The fixture tokenizer, built once by tests/assets/make_tokenizer.py and committed: the same
vocabulary on every run and machine."""


def _docstring_text() -> list[str]:
    from tests.assets.make_tokenizer import docstring_text

    return docstring_text()


def fixture_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOKENIZER)


def torchrun_cmd(nproc: int, *pipeline_args: str) -> list[str]:
    """`torchrun --standalone --nproc-per-node N -m pipeline ...` with this interpreter."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(nproc),
        "-m",
        "pipeline",
        *pipeline_args,
    ]


def tiny_bert_config(vocab_size: int, **overrides):
    from transformers import BertConfig

    base = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    return BertConfig(**{**base, **overrides})


@dataclass
class Assets:
    root: Path
    teacher: Path
    """A complete 2-layer BERT masked LM with its tokenizer."""
    text_dir: Path
    """Three .txt files of docstrings (one per package), paragraphs separated by blank lines."""
    docs: list[str]


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> Assets:
    from transformers import BertForMaskedLM

    root = tmp_path_factory.mktemp("assets")
    docs = _docstring_text()
    text_dir = root / "text"
    text_dir.mkdir()
    third = len(docs) // 3
    for i, chunk in enumerate((docs[:third], docs[third : 2 * third], docs[2 * third :])):
        (text_dir / f"part{i}.txt").write_text("\n\n".join(chunk) + "\n", encoding="utf-8")
    tokenizer = fixture_tokenizer()
    torch.manual_seed(0)
    model = BertForMaskedLM(tiny_bert_config(len(tokenizer))).eval()
    teacher = root / "teacher"
    model.save_pretrained(teacher)
    tokenizer.save_pretrained(teacher)
    return Assets(root, teacher, text_dir, docs)


@pytest.fixture
def cache_cfg(assets, tmp_path):
    """A small valid `cache` config (dict form) writing under tmp_path."""
    return {
        "max_sequences": 40,
        "max_eval_sequences": 8,
        "corpus": {"paths": [str(assets.text_dir / "*.txt")], "max_seq_len": SEQ_LEN, "eval_fraction": 0.1},
        "masking": {"views": 2},
        "teacher": {"name": str(assets.teacher), "batch_size": 8, "num_threads": 1},
        "outputs": {"k": 16, "logits": "topk", "hidden_dtype": "float16"},  # the top-k path (defaults: none, int8)
        "store": {
            "cache_dir": str(tmp_path / "home"),
            "output": str(tmp_path / "cache"),
            "block_rows": 4,
            "shard_rows": 8,
        },
    }


@pytest.fixture
def raw(cache_cfg) -> dict:
    """`cache_cfg` with raw (uncompressed) float16 hidden states: every shard file of a field has one size."""
    import copy

    out = copy.deepcopy(cache_cfg)
    out["outputs"].update(hidden_dtype="float16")
    return out


@pytest.fixture(scope="session")
def tiny_cache(assets, tmp_path_factory) -> Path:
    """A complete cache of the tiny teacher: 2 views x 64 sequences (blocks of 4, shards of 16), eval 16;
    top-k (k=16) and 16 teacher samples at T=2 per token."""
    from pipeline.config import from_dict
    from teacher_cache.config import CacheConfig
    from teacher_cache.run import run_cache

    root = tmp_path_factory.mktemp("tinycache")
    raw = {
        "max_sequences": 64,
        "max_eval_sequences": 16,
        "corpus": {"paths": [str(assets.text_dir / "*.txt")], "max_seq_len": SEQ_LEN, "eval_fraction": 0.1},
        "masking": {"views": 2},
        "teacher": {"name": str(assets.teacher), "batch_size": 16, "num_threads": 1},
        "outputs": {"k": 16, "hidden_dtype": "float32", "logits": "both", "n_samples": 16, "sample_temperature": 2.0},
        "store": {"cache_dir": str(root / "home"), "output": str(root / "cache"), "block_rows": 4, "shard_rows": 16},
    }
    return Path(run_cache(from_dict(CacheConfig, raw)))


@dataclass
class S3:
    endpoint: str
    env: dict[str, str]
    """What a process needs to reach the endpoint: the standard AWS variables."""

    def bucket(self, name: str) -> str:
        """A fresh bucket; its s3:// URL."""
        import boto3

        boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1").create_bucket(Bucket=name)
        return f"s3://{name}"


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 HTTP endpoint (moto) on 127.0.0.1; its PutObject honours If-None-Match."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ALLOW_HTTP": "true",
    }
    yield S3(endpoint, env)
    server.stop()


@pytest.fixture
def s3(s3_server, monkeypatch) -> S3:
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    return s3_server


def cache_arrays(location) -> dict:
    """Every array of a cache, read whole: (split, field) -> numpy array."""
    from cache_format.reader import CacheReader

    reader = CacheReader(location)
    return {
        (s, f): reader.read_rows(s, 0, lay.rows, [f])[f] for s, lay in reader.layouts.items() for f in reader.fields
    }


def assert_same_arrays(a, b) -> None:
    """Two caches hold equal arrays, field for field (bit for bit)."""
    import numpy as np

    got, want = cache_arrays(a), cache_arrays(b)
    assert got.keys() == want.keys()
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=str(key))
