"""Trust, round two (cache side): bytes bound to their place, the files that make the targets,
manifests that cannot switch off their own checks, no name or symlink out of the cache, torn
metadata with a way out, a writer that lost its lock, resume after disk full. Each fault has its
exact outcome: exit code, the one-line message, and what is left on disk."""

import copy
import json
import os
import shutil
import signal
import socket
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
from pipeline.errors import DistilcacheError
from student_train.trainer import run_train
from tests.conftest import assert_same_arrays
from tests.test_faults import build, env, one_error, shard_file, train_cfg

pytestmark = pytest.mark.integration


@pytest.fixture
def cache(raw) -> Path:
    return build(raw)


def snapshot(root: Path) -> dict:
    """Every file under root with its bytes (what is left on disk)."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def invoke(*argv: str):
    return CliRunner().invoke(main, list(argv))


# ----------------------------------------------------------------------------- bytes bound to their place


def test_two_swapped_shard_files_of_one_size_are_refused_before_training(cache, tmp_path, monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    one, two = shard_file(cache, "train", 1, "hidden"), shard_file(cache, "train", 2, "hidden")
    assert one.stat().st_size == two.stat().st_size
    a, b = one.read_bytes(), two.read_bytes()
    one.write_bytes(b)
    two.write_bytes(a)
    reader = CacheReader(cache)  # sizes and every chunk's own CRC still check out
    with pytest.raises(DistilcacheError, match="train shard 00001: the hidden data is not the data committed there"):
        reader.read_rows("train", 8, 16, ["hidden"])
    with pytest.raises(DistilcacheError, match=r"train shard 0000[12]: the hidden data is not the data committed"):
        run_train(train_cfg(cache, tmp_path / "run"))
    assert not (tmp_path / "run" / "checkpoints").exists()
    problems = verify_cache(cache).problems
    assert problems == [
        "shard train-00001: hidden holds the bytes recorded for train shard 00002 (hidden) (swapped or copied: "
        "data.zarr/train/hidden/c/1/0/0)",
        "shard train-00002: hidden holds the bytes recorded for train shard 00001 (hidden) (swapped or copied: "
        "data.zarr/train/hidden/c/2/0/0)",
    ]


def test_a_shard_copied_in_from_another_cache_of_the_same_shape_is_refused(cache, raw, tmp_path):
    other = build(dict(raw, seed=57), output=str(tmp_path / "other"))
    target = shard_file(cache, "train", 3, "hidden")
    target.write_bytes(shard_file(other, "train", 3, "hidden").read_bytes())  # same size: raw float16
    reader = CacheReader(cache)
    with pytest.raises(DistilcacheError, match="train shard 00003: the hidden data is not the data committed there"):
        reader.read_rows("train", 24, 32, ["hidden"])
    assert verify_cache(cache).problems == [
        f"shard train-00003: hidden corrupt (checksum mismatch in {target.relative_to(cache).as_posix()})"
    ]


def test_a_commit_record_copied_in_from_another_cache_is_not_a_commit(cache, raw, tmp_path):
    other = build(dict(raw, seed=57), output=str(tmp_path / "other"))
    record = cache / "commits" / "train-00004.json"
    record.write_bytes((other / "commits" / "train-00004.json").read_bytes())
    assert (
        f"commits/train-00004.json belongs to another cache (fingerprint {CacheReader(other).settings.fingerprint[:12]}"
        in (verify_cache(cache).problems[0])
    )


# ----------------------------------------------------------------------------- the files that make the targets


def edit_head(cache: Path) -> None:
    from safetensors.torch import load_file, save_file

    path = cache / "teacher" / "mlm_head.safetensors"
    state = load_file(path)
    bias = next(k for k in state if k.endswith("bias"))
    state[bias] = state[bias] + 0.5  # a valid head, other targets
    save_file(state, path)


@pytest.mark.parametrize("edit", ["head", "tokenizer", "config", "added"])
def test_an_edited_teacher_file_is_refused_on_first_use(cache, raw, tmp_path, monkeypatch, edit):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    teacher = cache / "teacher"
    if edit == "head":
        edit_head(cache)
        key = "teacher/mlm_head.safetensors differs from the manifest's record"
    elif edit == "tokenizer":
        (teacher / "tokenizer_config.json").write_text((teacher / "tokenizer_config.json").read_text() + " ")
        key = "teacher/tokenizer_config.json differs from the manifest's record"
    elif edit == "config":
        doc = json.loads((teacher / "config.json").read_text())
        doc["layer_norm_eps"] = 1e-3
        (teacher / "config.json").write_text(json.dumps(doc))
        key = "teacher/config.json differs from the manifest's record"
    else:
        (teacher / "special_tokens_map.json").write_text('{"mask_token": "[PAD]"}')
        key = "teacher/special_tokens_map.json is not recorded in manifest.json"
    assert key in one_error(invoke("inspect", str(cache)))
    with pytest.raises(DistilcacheError, match=key.replace("'", ".")):
        run_train(train_cfg(cache, tmp_path / "run"))
    assert not (tmp_path / "run").exists(), "a refused run leaves no directory behind"
    report = verify_cache(cache)
    if edit == "added":  # a file cache-teacher did not write is never deleted: the user removes it
        assert report.unrepairable == ["teacher/special_tokens_map.json"]
        return
    assert report.problems and not report.unrepairable
    assert "repaired: removed manifest.json" in invoke("verify", "--repair", str(cache)).output
    build(raw)  # the rerun writes the teacher files again, then the manifest
    assert verify_cache(cache).problems == []


def test_token_counts_are_checked_before_use(cache):
    reader = CacheReader(cache)
    assert int(reader.token_counts().sum()) > 0
    path = cache / "data.zarr" / "token_counts" / "c" / "0"
    path.write_bytes(path.read_bytes()[:-1] + b"\0")
    with pytest.raises(DistilcacheError, match=r"data.zarr/token_counts/c/0 is missing or differs from the manifest"):
        CacheReader(cache).token_counts()


# ----------------------------------------------------------------------------- a manifest cannot switch off its checks


def test_a_manifest_without_its_metadata_record_is_refused(cache):
    manifest = json.loads((cache / "manifest.json").read_text())
    del manifest["metadata"]
    (cache / "manifest.json").write_text(json.dumps(manifest))
    meta = cache / "data.zarr" / "train" / "labels" / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["data_type"] = "uint32"  # would read the labels as other values
    meta.write_text(json.dumps(doc))
    expected = "manifest.json lacks `metadata`, which the format requires (edited or truncated)"
    assert expected in one_error(invoke("inspect", str(cache)))
    result = invoke("verify", str(cache))
    assert f"FAIL {expected}" in result.output and result.exit_code == 1


def test_an_unrecorded_zarr_json_is_refused(cache):
    manifest = json.loads((cache / "manifest.json").read_text())
    del manifest["metadata"]["data.zarr/train/hidden/zarr.json"]
    (cache / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DistilcacheError, match=r"data.zarr/train/hidden/zarr.json is not recorded in manifest.json"):
        CacheReader(cache)
    assert "data.zarr/train/hidden/zarr.json: not recorded in manifest.json" in verify_cache(cache).problems


# ----------------------------------------------------------------------------- no path out of the cache


def test_repair_never_deletes_outside_the_cache_whatever_a_record_names(cache, tmp_path):
    outside = cache.parent / "x-00000.json"  # where commits/../../x-00000.json would land
    outside.write_text("keep me")
    path = cache / "commits" / "train-00000.json"
    record = json.loads(path.read_text())
    record["split"] = "../../x"
    path.write_text(json.dumps(record))
    result = invoke("verify", "--repair", str(cache))
    assert result.exit_code == 0, result.output
    bad = "FAIL commits/train-00000.json names the split '../../x', which the cache does not have"
    assert bad in result.output
    assert "repaired: removed commits/train-00000.json, manifest.json" in result.output
    assert outside.read_text() == "keep me"


def test_a_symlink_out_of_the_cache_is_refused(cache, raw, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    shard_dir = cache / "data.zarr" / "train" / "hidden" / "c" / "3"
    shutil.copytree(shard_dir, elsewhere)
    shutil.rmtree(shard_dir)
    shard_dir.symlink_to(elsewhere, target_is_directory=True)
    expected = f"data.zarr/train/hidden/c/3 is a symlink to {elsewhere}, outside the cache"
    for argv in (["inspect", str(cache)], ["verify", str(cache)]):
        assert expected in one_error(invoke(*argv))
    (cache / "manifest.json").unlink()  # a resume would write through it: refused too
    with pytest.raises(DistilcacheError, match=expected):
        build(raw)
    assert (elsewhere / "0" / "0").is_file(), "nothing outside the cache was touched"


# ----------------------------------------------------------------------------- torn metadata has a way out


def tear(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def test_a_torn_commit_record_is_named_and_repaired(cache, raw, tmp_path):
    reference = tmp_path / "reference"
    shutil.copytree(cache, reference)
    tear(cache / "commits" / "train-00002.json")
    result = invoke("verify", str(cache))
    assert result.exit_code == 1
    assert "FAIL commits/train-00002.json is torn (not valid JSON)" in result.output
    repaired = invoke("verify", "--repair", str(cache))
    assert "repaired: removed commits/train-00002.json, manifest.json" in repaired.output
    build(raw)
    assert verify_cache(cache).problems == []
    assert_same_arrays(cache, reference)


def test_a_torn_manifest_is_rewritten_by_the_same_cache_teacher(cache, raw, tmp_path):
    tear(cache / "manifest.json")
    assert "FAIL manifest.json is torn (not valid JSON)" in invoke("verify", str(cache)).output
    commits = snapshot(cache / "commits")
    build(raw)  # no --overwrite, no repair: the same config rewrites it from the commit records
    assert verify_cache(cache).problems == []
    assert snapshot(cache / "commits") == commits, "no shard was recomputed"


def test_a_torn_header_is_restored_by_repair_or_rebuilt_by_overwrite(cache, raw, tmp_path):
    original = (cache / "cache.json").read_bytes()
    tear(cache / "cache.json")
    assert f"{cache}/cache.json is damaged (" in one_error(invoke("inspect", str(cache)))
    result = invoke("verify", str(cache))
    assert "FAIL cache.json is torn (not valid JSON); `--repair` restores it from manifest.json" in result.output
    repaired = invoke("verify", "--repair", str(cache))
    assert "repaired: restored cache.json from manifest.json" in repaired.output
    assert (cache / "cache.json").read_bytes() == original
    assert verify_cache(cache).problems == []
    tear(cache / "cache.json")
    other = dict(raw, seed=58)
    with pytest.raises(DistilcacheError, match=r"cache.json is torn .* pass --overwrite to rebuild the cache"):
        build(other)
    from pipeline.config import from_dict
    from teacher_cache.config import CacheConfig
    from teacher_cache.run import run_cache

    run_cache(from_dict(CacheConfig, copy.deepcopy(other)), overwrite=True)
    assert verify_cache(cache).problems == [] and CacheReader(cache).settings.seed == 58


# ----------------------------------------------------------------------------- a writer that lost its lock


def test_a_writer_paused_past_its_lock_expiry_stops_and_writes_nothing_more(raw, tmp_path):
    """Capture A is stopped (SIGSTOP) past its lease; capture B takes the cache with --overwrite and
    a new seed and finishes; when A resumes it exits 1 naming the lost lock, and B's cache is intact."""
    out = tmp_path / "cache"
    a = dict(raw, store=dict(raw["store"], output=str(out)))
    b = dict(a, seed=91)
    reference = build(b, output=str(tmp_path / "reference"))
    config = tmp_path / "a.yaml"
    config.write_text(yaml.safe_dump({"cache": a}))
    slow = (  # every shard write waits 0.3 s first: A is still capturing when it is stopped
        "import time, cache_format.store as s; w = s.CacheStore.write_shard\n"
        "s.CacheStore.write_shard = lambda self, *a, **k: (time.sleep(0.3), w(self, *a, **k))[1]\n"
        "from pipeline.cli import main; main()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", slow, "cache-teacher", "--config", str(config)],
        env={**env(), "DISTILCACHE_LEASE_TTL_S": "2"},
        stderr=subprocess.PIPE,
        text=True,
    )
    while not list((out / "commits").glob("*.json")) and proc.poll() is None:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGSTOP)
    time.sleep(2.5)  # past A's 2 s lease
    from pipeline.config import from_dict
    from teacher_cache.config import CacheConfig
    from teacher_cache.run import run_cache

    run_cache(from_dict(CacheConfig, copy.deepcopy(b)), overwrite=True)
    before = snapshot(out)
    os.kill(proc.pid, signal.SIGCONT)
    assert proc.wait(timeout=300) == 1
    lines = [x for x in proc.stderr.read().splitlines() if x.strip()]
    assert lines[-1].startswith(f"error: {out}: this capture lost its locks/writer.json (held now by nobody: the")
    assert "stopped without writing anything more" in lines[-1]
    assert snapshot(out) == before, "A wrote nothing after it woke up"
    assert verify_cache(out).problems == []
    assert_same_arrays(out, reference)


