"""Trust, round two (runs and inputs): one run per directory, a refused resume writes nothing, a
moved run resumes, Ctrl-C names the resume command, no process outlives a killed run, checkpoint
files are hash-checked before they are unpickled, sweeps touch only their own runs, adapt-teacher
deletes only its own files, and bad inputs (duplicate YAML keys, one-class tasks, a model from
another cache) get one line."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.config import from_dict, to_dict
from pipeline.errors import DistilcacheError
from student_train.config import TrainConfig
from student_train.trainer import run_train
from tests.test_faults import cli, env, one_error
from tests.test_train import ROOT, losses_of, raw_cfg, train
from tests.test_trust import snapshot

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _cpu(monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)


def long_run(tiny_cache, out: Path, config: Path, **changes) -> subprocess.Popen:
    """A train-student subprocess that runs for minutes (until killed)."""
    raw = raw_cfg(tiny_cache, out, max_steps=100_000, epochs=10_000.0, save_every=0, **changes)
    config.write_text(yaml.safe_dump({"train": raw}))
    return subprocess.Popen(
        cli("train-student", "--config", str(config)), env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not path.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert path.exists(), proc.stderr.read().decode()[-2000:] if proc.poll() is not None else "timed out"


def test_a_second_run_on_one_output_dir_is_refused_naming_the_first(tiny_cache, tmp_path):
    out = tmp_path / "run"
    first = long_run(tiny_cache, out, tmp_path / "a.yaml")
    try:
        wait_for(out / "metrics.jsonl", first)
        config = tmp_path / "b.yaml"
        config.write_text(yaml.safe_dump({"train": raw_cfg(tiny_cache, out)}))
        line = one_error(CliRunner().invoke(main, ["train-student", "--config", str(config), "--overwrite"]))
        assert line.startswith(
            f"error: output_dir {out} is in use: {out} is being written by train-student pid {first.pid} on "
        )
        assert first.poll() is None, "the first run goes on"
    finally:
        first.kill()
        first.wait()


def test_a_refused_resume_writes_nothing(tiny_cache, tmp_path):
    train(tiny_cache, tmp_path / "run", save_every=2)
    before = snapshot(tmp_path / "run")
    cfg = from_dict(TrainConfig, raw_cfg(tiny_cache, tmp_path / "run", save_every=2, **{"data.micro_batch_size": 2}))
    with pytest.raises(DistilcacheError, match=r"--resume: the config differs .*data.micro_batch_size: 4 -> 2"):
        run_train(cfg, resume=True)
    assert snapshot(tmp_path / "run") == before


def interrupted(tiny_cache, out: Path, monkeypatch, at: int, **changes) -> None:
    """A run stopped by Ctrl-C during step `at` (its checkpoints before it are kept)."""
    from student_train import trainer

    step = trainer.Trainer._loss_step

    def ctrl_c(self, batch):
        if self.step == at - 1:
            raise KeyboardInterrupt
        return step(self, batch)

    monkeypatch.setattr(trainer.Trainer, "_loss_step", ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_cache, out, **changes)
    monkeypatch.setattr(trainer.Trainer, "_loss_step", step)


def test_a_moved_run_directory_resumes_exactly(tiny_cache, tmp_path, monkeypatch):
    changes = {"max_steps": 6, "save_every": 2, "student.dropout": 0.1}
    train(tiny_cache, tmp_path / "straight", **changes)
    interrupted(tiny_cache, tmp_path / "first", monkeypatch, at=4, **changes)
    shutil.move(tmp_path / "first", tmp_path / "moved")
    cfg = from_dict(TrainConfig, raw_cfg(tiny_cache, tmp_path / "moved", **changes))
    run_train(cfg, resume=True)
    torch.testing.assert_close(
        torch.tensor(losses_of(tmp_path / "moved")),
        torch.tensor(losses_of(tmp_path / "straight")),
        rtol=1e-6,
        atol=1e-7,
    )


def test_ctrl_c_names_the_command_that_resumes(tiny_cache, tmp_path, monkeypatch):
    from student_train import trainer

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"train": raw_cfg(tiny_cache, tmp_path / "run", save_every=1)}))
    argv = ["train-student", "--config", str(config), "--overwrite"]
    monkeypatch.setattr(sys, "argv", ["pipeline", *argv])
    step = trainer.Trainer._loss_step
    monkeypatch.setattr(
        trainer.Trainer,
        "_loss_step",
        lambda self, b: (_ for _ in ()).throw(KeyboardInterrupt) if self.step else step(self, b),
    )
    result = CliRunner().invoke(main, argv)
    assert result.exit_code == 130
    assert result.output.strip().splitlines()[-1] == (
        f"interrupted; its checkpoints are kept: resume with `pipeline train-student --config {config} --resume`"
    )
    monkeypatch.setattr(trainer.Trainer, "_loss_step", step)
    assert CliRunner().invoke(main, ["train-student", "--config", str(config), "--resume"]).exit_code == 0


def _marked(mark: str) -> list[int]:
    """PIDs of live processes whose environment carries `mark`."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if mark.encode() in Path(f"/proc/{pid}/environ").read_bytes():
                found.append(int(pid))
        except OSError:
            continue
    return found


