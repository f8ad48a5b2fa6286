"""The results of a sweep at a glance: results.csv, results.md (deltas against the baseline,
the paper's deltas beside ours, the teacher-time amortisation) and results.png."""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path

import numpy as np

from cache_format.reader import CacheReader
from pipeline.config import flatten
from student_train.ablations.grid import Grid
from student_train.ablations.uncertainty import TOKEN_METRICS, bootstrap_delta, paired_delta, verdict
from student_train.config import TrainConfig
from student_train.downstream.tasks import metric_values
from student_train.evaluate import METRICS
from student_train.metrics import MASKED_METRICS
from student_train.run_dir import SUMMARY_FILE

HIGHER_IS_BETTER = {name: m.higher_is_better for name, m in MASKED_METRICS.items()}
LABELS = {name: m.label for name, m in MASKED_METRICS.items()}


DOWNSTREAM = "downstream"
"""The column of the fine-tuned task's primary metric (`ablate --finetune`)."""


def _run_of(name: str) -> tuple[str, int]:
    """Run name -> (variant, student seed index): `variant` or `variant/seed-K`."""
    variant, _, seed = name.partition("/seed-")
    return variant, int(seed or 0)


def _finished(cfg: TrainConfig) -> dict | None:
    run = Path(cfg.output_dir)
    if not (run / SUMMARY_FILE).is_file():
        return None
    summary = json.loads((run / SUMMARY_FILE).read_text())
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    metrics = {m: (summary["eval"] or {}).get("student", {}).get(m, math.nan) for m in METRICS}
    downstream = run / "finetune" / "results.json"
    if downstream.is_file():
        d = json.loads(downstream.read_text())
        metric = d["task"]["metrics"][0]
        metrics[DOWNSTREAM] = next(iter(d["metrics"].values()))[metric]["mean"]
        metrics["downstream_metric"] = metric
    return {
        "dir": run,
        "summary": summary,
        "metrics": metrics,
        "steps": summary["steps"],
        "tokens": sum(r["tokens"] for r in steps),
        "seconds": sum(r["step_time_s"] for r in steps),
        "curve": [(r["step"], r["loss"]) for r in steps],
    }


def collect(grid: Grid, configs: dict[str, TrainConfig]) -> list[dict]:
    """One row per variant with a finished run: mean metrics over its student seeds, and each
    metric's delta against the baseline with its standard error (paired over seeds, or a paired
    bootstrap over held-out tokens / downstream examples with one seed)."""
    runs: dict[str, dict[int, dict]] = {}
    for name, cfg in configs.items():
        done = _finished(cfg)
        if done is not None:
            variant, seed = _run_of(name)
            runs.setdefault(variant, {})[seed] = done
    downstream = any(DOWNSTREAM in r["metrics"] for seeds in runs.values() for r in seeds.values())
    metrics = [*METRICS, *([DOWNSTREAM] if downstream else [])]
    rows = []
    for variant in grid.variants:
        if variant not in runs:
            continue
        seeds = runs[variant]
        first = seeds[min(seeds)]
        row = {
            "variant": variant,
            "changes": ", ".join(f"{k}={v}" for k, v in flatten(grid.variants[variant]).items()) or "(base)",
            "seeds": len(seeds),
            "steps": first["steps"],
            "tokens": sum(r["tokens"] for r in seeds.values()),
            "student_seconds": round(sum(r["seconds"] for r in seeds.values()), 1),
            "final_loss": statistics.fmean(r["summary"]["final"]["loss"] for r in seeds.values()),
            "teacher": (first["summary"]["eval"] or {}).get("teacher", {}),
            "curve": first["curve"],
            "downstream_metric": first["metrics"].get("downstream_metric"),
        }
        for m in metrics:
            values = [r["metrics"].get(m, math.nan) for _, r in sorted(seeds.items())]
            row[m] = statistics.fmean(values)
        rows.append(row)
    base = next((r for r in rows if r["variant"] == grid.baseline), None)
    for r in rows:
        for m in metrics:
            r[f"delta_{m}"], r[f"se_{m}"] = (
                _delta(runs, r["variant"], grid.baseline, m) if base else (math.nan, math.nan)
            )
    return rows


def _delta(runs: dict, variant: str, baseline: str, metric: str) -> tuple[float, float]:
    a, b = runs[variant], runs[baseline]
    shared = sorted(set(a) & set(b))
    if len(shared) > 1:
        return paired_delta(
            [a[k]["metrics"].get(metric, math.nan) for k in shared],
            [b[k]["metrics"].get(metric, math.nan) for k in shared],
        )
    k = shared[0] if shared else None
    if k is None:
        return math.nan, math.nan
    if metric in TOKEN_METRICS:
        ta, tb = _tokens(a[k]["dir"]), _tokens(b[k]["dir"])
        if ta is None or tb is None or len(ta["hit"]) != len(tb["hit"]):
            return a[k]["metrics"][metric] - b[k]["metrics"][metric], math.nan
        return bootstrap_delta(TOKEN_METRICS[metric], ta, tb, len(ta["hit"]))
    if metric == DOWNSTREAM:
        return _downstream_bootstrap(a[k]["dir"], b[k]["dir"])
    return a[k]["metrics"].get(metric, math.nan) - b[k]["metrics"].get(metric, math.nan), math.nan


