"""cache-teacher throughput against the bare teacher forward, same model and batches, one run.

    python benchmarks/bench_cache.py [--teacher DIR] [--data FILE] [--sequences N] [--json OUT]

The bare forward is `model(input_ids, attention_mask, output_hidden_states=True)` (full logits
plus hidden states) over the very batches the cache holds. Bare and cache runs alternate
(`--repeat` pairs) so that drift hits both; the median ratio of the pairs is reported.
cache-teacher throughput is its capture loop (first shard start to last commit: masking, teacher,
top-k/lse, encoding, compression, writes, fsync, checksums); `command_seconds` is the whole
command including model loading.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cache_format.reader import CacheReader
from pipeline.config import apply_overrides, from_dict
from pipeline.log import setup_logging
from teacher_cache.config import CacheConfig
from teacher_cache.run import run_cache
from teacher_cache.teacher import resolve_device, resolve_dtype

ROOT = Path(__file__).resolve().parents[1]


def bare_forward(model, reader: CacheReader, batch_size: int, device: torch.device) -> tuple[float, int]:
    """Seconds and tokens for full-logits forwards over the cached input ids."""
    lay = reader.layouts["train"]
    rows = reader.read_rows("train", 0, lay.rows, ["input_ids", "lengths"])
    ids_all, lengths = rows["input_ids"].astype(np.int64), rows["lengths"]
    tokens = int(lengths.sum())
    with torch.inference_mode():
        model(input_ids=torch.from_numpy(ids_all[:batch_size]).to(device))  # warm-up
        _sync(device)
        start = time.perf_counter()
        for a in range(0, lay.rows, batch_size):
            ids = torch.from_numpy(ids_all[a : a + batch_size]).to(device)
            mask = torch.arange(ids.shape[1])[None, :] < torch.from_numpy(lengths[a : a + batch_size])[:, None]
            out = model(input_ids=ids, attention_mask=mask.long().to(device), output_hidden_states=True)
            out.logits.float().sum().item()  # consume the outputs, as a writer would
        _sync(device)
    return time.perf_counter() - start, tokens


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default=str(ROOT.parent / "shared/teachers/minilm-l6-mlm"))
    p.add_argument("--data", default=str(ROOT.parent / "shared/data/wikitext2-valid.txt"))
    p.add_argument("--sequences", type=int, default=256)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--repeat", type=int, default=3, help="interleaved bare/cache pairs; the median is reported")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="extra cache config key=value")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    args = p.parse_args()
    setup_logging()
    logging.getLogger("teacher_cache").setLevel(logging.WARNING)

    from transformers import AutoModelForMaskedLM

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    work = Path(tempfile.mkdtemp(prefix="bench-cache-"))
    raw = {
        "max_sequences": args.sequences,
        "corpus": {"paths": [args.data], "max_seq_len": args.seq_len},
        "teacher": {"name": args.teacher, "batch_size": args.batch_size, "device": args.device, "dtype": args.dtype},
        "store": {"cache_dir": str(work), "output": str(work / "cache")},
    }
    cfg = from_dict(CacheConfig, apply_overrides(raw, args.overrides))

    run_cache(cfg)  # packs the corpus (cached for the timed runs) and warms everything up
    model = AutoModelForMaskedLM.from_pretrained(args.teacher, attn_implementation="sdpa", dtype=dtype)
    model = model.to(device).eval()
    pairs = []
    for _ in range(args.repeat):  # interleaved, so drift hits both sides alike
        bare_s, tokens = bare_forward(model, CacheReader(work / "cache"), args.batch_size, device)
        shutil.rmtree(work / "cache")
        start = time.perf_counter()
        run_cache(cfg)
        command = time.perf_counter() - start
        manifest = CacheReader(work / "cache").manifest
        capture = manifest["counts"]["wall_seconds"]
        pairs.append((tokens / bare_s, tokens / capture, command))
    ratios = sorted(c / b for b, c, _ in pairs)
    bare_tps = statistics.median(b for b, _, _ in pairs)
    cache_tps = statistics.median(c for _, c, _ in pairs)
    nbytes = sum(f["bytes"] for f in manifest["counts"]["fields"].values())
    result = {
        "device": str(device),
        "dtype": str(dtype),
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "teacher": args.teacher,
        "sequences": args.sequences,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "tokens": tokens,
        "repeat": args.repeat,
        "bare_forward_tok_s": [round(b) for b, _, _ in pairs],
        "cache_teacher_tok_s": [round(c) for _, c, _ in pairs],
        "ratios": [round(r, 3) for r in ratios],
        "ratio_median": round(statistics.median(ratios), 3),
        "command_seconds": [round(c, 1) for _, _, c in pairs],
        "bytes_per_token": round(nbytes / tokens, 1),
        "fp32_full_logits_bytes_per_token": manifest["teacher"]["vocab_size"] * 4,
    }
    print(
        f"\nbare teacher forward (logits + hidden): {bare_tps:,.0f} tok/s median, runs {result['bare_forward_tok_s']}"
    )
    print(
        f"cache-teacher capture loop:             {cache_tps:,.0f} tok/s median, runs {result['cache_teacher_tok_s']}"
    )
    print(f"ratio cache-teacher / bare forward:     {result['ratio_median']:.3f} median, runs {result['ratios']}")
    print(
        f"bytes per token on disk:                {result['bytes_per_token']:,.1f} "
        f"(fp32 full logits: {result['fp32_full_logits_bytes_per_token']:,})"
    )
    print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
