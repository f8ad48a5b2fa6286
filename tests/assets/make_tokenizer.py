"""Build the fixture tokenizer committed beside this script (run once; the tests load the files).

A 300-token WordPiece trained on the docstrings of three standard-library packages. Training it
on every test run made fixtures differ from process to process (the trainer breaks frequency
ties differently each time), so it is built once and kept:

    python tests/assets/make_tokenizer.py
"""

from __future__ import annotations

from pathlib import Path

VOCAB = 300
OUT = Path(__file__).resolve().parent / "tokenizer"


def docstring_text() -> list[str]:
    from teacher_cache.corpus.python_docs import iter_docstrings, stdlib_root

    docs: list[str] = []
    for package in ("json", "email", "http"):
        docs.extend(iter_docstrings(stdlib_root() / package))
    return docs


def train_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=VOCAB, special_tokens=specials))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


if __name__ == "__main__":
    train_tokenizer(docstring_text()).save_pretrained(OUT)
    print(f"wrote {OUT}")
