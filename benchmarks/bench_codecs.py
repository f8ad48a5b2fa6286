"""Hidden-state codecs on the shared teacher: bytes per token against what they change.

    python benchmarks/bench_codecs.py [--sequences 64] [--json OUT]

The shared teacher `../shared/teachers/minilm-l6-mlm` runs over the last 300,000 characters of
`../shared/data/wikitext2-valid.txt` (packed 128-token sequences, BERT masking 15 % / 80-10-10,
seed 0) and its last hidden states go through every codec of `cache_format.hidden`; the fitted
ones (`pq`, `pca`, at several code bytes a token) are fitted on the 300,000 characters before
those (a disjoint pilot, as capture fits on the plan's first sequences). Per codec:

- reconstruction: the mean cosine and relative error (‖ĥ − h‖ / ‖h‖) of the decoded states;
- rebuilt logits (the cached head on ĥ against the head on h): KL(exact ‖ rebuilt) at T = 1 and
  T = 2, the top-1 flip rate, and the change in the teacher's own masked-token accuracy;
- bytes per token as `hidden` + `hidden_scale` are stored (Blosc as the cache writes them) and
  with zstd (level 3) on top, measured rather than assumed;
- encode and decode time per 1,000 tokens on this CPU (one process).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from numcodecs import Zstd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared"

from cache_format.fitted import FITTED_CODECS, fit_hidden  # noqa: E402
from cache_format.hidden import decode_hidden, encode_hidden  # noqa: E402
from teacher_cache.estimate import stored_bytes  # noqa: E402

CODECS = (("float16", 0), ("int8", 0), ("nf4", 0), ("int4", 0), ("pca", 192), ("pca", 96), ("pq", 192),
          ("pq", 96), ("pq", 48))  # fmt: skip
"""(codec, code bytes a token of the fitted ones)."""


def teacher_states(
    sequences: int, length: int = 128, end: int = 0
) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """(head, last hidden states (n*L, H), labels at masked positions or -100) of the 300,000
    characters that end `end` characters before the end of the text."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    path = SHARED / "teachers/minilm-l6-mlm"
    tok, model = AutoTokenizer.from_pretrained(path), AutoModelForMaskedLM.from_pretrained(path).eval()
    text = (SHARED / "data/wikitext2-valid.txt").read_text(encoding="utf-8")
    text = text[len(text) - end - 300_000 : len(text) - end]
    ids = tok(text, add_special_tokens=False)["input_ids"][: sequences * (length - 2)]
    body = torch.tensor(ids).view(sequences, length - 2)
    x = torch.cat([torch.full((sequences, 1), tok.cls_token_id), body, torch.full((sequences, 1), tok.sep_token_id)], 1)
    g = torch.Generator().manual_seed(0)
    masked = torch.rand(x.shape, generator=g) < 0.15
    masked[:, 0] = masked[:, -1] = False
    roll = torch.rand(x.shape, generator=g)
    inputs = x.clone()
    inputs[masked & (roll < 0.8)] = tok.mask_token_id
    swap = masked & (roll >= 0.8) & (roll < 0.9)
    inputs[swap] = torch.randint(len(tok), (int(swap.sum()),), generator=g)
    with torch.no_grad():
        hidden = model(input_ids=inputs, output_hidden_states=True).hidden_states[-1]
    labels = torch.where(masked, x, torch.full_like(x, -100))
    return model.cls, hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)


def measure(
    head, h: torch.Tensor, labels: torch.Tensor, codec: str, fit=None, block_rows: int = 32, length: int = 128
) -> dict:
    start = time.perf_counter()
    stored, scale = encode_hidden(h.view(-1, length, h.shape[-1]), codec, fit)
    encode_s = time.perf_counter() - start
    start = time.perf_counter()
    back = decode_hidden(stored, scale, codec, fit).reshape(h.shape)
    decode_s = time.perf_counter() - start
    masked = labels != -100
    out = {
        "cosine": float(torch.nn.functional.cosine_similarity(back, h, -1).mean()),
        "relative_error": float(((back - h).norm(dim=-1) / h.norm(dim=-1)).mean()),
        "encode_ms_per_1k_tokens": 1e3 * encode_s / len(h) * 1000,
        "decode_ms_per_1k_tokens": 1e3 * decode_s / len(h) * 1000,
    }
    tokens = len(h)
    arrays = [(stored, "raw")] + ([(scale, "lse")] if scale is not None else [])
    out["bytes_per_token"] = sum(stored_bytes(a, c, block_rows) for a, c in arrays) / length
    zstd = Zstd(level=3)
    out["bytes_per_token_zstd"] = sum(len(zstd.encode(np.ascontiguousarray(a))) for a, _ in arrays) / tokens
    kl, flips, acc = {}, 0, 0
    with torch.no_grad():
        for a in range(0, tokens, 1024):
            ref, got = head(h[a : a + 1024]), head(back[a : a + 1024])
            for t in (1.0, 2.0):
                lp, lq = torch.log_softmax(ref / t, -1), torch.log_softmax(got / t, -1)
                kl[t] = kl.get(t, 0.0) + float((lp.exp() * (lp - lq)).sum())
            flips += int((ref.argmax(-1) != got.argmax(-1)).sum())
            m = masked[a : a + 1024]
            acc += int((got.argmax(-1)[m] == labels[a : a + 1024][m]).sum()) - int(
                (ref.argmax(-1)[m] == labels[a : a + 1024][m]).sum()
            )
    out.update(
        kl_t1=kl[1.0] / tokens,
        kl_t2=kl[2.0] / tokens,
        top1_flip_rate=flips / tokens,
        masked_accuracy_change=acc / int(masked.sum()),
    )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sequences", type=int, default=64)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    torch.manual_seed(0)
    head, h, labels = teacher_states(args.sequences)
    _, pilot, _ = teacher_states(args.sequences, end=300_000)
    results = {"tokens": len(h), "hidden_size": h.shape[-1], "masked": int((labels != -100).sum()), "codecs": {}}
    print(f"{len(h):,} tokens, H = {h.shape[-1]}, {results['masked']:,} masked")
    print("| codec | B/token | B/element | with zstd | cosine | rel. error | KL T=1 | KL T=2 | top-1 flips "
          "| Δ masked acc |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for codec, codes in CODECS:
        start = time.perf_counter()
        fit = fit_hidden(codec, pilot, codes, seed=0) if codec in FITTED_CODECS else None
        fit_s = time.perf_counter() - start
        r = measure(head, h, labels, codec, fit)
        name = f"{codec}-{codes}" if fit is not None else codec
        results["codecs"][name] = {**r, "fit_seconds": fit_s, "pilot_tokens": len(pilot)}
        print(
            f"| {name} | {r['bytes_per_token']:.1f} | {r['bytes_per_token'] / h.shape[-1]:.3f} | "
            f"{r['bytes_per_token_zstd']:.1f} | {r['cosine']:.5f} | {r['relative_error']:.4f} | {r['kl_t1']:.2e} | "
            f"{r['kl_t2']:.2e} | {100 * r['top1_flip_rate']:.2f} % | {100 * r['masked_accuracy_change']:+.2f} pp |"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
