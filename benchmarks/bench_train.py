"""train-student step time per KD mode reading the cache vs running the teacher online, one run.

    python benchmarks/bench_train.py [--shapes minilm,bert-base] [--modes exact,topk_tail,sampled,online,hf-distiller]
                                     [--kd-tokens random-25,entropy-25,entropy-25-stored,masked]
                                     [--codecs int8,nf4,pq,pca]
                                     [--steps 4] [--grad-accum 4] [--json OUT]

For each shape one cache is built (top-64 + log-sum-exp, 64 samples at T = 2 and int8 hidden
states, so every KD mode reads the same cache), then the same student trains on the same
micro-batches once per mode: reading the cache with each KD mode, and with `--online-teacher`
(the teacher's forward on the cached input ids every step, full-vocabulary KD). Reported per
shape: median step time of each mode after `--warmup` steps, tokens/s, the speedup of each
cached mode over online, `exact`'s throughput relative to `topk_tail`, and the fraction of the
step spent waiting for data. An optimizer step is `--grad-accum` micro-batches of
`--micro-batch` sequences (default 4 x 8 x 128 = 4,096 tokens), as distillation accumulates to
large batches. Shapes:
- minilm: the shared teacher ../shared/teachers/minilm-l6-mlm (6 x 384) -> 3-layer student;
- bert-base: a BERT-base-shaped teacher (12 x 768, V = 30,522; random weights, timing only)
  -> 6-layer DistilBERT student.
`hf-distiller` times the training step of Hugging Face's DistilBERT distiller (hf_distiller.py:
the teacher and student every step, unfused full-vocabulary KL) on the same micro-batches and
student. `--kd-tokens` adds exact-mode runs that distil fewer tokens (`loss.kd_tokens` at a
fraction, e.g. `random-25`; `masked`: `loss.kd_positions: masked`), the student's head only on
those and the masked tokens; `entropy-25-stored` reads the teacher's entropy from a selection that
stores it a token (`pipeline select --score entropy --fraction 1 --set token_scores=true`, timed
once) instead of rebuilding the logits each step. Every row also reports its tokens/s over
`exact`'s and over `hf-distiller`'s.
`--codecs` adds, per codec, a cache of only the hidden states in that codec (`logits: none`, the
same rows) and times exact-mode training from it (`exact@<codec>`); with int8 among them, each
codec's tokens/s over int8's (`--modes ""` times only these).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from pipeline.config import from_dict
from pipeline.log import setup_logging
from student_train.config import TrainConfig
from student_train.trainer import run_train
from teacher_cache.config import CacheConfig
from teacher_cache.run import run_cache

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def bert_base_teacher(work: Path) -> Path:
    """A BERT-base-shaped masked LM with the shared teacher's tokenizer (random weights)."""
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    path = work / "bert-base-random"
    if not path.is_dir():
        torch.manual_seed(0)
        BertForMaskedLM(BertConfig()).save_pretrained(path)  # the defaults are BERT-base
        AutoTokenizer.from_pretrained(SHARED / "teachers/minilm-l6-mlm").save_pretrained(path)
    return path


def build_cache(teacher: Path, work: Path, sequences: int, seq_len: int, hidden: str | None = None) -> Path:
    """Every KD mode's fields over int8 hidden states; or (`hidden`) only the hidden states, in that codec."""
    outputs = {"logits": "both", "n_samples": 64, "sample_temperature": 2.0, "hidden_dtype": "int8"}
    if hidden is not None:
        outputs = {"logits": "none", "hidden_dtype": hidden}
    raw = {
        "max_sequences": sequences,
        "corpus": {"paths": [str(SHARED / "data/wikitext2-valid.txt")], "max_seq_len": seq_len},
        "teacher": {"name": str(teacher), "batch_size": 16},
        "outputs": outputs,
        "store": {"cache_dir": str(work / "home"), "output": str(work / f"cache-{teacher.name}-{hidden or 'all'}")},
    }
    return run_cache(from_dict(CacheConfig, raw))


