"""Held-out metrics of a student against the cache, beside the teacher's own (`pipeline evaluate`).

Headline figures are at the masked positions, the prediction targets: masked-token accuracy
and perplexity against the original tokens, top-1 agreement with the teacher and
KL(teacher || student) at T = 1 with exact teacher logits rebuilt from the cached hidden states
through the cached head. Agreement and KL over every non-pad position are reported apart
(`*_all`): at unmasked positions both models mostly copy the input, which inflates agreement.
The hidden-state cosine is over every non-pad position (what L_cos trains). The teacher's
top-1 comes from the rebuilt logits when the head is cached, else from the cached top-k or
samples.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cache_format.encode import teacher_top1
from cache_format.hidden import decode_hidden
from cache_format.layout import valid_positions
from cache_format.reader import CacheReader
from cache_format.settings import IGNORE_INDEX
from pipeline.errors import DistilcacheError
from student_train.card import LINEAGE, lineage_problem
from student_train.config import EvaluateConfig
from student_train.losses import cosine_loss, kd_full
from student_train.metrics import MASKED_METRICS
from student_train.speed import mlm_speed

log = logging.getLogger(__name__)
Forward = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]
METRICS = tuple(MASKED_METRICS)
"""Headline metrics: accuracy, perplexity, agreement and KL at masked positions; cosine at non-pad ones."""
ALL_POSITION_METRICS = ("teacher_top1_agreement_all", "kl_teacher_student_all")
"""Agreement and KL over every non-pad position (unmasked ones included), reported apart."""


def load_rows(reader: CacheReader, split: str, n: int) -> dict[str, torch.Tensor]:
    """The first n rows of a split (rows are in seeded random order), decoded."""
    if split not in reader.splits:
        raise DistilcacheError(f"split {split!r} is not in the cache (splits: {', '.join(reader.splits)}); pick one")
    if n < 1:
        raise DistilcacheError(f"{n} sequences to evaluate; give at least 1")
    n = min(n, reader.layouts[split].rows)
    if "topk_indices" in reader.fields:
        top1 = ["topk_indices"]
    else:
        top1 = ["sample_ids", "sample_counts"] if "sample_ids" in reader.fields else []
    scale = ["hidden_scale"] if "hidden_scale" in reader.fields else []
    d = reader.read_rows(split, 0, n, ["input_ids", "labels", "lengths", *top1, "hidden", *scale])
    rows = {
        "input_ids": torch.from_numpy(d["input_ids"].astype(np.int64)),
        "labels": torch.from_numpy(d["labels"].astype(np.int64)),
        "lengths": torch.from_numpy(d["lengths"].astype(np.int64)),
        "hidden": decode_hidden(
            d["hidden"], d.get("hidden_scale"), reader.settings.outputs.hidden_dtype, reader.hidden_fit()
        ),
    }
    if top1:
        rows["teacher_top1"] = teacher_top1(d)
    return rows


@torch.no_grad()
def evaluate(
    forward: Forward,
    rows: dict[str, torch.Tensor],
    head: torch.nn.Module | None,
    logits_at: str,
    batch_size: int,
    device: torch.device,
    per_token: bool = False,
) -> dict[str, dict[str, float]]:
    """{"student": metrics, "teacher": metrics} over the given rows; with `per_token`, also the
    student's per-token values (hit, nll, agree, kl at masked positions; cos at non-pad ones) under
    "per_token", for paired bootstraps between students evaluated on the same rows."""
    if head is None and "teacher_top1" not in rows:
        raise ValueError("the cache holds neither the teacher's head nor cached logits: nothing to compare with")
    tokens: dict[str, list[torch.Tensor]] = {k: [] for k in ("hit", "nll", "agree", "kl", "cos")}
    sums = dict.fromkeys(("nll", "hit", "agree", "agree_all", "kl", "kl_all", "cos", "t_nll", "t_hit"), 0.0)
    counts = dict.fromkeys(("masked", "top1_all", "valid"), 0)
    cos_available = True
    for a in range(0, len(rows["input_ids"]), batch_size):
        b = {k: v[a : a + batch_size].to(device) for k, v in rows.items()}
        valid = valid_positions(b["lengths"], b["input_ids"].shape[1])
        logits, hidden = forward(b["input_ids"], valid.long())
        logits = logits.float()
        masked = b["labels"] != IGNORE_INDEX
        target = b["labels"][masked]
        if head is not None:  # exact teacher logits at every non-pad position
            teacher_logits = head(b["hidden"][valid].float())
            at_masked = masked[valid]
            kl = kd_full(logits[valid], teacher_logits, 1.0)
            sums["kl_all"] += float(kl.sum())
            sums["kl"] += float(kl[at_masked].sum())
            tokens["kl"].append(kl[at_masked])
            sums["t_nll"] += float(F.cross_entropy(teacher_logits[at_masked], target, reduction="sum"))
            top1 = torch.full_like(b["input_ids"], -1)
            top1[valid] = teacher_logits.argmax(-1)
            known = valid
        else:  # the cached top-1, where logits are cached
            top1 = b["teacher_top1"]
            known = valid if logits_at == "all" else masked
        student_top1 = logits.argmax(-1)
        nll = F.cross_entropy(logits[masked], target, reduction="none")
        hit, agree = (student_top1[masked] == target).float(), (student_top1[masked] == top1[masked]).float()
        tokens["nll"].append(nll), tokens["hit"].append(hit), tokens["agree"].append(agree)
        sums["nll"] += float(nll.sum())
        sums["hit"] += float(hit.sum())
        sums["agree"] += float(agree.sum())
        sums["agree_all"] += float((student_top1[known] == top1[known]).sum())
        sums["t_hit"] += float((top1[masked] == target).sum())
        if hidden is not None and hidden.shape[-1] == b["hidden"].shape[-1]:
            cos = 1.0 - cosine_loss(hidden[valid], b["hidden"][valid])
            tokens["cos"].append(cos)
            sums["cos"] += float(cos.sum())
        else:
            cos_available = False
        counts["masked"] += int(masked.sum())
        counts["top1_all"] += int(known.sum())
        counts["valid"] += int(valid.sum())
    nan = math.nan
    n_masked, n_valid = max(counts["masked"], 1), max(counts["valid"], 1)
    student = {
        "masked_accuracy": sums["hit"] / n_masked,
        "perplexity": math.exp(sums["nll"] / n_masked),
        "teacher_top1_agreement": sums["agree"] / n_masked,
        "kl_teacher_student": sums["kl"] / n_masked if head is not None else nan,
        "hidden_cosine": sums["cos"] / n_valid if cos_available else nan,
        "teacher_top1_agreement_all": sums["agree_all"] / max(counts["top1_all"], 1),
        "kl_teacher_student_all": sums["kl_all"] / n_valid if head is not None else nan,
    }
    teacher = {
        "masked_accuracy": sums["t_hit"] / n_masked,
        "perplexity": math.exp(sums["t_nll"] / n_masked) if head is not None else nan,
        "teacher_top1_agreement": 1.0,
        "kl_teacher_student": 0.0,
        "hidden_cosine": 1.0,
        "teacher_top1_agreement_all": 1.0,
        "kl_teacher_student_all": 0.0,
    }
    result = {"student": student, "teacher": teacher, "rows": len(rows["input_ids"]), "masked_tokens": counts["masked"]}
    if per_token:
        result["per_token"] = {k: torch.cat(v).float().cpu().numpy() for k, v in tokens.items() if v}
    return result


def table(result: dict[str, dict[str, float]]) -> str:
    if "student" not in result:  # speed only
        return ""
    lines = [f"{'metric (masked positions)':<30}{'student':>12}{'teacher':>12}"]
    for m in METRICS:
        if m == "hidden_cosine":
            lines.append(f"{'metric (all non-pad positions)':<30}")
        lines.append(f"{m:<30}{_fmt(result['student'][m]):>12}{_fmt(result['teacher'][m]):>12}")
    for m in ALL_POSITION_METRICS:
        lines.append(f"{m:<30}{_fmt(result['student'][m]):>12}{_fmt(result['teacher'][m]):>12}")
    lines.append(f"({result['rows']} sequences, {result['masked_tokens']} masked tokens)")
    return "\n".join(lines)


def _fmt(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


def _lineage(model_dir: Path) -> dict:
    path = model_dir / LINEAGE
    return json.loads(path.read_text()) if path.is_file() else {}


def load_student(model_dir: str | Path, device: torch.device, reader: CacheReader | None = None) -> Forward:
    """An exported student (save_pretrained dir, plus the cosine projection when it was trained);
    with `reader`, refused unless its vocabulary and tokenizer are the cache's."""
    from safetensors.torch import load_file
    from transformers import AutoModelForMaskedLM

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise DistilcacheError(f"--model {model_dir}: no model there (no config.json); give an exported model dir")
    model = AutoModelForMaskedLM.from_pretrained(model_dir).to(device).eval()
    if reader is not None:
        problem = lineage_problem(model_dir, reader.settings)
        if problem:
            raise DistilcacheError(
                f"--model {model_dir}: {problem}; evaluate a model distilled from this cache's teacher"
            )
        recorded = _lineage(model_dir).get("cache_fingerprint")
        if recorded and recorded != reader.settings.fingerprint:
            log.warning(
                "warning: --model %s was distilled from the cache with fingerprint %s, not this one (%s): its "
                "held-out rows and masks are another cache's, so these figures do not compare with its training "
                "run's evaluation",
                model_dir,
                recorded[:12],
                reader.settings.fingerprint[:12],
            )
    projection = None
    proj_file = model_dir / "distill_projection.safetensors"
    if proj_file.is_file():
        state = load_file(str(proj_file))
        projection = torch.nn.Linear(state["weight"].shape[1], state["weight"].shape[0]).to(device)
        projection.load_state_dict(state)

    def forward(ids: torch.Tensor, attention: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = model(input_ids=ids, attention_mask=attention, output_hidden_states=True)
        hidden = out.hidden_states[-1]
        return out.logits, projection(hidden) if projection is not None else hidden

    return forward


def run_evaluate(cfg: EvaluateConfig) -> dict:
    """Held-out metrics of the model (unless `speed_only`), and size and speed of it and the teacher
    (`teacher`, else the cache's when it is at hand) on identical batches of the split's sequences.
    The cache is opened once."""
    if cfg.batch_size < 1:
        raise DistilcacheError(f"--batch-size {cfg.batch_size}; give at least 1")
    reader = CacheReader(cfg.cache, lease=True, storage_options=cfg.storage_options or None)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result: dict = {}
    try:
        against = None
        if cfg.speed or cfg.speed_only:
            against = cfg.teacher or reader.settings.teacher.name
            if cfg.teacher is None and not Path(against).expanduser().is_dir():
                log.warning("(speed: the cache's teacher %r is not at hand; pass --teacher to compare)", against)
                against = None
        rows = load_rows(reader, cfg.split, cfg.sequences)
        forward = load_student(cfg.model, device, reader)
        if not cfg.speed_only:
            head = reader.head(device)
            result = evaluate(forward, rows, head, reader.settings.outputs.logit_positions, cfg.batch_size, device)
        if against:
            result["speed"] = mlm_speed(
                {"teacher": against, "student": str(cfg.model)}, rows["input_ids"], rows["lengths"], [1, 64]
            )
    finally:
        reader.close()
    result.update({"model": str(cfg.model), "cache": str(cfg.cache), "split": cfg.split})
    if cfg.output_json:
        Path(cfg.output_json).write_text(json.dumps(result, indent=2))
    return result
