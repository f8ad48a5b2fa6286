"""Downstream: `pipeline finetune` on tiny tasks and models, size and speed, the model card, and
the uncertainty of ablation deltas."""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.config import from_dict, to_dict
from pipeline.errors import DistilcacheError
from student_train import speed
from student_train.ablations import uncertainty
from student_train.downstream.config import FinetuneConfig
from student_train.downstream.finetune import run_finetune
from tests.test_train import ROOT, env, train

pytestmark = pytest.mark.integration
GOOD = ["the object is returned and the value is valid", "return the new list of values", "a valid string"]
BAD = ["raise an error if the file is missing", "the exception is raised", "an error occurs on failure"]


def write_task(path: Path, n: int, label=lambda i: i % 2) -> Path:
    """A separable task: the text says which class it is (tab-separated: label, sentence)."""
    rows = ["label\tsentence"]
    for i in range(n):
        kind = label(i)
        words = (GOOD if kind in (1, "pos") or (isinstance(kind, float) and kind > 0.5) else BAD)[i % 3]
        rows.append(f"{kind}\t{words} number {i}")
    path.write_text("\n".join(rows) + "\n")
    return path


def cfg(tmp_path: Path, task: Path, models: dict, **recipe) -> FinetuneConfig:
    return from_dict(
        FinetuneConfig,
        {
            "output_dir": str(tmp_path / "ft"),
            "models": models,
            "task": {"paths": [str(task)], "validation_fraction": 0.25},
            "recipe": {"lr": 2e-3, "max_steps": 60, "batch_size": 16, "max_seq_len": 24, "seeds": [1], **recipe},
            "speed": {"batch_sizes": [1, 8], "repeats": 2, "warmup": 1},
        },
    )


def test_finetune_beats_the_majority_class_on_a_separable_task(assets, tmp_path):
    task = write_task(tmp_path / "t.tsv", 240)
    summary = run_finetune(cfg(tmp_path, task, {"teacher": str(assets.teacher)}, seeds=[1, 2]))
    labels = np.asarray(json.loads((tmp_path / "ft/runs/teacher/seed-1/result.json").read_text())["labels"])
    majority = max(np.mean(labels == 0), np.mean(labels == 1))
    acc = summary["metrics"]["teacher"]["accuracy"]
    assert acc["mean"] >= 0.95 > majority + 0.3, (acc, majority)
    assert len(acc["values"]) == 2 and acc["std"] == pytest.approx(np.std(acc["values"], ddof=1))
    for name in ("results.md", "results.csv", "results.json"):
        assert (tmp_path / "ft" / name).is_file()


def test_regression_reports_pearson_and_spearman(assets, tmp_path):
    from scipy.stats import pearsonr, spearmanr

    task = write_task(tmp_path / "r.tsv", 160, label=lambda i: round(0.1 + 0.8 * (i % 2) + 0.01 * (i % 7), 3))
    summary = run_finetune(cfg(tmp_path, task, {"teacher": str(assets.teacher)}))
    assert summary["task"]["type"] == "regression" and set(summary["metrics"]["teacher"]) == {"pearson", "spearman"}
    result = json.loads((tmp_path / "ft/runs/teacher/seed-1/result.json").read_text())
    p, y = np.asarray(result["predictions"]), np.asarray(result["labels"])
    assert result["metrics"]["pearson"] == pytest.approx(pearsonr(y, p).statistic)
    assert result["metrics"]["spearman"] == pytest.approx(spearmanr(y, p).statistic)
    assert result["metrics"]["pearson"] > 0.8
    # one seed: the spread is unknown, not zero
    assert summary["metrics"]["teacher"]["pearson"]["std"] is None
    row = next(x for x in (tmp_path / "ft/results.md").read_text().splitlines() if x.startswith("| teacher |"))
    assert "±" not in row and f"{result['metrics']['pearson']:.4f}" in row


def test_string_labels_map_and_round_trip(assets, tmp_path):
    task = write_task(tmp_path / "s.tsv", 120, label=lambda i: "pos" if i % 2 else "neg")
    summary = run_finetune(cfg(tmp_path, task, {"teacher": str(assets.teacher)}, save_models=True))
    assert summary["task"]["label_names"] == ["neg", "pos"]
    from transformers import AutoConfig

    saved = AutoConfig.from_pretrained(tmp_path / "ft/runs/teacher/seed-1/model")
    assert saved.id2label == {0: "neg", 1: "pos"} and saved.label2id == {"neg": 0, "pos": 1}
    result = json.loads((tmp_path / "ft/runs/teacher/seed-1/result.json").read_text())
    names = [summary["task"]["label_names"][i] for i in result["labels"]]
    predicted = [saved.id2label[int(i)] for i in result["predictions"]]
    assert set(names) == {"neg", "pos"} and set(predicted) <= {"neg", "pos"}
    assert np.mean([p == n for p, n in zip(predicted, names, strict=True)]) == result["metrics"]["accuracy"]


