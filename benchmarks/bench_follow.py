"""Training while the cache is captured (`train-student --follow`) against training after it.

    python benchmarks/bench_follow.py [--sequences 2400] [--steps 60] [--window-shards 4] [--json OUT]

The shared teacher `../shared/teachers/minilm-l6-mlm` is captured over `../shared/data/wikitext2-valid.txt`
(128-token sequences, int8 hidden states, 64-row shards); a 3-layer student trains `--steps`
optimizer steps of 16 sequences in the windowed order (`--window-shards`). Two schedules, each
timed from the moment `cache-teacher` starts:

- after: capture to the end, then `train-student` (what a user without --follow does);
- follow: `train-student --follow` started as soon as the cache's header exists.

Reported per schedule: the time to the student's first optimizer step, the wall time until both
are done, the student's own wall time and its data wait (the share of step time spent waiting for
data, which includes waiting for shards), and for follow the shards committed when it started.
Both processes share this machine's cores in the follow schedule; the figures on paper for
separate devices (capture on one GPU, the student on another) come from the same measurements:
first step ≈ start-up + one window's capture, wall ≈ max(capture, start-up + training).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def configs(args: argparse.Namespace, work: Path) -> tuple[Path, Path]:
    cache = {
        "max_sequences": args.sequences,
        "max_eval_sequences": 64,
        "corpus": {"paths": [str(SHARED / "data/wikitext2-valid.txt")], "max_seq_len": 128, "eval_fraction": 0.05},
        "teacher": {"name": str(SHARED / "teachers/minilm-l6-mlm"), "batch_size": 32},
        "store": {"cache_dir": str(work / "home"), "output": str(work / "cache"), "shard_rows": 64},
    }
    train = {
        "cache": str(work / "cache"),
        "output_dir": str(work / "student"),
        "max_steps": args.steps,
        "log_every": 10,
        "eval_sequences": 64,
        "deepspeed_config": str(ROOT / "configs/deepspeed/zero2.json"),
        "student": {"layers": 3},
        "data": {"micro_batch_size": 16, "order": "windowed", "window_shards": args.window_shards, "num_workers": 1},
    }
    (work / "cache.yaml").write_text(yaml.safe_dump({"cache": cache}))
    (work / "train.yaml").write_text(yaml.safe_dump({"train": train}))
    return work / "cache.yaml", work / "train.yaml"


def pipeline(*argv: str, log: Path) -> subprocess.Popen:
    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", *argv], stdout=log.open("w"), stderr=subprocess.STDOUT, env=env
    )


def first_step(metrics: Path, proc: subprocess.Popen, t0: float) -> float:
    """Seconds from t0 until the student's first optimizer step is logged."""
    while not (metrics.is_file() and '"loss"' in metrics.read_text()):
        if proc.poll() is not None:
            sys.exit(f"train-student exited with {proc.returncode} before its first step")
        time.sleep(0.02)
    return time.perf_counter() - t0


def schedule(name: str, cache_cfg: Path, train_cfg: Path, work: Path) -> dict:
    shutil.rmtree(work / "cache", ignore_errors=True)
    shutil.rmtree(work / "student", ignore_errors=True)
    t0 = time.perf_counter()
    capture = pipeline("cache-teacher", "--config", str(cache_cfg), log=work / f"{name}-capture.log")
    if name == "after":
        assert capture.wait() == 0, f"capture failed: see {work / f'{name}-capture.log'}"
        capture_end = time.perf_counter() - t0
        student = pipeline("train-student", "--config", str(train_cfg), log=work / f"{name}-train.log")
    else:
        while not (work / "cache" / "cache.json").is_file():
            time.sleep(0.01)
        header_at = time.perf_counter() - t0
        student = pipeline("train-student", "--config", str(train_cfg), "--follow", log=work / f"{name}-train.log")
    first = first_step(work / "student" / "metrics.jsonl", student, t0)
    if name == "follow":
        assert capture.wait() == 0, f"capture failed: see {work / f'{name}-capture.log'}"
        capture_end = time.perf_counter() - t0
    assert student.wait() == 0, f"train-student failed: see {work / f'{name}-train.log'}"
    wall = time.perf_counter() - t0
    summary = json.loads((work / "student" / "summary.json").read_text())
    manifest = json.loads((work / "cache" / "manifest.json").read_text())
    out = {
        "first_step_s": first,
        "capture_s": capture_end,
        "capture_loop_s": manifest["counts"]["wall_seconds"],
        "wall_s": wall,
        "student_s": summary["seconds"],
        "student_tok_s": summary["tok_s"],
        "data_wait_fraction": summary["data_wait_fraction"],
        "final_loss": summary["final"]["loss"],
    }
    if name == "follow":
        out |= {"header_at_s": header_at, "followed": summary["followed"]}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sequences", type=int, default=2400)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--window-shards", type=int, default=4)
    p.add_argument("--work", type=Path, default=None)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-follow-"))
    work.mkdir(parents=True, exist_ok=True)
    cache_cfg, train_cfg = configs(args, work)
    warm = pipeline("cache-teacher", "--config", str(cache_cfg), "--set", "max_sequences=64",
                    "--set", f"store.output={work / 'warm'}", log=work / "warm.log")  # fmt: skip
    assert warm.wait() == 0, "warm-up capture failed"  # packs the corpus once for both schedules
    results = {name: schedule(name, cache_cfg, train_cfg, work) for name in ("after", "follow")}
    a, f = results["after"], results["follow"]
    assert a["final_loss"] == f["final_loss"], "the same student either way"
    startup = a["first_step_s"] - a["capture_s"]  # train-student's start-up and first step, alone
    paper = {
        "first_step_s": f["header_at_s"] + startup + a["capture_s"] * args.window_shards / max(1, shards(work)),
        "wall_s": max(a["capture_s"], f["header_at_s"] + startup + a["student_s"]),
    }
    results["separate_devices_on_paper"] = paper
    print(f"{'schedule':<10}{'first step s':>14}{'capture s':>11}{'wall s':>9}{'student s':>11}{'data wait':>11}")
    for name in ("after", "follow"):
        r = results[name]
        print(
            f"{name:<10}{r['first_step_s']:>14.1f}{r['capture_s']:>11.1f}{r['wall_s']:>9.1f}{r['student_s']:>11.1f}"
            f"{100 * r['data_wait_fraction']:>10.1f}%"
        )
    print(f"separate devices, on paper: first step {paper['first_step_s']:.1f} s, wall {paper['wall_s']:.1f} s")
    print(f"follow started with {f['followed']['committed_at_start']}/{f['followed']['shards']} shards committed")
    print(json.dumps(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


def shards(work: Path) -> int:
    manifest = json.loads((work / "cache" / "manifest.json").read_text())
    return manifest["counts"]["splits"]["train"]["shards"]


if __name__ == "__main__":
    main()
