"""The structure holds the numbers: pinned first losses of a seeded tiny run and the quickstart's
figures (a refactor that changes numbers fails loudly), the hermetic fixture tokenizer, KD-mode
names from one table, reader options on every open of a remote cache, and worker errors as one
line."""

import copy
import hashlib
import os
import subprocess

import pytest
import yaml

from cache_format.kd_modes import KD_MODES
from pipeline.config import from_dict
from pipeline.errors import ConfigError
from student_train.config import LossConfig
from student_train.losses import KD_LOSSES
from tests.conftest import TOKENIZER, fixture_tokenizer
from tests.test_faults import build, cli, env, shard_file
from tests.test_train import ROOT, losses_of, raw_cfg, train

FIXTURE_TOKENIZER_SHA256 = "96a84bd6993afb50df5a26395ccda4b1d7121fa833c892f0717c68f420782bc0"
PINNED_LOSSES = [11.404290214180946, 11.443314854986966, 11.45771961659193, 11.53422373207286]
"""Measured on this machine (torch 2.13 CPU, 2 threads) with the committed fixture tokenizer."""


def test_the_fixture_tokenizer_is_the_committed_one():
    assert hashlib.sha256((TOKENIZER / "tokenizer.json").read_bytes()).hexdigest() == FIXTURE_TOKENIZER_SHA256
    assert len(fixture_tokenizer()) == 300


def test_kd_mode_names_come_from_the_one_table():
    assert set(KD_LOSSES) == set(KD_MODES), "every KD mode has its loss, and only those"
    for name in KD_MODES:
        assert from_dict(LossConfig, {"kd_mode": name}).kd_mode == name
    with pytest.raises(ConfigError, match="kd_mode: 'topk' is not one of 'exact', 'sampled'"):
        from_dict(LossConfig, {"kd_mode": "topk"})


@pytest.mark.integration
def test_first_losses_of_a_seeded_tiny_run_are_pinned(tiny_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    train(tiny_cache, tmp_path / "run", max_steps=4, **{"loss.exact_head_dtype": "float32"})
    assert losses_of(tmp_path / "run") == pytest.approx(PINNED_LOSSES, rel=1e-5)


QUICKSTART_PINS = {
    "ee648858da5247c778d7b6a16dca6655": [14.287064, 14.806609, 14.400736, 15.037645, 15.296643],
    "b7bddef2d203a320a60b4270ed4327ad": [14.288065, 14.808591, 14.400116, 15.036840, 15.297301],
}
"""The quickstart's cache fingerprint and its first training losses (configs/quickstart.yaml on the
2-core development and CI machines: the adapted teacher's weights, and so the fingerprint, depend on
the CPU's instruction set and the number of threads its training ran on: one row per machine kind
measured, the second an AMD EPYC); its held-out masked accuracy after 40 steps is 0.1667 on both."""


@pytest.mark.integration
def test_the_quickstart_numbers_are_pinned(tmp_path):
    """adapt-teacher, cache-teacher and train-student of configs/quickstart.yaml, as `make demo`
    runs them (in a temporary directory): the same cache fingerprint, losses and accuracy."""
    import json

    paths = [
        f"adapt.output_dir={tmp_path / 'teacher'}",
        f"adapt.cache_dir={tmp_path / 'home'}",
        f"cache.teacher.name={tmp_path / 'teacher'}",
        f"cache.store.output={tmp_path / 'cache'}",
        f"cache.store.cache_dir={tmp_path / 'home'}",
        f"train.cache={tmp_path / 'cache'}",
        f"train.output_dir={tmp_path / 'student'}",
    ]
    for command in ("adapt-teacher", "cache-teacher", "train-student"):
        section = {"adapt-teacher": "adapt", "cache-teacher": "cache", "train-student": "train"}[command]
        sets = [a for p in paths if p.startswith(f"{section}.") for a in ("--set", p.split(".", 1)[1])]
        done = subprocess.run(
            cli(command, "--config", str(ROOT / "configs/quickstart.yaml"), *sets),
            env={k: v for k, v in env().items() if k != "OMP_NUM_THREADS"},  # every core, as `make demo`
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=900,
        )
        assert done.returncode == 0, done.stderr[-3000:]
    fingerprint = json.loads((tmp_path / "cache" / "manifest.json").read_text())["fingerprint"]
    assert fingerprint in QUICKSTART_PINS, f"no pinned quickstart for fingerprint {fingerprint} on this machine"
    losses = losses_of(tmp_path / "student")
    assert losses[:5] == pytest.approx(QUICKSTART_PINS[fingerprint], rel=1e-5)
    summary = json.loads((tmp_path / "student" / "summary.json").read_text())
    assert round(summary["eval"]["student"]["masked_accuracy"], 4) == 0.1667


@pytest.mark.integration
def test_a_damaged_cache_read_through_workers_is_one_line(cache_cfg, tmp_path):
    raw = copy.deepcopy(cache_cfg)
    raw["outputs"].update(hidden_dtype="float16")
    cache = build(raw)
    for shard in range(10):  # every hidden shard of train has a flipped byte
        target = shard_file(cache, "train", shard, "hidden")
        blob = bytearray(target.read_bytes())
        blob[len(blob) // 3] ^= 0x10
        target.write_bytes(bytes(blob))
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"train": raw_cfg(cache, tmp_path / "run", **{"data.num_workers": 1})}))
    done = subprocess.run(cli("train-student", "--config", str(config)), env=env(), capture_output=True, text=True)
    assert done.returncode == 1
    lines = [x for x in done.stderr.splitlines() if x.strip()]
    assert "Traceback" not in done.stderr and "DataLoader worker" not in done.stderr, done.stderr[-2000:]
    assert lines[-1].startswith(f"error: {cache}: train shard ")
    assert "the hidden data is damaged (CRC32C mismatch)" in lines[-1]


