"""`pipeline ablate`: many student runs from one cache, each a `train-student` subprocess.

A grid (YAML) names overrides shared by every variant (`base`) and each variant's own
overrides. Every variant's resolved config is validated against the cache before any run
starts. A variant whose run directory holds a `summary.json` with the same config is done and
skipped; one with a checkpoint resumes (`--resume`); anything else starts over. Variants run
one at a time, or `parallel` at once, one GPU each when several are visible.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from tqdm import tqdm

from cache_format.atomic import write_json_atomic
from pipeline.config import load_config, to_dict
from pipeline.errors import ConfigError, DistilcacheError
from student_train.ablations.grid import Grid, load_grid, resolve_variants
from student_train.ablations.report import write_report
from student_train.checks import open_cache
from student_train.config import TrainConfig
from student_train.downstream.config import FinetuneConfig
from student_train.downstream.finetune import run_finetune
from student_train.run_dir import RUN_FILES, SUMMARY_FILE
from student_train.runtime import LAUNCHER_VARS

log = logging.getLogger(__name__)


MARKER = "ablate.json"
"""Written by the sweep into every run directory it starts: it resumes or replaces only those."""


def state(cfg: TrainConfig) -> str:
    """done (a summary with this config), resume (a checkpoint of this config), or fresh (a run
    of another config is replaced, never mixed); a run directory the sweep did not start is
    refused (resuming it would unpickle files of unknown origin, replacing it would delete them)."""
    run = Path(cfg.output_dir)
    if any((run / n).exists() for n in RUN_FILES) and not (run / MARKER).is_file():
        raise DistilcacheError(
            f"{run} holds a run that this sweep did not start (no {MARKER}); move it away or choose another --output"
        )
    summary = run / SUMMARY_FILE
    if summary.is_file():
        return "done" if json.loads(summary.read_text()).get("config") == to_dict(cfg) else "fresh"
    config = run / "config.yaml"
    if (run / "checkpoints" / "latest").is_file() and config.is_file():
        return "resume" if yaml.safe_load(config.read_text()) == to_dict(cfg) else "fresh"
    return "fresh"


def run_sweep(grid: Grid, configs: dict[str, TrainConfig], out: Path, parallel: int) -> dict[str, str]:
    """Run every unfinished variant; returns each variant's outcome (done, skipped, failed: ...)."""
    (out / "configs").mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    outcome: dict[str, str] = {}
    queue = []
    for name, cfg in configs.items():
        s = state(cfg)
        if s == "done":
            outcome[name] = "skipped (finished earlier)"
        else:
            queue.append((name, s))
    log.info(
        "ablate %s: %d variant(s), %d finished earlier, %d to run%s",
        grid.name,
        len(configs),
        len(configs) - len(queue),
        len(queue),
        f", {parallel} at once" if parallel > 1 else "",
    )
    gpus = _visible_gpus()
    running: dict[str, tuple[subprocess.Popen, int | None, float]] = {}
    bar = tqdm(total=len(configs), initial=len(configs) - len(queue), unit="run", desc=f"ablate {grid.name}")
    try:
        while queue or running:
            while queue and len(running) < parallel:
                name, s = queue.pop(0)
                slot = next((g for g in gpus if g not in {r[1] for r in running.values()}), None)
                running[name] = (_launch(name, configs[name], s, out, slot), slot, time.perf_counter())
                bar.write(f"[{name}] {'resuming' if s == 'resume' else 'starting'} (log: {out / 'logs' / name}.log)")
            time.sleep(0.5)
            for name, (proc, _, t0) in list(running.items()):
                bar.set_postfix_str(f"{name} {_progress(configs[name])}", refresh=False)
                if proc.poll() is None:
                    continue
                del running[name]
                bar.update(1)
                if proc.returncode == 0:
                    outcome[name] = f"done in {time.perf_counter() - t0:.0f}s"
                else:
                    outcome[name] = f"failed (exit {proc.returncode}): {_last_error(out / 'logs' / f'{name}.log')}"
                bar.write(f"[{name}] {outcome[name]}")
    finally:
        for proc, _, _ in running.values():  # interrupted: the children stop too; a rerun resumes them
            proc.terminate()
        bar.close()
    return outcome


