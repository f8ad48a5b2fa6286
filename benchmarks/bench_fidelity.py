"""Which cached KD trains the online student? Every KD mode against `--online-teacher`, one run.

    python benchmarks/bench_fidelity.py [--steps 60] [--micro-batch 16] [--sequences 1200]
        [--modes online,exact,exact-int8,exact-nf4,exact-int4,sampled,topk_sampled,topk_tail,topk_renorm,defaults]
        [--seeds 56,57] [--cache-set store.shard_rows=64] [--json OUT] [--plot PNG]

One corpus, one seed, the same masks and micro-batches for every row: the shared teacher
`../shared/teachers/minilm-l6-mlm` cached over `../shared/data/wikitext2-valid.txt` (documents
held out by `eval_fraction` form the held-out split, never trained on). Every row trains the
same 3-layer student (initialised from teacher layers 0, 3, 5) for the same steps with the
triple loss 5/2/1 at T = 2, then `train-student`'s own held-out evaluation scores it:
masked-token accuracy and perplexity, top-1 agreement and KL(t||s) at T = 1 at masked
positions (the headline figures), and the hidden-state cosine. Rows:

- online: `--online-teacher` (the teacher runs every step; the reference);
- exact: full-vocabulary logits rebuilt from fp16 hidden states through the cached head;
- exact-int8: the same from int8 hidden states (per-token absmax, fp16 scale), no sparse logits;
- exact-nf4 / exact-int4: the same from 4-bit hidden states (rotated, NormalFloat / uniform levels,
  an fp16 absmax per 128 elements);
- exact-int8-windowed: exact-int8 read in the windowed block order (`data.order: windowed`, two
  shards a window: what `--follow` reads) instead of the global one;
- exact-pq-M / exact-pca-r: the same from fitted codecs (product quantisation, M bytes a token;
  an int8 low-rank basis of r components), fitted on the cache's first 64 train sequences;
- sampled: RS-KD, 64 draws at T = 2 (and `--train-draws` other counts);
- topk_sampled: the exact top-64 terms plus the tail from the draws outside the top-64;
- topk_tail / topk_renorm: the top-64 with one tail bucket / renormalised over the top-64;
- defaults: a cache built with no `outputs` options and a run with no `loss` options (reuses a
  row above when the defaults resolve to it).

`--seeds 56,57` trains every row once per seed (the seed of the student's data order and dropout;
the cache and its masks stay the same) and adds a table of each row's mean ± SE over the seeds
and its difference from the first row with the SE of that difference. `--cache-set KEY=VALUE`
changes every cache's config (e.g. `store.shard_rows=64`, small shards that give the windowed
order several windows).

Caches with the same resolved outputs are built once (paths derive from the fingerprint).
Bytes per token come from each cache's manifest; the variance of the sampled estimator at 32,
64 and 128 draws is computed exactly from the teacher's and the exact-trained student's
distributions on held-out positions (`losses.kd_sampled_std`).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import yaml

from cache_format.kd_modes import BASE_FIELDS, HIDDEN_FIELDS, KD_MODES
from cache_format.layout import valid_positions
from cache_format.reader import CacheReader
from pipeline.config import apply_mapping, apply_overrides, from_dict
from student_train.config import TrainConfig
from student_train.evaluate import load_rows
from student_train.losses import kd_full, kd_sampled_std
from teacher_cache.config import CacheConfig
from teacher_cache.report import size_rows

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
TEACHER = SHARED / "teachers/minilm-l6-mlm"
SEED = 56
"""The student's seed of the single-seed table (and the first of `--seeds`)."""
OUTPUTS_FULL = {"k": 64, "logits": "both", "n_samples": 64, "sample_temperature": 2.0, "hidden_dtype": "float16"}

