"""train-student with DeepSpeed on CPU: ZeRO-2/3 x 1/2 processes, resume, export, refusals."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.config import apply_mapping, from_dict
from pipeline.errors import ConfigError, DistilcacheError
from student_train.config import TrainConfig
from student_train.runtime import LAUNCHER_VARS
from student_train.trainer import Trainer, run_train
from tests.conftest import torchrun_cmd

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _cpu_deepspeed(monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    for key in LAUNCHER_VARS:
        monkeypatch.delenv(key, raising=False)


def raw_cfg(cache: Path, out: Path, **changes) -> dict:
    raw = {
        "cache": str(cache),
        "output_dir": str(out),
        "max_steps": 4,
        "log_every": 1,
        "deepspeed_config": str(ROOT / "configs/deepspeed/zero2.json"),
        "eval_sequences": 8,
        "student": {"layers": 1, "dropout": 0.0},
        "data": {"micro_batch_size": 4, "mix_blocks": 2, "num_workers": 0, "streams": 2},
    }
    return apply_mapping(raw, changes)


def losses_of(run_dir: Path) -> list[float]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in lines if "loss" in r]


def train(cache, out, **changes) -> dict:
    return run_train(from_dict(TrainConfig, raw_cfg(cache, out, **changes)))


def test_cached_mode_never_runs_the_teacher_and_exports_a_loadable_model(tiny_cache, tmp_path, monkeypatch):
    from transformers import AutoModelForMaskedLM, BertForMaskedLM, BertModel

    def boom(*args, **kwargs):
        raise AssertionError("the teacher ran in cached mode")

    monkeypatch.setattr(BertModel, "forward", boom)
    monkeypatch.setattr(BertForMaskedLM, "forward", boom)
    trainer = Trainer(from_dict(TrainConfig, raw_cfg(tiny_cache, tmp_path / "run", **{"student.layers": 2})))
    try:
        trainer.setup()
        summary = trainer.train()
        monkeypatch.undo()
        exported = AutoModelForMaskedLM.from_pretrained(summary["export"]).eval()
        ids = torch.randint(5, 250, (2, 16))
        trainer.engine.eval()
        with torch.no_grad():
            engine_logits = trainer.engine.module.student(input_ids=ids).logits
            torch.testing.assert_close(exported(input_ids=ids).logits, engine_logits, rtol=1e-5, atol=1e-5)
    finally:
        trainer.cleanup()
    assert type(exported).__name__ == "DistilBertForMaskedLM" and exported.config.n_layers == 2
    assert (Path(summary["export"]) / "tokenizer.json").is_file()
    assert summary["steps"] == 4 and set(summary["eval"]["student"]) >= {"masked_accuracy", "kl_teacher_student"}
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4] and "eval" in records[-1]


def test_truncated_topk_and_sampled_modes_train_from_the_cache_alone(tiny_cache, tmp_path, monkeypatch):
    """loss.topk, kd_mode=sampled and topk_sampled read only the cache; at the first step (same weights, same
    batch) coarser buckets give no larger a KL (k=4 <= k=16; the tiny teacher is near uniform, so
    both are ~0), and the sampled estimate of KL + T^2 H(teacher) carries the teacher's entropy
    (~ln 300 nats for the tiny near-uniform teacher)."""
    from transformers import BertForMaskedLM, BertModel

    def boom(*args, **kwargs):
        raise AssertionError("the teacher ran in cached mode")

    monkeypatch.setattr(BertModel, "forward", boom)
    monkeypatch.setattr(BertForMaskedLM, "forward", boom)
    first_kd = {}
    for name, changes in {
        "k16": {"loss.kd_mode": "topk_tail"},
        "k4": {"loss.kd_mode": "topk_tail", "loss.topk": 4},
        "sampled": {"loss.kd_mode": "sampled"},
        "hybrid": {"loss.kd_mode": "topk_sampled"},
    }.items():
        train(tiny_cache, tmp_path / name, max_steps=2, **changes)
        records = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        first_kd[name] = next(r["kd"] for r in records if "kd" in r)
    assert first_kd["k4"] != first_kd["k16"] and first_kd["k4"] <= first_kd["k16"] + 1e-6
    assert first_kd["sampled"] > 2.0**2 * 4.0
    assert first_kd["hybrid"] > 2.0**2 * 4.0  # the tail's entropy: the top-16 hold little of ~300 ids


def test_zero2_and_zero3_give_the_same_losses(tiny_cache, tmp_path):
    train(tiny_cache, tmp_path / "z2")
    train(tiny_cache, tmp_path / "z3", deepspeed_config=str(ROOT / "configs/deepspeed/zero3.json"))
    a, b = losses_of(tmp_path / "z2"), losses_of(tmp_path / "z3")
    assert len(a) == 4 and a[-1] != a[0]
    torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-5, atol=1e-6)


def env() -> dict:
    """A child environment without this process's launcher variables (its group still holds the port)."""
    base = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    return {**base, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}


