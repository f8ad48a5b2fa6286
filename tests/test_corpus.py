import json

import numpy as np
import pytest
from transformers import AutoTokenizer

from cache_format.hashing import tokenizer_sha256
from pipeline.errors import CorpusError
from teacher_cache.config import CorpusConfig
from teacher_cache.corpus import prepare_corpus
from teacher_cache.corpus import sources as corpus_sources
from teacher_cache.corpus.packing import Packer, special_frame
from teacher_cache.corpus.sources import _text_documents

CLS, SEP, PAD = 2, 3, 0


def test_packer_rows_are_independent_of_document_batching():
    rng = np.random.default_rng(0)
    docs = [rng.integers(10, 99, size=rng.integers(1, 30)) for _ in range(50)]

    def pack(batch_docs: int) -> np.ndarray:
        packer = Packer(16, [CLS], [SEP], SEP, PAD)
        rows = []
        for a in range(0, len(docs), batch_docs):
            chunk = docs[a : a + batch_docs]
            rows.append(packer.add(np.concatenate(chunk), np.array([len(d) for d in chunk])))
        rows.append(packer.finish())
        return np.concatenate(rows)

    whole = pack(len(docs))
    for size in (1, 3, 17):
        np.testing.assert_array_equal(pack(size), whole)
    assert (whole[:, 0] == CLS).all()
    # content is the documents joined by one separator, in order, nothing lost
    content = np.concatenate([r[1 : list(r).index(SEP, len(r) - 1 if r[-1] == SEP else 1)] for r in whole[:-1]])
    last = whole[-1][1:][whole[-1][1:] != PAD][:-1]
    stream = np.concatenate([np.concatenate([[SEP], d]) if i else d for i, d in enumerate(docs)])
    np.testing.assert_array_equal(np.concatenate([content, last]), stream)
    assert whole[-1][-1] == PAD  # the last row is shorter and padded


