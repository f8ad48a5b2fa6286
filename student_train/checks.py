"""Does this cache fit this run? Every mismatch is refused with both values named."""

from __future__ import annotations

import json

import numpy as np
import torch

from cache_format.encode import decode_values
from cache_format.family import hidden_size
from cache_format.hashing import tokenizer_sha256
from cache_format.hidden import stored_hidden_width
from cache_format.kd_modes import KD_MODES, Run, kd_advice, topk_mass
from cache_format.layout import valid_positions
from cache_format.reader import CacheReader
from cache_format.settings import IGNORE_INDEX
from pipeline.errors import CacheError
from student_train.config import TrainConfig, reader_options
from student_train.model import student_config


def check_cache(reader: CacheReader, cfg: TrainConfig, student_config, tokenizer_hash: str, online: bool) -> list[str]:
    """Problems (empty when the cache serves this run)."""
    s = reader.settings
    problems = []
    if student_config.vocab_size != s.teacher.vocab_size:
        problems.append(
            f"student vocabulary {student_config.vocab_size} != cache vocabulary {s.teacher.vocab_size}; "
            "the student must use the teacher's tokenizer"
        )
    if tokenizer_hash != s.tokenizer.sha256:
        problems.append(
            f"tokenizer in {reader.url}/teacher hashes to {tokenizer_hash[:12]} but the cache was built with "
            f"{s.tokenizer.sha256[:12]}; the cache is damaged, rebuild it"
        )
    cached_hidden = reader.fields["hidden"].row_shape[-1]
    if cached_hidden != stored_hidden_width(s.teacher.hidden_size, s.outputs.hidden_dtype, s.outputs.hidden_codes)[0]:
        problems.append(f"cached hidden size {cached_hidden} != teacher hidden size {s.teacher.hidden_size}")
    if cfg.data.split not in reader.splits:
        problems.append(f"data.split={cfg.data.split!r} is not in the cache (splits: {', '.join(reader.splits)})")
    loss = cfg.loss
    if not online and loss.alpha_ce > 0:
        run = Run(float(loss.temperature), loss.topk, loss.kd_positions)
        problems += KD_MODES[loss.kd_mode].problems(s, run)
    if cfg.student.init == "teacher" and hidden_size(student_config) != s.teacher.hidden_size:
        problems.append(
            f"student.init=teacher needs the teacher's width {s.teacher.hidden_size}, the student "
            f"has {hidden_size(student_config)}; use student.init=random"
        )
    return problems


def open_cache(cfg: TrainConfig, opened: dict[tuple, CacheReader]) -> CacheReader:
    """The run's cache, opened with its reader options once per command (`opened` keeps them by
    location and options)."""
    options = reader_options(cfg.data)
    key = (cfg.cache, json.dumps(options, sort_keys=True, default=str))
    if key not in opened:
        opened[key] = CacheReader(cfg.cache, **options)
    return opened[key]


def preflight(cfg: TrainConfig, online: bool = False, opened: dict | None = None) -> list[str]:
    """The problems `train-student` would refuse `cfg` for, without starting it (for sweeps)."""
    from transformers import AutoConfig, AutoTokenizer

    try:
        reader = open_cache(cfg, {} if opened is None else opened)
    except CacheError as exc:
        return [str(exc)]
    teacher_dir = reader.teacher_dir()
    config = student_config(cfg.student, AutoConfig.from_pretrained(teacher_dir))
    return check_cache(reader, cfg, config, tokenizer_sha256(AutoTokenizer.from_pretrained(teacher_dir)), online)


def kd_mode_advice(reader: CacheReader, cfg: TrainConfig, rows: int = 64) -> str | None:
    """For a biased KD mode: how much of the teacher's mass the cached top-k hold at the KD
    temperature (first `rows` rows of the split), and the faithful mode to use instead."""
    loss, s = cfg.loss, reader.settings
    column = s.lse_column(loss.temperature)
    if loss.alpha_ce == 0 or KD_MODES[loss.kd_mode].faithful or column is None:
        return None
    d = reader.read_rows(cfg.data.split, 0, min(rows, reader.layouts[cfg.data.split].rows))
    k = loss.topk or s.outputs.k
    values = decode_values(np.ascontiguousarray(d["topk_values"][..., :k]), s.outputs.logits_dtype)
    lse = torch.from_numpy(d["logsumexp"][..., column])
    mass = topk_mass(values, lse, loss.temperature)
    labels = torch.from_numpy(d["labels"])
    valid = valid_positions(torch.from_numpy(d["lengths"]), labels.shape[1])
    masked = labels != IGNORE_INDEX
    cached = valid if s.outputs.logit_positions == "all" else masked
    advice = kd_advice(s, k, float(loss.temperature), float(mass[masked].mean()), float(mass[cached].mean()))
    return f"loss.kd_mode={loss.kd_mode}: {advice}"
