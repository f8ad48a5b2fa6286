"""`pipeline ablate`: one cache, three variants, one command; kill and rerun; the teacher never runs."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from pipeline.errors import ConfigError
from student_train.ablations import grid as sweep
from student_train.runtime import LAUNCHER_VARS
from tests.test_train import ROOT

pytestmark = pytest.mark.integration

NO_TEACHER = """
import os
from transformers import BertForMaskedLM, BertModel

def _boom(*args, **kwargs):
    raise AssertionError("the teacher ran during a sweep")

BertModel.forward = _boom
BertForMaskedLM.forward = _boom
with open(os.environ["NO_TEACHER_LOG"], "a") as fh:
    fh.write(f"{os.getpid()}\\n")
"""

GRID = {
    "name": "tiny-table4",
    "baseline": "full",
    "base": {"max_steps": 3, "save_every": 1},
    "variants": {
        "full": {},
        "no-ce": {"loss.alpha_ce": 0.0},
        "random-init": {"student.init": "random"},
    },
    "paper": {"source": "Sanh et al. 2019", "metric": "GLUE", "deltas": {"no-ce": -2.96, "random-init": -3.69}},
}


@pytest.fixture
def setup(tiny_cache, tmp_path):
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(NO_TEACHER)
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(GRID, sort_keys=False))
    (tmp_path / "base.yaml").write_text(
        yaml.safe_dump(
            {
                "train": {
                    "deepspeed_config": str(ROOT / "configs/deepspeed/zero2.json"),
                    "eval_sequences": 8,
                    "student": {"layers": 1, "dropout": 0.0},
                    "data": {"micro_batch_size": 4, "mix_blocks": 2, "num_workers": 0},
                }
            }
        )
    )
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env |= {
        "PYTHONPATH": f"{tmp_path / 'site'}{os.pathsep}{ROOT}",
        "NO_TEACHER_LOG": str(tmp_path / "patched.log"),
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
    }
    cmd = [sys.executable, "-m", "pipeline", "ablate", "--grid", str(tmp_path / "grid.yaml")]
    cmd += ["--cache", str(tiny_cache), "--config", str(tmp_path / "base.yaml"), "--output", str(tmp_path / "out")]
    return cmd, env, tmp_path / "out"


def test_sweep_killed_then_rerun_finishes_the_rest_without_the_teacher(setup, tmp_path):
    cmd, env, out = setup
    first = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    done = out / "runs" / "full" / "summary.json"
    deadline = time.time() + 300
    while not done.is_file() and first.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert done.is_file(), first.stderr.read().decode()[-2000:] if first.poll() is not None else "timed out"
    time.sleep(4)  # let the second variant get going
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    had_checkpoint = (out / "runs" / "no-ce" / "checkpoints" / "latest").is_file()
    finished_at = done.stat().st_mtime_ns

    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert done.stat().st_mtime_ns == finished_at, "a finished variant was redone"
    assert "1 finished earlier, 2 to run" in result.stdout + result.stderr
    second_log = (out / "logs" / "no-ce.log").read_text()
    assert ("resumed from" in second_log) == had_checkpoint
    # every training process ran with the teacher's forward patched to raise
    assert len((tmp_path / "patched.log").read_text().split()) >= 3

    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["variant"] for r in rows] == list(GRID["variants"])
    assert float(rows[0]["delta_masked_accuracy"]) == 0.0
    for r in rows:
        summary = json.loads((out / "runs" / r["variant"] / "summary.json").read_text())
        assert summary["steps"] == 3
        assert float(r["masked_accuracy"]) == pytest.approx(summary["eval"]["student"]["masked_accuracy"])
    no_ce = json.loads((out / "runs" / "no-ce" / "summary.json").read_text())
    assert no_ce["config"]["loss"]["alpha_ce"] == 0.0 and no_ce["final"]["kd"] == 0.0
    md = (out / "results.md").read_text()
    assert "| no-ce |" in md and "| verdict |" in md and "teacher online" in md
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| variant"))
    table = lines[start : start + 2 + len(GRID["variants"]) + 1]  # header, rule, variants, teacher
    assert all(line.count("|") == table[0].count("|") for line in table), "a cell broke the table"
    png = (out / "results.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_grids_are_validated_before_any_run(tiny_cache, tmp_path):
    variants = {"a": {"loss.alpha_cee": 1.0}, "b": {"loss.kd_mode": "sampled", "loss.temperature": 1.0}}
    bad = {"name": "bad", "variants": variants}
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(bad))
    grid = sweep.load_grid(tmp_path / "grid.yaml")
    with pytest.raises(ConfigError) as err:
        sweep.resolve_variants(grid, {}, str(tiny_cache), tmp_path / "out")
    assert "variant a" in str(err.value) and "alpha_cee" in str(err.value)
    assert "variant b" in str(err.value) and "sampled the teacher at T=2.0" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_shipped_grids_load(tmp_path):
    names = sorted(p.stem for p in (ROOT / "configs/ablations").glob("*.yaml"))
    assert names == ["depth", "distilbert-table4", "kd-modes", "selection", "temperature"]
    for name in names:
        grid = sweep.load_grid(ROOT / "configs/ablations" / f"{name}.yaml")
        assert grid.baseline in grid.variants and len(grid.variants) >= 2
    table4 = sweep.load_grid(ROOT / "configs/ablations/distilbert-table4.yaml")
    assert table4.paper["deltas"] == {"no-ce": -2.96, "no-cos": -1.46, "no-mlm": -0.31, "random-init": -3.69}
    assert set(table4.paper["deltas"]) < set(table4.variants)