def test_a_killed_run_resumes_only_the_unfinished_pairs(assets, tmp_path):
    task = write_task(tmp_path / "t.tsv", 160)
    config = tmp_path / "ft.yaml"
    raw = cfg(tmp_path, task, {"a": str(assets.teacher), "b": str(assets.teacher)}, seeds=[1, 2], max_steps=80)
    doc = {"finetune": to_dict(raw)}
    config.write_text(yaml.safe_dump(doc))
    cmd = [sys.executable, "-m", "pipeline", "finetune", "--config", str(config)]
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = tmp_path / "ft/runs/a/seed-1/result.json"
    deadline = time.time() + 300
    while time.time() < deadline and not first.exists() and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "finished before the kill"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = {p: p.stat().st_mtime_ns for p in (tmp_path / "ft/runs").glob("*/seed-*/result.json")}
    assert 1 <= len(done_before) < 4
    rerun = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    done = {p: p.stat().st_mtime_ns for p in (tmp_path / "ft/runs").glob("*/seed-*/result.json")}
    assert len(done) == 4 and all(done[p] == t for p, t in done_before.items()), "finished pairs were redone"
    assert rerun.stderr.count("finished earlier; skipping") == len(done_before)


def test_a_model_with_another_tokenizer_is_refused(assets, tiny_cache, tmp_path):
    from tests.assets.make_tokenizer import train_tokenizer

    other = tmp_path / "other"
    from transformers import AutoModelForMaskedLM

    AutoModelForMaskedLM.from_pretrained(assets.teacher).save_pretrained(other)
    train_tokenizer(["a completely different vocabulary of words", "zebra quartz"] * 50).save_pretrained(other)
    task = write_task(tmp_path / "t.tsv", 40)
    config = cfg(tmp_path, task, {"teacher": str(assets.teacher), "other": str(other)})
    config.cache = str(tiny_cache)
    with pytest.raises(DistilcacheError, match=r"model other .* does not match the cache .*tokenizer hashes to"):
        run_finetune(config)
    result = CliRunner().invoke(main, ["evaluate", "--model", str(other), "--cache", str(tiny_cache), "--no-speed"])
    assert result.exit_code == 1 and "tokenizer hashes to" in result.output


def test_the_exported_students_card_is_hub_metadata_naming_the_cache(tiny_cache, tmp_path, monkeypatch):
    from huggingface_hub import ModelCard

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    summary = train(tiny_cache, tmp_path / "run", max_steps=2)
    card = ModelCard.load(Path(summary["export"]) / "README.md")
    fingerprint = json.loads((tiny_cache / "manifest.json").read_text())["fingerprint"]
    lineage = json.loads((Path(summary["export"]) / "distill.json").read_text())
    assert card.data.base_model == lineage["teacher"]["name"] and card.data.library_name == "transformers"
    assert card.data.to_dict()["distilcache"]["cache_fingerprint"] == fingerprint
    assert fingerprint in card.text and "masked_accuracy" in card.text
    assert lineage["tokens"] > 0 and lineage["cache_fingerprint"] == fingerprint


def test_size_and_speed_measure_both_models_on_the_same_batches(assets, tmp_path):
    from transformers import AutoTokenizer, BertForMaskedLM

    from tests.conftest import tiny_bert_config

    tokenizer = AutoTokenizer.from_pretrained(assets.teacher)
    small = BertForMaskedLM(tiny_bert_config(len(tokenizer), num_hidden_layers=1)).eval()
    big = BertForMaskedLM.from_pretrained(assets.teacher).eval()
    batches = speed.batches_from(GOOD + BAD, tokenizer, [1, 4], 16)
    seen = []
    for m in (small, big):
        m.register_forward_pre_hook(
            lambda mod, args, kwargs: seen.append((id(mod), kwargs["input_ids"].clone())), with_kwargs=True
        )
    timed = speed.time_models({"teacher": big, "student": small}, batches, repeats=2, warmup=1, threads=1, device="cpu")
    for bs, (ids, _) in batches.items():
        fed = [x for _, x in seen if x.shape[0] == bs]
        assert all(x.equal(ids) for x in fed) and len(fed) == 2 * 3, "every model ran the same batches, interleaved"
    sizes = {"teacher": speed.size_of(big, assets.teacher), "student": speed.size_of(small, None)}
    assert sizes["teacher"]["parameters"] == big.num_parameters()
    assert sizes["student"]["non_embedding_parameters"] == small.num_parameters(exclude_embeddings=True)
    assert sizes["teacher"]["bytes"] == (Path(assets.teacher) / "model.safetensors").stat().st_size
    report = {n: sizes[n] | timed[n] for n in sizes}
    ratio = speed.ratios(report, "teacher")["student"]
    assert ratio["parameters"] == pytest.approx(small.num_parameters() / big.num_parameters())
    assert ratio["tokens_per_s_b4"] == pytest.approx(
        timed["student"]["tokens_per_s_b4"] / timed["teacher"]["tokens_per_s_b4"]
    )


