"""Write docs/configuration.md from the config dataclasses' field docstrings (`make docs`); a test
fails when the page no longer matches them."""

from __future__ import annotations

import sys
from pathlib import Path

from pipeline.config import reference_markdown
from student_train.config import EvaluateConfig, TrainConfig
from student_train.downstream.config import FinetuneConfig
from student_train.selection.config import SelectConfig
from teacher_cache.config import AdaptConfig, CacheConfig

STAGE_CONFIGS = {
    "adapt": AdaptConfig,
    "cache": CacheConfig,
    "train": TrainConfig,
    "select": SelectConfig,
    "evaluate": EvaluateConfig,
    "finetune": FinetuneConfig,
}
PAGE = Path("docs/configuration.md")
INTRO = """# Configuration reference

Every stage command reads its own section of a YAML file (`--config FILE`); values resolve as
dataclass defaults < the YAML section < repeatable `--set key=value` (typed: `--set outputs.k=32`,
`--set outputs.temperatures=[1,2,4]`). Unknown keys, wrong types and duplicate keys are errors,
reported all at once. The resolved config is printed at start (`--print-config` prints it and
exits) and recorded with every artifact: the cache's header and manifest, a run's `config.yaml`
and checkpoints. `pipeline ablate` grids are the `train` section's keys, dotted.

This page is generated from the config dataclasses: `make docs` rewrites it, and a test fails when
it is stale.
"""


def render() -> str:
    tables = [reference_markdown(cls, section) for section, cls in STAGE_CONFIGS.items()]
    return INTRO + "\n" + "\n\n".join(f"## `{s}`\n\n{t}" for s, t in zip(STAGE_CONFIGS, tables, strict=True)) + "\n"


def main(path: str = str(PAGE)) -> None:
    Path(path).write_text(render(), encoding="utf-8")


if __name__ == "__main__":
    main(*sys.argv[1:])
