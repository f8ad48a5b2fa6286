"""`pipeline`: the distilcache command line. Parse, validate, log the resolved config, run.

User errors print one line (`error: <problem>; <fix>`) and exit 1; the stages do the work.
"""

from __future__ import annotations

import click

from pipeline.commands import downstream, stage_one, stage_two
from pipeline.log import setup_logging


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(verbose: bool) -> None:
    """distilcache: distil masked language models from a cached teacher.

    \b
    Stage one   pipeline adapt-teacher / cache-teacher / verify / inspect
    Stage two   pipeline select / train-student / evaluate / ablate
    Config      --config FILE.yaml (one section per stage) and --set key=value overrides.
    """
    setup_logging(verbose)


for command in (
    stage_one.adapt_teacher,
    stage_one.cache_teacher,
    stage_one.verify,
    stage_one.inspect,
    stage_one.plan,
    stage_two.select,
    stage_two.train_student,
    stage_two.evaluate,
    stage_two.ablate,
    downstream.finetune,
    downstream.fetch_task,
):
    main.add_command(command)


if __name__ == "__main__":
    main()
