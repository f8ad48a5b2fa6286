"""Size and speed of models, measured the same way for all of them: parameters (total and without
embeddings), bytes on disk, latency per batch and tokens/s on identical batches, in one run,
threads pinned, warm-up excluded, the models interleaved so that they share the machine's noise."""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import torch

from cache_format.layout import valid_positions

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


def size_of(model, directory: str | Path | None) -> dict:
    """A Hugging Face model's parameters (as `num_parameters` counts them) and the bytes of the weight files on disk."""
    files = [p for p in Path(directory).rglob("*") if p.suffix in WEIGHT_SUFFIXES] if directory else []
    return {
        "parameters": int(model.num_parameters()),
        "non_embedding_parameters": int(model.num_parameters(exclude_embeddings=True)),
        "bytes": sum(f.stat().st_size for f in files),
    }


@torch.inference_mode()
def time_models(
    models: dict[str, torch.nn.Module],
    batches: dict[int, tuple[torch.Tensor, torch.Tensor]],
    repeats: int,
    warmup: int,
    threads: int | None,
    device: torch.device | str,
) -> dict[str, dict]:
    """Per model and batch size: median seconds per forward, and tokens/s (non-pad tokens)."""
    device = torch.device(device)
    torch.set_num_threads(threads or os.cpu_count() or 1)
    times: dict[str, dict[int, list[float]]] = {n: {b: [] for b in batches} for n in models}
    for m in models.values():
        m.to(device).eval()
    for bs, (ids, mask) in batches.items():
        ids, mask = ids.to(device), mask.to(device)
        for r in range(warmup + repeats):
            for name, model in models.items():  # interleaved: the same conditions for every model
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                model(input_ids=ids, attention_mask=mask)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if r >= warmup:
                    times[name][bs].append(time.perf_counter() - t0)
    out = {}
    for name in models:
        out[name] = {"threads": torch.get_num_threads(), "device": str(device)}
        for bs, (_, mask) in batches.items():
            median = statistics.median(times[name][bs])
            out[name][f"latency_ms_b{bs}"] = 1e3 * median
            out[name][f"tokens_per_s_b{bs}"] = float(mask.sum()) / median
    return out


def ratios(report: dict[str, dict], reference: str) -> dict[str, dict]:
    """Each model's size and speed relative to the reference (student / teacher)."""
    ref = report[reference]
    out = {}
    for name, r in report.items():
        out[name] = {
            k: r[k] / ref[k]
            for k in r
            if isinstance(r[k], int | float) and isinstance(ref.get(k), int | float) and ref[k] and k != "threads"
        }
    return out


def batches_from(texts: list[str], tokenizer, sizes: list[int], max_len: int) -> dict[int, tuple]:
    """Identical batches of real text for every model: the first `bs` texts, padded to max_len."""
    out = {}
    for bs in sizes:
        chunk = (texts * (bs // max(len(texts), 1) + 1))[:bs]
        enc = tokenizer(chunk, truncation=True, max_length=max_len, padding="max_length", return_tensors="pt")
        out[bs] = (enc["input_ids"], enc["attention_mask"])
    return out


def speed_table(report: dict[str, dict], rel: dict[str, dict], reference: str, sizes: list[int]) -> list[str]:
    """Markdown rows: size, latency, throughput, and the ratios to the reference."""
    big = max(sizes)
    head = (
        "| model | parameters | without embeddings | on disk | "
        + " | ".join(f"latency b{b} (ms)" for b in sizes)
        + f" | tok/s b{big} | params vs {reference} | speed vs {reference} |"
    )
    lines = [head, "|---|---:|---:|---:|" + "---:|" * len(sizes) + "---:|---:|---:|"]
    for name, r in report.items():
        lines.append(
            f"| {name} | {r['parameters'] / 1e6:.1f} M | {r['non_embedding_parameters'] / 1e6:.1f} M | "
            f"{r['bytes'] / 1e6:.1f} MB | "
            + " | ".join(f"{r[f'latency_ms_b{b}']:.1f}" for b in sizes)
            + f" | {r[f'tokens_per_s_b{big}']:,.0f} | {rel[name]['parameters']:.2f}x "
            f"| {rel[name][f'tokens_per_s_b{big}']:.2f}x |"
        )
    return lines


def mlm_speed(models: dict[str, str], input_ids: torch.Tensor, lengths: torch.Tensor, sizes: list[int]) -> dict:
    """Size and speed of masked LMs (name -> directory or hub name) on identical batches of cached
    sequences; the first model is the reference of the ratios."""
    from transformers import AutoModelForMaskedLM

    loaded = {n: AutoModelForMaskedLM.from_pretrained(p).eval() for n, p in models.items()}
    mask = valid_positions(lengths, input_ids.shape[1]).long()
    batches = {}
    for bs in sizes:
        rows = torch.arange(bs) % len(input_ids)
        batches[bs] = (input_ids[rows], mask[rows])
    timed = time_models(loaded, batches, repeats=10, warmup=3, threads=None, device=torch.device("cpu"))
    report = {
        n: size_of(m, p if Path(p).is_dir() else None) | timed[n]
        for (n, m), p in zip(loaded.items(), models.values(), strict=True)
    }
    reference = next(iter(models))
    return {"report": report, "ratios": ratios(report, reference), "reference": reference, "sizes": sizes}