def _tokens(run: Path) -> dict[str, np.ndarray] | None:
    path = run / "eval_tokens.npz"
    return dict(np.load(path)) if path.is_file() else None


def _downstream_bootstrap(a: Path, b: Path) -> tuple[float, float]:
    """Paired bootstrap over the validation examples of the fine-tuned task (both variants were
    validated on the same examples), averaging the metric over the recipe's seeds."""
    runs = [sorted((d / "finetune" / "runs").glob("*/seed-*/result.json")) for d in (a, b)]
    if not runs[0] or not runs[1]:
        return math.nan, math.nan
    results = [[json.loads(p.read_text()) for p in r] for r in runs]
    metric = json.loads((a / "finetune" / "results.json").read_text())["task"]["metrics"][0]
    labels = np.asarray(results[0][0]["labels"])
    preds = {side: np.asarray([r["predictions"] for r in results[i]]) for i, side in enumerate(("a", "b"))}

    def score(p: dict, idx: np.ndarray) -> float:
        return statistics.fmean(metric_values([metric], labels[idx], row[idx])[metric] for row in p["p"])

    return bootstrap_delta(score, {"p": preds["a"]}, {"p": preds["b"]}, len(labels), rounds=300)


def amortisation(reader: CacheReader, rows: list[dict]) -> dict:
    """Teacher time paid once (the capture's teacher seconds) against the students' time, and the
    estimate of the same sweep with the teacher online: each run adds the teacher's time for the
    tokens it trained on, at the capture's measured teacher seconds per token."""
    splits = reader.manifest["counts"]["splits"]
    teacher_s = sum(s["teacher_seconds"] for s in splits.values())
    per_token = teacher_s / max(sum(s["tokens"] for s in splits.values()), 1)
    students = sum(r["student_seconds"] for r in rows)
    online = students + per_token * sum(r["tokens"] for r in rows)
    return {
        "teacher_seconds_once": round(teacher_s, 1),
        "teacher_seconds_per_token": per_token,
        "student_seconds": round(students, 1),
        "cached_total_seconds": round(teacher_s + students, 1),
        "online_estimate_seconds": round(online, 1),
        "saving": online / max(teacher_s + students, 1e-9),
        # a capture with outputs.logits none ran the encoder only: online also pays the MLM head
        # and the full-vocabulary KL, so the estimate is a lower bound
        "lower_bound": reader.settings.outputs.logits == "none",
    }


def write_report(grid: Grid, configs: dict[str, TrainConfig], out: Path, reader: CacheReader) -> Path:
    """results.csv, results.md and results.png in `out`; returns the Markdown path."""
    rows = collect(grid, configs)
    if not rows:
        raise FileNotFoundError(f"no finished variant under {out / 'runs'}")
    _write_csv(rows, out / "results.csv")
    amort = amortisation(reader, rows)
    (out / "results.json").write_text(
        json.dumps({"grid": grid.name, "rows": [_plain(r) for r in rows], "amortisation": amort}, indent=2)
    )
    plot(rows, grid, out / "results.png")
    md = markdown(rows, grid, amort, reader.url)
    (out / "results.md").write_text(md)
    return out / "results.md"


def markdown(rows: list[dict], grid: Grid, amort: dict, cache: str) -> str:
    lines = [f"# Ablation `{grid.name}`", ""]
    if grid.description:
        lines += [grid.description.strip(), ""]
    shown = [*METRICS, *([DOWNSTREAM] if rows[0].get("downstream_metric") else [])]
    label = {**LABELS, DOWNSTREAM: f"downstream {rows[0].get('downstream_metric')}"}
    seeds = rows[0]["seeds"]
    how = f"paired over {seeds} student seeds" if seeds > 1 else "paired bootstrap over the held-out items"
    lines += [
        f"Cache `{cache}`; held-out metrics of `pipeline evaluate` (agreement and KL at masked positions, KL at "
        f"T = 1, exact); means over {seeds} student seed(s); Δ against `{grid.baseline}` ± one standard error "
        f"({how}).",
        "",
        "| variant | changes | steps | "
        + " | ".join(f"{label[m]} (Δ ± SE)" for m in shown)
        + " | final loss | student s (all seeds) |",
        "| --- | --- | ---: | " + " | ".join("---:" for _ in shown) + " | ---: | ---: |",
    ]
    for r in rows:
        cells = [f"{_fmt(r[m])} ({_signed(r[f'delta_{m}'])} ± {_se(r[f'se_{m}'])})" for m in shown]
        lines.append(
            f"| {r['variant']} | {r['changes']} | {r['steps']} | "
            + " | ".join(cells)
            + f" | {_fmt(r['final_loss'])} | {r['student_seconds']:.0f} |"
        )
    teacher = rows[0]["teacher"]
    if teacher:
        lines.append("| *teacher* | | | " + " | ".join(_fmt(teacher.get(m, math.nan)) for m in shown) + " | | |")
    if grid.paper:
        lines += ["", *paper_section(rows, grid)]
    bound = amort.get("lower_bound")
    caveat = "; the capture ran the encoder only, online also pays the head and the full KL" if bound else ""
    lines += [
        "",
        "Teacher time, paid once: "
        f"{amort['teacher_seconds_once']:.0f} s (capture); students: {amort['student_seconds']:.0f} s; "
        f"total {amort['cached_total_seconds']:.0f} s. The same runs with the teacher online: "
        f"{'at least ' if bound else '~'}{amort['online_estimate_seconds']:.0f} s (each run adds "
        f"{amort['teacher_seconds_per_token'] * 1e3:.2f} ms of teacher per token trained{caveat}), "
        f"{'at least ' if bound else ''}{amort['saving']:.2f}x the cached cost.",
        "",
        "![results](results.png)",
        "",
    ]
    return "\n".join(lines)