ROWS = {  # name: (cache outputs, train overrides, online teacher)
    "online": (OUTPUTS_FULL, {"loss.kd_mode": "exact"}, True),
    "exact": (OUTPUTS_FULL, {"loss.kd_mode": "exact"}, False),
    "exact-int8": ({"logits": "none", "hidden_dtype": "int8"}, {"loss.kd_mode": "exact"}, False),
    "exact-nf4": ({"logits": "none", "hidden_dtype": "nf4"}, {"loss.kd_mode": "exact"}, False),
    "exact-int4": ({"logits": "none", "hidden_dtype": "int4"}, {"loss.kd_mode": "exact"}, False),
    "exact-int8-windowed": (
        {"logits": "none", "hidden_dtype": "int8"},
        {"loss.kd_mode": "exact", "data.order": "windowed", "data.window_shards": 2},
        False,
    ),
    "exact-pq-192": ({"logits": "none", "hidden_dtype": "pq", "hidden_codes": 192}, {"loss.kd_mode": "exact"}, False),
    "exact-pq-96": ({"logits": "none", "hidden_dtype": "pq", "hidden_codes": 96}, {"loss.kd_mode": "exact"}, False),
    "exact-pca-192": ({"logits": "none", "hidden_dtype": "pca", "hidden_codes": 192}, {"loss.kd_mode": "exact"}, False),
    "exact-pca-96": ({"logits": "none", "hidden_dtype": "pca", "hidden_codes": 96}, {"loss.kd_mode": "exact"}, False),
    "sampled": (OUTPUTS_FULL, {"loss.kd_mode": "sampled"}, False),
    "topk_sampled": (OUTPUTS_FULL, {"loss.kd_mode": "topk_sampled"}, False),
    "topk_tail": (OUTPUTS_FULL, {"loss.kd_mode": "topk_tail"}, False),
    "topk_renorm": (OUTPUTS_FULL, {"loss.kd_mode": "topk_renorm"}, False),
    "defaults": ({}, {}, False),
}
METRICS = [
    ("masked_accuracy", "masked acc"),
    ("perplexity", "perplexity"),
    ("teacher_top1_agreement", "top-1 agree"),
    ("kl_teacher_student", "KL(t‖s)"),
    ("hidden_cosine", "hidden cos"),
]


def cache_config(args: argparse.Namespace, work: Path, outputs: dict, sequences: int | None = None) -> CacheConfig:
    raw = {
        "max_sequences": sequences or args.sequences,
        "max_eval_sequences": args.eval_sequences,
        "corpus": {
            "paths": [str(SHARED / "data/wikitext2-valid.txt")],
            "max_seq_len": args.seq_len,
            "eval_fraction": 0.1,
        },
        "teacher": {"name": str(TEACHER), "batch_size": 32},
        "outputs": {"temperatures": [1.0, 2.0], **outputs},
        "store": {"cache_dir": str(work / "home")},  # path from the fingerprint: equal configs share it
    }
    return from_dict(CacheConfig, apply_overrides(raw, args.cache_set))


def pipeline(*argv: str, log: Path) -> float:
    """Run one `pipeline` command (its output to `log`); its wall seconds."""
    start = time.perf_counter()
    with log.open("w") as fh:
        done = subprocess.run([sys.executable, "-m", "pipeline", *argv], stdout=fh, stderr=subprocess.STDOUT)
    if done.returncode:
        sys.exit(f"`pipeline {' '.join(argv)}` failed; see {log}")
    return time.perf_counter() - start


def build_cache(cfg: CacheConfig, work: Path, built: dict) -> Path:
    """Build (or reuse) the cache of `cfg` at a path named by its resolved config."""
    key = json.dumps(asdict(cfg), sort_keys=True)
    if key not in built:
        name = f"cache-{hashlib.sha256(key.encode()).hexdigest()[:10]}"
        cfg = copy.deepcopy(cfg)
        cfg.store.output = str(work / name)
        (work / f"{name}.yaml").write_text(yaml.safe_dump({"cache": asdict(cfg)}))
        timing = work / f"{name}.seconds"  # a complete cache of the same config is reused
        if (work / name / "manifest.json").is_file() and timing.is_file():
            seconds = float(timing.read_text())
        else:
            print(f"[{time.strftime('%H:%M:%S')}] cache-teacher {name}: {asdict(cfg.outputs)}", flush=True)
            seconds = pipeline("cache-teacher", "--config", str(work / f"{name}.yaml"), log=work / f"{name}.log")
            timing.write_text(f"{seconds:.1f}")
        built[key] = {"path": work / name, "seconds": seconds}
    return built[key]["path"]


