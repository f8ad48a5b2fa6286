"""Fault injection, part two: bad values, interrupted and changed runs, one-line errors (see
test_faults.py for the cache itself)."""

import copy
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from cache_format.reader import CacheReader
from pipeline.cli import main
from pipeline.config import from_dict
from pipeline.errors import ConfigError, DistilcacheError
from student_train.config import TrainConfig
from student_train.trainer import run_train
from teacher_cache.config import CacheConfig
from teacher_cache.run import run_cache
from tests.test_faults import ROOT, build, cli, env, one_error, train_cfg

pytestmark = pytest.mark.integration


# ----------------------------------------------------------------------------- values


def test_nan_temperature_is_a_config_error(cache_cfg):
    raw = copy.deepcopy(cache_cfg)
    raw["outputs"]["temperatures"] = [1.0, float("nan")]
    with pytest.raises(ConfigError, match=r"outputs.temperatures\[1\]: nan is not a finite number"):
        from_dict(CacheConfig, raw, prefix="cache.")


def scaled_teacher(assets, tmp_path, scale: float) -> Path:
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    model = AutoModelForMaskedLM.from_pretrained(assets.teacher)
    with torch.no_grad():
        model.cls.predictions.bias.fill_(scale)  # every logit near `scale`
    path = tmp_path / "loud-teacher"
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(assets.teacher).save_pretrained(path)
    return path


def test_fp16_overflow_stops_the_capture_before_any_commit(assets, cache_cfg, tmp_path):
    raw = copy.deepcopy(cache_cfg)
    raw["teacher"]["name"] = str(scaled_teacher(assets, tmp_path, 7e4))
    with pytest.raises(
        DistilcacheError,
        match=r"topk_values overflow float16 .* at train sequence \d+; set outputs.logits_dtype=bfloat16",
    ):
        build(raw)
    assert not list((Path(raw["store"]["output"]) / "commits").glob("*.json"))
    raw["outputs"]["logits_dtype"] = "bfloat16"
    assert CacheReader(build(raw)).manifest is not None


def test_vocabulary_beyond_uint16_stores_exact_ids(assets, cache_cfg, tmp_path):
    """A model vocabulary of 70,000 with a 300-token tokenizer: ids are stored as int32 and the
    cached top-k ids equal a direct recomputation (uint16 would wrap them)."""
    from transformers import AutoTokenizer, BertForMaskedLM

    from tests.conftest import tiny_bert_config

    torch.manual_seed(0)
    model = BertForMaskedLM(tiny_bert_config(70_000)).eval()
    path = tmp_path / "wide-teacher"
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(assets.teacher).save_pretrained(path)
    raw = copy.deepcopy(cache_cfg)
    raw["teacher"]["name"] = str(path)
    reader = CacheReader(build(raw))
    assert reader.fields["topk_indices"].dtype == "int32" and reader.fields["input_ids"].dtype == "int32"
    data = reader.read_rows("train", 0, 4, ["input_ids", "lengths", "topk_indices"])
    ids = torch.from_numpy(data["input_ids"].astype(np.int64))
    valid = torch.arange(ids.shape[1])[None] < torch.from_numpy(data["lengths"])[:, None]
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=valid.long()).logits
    top = logits.topk(reader.settings.outputs.k, -1).indices
    assert (top.max() > 65_535).item(), "the test must exercise ids beyond uint16"
    assert torch.equal(torch.from_numpy(data["topk_indices"].astype(np.int64))[valid], top[valid])


def test_a_non_finite_loss_stops_training_naming_step_and_term(tiny_cache, tmp_path, monkeypatch):
    from student_train import losses

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    calls = {"n": 0}
    exact = losses.KD_LOSSES["exact"]

    def poisoned(*args):
        calls["n"] += 1
        out = exact(*args)
        return out * float("nan") if calls["n"] == 2 else out

    monkeypatch.setitem(losses.KD_LOSSES, "exact", poisoned)
    with pytest.raises(DistilcacheError, match="the kd loss is nan at step 2; nothing was saved from this step"):
        run_train(train_cfg(tiny_cache, tmp_path / "run"))
    assert not (tmp_path / "run" / "checkpoints").exists()


# ----------------------------------------------------------------------------- runs


def losses_of(run: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]


