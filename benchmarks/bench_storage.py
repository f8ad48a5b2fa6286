"""Caches on object storage, measured in one run against a real S3 HTTP endpoint on 127.0.0.1.

    python benchmarks/bench_storage.py [--sequences 1024] [--steps 12] [--latency-ms 20] [--json OUT]

1. Capture: `cache-teacher` of the same config to local disk and to s3:// (moto), tokens/s.
2. Training from the bucket: `train-student` of the same student for the same steps reading the
   local cache, and reading s3:// with and without the local disk cache (`data.local_cache_gb`,
   cold: every shard is fetched during the run), with 0 and `--latency-ms` of latency added to
   every request by a TCP proxy in front of the endpoint. Reported: data wait (share of step time
   spent waiting for batches, after step 1) and tokens/s, and step 1's wait apart (DataLoader
   workers starting, and the first shards arriving).

Teacher ../shared/teachers/minilm-l6-mlm over ../shared/data/wikitext2-valid.txt, default
outputs (int8 hidden states), shards of `--shard-mb` so that a cache has several shards; a
3-layer student, micro-batches of 16 x 128 tokens, ZeRO-2, one process.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


class LatencyProxy:
    """A TCP proxy that holds every chunk the client sends for `delay` seconds (so each request,
    and each ranged read, pays it) before passing it to the endpoint."""

    def __init__(self, upstream_port: int, delay: float):
        self.upstream_port, self.delay = upstream_port, delay
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        self.port = 0

        async def start() -> None:
            server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
            self.port = server.sockets[0].getsockname()[1]
            ready.set()
            await server.serve_forever()

        threading.Thread(target=lambda: self.loop.run_until_complete(start()), daemon=True).start()
        ready.wait()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, delay: float) -> None:
            try:
                while data := await src.read(1 << 16):
                    if delay:
                        await asyncio.sleep(delay)
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pump(reader, up_writer, self.delay), pump(up_reader, writer, 0.0))


def run(cmd: list[str], env: dict, log: Path) -> float:
    start = time.perf_counter()
    with log.open("w") as fh:
        if subprocess.run(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT).returncode:
            sys.exit(f"failed: {' '.join(cmd)}; see {log}")
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sequences", type=int, default=1024)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--shard-mb", type=int, default=8)
    p.add_argument("--latency-ms", type=float, default=20.0)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    import boto3
    from moto.server import ThreadedMotoServer

    work = Path(tempfile.mkdtemp(prefix="bench-storage-"))
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    _, port = server.get_host_and_port()
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    creds = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_REGION": "us-east-1"}
    boto3.client(
        "s3",
        endpoint_url=f"http://127.0.0.1:{port}",
        region_name="us-east-1",
        **{"aws_access_key_id": "bench", "aws_secret_access_key": "bench"},
    ).create_bucket(Bucket="dc-bench")
    proxies = {0.0: LatencyProxy(port, 0.0), args.latency_ms: LatencyProxy(port, args.latency_ms / 1000)}

    def env_for(latency: float) -> dict:
        endpoint = f"http://127.0.0.1:{proxies[latency].port}"
        return {**base, **creds, "AWS_ENDPOINT_URL": endpoint, "AWS_ALLOW_HTTP": "true", "DS_ACCELERATOR": "cpu"}

    cache = {
        "max_sequences": args.sequences,
        "max_eval_sequences": 64,
        "corpus": {"paths": [str(SHARED / "data/wikitext2-valid.txt")], "max_seq_len": 128, "eval_fraction": 0.05},
        "teacher": {"name": str(SHARED / "teachers/minilm-l6-mlm"), "batch_size": 32},
        "store": {"cache_dir": str(work / "home"), "shard_mb": args.shard_mb},
    }
    captures = {}
    for name, output in (("local", str(work / "cache")), ("s3", "s3://dc-bench/cache")):
        cfg = work / f"cache-{name}.yaml"
        cfg.write_text(yaml.safe_dump({"cache": {**cache, "store": {**cache["store"], "output": output}}}))
        seconds = run(
            [sys.executable, "-m", "pipeline", "cache-teacher", "--config", str(cfg)],
            env_for(0.0),
            work / f"cache-{name}.log",
        )
        captures[name] = {"wall_s": seconds, "location": output}
    from cache_format.reader import CacheReader

    manifest = CacheReader(work / "cache").manifest
    tokens = sum(s["tokens"] for s in manifest["counts"]["splits"].values())
    shards = sum(s["shards"] for s in manifest["counts"]["splits"].values())
    runs = {}
    for name, location, latency, gb in (
        ("local disk", str(work / "cache"), 0.0, 0.0),
        ("s3, local cache", "s3://dc-bench/cache", 0.0, 8.0),
        ("s3, direct", "s3://dc-bench/cache", 0.0, 0.0),
        (f"s3 +{args.latency_ms:g} ms, local cache", "s3://dc-bench/cache", args.latency_ms, 8.0),
        (f"s3 +{args.latency_ms:g} ms, direct", "s3://dc-bench/cache", args.latency_ms, 0.0),
    ):
        out = work / f"run-{len(runs)}"
        train = {
            "cache": location,
            "output_dir": str(out),
            "max_steps": args.steps,
            "eval_sequences": 8,
            "deepspeed_config": str(ROOT / "configs/deepspeed/zero2.json"),
            "student": {"layers": 3},
            "data": {
                "micro_batch_size": 16,
                "num_workers": 2,
                "local_cache_gb": gb,
                "local_cache_dir": str(work / f"mirror-{len(runs)}"),
            },  # cold: a first epoch
        }
        cfg = work / f"train-{len(runs)}.yaml"
        cfg.write_text(yaml.safe_dump({"train": train}))
        run(
            [sys.executable, "-m", "pipeline", "train-student", "--config", str(cfg)],
            env_for(latency),
            work / f"train-{len(runs)}.log",
        )
        records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
        steady = records[1:]  # step 1 waits for the DataLoader workers to start, whatever the storage
        step = sum(r["step_time_s"] for r in steady)
        runs[name] = {
            "data_wait_fraction": sum(r["data_wait_s"] for r in steady) / step,
            "tok_s": sum(r["tokens"] for r in steady) / step,
            "first_step_wait_s": records[0]["data_wait_s"],
        }
    server.stop()
    print(f"\ncache: {tokens:,} tokens in {shards} shards per field")
    print(f"{'capture to':<14}{'wall s':>9}{'tok/s':>9}")
    for name, c in captures.items():
        print(f"{name:<14}{c['wall_s']:>9.1f}{tokens / c['wall_s']:>9.0f}")
    print(f"\n{'training reads':<32}{'data wait':>11}{'tok/s':>8}{'first-step wait s':>19}")
    for name, r in runs.items():
        print(f"{name:<32}{100 * r['data_wait_fraction']:>10.2f}%{r['tok_s']:>8.0f}{r['first_step_wait_s']:>19.2f}")
    summary = {
        "machine": platform.machine(),
        "args": vars(args) | {"json": str(args.json)},
        "tokens": tokens,
        "shards_per_field": shards,
        "capture": captures,
        "training": runs,
    }
    print(json.dumps(summary))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