def paper_section(rows: list[dict], grid: Grid) -> list[str]:
    """Our delta beside the paper's: agrees or disagrees when resolved (|Δ| >= 2 SE), else not
    resolved. The downstream metric is compared when the variants were fine-tuned (the paper's
    deltas are GLUE scores), else the grid's primary metric."""
    paper = grid.paper or {}
    metric = DOWNSTREAM if rows and rows[0].get("downstream_metric") else grid.primary_metric
    higher = HIGHER_IS_BETTER.get(metric, True)
    label = f"downstream {rows[0]['downstream_metric']}" if metric == DOWNSTREAM else LABELS[metric]
    ours = {r["variant"]: (r[f"delta_{metric}"], r[f"se_{metric}"]) for r in rows}
    lines = [
        f"Against the paper ({paper.get('source', 'reference')}; {paper.get('metric', 'its metric')}):",
        "",
        f"| variant | paper Δ | our Δ {label} ± SE | verdict |",
        "| --- | ---: | ---: | --- |",
    ]
    tally: dict[str, list[str]] = {"agrees": [], "disagrees": [], "not resolved": []}
    for name, delta in (paper.get("deltas") or {}).items():
        if name not in ours:
            continue
        got, se = ours[name]
        v = verdict(got, se, delta, higher)
        tally[v.split(" (")[0]].append(name)
        cell = v.replace("|", "\\|")  # a verdict's |Δ| must not split the Markdown cell
        lines.append(f"| {name} | {delta:+.2f} | {_signed(got)} ± {_se(se)} | {cell} |")
    lines += [
        "",
        "; ".join(f"{len(n)} {k}" + (f" ({', '.join(n)})" if n else "") for k, n in tally.items()) + ".",
    ]
    return lines


def plot(rows: list[dict], grid: Grid, path: Path) -> None:
    """Training-loss curves, then each compared metric's Δ against the baseline with ±2 SE bars:
    a bar whose whiskers cross zero is not resolved."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [grid.primary_metric, *([DOWNSTREAM] if rows and rows[0].get("downstream_metric") else [])]
    fig, axes = plt.subplots(1, 1 + len(shown), figsize=(6 * (1 + len(shown)), 4.5))
    for r in rows:
        steps, losses = zip(*r["curve"], strict=True) if r["curve"] else ((), ())
        axes[0].plot(steps, losses, label=r["variant"])
    axes[0].set(xlabel="optimizer step", ylabel="training loss", title="training loss", yscale="log")
    axes[0].legend(fontsize=8)
    others = [r for r in rows if r["variant"] != grid.baseline]
    for ax, metric in zip(axes[1:], shown, strict=True):
        label = f"downstream {rows[0]['downstream_metric']}" if metric == DOWNSTREAM else LABELS[metric]
        errors = [2 * r[f"se_{metric}"] if math.isfinite(r[f"se_{metric}"]) else 0.0 for r in others]
        ax.bar([r["variant"] for r in others], [r[f"delta_{metric}"] for r in others], yerr=errors, capsize=4)
        ax.axhline(0.0, color="k", linewidth=1)
        ax.set(ylabel=f"Δ {label} vs {grid.baseline}", title=f"Δ {label} ± 2 SE ({rows[0]['seeds']} seed(s))")
        ax.tick_params(axis="x", rotation=30)
    fig.suptitle(f"ablation {grid.name}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _write_csv(rows: list[dict], path: Path) -> None:
    plain = [_plain(r) for r in rows]
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(plain[0]))
        writer.writeheader()
        writer.writerows(plain)


def _plain(r: dict) -> dict:
    return {k: v for k, v in r.items() if k not in ("curve", "teacher", "dir")}


def _fmt(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.4f}" if abs(x) < 100 else f"{x:.1f}"


def _signed(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:+.4f}"


def _se(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:.4f}"