def test_kill_9_during_a_checkpoint_write_resumes_from_the_last_complete_one(tiny_cache, tmp_path, monkeypatch):
    """Killed after DeepSpeed wrote step 6's files but before the checkpoint was complete: the
    resume says so, continues from step 3, and the later losses equal an uninterrupted run's."""
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    changes = {"max_steps": 8, "save_every": 3, "student": {"layers": 2, "dropout": 0.1}}
    base = {
        "cache": str(tiny_cache),
        "eval_sequences": 4,
        "deepspeed_config": str(ROOT / "configs/deepspeed/zero2.json"),
        "data": {"micro_batch_size": 4, "mix_blocks": 2, "num_workers": 0},
        **changes,
    }
    run_train(from_dict(TrainConfig, {**base, "output_dir": str(tmp_path / "straight")}))
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"train": {**base, "output_dir": str(tmp_path / "killed")}}))
    killer = (
        "import os, signal, student_train.checkpoint as c; w = c.write_json_atomic\n"
        "def kill(path, obj, *a, **k):\n"
        "    if obj.get('step') == 6: os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return w(path, obj, *a, **k)\n"
        "c.write_json_atomic = kill\n"
        "from pipeline.cli import main; main()\n"
    )
    cmd = [sys.executable, "-c", killer, "train-student", "--config", str(config)]
    killed = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    ckpt = tmp_path / "killed" / "checkpoints"
    assert (ckpt / "step-0000006").is_dir() and not (ckpt / "step-0000006" / "complete.json").exists()
    with open(tmp_path / "killed" / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 7, "loss": ')  # a torn last line
    resumed = subprocess.run(
        cli("train-student", "--config", str(config), "--resume"),
        env=env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "checkpoint step-0000006 is incomplete (interrupted while written); resuming from" in resumed.stderr
    assert f"resumed from {ckpt / 'step-0000003'}" in resumed.stderr
    torch.testing.assert_close(
        torch.tensor(losses_of(tmp_path / "killed")),
        torch.tensor(losses_of(tmp_path / "straight")),
        rtol=1e-6,
        atol=1e-7,
    )


def test_resume_with_a_changed_data_key_is_refused_with_a_diff(tiny_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    cfg = train_cfg(tiny_cache, tmp_path / "run")
    run_train(cfg)
    cfg.data.micro_batch_size = 2
    cfg.log_every = 1  # cadence may change
    with pytest.raises(DistilcacheError, match=r"--resume: the config differs .*data.micro_batch_size: 4 -> 2"):
        run_train(cfg, resume=True)


def test_rng_state_loads_without_unpickling_code(tiny_cache, tmp_path, monkeypatch):
    """A planted pickle in place of an RNG file is refused (weights_only); the real one loads."""
    from student_train import checkpoint

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    run_train(train_cfg(tiny_cache, tmp_path / "run"))
    rng = tmp_path / "run" / "checkpoints" / "step-0000002" / "rng-rank0.pt"
    torch.load(rng, weights_only=True)

    class Payload:
        def __reduce__(self):
            return (os.system, ("touch planted",))

    torch.save({"python": Payload()}, rng)
    with pytest.raises(DistilcacheError, match="is not a plain RNG state"):
        checkpoint.load_rng(rng.parent, 0)
    assert not Path("planted").exists()


def test_adapt_teacher_refuses_a_foreign_directory(tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    (out / "results.csv").write_text("keep,me\n")
    result = CliRunner().invoke(
        main, ["adapt-teacher", "--set", f"output_dir={out}", "--set", "steps=1", "--set", f"cache_dir={tmp_path}"]
    )
    assert "holds files adapt-teacher did not write" in one_error(result)
    assert (out / "results.csv").read_text() == "keep,me\n"


# ----------------------------------------------------------------------------- one-line errors


@pytest.mark.parametrize(
    "argv,match",
    [
        (["cache-teacher", "--set", "seed=-1"], r"cache.seed: -1 must be in \[0, 2\^64\)"),
        (["cache-teacher", "--set", f"seed={2**64}"], r"cache.seed: 18446744073709551616 must be in \[0, 2\^64\)"),
        (["train-student", "--set", "cache=x", "--set", f"seed={2**32}"], r"train.seed: 4294967296 must be in"),
        (["inspect", "--sample", "0", "CACHE"], "--sample 0; sample at least 1 row"),
        (["evaluate", "--model", "MODEL", "--cache", "CACHE", "--sequences", "0"], "0 sequences to evaluate"),
        (["evaluate", "--model", "MODEL", "--cache", "CACHE", "--split", "valid"], "split 'valid' is not in the cache"),
        (["evaluate", "--model", "NOWHERE", "--cache", "CACHE"], "no model there"),
    ],
)
def test_bad_input_ends_in_one_error_line(tiny_cache, tmp_path, argv, match):
    from transformers import DistilBertConfig, DistilBertForMaskedLM

    model = tmp_path / "model"
    DistilBertForMaskedLM(
        DistilBertConfig(vocab_size=300, n_layers=1, dim=32, hidden_dim=64, n_heads=2)
    ).save_pretrained(model)
    subst = {"CACHE": str(tiny_cache), "MODEL": str(model), "NOWHERE": str(tmp_path / "nowhere")}
    argv = [subst.get(a, a) for a in argv]
    if argv[0] == "cache-teacher":
        argv += ["--set", "teacher.name=x", "--set", "corpus.paths=[x]"]
    import re

    assert re.search(match, one_error(CliRunner().invoke(main, argv)))


def test_store_output_that_is_a_file_and_a_bad_deepspeed_section(cache_cfg, tiny_cache, tmp_path):
    target = tmp_path / "a-file"
    target.write_text("x")
    raw = copy.deepcopy(cache_cfg)
    raw["store"]["output"] = str(target)
    with pytest.raises(DistilcacheError, match=r"store.output .*a-file is a file; give a directory"):
        run_cache(from_dict(CacheConfig, raw))
    ds = json.loads((ROOT / "configs/deepspeed/zero2.json").read_text())
    ds["optimizer"] = "AdamW"
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    cfg = train_cfg(tiny_cache, tmp_path / "run")
    cfg.deepspeed_config = str(tmp_path / "ds.json")
    with pytest.raises(ConfigError, match='section "optimizer" must be a JSON object'):
        run_train(cfg)


def test_disk_full_outside_shard_writes_is_one_error_line(cache_cfg, monkeypatch, tmp_path):
    import errno

    from cache_format import storage

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "cache" / "cache.json"))

    monkeypatch.setattr(storage, "write_bytes_atomic", full)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"cache": cache_cfg}))
    line = one_error(CliRunner().invoke(main, ["cache-teacher", "--config", str(config)]))
    assert line == (
        f"error: disk full writing {tmp_path / 'cache' / 'cache.json'}; free space and rerun the same command "
        "(finished work is kept)"
    )
