"""`pipeline select`: sequences scored from the cached teacher signals, kept as a fingerprinted
selection beside the cache, and runs that read only those rows (`data.selection`)."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cache_format.reader import CacheReader
from cache_format.selection import load_selection, read_arrays, read_record, record_digest, record_key
from cache_format.settings import IGNORE_INDEX
from cache_format.verify import verify_cache
from pipeline.cli import main
from pipeline.config import from_dict
from pipeline.errors import CacheError, ConfigError, DistilcacheError
from student_train.config import TrainConfig
from student_train.data import CacheBatches, FieldSelection
from student_train.selection.config import SelectConfig
from student_train.selection.run import run_select
from student_train.selection.scores import keep_sequences, per_sequence
from tests.test_train import losses_of, raw_cfg, train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def cache(tiny_cache, tmp_path) -> Path:
    """A private copy of the session's tiny cache (selections are written beside it)."""
    return Path(shutil.copytree(tiny_cache, tmp_path / "cache"))


def select(cache: Path, overwrite: bool = False, **keys) -> dict:
    return run_select(from_dict(SelectConfig, {"cache": str(cache), **keys}), overwrite=overwrite)


def stored(cache: Path, name: str) -> tuple[dict, dict]:
    reader = CacheReader(cache)
    record = read_record(reader.storage, name)
    return record, read_arrays(reader.storage, record, name)


def test_keep_sequences_ranks_breaks_ties_by_index_and_puts_unscored_last():
    score = np.array([0.5, np.nan, 0.9, 0.5, 0.1])
    seqs = np.array([10, 11, 12, 13, 14])
    assert keep_sequences(score, seqs, 0.5, True).tolist() == [True, False, True, True, False]  # ceil(2.5) = 3
    assert keep_sequences(score, seqs, 0.4, True).tolist() == [True, False, True, False, False]  # tie: 10 before 13
    assert keep_sequences(score, seqs, 0.4, False).tolist() == [True, False, False, False, True]
    assert keep_sequences(score, seqs, 1.0, False).all(), "every sequence, the unscored one too"


def test_per_sequence_means_over_every_view_of_a_sequence():
    seq = np.array([7, 3, 7, 3, 9])  # two views of 7 and 3, one of 9
    sums, counts = np.array([2.0, 1.0, 4.0, 5.0, 0.0]), np.array([1.0, 1.0, 3.0, 1.0, 0.0])
    sequences, score, where = per_sequence(seq, sums, counts)
    assert sequences.tolist() == [3, 7, 9] and where.tolist() == [1, 0, 1, 0, 2]
    assert score[:2].tolist() == [3.0, 1.5] and math.isnan(score[2])


def _teacher_per_sequence(cache: Path, teacher_dir: Path, layers: int | None = None) -> dict[int, float]:
    """The teacher's (or its first `layers` layers') masked-token log-likelihood per sequence, recomputed
    by running the model on the cached rows: the reference the cached scores must equal."""
    from transformers import AutoModelForMaskedLM

    kwargs = {"num_hidden_layers": layers} if layers else {}
    model = AutoModelForMaskedLM.from_pretrained(teacher_dir, **kwargs).eval()
    reader = CacheReader(cache)
    rows = reader.read_rows(
        "train", 0, reader.layouts["train"].rows, ["input_ids", "labels", "lengths", "sequence_index"]
    )
    ids = torch.from_numpy(rows["input_ids"].astype(np.int64))
    labels = torch.from_numpy(rows["labels"].astype(np.int64))
    valid = torch.arange(ids.shape[1])[None] < torch.from_numpy(rows["lengths"])[:, None]
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=valid.long()).logits
    log_p = torch.log_softmax(logits, -1).gather(-1, labels.clamp_min(0)[..., None])[..., 0]
    masked = labels != IGNORE_INDEX
    total: dict[int, list[float]] = {}
    for i, s in enumerate(rows["sequence_index"].tolist()):
        total.setdefault(s, []).extend(log_p[i][masked[i]].tolist())
    return {s: float(np.mean(v)) for s, v in total.items()}


