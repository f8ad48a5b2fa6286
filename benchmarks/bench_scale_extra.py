"""bench_scale's other runs: the data path at BERT-base width, one short training run on the
largest cache, opening and the data path on S3 (moto), and the summary (table, slopes, plot)."""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from pathlib import Path

from bench_scale import ROOT, cache_config, make_corpus, make_teacher, measured, stage, tree
from bench_storage import LatencyProxy

STAGES = ("prep", "capture", "open", "verify", "inspect", "resume", "datapath_1", "datapath_2", "datapath_4")


def wide_datapath(work: Path, tokens: int = 1_000_000) -> dict:
    """The data path over int8 hidden states at H = 768 (a 1-layer random BERT-base-width teacher)."""
    root = work / "wide"
    root.mkdir(parents=True, exist_ok=True)
    corpus = root / "corpus.txt"
    if not corpus.is_file():
        make_corpus(corpus, tokens)
    teacher = make_teacher(work / "teacher-h768", 768, 1)
    cache = root / "cache"
    cfg = cache_config(root, corpus, teacher, str(cache), root / "home")
    if not (cache / "manifest.json").is_file():
        measured([sys.executable, "-m", "pipeline", "cache-teacher", "--config", str(cfg)], root / "capture.log")
    out = {"cache_bytes": tree(cache)["bytes"]}
    for w in (1, 2, 4):
        args = ("--cache", str(cache), "--workers", str(w), "--max-tokens", str(tokens // 2))
        out[f"datapath_{w}"] = stage("datapath", root, root / f"datapath-{w}.log", *args)
    return out


def train_run(work: Path, cache: Path, steps: int = 10) -> dict:
    """One short train-student on the largest cache: peak memory and the time to its first step."""
    out_dir = work / "train"
    shutil.rmtree(out_dir, ignore_errors=True)
    raw = {
        "cache": str(cache),
        "output_dir": str(out_dir),
        "max_steps": steps,
        "log_every": 1,
        "deepspeed_config": str(ROOT / "configs/deepspeed/zero2.json"),
        "student": {"layers": 1, "init": "random"},
        "data": {"micro_batch_size": 32, "num_workers": 2},
    }
    config = work / "train.yaml"
    config.write_text(json.dumps({"train": raw}))
    first: dict = {}
    start = time.perf_counter()

    def watch(proc) -> bool:
        if "s" not in first and (out_dir / "metrics.jsonl").is_file():
            first["s"] = time.perf_counter() - start
        return False

    result = measured(
        [sys.executable, "-m", "pipeline", "train-student", "--config", str(config)], work / "train.log", until=watch
    )
    return {**result, "time_to_first_step_s": first.get("s"), "steps": steps}


def s3_runs(work: Path, sizes: list[int], latency_ms: float = 20.0) -> dict:
    """Each size's local cache copied to moto's S3, then opened (requests counted) and read by the
    data path, plain and with `latency_ms` added to every request."""
    if not sizes:
        return {}
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    _, port = server.get_host_and_port()
    creds = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_REGION": "us-east-1"}
    s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1",
                      aws_access_key_id="bench", aws_secret_access_key="bench")  # fmt: skip
    s3.create_bucket(Bucket="dc-scale")
    proxies = {0.0: LatencyProxy(port, 0.0), latency_ms: LatencyProxy(port, latency_ms / 1000)}
    out = {}
    for size in sizes:
        tag = f"{size:.0e}".replace("+0", "")
        local = work / tag / "cache"
        for path in sorted(p for p in local.rglob("*") if p.is_file() and "locks" not in p.parts):
            s3.upload_file(str(path), "dc-scale", f"{tag}/{path.relative_to(local).as_posix()}")
        url = f"s3://dc-scale/{tag}"
        runs = {}
        for ms, proxy in proxies.items():
            env = {**creds, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy.port}", "AWS_ALLOW_HTTP": "true"}
            key = f"{ms:g}ms"
            runs[f"open_{key}"] = stage("open", work, work / f"s3-open-{tag}-{key}.log", "--cache", url,
                                        "--count-requests", env=env)  # fmt: skip
            args = ("--cache", url, "--workers", "2", "--max-tokens", str(min(size // 2, 2_000_000)))
            runs[f"datapath_{key}"] = stage("datapath", work, work / f"s3-data-{tag}-{key}.log", *args, env=env)
        out[str(size)] = runs
    server.stop()
    return out


def slope(points: list[tuple[float, float]]) -> float:
    """The least-squares slope of log(cost) against log(tokens)."""
    xs, ys = [math.log(x) for x, _ in points], [math.log(max(y, 1e-9)) for _, y in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else math.nan


def summarise(results: dict, plot: Path) -> str:
    sizes = sorted(results["sizes"], key=int)
    tokens = {s: results["sizes"][s]["prep"]["tokens"] for s in sizes}
    head = " | ".join(f"{int(s):.0e} tokens" for s in sizes)
    lines = [f"| stage | {head} | slope | time per token, largest ÷ smallest |"]
    lines.append("| --- |" + " ---: |" * (len(sizes) + 2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    for name in STAGES:
        rows = [results["sizes"][s][name] for s in sizes]
        # the stage's own work where it is timed inside the process (preparation, the capture
        # loop, verify's reading, the data path), else the wall time of its process
        cost = [r.get("seconds", r["wall_s"]) for r in rows]
        work = [r.get("tokens", tokens[s]) for r, s in zip(rows, sizes, strict=True)]
        b = slope(list(zip(work, cost, strict=True)))
        cells = [f"{c:,.2f} s ({r['wall_s']:,.1f} s wall), {w / c:,.0f} tok/s, {r['peak_rss_mb']:,.0f} MB "
                 f"({r['peak_anon_mb']:,.0f} anon)" for c, w, r in zip(cost, work, rows, strict=True)]  # fmt: skip
        flat = (cost[-1] / work[-1]) / (cost[0] / work[0])
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {b:.2f} | {flat:.2f} |")
        ax.loglog(work, cost, marker="o", label=f"{name} (slope {b:.2f})")
    ax.set(xlabel="tokens", ylabel="seconds", title="cost per stage against tokens (2 CPU cores)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    plot.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(plot, dpi=110)
    return "\n".join(lines)