def _launch(name: str, cfg: TrainConfig, s: str, out: Path, gpu: int | None) -> subprocess.Popen:
    config = out / "configs" / f"{name}.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    (out / "logs" / f"{name}.log").parent.mkdir(parents=True, exist_ok=True)
    config.write_text(yaml.safe_dump({"train": to_dict(cfg)}, sort_keys=False))
    run = Path(cfg.output_dir)
    run.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run / MARKER, {"sweep": str(out), "run": name})
    cmd = [sys.executable, "-m", "pipeline", "train-student", "--config", str(config)]
    cmd.append("--resume" if s == "resume" else "--overwrite")
    env = dict(os.environ)
    for key in LAUNCHER_VARS:
        env.pop(key, None)  # each variant is its own one-process job
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
    with (out / "logs" / f"{name}.log").open("a") as logfile:  # the child keeps its own handle
        return subprocess.Popen(cmd, stdout=logfile, stderr=subprocess.STDOUT, env=env)


def _visible_gpus() -> list[int]:
    import torch

    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []


def _progress(cfg: TrainConfig) -> str:
    run = Path(cfg.output_dir)
    try:
        total = json.loads((run / "run.json").read_text())["total_steps"]
        with (run / "metrics.jsonl").open("rb") as fh:  # polled twice a second: read the tail only
            fh.seek(max(0, fh.seek(0, os.SEEK_END) - 4096))
            lines = fh.read().decode(errors="replace").splitlines()
        return f"step {json.loads(lines[-1])['step']}/{total}" if lines else f"step 0/{total}"
    except (OSError, ValueError, KeyError, IndexError):
        return "starting"


def _last_error(logfile: Path) -> str:
    lines = [line for line in logfile.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:") or "Error" in line]
    return (errors or lines or ["no output"])[-1][:300] + f" (see {logfile})"


def default_parallel() -> int:
    return max(1, len(_visible_gpus()))


def check_outcome(outcome: dict[str, str], report: Path) -> None:
    failed = {n: o for n, o in outcome.items() if o.startswith("failed")}
    if failed:
        raise DistilcacheError(
            f"{len(failed)} variant(s) failed: "
            + "; ".join(f"{n}: {o}" for n, o in failed.items())
            + f"; the others are in {report}; fix the cause and rerun the same command (finished variants are kept)"
        )


@dataclass
class AblateOptions:
    """What `pipeline ablate` was asked to do (its flags) beside the base train config."""

    grid: str
    base_train: dict[str, Any] = field(default_factory=dict)
    """The `train` section of --config with --set on top; the grid's base and variants go over it."""
    cache: str | None = None
    output: str | None = None
    parallel: int | None = None
    report_only: bool = False
    print_config: bool = False
    seeds: int = 1
    finetune: str | None = None
    """A YAML with a `finetune` section: every student is fine-tuned on its task."""


def run_ablate(opts: AblateOptions) -> str:
    """`pipeline ablate`: resolve and validate every run, run the unfinished ones, fine-tune their
    students on a task, write the report; returns the text to print (the resolved configs with
    `print_config`). The cache is opened once, with the runs' reader options."""
    if opts.seeds < 1:
        raise ConfigError(f"--seeds {opts.seeds}: give at least 1")
    grid = load_grid(opts.grid)
    out = Path(opts.output or Path("runs/ablations") / grid.name)
    opened: dict = {}
    configs = resolve_variants(grid, opts.base_train, opts.cache, out, opts.seeds, opened)
    task = load_config(FinetuneConfig, "finetune", opts.finetune) if opts.finetune else None
    if opts.print_config:
        return "\n".join(
            f"# run {name}\n{yaml.safe_dump(to_dict(cfg), sort_keys=False)}" for name, cfg in configs.items()
        )
    outcome = None if opts.report_only else run_sweep(grid, configs, out, opts.parallel or default_parallel())
    if task is not None and not opts.report_only:
        downstream(task, configs)
    try:
        report = write_report(grid, configs, out, open_cache(next(iter(configs.values())), opened))
    except FileNotFoundError as exc:
        raise DistilcacheError(f"{exc}; run the sweep without --report-only first") from None
    if outcome is not None:
        check_outcome(outcome, report)
    return f"{report.read_text()}\ntable: {report}\nplot:  {out / 'results.png'}\ncsv:   {out / 'results.csv'}"


def downstream(task, configs: dict[str, TrainConfig]) -> None:
    """Fine-tune every finished run's exported student on the task (resumable per run and seed)."""
    for name, cfg in configs.items():
        run = Path(cfg.output_dir)
        if not (run / SUMMARY_FILE).is_file():
            continue
        ft = copy.deepcopy(task)
        ft.models, ft.reference, ft.output_dir = {name.split("/")[0]: str(run / "final")}, None, str(run / "finetune")
        log.info("ablate: fine-tuning %s on the task", name)
        run_finetune(ft, measure=False)
