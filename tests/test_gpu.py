"""GPU paths (`pytest -m gpu` on a machine with CUDA; skipped without it): bf16 capture, bf16
ZeRO-2 training, and the exact-KD head's GEMM in bf16, each against its fp32 reference."""

import copy

import numpy as np
import pytest
import torch

from cache_format.hidden import decode_hidden
from cache_format.reader import CacheReader
from pipeline.config import from_dict
from student_train import losses
from student_train.config import TrainConfig
from student_train.trainer import run_train
from teacher_cache.config import CacheConfig
from teacher_cache.run import run_cache
from tests.test_train import raw_cfg

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.integration,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_bf16_capture_matches_the_fp32_teacher(cache_cfg, tmp_path):
    from transformers import AutoModelForMaskedLM

    raw = copy.deepcopy(cache_cfg)
    raw["teacher"].update(device="cuda", dtype="bfloat16")
    raw["outputs"].update(hidden_dtype="float32", logits="none")
    reader = CacheReader(run_cache(from_dict(CacheConfig, raw)))
    data = reader.read_rows("train", 0, 16, ["input_ids", "lengths", "hidden"])
    model = AutoModelForMaskedLM.from_pretrained(raw["teacher"]["name"]).eval()
    ids = torch.from_numpy(data["input_ids"].astype(np.int64))
    mask = (torch.arange(ids.shape[1])[None] < torch.from_numpy(data["lengths"])[:, None]).long()
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
    got = decode_hidden(data["hidden"], None, "float32")
    valid = mask.bool()
    cos = torch.nn.functional.cosine_similarity(got[valid], want[valid], dim=-1)
    assert float(cos.min()) > 0.99, "bf16 hidden states within bf16 rounding of fp32"


def test_bf16_zero2_training_runs_and_exports(tiny_cache, tmp_path):
    summary = run_train(from_dict(TrainConfig, raw_cfg(tiny_cache, tmp_path / "run", precision="bf16", max_steps=4)))
    assert all(np.isfinite(v) for v in summary["final"].values())
    from transformers import AutoModelForMaskedLM

    AutoModelForMaskedLM.from_pretrained(summary["export"])


def test_exact_kd_head_in_bf16_matches_fp32():
    torch.manual_seed(0)
    head = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 1000)).cuda()
    hidden, logits = torch.randn(300, 64, device="cuda"), torch.randn(300, 1000, device="cuda", requires_grad=True)
    ref = losses.kd_full(logits, head(hidden), 2.0)
    bf16 = copy.deepcopy(head).to(torch.bfloat16)
    got = losses.kd_exact(logits, hidden, bf16, 2.0, 128, torch.bfloat16)
    torch.testing.assert_close(got, ref, rtol=2e-2, atol=2e-3)
