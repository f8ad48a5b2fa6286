"""The faithful default: a cache built and a student trained with no options use exact KD from
int8 hidden states (docs/results/fidelity.md), and the alternatives say what they cost."""

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cache_format.hidden import decode_hidden, encode_hidden
from cache_format.reader import CacheReader
from pipeline.cli import main
from pipeline.config import from_dict
from pipeline.errors import DistilcacheError
from student_train import losses
from student_train.config import TrainConfig
from student_train.trainer import run_train
from teacher_cache.config import CacheConfig
from teacher_cache.run import run_cache

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def default_cache(cache_cfg) -> Path:
    raw = copy.deepcopy(cache_cfg)
    del raw["outputs"]  # every outputs option at its default
    return run_cache(from_dict(CacheConfig, raw))


def train_raw(cache: Path, out: Path) -> dict:
    """A tiny run that sets nothing of the loss: kd_mode, temperature and weights are the defaults."""
    return {
        "cache": str(cache),
        "output_dir": str(out),
        "max_steps": 2,
        "eval_sequences": 4,
        "deepspeed_config": str(ROOT / "configs/deepspeed/zero2.json"),
        "student": {"layers": 1},
        "data": {"micro_batch_size": 4, "mix_blocks": 2, "num_workers": 0},
    }


def test_defaults_cache_int8_hidden_states_only_and_train_exact_kd(default_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    reader = CacheReader(default_cache)
    outputs = reader.settings.outputs
    assert (outputs.logits, outputs.hidden_dtype) == ("none", "int8")
    assert set(reader.fields) == {"input_ids", "labels", "lengths", "sequence_index", "view", "hidden", "hidden_scale"}
    assert reader.manifest["head"], "exact KD needs the cached head"
    cfg = from_dict(TrainConfig, train_raw(default_cache, tmp_path / "run"))
    assert cfg.loss.kd_mode == "exact"
    calls = []
    exact = losses.kd_exact
    monkeypatch.setattr(losses, "kd_exact", lambda *a, **k: calls.append(1) or exact(*a, **k))
    summary = run_train(cfg)
    assert len(calls) == 2, "one exact KD term per micro-batch"
    assert np.isfinite(summary["final"]["kd"]) and summary["final"]["kd"] > 0
    for mode in ("topk_tail", "sampled"):
        cfg = from_dict(TrainConfig, train_raw(default_cache, tmp_path / mode))
        cfg.loss.kd_mode = mode
        match = f"loss.kd_mode={mode} needs .* the cache holds .*hidden states only"
        with pytest.raises(DistilcacheError, match=match):
            run_train(cfg)


def test_int8_hidden_exact_loss_is_within_a_stated_tolerance_of_fp16(tiny_cache):
    """Teacher hidden states stored as int8 (per-token absmax) instead of fp16: the exact KD loss
    of a student moves by less than 0.1 % on average (docs/results/fidelity.md: the same measured on the shared
    teacher)."""
    reader = CacheReader(tiny_cache)
    head = reader.head()
    data = reader.read_rows("train", 0, 16, ["hidden", "lengths"])
    valid = np.arange(data["hidden"].shape[1])[None, :] < data["lengths"][:, None]
    hidden = torch.from_numpy(data["hidden"][valid])  # fp32 in this cache: the reference
    torch.manual_seed(0)
    with torch.no_grad():
        student = head(hidden) + torch.randn(len(hidden), head(hidden[:1]).shape[-1])  # a student near the teacher

    def kd(dtype: str) -> torch.Tensor:
        codes, scale = encode_hidden(hidden, dtype)
        return losses.kd_exact(student, decode_hidden(codes, scale, dtype), head, 2.0)

    fp16, int8 = kd("float16"), kd("int8")
    assert float((int8 - fp16).abs().mean()) < 1e-3 * float(fp16.mean())
    assert not torch.equal(int8, fp16), "int8 storage is lossy: the test must see a difference"


def test_inspect_and_preflight_recommend_the_faithful_mode(tiny_cache, tmp_path, caplog, monkeypatch):
    """A top-k cache: inspect and a topk_tail run both state the top-k's mass at the KD
    temperature and point to exact (head cached) or sampled (samples cached at that T)."""
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    cfg = from_dict(TrainConfig, train_raw(tiny_cache, tmp_path / "run"))
    cfg.loss.kd_mode = "topk_tail"
    with caplog.at_level("WARNING"):
        run_train(cfg)
    warning = next(r.getMessage() for r in caplog.records if "loss.kd_mode=topk_tail" in r.getMessage())
    assert "of the teacher's mass at masked positions at T = 2" in warning and "use loss.kd_mode=exact" in warning
    result = CliRunner().invoke(main, ["inspect", str(tiny_cache)])  # (the CLI resets logging: last)
    assert result.exit_code == 0, result.output
    line = next(x for x in result.stdout.splitlines() if x.strip().startswith("KD:"))
    assert "top-16 holds" in line and "T = 2" in line
    assert "use loss.kd_mode=exact" in line and "loss.kd_mode=sampled" in line
