"""The downstream report: mean ± std over seeds per model, retention of the reference, size and
speed, as results.md / results.csv / results.json, and a section in each model's card."""

from __future__ import annotations

import csv
import hashlib
import json
import statistics
from pathlib import Path

import yaml

from cache_format.reader import CacheReader
from pipeline.config import to_dict
from pipeline.errors import DistilcacheError
from student_train import speed
from student_train.card import add_downstream, lineage_problem
from student_train.downstream.config import FinetuneConfig
from student_train.downstream.tasks import TaskData

PAPER = (
    "DistilBERT against BERT-base (Sanh et al. 2019): GLUE 77.0 vs 79.5 (96.9 % retained), IMDb 92.82 vs "
    "93.46 (99.3 %), 66 M vs 110 M parameters (0.60×), 60 % faster inference."
)


def check_lineage(models: dict[str, str], cache: str, storage_options: dict | None = None) -> None:
    """Refuse models whose vocabulary or tokenizer differ from the cache's."""
    settings = CacheReader(cache, storage_options=storage_options or None).settings
    for name, path in models.items():
        local = Path(path.removeprefix("random:"))
        problem = lineage_problem(local, settings) if local.is_dir() else None
        if problem:
            raise DistilcacheError(
                f"model {name} ({path}) does not match the cache {cache}: {problem}; "
                "compare models distilled from this cache's teacher"
            )


def aggregate(results: dict[str, list[dict]], metrics: list[str]) -> dict[str, dict]:
    """Per model and metric: mean, std over seeds (sample std; None with one seed, where a spread is
    unknown rather than zero) and the values."""
    out = {}
    for name, runs in results.items():
        out[name] = {}
        for m in metrics:
            values = [r["metrics"][m] for r in runs]
            std = statistics.stdev(values) if len(values) > 1 else None
            out[name][m] = {"mean": statistics.fmean(values), "std": std, "values": values}
    return out


def write(
    cfg: FinetuneConfig, reference: str, task: TaskData, results: dict, sizes: dict[str, dict], out: Path
) -> dict:
    metrics = task.metrics
    agg = aggregate(results, metrics) if results else {}
    retention = {
        n: {m: agg[n][m]["mean"] / agg[reference][m]["mean"] for m in metrics if agg[reference][m]["mean"]} for n in agg
    }
    rel = speed.ratios(sizes, reference) if sizes else {}
    summary = {
        "task": to_dict(cfg.task) | task.describe(),
        "recipe": to_dict(cfg.recipe),
        "reference": reference,
        "models": cfg.models,
        "metrics": agg,
        "retention": retention,
        "speed": sizes,
        "speed_vs_reference": rel,
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    md = markdown(cfg, reference, task, agg, retention, sizes, rel)
    (out / "results.md").write_text(md)
    _write_csv(out / "results.csv", agg, retention, sizes, rel, metrics)
    key = hashlib.sha256(json.dumps(to_dict(cfg.task), sort_keys=True).encode()).hexdigest()[:10]
    summary["cards_updated"] = []
    for name, path in cfg.models.items() if agg else ():
        local = Path(path)
        if not path.startswith("random:") and local.is_dir() and add_downstream(local, key, md):
            summary["cards_updated"].append(str(local / "README.md"))
        else:  # not a distilcache student: its own card, beside the results
            card = out / "cards" / f"{name}.md"
            card.parent.mkdir(exist_ok=True)
            meta = yaml.safe_dump({"base_model": path, "tags": ["distilcache", "downstream"]}, sort_keys=False)
            card.write_text(f"---\n{meta}---\n\n# {name}: downstream results\n\n{md}", encoding="utf-8")
            summary["cards_updated"].append(str(card))
    summary["markdown"] = md
    return summary


def markdown(cfg, reference, task, agg, retention, sizes, rel) -> str:
    metrics, seeds = task.metrics, cfg.recipe.seeds
    what = cfg.task.name or ", ".join(Path(p).name for p in cfg.task.paths)
    lines = [
        f"## Downstream: {what} ({task.type}, {len(task.train_text):,} training / {len(task.eval_text):,} validation "
        "examples)",
        "",
    ]
    if agg:
        r = cfg.recipe
        spread = "mean ± std over seeds" if len(seeds) > 1 else "one seed: no spread (give `recipe.seeds` more)"
        lines += [
            f"Recipe: lr {r.lr:g}, {r.max_steps or r.epochs} {'steps' if r.max_steps else 'epochs'}, batch "
            f"{r.batch_size}, max {r.max_seq_len} tokens, seeds {seeds}; {spread}; retention = "
            f"mean / {reference}'s.",
            "",
            "| model | " + " | ".join(metrics) + f" | retention ({metrics[0]}) |",
            "|---|" + "---:|" * (len(metrics) + 1),
        ]
        for name, a in agg.items():
            cells = [_mean_std(a[m]) for m in metrics]
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {100 * retention[name].get(metrics[0], 0):.1f} % |")
        lines.append("")
    if not sizes:
        return "\n".join([*lines, PAPER]) + "\n"
    lines += speed.speed_table(sizes, rel, reference, cfg.speed.batch_sizes)
    first = next(iter(sizes.values()))
    how = "identical" if first["identical_batches"] else "the same texts in"
    lines += [
        "",
        f"Speed: one run, the models interleaved on {how} batches of {cfg.recipe.max_seq_len} tokens, "
        f"{first['threads']} threads on {first['device']}, warm-up excluded, medians of {cfg.speed.repeats}.",
        "",
        PAPER,
    ]
    return "\n".join(lines) + "\n"


def _write_csv(path: Path, agg, retention, sizes, rel, metrics) -> None:
    names = list(sizes) or list(agg)
    fields = ["model"] + [f"{m}_{k}" for m in metrics for k in ("mean", "std")] + [f"retention_{m}" for m in metrics]
    fields += sorted({k for s in sizes.values() for k in s if k not in ("device", "identical_batches")})
    fields += [f"{k}_vs_reference" for k in sorted({k for r in rel.values() for k in r})]
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for n in names:
            row = {"model": n, **sizes.get(n, {})}
            for m in metrics:
                if n in agg:
                    row[f"{m}_mean"], row[f"{m}_std"] = agg[n][m]["mean"], agg[n][m]["std"]
                    row[f"retention_{m}"] = retention[n].get(m)
            row.update({f"{k}_vs_reference": v for k, v in rel.get(n, {}).items()})
            writer.writerow(row)


def _mean_std(stat: dict) -> str:
    return f"{stat['mean']:.4f}" + (f" ± {stat['std']:.4f}" if stat["std"] is not None else "")
