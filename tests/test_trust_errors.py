"""Trust, round two: what used to end in a traceback is one line naming the problem and the fix
(a tokenizer beyond the vocabulary, a corpus without a token, damaged weights, an object store
without credentials, an object deleted while a run reads it)."""

import os
import shutil
import time
from pathlib import Path

import pytest
import yaml

from cache_format.reader import CacheReader
from pipeline.errors import DistilcacheError
from tests.test_faults import build, one_error, train_cfg
from tests.test_trust import invoke

pytestmark = pytest.mark.integration


# ----------------------------------------------------------------------------- tracebacks become one line


def test_a_tokenizer_larger_than_the_vocabulary_is_one_line(assets, raw, tmp_path):
    from transformers import AutoTokenizer, BertForMaskedLM

    from tests.conftest import tiny_bert_config

    path = tmp_path / "narrow-teacher"
    BertForMaskedLM(tiny_bert_config(200)).save_pretrained(path)
    AutoTokenizer.from_pretrained(assets.teacher).save_pretrained(path)  # 300 tokens
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"cache": dict(raw, teacher=dict(raw["teacher"], name=str(path)))}))
    line = one_error(invoke("cache-teacher", "--config", str(config)))
    assert line == (
        "error: teacher.name: its tokenizer has 300 tokens but the model's vocabulary 200: ids from 200 up have no "
        "embedding; use the tokenizer the model was trained with, or resize its embeddings and save it again"
    )


def test_a_corpus_without_a_token_is_one_line_and_leaves_nothing(raw, tmp_path):
    text = tmp_path / "zero-width.txt"
    text.write_text("\u200b\u200b\n\n\u200b \u200b\n", encoding="utf-8")
    cfg = dict(raw, corpus=dict(raw["corpus"], paths=[str(text)], eval_fraction=0.0))
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"cache": cfg}))
    line = one_error(invoke("cache-teacher", "--config", str(config)))
    assert line == (
        f"error: corpus: the train documents of {text} (2 non-blank) yield no tokens with the teacher's tokenizer "
        "(control or zero-width characters only?); give it real text"
    )
    assert not list((Path(raw["store"]["cache_dir"]) / "corpus").glob("*.tmp-*"))
    assert not Path(raw["store"]["output"]).exists()


def test_a_damaged_teacher_weight_file_is_one_line(assets, raw, tmp_path):
    path = tmp_path / "damaged-teacher"
    shutil.copytree(assets.teacher, path)
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"cache": dict(raw, teacher=dict(raw["teacher"], name=str(path)))}))
    line = one_error(invoke("cache-teacher", "--config", str(config)))
    assert line.startswith(f"error: teacher.name: cannot load '{path}' (Error while deserializing header")
    assert line.endswith("or, if its weight files are damaged, download or save them again")


def test_an_object_store_without_credentials_fails_at_once(monkeypatch, tmp_path):
    for key in list(os.environ):
        if key.startswith(("AWS_", "GOOGLE_", "AZURE_", "DISTILCACHE_INSTANCE")):
            monkeypatch.delenv(key)
    started = time.perf_counter()
    for url in ("s3://dc-bucket/cache", "gs://dc-bucket/cache", "az://dc-container/cache"):
        line = one_error(invoke("verify", url))
        assert line.startswith(f"error: {url}: no credentials for this object store; set ")
        assert line.endswith("storage_options `instance_credentials: true` or DISTILCACHE_INSTANCE_CREDENTIALS=1")
    assert time.perf_counter() - started < 5, "no retries to a metadata address"


@pytest.mark.parametrize("through", ["direct", "local cache"])
def test_an_s3_object_deleted_while_a_run_reads_it_is_one_line(s3, raw, tmp_path, through):
    """Deleted after the run opened the cache: the DataLoader worker that reads it hands back the
    one-line error naming the shard, not a worker traceback, and no numbers."""
    from cache_format.storage import open_storage
    from student_train.data import CacheBatches, FieldSelection

    url = s3.bucket(f"dc-deleted-{through.replace(' ', '-')}") + "/cache"
    build(raw, output=url)
    cfg = train_cfg(url, tmp_path / "run")
    cfg.data.num_workers, cfg.data.mix_blocks = 1, 100  # one group holds every block
    cfg.data.local_cache_gb = 0 if through == "direct" else 1
    cfg.data.local_cache_dir = str(tmp_path / "mirror")
    from student_train.config import reader_options

    reader = CacheReader(url, **reader_options(cfg.data))  # opened: every object is there
    record = next(r for r in reader.records() if (r["split"], r["shard"]) == ("train", 1))
    key = record["files"]["hidden"]["path"]
    open_storage(url).delete(key)
    fields = FieldSelection(("hidden",))
    batches = CacheBatches(reader, cfg.data, fields, cfg.seed, streams=1, rank=0, world=1)
    expected = f"{url}: train shard 00001: the hidden file is missing ({key}; deleted while being read?)"
    with pytest.raises(DistilcacheError) as caught:
        next(iter(batches))
    assert str(caught.value).startswith(expected), caught.value
    assert "DataLoader" not in str(caught.value) and "Traceback" not in str(caught.value)
