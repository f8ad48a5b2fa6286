"""Corpus -> packed fixed-length token sequences, cached on disk.

Documents come through `datasets` (`sources`), are tokenized with the teacher's fast tokenizer
and packed across document boundaries into sequences of exactly `max_seq_len` tokens
(`packing`), and the packed arrays are cached under `<cache_dir>/corpus/<fingerprint>/`, keyed
by the corpus content, the tokenizer and the packing parameters (`prepare`).
"""

from pipeline.errors import CorpusError
from pipeline.paths import expand_paths
from teacher_cache.corpus.packing import PackedCorpus, PackedSplit
from teacher_cache.corpus.prepare import prepare_corpus
from teacher_cache.corpus.sources import hash_files

__all__ = ["CorpusError", "PackedCorpus", "PackedSplit", "expand_paths", "hash_files", "prepare_corpus"]
