"""A student's lineage and its Hugging Face model card.

`distill.json` (machine-readable) and `README.md` (the card, with YAML metadata that the Hub and
`huggingface_hub.ModelCard` read) are written by `train-student`'s export: the teacher and its
weight hash, the cache and its fingerprint, the tokenizer, the loss, steps and tokens trained,
the held-out MLM metrics. `pipeline finetune` adds a downstream section to the card. Models whose
recorded tokenizer or vocabulary differ from a cache's are refused where a cache is given.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from cache_format.hashing import tokenizer_sha256
from cache_format.settings import CacheSettings
from student_train.metrics import MASKED_METRICS

LINEAGE = "distill.json"
CARD = "README.md"


def lineage_problem(model_dir: str | Path, settings: CacheSettings) -> str | None:
    """Why a model cannot be compared against a cache (its vocabulary or tokenizer differ), or None."""
    model_dir = Path(model_dir)
    lineage = json.loads((model_dir / LINEAGE).read_text()) if (model_dir / LINEAGE).is_file() else {}
    vocab = lineage.get("vocab_size")
    if vocab is None and (model_dir / "config.json").is_file():
        vocab = json.loads((model_dir / "config.json").read_text()).get("vocab_size")
    if vocab is not None and int(vocab) != settings.teacher.vocab_size:
        return f"its vocabulary ({vocab}) is not the cache's ({settings.teacher.vocab_size})"
    digest = lineage.get("tokenizer_sha256")
    if digest is None and (model_dir / "tokenizer.json").is_file():
        from transformers import AutoTokenizer

        digest = tokenizer_sha256(AutoTokenizer.from_pretrained(model_dir))
    if digest is not None and digest != settings.tokenizer.sha256:
        return f"its tokenizer hashes to {digest[:12]}, the cache's to {settings.tokenizer.sha256[:12]}"
    return None


def write_card(directory: Path, lineage: dict, evaluation: dict | None) -> Path:
    """The model card of an exported student (README.md with YAML metadata)."""
    loss, teacher = lineage["config"]["loss"], lineage["teacher"]
    meta = {
        "base_model": teacher["name"],
        "library_name": "transformers",
        "pipeline_tag": "fill-mask",
        "tags": ["distillation", "distilcache", "knowledge-distillation", "masked-lm"],
        "datasets": lineage.get("datasets") or [],
        "metrics": ["accuracy", "perplexity"],
        "distilcache": {
            "cache_fingerprint": lineage["cache_fingerprint"],
            "teacher_weights_sha256": teacher["weights_sha256"],
        },
    }
    lines = [
        "---",
        yaml.safe_dump(meta, sort_keys=False).rstrip(),
        "---",
        "",
        f"# {directory.parent.name}: a student distilled from {teacher['name']}",
        "",
        f"Distilled with distilcache from a cached teacher: `{teacher['name']}` "
        f"(weights sha256 `{teacher['weights_sha256'][:16]}…`), cache `{lineage['cache']}` "
        f"(fingerprint `{lineage['cache_fingerprint']}`). The teacher never ran while the student trained.",
        "",
        "## Training",
        "",
        f"- {lineage['step']} optimizer steps, {lineage.get('tokens', 0):,} tokens.",
        f"- Loss: {loss['alpha_ce']} × KD ({loss['kd_mode']}, T = {loss['temperature']}) + {loss['alpha_mlm']} × MLM "
        f"+ {loss['alpha_cos']} × cosine; student {lineage['student']}.",
        f"- Tokenizer: the teacher's (sha256 `{lineage['tokenizer_sha256'][:16]}…`), "
        f"vocabulary {lineage['vocab_size']:,}.",
        "- Machine-readable lineage: `distill.json`.",
    ]
    followed = lineage.get("followed")
    if followed:
        lines.insert(-1, (
            f"- Trained while the cache was captured (`--follow`): {followed['committed_at_start']}/"
            f"{followed['shards']} shards committed at the start, {followed['committed_at_end']} at the end; it read "
            f"{len(followed['shards_read'])} of them."
        ))  # fmt: skip
    if loss.get("kd_tokens", "all") != "all":
        lines.insert(-1, (
            f"- KD on {100 * loss['kd_fraction']:g} % of each sequence's KD positions, kept by "
            f"`{loss['kd_tokens']}` (`loss.kd_tokens`)."
        ))  # fmt: skip
    selection = lineage.get("selection")
    if selection:
        lines.insert(-1, (
            f"- Trained on the selection `{selection['name']}`: {selection['kept_sequences']:,} of "
            f"{selection['sequences']:,} cached sequences, the {selection['keep']} by `{selection['score']}` "
            f"(data sha256 `{selection['sha256'][:16]}…`)."
        ))  # fmt: skip
    if evaluation:
        s, t = evaluation["student"], evaluation["teacher"]
        lines += [
            "",
            "## Held-out masked-LM metrics",
            "",
            f"{evaluation['rows']} held-out sequences of the cache, {evaluation['masked_tokens']} masked tokens "
            "(agreement and KL at masked positions):",
            "",
            "| metric | student | teacher |",
            "|---|---:|---:|",
            *[f"| {m} | {s[m]:.4f} | {t[m]:.4f} |" for m in MASKED_METRICS if m in s],
        ]
    path = directory / CARD
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def add_downstream(model_dir: Path, key: str, section: str) -> bool:
    """Put (or replace) a downstream section in a distilcache card; False if there is none."""
    path = Path(model_dir) / CARD
    if not path.is_file() or "distilcache" not in path.read_text(encoding="utf-8").split("---")[1]:
        return False
    text = path.read_text(encoding="utf-8")
    block = f"<!-- downstream:{key} -->\n{section.rstrip()}\n<!-- /downstream:{key} -->"
    pattern = re.compile(rf"<!-- downstream:{re.escape(key)} -->.*?<!-- /downstream:{re.escape(key)} -->", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text, encoding="utf-8")
    return True
