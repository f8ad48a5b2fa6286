from pathlib import Path

import pytest
import yaml

from pipeline.config import SECTIONS, load_config, parse_override, reference_markdown
from pipeline.docs import STAGE_CONFIGS as STAGES
from pipeline.errors import ConfigError
from teacher_cache.config import AdaptConfig, CacheConfig

ROOT = Path(__file__).resolve().parents[1]


def test_every_section_has_a_config_class():
    assert set(STAGES) == set(SECTIONS)


BASE = ["teacher.name=x", "corpus.paths=[a.txt]"]
"""The keys a valid `cache` config needs besides defaults."""


def write(tmp_path, doc) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_defaults_then_yaml_then_set(tmp_path):
    path = write(tmp_path, {"cache": {"teacher": {"name": "x", "batch_size": 4}, "outputs": {"k": 8}}})
    cfg = load_config(
        CacheConfig, "cache", path, ["corpus.paths=[a.txt]", "outputs.k=32", "outputs.temperatures=[1, 3]"]
    )
    assert cfg.teacher.batch_size == 4  # YAML over default
    assert cfg.outputs.k == 32  # --set over YAML
    assert cfg.outputs.temperatures == [1.0, 3.0] and all(isinstance(t, float) for t in cfg.outputs.temperatures)
    assert cfg.masking.mask_prob == 0.15  # default


def test_float_written_without_dot_is_a_number(tmp_path):
    cfg = load_config(AdaptConfig, "adapt", None, ["lr=2e-4", "head_lr=1E-3"])
    assert cfg.lr == pytest.approx(2e-4) and cfg.head_lr == pytest.approx(1e-3)


def test_unknown_key_is_an_error_naming_the_key_and_the_known_ones(tmp_path):
    with pytest.raises(ConfigError, match=r"cache\.outputs\.kk: unknown key; known keys: k, temperatures"):
        load_config(CacheConfig, "cache", None, [*BASE, "outputs.kk=3"])


def test_all_problems_reported_at_once_on_one_line():
    with pytest.raises(ConfigError) as info:
        load_config(
            CacheConfig,
            "cache",
            None,
            ["teacher.batch_size=many", "outputs.k=0", "masking.views=0"],
        )
    message = str(info.value)
    assert "\n" not in message
    assert "cache.teacher.batch_size: expected an integer, got 'many'" in message
    # type errors stop before semantic checks; fix them and the semantic problems all show
    with pytest.raises(ConfigError) as info:
        load_config(CacheConfig, "cache", None, ["outputs.k=0", "masking.views=0"])
    message = str(info.value)
    assert "cache.teacher.name: required" in message
    assert "cache.outputs.k: 0 must be at least 1" in message
    assert "cache.masking.views: 0 must be between 1 and 255" in message


def test_literal_and_list_types_checked():
    with pytest.raises(ConfigError, match=r"cache\.outputs\.logit_positions: 'some' is not one of 'all', 'masked'"):
        load_config(CacheConfig, "cache", None, [*BASE, "outputs.logit_positions=some"])
    with pytest.raises(ConfigError, match=r"cache\.corpus\.paths: expected a list"):
        load_config(CacheConfig, "cache", None, ["teacher.name=x", "corpus.paths=3"])


def test_bad_override_syntax_and_unknown_section(tmp_path):
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_override("outputs.k")
    path = write(tmp_path, {"cahce": {}})
    with pytest.raises(ConfigError, match=r"unknown section\(s\) cahce; known sections: adapt, cache"):
        load_config(CacheConfig, "cache", path)
    with pytest.raises(ConfigError, match="not found"):
        load_config(CacheConfig, "cache", tmp_path / "missing.yaml")


@pytest.mark.parametrize(
    "path", sorted([*(ROOT / "configs").glob("*.yaml"), *(ROOT / "configs/tasks").glob("*.yaml")]), ids=lambda p: p.name
)
def test_every_shipped_config_loads(path):
    doc = yaml.safe_load(path.read_text())
    assert set(doc) <= set(SECTIONS)
    for section in doc:
        load_config(STAGES[section], section, path)


def test_readme_config_reference_is_current():
    from pipeline.docs import render

    page = (ROOT / "docs" / "configuration.md").read_text()
    for section, cls in STAGES.items():
        assert reference_markdown(cls, section) in page, f"regenerate the `{section}:` table (make docs)"
    assert page == render(), "regenerate docs/configuration.md (make docs)"