def train(
    args: argparse.Namespace, work: Path, name: str, cache: Path, overrides: dict, online: bool, seed: int
) -> dict:
    out = work / (f"run-{name}" if seed == SEED else f"run-{name}-seed{seed}")
    raw = {
        "cache": str(cache),
        "output_dir": str(out),
        "seed": seed,
        "epochs": 1,
        "max_steps": args.steps,
        "log_every": 10,
        "eval_sequences": args.eval_sequences,
        "deepspeed_config": str(ROOT / "configs/deepspeed/zero2.json"),
        "student": {"layers": 3},
        "data": {"micro_batch_size": args.micro_batch, "num_workers": 1},
    }
    key = {"train": raw, "overrides": overrides, "online": online}
    done = out / "bench.json"  # a finished run of the same config is reused (rerun the command to resume)
    if done.is_file() and json.loads(done.read_text())["key"] == key:
        return json.loads(done.read_text())["result"]
    config = out.with_suffix(".yaml")
    config.write_text(yaml.safe_dump({"train": raw}))
    argv = ["train-student", "--config", str(config), "--overwrite"]
    argv += [f"--set={k}={v}" for k, v in overrides.items()] + (["--online-teacher"] if online else [])
    seconds = pipeline(*argv, log=out.with_suffix(".log"))
    summary = json.loads((out / "summary.json").read_text())
    result = {"wall_s": seconds, "tok_s": summary["tok_s"], "eval": summary["eval"], "run_dir": str(out)}
    done.write_text(json.dumps({"key": key, "result": result}, indent=2))
    return result


def bytes_per_token(cache: Path) -> dict[str, float]:
    return {name: per_token for name, _, per_token, _ in size_rows(CacheReader(cache).manifest)}


def row_bytes(per_token: dict[str, float], kd_mode: str, online: bool) -> tuple[float, float]:
    """(bytes/token of the fields the KD term reads, bytes/token the whole run reads)."""
    if online:  # the teacher supplies logits and hidden states: only ids, labels and lengths are read
        return 0.0, sum(per_token.get(f, 0.0) for f in BASE_FIELDS)
    kd_fields = KD_MODES[kd_mode].fields
    read = set(BASE_FIELDS) | set(kd_fields) | set(HIDDEN_FIELDS)  # L_cos reads the hidden states
    return sum(per_token.get(f, 0.0) for f in kd_fields), sum(per_token.get(f, 0.0) for f in read)


@torch.no_grad()
def sampled_variance(cache: Path, student_dir: Path, draws: list[int], rows: int = 32) -> dict[int, dict]:
    """Per-token std of the sampled KD estimate at each draw count, for the given student on
    held-out positions, and the std of a micro-batch mean relative to its KD value."""
    from transformers import AutoModelForMaskedLM

    reader = CacheReader(cache)
    head = reader.head()
    data = load_rows(reader, "eval", rows)
    student = AutoModelForMaskedLM.from_pretrained(student_dir).eval()
    valid = valid_positions(data["lengths"], data["input_ids"].shape[1])
    logits = student(input_ids=data["input_ids"], attention_mask=valid.long()).logits[valid]
    teacher = head(data["hidden"][valid])
    temperature = float(reader.settings.outputs.sample_temperature)
    log_q = torch.log_softmax(logits / temperature, -1)
    p = torch.softmax(teacher / temperature, -1)
    ce = -(p * log_q).sum(-1) * temperature**2  # the sampled estimator's mean (cross-entropy * T^2)
    out = {}
    for n in draws:
        std = kd_sampled_std(logits, teacher, temperature, n)
        out[n] = {"std_per_token": float(std.mean()), "mean_per_token": float(ce.mean())}
    return out


