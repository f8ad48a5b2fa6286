"""`pipeline train-student`: a student trained with DeepSpeed ZeRO from a teacher cache.

One explicit class: setup() -> train() -> export, with save_checkpoint() and cleanup(). The
per-batch math lives in `_loss_step`. Losses are normalised by the global token counts of each
micro-batch (one small all-reduce), so 1 and N processes fed the same global micro-batches
compute the same loss. In cached mode the teacher never runs; `--online-teacher` runs it on the
cached input ids as the fidelity and speed baseline.
"""

from __future__ import annotations

import atexit
import copy
import json
import logging
import os
import random
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as torch_dist
import yaml
from tqdm import tqdm

from pipeline.config import to_dict
from pipeline.errors import DistilcacheError
from pipeline.versions import library_versions
from student_train import ds_config, losses
from student_train.checks import check_cache, kd_mode_advice
from student_train.config import TrainConfig
from student_train.data import CacheBatches, Fields
from student_train.evaluate import cache_head, evaluate, load_rows, table
from student_train.metrics import MetricsLog, StepStats
from student_train.model import DistillModule, hidden_size, init_from_teacher, student_config
from teacher_cache.store import TEACHER_DIR, CacheReader
from teacher_cache.teacher import tokenizer_sha256, weights_sha256

log = logging.getLogger(__name__)
SUMMARY_FILE = "summary.json"