def test_teacher_loss_and_miniplm_scores_equal_a_direct_teacher_recomputation(cache, assets):
    record = select(cache, score="teacher_loss", fraction=0.5)
    assert (record["sequences"], record["kept_sequences"], record["rows"], record["kept_rows"]) == (64, 32, 128, 64)
    _, arrays = stored(cache, "teacher_loss-50")
    full = _teacher_per_sequence(cache, assets.teacher)
    want = np.array([-full[s] for s in arrays["sequence_index"].tolist()])
    np.testing.assert_allclose(arrays["score"], want, rtol=1e-5, atol=1e-5)
    assert arrays["kept"].astype(bool).tolist() == keep_sequences(want, arrays["sequence_index"], 0.5, True).tolist()

    select(cache, score="miniplm", reference="teacher:1", fraction=0.25, name="mini")
    _, arrays = stored(cache, "mini")
    first = _teacher_per_sequence(cache, assets.teacher, layers=1)
    want = np.array([full[s] - first[s] for s in arrays["sequence_index"].tolist()])
    np.testing.assert_allclose(arrays["score"], want, rtol=1e-4, atol=1e-5)
    assert arrays["kept"].sum() == 16


def test_a_selection_is_deterministic_reused_when_identical_and_refused_when_its_name_is_taken(cache, tmp_path):
    first = select(cache, score="entropy", fraction=0.5)
    data = cache / first["data"]["path"]
    blob, mtime = data.read_bytes(), (cache / record_key("entropy-50")).stat().st_mtime_ns
    assert select(cache, score="entropy", fraction=0.5)["record_sha256"] == first["record_sha256"]
    assert (cache / record_key("entropy-50")).stat().st_mtime_ns == mtime, "reused, not rewritten"
    with pytest.raises(DistilcacheError, match=r"selection 'entropy-50' exists beside .* with another config or cache"):
        select(cache, score="entropy", fraction=0.25, name="entropy-50")
    again = select(cache, score="entropy", fraction=0.5, overwrite=True)
    assert again["data"] == first["data"] and data.read_bytes() == blob, "the same bytes on a rerun"
    replaced = select(cache, score="entropy", fraction=0.25, name="entropy-50", overwrite=True)
    assert not data.exists() and (cache / replaced["data"]["path"]).is_file(), "the replaced data file is removed"
    assert sorted(p.name for p in (cache / "selections").iterdir()) == sorted(
        ["entropy-50.json", Path(replaced["data"]["path"]).name]
    )


def test_a_selection_written_before_an_identity_key_existed_is_reused_by_the_same_command(cache, monkeypatch):
    import student_train.selection.run as select_run

    # a selection written by the version before `token_scores` (its identity has no such key)
    monkeypatch.setattr(select_run, "IDENTITY_KEYS", tuple(k for k in select_run.IDENTITY_KEYS if k != "token_scores"))
    first = select(cache, score="random", fraction=0.5)
    assert "token_scores" not in first["config"]["identity"]
    monkeypatch.undo()
    mtime = (cache / record_key("random-50")).stat().st_mtime_ns
    assert select(cache, score="random", fraction=0.5)["record_sha256"] == first["record_sha256"]
    assert (cache / record_key("random-50")).stat().st_mtime_ns == mtime, "reused, not rewritten"
    with pytest.raises(DistilcacheError, match=r"selection 'random-50' exists beside .* with another config or cache"):
        select(cache, score="random", fraction=0.5, seed=7)