@torch.no_grad()
def teacher_logit_fidelity(fp16_cache: Path, int8_cache: Path, rows: int = 64) -> dict[str, dict]:
    """How far the logits exact KD rebuilds are from the teacher's own: mean KL(teacher || rebuilt)
    at T = 1 and 2 and the top-1 flip rate on held-out positions, for hidden states stored as fp16
    or int8 and the head's GEMM in fp32 or bf16. Reference: the teacher run in fp32 here."""
    from transformers import AutoModelForMaskedLM

    teacher = AutoModelForMaskedLM.from_pretrained(TEACHER).eval()
    readers = {"float16": CacheReader(fp16_cache), "int8": CacheReader(int8_cache)}
    data = {k: load_rows(r, "eval", rows) for k, r in readers.items()}
    ids = data["float16"]["input_ids"]
    assert torch.equal(ids, data["int8"]["input_ids"]), "both caches hold the same held-out rows"
    valid = valid_positions(data["float16"]["lengths"], ids.shape[1])
    reference = teacher(input_ids=ids, attention_mask=valid.long()).logits[valid]
    head = readers["float16"].head()
    out = {}
    for storage, rows_ in data.items():
        for dtype in (torch.float32, torch.bfloat16):
            logits = copy.deepcopy(head).to(dtype)(rows_["hidden"][valid].to(dtype)).float()
            entry = {"top1_flips": float((logits.argmax(-1) != reference.argmax(-1)).float().mean())}
            for t in (1.0, 2.0):
                entry[f"kl_T{t:g}"] = float(kd_full(logits, reference, t).mean() / t**2)
            out[f"{storage} hidden, {str(dtype).removeprefix('torch.')} head"] = entry
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", default=",".join(ROWS))
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--sequences", type=int, default=1200, help="train sequences cached")
    p.add_argument("--eval-sequences", type=int, default=256, help="held-out sequences cached and evaluated")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--draws", default="32,64,128", help="sample counts whose bytes and variance are reported")
    p.add_argument("--work", type=Path, default=None, help="work directory (default: a temp dir, removed)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--plot", type=Path, default=None, help="bytes a token against Δ KL (the Pareto front), as PNG")
    p.add_argument("--seeds", default=str(SEED), help="student seeds; 2+ add a mean ± SE table")
    p.add_argument("--cache-set", action="append", default=[], help="KEY=VALUE for every cache's config")
    args = p.parse_args()
    seeds = [int(x) for x in args.seeds.split(",")]
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-fidelity-"))
    work.mkdir(parents=True, exist_ok=True)
    built: dict = {}
    results: dict = {}
    trained: dict = {}
    for name in args.modes.split(","):
        outputs, overrides, online = ROWS[name]
        cfg = cache_config(args, work, outputs)
        cache = build_cache(cfg, work, built)
        train_cfg = from_dict(TrainConfig, apply_mapping({"cache": str(cache)}, overrides))
        runs = {}
        for seed in seeds:
            key = (str(cache), json.dumps(asdict(train_cfg.loss), sort_keys=True), str(train_cfg.data), online, seed)
            if key not in trained:
                print(f"[{time.strftime('%H:%M:%S')}] {name} seed {seed}: training on {cache.name}", flush=True)
                trained[key] = train(args, work, name, cache, overrides, online, seed)
            runs[seed] = trained[key]
        per_token = bytes_per_token(cache)
        kd_bytes, run_bytes = row_bytes(per_token, train_cfg.loss.kd_mode, online)
        results[name] = {
            **runs[seeds[0]],
            "seeds": {seed: r["eval"]["student"] for seed, r in runs.items()},
            "kd_mode": "online" if online else train_cfg.loss.kd_mode,
            "cache_outputs": {
                k: asdict(cfg.outputs)[k] for k in ("logits", "hidden_dtype", "hidden_codes", "k", "n_samples")
            },
            "kd_bytes_per_token": kd_bytes,
            "run_bytes_per_token": run_bytes,
            "cache_bytes_per_token": sum(per_token.values()),
        }
    draws = [int(x) for x in args.draws.split(",")]
    sampled = {}
    for n in draws:  # bytes of the sampled fields at each draw count (a 256-sequence capture suffices)
        cache = build_cache(cache_config(args, work, {**OUTPUTS_FULL, "n_samples": n}, sequences=256), work, built)
        per_token = bytes_per_token(cache)
        sampled[n] = {"bytes_per_token": per_token["sample_ids"] + per_token["sample_counts"]}
    reference_student = results.get("exact") or results.get("online")
    if reference_student:
        cache = next(v["path"] for v in built.values())
        for n, v in sampled_variance(cache, Path(reference_student["run_dir"]) / "final", draws).items():
            sampled[n].update(v)
    fidelity = {}
    caches: dict[str, Path] = {}
    for key, v in built.items():  # the first cache of each hidden dtype (they share the held-out rows)
        caches.setdefault(json.loads(key)["outputs"]["hidden_dtype"], v["path"])
    if {"float16", "int8"} <= set(caches):
        fidelity = teacher_logit_fidelity(caches["float16"], caches["int8"])
    report(args, results, sampled, built, fidelity)
    if args.plot:
        pareto_plot(results, args.plot)
    if args.work is None:
        import shutil

        shutil.rmtree(work, ignore_errors=True)


