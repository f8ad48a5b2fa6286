"""Cache -> micro-batches: whole chunk-aligned blocks, seeded order, mixing, disjoint ranks, resume.

Order of an epoch (all pure functions of seed, epoch and the layout):
- epoch e reads mask view e mod V (the blocks holding rows of that view);
- those blocks are permuted with (seed, e) — all at once (`data.order: global`), or inside each
  window of `data.window_shards` consecutive shards, window after window (`windowed`: what a
  growing cache can serve) — and dealt round-robin to `streams` canonical streams;
- each stream reads its blocks in groups of `mix_blocks` and shuffles the rows of a group;
- a global micro-batch (micro_batch_size x world rows) takes the same number of rows from every
  stream; rank r serves the streams s = r (mod world), so a process reads only its own blocks.
With `streams` fixed, the global micro-batches are identical for every world size that divides
it. Per epoch every stream yields the same number of micro-batches (the shortest stream decides;
at most a group's worth of rows per stream is left unread). The state is (epoch, batch).
"""

from __future__ import annotations

import functools
import os
import select
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from cache_format.hidden import Fit, decode_hidden_tensor
from cache_format.kd_modes import BASE_FIELDS, HIDDEN_FIELDS, KDMode
from cache_format.layout import SplitLayout
from cache_format.reader import CacheReader
from cache_format.rng import STREAM_BLOCKS, STREAM_ROWS, derive_seed, permutation
from cache_format.settings import CacheSettings
from pipeline.errors import CacheError, DistilcacheError
from pipeline.log import setup_logging
from student_train.config import DataConfig, reader_options
from student_train.follow import Follower

CLOUD_ENV = ("AWS_", "GOOGLE_", "AZURE_", "DISTILCACHE_")
ROW = "row"
"""Each row's number in its split, carried from the workers to `CacheBatches` (which drops it)."""
KD_SCORE = "kd_score"
"""A selection's per-token scores of a micro-batch's rows (`loss.kd_tokens: entropy`)."""


@dataclass(frozen=True)
class FieldSelection:
    """The teacher fields a run reads (hidden states are ~90 % of the bytes: skipped when unused)."""

    teacher: tuple[str, ...]
    lse_column: int | None = None
    """Index of the KD temperature among the cached log-sum-exp columns (topk_tail)."""
    topk_limit: int | None = None
    """Read only the first (largest) `topk_limit` of the cached top-k (loss.topk)."""

    @classmethod
    def for_run(
        cls, settings: CacheSettings, present: set[str], kd: KDMode | None, cosine: bool, temperature: float, topk
    ) -> FieldSelection:
        """The KD mode's fields (None: no KD from the cache) and, for the cosine loss, the hidden states."""
        wanted = list(kd.fields if kd else ()) + (list(HIDDEN_FIELDS) if cosine else [])
        teacher = tuple(dict.fromkeys(f for f in wanted if f in present))
        lse = settings.lse_column(temperature) if "logsumexp" in teacher else None
        return cls(teacher, lse, topk)


