"""Does this cache fit this run? Every mismatch is refused with both values named."""

from __future__ import annotations

from student_train.config import TrainConfig
from student_train.model import hidden_size
from teacher_cache.store import FORMAT_VERSION, CacheReader


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
        positions = m["identity"]["outputs"]["logit_positions"]
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
