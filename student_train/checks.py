"""Does this cache fit this run? Every mismatch is refused with both values named."""

from __future__ import annotations

import numpy as np
import torch

from student_train.config import TrainConfig
from student_train.model import hidden_size, student_config
from teacher_cache.encode import decode_values
from teacher_cache.masking import IGNORE_INDEX
from teacher_cache.report import kd_advice, topk_mass
from teacher_cache.store import FORMAT_VERSION, TEACHER_DIR, CacheError, CacheReader
from teacher_cache.teacher import tokenizer_sha256


def check_cache(
    reader: CacheReader, cfg: TrainConfig, student_config, tokenizer_sha256: str, online: bool
) -> list[str]:
    """Problems (empty when the cache serves this run)."""
    m = reader.manifest
    assert m is not None
    problems = []
    if m["format_version"] != FORMAT_VERSION:
        problems.append(f"cache format v{m['format_version']} but this distilcache reads v{FORMAT_VERSION}; rebuild it")
    if student_config.vocab_size != m["teacher"]["vocab_size"]:
        problems.append(
            f"student vocabulary {student_config.vocab_size} != cache vocabulary "
            f"{m['teacher']['vocab_size']}; the student must use the teacher's tokenizer"
        )
    if tokenizer_sha256 != m["tokenizer"]["sha256"]:
        problems.append(
            f"tokenizer in {reader.path / 'teacher'} hashes to {tokenizer_sha256[:12]} but the cache "
            f"was built with {m['tokenizer']['sha256'][:12]}; the cache is damaged, rebuild it"
        )
    cached_hidden = reader.fields["hidden"].row_shape[-1]
    if cached_hidden != m["teacher"]["hidden_size"]:
        problems.append(f"cached hidden size {cached_hidden} != teacher hidden size {m['teacher']['hidden_size']}")
    if cfg.data.split not in reader.splits:
        problems.append(f"data.split={cfg.data.split!r} is not in the cache (splits: {', '.join(reader.splits)})")
    loss = cfg.loss
    temps = [float(t) for t in m["identity"]["outputs"]["temperatures"]]
    if not online and loss.alpha_ce > 0:
        if loss.kd_mode in ("topk_tail", "topk_renorm") and float(loss.temperature) not in temps:
            problems.append(
                f"loss.temperature={loss.temperature} is not cached (cache has {temps}); use one of "
                "them, loss.kd_mode=exact, or recache with it in outputs.temperatures"
            )
        outputs = m["identity"]["outputs"]
        logits = outputs.get("logits", "topk")
        if loss.kd_mode in ("topk_tail", "topk_renorm") and logits in ("sampled", "none"):
            held = "sampled ones only" if logits == "sampled" else "none (outputs.logits=none: hidden states only)"
            problems.append(
                f"loss.kd_mode={loss.kd_mode} needs cached top-k logits, the cache holds {held}; use "
                f"loss.kd_mode={'sampled' if logits == 'sampled' else 'exact'} or recache with outputs.logits=both"
            )
        if loss.kd_mode in ("topk_tail", "topk_renorm") and loss.topk is not None and loss.topk > outputs["k"]:
            problems.append(f"loss.topk={loss.topk} exceeds the cached k={outputs['k']}; use at most {outputs['k']}")
        if loss.kd_mode == "sampled":
            if logits in ("topk", "none"):
                problems.append(
                    f"loss.kd_mode=sampled needs sampled teacher logits, the cache holds "
                    f"{'top-k only' if logits == 'topk' else 'none (hidden states only)'}; use loss.kd_mode=exact "
                    "or recache with outputs.logits=sampled or both"
                )
            elif float(loss.temperature) != float(outputs["sample_temperature"]):
                problems.append(
                    f"loss.temperature={loss.temperature} but the cache sampled the teacher at "
                    f"T={outputs['sample_temperature']}; set loss.temperature={outputs['sample_temperature']}"
                )
        positions = outputs["logit_positions"]
        if loss.kd_mode != "exact" and loss.kd_positions == "all" and positions == "masked":
            problems.append(
                "loss.kd_positions=all but the cache holds logits at masked positions only; set "
                "loss.kd_positions=masked or use loss.kd_mode=exact"
            )
        if loss.kd_mode == "exact" and not m["head"]:
            problems.append(
                f"loss.kd_mode=exact needs the teacher's MLM head, which the cache lacks "
                f"({m['teacher']['model_type']}); use topk_tail"
            )
    if cfg.student.init == "teacher" and hidden_size(student_config) != m["teacher"]["hidden_size"]:
        problems.append(
            f"student.init=teacher needs the teacher's width {m['teacher']['hidden_size']}, the student "
            f"has {hidden_size(student_config)}; use student.init=random"
        )
    return problems


def preflight(cfg: TrainConfig, online: bool = False) -> list[str]:
    """The problems `train-student` would refuse `cfg` for, without starting it (for sweeps)."""
    from transformers import AutoConfig, AutoTokenizer

    try:
        reader = CacheReader(cfg.cache)
    except CacheError as exc:
        return [str(exc)]
    teacher_dir = reader.path / TEACHER_DIR
    config = student_config(cfg.student, AutoConfig.from_pretrained(teacher_dir))
    return check_cache(reader, cfg, config, tokenizer_sha256(AutoTokenizer.from_pretrained(teacher_dir)), online)


def kd_mode_advice(reader: CacheReader, cfg: TrainConfig, rows: int = 64) -> str | None:
    """For a top-k KD mode: how much of the teacher's mass the cached top-k hold at the KD
    temperature (first `rows` rows of the split), and the faithful mode to use instead."""
    loss, outputs = cfg.loss, reader.identity["outputs"]
    if loss.alpha_ce == 0 or loss.kd_mode not in ("topk_tail", "topk_renorm"):
        return None
    temps = [float(t) for t in outputs["temperatures"]]
    n = min(rows, reader.layouts[cfg.data.split].rows)
    d = reader.read_rows(cfg.data.split, 0, n, ["labels", "lengths", "topk_values", "logsumexp"])
    k = loss.topk or outputs["k"]
    values = decode_values(np.ascontiguousarray(d["topk_values"][..., :k]), outputs["logits_dtype"])
    mass = topk_mass(
        values, torch.from_numpy(d["logsumexp"][..., temps.index(float(loss.temperature))]), loss.temperature
    )
    labels = torch.from_numpy(d["labels"])
    valid = torch.arange(labels.shape[1])[None, :] < torch.from_numpy(d["lengths"])[:, None]
    masked = labels != IGNORE_INDEX
    cached = valid if outputs["logit_positions"] == "all" else masked
    advice = kd_advice(
        {**outputs, "k": k},
        bool(reader.manifest["head"]),
        float(loss.temperature),
        float(mass[masked].mean()),
        float(mass[cached].mean()),
    )
    return f"loss.kd_mode={loss.kd_mode}: {advice}"