def test_text_documents_split_paragraphs_on_whitespace_only_lines(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text(" = Title = \n \n First line\nsecond line\n\t\nThird para\n", encoding="utf-8")
    paragraphs = [d["text"] for d in _text_documents([str(f)], "paragraph", "")]
    assert paragraphs == [" = Title = \n", " First line\nsecond line\n", "Third para\n"]
    lines = [d["text"] for d in _text_documents([str(f)], "line", "")]
    assert len(lines) == 6
    assert [d["text"] for d in _text_documents([str(f)], "document", "")] == [f.read_text()]


@pytest.fixture
def tokenizer(assets):
    return AutoTokenizer.from_pretrained(assets.teacher)


def test_special_frame_of_a_bert_tokenizer(tokenizer):
    prefix, suffix, sep = special_frame(tokenizer)
    assert prefix == [tokenizer.cls_token_id] and suffix == [tokenizer.sep_token_id] and sep == tokenizer.sep_token_id


def test_prepare_corpus_packs_caches_and_splits(assets, tokenizer, tmp_path):
    cfg = CorpusConfig(paths=[str(assets.text_dir / "*.txt")], max_seq_len=32, eval_fraction=0.1)
    packed = prepare_corpus(cfg, tokenizer, tokenizer_sha256(tokenizer), tmp_path, seed=1)
    ids = np.asarray(packed.train.ids)
    assert ids.dtype == np.uint16 and ids.shape[1] == 32
    assert (ids[:, 0] == tokenizer.cls_token_id).all()
    full = packed.train.lengths == 32
    assert full[:-1].all() and (ids[full, -1] == tokenizer.sep_token_id).all()
    assert packed.eval is not None and len(packed.eval.ids) > 0
    assert packed.meta["documents"]["eval"] == round(
        0.1 * (packed.meta["documents"]["train"] + packed.meta["documents"]["eval"])
    )
    np.testing.assert_array_equal(packed.counts, np.bincount(ids.ravel(), minlength=len(tokenizer)))
    # a second call reuses the packed arrays; another seed moves the held-out documents
    again = prepare_corpus(cfg, tokenizer, tokenizer_sha256(tokenizer), tmp_path, seed=1)
    assert again.fingerprint == packed.fingerprint
    np.testing.assert_array_equal(np.asarray(again.train.ids), ids)
    other = prepare_corpus(cfg, tokenizer, tokenizer_sha256(tokenizer), tmp_path, seed=2)
    assert other.fingerprint != packed.fingerprint


def test_changed_file_content_changes_the_fingerprint(tokenizer, tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("The quick brown fox jumps over the lazy dog.\n\nA second paragraph of text.\n")
    cfg = CorpusConfig(paths=[str(f)], max_seq_len=16)
    a = prepare_corpus(cfg, tokenizer, "tok", tmp_path / "c", seed=0)
    f.write_text("The quick brown fox jumps over the lazy cat.\n\nA second paragraph of text.\n")
    b = prepare_corpus(cfg, tokenizer, "tok", tmp_path / "c", seed=0)
    assert a.fingerprint != b.fingerprint
    assert not np.array_equal(np.asarray(a.train.ids), np.asarray(b.train.ids))


def test_jsonl_parquet_and_disk_sources(tokenizer, tmp_path):
    import datasets

    texts = ["Python is a programming language.", "It has a large standard library."] * 5
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"body": t, "id": i}) for i, t in enumerate(texts)))
    datasets.Dataset.from_dict({"body": texts}).to_parquet(str(tmp_path / "d.parquet"))
    datasets.Dataset.from_dict({"body": texts}).save_to_disk(str(tmp_path / "disk"))
    results = []
    for source, paths in (
        ("files", [str(tmp_path / "d.jsonl")]),
        ("files", [str(tmp_path / "d.parquet")]),
        ("disk", [str(tmp_path / "disk")]),
    ):
        cfg = CorpusConfig(source=source, paths=paths, text_column="body", max_seq_len=16)
        results.append(np.asarray(prepare_corpus(cfg, tokenizer, "tok", tmp_path / "c", 0).train.ids))
    for other in results[1:]:
        np.testing.assert_array_equal(other, results[0])


def test_python_docs_source_reads_stdlib_docstrings(tokenizer, tmp_path, monkeypatch):
    from teacher_cache.corpus.python_docs import iter_docstrings, stdlib_root

    monkeypatch.setattr(corpus_sources, "iter_python_docs", lambda: iter_docstrings(stdlib_root() / "json"))
    cfg = CorpusConfig(source="python-docs", max_seq_len=32)
    packed = prepare_corpus(cfg, tokenizer, "tok", tmp_path, seed=0)
    assert packed.meta["documents"]["train"] == len(list(iter_docstrings(stdlib_root() / "json")))
    text = tokenizer.decode(np.asarray(packed.train.ids[0]))
    assert "json" in text.lower() or "object" in text.lower()


@pytest.mark.parametrize(
    "setup,match",
    [
        (lambda p: None, "no file matches"),
        (lambda p: (p / "x.txt").write_text("\n \n"), "no text found"),
        (lambda p: (p / "x.txt").write_bytes(b"abc\x00\x01\x02"), "looks binary"),
        (
            lambda p: (p / "x.txt").write_bytes("caf\xe9 au lait".encode("latin-1")),
            "not UTF-8 text",
        ),
        (lambda p: (p / "x.jsonl").write_text('{"body": "hello"}\n'), "column 'text' not found"),
        (lambda p: (p / "x.csv").write_text("a,b\n"), "unsupported extension"),
    ],
    ids=["missing", "empty", "binary", "latin1", "no-text-column", "extension"],
)
def test_bad_corpus_inputs_raise_clear_errors(tokenizer, tmp_path, setup, match):
    setup(tmp_path)
    paths = [str(tmp_path / "x.*")]
    with pytest.raises(CorpusError, match=match):
        prepare_corpus(CorpusConfig(paths=paths, max_seq_len=16), tokenizer, "tok", tmp_path / "c", 0)