def view_blocks(layout: SplitLayout, view: int, keep: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(block ids, rows of `view` in each) for the blocks holding rows of that view; with `keep`
    (a selection's (rows,) mask of the split), only its rows, and only blocks holding any."""
    lo, hi = view * layout.sequences, (view + 1) * layout.sequences
    blocks = np.arange(lo // layout.block_rows, (hi - 1) // layout.block_rows + 1)
    starts = blocks * layout.block_rows
    if keep is None:
        return blocks, np.minimum(starts + layout.block_rows, hi) - np.maximum(starts, lo)
    in_view = np.zeros(len(keep), dtype=bool)
    in_view[lo:hi] = keep[lo:hi]
    rows = np.add.reduceat(in_view, starts).astype(np.int64)
    return blocks[rows > 0], rows[rows > 0]


@dataclass(frozen=True)
class EpochPlan:
    """Groups of blocks per stream for one epoch, and the micro-batches it yields."""

    epoch: int
    view: int
    groups: list[list[np.ndarray]]  # [stream][group] -> block ids
    group_rows: list[np.ndarray]  # [stream] -> rows of the view in each group
    rows_per_stream: int  # rows each stream contributes to one global micro-batch
    batches: int


def block_order(
    layout: SplitLayout, blocks: np.ndarray, seed: int, epoch: int, window_shards: int | None
) -> np.ndarray:
    """Positions into `blocks` in the order epoch `epoch` reads them: one seeded permutation of all
    of them (`window_shards` None, the global order), or a seeded permutation inside each window of
    `window_shards` consecutive shards, the windows in shard order (a growing cache can serve it:
    reading never looks further ahead than the window it is in)."""
    if window_shards is None:
        return permutation(seed, STREAM_BLOCKS, len(blocks), view=epoch)
    per_shard = layout.shard_rows // layout.block_rows
    window = blocks // (per_shard * window_shards)
    order = []
    for w in np.unique(window):  # blocks ascend, so windows do too
        inside = np.flatnonzero(window == w)
        order.append(inside[permutation(derive_seed(seed, epoch, int(w)), STREAM_BLOCKS, len(inside))])
    return np.concatenate(order) if order else np.zeros(0, dtype=np.int64)


def plan_epoch(
    layout: SplitLayout,
    seed: int,
    epoch: int,
    streams: int,
    mix_blocks: int,
    global_batch: int,
    window_shards: int | None = None,
    keep: np.ndarray | None = None,
) -> EpochPlan:
    view = epoch % layout.views
    blocks, rows = view_blocks(layout, view, keep)
    order = block_order(layout, blocks, seed, epoch, window_shards)
    groups, group_rows = [], []
    for s in range(streams):
        mine = order[s::streams]
        groups.append([blocks[mine[g : g + mix_blocks]] for g in range(0, len(mine), mix_blocks)])
        group_rows.append(np.array([rows[mine[g : g + mix_blocks]].sum() for g in range(0, len(mine), mix_blocks)]))
    per_stream = global_batch // streams
    batches = min(int(r.sum()) for r in group_rows) // per_stream
    return EpochPlan(epoch, view, groups, group_rows, per_stream, batches)


class GroupDataset(Dataset):
    """Item (epoch, stream, group) -> the group's rows of the epoch's view, decoded and shuffled.

    The store is opened lazily, once per DataLoader worker process, without the open-time checks
    (the training process made them); every read still checks shard files and chunk CRCs.
    """

    def __init__(
        self,
        location: str,
        split: str,
        fields: FieldSelection,
        seed: int,
        plans: dict[int, EpochPlan],
        options: dict,
        ahead: int,
        follow_timeout: float = 0.0,
        keep: np.ndarray | None = None,
    ):
        self.location, self.split, self.fields, self.seed = location, split, fields, seed
        self.plans, self.options, self.ahead, self.follow_timeout = plans, options, ahead, follow_timeout
        self.keep = keep  # a selection's row mask of the split (None: every row)
        # the object-store credentials of this process: a forkserver worker may predate them
        self.env = {k: v for k, v in os.environ.items() if k.startswith(CLOUD_ENV)}
        self._reader: CacheReader | None = None
        self._follower: Follower | None = None

    def __len__(self) -> int:  # items are addressed by key, not by position
        return 0

    def __getitem__(self, key: tuple[int, int, int]) -> dict[str, torch.Tensor] | WorkerFailure:
        try:
            return self._group(*key)
        except DistilcacheError as exc:  # handed back as it was raised: one line, not a worker traceback
            return WorkerFailure(type(exc), str(exc))

    def _group(self, epoch: int, stream: int, group: int) -> dict[str, torch.Tensor]:
        if self._reader is None:
            os.environ.update(self.env)
            self._reader = CacheReader(self.location, check=False, **self.options)
            if self._reader.following:
                self._follower = Follower(self._reader, self.follow_timeout)
                if torch.utils.data.get_worker_info() is not None:  # a fresh interpreter: its waiting lines too
                    setup_logging()
        reader, plan = self._reader, self.plans[epoch]
        names = [*BASE_FIELDS, *self.fields.teacher]
        if self._follower is not None:  # a growing cache: wait until the group's shards are committed
            per_shard = reader.layouts[self.split].shard_rows // reader.layouts[self.split].block_rows
            for shard in sorted({int(b) // per_shard for b in plan.groups[stream][group]}):
                self._follower.wait(functools.partial(reader.record, self.split, shard), self.split, shard)
        upcoming = plan.groups[stream][group + 1 : group + 1 + self.ahead]  # a remote cache: fetch ahead
        reader.prefetch_blocks(self.split, [int(b) for g in upcoming for b in g], names)
        blocks = plan.groups[stream][group]
        parts = [reader.read_block(self.split, int(b), names) for b in blocks]
        data = {n: np.concatenate([p[n] for p in parts]) for n in names}
        per_block = reader.layouts[self.split].block_rows  # each block's rows are consecutive rows of the split
        starts = [int(b) * per_block for b in blocks]
        data[ROW] = np.concatenate([a + np.arange(len(p["view"])) for a, p in zip(starts, parts, strict=True)])
        wanted = data["view"] == plan.view
        if self.keep is not None:  # the selection's rows
            wanted &= self.keep[data[ROW]]
        keep = np.flatnonzero(wanted)
        keep = keep[permutation(derive_seed(self.seed, epoch, stream, group), STREAM_ROWS, len(keep))]
        return self._stored({n: data[n][keep] for n in (*names, ROW)})

    def _stored(self, d: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """The rows as tensors of their stored dtypes (a quarter of the bytes of decoded ones, and
        no float conversion here): `to_device` decodes them inside the training step."""
        out = {n: torch.from_numpy(np.ascontiguousarray(d[n])) for n in (*BASE_FIELDS, ROW, *self.fields.teacher)}
        k = self.fields.topk_limit
        for name in ("topk_values", "topk_indices"):
            if name in out and k is not None:
                out[name] = torch.from_numpy(np.ascontiguousarray(d[name][..., :k]))
        if "logsumexp" in out:  # the column of the KD temperature
            out["logsumexp"] = torch.from_numpy(np.ascontiguousarray(d["logsumexp"][..., self.fields.lse_column]))
        for name, value in out.items():
            if value.dtype == torch.uint16 and name == "topk_values":  # bfloat16 bits
                out[name] = value.view(torch.int16)
        return out


def to_device(
    batch: dict[str, torch.Tensor], settings: CacheSettings, device: torch.device, fit: Fit = None
) -> dict[str, torch.Tensor]:
    """A micro-batch in its stored dtypes -> the model's inputs and the teacher's decoded fields, on
    `device`: copied there first (int8 codes, fp16 scales, uint16 ids: the fewest bytes), decoded
    there, inside the step. The arithmetic is `cache_format.encode`'s, so CPU results are bit for
    bit those of decoding on the host. `fit`: a fitted hidden codec's tensors, already on `device`."""
    b = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    out = {n: b[n].long() for n in BASE_FIELDS}
    if "hidden" in b:
        out["hidden"] = decode_hidden_tensor(b["hidden"], b.get("hidden_scale"), settings.outputs.hidden_dtype, fit)
    if "topk_values" in b:
        values = b["topk_values"]
        out["topk_values"] = values.view(torch.bfloat16).float() if values.dtype == torch.int16 else values.float()
    for name in ("topk_indices", "sample_ids"):
        if name in b:
            out[name] = b[name].long()
    if "sample_counts" in b:
        out["sample_counts"] = b["sample_counts"].float()
    if "logsumexp" in b:
        out["logsumexp"] = b["logsumexp"]
    if KD_SCORE in b:
        out[KD_SCORE] = b[KD_SCORE].float()
    return out


class DevicePrefetch:
    """The next micro-batch copied to the GPU while the current one trains (pinned host memory, a
    side stream); on a CPU the batches pass through. `state_dict()` is the data position after the
    batches handed out, not after the one fetched ahead: the position a checkpoint must record."""

    def __init__(self, batches: CacheBatches, device: torch.device, ahead: bool | None = None):
        """`ahead`: fetch one batch ahead (default: on a GPU only; a test sets it on a CPU)."""
        self.source, self.batches, self.device = batches, iter(batches), device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.ahead = self.stream is not None if ahead is None else ahead
        self.state = batches.state_dict()
        self.fetched = self._fetch() if self.ahead else None

    def _fetch(self) -> tuple[dict[str, torch.Tensor], dict] | Exception | None:
        """(the next batch, on its way to the device; the data position after it), None at the end,
        or the error reading it raised: raised when that batch is asked for, not while the one
        before it trains (a follower's stalled capture stops at the same step either way)."""
        try:
            batch = next(self.batches)
        except StopIteration:
            return None
        except Exception as exc:  # re-raised by __next__, unchanged
            return exc
        if self.stream is not None:
            with torch.cuda.stream(self.stream):
                batch = {k: v.pin_memory().to(self.device, non_blocking=True) for k, v in batch.items()}
        return batch, self.source.state_dict()

    def state_dict(self) -> dict:
        return self.state

    def __iter__(self) -> DevicePrefetch:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if not self.ahead:
            batch = next(self.batches)
            self.state = self.source.state_dict()
            return batch
        fetched = self.fetched
        if fetched is None:
            raise StopIteration
        if isinstance(fetched, Exception):
            raise fetched
        batch, self.state = fetched
        if self.stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
            for value in batch.values():
                value.record_stream(torch.cuda.current_stream(self.device))
        self.fetched = self._fetch()
        return batch


class CacheBatches:
    """This rank's micro-batches, epoch after epoch, resumable from `state_dict()`."""

    def __init__(
        self,
        reader: CacheReader,
        cfg: DataConfig,
        fields: FieldSelection,
        seed: int,
        streams: int,
        rank: int,
        world: int,
        keep: np.ndarray | None = None,
        token_score: np.ndarray | None = None,
    ):
        """`keep`: a selection's (rows,) mask of the split (data.selection): only those rows are read;
        `token_score`: its (rows, L) per-token scores, handed on with each row as `kd_score`."""
        if streams % world or (cfg.micro_batch_size * world) % streams:
            raise ValueError(
                f"data.streams={streams} must be a multiple of the {world} process(es) and divide the global "
                f"micro-batch {cfg.micro_batch_size * world}; e.g. set data.streams={world}"
            )
        self.reader, self.cfg, self.fields, self.seed = reader, cfg, fields, seed
        self.streams, self.rank, self.world, self.keep = streams, rank, world, keep
        self.token_score = token_score
        self.layout = reader.layouts[cfg.split]
        self.epoch, self.batch = 0, 0
        self._plans: dict[int, EpochPlan] = {}
        self._read: set[int] = set()

    def plan(self, epoch: int) -> EpochPlan:
        if epoch not in self._plans:
            window = self.cfg.window_shards if self.cfg.order == "windowed" else None
            global_batch = self.cfg.micro_batch_size * self.world
            self._plans[epoch] = plan_epoch(
                self.layout, self.seed, epoch, self.streams, self.cfg.mix_blocks, global_batch, window, self.keep
            )
        return self._plans[epoch]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch, "streams": self.streams}

    def shards_read(self) -> list[int]:
        """Shards of the split whose blocks this process has taken rows from (in this process's life)."""
        return sorted(self._read)

    def load_state_dict(self, state: dict) -> None:
        if state["streams"] != self.streams:
            raise ValueError(
                f"the checkpoint was written with data.streams={state['streams']}, this run "
                f"uses {self.streams}; keep data.streams to resume exactly"
            )
        self.epoch, self.batch = state["epoch"], state["batch"]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            plan = self.plan(self.epoch)
            if plan.batches == 0:
                raise ValueError(
                    f"split {self.cfg.split!r} has too few rows for one global micro-batch of "
                    f"{self.cfg.micro_batch_size * self.world}; lower data.micro_batch_size"
                )
            yield from self._epoch(plan, self.batch)
            self.epoch, self.batch = self.epoch + 1, 0

    def _epoch(self, plan: EpochPlan, start: int) -> Iterator[dict[str, torch.Tensor]]:
        mine = list(range(self.rank, self.streams, self.world))
        skip = start * plan.rows_per_stream  # rows of every stream already consumed
        first = {s: int(np.searchsorted(np.cumsum(plan.group_rows[s]), skip, side="right")) for s in mine}
        offset = {s: skip - int(plan.group_rows[s][: first[s]].sum()) for s in mine}
        keys = _interleave({s: range(first[s], len(plan.groups[s])) for s in mine}, plan.epoch)
        loader = DataLoader(
            GroupDataset(
                self.reader.url,
                self.cfg.split,
                self.fields,
                self.seed,
                {plan.epoch: plan},
                reader_options(self.cfg),
                self.cfg.prefetch_groups,
                self.cfg.follow_timeout,
                self.keep,
            ),
            sampler=keys,
            batch_size=None,
            num_workers=self.cfg.num_workers,
            prefetch_factor=self.cfg.prefetch_groups if self.cfg.num_workers else None,
            pin_memory=torch.cuda.is_available(),
            # its own generator: drawing worker seeds from the global RNG would shift
            # dropout after a resume (a new loader starts mid-epoch there)
            generator=torch.Generator().manual_seed(derive_seed(self.seed, plan.epoch)),
            multiprocessing_context="forkserver" if self.cfg.num_workers else None,
            worker_init_fn=functools.partial(_exit_with, os.getpid()) if self.cfg.num_workers else None,
        )
        buffers = {s: _RowBuffer() for s in mine}
        pending: dict[int, deque] = {s: deque() for s in mine}
        items = zip(keys, iter(loader), strict=True)
        for batch in range(start, plan.batches):
            parts = []
            for s in mine:
                while len(buffers[s]) < plan.rows_per_stream:
                    if not pending[s]:
                        for (_, stream, g), group in items:  # fetch until stream s has a group
                            if isinstance(group, WorkerFailure):
                                raise group.error(group.message)
                            self._read.update(int(b) * self.layout.block_rows // self.layout.shard_rows
                                              for b in plan.groups[stream][g])  # fmt: skip
                            pending[stream].append(group)
                            if stream == s:
                                break
                    buffers[s].add(pending[s].popleft(), drop=offset.pop(s, 0))
                parts.append(buffers[s].take(plan.rows_per_stream))
            self.batch = batch + 1
            yield self._with_scores({k: torch.cat([p[k] for p in parts]) for k in parts[0]})

    def _with_scores(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The micro-batch without its split row numbers, and with a selection's token scores of
        those rows (`kd_score`): here, in the main process, so workers never hold the scores."""
        rows = batch.pop(ROW).numpy()
        if self.token_score is None:
            return batch
        scores = self.token_score[rows]
        valid = np.arange(scores.shape[1]) < batch["lengths"].numpy()[:, None]
        if np.isnan(scores[valid]).any():  # select scores every non-pad token: this is not its file
            raise CacheError(
                f"selection {self.cfg.selection!r} has no token score at non-pad tokens of split rows "
                f"{rows[(np.isnan(scores) & valid).any(1)][:5].tolist()}; rerun `pipeline select --overwrite`"
            )
        batch[KD_SCORE] = torch.from_numpy(scores)
        return batch


@dataclass(frozen=True)
class WorkerFailure:
    """A user-facing error raised in a DataLoader worker, carried to the training process."""

    error: type[DistilcacheError]
    message: str


def _exit_with(parent: int, worker_id: int) -> None:
    """Make a DataLoader worker exit when the training process does, even killed with -9: a
    forkserver worker's parent is the fork server, which outlives the trainer, so torch's own
    parent check never fires and the workers (and with them the fork server) would stay."""
    del worker_id

    def watch() -> None:
        try:
            fd = os.pidfd_open(parent)
            select.select([fd], [], [])  # readable once the process has exited
        except (AttributeError, OSError):  # no pidfd (not Linux >= 5.3): poll
            while True:
                try:
                    os.kill(parent, 0)
                except ProcessLookupError:
                    break
                time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _interleave(ranges: dict[int, range], epoch: int) -> list[tuple[int, int, int]]:
    """(epoch, stream, group) keys, round-robin over streams: the order in which groups are needed."""
    keys = []
    iters = {s: iter(r) for s, r in ranges.items()}
    while iters:
        for s in list(iters):
            g = next(iters[s], None)
            if g is None:
                del iters[s]
            else:
                keys.append((epoch, s, g))
    return keys


class _RowBuffer:
    """Rows of decoded groups waiting to be cut into micro-batches."""

    def __init__(self) -> None:
        self._parts: deque[dict[str, torch.Tensor]] = deque()
        self._rows = 0

    def __len__(self) -> int:
        return self._rows

    def add(self, group: dict[str, torch.Tensor], drop: int = 0) -> None:
        if drop:
            group = {k: v[drop:] for k, v in group.items()}
        self._parts.append(group)
        self._rows += len(group["input_ids"])

    def take(self, n: int) -> dict[str, torch.Tensor]:
        out: list[dict[str, torch.Tensor]] = []
        while n:
            head = self._parts[0]
            size = len(head["input_ids"])
            if size <= n:
                out.append(self._parts.popleft())
                n -= size
                self._rows -= size
            else:
                out.append({k: v[:n] for k, v in head.items()})
                self._parts[0] = {k: v[n:] for k, v in head.items()}
                self._rows -= n
                n = 0
        return {k: torch.cat([o[k] for o in out]) for k in out[0]}
