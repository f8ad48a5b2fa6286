"""`pipeline`: the distilcache command line. Parse, validate, log the resolved config, run.

User errors print one line (`error: <problem>; <fix>`) and exit 1; the stages do the work.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import shlex
import sys
from collections.abc import Callable
from typing import Any

import click

from pipeline.config import load_config, to_yaml
from pipeline.errors import DistilcacheError, first_line
from pipeline.log import setup_logging

log = logging.getLogger("pipeline")


def _guard(fn: Callable) -> Callable:
    """Turn user-facing errors into one line on stderr and a non-zero exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except DistilcacheError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            where = f" writing {exc.filename}" if exc.filename else ""
            click.echo(
                f"error: disk full{where}; free space and rerun the same command (finished work is kept)", err=True
            )
            sys.exit(1)
        except Exception as exc:
            if not type(exc).__module__.startswith("obstore"):
                raise
            # an object-store failure the stages did not translate (permissions, a dead endpoint)
            click.echo(f"error: object store: {first_line(exc)}; check the URL, credentials and endpoint", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo(f"interrupted; {_resume_hint(click.get_current_context().info_name)}", err=True)
            sys.exit(130)

    return wrapper


def _resume_hint(command: str | None) -> str:
    """What to run to pick up an interrupted command where it stopped."""
    if command == "train-student":
        args = [a for a in sys.argv[1:] if a not in ("--overwrite", "--resume")]
        return f"its checkpoints are kept: resume with `pipeline {shlex.join([*args, '--resume'])}`"
    if command in ("cache-teacher", "ablate", "finetune"):
        return "finished work is kept: rerun the same command to resume"
    return "nothing was left half-written: rerun the same command"


def config_options(fn: Callable) -> Callable:
    fn = click.option(
        "--set",
        "overrides",
        multiple=True,
        metavar="KEY=VALUE",
        help="Override a config key (repeatable), e.g. --set outputs.k=32.",
    )(fn)
    fn = click.option(
        "--config",
        "config_path",
        type=click.Path(dir_okay=False),
        default=None,
        help="YAML config file; the command reads its own section.",
    )(fn)
    fn = click.option("--print-config", is_flag=True, help="Print the resolved config and exit.")(fn)
    return fn


def _resolve(cls: type, section: str, config_path: str | None, overrides: tuple[str, ...], print_only: bool):
    cfg = load_config(cls, section, config_path, overrides)
    text = to_yaml(cfg, redact=True)
    if print_only:
        click.echo(text, nl=False)
        sys.exit(0)
    log.info("resolved %s config:\n%s", section, text.rstrip())
    return cfg


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(verbose: bool) -> None:
    """distilcache: distil masked language models from a cached teacher.

    \b
    Stage one   pipeline adapt-teacher / cache-teacher / verify / inspect
    Stage two   pipeline train-student / evaluate
    Config      --config FILE.yaml (one section per stage) and --set key=value overrides.
    """
    setup_logging(verbose)


@main.command("adapt-teacher")
@config_options
@click.option("--overwrite", is_flag=True, help="Adapt again even when output_dir holds an up-to-date teacher.")
@_guard
def adapt_teacher(config_path: str | None, overrides: tuple[str, ...], print_config: bool, overwrite: bool) -> None:
    """Turn an encoder without MLM head into a masked-LM teacher (section `adapt`)."""
    from teacher_cache.adapt import run_adapt
    from teacher_cache.config import AdaptConfig

    cfg = _resolve(AdaptConfig, "adapt", config_path, overrides, print_config)
    path = run_adapt(cfg, overwrite=overwrite)
    click.echo(f"teacher: {path}")


@main.command("cache-teacher")
@config_options
@click.option("--overwrite", is_flag=True, help="Replace an existing cache built with another config.")
@click.option("--worker", default=None, metavar="I/N", help="Run as worker I of N independent processes (no group).")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True)
@click.option("--ray-address", default=None, help="An existing Ray cluster (default: start a local one).")
@click.option("--finalize", "finalize_only", is_flag=True, help="Write the manifest once every shard is committed.")
@_guard
def cache_teacher(
    config_path: str | None,
    overrides: tuple[str, ...],
    print_config: bool,
    overwrite: bool,
    worker: str | None,
    engine: str,
    ray_address: str | None,
    finalize_only: bool,
) -> None:
    """Run the teacher once over a masked corpus into a sharded Zarr cache (section `cache`).

    Rerunning the same command resumes an interrupted cache and reuses a complete one. Under
    `torchrun --nproc-per-node N -m pipeline cache-teacher ...` N processes write disjoint shards;
    `--worker I/N` runs independent workers (a Slurm array, a Kubernetes indexed job) that claim
    shards through leases; `--engine ray` captures on Ray actors. store.output may be s3://, gs://, az://.
    """
    from teacher_cache.config import CacheConfig
    from teacher_cache.run import run_cache

    cfg = _resolve(CacheConfig, "cache", config_path, overrides, print_config)
    parsed = None
    if worker is not None:
        index, sep, count = worker.partition("/")
        if not (sep and index.isdigit() and count.isdigit() and int(count) > 0):
            raise DistilcacheError(f"--worker {worker!r}: expected I/N, e.g. --worker 0/4")
        parsed = (int(index), int(count))
    if sum([parsed is not None, engine == "ray", finalize_only]) > 1:
        raise DistilcacheError("--worker, --engine ray and --finalize exclude each other; pick one")
    if overwrite and (parsed is not None or engine == "ray"):
        raise DistilcacheError("--overwrite works with the local engine only; delete the cache, then start workers")
    path = run_cache(cfg, overwrite, parsed, engine, ray_address, finalize_only)
    click.echo(f"cache: {path}")


