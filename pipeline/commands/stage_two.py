"""Stage two: train-student, evaluate, ablate."""

from __future__ import annotations

import click

from pipeline.commands.common import config_options, guard, resolve
from pipeline.errors import DistilcacheError


@click.command("train-student")
@config_options
@click.option("--online-teacher", is_flag=True, help="Run the teacher every step (the fidelity/speed baseline).")
@click.option("--resume", is_flag=True, help="Continue from the latest checkpoint in output_dir.")
@click.option("--overwrite", is_flag=True, help="Start over in an output_dir that holds an earlier run.")
@click.option(
    "--follow",
    is_flag=True,
    help="Train while the cache is captured: read committed shards, wait for the next (data.follow; "
    "needs data.order=windowed).",
)
@click.option("--local_rank", "--local-rank", "local_rank", type=int, default=None, hidden=True)
@guard
def train_student(
    config_path: str | None,
    overrides: tuple[str, ...],
    print_config: bool,
    online_teacher: bool,
    resume: bool,
    overwrite: bool,
    follow: bool,
    local_rank: int | None,
) -> None:
    """Train a student with DeepSpeed ZeRO from a teacher cache (section `train`).

    One process: `pipeline train-student --config C`. N processes: `torchrun --nproc-per-node N -m pipeline
    train-student ...` or `deepspeed --num_gpus N --module pipeline train-student ...`.
    """
    from student_train.config import TrainConfig
    from student_train.trainer import run_train

    cfg = resolve(
        TrainConfig, "train", config_path, overrides + (("data.follow=true",) if follow else ()), print_config
    )
    if resume and overwrite:
        raise DistilcacheError("--resume and --overwrite exclude each other; pick one")
    summary = run_train(cfg, online_teacher=online_teacher, resume=resume, overwrite=overwrite)
    click.echo(f"model: {summary['export']}")


@click.command("evaluate")
@config_options
@click.option("--model", default=None, type=click.Path(), help="An exported student (evaluate.model).")
@click.option("--cache", default=None, type=click.Path(), help="The teacher cache (evaluate.cache).")
@click.option("--split", default=None, help="Cache split [eval].")
@click.option("--sequences", default=None, type=int, help="Sequences evaluated (the split's first rows) [512].")
@click.option("--batch-size", default=None, type=int, help="Sequences per forward [32].")
@click.option("--json", "output_json", default=None, type=click.Path(), help="Also write the results here.")
@click.option("--teacher", default=None, help="Teacher to measure size and speed against [the cache's teacher].")
@click.option("--speed/--no-speed", default=None, help="Measure size and speed beside the teacher [speed].")
@click.option("--speed-only", is_flag=True, default=None, help="Only size and speed, no metrics.")
@guard
def evaluate(config_path: str | None, overrides: tuple[str, ...], print_config: bool, **flags) -> None:
    """Held-out metrics of a student beside the teacher's (accuracy, perplexity, agreement, KL, cosine),
    and both models' size and speed on identical batches (section `evaluate`; the flags set its keys)."""
    from student_train.config import EvaluateConfig
    from student_train.evaluate import run_evaluate, table
    from student_train.speed import speed_table

    given = [f"{key}={value}" for key, value in flags.items() if value is not None]
    cfg = resolve(EvaluateConfig, "evaluate", config_path, (*overrides, *given), print_config)
    result = run_evaluate(cfg)
    if not cfg.speed_only:
        click.echo(table(result))
    if "speed" in result:
        s = result["speed"]
        click.echo("\n".join(["", *speed_table(s["report"], s["ratios"], s["reference"], s["sizes"])]))


@click.command("select")
@config_options
@click.option("--cache", default=None, type=click.Path(), help="The teacher cache (select.cache).")
@click.option(
    "--score", default=None, help="teacher_loss, entropy, miniplm (needs --reference) or random [teacher_loss]."
)
@click.option("--fraction", default=None, type=float, help="Share of the sequences kept [0.5].")
@click.option("--keep", default=None, help="Keep the highest or lowest scores [highest].")
@click.option("--reference", default=None, help="miniplm's reference MLM: teacher:N or a model name or path.")
@click.option("--name", default=None, help="The selection's name [<score>-<percent>].")
@click.option("--overwrite", is_flag=True, help="Replace a selection of the same name made with another config.")
@guard
def select(config_path: str | None, overrides: tuple[str, ...], print_config: bool, overwrite: bool, **flags) -> None:
    """Score every sequence of a cache from the teacher's outputs and keep a fraction of them, as a
    fingerprinted selection beside the cache (section `select`; the flags set its keys). Train on it
    with `pipeline train-student --set data.selection=NAME`; the cache is never rewritten."""
    from student_train.selection.config import SelectConfig
    from student_train.selection.run import run_select

    given = [f"{key}={value}" for key, value in flags.items() if value is not None]
    cfg = resolve(SelectConfig, "select", config_path, (*overrides, *given), print_config)
    record = run_select(cfg, overwrite=overwrite)
    click.echo(
        f"selection {record['name']}: {record['kept_sequences']} of {record['sequences']} sequences; "
        f"train with --set data.selection={record['name']}"
    )


@click.command("ablate")
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
@guard
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
    from student_train.ablations.run import AblateOptions, run_ablate

    base = apply_overrides(read_section(config_path, "train") if config_path else {}, overrides)
    opts = AblateOptions(grid_path, base, cache, output, parallel, report_only, print_config, seeds, finetune)
    click.echo(run_ablate(opts))