@pytest.mark.integration
def test_a_remote_cache_s_options_reach_every_open(s3, cache_cfg, tmp_path, monkeypatch):
    """The cache is reached through storage options alone (no AWS variables): train-student,
    the ablate report and finetune --cache all open it with them."""
    import json

    from student_train.ablations.run import AblateOptions, run_ablate
    from student_train.downstream.config import FinetuneConfig
    from student_train.downstream.finetune import run_finetune
    from tests.test_finetune import write_task

    url = s3.bucket("dc-options") + "/cache"
    build(copy.deepcopy(cache_cfg), output=url)
    options = {
        "endpoint": s3.endpoint,
        "access_key_id": "testing",
        "secret_access_key": "testing",
        "region": "us-east-1",
        "allow_http": True,
    }
    for key in list(os.environ):
        if key.startswith("AWS_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    base = {k: v for k, v in raw_cfg(url, tmp_path / "x").items() if k != "output_dir"}
    base["data"] = {**base["data"], "storage_options": options, "local_cache_dir": str(tmp_path / "mirror")}
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({"name": "remote", "variants": {"base": {}}}))
    text = run_ablate(AblateOptions(str(grid), base, output=str(tmp_path / "sweep")))
    assert "| base |" in text and "Teacher time, paid once" in text
    student = tmp_path / "sweep" / "runs" / "base" / "final"
    task = write_task(tmp_path / "task.tsv", 40)
    cfg = from_dict(
        FinetuneConfig,
        {
            "output_dir": str(tmp_path / "ft"),
            "models": {"student": str(student)},
            "cache": url,
            "storage_options": options,
            "task": {"paths": [str(task)], "validation_fraction": 0.25},
            "recipe": {"max_steps": 2, "batch_size": 8, "max_seq_len": 16, "seeds": [1]},
            "speed": {"batch_sizes": [1], "repeats": 1, "warmup": 0},
        },
    )
    summary = run_finetune(cfg, measure=False)
    assert json.loads((tmp_path / "ft" / "results.json").read_text())["models"] == {"student": str(student)}
    assert summary["metrics"]["student"]


PINNED_INT8_LOSSES = [11.415443583391607, 11.508641284424812, 11.428030718583614, 11.45284313429147]
"""The default cache (int8 hidden states, exact KD from the cached head), fp32 head GEMM: the first
losses of a seeded tiny run, measured when the hidden states were still dequantised in the
DataLoader workers; dequantising them inside the step gave the same bits on that machine (test_codecs
holds the bit-for-bit decode on any CPU; another CPU kind moves these losses by ~1e-8)."""


@pytest.mark.integration
def test_first_losses_from_int8_hidden_states_are_pinned(cache_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    raw = copy.deepcopy(cache_cfg)
    del raw["outputs"]  # the defaults: int8 hidden states, no sparse logits
    cache = build(raw)
    for workers in (0, 1):
        out = tmp_path / f"run-{workers}"
        train(cache, out, max_steps=4, **{"loss.exact_head_dtype": "float32", "data.num_workers": workers})
        assert losses_of(out) == pytest.approx(PINNED_INT8_LOSSES, rel=1e-7), f"{workers} worker(s)"
    assert losses_of(tmp_path / "run-0") == losses_of(tmp_path / "run-1"), "workers or not, the same bits"
