"""Held-out metrics of a student against the cache, beside the teacher's own (`pipeline evaluate`).

Student: masked-token accuracy and perplexity against the original tokens, top-1 agreement with
the teacher (positions with cached logits), KL(teacher || student) at T = 1 over every non-pad
token with exact teacher logits rebuilt from the cached hidden states and head, and the mean
cosine between last hidden states. Teacher: the same accuracy and perplexity, from the cache.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from student_train.losses import IGNORE_INDEX, cosine_loss, kd_full
from teacher_cache.encode import decode_hidden, teacher_top1
from teacher_cache.head import HEAD_FILE, load_head
from teacher_cache.store import TEACHER_DIR, CacheReader

Forward = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]
METRICS = ("masked_accuracy", "perplexity", "teacher_top1_agreement", "kl_teacher_student", "hidden_cosine")


def load_rows(reader: CacheReader, split: str, n: int) -> dict[str, torch.Tensor]:
    """The first n rows of a split (rows are in seeded random order), decoded."""
    if split not in reader.splits:
        raise ValueError(f"split {split!r} is not in the cache (splits: {', '.join(reader.splits)})")
    n = min(n, reader.layouts[split].rows)
    top1 = ["topk_indices"] if "topk_indices" in reader.fields else ["sample_ids", "sample_counts"]
    scale = ["hidden_scale"] if "hidden_scale" in reader.fields else []
    d = reader.read_rows(split, 0, n, ["input_ids", "labels", "lengths", *top1, "hidden", *scale])
    return {
        "input_ids": torch.from_numpy(d["input_ids"].astype(np.int64)),
        "labels": torch.from_numpy(d["labels"].astype(np.int64)),
        "lengths": torch.from_numpy(d["lengths"].astype(np.int64)),
        "teacher_top1": teacher_top1(d),
        "hidden": decode_hidden(d["hidden"], d.get("hidden_scale"), reader.identity["outputs"]["hidden_dtype"]),
    }


def cache_head(reader: CacheReader, device: torch.device) -> torch.nn.Module | None:
    return load_head(reader.path / TEACHER_DIR, device) if (reader.path / TEACHER_DIR / HEAD_FILE).is_file() else None


@torch.no_grad()
def evaluate(
    forward: Forward,
    rows: dict[str, torch.Tensor],
    head: torch.nn.Module | None,
    logits_at: str,
    batch_size: int,
    device: torch.device,
) -> dict[str, dict[str, float]]:
    """{"student": metrics, "teacher": metrics} over the given rows."""
    sums = dict.fromkeys(("ce", "hit", "agree", "kl", "cos", "t_ce", "t_hit"), 0.0)
    counts = dict.fromkeys(("masked", "cached", "valid"), 0)
    cos_available = True
    for a in range(0, len(rows["input_ids"]), batch_size):
        b = {k: v[a : a + batch_size].to(device) for k, v in rows.items()}
        valid = torch.arange(b["input_ids"].shape[1], device=device)[None, :] < b["lengths"][:, None]
        logits, hidden = forward(b["input_ids"], valid.long())
        logits = logits.float()
        masked = b["labels"] != IGNORE_INDEX
        cached = valid if logits_at == "all" else masked
        target = b["labels"][masked]
        sums["ce"] += float(F.cross_entropy(logits[masked], target, reduction="sum"))
        sums["hit"] += float((logits[masked].argmax(-1) == target).sum())
        sums["agree"] += float((logits[cached].argmax(-1) == b["teacher_top1"][cached]).sum())
        sums["t_hit"] += float((b["teacher_top1"][masked] == target).sum())
        if head is not None:
            teacher_logits = head(b["hidden"][valid].float())
            sums["kl"] += float(kd_full(logits[valid], teacher_logits, 1.0).sum())
            sums["t_ce"] += float(F.cross_entropy(head(b["hidden"][masked].float()), target, reduction="sum"))
        if hidden is not None and hidden.shape[-1] == b["hidden"].shape[-1]:
            sums["cos"] += float((1.0 - cosine_loss(hidden[valid], b["hidden"][valid])).sum())
        else:
            cos_available = False
        counts["masked"] += int(masked.sum())
        counts["cached"] += int(cached.sum())
        counts["valid"] += int(valid.sum())
    nan = math.nan
    student = {
        "masked_accuracy": sums["hit"] / max(counts["masked"], 1),
        "perplexity": math.exp(sums["ce"] / max(counts["masked"], 1)),
        "teacher_top1_agreement": sums["agree"] / max(counts["cached"], 1),
        "kl_teacher_student": sums["kl"] / max(counts["valid"], 1) if head is not None else nan,
        "hidden_cosine": sums["cos"] / max(counts["valid"], 1) if cos_available else nan,
    }
    teacher = {
        "masked_accuracy": sums["t_hit"] / max(counts["masked"], 1),
        "perplexity": math.exp(sums["t_ce"] / max(counts["masked"], 1)) if head is not None else nan,
        "teacher_top1_agreement": 1.0,
        "kl_teacher_student": 0.0,
        "hidden_cosine": 1.0,
    }
    return {"student": student, "teacher": teacher, "rows": len(rows["input_ids"]), "masked_tokens": counts["masked"]}


def table(result: dict[str, dict[str, float]]) -> str:
    lines = [f"{'metric':<26}{'student':>12}{'teacher':>12}"]
    for m in METRICS:
        s, t = result["student"][m], result["teacher"][m]
        lines.append(f"{m:<26}{_fmt(s):>12}{_fmt(t):>12}")
    lines.append(f"({result['rows']} sequences, {result['masked_tokens']} masked tokens)")
    return "\n".join(lines)


def _fmt(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


def load_student(model_dir: str | Path, device: torch.device) -> Forward:
    """An exported student (save_pretrained dir, plus the cosine projection when it was trained)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForMaskedLM

    model = AutoModelForMaskedLM.from_pretrained(model_dir).to(device).eval()
    projection = None
    proj_file = Path(model_dir) / "distill_projection.safetensors"
    if proj_file.is_file():
        state = load_file(str(proj_file))
        projection = torch.nn.Linear(state["weight"].shape[1], state["weight"].shape[0]).to(device)
        projection.load_state_dict(state)

    def forward(ids: torch.Tensor, attention: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = model(input_ids=ids, attention_mask=attention, output_hidden_states=True)
        hidden = out.hidden_states[-1]
        return out.logits, projection(hidden) if projection is not None else hidden

    return forward


def run_evaluate(
    model_dir: str, cache: str, split: str, sequences: int, batch_size: int, json_path: str | None = None
) -> dict:
    reader = CacheReader(cache)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result = evaluate(
        load_student(model_dir, device),
        load_rows(reader, split, sequences),
        cache_head(reader, device),
        reader.identity["outputs"]["logit_positions"],
        batch_size,
        device,
    )
    result.update({"model": str(model_dir), "cache": str(cache), "split": split})
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2))
    return result
