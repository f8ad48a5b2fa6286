"""Training metrics: the fixed-width step line, metrics.jsonl (+ TensorBoard when installed), summary."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cache_format.atomic import write_text_atomic
from pipeline.log import human_time

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MaskedMetric:
    """A held-out metric of `evaluate`: its name, its label in tables, which way is better, and
    how to compute it from the per-masked-token values the final evaluation saves (for paired
    bootstraps; None when it is not a mean over masked tokens)."""

    name: str
    label: str
    higher_is_better: bool
    from_tokens: Callable[[dict[str, np.ndarray], np.ndarray], float] | None


MASKED_METRICS = {
    m.name: m
    for m in (
        MaskedMetric("masked_accuracy", "masked acc", True, lambda t, i: float(t["hit"][i].mean())),
        MaskedMetric("perplexity", "perplexity", False, lambda t, i: float(np.exp(t["nll"][i].mean()))),
        MaskedMetric("teacher_top1_agreement", "top-1 agree", True, lambda t, i: float(t["agree"][i].mean())),
        # no ASCII pipes in a label: they would split a Markdown table cell
        MaskedMetric("kl_teacher_student", "KL(t‖s)", False, lambda t, i: float(t["kl"][i].mean())),
        MaskedMetric("hidden_cosine", "hidden cos", True, None),
    )
}
"""The headline metrics: accuracy, perplexity, agreement and KL at masked positions; the cosine at
non-pad ones. The model card, the sweep report and its uncertainty all read this table."""


class MetricsLog:
    """metrics.jsonl in the run directory (rank 0), mirrored to TensorBoard when it is installed."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self._tb = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                log.debug("tensorboard not installed: metrics go to metrics.jsonl only")

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        if self._tb is not None:
            scalars = record.get("eval", {}).get("student", {}) if "eval" in record else record
            prefix = "eval/" if "eval" in record else "train/"
            for key, value in scalars.items():
                if isinstance(value, int | float) and key != "step":
                    self._tb.add_scalar(prefix + key, value, record["step"])

    def truncate(self, step: int) -> None:
        """Drop records after `step` (a resumed run rewrites them), and a last line a kill cut short."""
        if not self.enabled or not self.path.is_file():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # torn by a kill mid-write: that step is redone anyway
            if record["step"] <= step:
                keep.append(line)
        write_text_atomic(self.path, "".join(line + "\n" for line in keep))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


class StepStats:
    """Turns per-step sums into records, the step line, and the final summary."""

    def __init__(self, total_steps: int, alphas: tuple[float, float, float], start_step: int = 0):
        self.total, self.alphas, self.start_step = total_steps, alphas, start_step
        self.start = time.perf_counter()
        self.tokens = 0.0
        self.step_time = self.wait = 0.0
        self.last: dict = {}

    def update(
        self, step: int, sums: torch.Tensor, lr: float, step_time: float, wait: float, data: dict, skipped: int = 0
    ) -> dict:
        """sums: global (kd, mlm, cos, n_kd, n_mlm, n_cos, tokens) of the step's micro-batches;
        skipped: optimizer steps DeepSpeed's fp16 loss scaler skipped on overflow so far."""
        kd, mlm, cos, n_kd, n_mlm, n_cos, tokens = (float(x) for x in sums)
        parts = {"kd": kd / max(n_kd, 1), "mlm": mlm / max(n_mlm, 1), "cos": cos / max(n_cos, 1)}
        loss = sum(a * parts[k] for a, k in zip(self.alphas, ("kd", "mlm", "cos"), strict=True))
        self.tokens += tokens
        self.step_time += step_time
        self.wait += wait
        elapsed = time.perf_counter() - self.start
        done = step - self.start_step
        self.last = {
            "step": step,
            "epoch": data["epoch"],
            "batch": data["batch"],
            "loss": loss,
            **parts,
            "lr": lr,
            "tokens": int(tokens),
            "kd_tokens": int(n_kd),
            "tok_s": self.tokens / max(elapsed, 1e-9),
            "step_time_s": step_time,
            "data_wait_s": wait,
            "elapsed_s": elapsed,
            "eta_s": elapsed / max(done, 1) * (self.total - step),
            "overflow_skips": skipped,
        }
        return self.last

    def line(self, r: dict) -> str:
        width = len(str(self.total))
        return (
            f"step {r['step']:>{width}}/{self.total} | loss {r['loss']:.4f} | kd {r['kd']:.4f} | "
            f"mlm {r['mlm']:.4f} | cos {r['cos']:.4f} | lr {r['lr']:.2e} | {_rate(r['tok_s'])} tok/s | "
            f"wait {100 * r['data_wait_s'] / max(r['step_time_s'], 1e-9):.1f}% | eta {human_time(r['eta_s'])}"
            + (f" | fp16 overflow skips {r['overflow_skips']}" if r.get("overflow_skips") else "")
        )

    def summary(self) -> dict:
        return {
            "steps": self.last.get("step", self.start_step),
            "tokens": int(self.tokens),
            "seconds": round(time.perf_counter() - self.start, 2),
            "tok_s": self.tokens / max(time.perf_counter() - self.start, 1e-9),
            "data_wait_fraction": self.wait / max(self.step_time, 1e-9),
            "final": {k: self.last.get(k) for k in ("loss", "kd", "mlm", "cos")},
        }

    @staticmethod
    def summary_text(s: dict, eval_table: str | None) -> str:
        f = s["final"]
        lines = [
            "train-student summary",
            f"  steps       {s['steps']}   tokens {s['tokens']:,}   wall {human_time(s['seconds'])}   "
            f"{_rate(s['tok_s'])} tok/s   data wait {100 * s['data_wait_fraction']:.2f}% of step time",
            f"  final loss  {f['loss']:.4f} (kd {f['kd']:.4f}, mlm {f['mlm']:.4f}, cos {f['cos']:.4f})"
            if f["loss"] is not None
            else "  final loss  n/a",
            f"  run dir     {s['run_dir']} (metrics.jsonl, checkpoints/)",
            f"  model       {s['export']} (save_pretrained: AutoModelForMaskedLM loads it)",
        ]
        if eval_table:
            lines += ["  held-out evaluation:"] + ["    " + line for line in eval_table.splitlines()]
        return "\n".join(lines)


def _rate(x: float) -> str:
    return f"{x / 1000:.1f}k" if x >= 1000 else f"{x:.0f}"