def test_no_process_outlives_a_killed_run(tiny_cache, tmp_path):
    mark = f"DISTILCACHE_TEST_MARK={os.getpid()}-{time.time_ns()}"
    raw = raw_cfg(tiny_cache, tmp_path / "run", max_steps=100_000, epochs=10_000.0, **{"data.num_workers": 2})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"train": raw}))
    key, value = mark.split("=")
    proc = subprocess.Popen(
        cli("train-student", "--config", str(tmp_path / "c.yaml")),
        env={**env(), key: value},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for(tmp_path / "run" / "metrics.jsonl", proc)
    assert len(_marked(mark)) >= 4, "the trainer, the fork server and two workers run"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 20
    while _marked(mark) and time.time() < deadline:
        time.sleep(0.2)
    assert _marked(mark) == []


@pytest.mark.parametrize("tamper", ["planted", "edited", "added"])
def test_a_tampered_checkpoint_is_refused_before_anything_unpickles_it(tiny_cache, tmp_path, tamper):
    train(tiny_cache, tmp_path / "run", save_every=2)
    step = tmp_path / "run" / "checkpoints" / "step-0000004"
    target = step / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    if tamper == "planted":

        class Payload:
            def __reduce__(self):
                return (os.system, (f"touch {tmp_path / 'planted'}",))

        torch.save({"optimizer_state_dict": Payload()}, target)
        match = f"--resume: {target} differs from the hash recorded when it was saved"
    elif tamper == "edited":
        target.write_bytes(target.read_bytes() + b"\0")
        match = f"--resume: {target} differs from the hash recorded when it was saved"
    else:
        torch.save({}, step / "extra.pt")
        match = f"--resume: {step / 'extra.pt'} was not written with this checkpoint"
    with pytest.raises(DistilcacheError, match=match):
        run_train(from_dict(TrainConfig, raw_cfg(tiny_cache, tmp_path / "run", save_every=2)), resume=True)
    assert not (tmp_path / "planted").exists()


def test_an_untampered_checkpoint_loads_with_weights_only(tiny_cache, tmp_path, monkeypatch):
    """Every file DeepSpeed reads back on resume loads with weights_only=True (no full unpickle)."""
    calls = []
    original = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return original(*args, **kwargs)

    train(tiny_cache, tmp_path / "run", max_steps=4, save_every=2)
    monkeypatch.setattr(torch, "load", spy)
    from student_train import checkpoint

    path, record = checkpoint.resumable(tmp_path / "run" / "checkpoints")
    checkpoint.check_files(path, record)
    import student_train.trainer as t

    trainer = t.Trainer(from_dict(TrainConfig, raw_cfg(tiny_cache, tmp_path / "run", max_steps=4, save_every=2)))
    trainer.resume = True
    trainer.setup()
    trainer.cleanup()
    assert calls and all(calls), f"weights_only flags of DeepSpeed's loads: {calls}"


def test_ablate_never_touches_a_run_directory_it_did_not_start(tiny_cache, tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({"name": "g", "variants": {"base": {}}}))
    out = tmp_path / "sweep"
    train(tiny_cache, out / "runs" / "base")  # someone else's run where the variant would go
    before = snapshot(out / "runs" / "base")
    base = tmp_path / "c.yaml"
    base.write_text(
        yaml.safe_dump({"train": {k: v for k, v in raw_cfg(tiny_cache, tmp_path / "x").items() if k != "output_dir"}})
    )
    line = one_error(
        CliRunner().invoke(main, ["ablate", "--grid", str(grid), "--config", str(base), "--output", str(out)])
    )
    assert line == (
        f"error: {out / 'runs' / 'base'} holds a run that this sweep did not start (no ablate.json); move it away "
        "or choose another --output"
    )
    assert snapshot(out / "runs" / "base") == before


# ----------------------------------------------------------------------------- adapt-teacher


def adapt_args(tmp_path: Path, assets, out: Path, steps: int) -> list[str]:
    from tests.test_adapt import adapt_cfg

    cfg = adapt_cfg(assets.teacher, assets, tmp_path, steps=steps, output_dir=str(out), eval_sequences=4)
    config = tmp_path / "adapt.yaml"
    config.write_text(yaml.safe_dump({"adapt": to_dict(cfg)}))
    return ["adapt-teacher", "--config", str(config)]


def test_adapt_overwrite_refuses_a_foreign_directory(assets, tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    (out / "results.csv").write_text("keep,me\n")
    line = one_error(CliRunner().invoke(main, [*adapt_args(tmp_path, assets, out, 2), "--overwrite"]))
    assert line == (
        f"error: adapt.output_dir {out} holds files adapt-teacher did not write (results.csv); choose an empty or "
        "new output_dir (adapt-teacher never deletes files it did not write, --overwrite included)"
    )
    assert snapshot(out) == {"results.csv": b"keep,me\n"}


def test_re_adapting_keeps_the_files_a_user_put_beside_the_teacher(assets, tmp_path):
    out = tmp_path / "teacher"
    assert CliRunner().invoke(main, adapt_args(tmp_path, assets, out, 2)).exit_code == 0
    (out / "notes.md").write_text("mine")
    weights = (out / "model.safetensors").read_bytes()
    result = CliRunner().invoke(main, adapt_args(tmp_path, assets, out, 3))
    assert result.exit_code == 0, result.output
    assert (out / "notes.md").read_text() == "mine"
    assert (out / "model.safetensors").read_bytes() != weights, "re-adapted"
    record = json.loads((out / "adapt.json").read_text())
    assert "notes.md" not in record["files"] and "model.safetensors" in record["files"] and "state" not in record


# ----------------------------------------------------------------------------- inputs


def test_a_duplicate_yaml_key_names_the_key_and_its_line(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("train:\n  cache: x\n  optim:\n    lr: 1e-3\n    warmup_fraction: 0.1\n    lr: 2e-3\n")
    line = one_error(CliRunner().invoke(main, ["train-student", "--config", str(config), "--print-config"]))
    assert line == f"error: config file {config}: duplicate key 'lr' at line 6 (first at line 4); keep one of them"
    grid = tmp_path / "g.yaml"
    grid.write_text("variants:\n  a: {}\n  a: {loss.alpha_ce: 0}\n")
    line = one_error(CliRunner().invoke(main, ["ablate", "--grid", str(grid), "--cache", "x"]))
    assert line == f"error: grid file {grid}: duplicate key 'a' at line 3 (first at line 2); keep one of them"


@pytest.mark.parametrize("which", ["training", "validation"])
def test_a_task_with_one_class_is_refused(tmp_path, which):
    from student_train.downstream.config import TaskConfig
    from student_train.downstream.tasks import load_task

    train_file, valid = tmp_path / "train.tsv", tmp_path / "valid.tsv"
    rows = lambda labels: "label\tsentence\n" + "".join(f"{y}\tsentence {i}\n" for i, y in enumerate(labels))  # noqa: E731
    train_file.write_text(rows([1] * 20 if which == "training" else [0, 1] * 10))
    valid.write_text(rows([1] * 6 if which == "validation" else [0, 1] * 3))
    task = from_dict(TaskConfig, {"paths": [str(train_file)], "validation_paths": [str(valid)]})
    with pytest.raises(DistilcacheError, match=f"task: the {which} examples hold 1 class \\('1' only\\)"):
        load_task(task)


def test_evaluate_warns_when_the_model_came_from_another_cache(assets, tiny_cache, cache_cfg, tmp_path):
    from pipeline.config import from_dict as build_cfg
    from teacher_cache.config import CacheConfig
    from teacher_cache.run import run_cache

    other = Path(run_cache(build_cfg(CacheConfig, dict(cache_cfg, seed=3))))
    summary = train(tiny_cache, tmp_path / "run", max_steps=2)
    result = subprocess.run(
        cli("evaluate", "--model", summary["export"], "--cache", str(other), "--no-speed", "--sequences", "4"),
        env=env(),
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"warning: --model {summary['export']} was distilled from the cache with fingerprint" in result.stderr
