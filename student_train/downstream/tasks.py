"""Downstream task data: read through `datasets`, labels mapped, split, tokenized once per tokenizer.

Labels may be integers (classes), strings (mapped to ids in sorted order; the mapping is
recorded with the results) or floats (regression). Validation comes from a split, separate
files, or a seeded fraction of the training examples — the same for every model and seed.
Also: `fetch_movie_snippets`, the offline demo task (PyPI's vadersentiment sdist, pinned).
"""

from __future__ import annotations

import hashlib
import io
import math
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cache_format.rng import STREAM_TASK, permutation
from pipeline.errors import DistilcacheError, first_line
from pipeline.paths import expand_paths
from student_train.downstream.config import METRICS, TaskConfig

FORMATS = {".csv": "csv", ".tsv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


@dataclass
class TaskData:
    """Texts and labels of both splits, and what the labels mean."""

    train_text: list[str]
    train_pair: list[str] | None
    train_labels: np.ndarray
    eval_text: list[str]
    eval_pair: list[str] | None
    eval_labels: np.ndarray
    type: str  # classification | regression
    label_names: list[str] | None  # classification: the name of each class id
    metrics: list[str]

    @property
    def num_labels(self) -> int:
        return 1 if self.type == "regression" else len(self.label_names or [])

    def describe(self) -> dict:
        return {
            "type": self.type,
            "num_labels": self.num_labels,
            "label_names": self.label_names,
            "train_examples": len(self.train_text),
            "eval_examples": len(self.eval_text),
            "metrics": self.metrics,
        }


def load_task(cfg: TaskConfig) -> TaskData:
    train, evaluation = _load_splits(cfg)
    for ds, which in ((train, "training"), (evaluation, "validation")):
        if ds is None:
            continue
        missing = [
            c for c in (cfg.text_column, cfg.text_pair_column, cfg.label_column) if c and c not in ds.column_names
        ]
        if missing:
            raise DistilcacheError(
                f"task: the {which} data has no column {missing[0]!r} (columns: {', '.join(ds.column_names)}); "
                "set task.text_column / text_pair_column / label_column"
            )
    if evaluation is None:
        if not cfg.validation_fraction:
            raise DistilcacheError(
                "task: no validation data; set task.validation_split, task.validation_paths or task.validation_fraction"
            )
        held = max(1, round(cfg.validation_fraction * len(train)))
        order = permutation(cfg.split_seed, STREAM_TASK, len(train))
        evaluation, train = train.select(np.sort(order[:held])), train.select(np.sort(order[held:]))
    train = _subset(train, cfg.max_train_examples, cfg.split_seed + 1)
    evaluation = _subset(evaluation, cfg.max_eval_examples, cfg.split_seed + 2)
    raw_train, raw_eval = list(train[cfg.label_column]), list(evaluation[cfg.label_column])
    kind, names, y_train, y_eval = _labels(raw_train, raw_eval, cfg.type)
    _check_spread(kind, names, y_train, "training")
    _check_spread(kind, names, y_eval, "validation")
    pair = cfg.text_pair_column
    return TaskData(
        [str(t) for t in train[cfg.text_column]],
        [str(t) for t in train[pair]] if pair else None,
        y_train,
        [str(t) for t in evaluation[cfg.text_column]],
        [str(t) for t in evaluation[pair]] if pair else None,
        y_eval,
        kind,
        names,
        list(cfg.metrics) or list(METRICS[kind][:2]),
    )


def _load_splits(cfg: TaskConfig):
    import datasets

    datasets.disable_progress_bars()
    try:
        if cfg.source == "hub":
            data = datasets.load_dataset(cfg.name, cfg.subset)
            return data[cfg.split], data[cfg.validation_split] if cfg.validation_split else None
        if cfg.source == "disk":
            data = datasets.load_from_disk(cfg.paths[0])
            if isinstance(data, datasets.Dataset):
                return data, None
            return data[cfg.split], data[cfg.validation_split] if cfg.validation_split else None
        return _files(cfg.paths), _files(cfg.validation_paths) if cfg.validation_paths else None
    except (FileNotFoundError, ValueError, KeyError, ConnectionError) as exc:
        raise DistilcacheError(f"task: cannot load the data ({first_line(exc)}); check task.*") from None


def _files(patterns: list[str]):
    import datasets

    files = [str(p) for p in expand_paths(patterns, "task.paths", FORMATS)]
    kinds = {FORMATS.get(Path(f).suffix.lower()) for f in files}
    if None in kinds or len(kinds) != 1:
        raise DistilcacheError(f"task: files must all be one of {', '.join(FORMATS)} (got {files[:3]})")
    kind = kinds.pop()
    # a TSV's quotes are text (movie reviews quote titles): no quoting
    extra = {"delimiter": "\t", "quoting": 3} if all(f.lower().endswith(".tsv") for f in files) else {}
    return datasets.load_dataset(kind, data_files=files, split="train", **extra)


def _subset(ds, limit: int | None, seed: int):
    if limit is None or limit >= len(ds):
        return ds
    return ds.select(np.sort(permutation(seed, STREAM_TASK, len(ds))[:limit]))


def _labels(train: list, evaluation: list, kind: str) -> tuple[str, list[str] | None, np.ndarray, np.ndarray]:
    """(type, class names, train ids or values, eval ids or values)."""
    values = train + evaluation
    if any(v is None for v in values):
        raise DistilcacheError("task: some labels are empty; drop those rows or pick another label_column")
    numeric = all(isinstance(v, int | float | np.number) and not isinstance(v, bool) for v in values)
    if kind == "auto":
        kind = "regression" if numeric and any(not float(v).is_integer() for v in values) else "classification"
    if kind == "regression":
        if not numeric:
            raise DistilcacheError("task.type=regression needs numeric labels")
        return kind, None, np.asarray(train, np.float32), np.asarray(evaluation, np.float32)
    if numeric:
        ids = sorted({int(v) for v in values})
        if ids != list(range(len(ids))):
            raise DistilcacheError(f"task: integer class labels must be 0..C-1, got {ids[:10]}")
        names = [str(i) for i in ids]
        return kind, names, np.asarray(train, np.int64), np.asarray(evaluation, np.int64)
    names = sorted({str(v) for v in values})
    index = {n: i for i, n in enumerate(names)}
    return (
        kind,
        names,
        np.asarray([index[str(v)] for v in train], np.int64),
        np.asarray([index[str(v)] for v in evaluation], np.int64),
    )


def _check_spread(kind: str, names: list[str] | None, labels: np.ndarray, which: str) -> None:
    """A classifier needs two classes to learn and to be scored against (a one-class split scores
    accuracy 1.0 for any model); a regression needs labels that vary."""
    if kind == "classification" and len(np.unique(labels)) < 2:
        only = names[int(labels[0])] if len(labels) and names else "none"
        raise DistilcacheError(
            f"task: the {which} examples hold {len(np.unique(labels))} class ({only!r} only); a classification "
            "task needs at least two: check task.label_column, the split, or the validation_fraction"
        )
    if kind == "regression" and (len(labels) < 2 or float(np.ptp(labels)) == 0.0):
        raise DistilcacheError(
            f"task: the {which} labels are constant; a regression needs labels that vary (check task.label_column)"
        )


def metric_values(names: list[str], labels: np.ndarray, predictions: np.ndarray) -> dict[str, float]:
    """The task's metrics, by scikit-learn / scipy (predictions: class ids, or values for regression)."""
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    out = {}
    for name in names:
        if name == "accuracy":
            out[name] = float(accuracy_score(labels, predictions))
        elif name == "f1":
            binary = len(np.unique(labels)) <= 2 and set(np.unique(np.concatenate([labels, predictions]))) <= {0, 1}
            out[name] = float(f1_score(labels, predictions, average="binary" if binary else "macro"))
        elif name == "mcc":
            out[name] = float(matthews_corrcoef(labels, predictions))
        elif name == "pearson":
            out[name] = float(pearsonr(labels, predictions).statistic)
        elif name == "spearman":
            out[name] = float(spearmanr(labels, predictions).statistic)
        out[name] = out[name] if math.isfinite(out[name]) else 0.0  # constant predictions: no correlation
    return out


# ----------------------------------------------------------------------------- the demo task

VADER = "vadersentiment==3.3.2"
VADER_SHA256 = "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9"
SNIPPETS = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"


def fetch_movie_snippets(out: Path) -> Path:
    """Movie-review sentences (the Rotten Tomatoes snippets of SST) with ~20 human ratings each, from
    the vadersentiment 3.3.2 sdist on PyPI, fetched with pip pinned by sha256, as a TSV of
    label (1: mean rating > 0, 0: < 0; neutral dropped), score and sentence. Reused once written."""
    target = out / "movie-snippets.tsv"
    if target.is_file():
        return target
    with tempfile.TemporaryDirectory() as tmp:
        req = Path(tmp) / "requirements.txt"
        req.write_text(f"{VADER} --hash=sha256:{VADER_SHA256}\n")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--require-hashes"]
        done = subprocess.run([*cmd, "-r", str(req), "-d", tmp, "-q"], capture_output=True, text=True)
        sdists = list(Path(tmp).glob("*.tar.gz"))
        if done.returncode or not sdists:
            raise DistilcacheError(f"cannot fetch {VADER} from the package index ({done.stderr.strip()[-200:]})")
        blob = sdists[0].read_bytes()
        if hashlib.sha256(blob).hexdigest() != VADER_SHA256:
            raise DistilcacheError(f"{sdists[0].name} does not have the pinned sha256; refusing it")
    with tarfile.open(fileobj=io.BytesIO(blob)) as outer:
        inner = next(m for m in outer.getmembers() if m.name.endswith("additional_resources/hutto_ICWSM_2014.tar.gz"))
        with tarfile.open(fileobj=outer.extractfile(inner)) as data:
            text = data.extractfile(SNIPPETS).read().decode("utf-8")
    rows = ["label\tscore\tsentence"]
    for line in text.splitlines():
        parts = line.strip("\r").split("\t")
        if len(parts) < 3 or float(parts[1]) == 0:
            continue  # neutral (mean rating 0): no sentiment label
        rows.append(f"{int(float(parts[1]) > 0)}\t{float(parts[1]):.4f}\t{parts[2].strip()}")
    out.mkdir(parents=True, exist_ok=True)
    tmp_target = target.with_suffix(".tsv.partial")
    tmp_target.write_text("\n".join(rows) + "\n", encoding="utf-8")
    tmp_target.replace(target)
    return target
