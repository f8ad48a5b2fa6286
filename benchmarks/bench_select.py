"""Distil less, learn the same? Token and sequence selection against the all-token default, over seeds.

    python benchmarks/bench_select.py [--rows all,kd-random-25,...] [--seeds 56,57] [--steps 60]
        [--finetune configs/tasks/movie-snippets.yaml --finetune-rows all,kd-random-25] [--work DIR] [--json OUT]

bench_fidelity's setting (the shared teacher cached over WikiText-2 with the defaults: int8 hidden
states + the cached head, exact KD; a 3-layer student from teacher layers 0, 3, 5; 60 steps x 16 x
128 tokens; held-out metrics from train-student's own evaluation), one row per way of doing less:

- all: the all-token default;
- kd-SCORE-P: KD on P % of each row's tokens, kept by SCORE (`loss.kd_tokens`: entropy, confidence,
  tip, or random, the control), the student's head only on those and the masked tokens;
- kd-entropy-P-stored: the same entropy read from a selection of every sequence that stores it
  (`pipeline select --score entropy --fraction 1 --set token_scores=true`), no scoring pass;
- kd-masked: KD on the masked tokens only (`loss.kd_positions: masked`, ~15 %);
- seq-SCORE-50: half of the cached sequences, selected by `pipeline select --score SCORE` (teacher_loss,
  entropy, miniplm with the teacher's first 2 layers as the reference, or random, the control);
- ROW@compute: ROW trained for more steps, steps x (the default's multiply-adds a step / ROW's):
  equal student compute instead of equal steps.

Each row: its multiply-adds per token relative to the default (the student's own work, and the
whole step's with the teacher head's rebuild and any scoring pass; the arithmetic is `step_macs`),
the held-out metrics as mean ± SE over `--seeds` (at masked positions, and the KL over every
non-pad token), the difference from `all` with the SE of the
difference, whether |Δ| <= 2 SE, and the training tok/s of the first seed's run (from one run
of the command: compare them only within it). `--finetune` fine-tunes the first seed's students
of `--finetune-rows` on a task (`--finetune-seeds` fine-tuning seeds) and adds its accuracy.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from bench_fidelity import SEED, TEACHER, build_cache, cache_config, mean_se, pipeline, train

MASK_PROB = 0.15
"""The masked share of tokens (`masking.mask_prob`): MLM needs the head there whatever KD keeps."""
METRICS = ("perplexity", "kl_teacher_student", "teacher_top1_agreement", "kl_teacher_student_all", "hidden_cosine")
LABELS = {"perplexity": "perplexity", "kl_teacher_student": "KL(t‖s)", "teacher_top1_agreement": "top-1 agree",
          "kl_teacher_student_all": "KL all tokens", "hidden_cosine": "hidden cos"}  # fmt: skip


@dataclass(frozen=True)
class Row:
    """A training variant: its train overrides, a selection to make first, its compute shares."""

    overrides: dict = field(default_factory=dict)
    select: dict | None = None
    kd_share: float = 1.0  # tokens KD distils (the teacher head rebuilds them)
    head_share: float = 1.0  # tokens the student's head runs on (KD's and the masked ones)
    scoring: tuple[str, ...] = ()  # gradient-free passes over every token to score them


STORED_ENTROPY = {"score": "entropy", "fraction": 1.0, "token_scores": True}
"""`pipeline select` keys of a selection of every sequence that stores the teacher's entropy a token."""