# ----------------------------------------------------------------------------- resume after disk full


def fail_at_shard(monkeypatch, n: int) -> None:
    import errno

    from cache_format.store import CacheStore

    original, calls = CacheStore.write_shard, {"n": 0}

    def failing(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(CacheStore, "write_shard", failing)


def pending_bytes(cache: Path) -> int:
    """Raw bytes of the shards left to capture (what the free-space check asks for them)."""
    from cache_format.storage import LocalStorage
    from cache_format.store import CacheStore

    store = CacheStore(LocalStorage(cache))
    row, layouts = sum(f.row_bytes for f in store.fields()), store.layouts()
    return sum(row * (layouts[s].shard_range(i)[1] - layouts[s].shard_range(i)[0]) for s, i in store.pending())


def test_resume_after_disk_full_checks_space_for_everything_before_writing(raw, monkeypatch, tmp_path):
    import shutil as sh
    from collections import namedtuple

    from pipeline.errors import CacheError

    fail_at_shard(monkeypatch, 4)
    with pytest.raises(CacheError, match="disk full while writing train shard 00003"):
        build(raw)
    monkeypatch.undo()
    cache = Path(raw["store"]["output"])
    need = pending_bytes(cache)
    usage = namedtuple("usage", "total used free")
    before = snapshot(cache)
    monkeypatch.setattr(sh, "disk_usage", lambda p: usage(10**9, 10**9 - need + 1, need - 1))
    with pytest.raises(CacheError, match=r"the rest of the cache needs up to .* but only .* is free"):
        build(raw)
    assert snapshot(cache) == before, "nothing was written before the check"
    head = cache / "teacher" / "mlm_head.safetensors"
    mtime = head.stat().st_mtime_ns
    monkeypatch.setattr(sh, "disk_usage", lambda p: usage(10**9, 10**9 - need, need))  # exactly the shards
    build(raw)
    assert head.stat().st_mtime_ns == mtime, "the intact head was not written again"
    assert verify_cache(cache).problems == []


def test_a_file_renamed_while_its_directory_is_listed_is_not_listed(tmp_path, monkeypatch):
    """Capture workers list `leases/` while another worker's atomic write renames its temp file:
    the listing leaves out what vanished instead of failing the worker (seen once in CI)."""
    import cache_format.storage as storage_module
    from cache_format.storage import LocalStorage

    storage = LocalStorage(tmp_path)
    storage.write_bytes("leases/train-00001.0.json", b"{}")
    storage.write_bytes("leases/.train-00007.0.json.123.partial", b"{}")
    real_scandir = os.scandir

    class Renamed:
        """os.scandir of a directory whose temp file is renamed away right after it was read."""

        def __init__(self, path):
            self.entries = list(real_scandir(path))
            (tmp_path / "leases" / ".train-00007.0.json.123.partial").rename(tmp_path / "leases" / "train-00007.0.json")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def __iter__(self):
            return iter(self.entries)

    monkeypatch.setattr(storage_module.os, "scandir", Renamed)
    assert storage.list("leases") == ["leases/train-00001.0.json"]


def test_a_joining_worker_leaves_a_live_workers_temp_files_and_removes_a_dead_ones(cache):
    """A capture resumed under the writer lock deletes a killed writer's `*.partial` files, but a
    worker joining while another captures must not take the other's half-written file for one
    (seen in CI: "No such file or directory: …/leases/.train-00007.0.json….partial")."""
    from cache_format.lock import PresenceLease, WriterLock
    from cache_format.storage import LocalStorage
    from teacher_cache.create import open_for_capture

    storage = LocalStorage(cache)
    (cache / "manifest.json").unlink()  # a capture under way
    header = json.loads((cache / "cache.json").read_text())
    temp = cache / "leases" / ".train-00007.0.json.4242.1.partial"

    def join() -> str:
        lock = WriterLock(storage).acquire()
        try:
            return open_for_capture(storage, header, overwrite=False, lock=lock)[1]
        finally:
            lock.release()

    storage.write_bytes("leases/" + temp.name, b"{}")
    worker = PresenceLease(storage, "worker")  # a live worker, writing that temp file
    assert join() == "resume" and temp.exists(), "a live worker's temp file is left alone"
    worker.close()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    record = {"kind": "worker", "host": socket.gethostname(), "pid": int(gone.stdout), "expires": time.time() + 60}
    storage.write_bytes("locks/worker-killed.json", json.dumps(record).encode())  # a killed worker's lease
    assert join() == "resume" and not temp.exists(), "a killed worker's temp file is removed"
    assert not (cache / "locks" / "worker-killed.json").exists(), "and its stale lease"
