"""What every command shares: one-line errors, the config options, and the resolved config."""

from __future__ import annotations

import errno
import functools
import logging
import shlex
import sys
from collections.abc import Callable
from typing import Any

import click

from pipeline.config import load_config, to_yaml
from pipeline.errors import DistilcacheError, first_line

log = logging.getLogger("pipeline")


def guard(fn: Callable) -> Callable:
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


def resolve(cls: type, section: str, config_path: str | None, overrides: tuple[str, ...], print_only: bool):
    cfg = load_config(cls, section, config_path, overrides)
    text = to_yaml(cfg, redact=True)
    if print_only:
        click.echo(text, nl=False)
        sys.exit(0)
    log.info("resolved %s config:\n%s", section, text.rstrip())
    return cfg
