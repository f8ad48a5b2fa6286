"""How every cost grows from 10^6 to 10^8 tokens: corpus preparation, capture, opening, verify,
inspect, resume after kill -9 at ~90 %, the training data path at 1, 2 and 4 workers, one short
train-student on the largest cache, and opening and the data path on S3 (moto, plain and with
20 ms per request).

    python benchmarks/bench_scale.py [--sizes 1e6,1e7,1e8] [--s3-sizes 1e6,1e7] [--json OUT] [--plot PNG]

The teacher is a tiny random BERT with the shared teacher's tokenizer (2 layers, H = 64,
V = 30,522), so that capture does not dominate; the data path is also measured at BERT-base width
(a 1-layer H = 768 random teacher, int8 hidden states). The corpus is the shared text
(WikiText-2 validation and Tiny Shakespeare, one document a paragraph), its documents repeated in
a seeded shuffled order until the size is reached: real text, repeated. Every stage runs in its
own process; its wall time, tokens/s, peak resident memory of the whole process tree (sampled
every 50 ms; `anon` leaves out file-backed pages: memory maps and the page cache), files and bytes
are recorded. Shards are 16 MB (`store.shard_mb`) so that even the small caches have several.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import yaml

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
TOKENIZER = SHARED / "teachers/minilm-l6-mlm"
sys.path.insert(0, str(ROOT))


# ----------------------------------------------------------------------------- measuring


def measured(cmd: list[str], log: Path, env: dict | None = None, until=None) -> dict:
    """Run `cmd`, sampling the resident memory of its process tree; `until(proc)` may end it early
    (it returns True once it killed the process)."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT), **(env or {})}
    start = time.perf_counter()
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT)
        root, peak, peak_anon, killed = psutil.Process(proc.pid), 0, 0, False
        while proc.poll() is None:
            rss = anon = 0
            try:
                for p in [root, *root.children(recursive=True)]:
                    info = p.memory_info()
                    rss, anon = rss + info.rss, anon + info.rss - info.shared
            except psutil.Error:
                pass
            peak, peak_anon = max(peak, rss), max(peak_anon, anon)
            if until is not None and not killed:
                killed = until(proc)
            time.sleep(0.05)
    if proc.returncode and not killed:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}; see {log}")
    return {"wall_s": time.perf_counter() - start, "peak_rss_mb": peak / 1e6, "peak_anon_mb": peak_anon / 1e6}


def tree(path: Path) -> dict:
    files = [p for p in path.rglob("*") if p.is_file()]
    return {"files": len(files), "bytes": sum(p.stat().st_size for p in files)}


def stage(name: str, work: Path, log: Path, *args: str, env: dict | None = None) -> dict:
    """This script's own `--stage` in a fresh process; its JSON result merged with the measurements."""
    out = work / f"{log.stem}.json"
    cmd = [sys.executable, __file__, "--stage", name, "--work", str(work), "--out", str(out), *args]
    result = measured(cmd, log, env)
    return {**result, **json.loads(out.read_text())}


# ----------------------------------------------------------------------------- inputs


def documents() -> list[str]:
    docs = []
    for name, splitter in (("wikitext2-valid.txt", "\n"), ("tinyshakespeare.txt", "\n\n")):
        text = (SHARED / "data" / name).read_text(encoding="utf-8")
        docs += [d.strip() for d in text.split(splitter) if len(d.split()) >= 8]
    return docs


def make_corpus(path: Path, tokens: int) -> int:
    """Shared paragraphs in a seeded shuffled order, repeated until `tokens` tokens; their count."""
    from transformers import AutoTokenizer

    docs = documents()
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    lengths = [len(x) for x in tok(docs, add_special_tokens=False)["input_ids"]]
    rng, total = random.Random(0), 0
    with path.open("w", encoding="utf-8") as fh:
        while total < tokens:
            order = list(range(len(docs)))
            rng.shuffle(order)
            for i in order:
                fh.write(docs[i] + "\n\n")
                total += lengths[i]
                if total >= tokens:
                    break
    return total


def make_teacher(path: Path, hidden: int, layers: int) -> Path:
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    if not path.is_dir():
        torch.manual_seed(0)
        heads = max(1, hidden // 64)
        config = BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                            intermediate_size=4 * hidden)  # fmt: skip
        BertForMaskedLM(config).save_pretrained(path)
        AutoTokenizer.from_pretrained(TOKENIZER).save_pretrained(path)
    return path