def _rows() -> dict[str, Row]:
    rows = {"all": Row()}
    for kind in ("entropy", "confidence", "tip", "random"):
        scoring = {"random": (), "tip": ("teacher", "student")}.get(kind, ("teacher",))
        for p in (50, 25, 10):
            f = p / 100
            keys = {"loss.kd_tokens": kind, "loss.kd_fraction": f}
            rows[f"kd-{kind}-{p}"] = Row(keys, None, f, f + (1 - f) * MASK_PROB, scoring)
    for p in (50, 25, 10):  # the same entropy, read from the selection instead of rebuilt each step
        keys = {**rows[f"kd-entropy-{p}"].overrides, "data.selection": "entropy-100"}
        rows[f"kd-entropy-{p}-stored"] = Row(keys, STORED_ENTROPY, p / 100, rows[f"kd-entropy-{p}"].head_share)
    rows["kd-masked"] = Row({"loss.kd_positions": "masked"}, None, MASK_PROB, MASK_PROB)
    for score in ("teacher_loss", "entropy", "miniplm", "random"):
        keys = {"score": score, "fraction": 0.5, **({"reference": "teacher:2"} if score == "miniplm" else {})}
        rows[f"seq-{score}-50"] = Row({"data.selection": f"{score}-50"}, keys)
    return rows


ROWS = _rows()


def step_macs(row: Row, teacher, layers: int, seq_len: int) -> dict[str, float]:
    """Multiply-adds per token of one training step: the student's body forward + backward (3x the
    forward), its head (transform + vocabulary projection) forward + backward on the head's share,
    the teacher head's rebuild on the KD share, and each scoring pass (a head forward on every token)."""
    h, i, v = teacher.hidden_size, teacher.intermediate_size, teacher.vocab_size
    layer = 4 * h * h + 2 * h * i + 2 * seq_len * h  # q, k, v, out; the FFN; attention scores and values
    head = h * h + v * h
    student = 3 * layers * layer + 3 * head * row.head_share + head * ("student" in row.scoring)
    teacher_head = head * (row.kd_share + ("teacher" in row.scoring))
    return {"student": student, "step": student + teacher_head}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default=",".join(ROWS), help="row names; ROW@compute for equal student compute")
    p.add_argument("--seeds", default="56,57")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--sequences", type=int, default=1200)
    p.add_argument("--eval-sequences", type=int, default=256)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--cache-set", action="append", default=[])
    p.add_argument("--finetune", type=Path, default=None, help="a YAML with a `finetune` section")
    p.add_argument("--finetune-rows", default="all", help="rows whose first-seed students are fine-tuned")
    p.add_argument("--finetune-seeds", default=None, help="fine-tuning seeds (recipe.seeds), e.g. 1,2")
    p.add_argument("--work", type=Path, default=None)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
    from transformers import AutoConfig

    teacher = AutoConfig.from_pretrained(TEACHER)
    seeds = [int(s) for s in args.seeds.split(",")]
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-select-"))
    work.mkdir(parents=True, exist_ok=True)
    cache = build_cache(cache_config(args, work, {}), work, {})  # the defaults: int8 hidden + head, no logits
    base = step_macs(ROWS["all"], teacher, 3, args.seq_len)
    results = {}
    for name in args.rows.split(","):
        row, compute = ROWS[name.removesuffix("@compute")], name.endswith("@compute")
        macs = step_macs(row, teacher, 3, args.seq_len)
        steps = round(args.steps * base["student"] / macs["student"]) if compute else args.steps
        if row.select:
            argv = ["select", "--cache", str(cache), *[f"--set={k}={v}" for k, v in row.select.items()]]
            pipeline(*argv, log=work / f"select-{name}.log")
        # passes over the rows the run reads, 10 % spare: an epoch can leave a group per stream unread
        kept = args.sequences * (row.select["fraction"] if row.select else 1.0)
        passes = math.ceil(steps * args.micro_batch / (0.9 * kept))
        runs = {}
        for seed in seeds:
            print(f"[{time.strftime('%H:%M:%S')}] {name} seed {seed}: {steps} steps", flush=True)
            # a selection or more steps can outrun one epoch: passes enough that max_steps stops the run
            more = {"epochs": max(4, passes)} if passes > 1 else {}
            overrides = {**more, **row.overrides, "max_steps": steps}
            runs[seed] = train(args, work, name.replace("@", "-at-"), cache, overrides, False, seed)
        trained = json.loads((Path(runs[seeds[0]]["run_dir"]) / "summary.json").read_text())["steps"]
        results[name] = {
            "steps": trained,
            "macs": {k: macs[k] / base[k] for k in macs},
            "tok_s": runs[seeds[0]]["tok_s"],
            "wall_s": runs[seeds[0]]["wall_s"],
            "seeds": {s: r["eval"]["student"] for s, r in runs.items()},
            "run_dir": runs[seeds[0]]["run_dir"],
        }
    downstream = finetune(args, work, results) if args.finetune else {}
    report(results, downstream, seeds)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        summary = {"args": {k: str(v) for k, v in vars(args).items()}, "rows": results, "downstream": downstream}
        args.json.write_text(json.dumps(summary, indent=2, default=str))


