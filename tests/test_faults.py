"""Fault injection: every way a cache or a run can be hurt, each with its exact outcome.

Nothing finished is lost, and nothing damaged is ever read as numbers: a kill at any point of a
capture resumes to the same bytes; damaged, missing or edited files are refused with an error
naming them; bad values stop the capture before a shard holding them is committed.
"""

import copy
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from cache_format.reader import CacheReader
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
from tests.test_defaults import train_raw

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]
KILLS = 8


def env() -> dict:
    base = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    return {**base, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipeline", *args]


def build(raw: dict, **store) -> Path:
    raw = copy.deepcopy(raw)
    raw["store"].update(store)
    return Path(run_cache(from_dict(CacheConfig, raw)))


def one_error(result) -> str:
    """The single `error:` line of a failed CLI run (exit code 1, no traceback)."""
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert "Traceback" not in result.output, result.output
    assert lines[-1].startswith("error: "), result.output
    return lines[-1]


@pytest.fixture
def small_shards(cache_cfg):
    raw = copy.deepcopy(cache_cfg)
    raw["store"].update(block_rows=2, shard_rows=4)  # 20 train + 2 eval shards: kills land in commits
    return raw


# ----------------------------------------------------------------------------- capture kills


def test_kill_9_at_8_seeded_points_then_resume_gives_the_same_arrays(small_shards, tmp_path):
    """8 kills spread over a whole capture (from the header appearing to the manifest), each
    followed by a resume: every resumed cache equals the uninterrupted one and verifies."""
    reference = build(small_shards, output=str(tmp_path / "reference"))
    config = tmp_path / "c.yaml"
    timing = dict(small_shards, store=dict(small_shards["store"], output=str(tmp_path / "timing")))
    config.write_text(yaml.safe_dump({"cache": timing}))
    proc = subprocess.Popen(cli("cache-teacher", "--config", str(config)), env=env(), stderr=subprocess.DEVNULL)
    header = tmp_path / "timing" / "cache.json"
    while not header.exists() and proc.poll() is None:
        time.sleep(0.005)
    t0 = time.perf_counter()
    assert proc.wait(timeout=300) == 0
    span = time.perf_counter() - t0  # the capture's own duration, after start-up
    rng = random.Random(1234)
    outcomes = {"before": 0, "during": 0}
    for i in range(KILLS):
        out = tmp_path / f"kill-{i}"
        raw = dict(small_shards, store=dict(small_shards["store"], output=str(out)))
        config.write_text(yaml.safe_dump({"cache": raw}))
        proc = subprocess.Popen(cli("cache-teacher", "--config", str(config)), env=env(), stderr=subprocess.DEVNULL)
        while not (out / "cache.json").exists() and proc.poll() is None:
            time.sleep(0.002)
        time.sleep(span * (i + rng.random()) / KILLS)  # stratified over the whole run, seeded
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        outcomes["during" if (out / "commits").is_dir() and any((out / "commits").iterdir()) else "before"] += 1
        build(raw)  # resume in this process
        assert verify_cache(out).problems == []
        assert_same_arrays(out, reference)
        shutil.rmtree(out)
    assert outcomes["during"] >= KILLS // 2, outcomes


# ----------------------------------------------------------------------------- damaged caches


@pytest.fixture
def cache(cache_cfg, tmp_path) -> Path:
    raw = copy.deepcopy(cache_cfg)
    raw["outputs"].update(hidden_dtype="float16")  # raw (uncompressed) hidden, Blosc top-k
    return build(raw, output=str(tmp_path / "cache"))


def shard_file(cache: Path, split: str, shard: int, field: str) -> Path:
    record = next(r for r in CacheReader(cache).records() if (r["split"], r["shard"]) == (split, shard))
    return cache / record["files"][field]["path"]


def train_cfg(cache: Path, out: Path) -> TrainConfig:
    return from_dict(TrainConfig, train_raw(cache, out))


@pytest.mark.parametrize("damage", ["deleted", "truncated"])
def test_missing_or_truncated_shard_is_refused_at_open_naming_it(cache, tmp_path, damage, monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    target = shard_file(cache, "train", 1, "labels")
    if damage == "deleted":
        target.unlink()
        what = "train shard 00001: the labels file is missing"
    else:
        target.write_bytes(target.read_bytes()[:-10])
        what = "train shard 00001: the labels file has"
    for argv in (["inspect", str(cache)], ["evaluate", "--model", str(tmp_path), "--cache", str(cache)]):
        assert what in one_error(CliRunner().invoke(main, argv))
    with pytest.raises(DistilcacheError, match=what):
        run_train(train_cfg(cache, tmp_path / "run"))
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("field", ["hidden", "topk_values", "labels"])
def test_one_flipped_byte_in_a_field_is_a_read_error_and_verify_names_the_file(cache, field):
    target = shard_file(cache, "train", 2, field)
    blob = bytearray(target.read_bytes())
    blob[len(blob) // 3] ^= 0x10  # inside an inner chunk (the index sits at the end)
    target.write_bytes(bytes(blob))
    reader = CacheReader(cache)  # sizes are unchanged: the open-time checks pass
    lay = reader.layouts["train"]
    with pytest.raises(DistilcacheError, match=f"train shard 00002: the {field} data is damaged"):
        reader.read_rows("train", 2 * lay.shard_rows, 3 * lay.shard_rows, [field])
    rel = str(target.relative_to(cache))
    assert verify_cache(cache).problems == [f"shard train-00002: {field} corrupt (checksum mismatch in {rel})"]


@pytest.mark.parametrize(
    "edit,match",
    [
        ("cache.json", "cache.json and manifest.json disagree on `identity`"),
        ("manifest.json", "cache.json and manifest.json disagree on `identity`"),
        ("zarr.json", r"data.zarr/train/labels/zarr.json differs from the manifest's record"),
        ("flipped-metadata", r"data.zarr/train/hidden/zarr.json differs from the manifest's record"),
    ],
)
def test_edited_metadata_is_refused(cache, edit, match):
    if edit in ("cache.json", "manifest.json"):
        doc = json.loads((cache / edit).read_text())
        doc["identity"]["outputs"]["temperatures"] = [2.0, 1.0]  # would read the wrong lse column
        (cache / edit).write_text(json.dumps(doc))
    elif edit == "zarr.json":
        path = cache / "data.zarr/train/labels/zarr.json"
        doc = json.loads(path.read_text())
        doc["fill_value"] = 0
        path.write_text(json.dumps(doc))
    else:
        path = cache / "data.zarr/train/hidden/zarr.json"
        blob = bytearray(path.read_bytes())
        blob[10] ^= 0x01
        path.write_bytes(bytes(blob))
    with pytest.raises(DistilcacheError, match=match):
        CacheReader(cache)
    assert verify_cache(cache).problems, "verify names the edit too"


def test_verify_repair_recomputes_exactly_the_damaged_shard(cache, cache_cfg, tmp_path):
    reference = tmp_path / "reference"
    shutil.copytree(cache, reference)
    target = shard_file(cache, "train", 3, "topk_values")
    blob = bytearray(target.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    target.write_bytes(bytes(blob))
    runner = CliRunner()
    assert "run `pipeline verify --repair`" in one_error(runner.invoke(main, ["verify", str(cache)]))
    repaired = runner.invoke(main, ["verify", "--repair", str(cache)])
    assert repaired.exit_code == 0, repaired.output
    assert "removed commits/train-00003.json, manifest.json" in repaired.output
    before = {p: p.stat().st_mtime_ns for p in (cache / "commits").iterdir()}
    raw = copy.deepcopy(cache_cfg)
    raw["outputs"].update(hidden_dtype="float16")
    build(raw, output=str(cache))
    after = {p: p.stat().st_mtime_ns for p in (cache / "commits").iterdir()}
    assert set(after) - set(before) == {cache / "commits" / "train-00003.json"}, "only the damaged shard reran"
    assert all(after[p] == t for p, t in before.items()), "the other commits were kept"
    assert runner.invoke(main, ["verify", str(cache)]).exit_code == 0
    assert_same_arrays(cache, reference)


def test_verify_refuses_paths_that_leave_the_cache(cache):
    path = cache / "commits" / "eval-00000.json"
    record = json.loads(path.read_text())
    record["files"]["labels"]["path"] = "../../etc/passwd"
    path.write_text(json.dumps(record))
    problem = "places the labels file at '../../etc/passwd', the layout at data.zarr/eval/labels/c/0/0"
    assert f"commits/eval-00000.json {problem}" in verify_cache(cache).problems
    with pytest.raises(DistilcacheError, match=r"commits/eval-00000.json differs from the manifest's shard table"):
        CacheReader(cache).read_rows("eval", 0, 4, ["labels"])


# ----------------------------------------------------------------------------- writers and readers


def test_a_second_writer_and_overwrite_are_refused_while_a_capture_runs(small_shards, tmp_path):
    reference = build(small_shards, output=str(tmp_path / "reference"))
    out = tmp_path / "cache"
    raw = dict(small_shards, store=dict(small_shards["store"], output=str(out)))
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"cache": raw}))
    slow = (  # every shard write takes 0.2 s longer: the capture runs for seconds
        "import time, cache_format.store as s; w = s.CacheStore.write_shard\n"
        "s.CacheStore.write_shard = lambda self, *a: (time.sleep(0.2), w(self, *a))[1]\n"
        "from pipeline.cli import main; main()\n"
    )
    cmd = [sys.executable, "-c", slow, "cache-teacher", "--config", str(config)]
    proc = subprocess.Popen(cmd, env=env(), stderr=subprocess.PIPE, text=True)
    while not (out / "locks" / "writer.json").exists() and proc.poll() is None:
        time.sleep(0.005)
    holder = f"writer pid {proc.pid} on"
    with pytest.raises(DistilcacheError, match=f"is being written by {holder}"):
        build(raw)
    with pytest.raises(DistilcacheError, match=f"is being written by {holder}"):
        run_cache(from_dict(CacheConfig, copy.deepcopy(raw)), overwrite=True)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()[-2000:]
    assert verify_cache(out).problems == []
    assert_same_arrays(out, reference)


def test_overwrite_is_refused_while_a_reader_holds_the_cache(cache, cache_cfg):
    reader = CacheReader(cache, lease=True)
    changed = copy.deepcopy(cache_cfg)
    changed["outputs"].update(k=8)
    changed["store"]["output"] = str(cache)
    with pytest.raises(DistilcacheError, match=r"--overwrite refused: .* is in use \(reader pid"):
        run_cache(from_dict(CacheConfig, copy.deepcopy(changed)), overwrite=True)
    assert CacheReader(cache).manifest is not None, "the cache is untouched"
    reader.close()
    run_cache(from_dict(CacheConfig, changed), overwrite=True)
    assert CacheReader(cache).settings.outputs.k == 8