def time_training(
    cache: Path, out: Path, layers: int, steps: int, micro: int, accum: int, mode: str, keys: dict | None = None
) -> list[dict]:
    """Step records of a train-student run; `keys`: its `loss` and `data` keys beside the defaults."""
    keys = keys or {}
    online = mode == "online"
    raw = {
        "cache": str(cache),
        "output_dir": str(out),
        "max_steps": steps,
        "log_every": 1,
        "eval_sequences": 1,
        "deepspeed_config": str(ROOT / "configs/deepspeed/zero2.json"),
        "student": {"layers": layers},
        "data": {"micro_batch_size": micro, "grad_accum_steps": accum, "num_workers": 2, **keys.get("data", {})},
        "loss": {"kd_mode": "exact" if online else mode, **keys.get("loss", {})},
    }
    run_train(from_dict(TrainConfig, raw), online_teacher=online)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


def kd_tokens_keys(spec: str) -> dict:
    """`random-25` -> loss.kd_tokens random at 25 %; `masked` -> KD on the masked tokens only;
    `entropy-25-stored` -> entropy at 25 %, read from the selection `entropy-100` (`stored_entropy`)."""
    if spec == "masked":
        return {"loss": {"kd_positions": "masked"}}
    stored = spec.endswith("-stored")
    kind, percent = spec.removesuffix("-stored").rsplit("-", 1)
    return {"loss": {"kd_tokens": kind, "kd_fraction": int(percent) / 100}} | (
        {"data": {"selection": "entropy-100"}} if stored else {}
    )


def stored_entropy(cache: Path) -> float:
    """Seconds `pipeline select` takes to store the teacher's entropy at every token of the cache
    (once per cache: every run reads it)."""
    from student_train.selection.config import SelectConfig
    from student_train.selection.run import run_select

    start = time.perf_counter()
    keys = {"cache": str(cache), "score": "entropy", "fraction": 1.0, "token_scores": True}
    run_select(from_dict(SelectConfig, keys))
    return time.perf_counter() - start


