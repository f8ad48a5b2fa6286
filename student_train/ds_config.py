"""DeepSpeed JSON config, completed from the stage config so that the two can never disagree.

Values written "auto" in the JSON are filled from `TrainConfig` (batch sizes, optimizer,
scheduler, clipping, precision); explicit values must equal what the stage config implies, and
a mismatch is refused naming both.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError
from student_train.config import TrainConfig


def load_template(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"deepspeed_config: {p} not found; use one of configs/deepspeed/zero{{1,2,3}}.json")
    try:
        doc = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"deepspeed_config: {p} is not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"deepspeed_config: {p} must hold a JSON object, not {type(doc).__name__}")
    return doc


def resolve(template: dict, cfg: TrainConfig, world: int, total_steps: int, precision: str, cpu: bool) -> dict:
    """The DeepSpeed config for this run: template + values derived from `cfg`."""
    ds = copy.deepcopy(template)
    o = cfg.optim
    derived: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.data.micro_batch_size,
        "gradient_accumulation_steps": cfg.data.grad_accum_steps,
        "train_batch_size": cfg.data.micro_batch_size * cfg.data.grad_accum_steps * world,
        "gradient_clipping": o.grad_clip,
        "optimizer.params.lr": o.lr,
        "optimizer.params.betas": list(o.betas),
        "optimizer.params.eps": o.eps,
        "optimizer.params.weight_decay": o.weight_decay,
        "optimizer.params.torch_adam": cpu,  # DeepSpeed's fused Adam needs a CUDA build
        "scheduler.params.warmup_max_lr": o.lr,
        "scheduler.params.warmup_num_steps": max(1, round(o.warmup_fraction * total_steps)),
        "scheduler.params.total_num_steps": total_steps,
        "bf16.enabled": precision == "bf16",
        "fp16.enabled": precision == "fp16",
    }
    problems = []
    for key, value in derived.items():
        *parents, leaf = key.split(".")
        node = ds
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f'deepspeed_config: section "{p}" must be a JSON object, not {node!r}')
        current = node.get(leaf, "auto")
        if current == "auto":
            node[leaf] = value
        elif current != value and not (isinstance(value, float) and current == value):
            problems.append(f"{key} is {current!r} in the DeepSpeed JSON but the config implies {value!r}")
    if problems:
        raise ConfigError(
            "deepspeed_config disagrees with the train config: "
            + "; ".join(problems)
            + '; write "auto" there or change the train config'
        )
    return ds