def torchrun(config: Path, nproc: int, *extra: str, **kw) -> subprocess.CompletedProcess:
    cmd = torchrun_cmd(nproc, "train-student", "--config", str(config), *extra)
    return subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=600, **kw)


@pytest.mark.parametrize("zero", [2, 3])
def test_two_processes_give_the_same_losses_as_one(tiny_cache, tmp_path, zero):
    ds = str(ROOT / f"configs/deepspeed/zero{zero}.json")
    train(tiny_cache, tmp_path / "one", deepspeed_config=ds)
    config = tmp_path / "two.yaml"
    two = raw_cfg(tiny_cache, tmp_path / "two", deepspeed_config=ds, **{"data.micro_batch_size": 2})
    config.write_text(yaml.safe_dump({"train": two}))
    result = torchrun(config, 2)
    assert result.returncode == 0, result.stderr[-3000:]
    torch.testing.assert_close(
        torch.tensor(losses_of(tmp_path / "two")), torch.tensor(losses_of(tmp_path / "one")), rtol=1e-5, atol=1e-6
    )


def test_kill_9_then_resume_continues_exactly(tiny_cache, tmp_path):
    """Killed with SIGKILL in the middle of step 8 (checkpoints at 3 and 6): the resume continues
    from step 6 and every later loss equals an uninterrupted run's."""
    # dropout on: the per-rank RNG state must be restored too
    changes = {"max_steps": 10, "save_every": 3, "student.dropout": 0.1, "student.layers": 2}
    train(tiny_cache, tmp_path / "straight", **changes)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"train": raw_cfg(tiny_cache, tmp_path / "killed", **changes)}))
    killer = (
        "import os, signal, student_train.trainer as t; step = t.Trainer._loss_step\n"
        "def kill(self, batch):\n"
        "    if self.step == 7: os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return step(self, batch)\n"
        "t.Trainer._loss_step = kill\n"
        "from pipeline.cli import main; main()\n"
    )
    killed = subprocess.run(
        [sys.executable, "-c", killer, "train-student", "--config", str(config)],
        env=env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    ckpt = tmp_path / "killed" / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step-0000006"
    cmd = [sys.executable, "-m", "pipeline", "train-student", "--config", str(config)]
    resumed = subprocess.run([*cmd, "--resume"], env=env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {ckpt / 'step-0000006'}" in resumed.stderr
    straight, again = losses_of(tmp_path / "straight"), losses_of(tmp_path / "killed")
    assert len(again) == 10, "metrics.jsonl holds each step once after a resume"
    torch.testing.assert_close(torch.tensor(again), torch.tensor(straight), rtol=1e-6, atol=1e-7)


def test_online_teacher_equals_exact_mode_from_fp32_hidden_states(assets, tiny_cache, tmp_path):
    changes = {"loss.kd_mode": "exact", "loss.exact_head_dtype": "float32", "max_steps": 3}
    train(tiny_cache, tmp_path / "exact", **changes)
    run_train(from_dict(TrainConfig, raw_cfg(tiny_cache, tmp_path / "online", **changes)), online_teacher=True)
    torch.testing.assert_close(
        torch.tensor(losses_of(tmp_path / "online")), torch.tensor(losses_of(tmp_path / "exact")), rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize(
    "changes,match",
    [
        (
            {"loss.kd_mode": "topk_tail", "loss.temperature": 3.0},
            r"loss.temperature=3.0 is not cached \(cache has \[1.0, 2.0\]\)",
        ),
        ({"student.hidden_size": 16}, "student.init=teacher needs the teacher's width 32, the student has 16"),
        ({"data.split": "valid"}, r"data.split='valid' is not in the cache \(splits: train, eval\)"),
        ({"student.teacher": "/no/such/teacher"}, "teacher weights '/no/such/teacher' not found"),
        ({"loss.kd_mode": "topk_tail", "loss.topk": 17}, "loss.topk=17 exceeds the cached k=16"),
        (
            {"loss.kd_mode": "sampled", "loss.temperature": 1.0},
            r"loss.temperature=1.0 but the cache sampled the teacher at T=2.0; set loss.temperature=2.0",
        ),
        (
            {"loss.kd_mode": "topk_sampled", "loss.temperature": 1.0},
            r"loss.temperature=1.0 but the cache sampled the teacher at T=2.0; set loss.temperature=2.0",
        ),
        ({"loss.kd_mode": "topk_sampled", "loss.topk": 17}, "loss.topk=17 exceeds the cached k=16"),
    ],
    ids=["temperature", "width", "split", "teacher-weights", "topk", "sample-temperature", "hybrid-T", "hybrid-k"],
)
def test_mismatched_runs_are_refused(tiny_cache, tmp_path, changes, match):
    with pytest.raises(DistilcacheError, match=match):
        train(tiny_cache, tmp_path / "run", **changes)


def test_vocabulary_and_tokenizer_mismatches_are_refused(assets, tiny_cache, tmp_path):
    from transformers import BertConfig

    other = tmp_path / "other-config"
    BertConfig(
        vocab_size=500, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    ).save_pretrained(other)
    with pytest.raises(DistilcacheError, match="student vocabulary 500 != cache vocabulary 300"):
        train(tiny_cache, tmp_path / "run", **{"student.config": str(other), "student.init": "random"})
    damaged = tmp_path / "damaged"
    import shutil

    shutil.copytree(tiny_cache, damaged)
    tok = json.loads((damaged / "teacher" / "tokenizer.json").read_text())
    tok["model"]["vocab"]["zzzz"] = tok["model"]["vocab"].pop(
        next(iter(k for k in tok["model"]["vocab"] if k.isalpha()))
    )
    (damaged / "teacher" / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(DistilcacheError, match=r"teacher/tokenizer.json differs from the manifest.s record"):
        train(damaged, tmp_path / "run2")


def test_deepspeed_json_may_not_disagree_with_the_config(tiny_cache, tmp_path):
    ds = json.loads((ROOT / "configs/deepspeed/zero2.json").read_text())
    ds["train_micro_batch_size_per_gpu"] = 7
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    with pytest.raises(
        ConfigError, match="train_micro_batch_size_per_gpu is 7 in the DeepSpeed JSON but the config implies 4"
    ):
        train(tiny_cache, tmp_path / "run", deepspeed_config=str(path))


def test_evaluate_command_prints_student_beside_teacher(tiny_cache, tmp_path):
    from click.testing import CliRunner

    from pipeline.cli import main

    summary = train(tiny_cache, tmp_path / "run", max_steps=2)
    out = tmp_path / "eval.json"
    result = CliRunner().invoke(
        main,
        ["evaluate", "--model", summary["export"], "--cache", str(tiny_cache), "--sequences", "8", "--json", str(out)],
    )
    assert result.exit_code == 0, result.output
    assert "masked_accuracy" in result.stdout and "teacher" in result.stdout.splitlines()[0]
    data = json.loads(out.read_text())
    assert data["teacher"]["kl_teacher_student"] == 0.0 and 0 <= data["student"]["masked_accuracy"] <= 1
    # the exported model on the same 8 held-out rows gives the trainer's final evaluation
    assert data["rows"] == summary["eval"]["rows"] == 8
    for key, value in summary["eval"]["student"].items():
        assert data["student"][key] == pytest.approx(value, rel=1e-5), key
