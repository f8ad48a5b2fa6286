"""The command line: help, config printing, and one clear error line for every bad input."""

import errno
import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from cache_format.store import CacheStore
from pipeline.cli import main
from tests.conftest import tiny_bert_config

pytestmark = pytest.mark.integration


def invoke(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def sets(raw: dict, prefix: str = "") -> list[str]:
    """A config dict as --set arguments."""
    out = []
    for key, value in raw.items():
        if isinstance(value, dict):
            out += sets(value, f"{prefix}{key}.")
        else:
            out += [
                "--set",
                f"{prefix}{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}",
            ]
    return out


def assert_one_error(result, match: str, output: Path | None = None) -> None:
    assert result.exit_code == 1, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and match in errors[0], result.stderr[-2000:]
    assert result.stderr.rstrip().splitlines()[-1] == errors[0]
    if output is not None:
        assert not (output / "manifest.json").exists(), "a failed run must not look complete"


@pytest.mark.parametrize("command", [[], ["adapt-teacher"], ["cache-teacher"], ["verify"], ["inspect"]])
def test_help(command):
    result = invoke(*command, "--help")
    assert result.exit_code == 0 and "Usage:" in result.output


def test_print_config_shows_the_resolved_values(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        yaml.safe_dump({"cache": {"teacher": {"name": "bert-base-uncased"}, "corpus": {"paths": ["a.txt"]}}})
    )
    result = invoke("cache-teacher", "--config", str(path), "--set", "outputs.k=7", "--print-config")
    assert result.exit_code == 0
    printed = yaml.safe_load(result.stdout)
    assert printed["teacher"]["name"] == "bert-base-uncased" and printed["outputs"]["k"] == 7


def test_config_errors_are_one_line(tmp_path):
    assert_one_error(
        invoke("cache-teacher", "--set", "teacher.name=x", "--set", "outputs.kk=1"), "cache.outputs.kk: unknown key"
    )
    assert_one_error(invoke("cache-teacher", "--config", str(tmp_path / "nope.yaml")), "not found")


def _gpt2(tmp_path: Path) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    path = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=300, n_positions=64)).save_pretrained(path)
    return path


def _encoder_only(tmp_path: Path, assets) -> Path:
    from transformers import AutoTokenizer, BertModel

    path = tmp_path / "encoder"
    BertModel(tiny_bert_config(300), add_pooling_layer=False).save_pretrained(path)
    AutoTokenizer.from_pretrained(assets.teacher).save_pretrained(path)
    return path


def _copy_tokenizer(assets, path: Path) -> Path:
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(assets.teacher).save_pretrained(path)
    return path


BAD_INPUTS = {
    "corpus-missing": (lambda a, t, c: {"corpus": {"paths": [str(t / "missing/*.txt")]}}, "no file matches"),
    "corpus-empty": (
        lambda a, t, c: (t / "e.txt").write_text(" \n\n") and {"corpus": {"paths": [str(t / "e.txt")]}},
        "no text found",
    ),
    "no-text-column": (
        lambda a, t, c: (
            (t / "d.jsonl").write_text('{"body": "words here"}\n') and {"corpus": {"paths": [str(t / "d.jsonl")]}}
        ),
        "column 'text' not found",
    ),
    "binary": (
        lambda a, t, c: (t / "b.txt").write_bytes(b"\x89PNG\x00\x00") and {"corpus": {"paths": [str(t / "b.txt")]}},
        "looks binary",
    ),
    "not-utf8": (
        lambda a, t, c: (
            (t / "l.txt").write_bytes("na\xefve".encode("latin-1")) and {"corpus": {"paths": [str(t / "l.txt")]}}
        ),
        "is not UTF-8 text",
    ),
    "teacher-missing": (lambda a, t, c: {"teacher": {"name": str(t / "no-such-model")}}, "does not exist"),
    "teacher-not-mlm": (
        lambda a, t, c: {"teacher": {"name": str(_copy_tokenizer(a, _gpt2(t)))}},
        "is not a masked language model",
    ),
    "teacher-no-head": (lambda a, t, c: {"teacher": {"name": str(_encoder_only(t, a))}}, "has no trained weights"),
    "k-too-large": (lambda a, t, c: {"outputs": {"k": 100_000}}, "outputs.k=100000 exceeds the teacher vocabulary"),
    "seq-too-long": (
        lambda a, t, c: {"corpus": {"max_seq_len": 65}},
        "corpus.max_seq_len=65 exceeds the teacher's 64 positions",
    ),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_inputs_give_one_clear_error(name, assets, cache_cfg, tmp_path):
    make, match = BAD_INPUTS[name]
    change = make(assets, tmp_path, cache_cfg)
    raw = {k: (dict(v, **change.get(k, {})) if isinstance(v, dict) else v) for k, v in cache_cfg.items()}
    assert_one_error(invoke("cache-teacher", *sets(raw)), match, Path(cache_cfg["store"]["output"]))


def test_existing_cache_with_another_config(cache_cfg):
    assert invoke("cache-teacher", *sets(cache_cfg)).exit_code == 0
    result = invoke("cache-teacher", *sets(cache_cfg), "--set", "outputs.k=8")
    assert_one_error(result, "holds a cache built with another config (outputs.k: 16 -> 8)")
    assert invoke("cache-teacher", *sets(cache_cfg), "--set", "outputs.k=8", "--overwrite").exit_code == 0


def test_disk_full_through_the_cli(cache_cfg, monkeypatch):
    def full(self, split, shard, data, info, fence=None):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(CacheStore, "write_shard", full)
    output = Path(cache_cfg["store"]["output"])
    assert_one_error(
        invoke("cache-teacher", *sets(cache_cfg)),
        "disk full while writing train shard 00000",
        output,
    )
    assert not (output / "commits").exists() or list((output / "commits").iterdir()) == []


def test_verify_and_inspect_commands(cache_cfg):
    assert invoke("cache-teacher", *sets(cache_cfg)).exit_code == 0
    out = cache_cfg["store"]["output"]
    result = invoke("verify", out)
    assert result.exit_code == 0 and result.stdout.startswith("ok: 11 shards")
    result = invoke("inspect", out)
    assert result.exit_code == 0
    for expected in ("teacher statistics on", "top-16 mass (all)", "hidden", "B/token", "masking"):
        assert expected in result.stdout
    assert_one_error(invoke("verify", str(Path(out).parent)), "is not a distilcache cache")


def test_inspect_reports_bytes_per_token_for_each_kd_mode(tiny_cache):
    result = invoke("inspect", str(tiny_cache))
    assert result.exit_code == 0
    line = next(x for x in result.stdout.splitlines() if "bytes per token by KD mode" in x)
    manifest = json.loads((tiny_cache / "manifest.json").read_text())
    tokens = sum(s["tokens"] for s in manifest["counts"]["splits"].values())
    fields = manifest["counts"]["fields"]

    def per_token(*names):
        return sum(fields[n]["bytes"] for n in names if n in fields) / tokens

    assert f"topk_tail {per_token('topk_values', 'topk_indices', 'logsumexp'):,.1f}" in line
    assert f"topk_renorm {per_token('topk_values', 'topk_indices'):,.1f}" in line
    assert f"sampled {per_token('sample_ids', 'sample_counts'):,.1f}" in line
    assert f"exact {per_token('hidden', 'hidden_scale'):,.1f}" in line
