"""Peak memory and time of the student's head plus its losses for one micro-batch, fused or not.

    python benchmarks/bench_head.py [--tokens 2048] [--vocab 30522] [--width 384] [--chunks 512,256,128]
                                    [--fractions 0.5,0.25,0.1,masked] [--chunk N] [--json OUT]

One training step's head work at the minilm shape: the (n, width) features of the student, its
tied vocabulary projection, the teacher's cached hidden states and MLM head (exact KD at T = 2 on
every token, MLM on 15 %), forward and backward. Rows: `unfused` (the (n, V) logits at once, as
before `loss.head_chunk_tokens`), `fused` (chunks of `--chunks` rows, every token), and `fused` with KD on
`--fractions` of the tokens (`loss.kd_fraction`; `masked`: `loss.kd_positions: masked`), the head on
the KD and MLM positions only.
Each row runs in a fresh process. Peak memory is the most bytes the loss's own tensors held at
once above the inputs, counted exactly from the allocator: on CUDA its peak statistic, on a CPU
every allocation and free the profiler records during one forward + backward (the first, so the
KD loss's reused scratch buffers are counted). Time is the median of `--repeat` unprofiled runs.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time

import torch
import torch.nn.functional as F


def _cpu_peak_bytes(step) -> int:
    """The most bytes live at once, above those live before, while `step()` runs on a CPU: the
    running sum of the allocator's alloc (+) and free (-) events, as the profiler records them."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def measure(chunk: int, fraction: float, args: argparse.Namespace, repeat: int, out: mp.Queue) -> None:
    """One row in a fresh process: (peak bytes above the inputs, median seconds of a fwd + bwd)."""
    from student_train.config import LossConfig
    from student_train.head_loss import HeadLoss, chunked_head_loss
    from student_train.losses import ExactHead

    torch.manual_seed(0)
    device = torch.device(args.device)
    n, h, v = args.tokens, args.width, args.vocab
    features = torch.randn(n, h, device=device, requires_grad=True)
    weight = (0.02 * torch.randn(v, h, device=device)).requires_grad_()
    bias = torch.zeros(v, device=device, requires_grad=True)
    head = torch.nn.Linear(h, v).to(device).requires_grad_(False)
    hidden = torch.randn(n, h, device=device)
    labels = torch.where(torch.rand(n, device=device) < 0.15, torch.randint(0, v, (n,), device=device), -100)
    # the selected KD rows (exactly all at 1.0; fraction 0: KD on the masked rows, kd_positions masked)
    kd = torch.rand(n, device=device) < fraction if fraction > 0 else labels != -100
    at = (kd | (labels != -100)) if fraction < 1 else torch.ones(n, dtype=torch.bool, device=device)
    cfg = LossConfig(head_chunk_tokens=chunk)
    exact = ExactHead(head, torch.float32, 1024)

    def step() -> None:
        loss_fn = HeadLoss(
            kd[at], labels[at], {"hidden": hidden[at]}, cfg, exact, (5.0 / max(int(kd.sum()), 1), 2.0 / n)
        )
        x = features[at]
        loss = (
            chunked_head_loss(x, weight, bias, loss_fn, chunk)
            if chunk
            else loss_fn(F.linear(x, weight, bias), 0, len(x))
        )
        loss.backward()
        features.grad = weight.grad = bias.grad = None  # the gradients count in the peak, then go

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _cpu_peak_bytes(step)
    seconds = []
    for _ in range(repeat):
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    out.put((peak, sorted(seconds)[len(seconds) // 2], int(at.sum())))


def main() -> None:
    from student_train.config import LossConfig

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=2048, help="tokens a micro-batch (16 x 128)")
    p.add_argument("--vocab", type=int, default=30522)
    p.add_argument("--width", type=int, default=384)
    p.add_argument("--chunks", default="512,256,128", help="loss.head_chunk_tokens of the fused rows")
    p.add_argument("--fractions", default="0.5,0.25,0.1,masked", help="KD shares of the selection rows")
    p.add_argument("--chunk", type=int, default=None, help="their head_chunk_tokens [the default]")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    ctx = mp.get_context("spawn")
    chunks = [int(c) for c in args.chunks.split(",")]
    rows = {"unfused": (0, 1.0), **{f"fused, chunks of {c}": (c, 1.0) for c in chunks}}
    chunk = args.chunk or LossConfig().head_chunk_tokens
    for f in args.fractions.split(","):
        label = "the masked tokens" if f == "masked" else f"{float(f):.0%}"
        rows[f"fused, chunks of {chunk}, KD on {label}"] = (chunk, 0.0 if f == "masked" else float(f))
    results = {}
    for name, (chunk, fraction) in rows.items():
        queue = ctx.Queue()
        proc = ctx.Process(target=measure, args=(chunk, fraction, args, args.repeat, queue))
        proc.start()
        peak, seconds, head_rows = queue.get()
        proc.join()
        results[name] = {"peak_bytes": peak, "seconds": seconds, "head_rows": head_rows}
    ref = results["unfused"]
    print(f"{args.tokens:,} tokens, V = {args.vocab:,}, width {args.width}, {args.device}")
    print("| head + losses | head rows | peak MB of the loss's tensors | vs unfused | ms fwd + bwd | vs unfused |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        print(
            f"| {name} | {r['head_rows']:,} | {r['peak_bytes'] / 2**20:,.0f} "
            f"| {r['peak_bytes'] / ref['peak_bytes']:.3f}× "
            f"| {1e3 * r['seconds']:,.0f} | {r['seconds'] / ref['seconds']:.2f}× |"
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "rows": results}, fh, indent=2)


if __name__ == "__main__":
    main()