def test_runs_read_only_the_selected_rows_in_the_seeded_order(cache):
    select(cache, score="random", fraction=0.25, seed=3)
    reader = CacheReader(cache)
    layout = reader.layouts["train"]
    record, keep, token_score = load_selection(
        reader.storage, "random-25", reader.settings.fingerprint, "train", layout.rows
    )
    assert record["kept_sequences"] == 16 and keep.sum() == 32 and token_score is None
    cfg = from_dict(TrainConfig, raw_cfg(cache, Path("unused"), **{"data.selection": "random-25"}))
    fields = FieldSelection.for_run(reader.settings, set(reader.fields), None, False, 2.0, None)
    batches = CacheBatches(reader, cfg.data, fields, 56, 2, 0, 1, keep)
    kept_sequences = set(reader.read_rows("train", 0, layout.rows, ["sequence_index"])["sequence_index"][keep].tolist())
    plans = [batches.plan(epoch) for epoch in (0, 1)]
    for plan in plans:
        assert sum(int(r.sum()) for r in plan.group_rows) == 16, "every selected row of the epoch's view"
        assert plan.batches >= 2
    seen = []
    for batch in batches:
        seen.append((batches.epoch, batch["sequence_index"].tolist(), batch["view"].tolist()))
        if len(seen) == plans[0].batches + plans[1].batches:
            break
    for epoch, plan in enumerate(plans):
        rows = [(s, v) for e, ss, vv in seen if e == epoch for s, v in zip(ss, vv, strict=True)]
        assert {s for s, _ in rows} <= kept_sequences and len(set(rows)) == len(rows) == 4 * plan.batches
        assert {v for _, v in rows} == {epoch}, "epoch e reads view e, of the selected sequences only"
    again = CacheBatches(reader, cfg.data, fields, 56, 2, 0, 1, keep)
    assert next(iter(again))["sequence_index"].tolist() == seen[0][1], "a pure function of seed and selection"


def test_a_run_on_a_selection_records_it_and_resumes_exactly(cache, tmp_path):
    select(cache, score="teacher_loss", fraction=0.5, name="hard")
    changes = {"data.selection": "hard", "max_steps": 4, "save_every": 2}
    summary = train(cache, tmp_path / "straight", **changes)
    assert summary["selection"]["name"] == "hard" and summary["selection"]["kept_sequences"] == 32
    lineage = json.loads((tmp_path / "straight" / "final" / "distill.json").read_text())
    assert lineage["selection"] == summary["selection"]
    assert (
        "Trained on the selection `hard`: 32 of 64 cached sequences"
        in (tmp_path / "straight" / "final" / "README.md").read_text()
    )
    run = tmp_path / "resumed"
    train(cache, run, **changes)
    shutil.rmtree(run / "checkpoints" / "step-0000004")
    (run / "checkpoints" / "latest").write_text("step-0000002")
    select(cache, score="teacher_loss", fraction=0.25, name="hard", overwrite=True)  # replaced under the run
    with pytest.raises(DistilcacheError, match=r"--resume: selection 'hard' holds other rows than when the checkpoint"):
        from student_train.trainer import run_train

        run_train(from_dict(TrainConfig, raw_cfg(cache, run, **changes)), resume=True)
    select(cache, score="teacher_loss", fraction=0.5, name="hard", overwrite=True)  # the same bytes again
    from student_train.trainer import run_train

    run_train(from_dict(TrainConfig, raw_cfg(cache, run, **changes)), resume=True)
    assert losses_of(run) == losses_of(tmp_path / "straight")
    assert (run / "final" / "model.safetensors").read_bytes() == (
        tmp_path / "straight" / "final" / "model.safetensors"
    ).read_bytes()