class Trainer:
    def __init__(self, cfg: TrainConfig, online_teacher: bool = False, resume: bool = False, overwrite: bool = False):
        self.cfg, self.online, self.resume, self.overwrite = cfg, online_teacher, resume, overwrite
        self.run_dir = Path(cfg.output_dir)
        self.step = 0
        self.teacher: torch.nn.Module | None = None

    # ----------------------------------------------------------------------------- setup

    def setup(self) -> None:
        self._check_run_dir()
        self._setup_distributed()
        self._setup_cache_and_model()
        self._setup_data()
        self._setup_engine()
        self._setup_run_dir()
        if self.resume:
            self._load_checkpoint()

    def _setup_distributed(self) -> None:
        self.cpu = not torch.cuda.is_available()
        if self.cpu:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        if "RANK" not in os.environ:  # one process without a launcher
            os.environ.update(
                RANK="0",
                LOCAL_RANK="0",
                WORLD_SIZE="1",
                LOCAL_WORLD_SIZE="1",
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(_free_port()),
            )
        import deepspeed

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        if not torch_dist.is_initialized():
            deepspeed.init_distributed(dist_backend="gloo" if self.cpu else "nccl")
            # one group per process, destroyed at exit: DeepSpeed caches group handles globally, so a
            # second run in the same process (tests, notebooks) must reuse the group, not recreate it
            atexit.register(_destroy_process_group)
        self.rank, self.world = torch_dist.get_rank(), torch_dist.get_world_size()
        if self.cpu:
            self.device = torch.device("cpu")
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", self.world))))
        else:
            self.device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(self.device)
        p = self.cfg.precision
        if p == "auto":
            p = "fp32" if self.cpu else ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
        if self.cpu and p == "fp16":
            raise DistilcacheError("precision=fp16 is not supported on CPU; use fp32 or bf16")
        self.precision = p
        _seed_everything(self.cfg.seed)

    def _setup_cache_and_model(self) -> None:
        from transformers import AutoConfig, AutoModelForMaskedLM, AutoTokenizer

        cfg = self.cfg
        self.reader = CacheReader(cfg.cache)
        teacher_dir = self.reader.path / TEACHER_DIR
        self.teacher_config = AutoConfig.from_pretrained(teacher_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
        config = student_config(cfg.student, self.teacher_config)
        problems = check_cache(self.reader, cfg, config, tokenizer_sha256(self.tokenizer), self.online)
        if problems:
            raise DistilcacheError(f"cache {self.reader.path} does not fit this run: " + "; ".join(problems))
        advice = None if self.online else kd_mode_advice(self.reader, cfg)
        if advice and self.rank == 0:
            log.warning("%s", advice)
        manifest = self.reader.manifest
        student = AutoModelForMaskedLM.from_config(config)
        if cfg.student.init == "teacher" or self.online:
            teacher = self._load_teacher(AutoModelForMaskedLM)
            if cfg.student.init == "teacher":
                self.layer_map = init_from_teacher(student, teacher.state_dict(), self.teacher_config)
                log.info("student: init from teacher layers %s", self.layer_map)
            if self.online:
                dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision, torch.float32)
                self.teacher = teacher.to(self.device, dtype).eval().requires_grad_(False)
        self.module = DistillModule(student, manifest["teacher"]["hidden_size"])
        kd_exact = cfg.loss.kd_mode == "exact" and cfg.loss.alpha_ce > 0 and not self.online
        self.head = cache_head(self.reader, self.device) if kd_exact or self.reader.manifest["head"] else None
        self.head_dtype = resolve_head_dtype(cfg.loss.exact_head_dtype, self.device)
        # evaluation keeps the fp32 head; exact KD multiplies in head_dtype (a copy where that differs)
        low = kd_exact and self.head_dtype != torch.float32
        self.kd_head = copy.deepcopy(self.head).to(self.head_dtype) if low else self.head
        n_params = sum(p.numel() for p in student.parameters())
        log.info(
            "student: %s, %d layers, width %d, %.1fM parameters",
            config.model_type,
            getattr(config, "n_layers", getattr(config, "num_hidden_layers", 0)),
            hidden_size(config),
            n_params / 1e6,
        )

    def _load_teacher(self, auto_cls) -> torch.nn.Module:
        """The teacher's weights (to initialise the student, or to run online), hash-checked."""
        manifest = self.reader.manifest
        name = self.cfg.student.teacher or manifest["teacher"]["name"]
        try:
            teacher = auto_cls.from_pretrained(name)
        except (OSError, ValueError):
            raise DistilcacheError(
                f"teacher weights {name!r} not found (needed for student.init=teacher or "
                "--online-teacher); set student.teacher to their location or use "
                "student.init=random"
            ) from None
        digest = weights_sha256(teacher)
        if digest != manifest["teacher"]["weights_sha256"]:
            raise DistilcacheError(
                f"teacher weights at {name!r} hash to {digest[:12]} but the cache was built from "
                f"{manifest['teacher']['weights_sha256'][:12]}; point student.teacher at the "
                "cached teacher"
            )
        return teacher

    def _setup_data(self) -> None:
        cfg, loss = self.cfg, self.cfg.loss
        temps = [float(t) for t in self.reader.identity["outputs"]["temperatures"]]
        kd = not self.online and loss.alpha_ce > 0
        topk = kd and loss.kd_mode in ("topk_tail", "topk_renorm")
        fields = Fields(
            topk=topk,
            hidden=not self.online and (loss.alpha_cos > 0 or (kd and loss.kd_mode == "exact")),
            lse_column=temps.index(float(loss.temperature)) if topk else None,
            samples=kd and loss.kd_mode == "sampled",
            topk_limit=loss.topk,
        )
        streams = cfg.data.streams or self.world
        try:
            self.batches = CacheBatches(self.reader, cfg.data, fields, cfg.seed, streams, self.rank, self.world)
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
        eval_split = "eval" if "eval" in self.reader.splits else None
        self.eval_rows = load_rows(self.reader, eval_split, cfg.eval_sequences) if eval_split else None

    def _setup_engine(self) -> None:
        import deepspeed

        template = ds_config.load_template(self.cfg.deepspeed_config)
        self.ds_config = ds_config.resolve(template, self.cfg, self.world, self.total_steps, self.precision, self.cpu)
        params = [p for p in self.module.parameters() if p.requires_grad]
        self.engine, *_ = deepspeed.initialize(model=self.module, model_parameters=params, config=self.ds_config)

    def _check_run_dir(self) -> None:
        """A fresh run never mixes with an earlier one's checkpoints, metrics or summary."""
        if self.resume:
            return
        stale = [self.run_dir / n for n in ("checkpoints", "metrics.jsonl", SUMMARY_FILE, "final", "tensorboard")]
        stale = [p for p in stale if p.exists()]
        if stale and not self.overwrite:
            raise DistilcacheError(
                f"output_dir {self.run_dir} holds an earlier run ({', '.join(p.name for p in stale)}); "
                "pass --resume to continue it, --overwrite to start over, or choose another output_dir"
            )
        if stale and int(os.environ.get("RANK", "0")) == 0:
            for p in stale:
                shutil.rmtree(p) if p.is_dir() else p.unlink()

    def _setup_run_dir(self) -> None:
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(self.cfg), sort_keys=False))
            (self.run_dir / "ds_config.json").write_text(json.dumps(self.ds_config, indent=2))
            (self.run_dir / "run.json").write_text(
                json.dumps(
                    {
                        "cache": str(self.reader.path),
                        "cache_fingerprint": self.reader.manifest["fingerprint"],
                        "online_teacher": self.online,
                        "world_size": self.world,
                        "precision": self.precision,
                        "exact_head_dtype": str(self.head_dtype).removeprefix("torch."),
                        "total_steps": self.total_steps,
                        "versions": library_versions(),
                    },
                    indent=2,
                )
            )
        self.metrics = MetricsLog(self.run_dir, enabled=self.rank == 0)

    # ----------------------------------------------------------------------------- training

    def train(self) -> dict:
        cfg, accum = self.cfg, self.cfg.data.grad_accum_steps
        alphas = (cfg.loss.alpha_ce, cfg.loss.alpha_mlm, cfg.loss.alpha_cos)
        stats = StepStats(self.total_steps, alphas, start_step=self.step)
        batches = iter(self.batches)
        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            unit="step",
            dynamic_ncols=True,
            disable=self.rank != 0 or not os.isatty(2),
            desc="train-student",
        )
        self.engine.train()
        while self.step < self.total_steps:
            sums = torch.zeros(7, dtype=torch.float64)
            t_step = time.perf_counter()
            wait = 0.0
            for _ in range(accum):
                t0 = time.perf_counter()
                batch = next(batches)
                wait += time.perf_counter() - t0
                loss, parts = self._loss_step(batch)
                self.engine.backward(loss)
                self.engine.step()
                sums += parts
            self.step += 1
            if self.world > 1:
                torch_dist.all_reduce(sums)  # global sums for the log line
            record = stats.update(
                self.step, sums, self.engine.get_lr()[0], time.perf_counter() - t_step, wait, self.batches.state_dict()
            )
            self.metrics.write(record)
            bar.update(1)
            if self.rank == 0 and (self.step % cfg.log_every == 0 or self.step == self.total_steps):
                (bar.write if not bar.disable else log.info)(stats.line(record))
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < self.total_steps:
                self._evaluate()
            if cfg.save_every and self.step % cfg.save_every == 0 and self.step < self.total_steps:
                self.save_checkpoint()
        bar.close()
        loop = stats.summary()  # the training loop's own time and throughput, before checkpoint and eval
        self.save_checkpoint()
        result = self._evaluate()
        export = self.export()
        summary = loop | {"eval": result, "export": str(export), "run_dir": str(self.run_dir)}
        if self.rank == 0:
            log.info("%s", stats.summary_text(summary, table(result) if result else None))
            # written last: its presence marks a finished run (pipeline ablate skips those)
            tmp = self.run_dir / f"{SUMMARY_FILE}.tmp"
            tmp.write_text(json.dumps(summary | {"config": to_dict(self.cfg)}, indent=2))
            tmp.replace(self.run_dir / SUMMARY_FILE)
        return summary

    def _loss_step(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss of one micro-batch (normalised by global counts) and its (kd, mlm, cos, counts...) sums."""
        lcfg = self.cfg.loss
        b = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        ids, labels = b["input_ids"], b["labels"]
        valid = torch.arange(ids.shape[1], device=self.device)[None, :] < b["lengths"][:, None]
        masked = labels != losses.IGNORE_INDEX
        kd_at = valid if lcfg.kd_positions == "all" else masked
        counts = torch.tensor([kd_at.sum(), masked.sum(), valid.sum(), valid.sum()], dtype=torch.float64)
        global_counts = counts.clone()
        if self.world > 1:
            torch_dist.all_reduce(global_counts)
        n_kd, n_mlm, n_cos, _ = (max(float(c), 1.0) for c in global_counts)
        logits, hidden = self.engine(ids, valid.long())
        t_logits = t_hidden = None
        if self.teacher is not None:
            with torch.no_grad():
                out = self.teacher(input_ids=ids, attention_mask=valid.long(), output_hidden_states=True)
            t_logits, t_hidden = out.logits, out.hidden_states[-1]
        elif "hidden" in b:
            t_hidden = b["hidden"]
        zero = logits.new_zeros((), dtype=torch.float32)
        kd = mlm = cos = zero
        if lcfg.alpha_ce > 0:
            at = _selector(kd_at)
            s, T = at(logits), lcfg.temperature
            if t_logits is not None:
                per_token = losses.kd_full(s, at(t_logits), T)
            elif lcfg.kd_mode == "exact":
                per_token = losses.kd_exact(s, at(t_hidden), self.kd_head, T, lcfg.exact_chunk_tokens, self.head_dtype)
            elif lcfg.kd_mode == "sampled":
                per_token = losses.kd_sampled(s, at(b["sample_ids"]), at(b["sample_counts"]), T)
            elif lcfg.kd_mode == "topk_tail":
                per_token = losses.kd_topk_tail(s, at(b["topk_values"]), at(b["topk_indices"]), at(b["lse"]), T)
            else:
                per_token = losses.kd_topk_renorm(s, at(b["topk_values"]), at(b["topk_indices"]), T)
            kd = per_token.sum()
        if lcfg.alpha_mlm > 0 and bool(masked.any()):
            mlm = torch.nn.functional.cross_entropy(logits[masked].float(), labels[masked], reduction="sum")
        if lcfg.alpha_cos > 0:
            at = _selector(valid)
            cos = losses.cosine_loss(at(hidden), at(t_hidden)).sum()
        loss = (lcfg.alpha_ce * kd / n_kd + lcfg.alpha_mlm * mlm / n_mlm + lcfg.alpha_cos * cos / n_cos) * self.world
        parts = torch.tensor([kd.item(), mlm.item(), cos.item(), *counts.tolist()], dtype=torch.float64)
        return loss, parts

    def _evaluate(self) -> dict | None:
        if self.eval_rows is None:
            return None
        self.engine.eval()
        result = evaluate(
            lambda ids, att: self.engine(ids, att),
            self.eval_rows,
            self.head,
            self.reader.identity["outputs"]["logit_positions"],
            self.cfg.data.micro_batch_size,
            self.device,
        )
        self.engine.train()
        self.metrics.write({"step": self.step, "eval": result})
        if self.rank == 0:
            log.info("eval at step %d on %d held-out sequences:\n%s", self.step, result["rows"], table(result))
        return result

    # ----------------------------------------------------------------------------- checkpoints

    def save_checkpoint(self) -> Path:
        """DeepSpeed checkpoint + client state (step, data position, config) + this rank's RNG state."""
        directory = self.run_dir / "checkpoints"
        tag = f"step-{self.step:07d}"
        client = {"step": self.step, "data": self.batches.state_dict(), "config": to_dict(self.cfg)}
        self.engine.save_checkpoint(str(directory), tag=tag, client_state=client)
        torch.save(_rng_state(), directory / tag / f"rng-rank{self.rank}.pt")
        torch_dist.barrier()
        if self.rank == 0:
            for old in sorted(directory.glob("step-*"))[: -self.cfg.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        return directory / tag

    def _load_checkpoint(self) -> None:
        directory = self.run_dir / "checkpoints"
        if not (directory / "latest").is_file():
            raise DistilcacheError(f"--resume: no checkpoint in {directory}; start without --resume")
        tag = (directory / "latest").read_text().strip()
        path, client = self.engine.load_checkpoint(str(directory), tag=tag)
        if path is None:
            raise DistilcacheError(f"--resume: cannot load the checkpoint {directory / tag}")
        self.step = client["step"]
        self.batches.load_state_dict(client["data"])
        path = directory / tag
        rng = path / f"rng-rank{self.rank}.pt"
        if not rng.is_file():
            raise DistilcacheError(
                f"--resume: {rng} missing (the checkpoint was written by another number "
                "of processes); resume with the same launcher settings"
            )
        _set_rng_state(torch.load(rng, weights_only=False))
        self.metrics.truncate(self.step)
        log.info(
            "resumed from %s at step %d (epoch %d, batch %d)",
            path,
            self.step,
            client["data"]["epoch"],
            client["data"]["batch"],
        )

    def export(self) -> Path:
        """Consolidate the fp32 weights (ZeRO-3 shards included) into a save_pretrained directory."""
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        from safetensors.torch import save_file
        from transformers import AutoModelForMaskedLM

        out = self.run_dir / "final"
        if self.rank == 0:
            state = get_fp32_state_dict_from_zero_checkpoint(
                str(self.run_dir / "checkpoints"), tag=f"step-{self.step:07d}"
            )
            student = AutoModelForMaskedLM.from_config(self.module.student.config)
            student.load_state_dict(
                {k[len("student.") :]: v for k, v in state.items() if k.startswith("student.")}, strict=False
            )
            student.tie_weights()
            shutil.rmtree(out, ignore_errors=True)
            student.save_pretrained(out)
            self.tokenizer.save_pretrained(out)
            projection = {
                k[len("projection.") :]: v.contiguous() for k, v in state.items() if k.startswith("projection.")
            }
            if projection:
                save_file(projection, str(out / "distill_projection.safetensors"))
            (out / "distill.json").write_text(
                json.dumps(
                    {
                        "cache": str(self.reader.path),
                        "step": self.step,
                        "cache_fingerprint": self.reader.manifest["fingerprint"],
                        "config": to_dict(self.cfg),
                    },
                    indent=2,
                )
            )
        torch_dist.barrier()
        return out

    def cleanup(self) -> None:
        if hasattr(self, "metrics"):  # setup may have failed before the run directory existed
            self.metrics.close()


def _selector(positions: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """Rows of (B, L, ...) tensors at `positions`; a free view when every position is selected
    (packed sequences: all but the corpus's last), sparing an (n, V) copy of the logits and its
    scatter in the backward pass."""
    if bool(positions.all()):
        return lambda x: x.flatten(0, 1)
    return lambda x: x[positions]


def resolve_head_dtype(spec: str, device: torch.device) -> torch.dtype:
    """loss.exact_head_dtype -> dtype: `auto` is bfloat16 where the hardware multiplies it natively."""
    if spec != "auto":
        return getattr(torch, spec)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    native = (
        getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
        or getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    )
    return torch.bfloat16 if native else torch.float32


def _destroy_process_group() -> None:
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def run_train(cfg: TrainConfig, online_teacher: bool = False, resume: bool = False, overwrite: bool = False) -> dict:
    trainer = Trainer(cfg, online_teacher, resume, overwrite)
    try:
        trainer.setup()
        return trainer.train()
    finally:
        trainer.cleanup()