def hidden_label(outputs: dict) -> str:
    """`int8`, `pq-96` (a fitted codec with its code bytes a token)."""
    codes = outputs.get("hidden_codes") or 0
    return f"{outputs['hidden_dtype']}-{codes}" if outputs["hidden_dtype"] in ("pq", "pca") else outputs["hidden_dtype"]


def pareto_plot(results: dict, path: Path) -> None:
    """What each cached row reads a token against its held-out KL change from online (log-log);
    the rows no other row beats on both are joined (the Pareto front)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref = results["online"]["eval"]["student"]["kl_teacher_student"]
    points = {}
    for name, r in results.items():
        if name in ("online", "defaults"):
            continue
        delta = abs(r["eval"]["student"]["kl_teacher_student"] / ref - 1)
        points[name] = (r["run_bytes_per_token"], max(delta, 1e-5))
    front = sorted(
        (n for n, (b, d) in points.items() if not any(b2 <= b and d2 < d for b2, d2 in points.values())),
        key=lambda n: points[n][0],
    )
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, (b, d) in points.items():
        ax.scatter(b, 100 * d, color="C0" if name.startswith("exact") else "C1", zorder=3)
        ax.annotate(name, (b, 100 * d), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.plot([points[n][0] for n in front], [100 * points[n][1] for n in front], "k--", lw=1, label="Pareto front")
    ax.axhline(0.5, color="grey", lw=0.8, ls=":", label="±0.5 % (the acceptance bar)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("bytes a token the run reads")
    ax.set_ylabel("|Δ KL(t‖s)| vs online, % (floor 0.001 %)")
    ax.set_title("bench_fidelity: cache bytes against the held-out student")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def mean_se(values: list[float]) -> tuple[float, float]:
    """The mean and its standard error (sample std / √n)."""
    return float(np.mean(values)), float(np.std(values, ddof=1) / math.sqrt(len(values)))


def seed_table(results: dict) -> list[str]:
    """Each row's held-out metrics as mean ± SE over its seeds, and its difference from the first
    row in % of the first row's mean, with the SE of the difference (the two SEs in quadrature)."""
    first = next(iter(results.values()))["seeds"]
    metrics = [
        m for m, _ in METRICS if m in ("perplexity", "kl_teacher_student", "teacher_top1_agreement", "hidden_cosine")
    ]
    lines = [
        f"| row (seeds) | {' | '.join(label for m, label in METRICS if m in metrics)} | "
        "Δ perplexity vs first (± SE) | Δ KL vs first (± SE) | within 2 SE |",
        "|---|" + "---:|" * (len(metrics) + 3),
    ]
    for name, r in results.items():
        cells, deltas, within = [], [], []
        for m in metrics:
            mean, se = mean_se([s[m] for s in r["seeds"].values()])
            cells.append(f"{mean:.4f} ± {se:.4f}")
        for m in ("perplexity", "kl_teacher_student"):
            mean, se = mean_se([s[m] for s in r["seeds"].values()])
            ref, ref_se = mean_se([s[m] for s in first.values()])
            diff, diff_se = mean - ref, math.hypot(se, ref_se)
            deltas.append(f"{100 * diff / ref:+.2f} ± {100 * diff_se / ref:.2f} %")
            within.append(abs(diff) <= 2 * diff_se)
        lines.append(
            f"| {name} ({len(r['seeds'])}) | {' | '.join(cells)} | {' | '.join(deltas)} | "
            f"{'yes' if all(within) else 'no'} |"
        )
    return lines