def cache_config(work: Path, corpus: Path, teacher: Path, output: str, home: Path) -> Path:
    raw = {
        "corpus": {"paths": [str(corpus)], "max_seq_len": 128},
        "teacher": {"name": str(teacher), "batch_size": 256},
        "store": {"output": output, "cache_dir": str(home), "shard_mb": 16},
    }
    path = work / f"cache-{Path(output).name}.yaml"
    path.write_text(yaml.safe_dump({"cache": raw}))
    return path


# ----------------------------------------------------------------------------- stages (own process)


def run_stage(args) -> dict:
    if args.stage == "prep":
        from pipeline.config import load_config
        from teacher_cache.config import CacheConfig
        from teacher_cache.corpus import prepare_corpus
        from teacher_cache.teacher import load_teacher

        cfg = load_config(CacheConfig, "cache", args.config)
        teacher = load_teacher(cfg.teacher)
        start = time.perf_counter()
        corpus = prepare_corpus(cfg.corpus, teacher.tokenizer, teacher.tokenizer_sha256, cfg.store.cache_dir, cfg.seed)
        seconds = time.perf_counter() - start
        meta = corpus.meta
        return {
            "tokens": int(meta["tokens"]["train"]),
            "sequences": int(meta["sequences"]["train"]),
            "seconds": seconds,
        }
    if args.stage == "open":
        return open_stage(args.cache, args.count_requests)
    if args.stage == "datapath":
        return datapath_stage(args.cache, args.workers, args.max_tokens)
    raise SystemExit(f"unknown stage {args.stage}")


def count_requests() -> dict:
    """Wrap obstore's calls so that every request is counted (a listing counts one per page)."""
    import obstore

    counts: dict[str, int] = {}

    def pages(listing):
        for page in listing:
            counts["list_pages"] = counts.get("list_pages", 0) + 1
            yield page

    def counted(name, fn):
        def call(*a, **k):
            counts[name] = counts.get(name, 0) + 1
            out = fn(*a, **k)
            return pages(out) if name == "list" else out

        return call

    for name in ("get", "get_range", "head", "list", "put", "delete"):
        setattr(obstore, name, counted(name, getattr(obstore, name)))
    return counts


def open_stage(cache: str, count: bool) -> dict:
    from cache_format.reader import CacheReader
    from student_train.config import DataConfig, reader_options

    counts = count_requests() if count else {}
    start = time.perf_counter()
    reader = CacheReader(cache, lease=True, **reader_options(DataConfig(local_cache_gb=0)))
    seconds = time.perf_counter() - start
    reader.close()
    shards = sum(lay.shards for lay in reader.layouts.values())
    requests = {k: v for k, v in counts.items() if k != "list"}
    return {"open_s": seconds, "seconds": seconds, "shards": shards, "requests": requests}


def datapath_stage(cache: str, workers: int, max_tokens: int) -> dict:
    """CacheBatches delivering micro-batches to a no-op consumer (exact KD's fields: int8 hidden)."""
    from cache_format.kd_modes import KD_MODES
    from cache_format.reader import CacheReader
    from student_train.config import DataConfig, reader_options
    from student_train.data import CacheBatches, FieldSelection

    data = DataConfig(micro_batch_size=32, num_workers=workers, mix_blocks=8, local_cache_gb=0)
    reader = CacheReader(cache, **reader_options(data))
    fields = FieldSelection.for_run(reader.settings, set(reader.fields), KD_MODES["exact"], True, 2.0, None)
    batches = iter(CacheBatches(reader, data, fields, 56, 1, 0, 1))
    for _ in range(20 * max(1, workers)):  # every worker started and delivered its first groups
        next(batches)
    tokens, nbytes, start = 0, 0, time.perf_counter()
    while tokens < max_tokens:
        batch = next(batches)
        tokens += int(batch["lengths"].sum())
        nbytes += sum(v.numel() * v.element_size() for v in batch.values())
    seconds = time.perf_counter() - start
    return {"tokens": tokens, "seconds": seconds, "tok_s": tokens / seconds, "bytes_per_token": nbytes / tokens}


# ----------------------------------------------------------------------------- the driver


def commits(cache: Path) -> int:
    return len(list((cache / "commits").glob("*.json"))) if (cache / "commits").is_dir() else 0