@main.command("verify")
@click.argument("path", type=click.Path())
@click.option("--repair", is_flag=True, help="Remove the damaged shards' commit records and the manifest.")
@_guard
def verify(path: str, repair: bool) -> None:
    """Recompute every checksum of a cache; exit 1 naming anything missing or damaged.

    With --repair, the damaged shards' commit records and the manifest are removed: rerunning the
    same cache-teacher then recomputes exactly those shards.
    """
    from cache_format import verify as verify_mod

    report = verify_mod.verify_cache(path)
    for problem in report.problems:
        click.echo(f"FAIL {problem}", err=True)
    if not report.problems:
        click.echo(f"ok: {report.shards} shards, {report.bytes:,} bytes verified in {path}")
        return
    if repair and not report.unrepairable:
        done = verify_mod.repair(path, report)
        click.echo(f"repaired: {done}; rerun the same `pipeline cache-teacher` to recompute what was removed")
        return
    if report.unrepairable:
        damaged = ", ".join(sorted(set(report.unrepairable)))
        fix = f"{damaged} cannot be recomputed; rebuild with cache-teacher --overwrite"
    else:
        fix = "run `pipeline verify --repair` on it, then rerun the same cache-teacher to recompute the damaged shards"
    raise DistilcacheError(f"{path}: {len(report.problems)} problem(s); {fix}")


@main.command("inspect")
@click.argument("path", type=click.Path())
@click.option("--sample", default=256, show_default=True, help="Rows sampled for teacher statistics.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest and statistics as JSON.")
@_guard
def inspect(path: str, sample: int, as_json: bool) -> None:
    """Manifest, sizes per field and teacher statistics per cached temperature."""
    from cache_format.reader import CacheReader
    from teacher_cache.report import inspect_text, teacher_stats

    if sample < 1:
        raise DistilcacheError(f"--sample {sample}; sample at least 1 row")
    reader = CacheReader(path, lease=True)
    try:
        if as_json:
            manifest = {k: v for k, v in (reader.manifest or {}).items() if k != "shards"}
            click.echo(json.dumps({"manifest": manifest, "stats": teacher_stats(reader, "train", sample)}, indent=2))
        else:
            click.echo(inspect_text(reader, sample))
    finally:
        reader.close()


@main.command("train-student")
@config_options
@click.option("--online-teacher", is_flag=True, help="Run the teacher every step (the fidelity/speed baseline).")
@click.option("--resume", is_flag=True, help="Continue from the latest checkpoint in output_dir.")
@click.option("--overwrite", is_flag=True, help="Start over in an output_dir that holds an earlier run.")
@click.option("--local_rank", "--local-rank", "local_rank", type=int, default=None, hidden=True)
@_guard
def train_student(
    config_path: str | None,
    overrides: tuple[str, ...],
    print_config: bool,
    online_teacher: bool,
    resume: bool,
    overwrite: bool,
    local_rank: int | None,
) -> None:
    """Train a student with DeepSpeed ZeRO from a teacher cache (section `train`).

    One process: `pipeline train-student --config C`. N processes: `torchrun --nproc-per-node N -m pipeline
    train-student ...` or `deepspeed --num_gpus N --module pipeline train-student ...`.
    """
    from student_train.config import TrainConfig
    from student_train.trainer import run_train

    cfg = _resolve(TrainConfig, "train", config_path, overrides, print_config)
    if resume and overwrite:
        raise DistilcacheError("--resume and --overwrite exclude each other; pick one")
    summary = run_train(cfg, online_teacher=online_teacher, resume=resume, overwrite=overwrite)
    click.echo(f"model: {summary['export']}")


