"""Facts about Hugging Face model families that both stages need: which number positions from
pad_token_id + 1 (RoBERTa and its kin), and where a config keeps its width and depth."""

from __future__ import annotations

ROBERTA_LIKE = frozenset({"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "data2vec-text"})
"""Model types whose position ids start at pad_token_id + 1."""


def position_offset(config) -> int:
    """Position embeddings a model reserves before the first token's (RoBERTa-likes: pad + 1)."""
    return int(config.pad_token_id) + 1 if config.model_type in ROBERTA_LIKE else 0


def hidden_size(config) -> int:
    """The width of a config (DistilBERT calls it `dim`)."""
    return int(getattr(config, "hidden_size", None) or config.dim)


def num_layers(config) -> int:
    return int(getattr(config, "num_hidden_layers", None) or config.n_layers)