def size_run(size: int, work: Path, teacher: Path) -> dict:
    """Every stage at one size (local disk)."""
    tag = f"{size:.0e}".replace("+0", "")
    root = work / tag
    root.mkdir(parents=True, exist_ok=True)
    corpus = root / "corpus.txt"
    if not corpus.is_file():
        make_corpus(corpus, size)
    home, cache = root / "home", root / "cache"
    cfg = cache_config(root, corpus, teacher, str(cache), home)
    out: dict = {"corpus_bytes": corpus.stat().st_size}
    out["prep"] = stage("prep", root, root / "prep.log", "--config", str(cfg))
    tokens = out["prep"]["tokens"]
    cli = [sys.executable, "-m", "pipeline"]
    shutil.rmtree(cache, ignore_errors=True)
    out["capture"] = measured([*cli, "cache-teacher", "--config", str(cfg)], root / "capture.log") | tree(cache)
    counts = json.loads((cache / "manifest.json").read_text())["counts"]
    total = sum(s["shards"] for s in counts["splits"].values())
    out["capture"].update(shards=total, seconds=counts["wall_seconds"])  # the loop: first shard to last commit
    out["open"] = stage("open", root, root / "open.log", "--cache", str(cache))
    out["verify"] = measured([*cli, "verify", str(cache)], root / "verify.log")
    line = (root / "verify.log").read_text().strip().splitlines()[-1]  # "ok: ... (X GB/s)"
    out["verify"]["gb_s"] = float(line.rsplit("(", 1)[1].split()[0])
    out["verify"]["seconds"] = tree(cache)["bytes"] / out["verify"]["gb_s"] / 1e9
    out["inspect"] = measured([*cli, "inspect", str(cache)], root / "inspect.log")
    out["resume"] = resume_run(cli, root, corpus, teacher, home, total)
    out["resume"]["tokens"] = tokens * out["resume"]["shards_left"] / total  # what was left to capture
    # inside the first epoch: a new epoch starts a new DataLoader, whose worker start-up is a
    # per-epoch cost, not a per-token one
    max_tokens = min(tokens // 2, 20_000_000)
    for w in (1, 2, 4):
        args = ("--cache", str(cache), "--workers", str(w), "--max-tokens", str(max_tokens))
        out[f"datapath_{w}"] = stage("datapath", root, root / f"datapath-{w}.log", *args)
    for s in out.values():
        if isinstance(s, dict) and "wall_s" in s:
            s.setdefault("tok_s", s.get("tokens", tokens) / s.get("seconds", s["wall_s"]))
    return out


def resume_run(cli: list[str], root: Path, corpus: Path, teacher: Path, home: Path, total: int) -> dict:
    """A second capture, killed (SIGKILL) once ~90 % of its shards are committed, then resumed."""
    cache = root / "cache-killed"
    shutil.rmtree(cache, ignore_errors=True)
    cfg = cache_config(root, corpus, teacher, str(cache), home)
    target = max(1, math.floor(0.9 * total))

    def kill_at_90(proc) -> bool:
        if commits(cache) >= target:
            os.kill(proc.pid, signal.SIGKILL)
            return True
        return False

    before = measured([*cli, "cache-teacher", "--config", str(cfg)], root / "killed.log", until=kill_at_90)
    left = total - commits(cache)
    resumed = measured([*cli, "cache-teacher", "--config", str(cfg)], root / "resume.log")
    ok = subprocess.run([*cli, "verify", str(cache)], capture_output=True, cwd=ROOT).returncode == 0
    shutil.rmtree(cache, ignore_errors=True)
    return {**resumed, "killed_after_s": before["wall_s"], "shards": total, "shards_left": left, "verified": ok}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1e6,1e7,1e8")
    p.add_argument("--s3-sizes", default="1e6,1e7", help="moto keeps objects in memory: 10^8 would hold 7 GB")
    p.add_argument("--work", default=None)
    p.add_argument("--json", type=Path, default=ROOT / "runs/bench_scale.json")
    p.add_argument("--plot", type=Path, default=ROOT / "docs/results/scale.png")
    p.add_argument("--stage", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--config", default=None, help=argparse.SUPPRESS)
    p.add_argument("--cache", default=None, help=argparse.SUPPRESS)
    p.add_argument("--workers", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--max-tokens", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--count-requests", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.stage:
        Path(args.out).write_text(json.dumps(run_stage(args)))
        return
    from bench_scale_extra import s3_runs, summarise, train_run, wide_datapath

    work = Path(args.work or "/tmp/bench-scale")
    work.mkdir(parents=True, exist_ok=True)
    teacher = make_teacher(work / "teacher-h64", 64, 2)
    results: dict = {"sizes": {}}
    sizes = [int(float(s)) for s in args.sizes.split(",")]
    for size in sizes:
        results["sizes"][str(size)] = size_run(size, work, teacher)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    results["wide_datapath"] = wide_datapath(work)
    largest = work / f"{max(sizes):.0e}".replace("+0", "") / "cache"
    results["train"] = train_run(work, largest)
    results["s3"] = s3_runs(work, [int(float(s)) for s in args.s3_sizes.split(",") if s])
    args.json.write_text(json.dumps(results, indent=2))
    print(summarise(results, args.plot))


if __name__ == "__main__":
    main()