@pytest.mark.parametrize(
    "delta,se,paper,higher,expected",
    [
        (-0.05, 0.01, -2.96, True, "agrees"),
        (+0.05, 0.01, -2.96, True, "disagrees"),
        (-0.004, 0.01, -2.96, True, "not resolved (|Δ| < 2 SE)"),
        (+3.0, 1.0, -0.3, False, "agrees"),  # perplexity up = worse, as the paper's drop
        (-0.05, math.nan, -2.96, True, "not resolved (|Δ| < 2 SE)"),
    ],
)
def test_a_delta_is_compared_with_the_paper_only_when_resolved(delta, se, paper, higher, expected):
    assert uncertainty.verdict(delta, se, paper, higher) == expected


def test_paired_deltas_and_the_bootstrap():
    delta, se = uncertainty.paired_delta([0.50, 0.52, 0.49], [0.45, 0.46, 0.47])
    d = np.array([0.05, 0.06, 0.02])
    assert delta == pytest.approx(d.mean()) and se == pytest.approx(d.std(ddof=1) / np.sqrt(3))
    rng = np.random.default_rng(0)
    a, b = {"hit": (rng.random(4000) < 0.6).astype(float)}, {"hit": (rng.random(4000) < 0.5).astype(float)}
    delta, se = uncertainty.bootstrap_delta(uncertainty.TOKEN_METRICS["masked_accuracy"], a, b, 4000)
    assert delta == pytest.approx(a["hit"].mean() - b["hit"].mean())
    assert se == pytest.approx(np.sqrt(0.24 / 4000 + 0.25 / 4000), rel=0.15)  # two independent proportions


def test_ablate_with_two_seeds_reports_a_standard_error_per_delta(tiny_cache, tmp_path):
    grid = {
        "name": "two-seeds",
        "baseline": "full",
        "base": {"max_steps": 3},
        "variants": {"full": {}, "random-init": {"student.init": "random"}, "no-cos": {"loss.alpha_cos": 0.0}},
        "paper": {"source": "Sanh et al. 2019", "metric": "GLUE", "deltas": {"random-init": -3.69, "no-cos": -1.46}},
    }
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(grid))
    base = {
        "train": {
            "deepspeed_config": str(ROOT / "configs/deepspeed/zero2.json"),
            "eval_sequences": 8,
            "student": {"layers": 1},
            "data": {"micro_batch_size": 4, "mix_blocks": 2, "num_workers": 0},
        }
    }
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    cmd = [
        sys.executable,
        "-m",
        "pipeline",
        "ablate",
        "--grid",
        str(tmp_path / "grid.yaml"),
        "--cache",
        str(tiny_cache),
    ]
    cmd += ["--config", str(tmp_path / "base.yaml"), "--output", str(tmp_path / "out"), "--seeds", "2"]
    done = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((tmp_path / "out/results.json").read_text())["rows"]
    assert [r["seeds"] for r in rows] == [2, 2, 2]
    for r in rows[1:]:  # paired over the 2 seeds: a number for every metric (0 when both seeds agree)
        assert all(math.isfinite(r[f"se_{m}"]) and r[f"se_{m}"] >= 0 for m in ("masked_accuracy", "perplexity"))
    random_init = next(r for r in rows if r["variant"] == "random-init")
    assert random_init["se_perplexity"] > 0 and random_init["delta_perplexity"] != 0
    md = (tmp_path / "out/results.md").read_text()
    assert "(Δ ± SE)" in md and "paired over 2 student seeds" in md and "| verdict |" in md
    for name in ("random-init", "no-cos"):
        r = next(x for x in rows if x["variant"] == name)
        resolved = abs(r["delta_masked_accuracy"]) >= 2 * r["se_masked_accuracy"]
        line = next(x for x in md.splitlines() if x.startswith(f"| {name} | {grid['paper']['deltas'][name]:+.2f}"))
        assert ("not resolved" in line) == (not resolved)
        assert len(re.split(r"(?<!\\)\|", line)) == 6  # 4 cells: a verdict's |Δ| is escaped