def test_a_damaged_foreign_or_missing_selection_is_refused(cache, tmp_path):
    record = select(cache, score="random", fraction=0.5, name="half")
    reader = CacheReader(cache)
    fp, rows = reader.settings.fingerprint, reader.layouts["train"].rows
    key = cache / record_key("half")

    with pytest.raises(CacheError, match=r"^no selection 'other' beside .* \(selections: half\); make it with"):
        load_selection(reader.storage, "other", fp, "train", rows)
    with pytest.raises(CacheError, match=r"selects 128 rows of split 'train', the run reads split 'eval'"):
        load_selection(reader.storage, "half", fp, "eval", 16)
    with pytest.raises(ConfigError, match="selection: a selection scores a complete cache"):
        from_dict(TrainConfig, raw_cfg(cache, tmp_path, **{"data.selection": "half", "data.follow": True}))

    foreign = {**record, "cache_fingerprint": "0" * 32}  # another cache's, its own hash made consistent
    foreign["record_sha256"] = record_digest(foreign)
    key.write_text(json.dumps(foreign))
    with pytest.raises(
        CacheError, match=r"was made from cache 000000000000, this cache is .*; run `pipeline select` on"
    ):
        train(cache, tmp_path / "foreign", **{"data.selection": "half"})
    assert not (tmp_path / "foreign" / "run.json").exists(), "refused before anything is written"

    edited = {**record, "fraction": 0.9}  # an edit that does not rehash
    key.write_text(json.dumps(edited))
    with pytest.raises(CacheError, match=r"half\.json does not hash to its recorded sha256 \(edited or damaged\)"):
        load_selection(reader.storage, "half", fp, "train", rows)

    key.write_text(json.dumps(record))
    data = cache / record["data"]["path"]
    blob = bytearray(data.read_bytes())
    blob[-3] ^= 0x01
    data.write_bytes(bytes(blob))
    with pytest.raises(CacheError, match=r"its data file selections/half\..*\.safetensors differs from the record"):
        load_selection(reader.storage, "half", fp, "train", rows)
    report = verify_cache(cache)
    assert [p for p in report.problems if "selection" in p] == [
        f"selection 'half' ({reader.url}/selections/half.json): its data file {record['data']['path']} differs from "
        "the record (edited or damaged); rerun `pipeline select --overwrite`"
    ]
    data.unlink()
    with pytest.raises(CacheError, match=r"its data file selections/half\..* is missing; rerun"):
        load_selection(reader.storage, "half", fp, "train", rows)


