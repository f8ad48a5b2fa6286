"""`pipeline plan`: the figures of a config, without building it, against the cache it then builds."""

import copy
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from cache_format.reader import CacheReader
from pipeline.cli import main
from pipeline.config import from_dict
from teacher_cache.config import CacheConfig
from teacher_cache.estimate import plan_text, run_plan
from teacher_cache.run import run_cache

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(
    "outputs", [{}, {"logits": "both", "n_samples": 8, "hidden_dtype": "float16"}, {"hidden_dtype": "pq"}]
)
def test_the_plan_matches_the_cache_it_then_builds(cache_cfg, outputs):
    raw = copy.deepcopy(cache_cfg)
    raw["outputs"] = outputs
    cfg = from_dict(CacheConfig, raw)
    plan = run_plan(cfg, pilot_sequences=64)
    assert not Path(raw["store"]["output"]).exists(), "planning builds nothing"
    reader = CacheReader(run_cache(from_dict(CacheConfig, copy.deepcopy(raw))))
    counts = reader.manifest["counts"]
    assert plan["rows"] == sum(s["rows"] for s in counts["splits"].values())
    assert plan["shards"] == sum(s["shards"] for s in counts["splits"].values())
    packed = reader.manifest["corpus"]["sequences"]
    assert plan["corpus"]["train"]["sequences"] == packed["train"] and plan["corpus"]["train"]["how"] == "exact"
    built = sum(f["bytes"] for f in counts["fields"].values())
    assert abs(plan["bytes"] - built) / built < 0.02, (plan["bytes"], built)
    assert "choices that change the bytes" in plan_text(plan)
    choices = {c["hidden_dtype"]: c for c in plan["choices"]["hidden"]}
    assert list(choices) == ["pq", "pca", "nf4", "int4", "int8", "float16", "float32"], (
        "every codec, fewest bytes first"
    )
    assert choices["pq"]["codes"] == 8 and choices["float32"]["rebuilt_kl_t1"] == 0.0
    assert choices["int8"]["rebuilt_kl_t1"] < choices["nf4"]["rebuilt_kl_t1"]
    assert choices["pq"]["bytes_per_token"] < choices["nf4"]["bytes_per_token"] < choices["int8"]["bytes_per_token"]


def test_plan_prints_json_and_takes_a_token_count(cache_cfg, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps({"cache": cache_cfg}))
    result = CliRunner().invoke(
        main, ["plan", "--config", str(config), "--tokens", "1e9", "--json", "--pilot-sequences", "16"]
    )
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert plan["corpus"]["train"]["tokens"] == 1_000_000_000 and plan["corpus"]["train"]["how"] == "given (--tokens)"
    assert plan["rows"] == 2 * cache_cfg["max_sequences"] + cache_cfg["max_eval_sequences"]
