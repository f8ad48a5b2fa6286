"""`pipeline finetune`: several models fine-tuned on one task with one recipe and the same seeds.

Each (model, seed) is one run: `AutoModelForSequenceClassification` on the model directory, AdamW
with linear warmup and decay, examples in a counter-based seeded order, validation at the end.
A run writes `result.json` last, so a killed sweep resumes the remaining (model, seed) pairs and
never redoes a finished one. Then size and speed are measured on identical batches, the table
(Markdown, CSV, JSON) gets each model's mean ± std and its retention of the reference (the
teacher), and the results are added to the models' cards.
"""

from __future__ import annotations

import json
import logging
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from cache_format.atomic import write_json_atomic
from cache_format.head import LOAD_ERRORS
from cache_format.rng import STREAM_TASK, permutation
from pipeline.config import to_dict
from pipeline.errors import DistilcacheError, first_line
from student_train import speed
from student_train.downstream import report as finetune_report
from student_train.downstream.config import FinetuneConfig, RecipeConfig
from student_train.downstream.tasks import TaskData, load_task, metric_values

log = logging.getLogger(__name__)
RESULT = "result.json"


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


RANDOM = "random:"
"""`random:PATH`: the model at PATH with freshly initialised weights (the floor of a comparison)."""


def load_classifier(path: str, task: TaskData):
    """The model directory as a sequence classifier (a fresh head on the pretrained encoder), or, for
    `random:PATH`, the same architecture with every weight freshly initialised (seeded by the caller)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "some weights were newly initialised": the head, as intended
    try:
        source = path.removeprefix(RANDOM)
        tokenizer = AutoTokenizer.from_pretrained(source)
        extra = {"problem_type": "regression"} if task.type == "regression" else {}
        if task.label_names:
            extra["id2label"] = dict(enumerate(task.label_names))
            extra["label2id"] = {n: i for i, n in enumerate(task.label_names)}
        if path.startswith(RANDOM):
            config = AutoConfig.from_pretrained(source, num_labels=task.num_labels, **extra)
            model = AutoModelForSequenceClassification.from_config(config)
        else:
            model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=task.num_labels, **extra)
    except LOAD_ERRORS as exc:
        raise DistilcacheError(f"model {path}: cannot load it as a classifier ({first_line(exc)})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    return tokenizer, model


def _encode(tokenizer, text: list[str], pair: list[str] | None, max_len: int) -> list[list[int]]:
    return tokenizer(text, pair, truncation=True, max_length=max_len)["input_ids"]


def _collate(ids: list[list[int]], rows: np.ndarray, pad: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    width = max(len(ids[i]) for i in rows)
    batch = torch.full((len(rows), width), pad, dtype=torch.long)
    for j, i in enumerate(rows):
        batch[j, : len(ids[i])] = torch.tensor(ids[i])
    return batch.to(device), (batch != pad).long().to(device)


def finetune_one(path: str, task: TaskData, recipe: RecipeConfig, seed: int, out: Path, device: torch.device) -> dict:
    """Fine-tune one model with one seed; the validation metrics and per-example predictions."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if recipe.num_threads:
        torch.set_num_threads(recipe.num_threads)
    tokenizer, model = load_classifier(path, task)
    model.to(device).train()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    train_ids = _encode(tokenizer, task.train_text, task.train_pair, recipe.max_seq_len)
    eval_ids = _encode(tokenizer, task.eval_text, task.eval_pair, recipe.max_seq_len)
    n, bs = len(train_ids), recipe.batch_size
    steps = max(1, math.ceil(recipe.epochs * n / bs))
    steps = min(steps, recipe.max_steps or steps)
    decay = [p for name, p in model.named_parameters() if p.ndim > 1 and "norm" not in name.lower()]
    rest = [p for name, p in model.named_parameters() if not (p.ndim > 1 and "norm" not in name.lower())]
    groups = [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=recipe.lr)
    warm = max(1, round(recipe.warmup_fraction * steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / max(1, steps - warm)))
    )
    labels = torch.from_numpy(task.train_labels)
    autocast = device.type == "cuda" and recipe.precision != "fp32"
    start, order, epoch = time.perf_counter(), np.zeros(0, np.int64), 0
    tty = sys.stderr.isatty()  # a log file gets the result line, not a bar redrawn every step
    bar = tqdm(range(steps), desc=f"{out.parent.name} seed {seed}", unit="step", leave=False, disable=not tty)
    for _ in bar:
        if len(order) < bs:  # the next epoch's seeded order, whatever the batch size
            order = np.concatenate([order, permutation(seed, STREAM_TASK, n, view=epoch)])
            epoch += 1
        rows, order = order[:bs], order[bs:]
        ids, mask = _collate(train_ids, rows, pad, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels[rows].to(device)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if tty:  # loss.item() waits for the device: only when a bar shows it
            bar.set_postfix_str(f"loss {loss.item():.4f}", refresh=False)
    seconds = time.perf_counter() - start
    predictions = _predict(model, eval_ids, pad, task, recipe, device)
    if recipe.save_models:
        model.save_pretrained(out / "model")
        tokenizer.save_pretrained(out / "model")
    return {
        "metrics": metric_values(task.metrics, task.eval_labels, predictions),
        "predictions": predictions.tolist(),
        "labels": task.eval_labels.tolist(),
        "steps": steps,
        "train_seconds": round(seconds, 1),
        "final_train_loss": float(loss.item()),
    }


@torch.no_grad()
def _predict(model, ids: list[list[int]], pad: int, task: TaskData, recipe: RecipeConfig, device) -> np.ndarray:
    model.eval()
    out = []
    for a in range(0, len(ids), recipe.eval_batch_size):
        batch, mask = _collate(ids, np.arange(a, min(a + recipe.eval_batch_size, len(ids))), pad, device)
        logits = model(input_ids=batch, attention_mask=mask).logits.float()
        out.append(logits[:, 0] if task.type == "regression" else logits.argmax(-1))
    return torch.cat(out).cpu().numpy()


def run_finetune(cfg: FinetuneConfig, *, speed_only: bool = False, measure: bool = True) -> dict:
    """Every (model, seed) not finished yet, then size and speed (unless not `measure`), then the report."""
    if not cfg.models:
        raise DistilcacheError("finetune: no models; give --model NAME=PATH (e.g. teacher=..., student=...)")
    reference = cfg.reference or ("teacher" if "teacher" in cfg.models else next(iter(cfg.models)))
    if cfg.cache:
        finetune_report.check_lineage(cfg.models, cfg.cache, cfg.storage_options)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    task = load_task(cfg.task)
    device = resolve_device(cfg.recipe.device)
    results: dict[str, list[dict]] = {}
    if not speed_only:
        for name, path in cfg.models.items():
            results[name] = [_run_or_reuse(cfg, name, path, seed, task, device) for seed in cfg.recipe.seeds]
    sizes = _measure(cfg, task, device) if measure else {}
    return finetune_report.write(cfg, reference, task, results, sizes, out)


def _run_or_reuse(cfg: FinetuneConfig, name: str, path: str, seed: int, task: TaskData, device) -> dict:
    run = Path(cfg.output_dir) / "runs" / name / f"seed-{seed}"
    key = {"model": path, "task": to_dict(cfg.task), "recipe": to_dict(cfg.recipe) | {"seeds": None}, "seed": seed}
    done = run / RESULT
    if done.is_file() and json.loads(done.read_text()).get("key") == key:
        log.info("%s seed %d: finished earlier; skipping", name, seed)
        return json.loads(done.read_text())
    run.mkdir(parents=True, exist_ok=True)
    result = {"key": key, **finetune_one(path, task, cfg.recipe, seed, run, device)}
    write_json_atomic(done, result)  # last: its presence marks a finished (model, seed)
    log.info("%s seed %d: %s", name, seed, ", ".join(f"{k} {v:.4f}" for k, v in result["metrics"].items()))
    return result


def _measure(cfg: FinetuneConfig, task: TaskData, device: torch.device) -> dict[str, dict]:
    """Size and speed of every model, on batches of the task's validation texts."""
    models, sizes, batches = {}, {}, {}
    for name, path in cfg.models.items():
        tokenizer, models[name] = load_classifier(path, task)
        local = Path(path.removeprefix(RANDOM))
        sizes[name] = speed.size_of(models[name], local if local.is_dir() else None)
        batches[name] = speed.batches_from(task.eval_text, tokenizer, cfg.speed.batch_sizes, cfg.recipe.max_seq_len)
    s = cfg.speed
    first = next(iter(batches.values()))
    same = all(_same_batches(b, first) for b in batches.values())  # one tokenizer: a distilled student's
    if same:  # one run, the models interleaved on the same batches
        timed = speed.time_models(models, first, s.repeats, s.warmup, s.num_threads, device)
    else:  # each on its own tokenization of the same texts
        timed = {
            n: speed.time_models({n: m}, batches[n], s.repeats, s.warmup, s.num_threads, device)[n]
            for n, m in models.items()
        }
    return {n: sizes[n] | timed[n] | {"identical_batches": same} for n in models}


def _same_batches(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k][0], b[k][0]) for k in a)
