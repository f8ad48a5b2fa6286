"""The student: build it, initialise it from the teacher's weights, wrap it for distillation.

`init: teacher` follows DistilBERT: teacher layers round(linspace(0, L_t - 1, L_s)) (0, 2, 4, 7,
9, 11 for 12 -> 6), embeddings and MLM head copied, token-type embeddings dropped after folding
`token_type_embeddings[0]` into the position table (so a student with all teacher layers
reproduces the teacher exactly), pooler dropped. Supported: BERT or RoBERTa-family teachers into
DistilBERT students, and BERT teachers into BERT students. The teacher's weights are read,
never run.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from cache_format.family import ROBERTA_LIKE, hidden_size, num_layers, position_offset
from cache_format.hashing import weights_sha256
from cache_format.head import LOAD_ERRORS
from cache_format.settings import TeacherInfo
from pipeline.errors import DistilcacheError, first_line
from student_train.config import StudentConfig

_BERT_TO_DISTILBERT_LAYER = {
    "attention.self.query": "attention.q_lin",
    "attention.self.key": "attention.k_lin",
    "attention.self.value": "attention.v_lin",
    "attention.output.dense": "attention.out_lin",
    "attention.output.LayerNorm": "sa_layer_norm",
    "intermediate.dense": "ffn.lin1",
    "output.dense": "ffn.lin2",
    "output.LayerNorm": "output_layer_norm",
}


def teacher_layers(n_teacher: int, n_student: int) -> list[int]:
    """Teacher layer copied into each student layer: round(linspace(0, L_t-1, L_s)), halves up."""
    if n_student == 1:
        return [0]
    return [math.floor(i * (n_teacher - 1) / (n_student - 1) + 0.5) for i in range(n_student)]


def student_config(cfg: StudentConfig, teacher_config):
    """The student's HF config: the given one, or a DistilBERT derived from the teacher's."""
    from transformers import AutoConfig, DistilBertConfig

    if cfg.config:
        config = AutoConfig.from_pretrained(cfg.config)
    else:
        t = teacher_config
        offset = position_offset(t)
        config = DistilBertConfig(
            vocab_size=t.vocab_size,
            max_position_embeddings=t.max_position_embeddings - offset,
            n_layers=cfg.layers,
            n_heads=t.num_attention_heads,
            dim=cfg.hidden_size or t.hidden_size,
            hidden_dim=t.intermediate_size * (cfg.hidden_size or t.hidden_size) // t.hidden_size,
            dropout=t.hidden_dropout_prob,
            attention_dropout=t.attention_probs_dropout_prob,
            activation=t.hidden_act,
            pad_token_id=t.pad_token_id,
            tie_word_embeddings=True,
        )
    if cfg.dropout is not None:
        for key in ("dropout", "attention_dropout", "hidden_dropout_prob", "attention_probs_dropout_prob"):
            if hasattr(config, key):
                setattr(config, key, cfg.dropout)
    return config


def init_from_teacher(student: nn.Module, teacher_state: dict[str, torch.Tensor], teacher_config) -> list[int]:
    """Copy teacher weights into `student` in place; returns the teacher layer of each student layer."""
    s_type, t_type = student.config.model_type, teacher_config.model_type
    if hidden_size(student.config) != hidden_size(teacher_config):
        raise DistilcacheError(
            f"student.init=teacher needs the teacher's width ({hidden_size(teacher_config)}), the student has "
            f"{hidden_size(student.config)}; use student.init=random or drop student.hidden_size"
        )
    layers = teacher_layers(num_layers(teacher_config), num_layers(student.config))
    if s_type == "distilbert" and (t_type == "bert" or t_type in ROBERTA_LIKE):
        mapped = _distilbert_from_bert(teacher_state, teacher_config, layers, "bert" if t_type == "bert" else "roberta")
    elif s_type == "bert" and t_type == "bert":
        mapped = _bert_from_bert(teacher_state, layers)
    else:
        raise DistilcacheError(
            f"student.init=teacher supports BERT/RoBERTa teachers into DistilBERT students and "
            f"BERT into BERT, not {t_type} into {s_type}; use student.init=random"
        )
    missing, unexpected = student.load_state_dict(mapped, strict=False)
    missing = [k for k in missing if not k.endswith("vocab_projector.weight") and "position_ids" not in k]
    assert not missing and not unexpected, f"init mapping incomplete: missing {missing}, unexpected {unexpected}"
    student.tie_weights()
    return layers


def _distilbert_from_bert(t: dict, tcfg, layers: list[int], prefix: str) -> dict[str, torch.Tensor]:
    head = "cls.predictions" if prefix == "bert" else "lm_head"
    offset = position_offset(tcfg)
    positions = t[f"{prefix}.embeddings.position_embeddings.weight"][offset:]
    out = {
        "distilbert.embeddings.word_embeddings.weight": t[f"{prefix}.embeddings.word_embeddings.weight"],
        # token type 0 is added to every position in the teacher: fold it into the position table
        "distilbert.embeddings.position_embeddings.weight": positions
        + t[f"{prefix}.embeddings.token_type_embeddings.weight"][0],
        "distilbert.embeddings.LayerNorm.weight": t[f"{prefix}.embeddings.LayerNorm.weight"],
        "distilbert.embeddings.LayerNorm.bias": t[f"{prefix}.embeddings.LayerNorm.bias"],
    }
    for i, j in enumerate(layers):
        for src, dst in _BERT_TO_DISTILBERT_LAYER.items():
            for p in ("weight", "bias"):
                out[f"distilbert.transformer.layer.{i}.{dst}.{p}"] = t[f"{prefix}.encoder.layer.{j}.{src}.{p}"]
    if prefix == "bert":
        transform, norm, bias = f"{head}.transform.dense", f"{head}.transform.LayerNorm", f"{head}.bias"
    else:
        transform, norm, bias = f"{head}.dense", f"{head}.layer_norm", f"{head}.bias"
    for p in ("weight", "bias"):
        out[f"vocab_transform.{p}"] = t[f"{transform}.{p}"]
        out[f"vocab_layer_norm.{p}"] = t[f"{norm}.{p}"]
    out["vocab_projector.bias"] = t[bias]
    return {k: v.detach().clone() for k, v in out.items()}


def _bert_from_bert(t: dict, layers: list[int]) -> dict[str, torch.Tensor]:
    out = {k: v for k, v in t.items() if ".encoder.layer." not in k and "pooler" not in k}
    for i, j in enumerate(layers):
        src = f"bert.encoder.layer.{j}."
        out.update({f"bert.encoder.layer.{i}." + k[len(src) :]: v for k, v in t.items() if k.startswith(src)})
    return {k: v.detach().clone() for k, v in out.items()}


class DistillModule(nn.Module):
    """The student plus, when its width differs from the teacher's, a projection for the cosine loss.
    `forward(..., logits=False)` stops before the vocabulary projection (`decoder`), so the losses
    run it only where they need it (student_train.head_loss)."""

    def __init__(self, student: nn.Module, teacher_hidden: int):
        super().__init__()
        self.student = student
        width = hidden_size(student.config)
        self.projection = nn.Linear(width, teacher_hidden) if width != teacher_hidden else None
        _head_transform(student)  # an unsupported head fails here, not at the first step

    @property
    def decoder(self) -> nn.Linear:
        """The vocabulary projection (tied to the input embeddings): logits = decoder(features)."""
        return self.student.get_output_embeddings()

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, logits: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L, V) logits, or with `logits=False` the (B, L, H) features the decoder maps to them,
        and (B, L, H_teacher) last hidden states (projected if needed)."""
        if logits:
            out = self.student(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
            last, head_out = out.hidden_states[-1], out.logits
        else:
            last = self.student.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            head_out = _head_transform(self.student)(last)
        hidden = last if self.projection is None else self.projection(last)
        return head_out, hidden


def head_logits(model: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """A masked LM's vocabulary logits of (n, H) last hidden states: its whole MLM head, run only
    on the rows given."""
    return model.get_output_embeddings()(_head_transform(model)(features))


def load_cached_teacher(cached: TeacherInfo, name: str | None, key: str, why: str) -> nn.Module:
    """The teacher's weights (`name`, or the name the cache records), refused unless they hash to
    the weights the cache was built from; `key` is the config key that sets `name`."""
    from transformers import AutoModelForMaskedLM

    name = name or cached.name
    try:
        teacher = AutoModelForMaskedLM.from_pretrained(name)
    except LOAD_ERRORS as exc:
        raise DistilcacheError(
            f"teacher weights {name!r} not found or unreadable ({first_line(exc)}; needed for {why}); "
            f"set {key} to their location"
        ) from None
    digest = weights_sha256(teacher)
    if digest != cached.weights_sha256:
        raise DistilcacheError(
            f"teacher weights at {name!r} hash to {digest[:12]} but the cache was built from "
            f"{cached.weights_sha256[:12]}; point {key} at the cached teacher"
        )
    return teacher


def _head_transform(student: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The MLM head's layers before the vocabulary projection (dense, activation, LayerNorm)."""
    if hasattr(student, "vocab_transform"):  # DistilBertForMaskedLM
        return lambda x: student.vocab_layer_norm(student.activation(student.vocab_transform(x)))
    if hasattr(student, "cls"):  # BertForMaskedLM
        return student.cls.predictions.transform
    if hasattr(student, "lm_head") and hasattr(student.lm_head, "layer_norm"):  # RoBERTa family
        head = student.lm_head
        return lambda x: head.layer_norm(nn.functional.gelu(head.dense(x)))
    raise DistilcacheError(f"{type(student).__name__}: only DistilBERT, BERT and RoBERTa MLM heads are supported")
