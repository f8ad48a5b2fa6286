"""The results of a sweep at a glance: results.csv, results.md (deltas against the baseline,
the paper's deltas beside ours, the teacher-time amortisation) and results.png."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from cache_format.reader import CacheReader
from cache_format.store import flatten
from student_train.config import TrainConfig
from student_train.evaluate import METRICS
from student_train.sweep import Grid
from student_train.trainer import SUMMARY_FILE

HIGHER_IS_BETTER = {
    "masked_accuracy": True,
    "perplexity": False,
    "teacher_top1_agreement": True,
    "kl_teacher_student": False,
    "hidden_cosine": True,
}
LABELS = {
    "masked_accuracy": "masked acc",
    "perplexity": "perplexity",
    "teacher_top1_agreement": "top-1 agree",
    "kl_teacher_student": "KL(t‖s)",  # no ASCII pipes: they would split a Markdown table cell
    "hidden_cosine": "hidden cos",
}


def collect(grid: Grid, configs: dict[str, TrainConfig]) -> list[dict]:
    """One row per finished variant: its changes, held-out metrics, training time and loss curve."""
    rows = []
    for name, cfg in configs.items():
        run = Path(cfg.output_dir)
        if not (run / SUMMARY_FILE).is_file():
            continue
        summary = json.loads((run / SUMMARY_FILE).read_text())
        records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in records if "loss" in r]
        rows.append(
            {
                "variant": name,
                "changes": ", ".join(f"{k}={v}" for k, v in flatten(grid.variants[name]).items()) or "(base)",
                "steps": summary["steps"],
                "tokens": sum(r["tokens"] for r in steps),
                "student_seconds": round(sum(r["step_time_s"] for r in steps), 1),
                "final_loss": summary["final"]["loss"],
                **{m: (summary["eval"] or {}).get("student", {}).get(m, math.nan) for m in METRICS},
                "teacher": (summary["eval"] or {}).get("teacher", {}),
                "curve": [(r["step"], r["loss"]) for r in steps],
            }
        )
    base = next((r for r in rows if r["variant"] == grid.baseline), None)
    for r in rows:
        for m in METRICS:
            r[f"delta_{m}"] = r[m] - base[m] if base else math.nan
    return rows


def amortisation(cache: str, rows: list[dict]) -> dict:
    """Teacher time paid once (the capture's teacher seconds) against the students' time, and the
    estimate of the same sweep with the teacher online: each run adds the teacher's time for the
    tokens it trained on, at the capture's measured teacher seconds per token."""
    reader = CacheReader(cache)
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


def write_report(grid: Grid, configs: dict[str, TrainConfig], out: Path, cache: str) -> Path:
    """results.csv, results.md and results.png in `out`; returns the Markdown path."""
    rows = collect(grid, configs)
    if not rows:
        raise FileNotFoundError(f"no finished variant under {out / 'runs'}")
    _write_csv(rows, out / "results.csv")
    amort = amortisation(cache, rows)
    (out / "results.json").write_text(
        json.dumps({"grid": grid.name, "rows": [_plain(r) for r in rows], "amortisation": amort}, indent=2)
    )
    plot(rows, grid, out / "results.png")
    md = markdown(rows, grid, amort, cache)
    (out / "results.md").write_text(md)
    return out / "results.md"


def markdown(rows: list[dict], grid: Grid, amort: dict, cache: str) -> str:
    lines = [f"# Ablation `{grid.name}`", ""]
    if grid.description:
        lines += [grid.description.strip(), ""]
    lines += [
        f"Cache `{cache}`; held-out split metrics of `pipeline evaluate` (KL at T = 1, exact); "
        f"deltas against `{grid.baseline}`.",
        "",
        "| variant | changes | steps | "
        + " | ".join(f"{LABELS[m]} (Δ)" for m in METRICS)
        + " | final loss | student s |",
        "| --- | --- | ---: | " + " | ".join("---:" for _ in METRICS) + " | ---: | ---: |",
    ]
    for r in rows:
        cells = [f"{_fmt(r[m])} ({_signed(r[f'delta_{m}'])})" for m in METRICS]
        lines.append(
            f"| {r['variant']} | {r['changes']} | {r['steps']} | "
            + " | ".join(cells)
            + f" | {_fmt(r['final_loss'])} | {r['student_seconds']:.0f} |"
        )
    teacher = rows[0]["teacher"]
    if teacher:
        lines.append("| *teacher* | | | " + " | ".join(_fmt(teacher.get(m, math.nan)) for m in METRICS) + " | | |")
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
    """Our delta on the primary metric beside the paper's, and whether each direction agrees."""
    paper = grid.paper or {}
    metric = grid.primary_metric
    sign = 1.0 if HIGHER_IS_BETTER[metric] else -1.0
    ours = {r["variant"]: r[f"delta_{metric}"] for r in rows}
    lines = [
        f"Against the paper ({paper.get('source', 'reference')}; {paper.get('metric', 'its metric')}):",
        "",
        f"| variant | paper Δ | our Δ {LABELS[metric]} | direction |",
        "| --- | ---: | ---: | --- |",
    ]
    agree, compared = [], []
    for name, delta in (paper.get("deltas") or {}).items():
        if name not in ours:
            continue
        got = ours[name]
        same = (math.copysign(1.0, delta) == math.copysign(1.0, sign * got)) and got != 0
        compared.append(name)
        if same:
            agree.append(name)
        lines.append(f"| {name} | {delta:+.2f} | {_signed(got)} | {'agrees' if same else 'differs'} |")
    differ = [n for n in compared if n not in agree]
    lines += [
        "",
        f"{len(agree)} of {len(compared)} directions agree"
        + (f" ({', '.join(agree)})" if agree else "")
        + (f"; {', '.join(differ)} differ{'s' if len(differ) == 1 else ''}." if differ else "."),
    ]
    return lines


def plot(rows: list[dict], grid: Grid, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = grid.primary_metric
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in rows:
        steps, losses = zip(*r["curve"], strict=True) if r["curve"] else ((), ())
        left.plot(steps, losses, label=r["variant"])
    left.set(xlabel="optimizer step", ylabel="training loss", title="training loss", yscale="log")
    left.legend(fontsize=8)
    names = [r["variant"] for r in rows]
    right.bar(names, [r[metric] for r in rows], color=["C0" if n == grid.baseline else "C1" for n in names])
    teacher = rows[0]["teacher"].get(metric)
    if teacher is not None:
        right.axhline(teacher, color="k", linestyle="--", linewidth=1, label="teacher")
        right.legend(fontsize=8)
    right.set(ylabel=LABELS[metric], title=f"held-out {LABELS[metric]} (baseline {grid.baseline})")
    right.tick_params(axis="x", rotation=30)
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
    return {k: v for k, v in r.items() if k not in ("curve", "teacher")}


def _fmt(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.4f}" if abs(x) < 100 else f"{x:.1f}"


def _signed(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:+.4f}"