def _teacher_entropy(cache: Path, teacher_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """((rows, L) the teacher's entropy at T = 1 recomputed by running it on the cached rows, (rows, L) non-pad)."""
    from transformers import AutoModelForMaskedLM

    model = AutoModelForMaskedLM.from_pretrained(teacher_dir).eval()
    reader = CacheReader(cache)
    rows = reader.read_rows("train", 0, reader.layouts["train"].rows, ["input_ids", "lengths"])
    ids = torch.from_numpy(rows["input_ids"].astype(np.int64))
    valid = torch.arange(ids.shape[1])[None] < torch.from_numpy(rows["lengths"])[:, None]
    with torch.no_grad():
        log_p = torch.log_softmax(model(input_ids=ids, attention_mask=valid.long()).logits, -1)
    return -(log_p.exp() * log_p).sum(-1).numpy(), valid.numpy()


def test_stored_token_scores_are_the_teachers_entropy_and_what_kd_tokens_entropy_reads(cache, tmp_path, assets, caplog):
    with pytest.raises(ConfigError, match="token_scores: stores the teacher's entropy a token; set score: entropy"):
        select(cache, score="teacher_loss", token_scores=True)
    with caplog.at_level("INFO", logger="student_train"):
        record = select(cache, score="entropy", fraction=1.0, token_scores=True, name="ent")
    assert record["token_scores"] is True and record["kept_rows"] == record["rows"] == 128
    assert any("vs dropped none, in" in r.getMessage() for r in caplog.records), "every sequence kept: none dropped"
    _, arrays = stored(cache, "ent")
    want, valid = _teacher_entropy(cache, assets.teacher)
    scores = arrays["token_score"]
    assert scores.dtype == np.float16 and scores.shape == want.shape
    assert (np.isnan(scores) == ~valid).all(), "a score at every non-pad token, NaN at pads"
    np.testing.assert_allclose(scores[valid].astype(np.float32), want[valid], rtol=2e-3, atol=2e-3)

    reader = CacheReader(cache)
    layout = reader.layouts["train"]
    _, keep, token_score = load_selection(reader.storage, "ent", reader.settings.fingerprint, "train", layout.rows)
    ids = reader.read_rows("train", 0, layout.rows, ["sequence_index", "view"])
    keys = zip(ids["sequence_index"].tolist(), ids["view"].tolist(), strict=True)
    row_of = {key: r for r, key in enumerate(keys)}
    cfg = from_dict(TrainConfig, raw_cfg(cache, Path("unused"), **{"data.selection": "ent"}))
    fields = FieldSelection.for_run(reader.settings, set(reader.fields), None, False, 2.0, None)
    batch = next(iter(CacheBatches(reader, cfg.data, fields, 56, 2, 0, 1, keep, token_score)))
    assert "row" not in batch
    rows = [row_of[k] for k in zip(batch["sequence_index"].tolist(), batch["view"].tolist(), strict=True)]
    np.testing.assert_array_equal(batch["kd_score"].numpy(), token_score[rows])
    torn = token_score.copy()
    torn[rows[0], 0] = np.nan  # a non-pad token without a score
    with pytest.raises(
        CacheError, match=rf"selection 'ent' has no token score at non-pad tokens of split rows \[{rows[0]}\]"
    ):
        next(iter(CacheBatches(reader, cfg.data, fields, 56, 2, 0, 1, keep, torn)))

    # KD on the quarter of tokens of highest teacher entropy: read from the selection, or rebuilt each step
    kd = {"loss.kd_tokens": "entropy", "loss.kd_fraction": 0.25, "max_steps": 3}
    read = train(cache, tmp_path / "read", **kd, **{"data.selection": "ent"})
    rebuilt = train(cache, tmp_path / "rebuilt", **kd)
    assert read["selection"]["token_scores"] is True and "selection" not in rebuilt
    np.testing.assert_allclose(losses_of(tmp_path / "read"), losses_of(tmp_path / "rebuilt"), rtol=1e-6)

    record = read_record(reader.storage, "ent")
    unscored = {**record, "token_scores": False}  # a record that no longer says what its data file holds
    unscored["record_sha256"] = record_digest(unscored)
    (cache / record_key("ent")).write_text(json.dumps(unscored))
    holds = r"data file holds \['keep_rows', 'kept', 'score', 'sequence_index', 'token_score'\], not \['keep_rows'"
    with pytest.raises(CacheError, match=holds):
        load_selection(reader.storage, "ent", reader.settings.fingerprint, "train", layout.rows)


@pytest.mark.integration
def test_the_select_command_and_an_ablation_over_selections_and_kd_fractions(cache, tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["select", "--cache", str(cache), "--score", "random", "--fraction", "0.5"])
    assert result.exit_code == 0, result.output
    assert "selection random-50: 32 of 64 sequences; train with --set data.selection=random-50" in result.output
    shown = runner.invoke(main, ["inspect", str(cache), "--sample", "4"])
    assert shown.exit_code == 0, shown.output
    assert "random-50               32 of 64 train sequences, the highest by random" in shown.output
    bad = runner.invoke(main, ["select", "--cache", str(cache), "--score", "miniplm"])
    assert bad.exit_code == 1
    assert "reference: `miniplm` needs a reference MLM: teacher:N or a model name or path" in bad.output
    grid = tmp_path / "grid.yaml"
    grid.write_text(
        "name: select\nbaseline: all\nvariants:\n  all: {}\n"
        "  half-random: {data.selection: random-50}\n"
        "  kd-quarter: {loss.kd_tokens: random, loss.kd_fraction: 0.25}\n"
    )
    config = tmp_path / "c.yaml"
    import yaml

    config.write_text(yaml.safe_dump({"train": raw_cfg(cache, tmp_path / "unused", max_steps=2)}))
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "ablate", "--grid", str(grid), "--config", str(config), "--output",
         str(tmp_path / "sweep")],
        capture_output=True, text=True, timeout=900, env={**__import__("os").environ, "DS_ACCELERATOR": "cpu"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    summaries = {v: json.loads((tmp_path / "sweep" / "runs" / v / "summary.json").read_text()) for v in
                 ("all", "half-random", "kd-quarter")}  # fmt: skip
    assert summaries["half-random"]["selection"]["name"] == "random-50"
    assert "selection" not in summaries["all"] and summaries["kd-quarter"]["config"]["loss"]["kd_fraction"] == 0.25
