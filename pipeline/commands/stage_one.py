"""Stage one: adapt-teacher, cache-teacher, verify, inspect."""

from __future__ import annotations

import json

import click

from pipeline.commands.common import config_options, guard, resolve
from pipeline.errors import DistilcacheError


@click.command("adapt-teacher")
@config_options
@click.option("--overwrite", is_flag=True, help="Adapt again even when output_dir holds an up-to-date teacher.")
@guard
def adapt_teacher(config_path: str | None, overrides: tuple[str, ...], print_config: bool, overwrite: bool) -> None:
    """Turn an encoder without MLM head into a masked-LM teacher (section `adapt`)."""
    from teacher_cache.adapt import run_adapt
    from teacher_cache.config import AdaptConfig

    cfg = resolve(AdaptConfig, "adapt", config_path, overrides, print_config)
    path = run_adapt(cfg, overwrite=overwrite)
    click.echo(f"teacher: {path}")


@click.command("cache-teacher")
@config_options
@click.option("--overwrite", is_flag=True, help="Replace an existing cache built with another config.")
@click.option("--worker", default=None, metavar="I/N", help="Run as worker I of N independent processes (no group).")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True)
@click.option("--ray-address", default=None, help="An existing Ray cluster (default: start a local one).")
@click.option("--finalize", "finalize_only", is_flag=True, help="Write the manifest once every shard is committed.")
@guard
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

    cfg = resolve(CacheConfig, "cache", config_path, overrides, print_config)
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
    path = run_cache(
        cfg, overwrite=overwrite, worker=parsed, engine=engine, ray_address=ray_address, finalize_only=finalize_only
    )
    click.echo(f"cache: {path}")


@click.command("verify")
@click.argument("path", type=click.Path())
@click.option("--repair", is_flag=True, help="Remove the damaged shards' commit records and the manifest.")
@guard
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
        rate = report.bytes / max(report.seconds, 1e-9) / 1e9
        click.echo(f"ok: {report.shards} shards, {report.bytes:,} bytes verified in {path} ({rate:.2f} GB/s)")
        return
    cache_problems = len(report.problems) - len(report.selections)
    if repair and not report.unrepairable and cache_problems:
        done = verify_mod.repair(path, report)
        click.echo(f"repaired: {done}; rerun the same `pipeline cache-teacher` to recompute what was removed")
        return
    if report.unrepairable:
        damaged = ", ".join(sorted(set(report.unrepairable)))
        fix = f"{damaged} cannot be recomputed; rebuild with cache-teacher --overwrite"
    elif not cache_problems:
        fix = "the cache itself is intact: rerun `pipeline select --overwrite` for each selection named, or delete it"
    else:
        fix = "run `pipeline verify --repair` on it, then rerun the same cache-teacher to recompute the damaged shards"
    raise DistilcacheError(f"{path}: {len(report.problems)} problem(s); {fix}")


@click.command("inspect")
@click.argument("path", type=click.Path())
@click.option("--sample", default=256, show_default=True, help="Rows sampled for teacher statistics.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest and statistics as JSON.")
@guard
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


@click.command("plan")
@config_options
@click.option("--tokens", type=float, default=None, help="Corpus size in tokens, instead of counting it (e.g. 3.3e9).")
@click.option("--pilot-sequences", default=128, show_default=True, help="Sequences the timed pilot captures.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@guard
def plan(
    config_path: str | None,
    overrides: tuple[str, ...],
    print_config: bool,
    tokens: float | None,
    pilot_sequences: int,
    as_json: bool,
) -> None:
    """What a cache-teacher config will cost, without building it (section `cache`): tokens and
    sequences, shards and objects, bytes per field, per view and in total, the capture time on this
    device from a timed pilot, and the bytes of the choices that change them."""
    from teacher_cache.config import CacheConfig
    from teacher_cache.estimate import plan_text, run_plan

    cfg = resolve(CacheConfig, "cache", config_path, overrides, print_config)
    if pilot_sequences < 1:
        raise DistilcacheError(f"--pilot-sequences {pilot_sequences}; give at least 1")
    result = run_plan(cfg, tokens, pilot_sequences)
    click.echo(json.dumps(result, indent=2) if as_json else plan_text(result))
