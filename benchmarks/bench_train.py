"""train-student step time reading the cache vs running the teacher online, one process, one run.

    python benchmarks/bench_train.py [--shapes minilm,bert-base] [--steps 4] [--grad-accum 4] [--json OUT]

For each shape a cache is built first, then the same student trains on the same micro-batches
twice: reading the cache (KD mode topk_tail) and with `--online-teacher` (the teacher's forward
on the cached input ids every step, full-vocabulary KD). Reported per shape: median step time
of each mode after `--warmup` steps, the speedup (online / cached), and the fraction of the
cached step time spent waiting for data. An optimizer step is `--grad-accum` micro-batches of
`--micro-batch` sequences (default 4 x 8 x 128 = 4,096 tokens), as distillation accumulates to
large batches. Shapes:
- minilm: the shared teacher ../shared/teachers/minilm-l6-mlm (6 x 384) -> 3-layer student;
- bert-base: a BERT-base-shaped teacher (12 x 768, V = 30,522; random weights, timing only)
  -> 6-layer DistilBERT student.
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


def build_cache(teacher: Path, work: Path, sequences: int, seq_len: int) -> Path:
    raw = {
        "max_sequences": sequences,
        "corpus": {"paths": [str(SHARED / "data/wikitext2-valid.txt")], "max_seq_len": seq_len},
        "teacher": {"name": str(teacher), "batch_size": 16},
        "store": {"cache_dir": str(work / "home"), "output": str(work / f"cache-{teacher.name}")},
    }
    return run_cache(from_dict(CacheConfig, raw))


def time_training(cache: Path, out: Path, layers: int, steps: int, micro: int, accum: int, online: bool) -> list[dict]:
    raw = {
        "cache": str(cache),
        "output_dir": str(out),
        "max_steps": steps,
        "log_every": 1,
        "eval_sequences": 1,
        "deepspeed_config": str(ROOT / "configs/deepspeed/zero2.json"),
        "student": {"layers": layers},
        "data": {"micro_batch_size": micro, "grad_accum_steps": accum, "num_workers": 2},
    }
    run_train(from_dict(TrainConfig, raw), online_teacher=online)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="minilm,bert-base")
    p.add_argument("--steps", type=int, default=4, help="measured optimizer steps per mode")
    p.add_argument("--warmup", type=int, default=1, help="steps left out of the medians")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    setup_logging()
    logging.getLogger("student_train").setLevel(logging.WARNING)
    logging.getLogger("teacher_cache").setLevel(logging.WARNING)
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    shapes = {"minilm": (SHARED / "teachers/minilm-l6-mlm", 3), "bert-base": (None, 6)}
    total = args.steps + args.warmup
    results = {}
    for name in args.shapes.split(","):
        teacher, layers = shapes[name]
        teacher = teacher or bert_base_teacher(work)
        cache = build_cache(
            teacher, work, sequences=max(96, total * args.micro_batch * args.grad_accum + 32), seq_len=args.seq_len
        )
        modes = {}
        for mode, online in (("cached", False), ("online", True)):
            records = time_training(
                cache, work / f"{name}-{mode}", layers, total, args.micro_batch, args.grad_accum, online
            )
            measured = records[args.warmup :]
            modes[mode] = {
                "step_s": statistics.median(r["step_time_s"] for r in measured),
                "data_wait_fraction": sum(r["data_wait_s"] for r in measured) / sum(r["step_time_s"] for r in measured),
                "tok_s": sum(r["tokens"] for r in measured) / sum(r["step_time_s"] for r in measured),
            }
        results[name] = {
            **modes,
            "speedup": modes["online"]["step_s"] / modes["cached"]["step_s"],
            "student_layers": layers,
            "teacher": str(teacher),
        }
    device = "cuda" if torch.cuda.is_available() else "cpu"
    summary = {
        "device": device,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "micro_batch": args.micro_batch,
        "grad_accum": args.grad_accum,
        "seq_len": args.seq_len,
        "steps": args.steps,
        "warmup": args.warmup,
        "shapes": results,
    }
    print(f"\n{'shape':<12}{'cached s/step':>15}{'online s/step':>15}{'speedup':>10}{'data wait (cached)':>20}")
    for name, r in results.items():
        print(
            f"{name:<12}{r['cached']['step_s']:>15.3f}{r['online']['step_s']:>15.3f}{r['speedup']:>9.2f}x"
            f"{100 * r['cached']['data_wait_fraction']:>19.2f}%"
        )
    print(json.dumps(summary))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    shutil.rmtree(work, ignore_errors=True)  # caches and checkpoints: GBs at BERT-base shape


if __name__ == "__main__":
    main()
