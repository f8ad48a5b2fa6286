"""`pipeline train-student`: a student trained with DeepSpeed ZeRO from a teacher cache.

One explicit class: setup() -> train() -> export, with save_checkpoint() and cleanup(). The
per-batch math lives in `_loss_step`. Losses are normalised by the global token counts of each
micro-batch (one small all-reduce), so 1 and N processes fed the same global micro-batches
compute the same loss. In cached mode the teacher never runs; `--online-teacher` runs it on the
cached input ids as the fidelity and speed baseline.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as torch_dist
import yaml
from tqdm import tqdm

from cache_format.atomic import write_json_atomic
from cache_format.family import hidden_size
from cache_format.hashing import tokenizer_sha256
from cache_format.kd_modes import KD_MODES
from cache_format.layout import valid_positions
from cache_format.reader import CacheReader
from cache_format.selection import SELECTION_KEYS, load_selection
from pipeline.config import to_dict
from pipeline.errors import DistilcacheError
from pipeline.versions import library_versions
from student_train import checkpoint, ds_config, losses, token_select
from student_train.checks import check_cache, kd_mode_advice
from student_train.config import TrainConfig, reader_options
from student_train.data import KD_SCORE, CacheBatches, DevicePrefetch, FieldSelection, to_device
from student_train.evaluate import evaluate, load_rows, table
from student_train.export import export_student
from student_train.follow import CaptureStalled, Follower
from student_train.head_loss import HeadLoss, chunked_head_loss
from student_train.metrics import MetricsLog, StepStats
from student_train.model import DistillModule, init_from_teacher, load_cached_teacher, student_config
from student_train.run_dir import SUMMARY_FILE, RunDir
from student_train.runtime import init_training, resolve_head_dtype, resolve_precision

log = logging.getLogger(__name__)
LOSS_TERMS = ("kd", "mlm", "cos")


class Trainer:
    def __init__(self, cfg: TrainConfig, online_teacher: bool = False, resume: bool = False, overwrite: bool = False):
        self.cfg, self.online, self.resume, self.overwrite = cfg, online_teacher, resume, overwrite
        self.run_dir = Path(cfg.output_dir)
        self.room = RunDir(self.run_dir)
        self.step = 0
        self.teacher: torch.nn.Module | None = None

    # ----------------------------------------------------------------------------- setup

    def setup(self) -> None:
        """Everything is checked before anything is written: a refused run (a resume whose config
        differs, a cache that does not fit) leaves the run directory as it was."""
        self.room.lock()
        if not self.resume:
            self.room.clear_earlier_run(self.overwrite)
        self.rank, self.world, self.device = init_training()
        self.cpu = self.device.type == "cpu"
        self.precision = resolve_precision(self.cfg.precision, self.cpu)
        _seed_everything(self.cfg.seed)
        self._setup_cache_and_model()
        self._setup_data()
        checkpoint_to_load = self._check_resume() if self.resume else None
        self._setup_engine()
        self._setup_run_dir()
        if checkpoint_to_load is not None:
            self._load_checkpoint(*checkpoint_to_load)

    def _setup_cache_and_model(self) -> None:
        from transformers import AutoConfig, AutoModelForMaskedLM, AutoTokenizer

        cfg = self.cfg
        self.reader = CacheReader(cfg.cache, lease=True, **reader_options(cfg.data))
        self.follower = Follower(self.reader, cfg.data.follow_timeout) if self.reader.following else None
        self.followed = None
        if self.follower is not None:
            self.followed = {"cache_fingerprint": self.reader.settings.fingerprint, **self._progress("at_start")}
            log.info(
                "following %s while it is captured: %d/%d shards committed", self.reader.url,
                self.followed["committed_at_start"], self.followed["shards"],
            )  # fmt: skip
        teacher_dir = self._wait(self.reader.teacher_dir)  # written right after the header
        self.teacher_config = AutoConfig.from_pretrained(teacher_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
        config = student_config(cfg.student, self.teacher_config)
        problems = check_cache(self.reader, cfg, config, tokenizer_sha256(self.tokenizer), self.online)
        if problems:
            raise DistilcacheError(f"cache {self.reader.url} does not fit this run: " + "; ".join(problems))
        advice = None if self.online or self.follower else kd_mode_advice(self.reader, cfg)
        if advice and self.rank == 0:
            log.warning("%s", advice)
        student = AutoModelForMaskedLM.from_config(config)
        if cfg.student.init == "teacher" or self.online:
            why = "student.init=teacher (or use student.init=random) and --online-teacher"
            teacher = load_cached_teacher(self.reader.settings.teacher, cfg.student.teacher, "student.teacher", why)
            if cfg.student.init == "teacher":
                layer_map = init_from_teacher(student, teacher.state_dict(), self.teacher_config)
                log.info("student: init from teacher layers %s", layer_map)
            if self.online:
                dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision, torch.float32)
                self.teacher = teacher.to(self.device, dtype).eval().requires_grad_(False)
        self.module = DistillModule(student, self.reader.settings.teacher.hidden_size)
        self.head = self.reader.head(self.device)  # exact KD, and exact KL in evaluation
        fit = self.reader.hidden_fit()  # a fitted hidden codec's tensors, decoded with inside the step
        self.hidden_fit = None if fit is None else {k: v.to(self.device) for k, v in fit.items()}
        self.head_dtype = resolve_head_dtype(cfg.loss.exact_head_dtype, self.device)
        if cfg.loss.kd_tokens in token_select.TEACHER_SCORES and cfg.loss.kd_mode != "exact" and not self.online:
            raise DistilcacheError(
                f"loss.kd_tokens={cfg.loss.kd_tokens} scores tokens by the teacher's full distribution: set "
                "loss.kd_mode=exact, run with --online-teacher, or use loss.kd_tokens=random"
            )
        self.exact = None
        if cfg.loss.kd_mode == "exact" and cfg.loss.alpha_ce > 0 and not self.online:
            low = self.head_dtype != torch.float32  # a low-precision copy: evaluation keeps the fp32 head
            kd_head = copy.deepcopy(self.head).to(self.head_dtype) if low else self.head
            self.exact = losses.ExactHead(kd_head, self.head_dtype, cfg.loss.exact_chunk_tokens)
        log.info(
            "student: %s, %d layers, width %d, %.1fM parameters",
            config.model_type,
            getattr(config, "n_layers", getattr(config, "num_hidden_layers", 0)),
            hidden_size(config),
            sum(p.numel() for p in student.parameters()) / 1e6,
        )

    def _setup_data(self) -> None:
        cfg, loss = self.cfg, self.cfg.loss
        kd = KD_MODES[loss.kd_mode] if not self.online and loss.alpha_ce > 0 else None
        cosine = not self.online and loss.alpha_cos > 0
        fields = FieldSelection.for_run(
            self.reader.settings, set(self.reader.fields), kd, cosine, loss.temperature, loss.topk
        )
        streams = cfg.data.streams or self.world
        self.selection, keep, token_score = None, None, None
        if cfg.data.selection:
            layout = self.reader.layouts[cfg.data.split]
            record, keep, token_score = load_selection(
                self.reader.storage, cfg.data.selection, self.reader.settings.fingerprint, cfg.data.split, layout.rows
            )
            self.selection = {k: record.get(k) for k in SELECTION_KEYS} | {"sha256": record["data"]["sha256"]}
            log.info(
                "selection %s: %d of %d sequences (%s, %s, fraction %g)", record["name"], record["kept_sequences"],
                record["sequences"], record["score"], record["keep"], record["fraction"],
            )  # fmt: skip
            if token_score is not None and loss.kd_tokens == "entropy" and loss.alpha_ce > 0:
                log.info("kd_tokens entropy: the teacher's per-token entropy read from the selection, not rebuilt")
            else:
                token_score = None
        try:
            self.batches = CacheBatches(
                self.reader, cfg.data, fields, cfg.seed, streams, self.rank, self.world, keep, token_score
            )
            per_epoch = [self.batches.plan(e).batches for e in range(int(np.ceil(cfg.epochs)))]
        except ValueError as exc:
            raise DistilcacheError(str(exc)) from None
        whole, frac = int(cfg.epochs), cfg.epochs - int(cfg.epochs)
        micro = sum(per_epoch[:whole]) + (round(frac * per_epoch[whole]) if frac else 0)
        self.total_steps = micro // cfg.data.grad_accum_steps
        if cfg.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.max_steps)
        if self.total_steps < 1:
            raise DistilcacheError(
                f"0 optimizer steps: the split gives {per_epoch[0]} micro-batch(es) per epoch of "
                f"{cfg.data.micro_batch_size * self.world} sequences; lower data.micro_batch_size, "
                "data.grad_accum_steps or raise epochs"
            )
        self.eval_split = "eval" if "eval" in self.reader.splits else None
        self.eval_rows = None  # read at the first evaluation (a follower: once the capture got there)

    def _setup_engine(self) -> None:
        import deepspeed

        template = ds_config.load_template(self.cfg.deepspeed_config)
        self.ds_config = ds_config.resolve(template, self.cfg, self.world, self.total_steps, self.precision, self.cpu)
        params = [p for p in self.module.parameters() if p.requires_grad]
        self.engine, *_ = deepspeed.initialize(model=self.module, model_parameters=params, config=self.ds_config)
        self.zero_stage = int(self.ds_config.get("zero_optimization", {}).get("stage", 0))

    def _setup_run_dir(self) -> None:
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(self.cfg), sort_keys=False))
            (self.run_dir / "ds_config.json").write_text(json.dumps(self.ds_config, indent=2))
            run = {
                "cache": self.reader.url,
                "cache_fingerprint": self.reader.settings.fingerprint,
                "online_teacher": self.online,
                "world_size": self.world,
                "precision": self.precision,
                "exact_head_dtype": str(self.head_dtype).removeprefix("torch."),
                "total_steps": self.total_steps,
                "followed": self.followed,
                "selection": self.selection,
                "versions": library_versions(),
            }
            (self.run_dir / "run.json").write_text(json.dumps(run, indent=2))
        self.metrics = MetricsLog(self.run_dir, enabled=self.rank == 0)

    # ----------------------------------------------------------------------------- training

    def train(self) -> dict:
        cfg, accum = self.cfg, self.cfg.data.grad_accum_steps
        alphas = (cfg.loss.alpha_ce, cfg.loss.alpha_mlm, cfg.loss.alpha_cos)
        stats = StepStats(self.total_steps, alphas, start_step=self.step)
        batches = DevicePrefetch(self.batches, self.device)
        tty = self.rank == 0 and os.isatty(2)
        bar = tqdm(total=self.total_steps, initial=self.step, unit="step", disable=not tty, desc="train-student")
        self.engine.train()
        while self.step < self.total_steps:
            sums = torch.zeros(7, dtype=torch.float64)
            t_step, wait = time.perf_counter(), 0.0
            at_step_start = batches.state_dict()
            for _ in range(accum):
                t0 = time.perf_counter()
                try:
                    batch = next(batches)
                except CaptureStalled as exc:  # the capture died: keep what was learnt, to resume from
                    saved = self.save_checkpoint(at_step_start)
                    raise DistilcacheError(f"{exc}; checkpoint {saved.name} saved") from None
                wait += time.perf_counter() - t0
                loss, parts = self._loss_step(batch)
                self.engine.backward(loss)
                self.engine.step()
                sums += parts
            self.step += 1
            if self.world > 1:
                torch_dist.all_reduce(sums)  # global sums: every rank stops together on a bad loss
            _check_finite(self.step, sums)
            lr, skipped = self.engine.get_lr()[0], int(getattr(self.engine, "skipped_steps", 0))
            elapsed = time.perf_counter() - t_step
            record = stats.update(self.step, sums, lr, elapsed, wait, batches.state_dict(), skipped)
            self.metrics.write(record)
            bar.update(1)
            if self.rank == 0 and (self.step % cfg.log_every == 0 or self.step == self.total_steps):
                (bar.write if tty else log.info)(stats.line(record))
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < self.total_steps:
                self._evaluate()
            if cfg.save_every and self.step % cfg.save_every == 0 and self.step < self.total_steps:
                self.save_checkpoint(batches.state_dict())
        bar.close()
        loop = stats.summary()  # the training loop's own time and throughput, before checkpoint and eval
        self.save_checkpoint(batches.state_dict())
        result = self._evaluate()
        if self.followed is not None:
            self.followed |= self._progress("at_end") | {"shards_read": self.batches.shards_read()}
        export = self.export(int(stats.tokens), result)
        summary = loop | {"eval": result, "export": str(export), "run_dir": str(self.run_dir)}
        if self.selection is not None:
            summary["selection"] = self.selection
        if self.followed is not None:
            summary["followed"] = self.followed
        if self.rank == 0:
            log.info("%s", stats.summary_text(summary, table(result) if result else None))
            # written last: its presence marks a finished run (pipeline ablate skips those)
            write_json_atomic(self.run_dir / SUMMARY_FILE, summary | {"config": to_dict(self.cfg)})
        return summary

    def _loss_step(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss of one micro-batch (normalised by global counts) and its (kd, mlm, cos, counts...) sums.
        The student's head runs only on the positions KD or MLM uses, fused with both losses."""
        lcfg = self.cfg.loss
        b = to_device(batch, self.reader.settings, self.device, self.hidden_fit)  # decoded here, inside the step
        ids, labels = b["input_ids"], b["labels"]
        valid = valid_positions(b["lengths"], ids.shape[1])
        masked = labels != losses.IGNORE_INDEX
        features, hidden = self.engine(ids, valid.long(), logits=False)
        if self.teacher is not None:
            with torch.no_grad():
                out = self.teacher(input_ids=ids, attention_mask=valid.long(), output_hidden_states=True)
            b["logits"], b["hidden"] = out.logits, out.hidden_states[-1]
        kd_at = self._kd_positions(b, valid if lcfg.kd_positions == "all" else masked, features)
        mlm_at = masked if lcfg.alpha_mlm > 0 else torch.zeros_like(masked)
        counts = torch.tensor([kd_at.sum(), masked.sum(), valid.sum(), valid.sum()], dtype=torch.float64)
        global_counts = counts.clone()
        if self.world > 1:
            torch_dist.all_reduce(global_counts)
        n_kd, n_mlm, n_cos, _ = (max(float(c), 1.0) for c in global_counts)
        head_at = kd_at | mlm_at
        at = _selector(head_at)
        teacher = {n: at(b[n]) for n in ("logits", *KD_MODES[lcfg.kd_mode].fields) if n in b and lcfg.alpha_ce > 0}
        scale = (lcfg.alpha_ce * self.world / n_kd, lcfg.alpha_mlm * self.world / n_mlm)
        head_loss = HeadLoss(at(kd_at), at(labels), teacher, lcfg, self.exact, scale)
        rows, decoder = at(features), self.engine.module.decoder
        if lcfg.head_chunk_tokens and self.zero_stage < 3:
            loss = chunked_head_loss(rows, decoder.weight, decoder.bias, head_loss, lcfg.head_chunk_tokens)
        else:  # the (n, V) logits at once (ZeRO-3 gathers the partitioned weight in the module's hooks)
            loss = head_loss(decoder(rows), 0, len(rows))
        cos = hidden.new_zeros((), dtype=torch.float32)
        if lcfg.alpha_cos > 0:
            at = _selector(valid)
            cos = losses.cosine_loss(at(hidden), at(b["hidden"])).sum()
        loss = loss + lcfg.alpha_cos * cos / n_cos * self.world
        sums = [float(head_loss.kd), float(head_loss.mlm), cos.item()]
        parts = torch.tensor([*sums, *counts.tolist()], dtype=torch.float64)
        return loss, parts

    def _kd_positions(
        self, b: dict[str, torch.Tensor], candidates: torch.Tensor, features: torch.Tensor
    ) -> torch.Tensor:
        """(B, L) bool: where KD distils this micro-batch (`loss.kd_tokens` of `loss.kd_positions`)."""
        lcfg = self.cfg.loss
        if lcfg.alpha_ce == 0:
            return torch.zeros_like(candidates)
        if lcfg.kd_tokens == "all":
            return candidates
        if KD_SCORE in b:  # a selection's stored teacher entropy (`pipeline select --set token_scores=true`)
            scores = b[KD_SCORE]
        elif lcfg.kd_tokens == "random":
            scores = token_select.random_scores(
                self.cfg.seed, b["view"].cpu().numpy(), b["sequence_index"].cpu().numpy(), candidates.shape[1]
            ).to(candidates.device)
        else:
            rows = candidates.nonzero(as_tuple=True)
            if "logits" in b:  # the online teacher's
                teacher = lambda a, e: b["logits"][rows][a:e]  # noqa: E731
            else:
                hidden = b["hidden"][rows]
                teacher = lambda a, e: self.exact.head(hidden[a:e].to(self.exact.dtype))  # noqa: E731
            decoder, x = self.engine.module.decoder, features[rows].detach()
            student = lambda a, e: decoder(x[a:e])  # noqa: E731
            chunk = lcfg.head_chunk_tokens or len(x)
            scores = torch.full(candidates.shape, -math.inf, device=candidates.device)
            scores[rows] = token_select.distribution_scores(lcfg.kd_tokens, len(x), teacher, student, chunk)
        return token_select.keep_top(scores, candidates, lcfg.kd_fraction)

    def _evaluate(self) -> dict | None:
        if self.eval_split is None:
            return None
        if self.eval_rows is None:
            self.eval_rows = self._wait(lambda: load_rows(self.reader, self.eval_split, self.cfg.eval_sequences))
        self.engine.eval()
        positions, final = self.reader.settings.outputs.logit_positions, self.step == self.total_steps
        args = (self.head, positions, self.cfg.data.micro_batch_size, self.device, final)
        result = evaluate(self.engine, self.eval_rows, *args)  # final: per-token values too, for ablations
        per_token = result.pop("per_token", None)
        if per_token is not None and self.rank == 0:
            np.savez_compressed(self.run_dir / "eval_tokens.npz", **per_token)
        self.engine.train()
        self.metrics.write({"step": self.step, "eval": result})
        if self.rank == 0:
            log.info("eval at step %d on %d held-out sequences:\n%s", self.step, result["rows"], table(result))
        return result

    # ----------------------------------------------------------------------------- checkpoints

    def _wait(self, fn: Callable):
        """fn(), waiting for what it reads to be committed when following a growing cache."""
        return fn() if self.follower is None else self.follower.wait(fn)

    def _progress(self, when: str) -> dict:
        """How far the capture was (shards committed) at the start or end of a following run."""
        self.reader.refresh()
        return {f"committed_{when}": len(self.reader.committed()), "shards": sum(
            lay.shards for lay in self.reader.layouts.values()
        ), f"complete_{when}": not self.reader.following}  # fmt: skip

    def save_checkpoint(self, data_state: dict) -> Path:
        """DeepSpeed checkpoint + client state (step, data position, config) + every rank's RNG state;
        `data_state`: the position after the micro-batches trained on (DevicePrefetch.state_dict(),
        not the reader's, which may be a batch ahead)."""
        client = {
            "step": self.step,
            "data": data_state,
            "config": to_dict(self.cfg),
            "cache_fingerprint": self.reader.settings.fingerprint,
            "selection_sha256": None if self.selection is None else self.selection["sha256"],
        }
        directory = self.run_dir / "checkpoints"
        return checkpoint.save(
            self.engine, directory, self.step, client, self.rank, self.world, self.cfg.keep_checkpoints
        )

    def _check_resume(self) -> tuple[Path, dict]:
        """The checkpoint a --resume continues from, refused before anything is written when it
        was made by another config, cache or number of processes."""
        path, record = checkpoint.resumable(self.run_dir / "checkpoints")
        same_cache = record.get("cache_fingerprint") == self.reader.settings.fingerprint
        diff = checkpoint.resume_diff(record["config"], to_dict(self.cfg), same_cache)
        if diff:
            raise DistilcacheError(
                f"--resume: the config differs from the checkpoint's in keys that change the run ({'; '.join(diff)}); "
                "resume with the checkpoint's config, or start a new run with --overwrite"
            )
        selected = None if self.selection is None else self.selection["sha256"]
        if record.get("selection_sha256") != selected:
            raise DistilcacheError(
                f"--resume: selection {self.cfg.data.selection!r} holds other rows than when the checkpoint was "
                "written (it was replaced); resume with the selection it used, or start a new run with --overwrite"
            )
        if record["world_size"] != self.world:
            raise DistilcacheError(
                f"--resume: the checkpoint was written by {record['world_size']} process(es), this run has "
                f"{self.world}; resume with the same launcher settings"
            )
        checkpoint.check_files(path, record)
        return path, record

    def _load_checkpoint(self, path: Path, record: dict) -> None:
        checkpoint.load(self.engine, path)
        self.step = record["step"]
        self.batches.load_state_dict(record["data"])
        checkpoint.load_rng(path, self.rank)
        self.metrics.truncate(self.step)
        epoch, batch = record["data"]["epoch"], record["data"]["batch"]
        log.info("resumed from %s at step %d (epoch %d, batch %d)", path, self.step, epoch, batch)

    def export(self, tokens: int = 0, evaluation: dict | None = None) -> Path:
        out = self.run_dir / "final"
        if self.rank == 0:
            config = self.module.student.config
            out = export_student(
                self.run_dir,
                self.step,
                config,
                self.tokenizer,
                self.reader,
                self.cfg,
                tokens,
                evaluation,
                self.followed,
                self.selection,
            )
        torch_dist.barrier()
        return out

    def cleanup(self) -> None:
        if hasattr(self, "metrics"):  # setup may have failed before the run directory existed
            self.metrics.close()
        if hasattr(self, "reader"):
            self.reader.close()
        self.room.release()


def _check_finite(step: int, sums: torch.Tensor) -> None:
    """Stop at the first non-finite loss term, before any checkpoint could keep its weights."""
    for name, value in zip(LOSS_TERMS, sums[:3].tolist(), strict=True):
        if not math.isfinite(value):
            raise DistilcacheError(
                f"the {name} loss is {value} at step {step}; nothing was saved from this step: lower optim.lr, "
                "check the cache with `pipeline verify`, or use precision=fp32"
            )


def _selector(positions: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """Rows of (B, L, ...) tensors at `positions`; a free view when every position is selected
    (packed sequences: all but the corpus's last), sparing an (n, V) copy of the logits and its
    scatter in the backward pass."""
    if bool(positions.all()):
        return lambda x: x.flatten(0, 1)
    return lambda x: x[positions]


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run_train(cfg: TrainConfig, *, online_teacher: bool = False, resume: bool = False, overwrite: bool = False) -> dict:
    trainer = Trainer(cfg, online_teacher, resume, overwrite)
    try:
        trainer.setup()
        return trainer.train()
    finally:
        trainer.cleanup()
