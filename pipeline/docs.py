"""Regenerate the config reference tables in README.md (`make docs`).

Each stage's table sits between `<!-- config:SECTION -->` and `<!-- /config:SECTION -->`; a test
fails when a table no longer matches the dataclasses.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from pipeline.config import reference_markdown
from student_train.config import TrainConfig
from student_train.finetune_config import FinetuneConfig
from teacher_cache.config import AdaptConfig, CacheConfig

STAGE_CONFIGS = {"adapt": AdaptConfig, "cache": CacheConfig, "train": TrainConfig, "finetune": FinetuneConfig}


def render(readme: str) -> str:
    for section, cls in STAGE_CONFIGS.items():
        pattern = re.compile(rf"(<!-- config:{section} -->\n).*?(<!-- /config:{section} -->)", re.S)
        if not pattern.search(readme):
            raise SystemExit(f"README has no <!-- config:{section} --> block")
        readme = pattern.sub(
            lambda m, c=cls, s=section: m.group(1) + reference_markdown(c, s) + "\n" + m.group(2),
            readme,
        )
    return readme


def main(path: str = "README.md") -> None:
    p = Path(path)
    p.write_text(render(p.read_text()))


if __name__ == "__main__":
    main(*sys.argv[1:])
