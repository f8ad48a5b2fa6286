"""The finished student as a Hugging Face model directory (what `AutoModelForMaskedLM` loads)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from cache_format.reader import CacheReader
from pipeline.config import to_dict
from student_train.card import LINEAGE, write_card
from student_train.checkpoint import tag_of
from student_train.config import TrainConfig


def export_student(
    run_dir: Path,
    step: int,
    student_config,
    tokenizer,
    reader: CacheReader,
    cfg: TrainConfig,
    tokens: int = 0,
    evaluation: dict | None = None,
    followed: dict | None = None,
    selection: dict | None = None,
) -> Path:
    """Consolidate the fp32 weights of checkpoint `step` (ZeRO-3 shards included) into `run_dir/final`:
    save_pretrained model + tokenizer (+ the cosine projection), its lineage (distill.json) and its
    model card (README.md). `followed`: how the run followed a cache still being captured;
    `selection`: the sequence selection it read."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import save_file
    from transformers import AutoModelForMaskedLM

    out = run_dir / "final"
    state = get_fp32_state_dict_from_zero_checkpoint(str(run_dir / "checkpoints"), tag=tag_of(step))
    student = AutoModelForMaskedLM.from_config(student_config)
    student.load_state_dict(
        {k[len("student.") :]: v for k, v in state.items() if k.startswith("student.")}, strict=False
    )
    student.tie_weights()
    shutil.rmtree(out, ignore_errors=True)
    student.save_pretrained(out)
    tokenizer.save_pretrained(out)
    projection = {k[len("projection.") :]: v.contiguous() for k, v in state.items() if k.startswith("projection.")}
    if projection:
        save_file(projection, str(out / "distill_projection.safetensors"))
    settings = reader.settings
    corpus = (reader.manifest or reader.header).get("config", {}).get("corpus", {})
    lineage = {
        "cache": reader.url,
        "cache_fingerprint": settings.fingerprint,
        "teacher": {"name": settings.teacher.name, "weights_sha256": settings.teacher.weights_sha256},
        "tokenizer_sha256": settings.tokenizer.sha256,
        "vocab_size": settings.teacher.vocab_size,
        "datasets": [corpus["name"]] if corpus.get("name") else [Path(p).name for p in corpus.get("paths", [])],
        "student": f"{student_config.model_type}, {getattr(student_config, 'n_layers', '?')} layers",
        "step": step,
        "tokens": tokens,
        "evaluation": evaluation,
        "followed": followed,
        "selection": selection,
        "config": to_dict(cfg),
    }
    (out / LINEAGE).write_text(json.dumps(lineage, indent=2))
    write_card(out, lineage, evaluation)
    return out
