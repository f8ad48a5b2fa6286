"""Real processes: kill -9 in the middle then resume, and 2 ranks under torchrun = 1 process."""

import copy
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cache_format.reader import CacheReader
from cache_format.verify import verify_cache
from pipeline.config import from_dict
from teacher_cache.config import CacheConfig
from teacher_cache.run import run_cache
from tests.conftest import torchrun_cmd

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]


def shard_hashes(path: Path) -> dict:
    records = CacheReader(path).records()
    return {(r["split"], r["shard"], f): v["sha256"] for r in records for f, v in r["files"].items()}


def write_config(raw: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump({"cache": raw}))
    return path


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipeline", *args]


def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


@pytest.fixture
def big_cfg(cache_cfg, tmp_path):
    raw = copy.deepcopy(cache_cfg)
    raw["max_sequences"] = 240
    raw["teacher"]["batch_size"] = 4
    raw["store"].update(block_rows=2, shard_rows=4)  # 120 train shards + 2 eval shards
    return raw


def test_kill_9_then_resume_gives_identical_arrays(big_cfg, tmp_path):
    reference = dict(big_cfg, store=dict(big_cfg["store"], output=str(tmp_path / "reference")))
    run_cache(from_dict(CacheConfig, copy.deepcopy(reference)))
    expected = shard_hashes(tmp_path / "reference")

    config = write_config(big_cfg, tmp_path / "c.yaml")
    out = Path(big_cfg["store"]["output"])
    proc = subprocess.Popen(
        cli("cache-teacher", "--config", str(config)), env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (out / "commits").is_dir() and len(list((out / "commits").glob("*.json"))) >= 5:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run finished before it could be killed; make it longer"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()
    done = len(list((out / "commits").glob("*.json")))
    assert 5 <= done < 122
    problems = verify_cache(out).problems
    assert problems[0].startswith("incomplete") and any("missing (never committed)" in p for p in problems)

    rerun = subprocess.run(
        cli("cache-teacher", "--config", str(config)), env=env(), capture_output=True, text=True, timeout=300
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resuming: skipping {done} complete shard(s)" in rerun.stderr
    assert not list(out.rglob("*.partial"))
    assert shard_hashes(out) == expected
    assert verify_cache(out).problems == []


def test_two_processes_equal_one_process(cache_cfg, tmp_path):
    single = dict(cache_cfg, store=dict(cache_cfg["store"], output=str(tmp_path / "single")))
    run_cache(from_dict(CacheConfig, copy.deepcopy(single)))
    config = write_config(cache_cfg, tmp_path / "c.yaml")
    cmd = torchrun_cmd(2, "cache-teacher", "--config", str(config))
    result = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = Path(cache_cfg["store"]["output"])
    records = list(CacheReader(out).records())
    assert {r["rank"] for r in records} == {0, 1} and {r["world_size"] for r in records} == {2}
    assert shard_hashes(out) == shard_hashes(tmp_path / "single")
