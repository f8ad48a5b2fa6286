"""Caches on object storage, against a real S3 HTTP endpoint (moto on 127.0.0.1): capture, kills,
coordinator-free workers and their leases, Ray, training and evaluation from the bucket, damage."""

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import obstore
import pytest
import yaml
from click.testing import CliRunner

from cache_format.reader import CacheReader
from cache_format.storage import open_storage
from cache_format.verify import verify_cache
from pipeline.cli import main
from pipeline.config import from_dict
from pipeline.errors import DistilcacheError
from student_train.config import TrainConfig
from student_train.runtime import LAUNCHER_VARS
from student_train.trainer import run_train
from teacher_cache.config import CacheConfig
from teacher_cache.run import run_cache
from tests.conftest import assert_same_arrays

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]


def env(s3, **extra) -> dict:
    base = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    return {**base, **s3.env, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", **extra}


def at(raw: dict, output: str) -> dict:
    raw = copy.deepcopy(raw)
    raw["store"]["output"] = output
    return raw


def commits(location: str) -> list[str]:
    return [k for k in open_storage(location).list("commits") if k.endswith(".json")]


def cache_command(raw: dict, path: Path, *extra: str, prelude: str = "") -> list[str]:
    path.write_text(yaml.safe_dump({"cache": raw}))
    code = f"{prelude}from pipeline.cli import main; main()"
    return [sys.executable, "-c", code, "cache-teacher", "--config", str(path), *extra]


@pytest.fixture
def cfg(cache_cfg):
    raw = copy.deepcopy(cache_cfg)
    raw["outputs"].update(logits="both", n_samples=8)
    raw["store"].update(block_rows=2, shard_rows=4)  # 20 train + 2 eval shards
    return raw


@pytest.fixture
def local(cfg, tmp_path) -> str:
    return run_cache(from_dict(CacheConfig, at(cfg, str(tmp_path / "local"))))


def test_capture_to_s3_verifies_and_equals_the_local_cache(s3, cfg, local):
    url = s3.bucket("dc-capture") + "/caches/tiny"
    assert run_cache(from_dict(CacheConfig, at(cfg, url))) == url
    report = verify_cache(url)
    assert report.problems == [] and report.shards == 22
    assert_same_arrays(url, local)
    keys = open_storage(url).list()
    assert "manifest.json" in keys and not [k for k in keys if k.startswith("locks/") or "partial" in k]
    result = CliRunner().invoke(main, ["inspect", url])
    assert result.exit_code == 0 and f"cache {url}" in result.output


def test_kill_9_during_an_s3_capture_then_rerun_gives_the_same_arrays(s3, cfg, local, tmp_path):
    url = s3.bucket("dc-kill") + "/c"
    slow = "import time, cache_format.store as s; w = s.CacheStore.write_shard\n"
    slow += "s.CacheStore.write_shard = lambda self, *a: (time.sleep(0.3), w(self, *a))[1]\n"
    proc = subprocess.Popen(
        cache_command(at(cfg, url), tmp_path / "c.yaml", prelude=slow), env=env(s3), stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 300
    while time.time() < deadline and len(commits(url)) < 5 and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "finished before the kill"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(commits(url))
    assert 5 <= done < 22 and "manifest.json" not in open_storage(url).list()
    rerun = subprocess.run(
        cache_command(at(cfg, url), tmp_path / "c.yaml"), env=env(s3), capture_output=True, text=True, timeout=300
    )
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"resuming: skipping {done} complete shard(s)" in rerun.stderr
    assert verify_cache(url).problems == []
    assert_same_arrays(url, local)


@pytest.mark.parametrize("workers", [("0/2", "1/2"), ("0/1", "0/1")], ids=["split", "racing"])
def test_two_workers_commit_every_shard_exactly_once(s3, cfg, local, tmp_path, workers):
    url = s3.bucket(f"dc-workers-{workers[1].replace('/', '-')}") + "/c"
    procs = [
        subprocess.Popen(
            cache_command(at(cfg, url), tmp_path / f"w{i}.yaml", "--worker", w),
            env=env(s3),
            stderr=subprocess.PIPE,
            text=True,
        )
        for i, w in enumerate(workers)
    ]
    for p in procs:
        assert p.wait(timeout=600) == 0, p.stderr.read()[-2000:]
    records = [json.loads(open_storage(url).read_bytes(k)) for k in commits(url)]
    assert len(records) == 22 and len({(r["split"], r["shard"]) for r in records}) == 22
    assert {r["worker"] for r in records} == set(workers)
    manifest = CacheReader(url).manifest
    assert sum(s["shards"] for s in manifest["counts"]["splits"].values()) == 22
    assert_same_arrays(url, local)


def test_a_killed_workers_shard_is_taken_over_after_its_lease_expires(s3, cfg, local, tmp_path):
    url = s3.bucket("dc-lease") + "/c"
    stuck = (  # worker 0 captures its first shard, then hangs before writing it (as if the node froze)
        "import time, cache_format.store as s\ns.CacheStore.write_shard = lambda self, *a: time.sleep(3600)\n"
    )
    fast = {"DISTILCACHE_LEASE_TTL_S": "3"}
    first = subprocess.Popen(
        cache_command(at(cfg, url), tmp_path / "a.yaml", "--worker", "0/2", prelude=stuck),
        env=env(s3, **fast),
        stderr=subprocess.DEVNULL,
    )
    storage = open_storage(url)
    deadline = time.time() + 300
    while time.time() < deadline and not storage.list("leases"):
        time.sleep(0.05)
    held = storage.list("leases")
    assert held, "worker 0 never claimed a shard"
    first.send_signal(signal.SIGKILL)
    first.wait()
    second = subprocess.run(
        cache_command(at(cfg, url), tmp_path / "b.yaml", "--worker", "1/2"),
        env=env(s3, **fast),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert second.returncode == 0, second.stderr[-2000:]
    shard = held[0].split("/")[1].rsplit(".", 2)[0]  # e.g. train-00000
    assert f"taking over {shard.replace('-', ' shard ')}" in second.stderr
    assert len(commits(url)) == 22 and verify_cache(url).problems == []
    assert_same_arrays(url, local)


def test_ray_engine_gives_the_same_arrays(s3, cfg, local, tmp_path):
    ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'distilcache[ray]'")
    url = s3.bucket("dc-ray") + "/c"
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": env(s3)})
    try:
        run_cache(from_dict(CacheConfig, at(cfg, url)), engine="ray")
    finally:
        ray.shutdown()
    records = [json.loads(open_storage(url).read_bytes(k)) for k in commits(url)]
    assert len(records) == 22 and {r["engine"] for r in records} == {"ray"}
    assert_same_arrays(url, local)


def losses_of(run: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]


def test_train_and_evaluate_from_s3_equal_the_local_copy(s3, cfg, local, tmp_path, monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    url = s3.bucket("dc-train") + "/c"
    run_cache(from_dict(CacheConfig, at(cfg, url)))
    summaries = {}
    for name, cache, options in (
        ("local", local, {}),
        ("s3-mirror", url, {"local_cache_dir": str(tmp_path / "mirror"), "local_cache_gb": 1.0}),
        ("s3-direct", url, {"local_cache_gb": 0.0}),
    ):
        raw = {
            "cache": cache,
            "output_dir": str(tmp_path / name),
            "max_steps": 3,
            "eval_sequences": 8,
            "deepspeed_config": str(ROOT / "configs/deepspeed/zero2.json"),
            "student": {"layers": 1, "dropout": 0.0},
            "data": {"micro_batch_size": 4, "mix_blocks": 2, "num_workers": 1, **options},
        }
        summaries[name] = run_train(from_dict(TrainConfig, raw))
        assert losses_of(tmp_path / name) == losses_of(tmp_path / "local")
    fingerprint = CacheReader(url).settings.fingerprint
    mirrored = list((tmp_path / "mirror" / fingerprint).rglob("c/*"))
    assert mirrored, "the mirror holds the shard files it served"
    out = tmp_path / "eval.json"
    model = summaries["local"]["export"]
    for cache in (local, url):
        result = CliRunner().invoke(main, ["evaluate", "--model", model, "--cache", cache, "--json", str(out)])
        assert result.exit_code == 0, result.output
        got = json.loads(out.read_text())["student"]
        for key, value in summaries["local"]["eval"]["student"].items():
            assert got[key] == pytest.approx(value, rel=1e-5), key


def test_a_flipped_byte_in_an_object_is_a_clear_error(s3, cfg):
    url = s3.bucket("dc-flip") + "/c"
    run_cache(from_dict(CacheConfig, at(cfg, url)))
    reader = CacheReader(url)
    record = next(r for r in reader.records() if (r["split"], r["shard"]) == ("train", 1))
    key = record["files"]["topk_values"]["path"]
    storage = open_storage(url)
    blob = bytearray(storage.read_bytes(key))
    blob[len(blob) // 3] ^= 0x20
    obstore.put(storage._store, key, bytes(blob))
    lay = reader.layouts["train"]
    with pytest.raises(DistilcacheError, match="train shard 00001: the topk_values data is damaged"):
        CacheReader(url).read_rows("train", lay.shard_rows, 2 * lay.shard_rows, ["topk_values"])
    assert verify_cache(url).problems == [f"shard train-00001: topk_values corrupt (checksum mismatch in {key})"]


def test_a_selection_beside_an_s3_cache_equals_the_local_one_and_trains_alike(s3, cfg, local, tmp_path, monkeypatch):
    from cache_format.selection import read_record
    from student_train.selection.config import SelectConfig
    from student_train.selection.run import run_select

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    url = s3.bucket("dc-select") + "/c"
    run_cache(from_dict(CacheConfig, at(cfg, url)))
    records = {
        where: run_select(from_dict(SelectConfig, {"cache": where, "score": "teacher_loss", "fraction": 0.5}))
        for where in (local, url)
    }
    assert records[url]["data"] == records[local]["data"], "the same selection bytes on a bucket and a disk"
    assert read_record(open_storage(url), "teacher_loss-50")["record_sha256"] == records[url]["record_sha256"]
    for name, cache in (("local", local), ("s3", url)):
        raw = {
            "cache": cache,
            "output_dir": str(tmp_path / name),
            "max_steps": 2,
            "eval_sequences": 4,
            "deepspeed_config": str(ROOT / "configs/deepspeed/zero2.json"),
            "student": {"layers": 1, "dropout": 0.0},
            "data": {"micro_batch_size": 4, "mix_blocks": 2, "num_workers": 1, "selection": "teacher_loss-50"},
        }
        assert run_train(from_dict(TrainConfig, raw))["selection"]["kept_sequences"] == records[local]["kept_sequences"]
    assert losses_of(tmp_path / "s3") == losses_of(tmp_path / "local")