@main.command("evaluate")
@click.option("--model", "model_dir", required=True, type=click.Path(), help="An exported student (save_pretrained).")
@click.option("--cache", required=True, type=click.Path(), help="The teacher cache to evaluate against.")
@click.option("--split", default="eval", show_default=True)
@click.option("--sequences", default=512, show_default=True, help="Sequences evaluated (the split's first rows).")
@click.option("--batch-size", default=32, show_default=True)
@click.option("--json", "json_path", default=None, type=click.Path(), help="Also write the results here.")
@click.option("--teacher", default=None, help="Teacher to measure size and speed against [the cache's teacher].")
@click.option("--speed/--no-speed", default=True, show_default=True, help="Measure size and speed beside the teacher.")
@click.option("--speed-only", is_flag=True, help="Only size and speed, no metrics.")
@_guard
def evaluate(
    model_dir: str,
    cache: str,
    split: str,
    sequences: int,
    batch_size: int,
    json_path: str | None,
    teacher: str | None,
    speed: bool,
    speed_only: bool,
) -> None:
    """Held-out metrics of a student beside the teacher's (accuracy, perplexity, agreement, KL, cosine),
    and both models' size and speed on identical batches."""
    from cache_format.reader import CacheReader
    from student_train.evaluate import run_evaluate, table
    from student_train.speed import speed_table

    against = None
    if speed or speed_only:
        against = teacher or CacheReader(cache).settings.teacher.name
        if teacher is None and not _loadable(against):
            click.echo(f"(speed: the cache's teacher {against!r} is not at hand; pass --teacher to compare)", err=True)
            against = None
    result = run_evaluate(model_dir, cache, split, sequences, batch_size, json_path, against, not speed_only)
    if not speed_only:
        click.echo(table(result))
    if "speed" in result:
        s = result["speed"]
        click.echo("\n".join(["", *speed_table(s["report"], s["ratios"], s["reference"], s["sizes"])]))


def _loadable(name: str) -> bool:
    from pathlib import Path

    return Path(name).expanduser().is_dir()


@main.command("finetune")
@config_options
@click.option("--model", "models", multiple=True, metavar="NAME=PATH", help="A model to fine-tune (repeatable).")
@click.option("--cache", default=None, help="Refuse models whose vocabulary or tokenizer differ from this cache's.")
@click.option("--speed-only", is_flag=True, help="Only size and speed, no fine-tuning.")
@_guard
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

    from student_train.finetune import run_finetune
    from student_train.finetune_config import FinetuneConfig

    extra = []
    for item in models:
        name, sep, path = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z0-9_-]+", name) or not path:
            raise DistilcacheError(f"--model {item!r}: expected NAME=PATH with a plain name, e.g. student=runs/x/final")
        extra.append(f"models.{name}={path}")
    if cache:
        extra.append(f"cache={cache}")
    cfg = _resolve(FinetuneConfig, "finetune", config_path, (*overrides, *extra), print_config)
    summary = run_finetune(cfg, speed_only)
    click.echo(summary["markdown"])
    click.echo(f"table: {cfg.output_dir}/results.md (csv, json beside it)")
    if summary.get("cards_updated"):
        click.echo("model cards: " + ", ".join(summary["cards_updated"]))


@main.command("fetch-task")
@click.argument("name", type=click.Choice(["movie-snippets"]))
@click.option("--output", default="runs/data", show_default=True, type=click.Path(), help="Where the TSV goes.")
@_guard
def fetch_task(name: str, output: str) -> None:
    """Fetch a downstream task that works offline on a fresh machine: movie-snippets (Rotten Tomatoes
    sentences with human sentiment ratings, from PyPI's vadersentiment 3.3.2 sdist, sha256-pinned)."""
    from pathlib import Path

    from student_train.tasks import fetch_movie_snippets

    click.echo(f"task: {fetch_movie_snippets(Path(output))}")


@main.command("ablate")
@click.option("--grid", "grid_path", required=True, type=click.Path(), help="Grid YAML (configs/ablations/).")
@click.option("--cache", default=None, type=click.Path(), help="The teacher cache every variant reads (train.cache).")
@click.option("--output", default=None, type=click.Path(), help="Sweep directory [runs/ablations/<grid name>].")
@click.option("--parallel", default=None, type=int, help="Variants at once [one per visible GPU, else 1].")
@click.option("--report-only", is_flag=True, help="Rebuild the table and plot from finished variants.")
@click.option("--seeds", default=1, show_default=True, help="Student seeds per variant (standard errors over them).")
@click.option(
    "--finetune", default=None, type=click.Path(), help="A YAML with a `finetune` task: fine-tune each student."
)
@config_options
@_guard
def ablate(
    grid_path: str,
    cache: str | None,
    output: str | None,
    parallel: int | None,
    report_only: bool,
    seeds: int,
    finetune: str | None,
    config_path: str | None,
    overrides: tuple[str, ...],
    print_config: bool,
) -> None:
    """Train every variant of a grid from one cache, then write results.csv, results.md and results.png.

    The base train config comes from --config's `train` section and --set; the grid's `base` and
    each variant's overrides go on top. Rerunning skips finished variants and resumes interrupted ones.
    """
    from pipeline.config import apply_overrides, read_section
    from student_train.sweep import run_ablate

    base = apply_overrides(read_section(config_path, "train") if config_path else {}, overrides)
    click.echo(run_ablate(grid_path, cache, output, parallel, report_only, base, print_config, seeds, finetune))


if __name__ == "__main__":
    main()
