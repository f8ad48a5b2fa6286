"""train-student --follow: a student trained while its cache is captured is, bit for bit, the one
trained after the capture with the same (windowed) order; and every way a followed capture can
go wrong stops the follower with one clear line.

A cache "while it is captured" is made exactly: a complete cache loses its manifest, shard table
and the commit records of shards >= keep (and, for keep = 0, its teacher files), which is the
state a capture killed after `keep` commits leaves; resuming the capture writes the same bytes.
"""

import copy
import json
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from cache_format.layout import SplitLayout
from cache_format.storage import open_storage
from cache_format.store import COMMITS, MANIFEST, TEACHER_DIR
from pipeline.config import from_dict
from student_train.data import block_order, plan_epoch
from teacher_cache.config import CacheConfig
from teacher_cache.run import run_cache
from tests.test_faults import cli, env
from tests.test_train import losses_of, raw_cfg, train

pytestmark = pytest.mark.integration

WINDOWED = {"data.order": "windowed", "data.window_shards": 2, "data.streams": 1, "data.mix_blocks": 1}
STEPS = 12  # epoch 0 reads view 0 (train shards 0-4), epoch 1 view 1 (shards 5-9)


# ----------------------------------------------------------------------------- the windowed order


def test_the_windowed_order_looks_at_most_one_window_ahead_and_is_seeded():
    layout = SplitLayout("train", sequences=200, views=2, block_rows=4, shard_rows=16)  # 4 blocks a shard
    blocks = np.arange(50)  # view 0: rows 0-199
    order = block_order(layout, blocks, seed=3, epoch=0, window_shards=2)
    assert sorted(order.tolist()) == list(range(50)), "every block once"
    windows = blocks[order] // 8
    assert (np.diff(windows) >= 0).all(), "windows in shard order: reading never skips ahead"
    assert not np.array_equal(order, np.sort(order)), "shuffled inside the windows"
    assert np.array_equal(order, block_order(layout, blocks, seed=3, epoch=0, window_shards=2))
    assert not np.array_equal(order, block_order(layout, blocks, seed=3, epoch=2, window_shards=2))
    one = plan_epoch(layout, 3, 0, streams=4, mix_blocks=2, global_batch=8, window_shards=2)
    again = plan_epoch(layout, 3, 0, 4, 2, 8, 2)
    assert all(
        np.array_equal(a, b) for s, t in zip(one.groups, again.groups, strict=True) for a, b in zip(s, t, strict=True)
    )
    # dealt to 4 streams in groups of 2, the k-th group of every stream is window k's: reading is
    # never more than one window (2 shards) ahead of the slowest stream
    for k in range(min(len(g) for g in one.groups)):
        assert {int(b) // 8 for s in range(4) for b in one.groups[s][k]} == {k}


# ----------------------------------------------------------------------------- helpers


@pytest.fixture
def follow_cfg(cache_cfg, tmp_path):
    raw = copy.deepcopy(cache_cfg)
    raw["outputs"] = {"logits": "none", "hidden_dtype": "int8"}
    raw["store"]["output"] = str(tmp_path / "cache")
    return raw


def build(raw: dict) -> str:
    """Capture (or resume, or reuse) the cache of `raw`; its location (a path or an s3:// URL)."""
    return run_cache(from_dict(CacheConfig, copy.deepcopy(raw)))


def train_after(cache: str, out: Path, **changes) -> None:
    """The reference: trained once the capture finished, one thread as the subprocesses run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(cache, out, max_steps=STEPS, **WINDOWED, **changes)
    finally:
        torch.set_num_threads(threads)


def partial(location: str, keep: int, teacher: bool = True) -> None:
    """The cache as a capture killed after committing train shards < keep leaves it."""
    storage = open_storage(location)
    for key in storage.list(COMMITS):
        split, _, shard = key.removeprefix(f"{COMMITS}/").removesuffix(".json").rpartition("-")
        if split != "train" or int(shard) >= keep:
            storage.delete(key)
    storage.delete(MANIFEST)
    storage.delete("shards.npy")
    if not teacher:
        for key in storage.list(TEACHER_DIR):
            storage.delete(key)


def train_config(tmp_path: Path, cache: str, name: str, **changes) -> Path:
    path = tmp_path / f"{name}.yaml"
    raw = raw_cfg(cache, tmp_path / name, max_steps=STEPS, **WINDOWED, **changes)
    path.write_text(yaml.safe_dump({"train": raw}))
    return path


class Follower:
    """`train-student --follow` in a subprocess, its stderr collected line by line."""

    def __init__(self, config: Path, *extra: str):
        self.proc = subprocess.Popen(
            cli("train-student", "--config", str(config), "--follow", *extra),
            env=env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        threading.Thread(target=lambda: self.lines.extend(self.proc.stderr), daemon=True).start()

    def wait_for(self, text: str, timeout: float = 300) -> None:
        deadline = time.time() + timeout
        while not any(text in line for line in self.lines):
            assert self.proc.poll() is None, "".join(self.lines)[-3000:]
            assert time.time() < deadline, f"no {text!r} in: " + "".join(self.lines)[-3000:]
            time.sleep(0.05)

    def finish(self, timeout: float = 600) -> int:
        code = self.proc.wait(timeout=timeout)
        time.sleep(0.1)  # the reader thread drains the pipe
        return code

    def error(self) -> str:
        lines = [line.strip() for line in self.lines if line.strip()]
        assert lines and lines[-1].startswith("error: "), "".join(self.lines)[-3000:]
        return lines[-1]


def same_student(run: Path, reference: Path) -> None:
    assert losses_of(run) == losses_of(reference), "every loss, exactly"
    weights = "final/model.safetensors"
    assert (run / weights).read_bytes() == (reference / weights).read_bytes(), "the same weights, bit for bit"


# ----------------------------------------------------------------------------- the same student


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_follower_started_on_a_bare_header_trains_the_student_of_the_finished_cache(
    follow_cfg, tmp_path, where, request
):
    if where == "s3":
        follow_cfg["store"]["output"] = request.getfixturevalue("s3").bucket("follow") + "/cache"
    cache = build(follow_cfg)
    direct = {"data.local_cache_gb": 0}  # read the bucket itself
    train_after(cache, tmp_path / "after", **direct)
    partial(cache, keep=0, teacher=False)  # the header only: what a capture has written at its start
    follower = Follower(train_config(tmp_path, cache, "followed", **direct))
    follower.wait_for("waiting")  # it started before anything it needs existed
    build(follow_cfg)  # the capture runs (resumes) while it follows
    assert follower.finish() == 0, "".join(follower.lines)[-3000:]
    same_student(tmp_path / "followed", tmp_path / "after")
    followed = json.loads((tmp_path / "followed" / "summary.json").read_text())["followed"]
    assert followed["committed_at_start"] == 0 and not followed["complete_at_start"]
    # 12 steps of 4 rows: view 0 (shards 0-4), then 8 rows of view 1, from its first window (shards 5, 6)
    assert followed["committed_at_end"] == 11, "the held-out shard, committed last, was read at the end"
    assert set(range(6)) <= set(followed["shards_read"]) <= set(range(7)), followed
    assert "Trained while the cache was captured" in (tmp_path / "followed" / "final" / "README.md").read_text()


def test_a_follower_of_two_capture_workers_trains_the_same_student(follow_cfg, tmp_path):
    cache = build(follow_cfg)
    train_after(cache, tmp_path / "after")
    partial(cache, keep=0)
    follower = Follower(train_config(tmp_path, cache, "followed"))
    follower.wait_for("waiting for train shard 00000")
    config = tmp_path / "capture.yaml"
    config.write_text(yaml.safe_dump({"cache": follow_cfg}))
    workers = [
        subprocess.Popen(
            cli("cache-teacher", "--config", str(config), "--worker", f"{i}/2"),
            env=env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    errors = [w.communicate(timeout=300)[1] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], "\n".join(e[-3000:] for e in errors)
    assert follower.finish() == 0, "".join(follower.lines)[-3000:]
    same_student(tmp_path / "followed", tmp_path / "after")


# ----------------------------------------------------------------------------- faults


def test_a_capture_that_dies_stops_the_follower_with_a_checkpoint_and_the_resume_is_the_same_student(
    follow_cfg, tmp_path
):
    cache = build(follow_cfg)
    train_after(cache, tmp_path / "after")
    partial(cache, keep=4)  # shards 0-3 committed; the capture is dead
    config = train_config(tmp_path, cache, "followed", **{"data.follow_timeout": 2.0})
    follower = Follower(config)
    assert follower.finish() == 1
    assert follower.error() == (
        f"error: {cache}: no shard committed for 2 s (4/11 committed, the last is train shard 00003; train shard "
        "00004 is not committed yet): the capture is not running; resume it (rerun cache-teacher), then this run "
        "with --resume; checkpoint step-0000008 saved"
    ), "8 steps from the first two windows (shards 0-3), then shard 4 is needed"
    build(follow_cfg)  # the capture resumed and finished
    resumed = Follower(config, "--resume")
    assert resumed.finish() == 0, "".join(resumed.lines)[-3000:]
    same_student(tmp_path / "followed", tmp_path / "after")


def test_a_killed_follower_resumed_with_follow_is_the_same_student(follow_cfg, tmp_path):
    cache = build(follow_cfg)
    train_after(cache, tmp_path / "after")
    partial(cache, keep=4)
    config = train_config(tmp_path, cache, "followed", save_every=2)
    follower = Follower(config)
    follower.wait_for("waiting for train shard 00004")  # checkpoints at 2, 4, 6 and 8 written
    follower.proc.send_signal(signal.SIGKILL)
    follower.finish()
    assert (tmp_path / "followed" / "checkpoints" / "latest").read_text().strip() == "step-0000008"
    resumed = Follower(config, "--resume")
    resumed.wait_for("resumed from")
    build(follow_cfg)
    assert resumed.finish() == 0, "".join(resumed.lines)[-3000:]
    same_student(tmp_path / "followed", tmp_path / "after")


def test_a_cache_replaced_while_followed_stops_the_follower(follow_cfg, tmp_path):
    cache = build(follow_cfg)
    partial(cache, keep=2)
    follower = Follower(train_config(tmp_path, cache, "followed"))
    follower.wait_for("waiting for train shard 0000")  # for shard 2 or 3 (window 1)
    open_storage(cache).delete_all()
    build(dict(follow_cfg, seed=7))  # another cache at the same place
    assert follower.finish() == 1
    line = follower.error()
    assert line.startswith(f"error: {cache} was replaced while this run followed it (fingerprint ")
    assert line.endswith("nothing of the new cache was read; start a new run on it")


def test_a_damaged_shard_is_refused_as_in_a_complete_cache(follow_cfg, tmp_path):
    from cache_format.reader import CacheReader

    cache = build(follow_cfg)
    record = next(r for r in CacheReader(cache).records() if (r["split"], r["shard"]) == ("train", 1))
    data = Path(cache) / record["files"]["hidden"]["path"]
    blob = bytearray(data.read_bytes())
    blob[100] ^= 0x01
    data.write_bytes(bytes(blob))
    complete = subprocess.run(
        cli("train-student", "--config", str(train_config(tmp_path, cache, "complete"))),
        env=env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert complete.returncode == 1
    refused = complete.stderr.strip().splitlines()[-1]
    partial(cache, keep=3)
    follower = Follower(train_config(tmp_path, cache, "followed"))
    assert follower.finish() == 1
    assert follower.error() == refused, "the same one line as for the complete cache"
    assert "train shard 00001: the hidden data is" in refused