def finetune(args: argparse.Namespace, work: Path, results: dict) -> dict:
    """Validation accuracy of the first seed's students of `--finetune-rows` on the task (one call)."""
    rows = [r for r in args.finetune_rows.split(",") if r in results]
    out = work / "finetune"
    argv = [sys.executable, "-m", "pipeline", "finetune", "--config", str(args.finetune), f"--set=output_dir={out}"]
    if args.finetune_seeds:
        argv.append(f"--set=recipe.seeds=[{args.finetune_seeds}]")
    argv += [f"--model={r.replace('@', '-at-')}={Path(results[r]['run_dir']) / 'final'}" for r in rows]
    with (work / "finetune.log").open("w") as fh:
        if subprocess.run(argv, stdout=fh, stderr=subprocess.STDOUT).returncode:
            sys.exit(f"finetune failed; see {work / 'finetune.log'}")
    metrics = json.loads((out / "results.json").read_text())["metrics"]
    return {r: metrics[r.replace("@", "-at-")] for r in rows}


def _acc(acc: dict) -> str:
    """Downstream accuracy: mean ± SE over fine-tuning seeds (the mean alone with one seed)."""
    if not acc:
        return ""
    values = acc["values"]
    return f"{acc['mean']:.4f}" + (f" ± {mean_se(values)[1]:.4f}" if len(values) > 1 else "")


def report(results: dict, downstream: dict, seeds: list[int]) -> None:
    first = results.get("all") or next(iter(results.values()))
    cols = " | ".join(LABELS[m] for m in METRICS)
    lines = [
        f"| row | steps | student MACs | step MACs | {cols} | Δ perplexity (± SE) | Δ KL (± SE) | within 2 SE | "
        "tok/s | vs all |" + (" downstream acc |" if downstream else ""),
        "|---|" + "---:|" * (5 + len(METRICS)) + "---|" + "---:|" * (2 + bool(downstream)),
    ]
    for name, r in results.items():
        cells, deltas, within = [], [], []
        for m in METRICS:
            mean, se = mean_se([s[m] for s in r["seeds"].values()])
            cells.append(f"{mean:.4f} ± {se:.4f}" if m != "perplexity" else f"{mean:.2f} ± {se:.2f}")
        for m in ("perplexity", "kl_teacher_student"):
            mean, se = mean_se([s[m] for s in r["seeds"].values()])
            ref, ref_se = mean_se([s[m] for s in first["seeds"].values()])
            diff, diff_se = mean - ref, math.hypot(se, ref_se)
            deltas.append(f"{100 * diff / ref:+.2f} ± {100 * diff_se / ref:.2f} %")
            within.append(abs(diff) <= 2 * diff_se)
        acc = downstream.get(name, {}).get("accuracy", {})
        lines.append(
            f"| {name} | {r['steps']} | {r['macs']['student']:.2f}× | {r['macs']['step']:.2f}× | {' | '.join(cells)} | "
            f"{' | '.join(deltas)} | {'yes' if all(within) else 'no'} | {r['tok_s']:,.0f} | "
            f"{r['tok_s'] / first['tok_s']:.2f}× |" + (f" {_acc(acc)} |" if downstream else "")
        )  # fmt: skip
    print(f"seeds {', '.join(map(str, seeds))} (first: {SEED})")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