def report(args: argparse.Namespace, results: dict, sampled: dict, built: dict, fidelity: dict) -> None:
    ref = results.get("online")
    head = (
        "| row | KD mode | cache (logits, hidden) | KD B/token | run reads B/token | wall s | tok/s | "
        + " | ".join(label for _, label in METRICS)
        + " | Δ perplexity | Δ KL |"
    )
    lines = [head, "|" + "---|" * 3 + "---:|" * (4 + len(METRICS) + 2)]
    for name, r in results.items():
        s = r["eval"]["student"]
        c = r["cache_outputs"]
        rel = {
            m: (s[m] / ref["eval"]["student"][m] - 1) if ref else math.nan for m in ("perplexity", "kl_teacher_student")
        }
        lines.append(
            f"| {name} | {r['kd_mode']} | {c['logits']}, {hidden_label(c)} | {r['kd_bytes_per_token']:,.0f} | "
            f"{r['run_bytes_per_token']:,.0f} | {r['wall_s']:,.0f} | {r['tok_s']:,.0f} | "
            + " | ".join(f"{s[m]:.4f}" if m != "perplexity" else f"{s[m]:.2f}" for m, _ in METRICS)
            + f" | {100 * rel['perplexity']:+.2f} % | {100 * rel['kl_teacher_student']:+.2f} % |"
        )
    teacher = next(iter(results.values()))["eval"]["teacher"]
    lines.append(
        "| *teacher* | | | | | | | "
        + " | ".join(f"{teacher[m]:.4f}" if m != "perplexity" else f"{teacher[m]:.2f}" for m, _ in METRICS)
        + " | | |"
    )
    lines += [
        "",
        "| draws | sampled B/token | KD std per token | KD mean per token | std of a micro-batch mean |",
        "|---:|---:|---:|---:|---:|",
    ]
    tokens = args.micro_batch * args.seq_len
    for n, v in sampled.items():
        if "std_per_token" not in v:
            lines.append(f"| {n} | {v['bytes_per_token']:,.1f} | | | |")
            continue
        batch_std = v["std_per_token"] / math.sqrt(tokens)
        lines.append(
            f"| {n} | {v['bytes_per_token']:,.1f} | {v['std_per_token']:.3f} | {v['mean_per_token']:.3f} | "
            f"{batch_std:.4f} ({100 * batch_std / v['mean_per_token']:.2f} %) |"
        )
    if fidelity:
        lines += ["", "| rebuilt teacher logits | KL at T=1 | KL at T=2 | top-1 flips |", "|---|---:|---:|---:|"]
        for name, v in fidelity.items():
            lines.append(f"| {name} | {v['kl_T1']:.2e} | {v['kl_T2']:.2e} | {100 * v['top1_flips']:.2f} % |")
    if len(next(iter(results.values()))["seeds"]) > 1:
        lines += ["", *seed_table(results)]
    print("\n".join(lines))
    summary = {
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "args": {k: str(v) for k, v in vars(args).items()},
        "rows": results,
        "sampled_draws": sampled,
        "teacher_logit_fidelity": fidelity,
        "caches": {v["path"].name: round(v["seconds"], 1) for v in built.values()},
        "numpy": np.__version__,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2, default=str))


if __name__ == "__main__":
    main()
