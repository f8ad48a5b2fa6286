"""Downstream: finetune, fetch-task."""

from __future__ import annotations

import click

from pipeline.commands.common import config_options, guard, resolve
from pipeline.errors import DistilcacheError


@click.command("finetune")
@config_options
@click.option("--model", "models", multiple=True, metavar="NAME=PATH", help="A model to fine-tune (repeatable).")
@click.option("--cache", default=None, help="Refuse models whose vocabulary or tokenizer differ from this cache's.")
@click.option("--speed-only", is_flag=True, help="Only size and speed, no fine-tuning.")
@guard
def finetune(
    config_path: str | None,
    overrides: tuple[str, ...],
    print_config: bool,
    models: tuple[str, ...],
    cache: str | None,
    speed_only: bool,
) -> None:
    """Fine-tune models on a classification or regression task with one recipe and seeds (section
    `finetune`), and report them side by side: mean ± std, retention of the teacher, size and speed.

    Rerunning resumes: finished (model, seed) runs are kept. E.g. `pipeline finetune --config
    configs/quickstart.yaml --model teacher=runs/quickstart/teacher --model student=runs/quickstart/student/final`.
    """
    import re

    from student_train.downstream.config import FinetuneConfig
    from student_train.downstream.finetune import run_finetune

    extra = []
    for item in models:
        name, sep, path = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z0-9_-]+", name) or not path:
            raise DistilcacheError(f"--model {item!r}: expected NAME=PATH with a plain name, e.g. student=runs/x/final")
        extra.append(f"models.{name}={path}")
    if cache:
        extra.append(f"cache={cache}")
    cfg = resolve(FinetuneConfig, "finetune", config_path, (*overrides, *extra), print_config)
    summary = run_finetune(cfg, speed_only=speed_only)
    click.echo(summary["markdown"])
    click.echo(f"table: {cfg.output_dir}/results.md (csv, json beside it)")
    if summary.get("cards_updated"):
        click.echo("model cards: " + ", ".join(summary["cards_updated"]))


@click.command("fetch-task")
@click.argument("name", type=click.Choice(["movie-snippets"]))
@click.option("--output", default="runs/data", show_default=True, type=click.Path(), help="Where the TSV goes.")
@guard
def fetch_task(name: str, output: str) -> None:
    """Fetch a downstream task that works offline on a fresh machine: movie-snippets (Rotten Tomatoes
    sentences with human sentiment ratings, from PyPI's vadersentiment 3.3.2 sdist, sha256-pinned)."""
    from pathlib import Path

    from student_train.downstream.tasks import fetch_movie_snippets

    click.echo(f"task: {fetch_movie_snippets(Path(output))}")