def time_hf_distiller(teacher_dir: Path, cache: Path, layers: int, total: int, micro: int, accum: int) -> list[dict]:
    """Step records of the HF distiller's loop (hf_distiller.py) on the cache's first micro-batches,
    with distilcache's student (the same config and initialisation)."""
    from hf_distiller import cached_batches, time_steps
    from transformers import AutoModelForMaskedLM

    from student_train.config import StudentConfig
    from student_train.model import init_from_teacher, student_config

    torch.manual_seed(0)
    teacher = AutoModelForMaskedLM.from_pretrained(teacher_dir)
    student = AutoModelForMaskedLM.from_config(student_config(StudentConfig(layers=layers), teacher.config))
    init_from_teacher(student, teacher.state_dict(), teacher.config)
    batches = cached_batches(cache, micro, total * accum)
    seconds = time_steps(teacher, student, batches, accum)
    tokens = [sum(int(m.sum()) for _, m, _ in batches[i * accum : (i + 1) * accum]) for i in range(total)]
    return [{"step_time_s": t, "data_wait_s": 0.0, "tokens": n} for t, n in zip(seconds, tokens, strict=True)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="minilm,bert-base")
    p.add_argument(
        "--modes", default="exact,topk_tail,sampled,online", help="KD modes, online, and hf-distiller (HF's step)"
    )
    p.add_argument(
        "--kd-tokens",
        default="",
        help="exact-mode variants that distil fewer tokens, e.g. random-25,entropy-25,entropy-25-stored,masked",
    )
    p.add_argument("--steps", type=int, default=4, help="measured optimizer steps per mode")
    p.add_argument("--warmup", type=int, default=1, help="steps left out of the medians")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument(
        "--codecs", default="", help="hidden codecs (e.g. int8,nf4,pq,pca) whose exact-mode training is timed"
    )
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    setup_logging()
    logging.getLogger("student_train").setLevel(logging.WARNING)
    logging.getLogger("teacher_cache").setLevel(logging.WARNING)
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    shapes = {"minilm": (SHARED / "teachers/minilm-l6-mlm", 3), "bert-base": (None, 6)}
    modes = args.modes.split(",")
    codecs = [c for c in args.codecs.split(",") if c]
    total = args.steps + args.warmup
    results = {}
    for name in args.shapes.split(","):
        teacher, layers = shapes[name]
        teacher = teacher or bert_base_teacher(work)
        sequences = max(96, total * args.micro_batch * args.grad_accum + 32)
        cache = build_cache(teacher, work, sequences, args.seq_len) if modes != [""] else None
        runs = [(mode, cache, mode, None) for mode in modes if mode]
        kd_tokens = [k for k in args.kd_tokens.split(",") if k]
        runs += [(f"exact+{k}", cache, "exact", kd_tokens_keys(k)) for k in kd_tokens]
        select_s = stored_entropy(cache) if any(k.endswith("-stored") for k in kd_tokens) else None
        runs += [(f"exact@{c}", build_cache(teacher, work, sequences, args.seq_len, c), "exact", None) for c in codecs]
        timed = {}
        for label, run_cache_dir, mode, loss in runs:
            if mode == "hf-distiller":
                records = time_hf_distiller(teacher, cache, layers, total, args.micro_batch, args.grad_accum)
            else:
                records = time_training(
                    run_cache_dir, work / f"{name}-{label}", layers, total, args.micro_batch, args.grad_accum, mode,
                    loss,
                )  # fmt: skip
            measured = records[args.warmup :]
            step_time = sum(r["step_time_s"] for r in measured)
            timed[label] = {
                "step_s": statistics.median(r["step_time_s"] for r in measured),
                "data_wait_fraction": sum(r["data_wait_s"] for r in measured) / step_time,
                "tok_s": sum(r["tokens"] for r in measured) / step_time,
            }
        online = timed.get("online")
        for r in timed.values():
            r["speedup_over_online"] = online["step_s"] / r["step_s"] if online else None
        ratio = timed["exact"]["tok_s"] / timed["topk_tail"]["tok_s"] if {"exact", "topk_tail"} <= set(timed) else None
        for r in timed.values():
            r["vs_exact"] = r["tok_s"] / timed["exact"]["tok_s"] if "exact" in timed else None
            r["vs_hf_distiller"] = r["tok_s"] / timed["hf-distiller"]["tok_s"] if "hf-distiller" in timed else None
        reference = timed.get("exact@int8")
        by_codec = {
            c: timed[f"exact@{c}"]["tok_s"] / reference["tok_s"] for c in codecs if reference and f"exact@{c}" in timed
        }
        results[name] = {
            "modes": timed,
            "exact_over_topk_tail": ratio,
            "exact_tok_s_over_int8": by_codec,
            "select_entropy_s": select_s,
            "student_layers": layers,
            "teacher": str(teacher),
        }
    summary = {
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "micro_batch": args.micro_batch,
        "grad_accum": args.grad_accum,
        "seq_len": args.seq_len,
        "steps": args.steps,
        "warmup": args.warmup,
        "shapes": results,
    }
    head = f"{'shape':<11}{'mode':<20}{'s/step':>9}{'tok/s':>9}{'vs online':>11}{'vs exact':>10}{'vs HF':>8}"
    print(f"\n{head}{'data wait':>11}")
    for name, r in results.items():
        for mode, t in r["modes"].items():
            ratios = [t[k] for k in ("speedup_over_online", "vs_exact", "vs_hf_distiller")]
            cells = [f"{x:.2f}x" if x else "-" for x in ratios]
            print(
                f"{name:<11}{mode:<20}{t['step_s']:>9.3f}{t['tok_s']:>9.0f}{cells[0]:>11}{cells[1]:>10}{cells[2]:>8}"
                f"{100 * t['data_wait_fraction']:>10.2f}%"
            )
        if r["exact_over_topk_tail"]:
            print(f"{name:<11}exact / topk_tail throughput: {r['exact_over_topk_tail']:.3f}")
        if r["select_entropy_s"] is not None:
            print(f"{name:<11}pipeline select storing the entropy of every token: {r['select_entropy_s']:.1f} s, once")
        for codec, ratio in r["exact_tok_s_over_int8"].items():
            print(f"{name:<11}exact from {codec} / from int8 throughput: {ratio:.3f}")
    print(json.dumps(summary))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    shutil.rmtree(work, ignore_errors=True)  # caches and checkpoints: GBs at BERT-base shape


if __name__ == "__main__":
    main()
