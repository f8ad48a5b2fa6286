"""Read access to a complete cache, checked when it opens and on every read (or, `follow`, to a
cache still being captured: only its committed shards, each checked as it becomes readable).

Opening (training, evaluation, inspection) refuses a cache whose header and manifest disagree,
whose identity does not hash to its fingerprint, whose manifest lacks a record the format
requires, whose metadata files (cache.json, every zarr.json) differ from the hashes the manifest
recorded or are not all recorded, whose commit records name another place, cache or layout than
their own, or whose shard files are missing or have another size than recorded. Every read
checks each inner chunk twice: its CRC32C against its bytes (a flipped byte) and against the CRC
its commit record holds for that (split, field, shard, chunk) (bytes in the wrong place). The
teacher files that make the exact-KD targets are hashed on first use. Damaged data is an error
naming the split, the field and the shard, never numbers.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from cache_format import shard_table
from cache_format.chunks import EMPTY, ChunkError, ChunkLayout, decode_chunk, decode_crcs, parse_index, parse_layout
from cache_format.fitted import FIT_FILE, FITTED_CODECS, fit_from_bytes
from cache_format.head import HEAD_FILE, load_head
from cache_format.hidden import Fit
from cache_format.lock import PresenceLease
from cache_format.manifest import fingerprint, manifest_problems
from cache_format.mirror import ShardMirror
from cache_format.open_checks import check_open
from cache_format.settings import (
    DEFAULT_CACHE_DIR,
    CacheSettings,
    MaskingConfig,
    OutputsConfig,
    TeacherInfo,
    TokenizerInfo,
)
from cache_format.storage import LocalStorage, Storage, open_storage
from cache_format.store import (
    DATA,
    FORMAT,
    FORMAT_VERSION,
    HEADER,
    MANIFEST,
    TEACHER_DIR,
    CacheStore,
    chunk_layout,
    json_or_torn,
    record_problem,
)
from pipeline.config import from_dict
from pipeline.errors import CacheError, ConfigError


class NotCommitted(CacheError):
    """What a follower needs (a shard, the teacher files) is not written yet: wait and ask again."""


INDEX_CACHE = 4096
"""Shard indexes kept per process (each is 16 bytes a chunk): bounded whatever the shard count."""


class CacheReader:
    """A complete cache, opened for reading (`check=False`: skip the open-time checks, for a
    DataLoader worker of a process that already made them)."""

    def __init__(
        self,
        location: str | Path,
        require_complete: bool = True,
        check: bool = True,
        lease: bool = False,
        storage_options: dict | None = None,
        local_cache: tuple[str, float] | None = None,
        follow: bool = False,
    ):
        self.storage = open_storage(location, storage_options)
        self.url = self.storage.url
        if self.storage.is_foreign_file():
            raise CacheError(f"{self.url} is a file, not a cache directory; give the directory cache-teacher wrote")
        self.store = CacheStore(self.storage)
        if not self.store.is_cache():
            raise CacheError(
                f"{self.url} is not a distilcache cache (no {HEADER}); build one with `pipeline cache-teacher`"
            )
        self.header = self.store.header
        version = self.header.get("format_version")
        if self.header.get("format") != FORMAT or version != FORMAT_VERSION:
            raise CacheError(
                f"{self.url}: cache format {self.header.get('format')} v{version} is not supported "
                f"(this distilcache reads v{FORMAT_VERSION}); rebuild it with `pipeline cache-teacher --overwrite`"
            )
        self.manifest = self.store.manifest
        self.following = follow and self.manifest is None
        self.check = check
        if self.following and not isinstance(self.header.get("side_files"), dict):
            raise CacheError(
                f"{self.url} is incomplete and was started by an older distilcache (its header records no teacher "
                "files): it can be read once complete, not followed"
            )
        if require_complete and not follow and self.manifest is None:
            raise CacheError(
                f"{self.url} is incomplete (no {MANIFEST}); rerun `pipeline cache-teacher` with the same config "
                "to finish it"
            )
        try:
            self.fields = {f.name: f for f in self.store.fields()}
            self.layouts = self.store.layouts()
        except (KeyError, TypeError, ValueError) as exc:
            raise self.damaged(f"{HEADER} does not describe a layout ({exc})") from None
        self.chunk_layouts = {
            (s, f.name): chunk_layout(f, lay) for s, lay in self.layouts.items() for f in self.fields.values()
        }
        self.table_rows = shard_table.offsets(self.layouts)
        self._records: OrderedDict[tuple[str, int], dict] = OrderedDict()
        self._followed: dict[tuple[str, int], str] = {}
        """sha256 of every commit record read before the manifest existed (checked against its table)."""
        if self.manifest is not None:
            self._open_complete()
        elif self.following and fingerprint(self.header["identity"]) != self.header["fingerprint"]:
            raise self.damaged(f"the identity in {HEADER} does not hash to its fingerprint (it was edited)")
        self.settings = self._settings()
        self.mirror = None
        self._data: Storage = self.storage
        if local_cache is not None and local_cache[1] > 0 and not self.is_local:
            root = Path(local_cache[0]).expanduser() / self.header["fingerprint"]
            self.mirror = ShardMirror(self.storage, root, int(local_cache[1] * 1e9))
            self._data = LocalStorage(root)
        self._indexes: OrderedDict[tuple[str, str, int], np.ndarray] = OrderedDict()
        self._teacher_dir: Path | None = None
        self._fit: Fit = None
        self._lease = PresenceLease(self.storage) if lease else None

    @property
    def path(self) -> Path:
        """The cache's local directory (a local cache only)."""
        return self.storage.local_path()

    @property
    def is_local(self) -> bool:
        return isinstance(self.storage, LocalStorage)

    @property
    def splits(self) -> list[str]:
        return list(self.layouts)

    def close(self) -> None:
        if self._lease is not None:
            self._lease.close()

    def _open_complete(self) -> None:
        problems = manifest_problems(self.manifest)
        if problems:
            raise self.damaged(f"{MANIFEST} {problems[0]}")
        self.table = self._load_table()
        if self.check:
            check_open(self)

    # -- following a growing cache -----------------------------------------------------

    def refresh(self) -> bool:
        """A follower's look at the cache: refuse it if it was replaced (another fingerprint), and
        once its manifest exists, make the open-time checks and check every commit record read so
        far against the shard table. True when the cache is complete."""
        header, torn = json_or_torn(self.storage, HEADER)
        if header is None or header.get("fingerprint") != self.header["fingerprint"]:
            now = "torn" if torn else ("gone" if header is None else f"fingerprint {header.get('fingerprint')}")
            raise CacheError(
                f"{self.url} was replaced while this run followed it (fingerprint {self.header['fingerprint']}, now "
                f"{now}); nothing of the new cache was read; start a new run on it"
            )
        if not self.following:
            return True
        manifest = self.store.manifest
        if manifest is None:
            return False
        self.manifest, self.following = manifest, False
        self._open_complete()
        for (split, shard), digest in self._followed.items():
            if bytes(self.table[self.table_rows[split] + shard]["record_sha256"]).hex() != digest:
                raise self.damaged(f"{self.store.commit_key(split, shard)} changed after this run read its shard")
        self._followed.clear()
        self._teacher_dir = None  # checked again, against the manifest
        self.settings = self._settings()
        return True

    def committed(self) -> set[tuple[str, int]]:
        """(split, shard) of the shards committed so far (every one, once the cache is complete)."""
        if not self.following:
            return {(s, i) for s, lay in self.layouts.items() for i in range(lay.shards)}
        return self.store.committed_names()

    # -- checks --------------------------------------------------------------------------

    def damaged(self, what: str) -> CacheError:
        return CacheError(
            f"{self.url}: {what}; run `pipeline verify {self.url}` (and `--repair`, then rerun cache-teacher)"
        )

    def _load_table(self) -> np.ndarray:
        meta = self.manifest["shard_table"]
        try:
            blob = self.storage.read_bytes(meta["path"])
        except FileNotFoundError:
            raise self.damaged(f"{meta['path']} (the shard table) is missing") from None
        if len(blob) != meta["bytes"] or _sha256(blob) != meta["sha256"]:
            raise self.damaged(f"{meta['path']} (the shard table) differs from the manifest's record")
        try:
            return shard_table.from_bytes(blob, sum(lay.shards for lay in self.layouts.values()), len(self.fields))
        except ValueError as exc:
            raise self.damaged(f"{meta['path']} does not fit the layout ({exc})") from None

    def records(self) -> Iterator[dict]:
        """Every shard's commit record, in table order (each read and checked as `record` does)."""
        for split, lay in self.layouts.items():
            for shard in range(lay.shards):
                yield self.record(split, shard)

    def record(self, split: str, shard: int) -> dict:
        """The commit record of one shard, read on first use (bounded LRU) and refused unless it
        hashes to its shard-table row and names this cache, this place and the listed sizes."""
        key = (split, shard)
        record = self._records.get(key)
        if record is not None:
            self._records.move_to_end(key)
            return record
        if self.manifest is None and not self.following:
            raise CacheError(f"{self.url} is incomplete (no {MANIFEST}); its shard records are not final")
        path = self.store.commit_key(split, shard)
        try:
            blob = self.storage.read_bytes(path)
        except FileNotFoundError:
            if self.following:
                raise NotCommitted(f"{split} shard {shard:05d} is not committed yet") from None
            raise self.damaged(f"{split} shard {shard:05d} has no commit record ({path})") from None
        if self.following:  # no table yet: the record must name this cache and place (below)
            self._followed[key] = _sha256(blob)
        else:
            row = self.table[self.table_rows[split] + shard]
            if _sha256(blob) != bytes(row["record_sha256"]).hex():
                raise self.damaged(
                    f"{path} differs from the manifest's shard table (edited, swapped or from another cache)"
                )
        try:
            record = json.loads(blob)
        except ValueError:
            raise self.damaged(f"{path} is torn (not valid JSON)") from None
        problem = record_problem(record, self.header["fingerprint"], self.layouts, list(self.fields.values()))
        if problem is not None:
            raise self.damaged(f"{path} {problem}")
        self._records[key] = record
        if len(self._records) > INDEX_CACHE:
            self._records.popitem(last=False)
        return record

    # -- typed settings ------------------------------------------------------------------

    def _settings(self) -> CacheSettings:
        identity = self.header["identity"]
        meta = self.manifest or self.header
        try:
            return CacheSettings(
                format_version=self.header["format_version"],
                fingerprint=self.header["fingerprint"],
                seed=int(identity["seed"]),
                masking=from_dict(MaskingConfig, identity["masking"]),
                outputs=from_dict(OutputsConfig, identity["outputs"]),
                teacher=TeacherInfo(**meta["teacher"]),
                tokenizer=TokenizerInfo(**meta["tokenizer"]),
                head=self._has_head(),
                splits=list(self.layouts),
            )
        except (ConfigError, KeyError, TypeError) as exc:
            raise self.damaged(f"its settings do not load ({exc})") from None

    def _has_head(self) -> bool:
        if self.manifest is not None:
            return bool(self.manifest.get("head", False))
        return f"{TEACHER_DIR}/{HEAD_FILE}" in self.header.get("side_files", {})

    # -- teacher files -------------------------------------------------------------------

    def teacher_dir(self) -> Path:
        """A local directory with the teacher's config, head and tokenizer files, each checked
        against the manifest on first use (they make every exact-KD target). For a remote cache, a
        copy under $DISTILCACHE_HOME/remote/<fingerprint>/, made once."""
        if self._teacher_dir is not None:
            return self._teacher_dir
        if self.manifest is None and not self.following:
            raise CacheError(f"{self.url} is incomplete (no {MANIFEST}); its teacher files are not recorded yet")
        if self.is_local:
            directory = self.storage.local_path(TEACHER_DIR)
            problem = self._teacher_problem(directory)
        else:
            directory = Path(DEFAULT_CACHE_DIR).expanduser() / "remote" / self.header["fingerprint"] / TEACHER_DIR
            directory.parent.mkdir(parents=True, exist_ok=True)
            problem = self._teacher_problem(self.storage.download(TEACHER_DIR, directory))
            if problem is not None:  # a stale or damaged local copy: fetch it again, once
                shutil.rmtree(directory, ignore_errors=True)
                problem = self._teacher_problem(self.storage.download(TEACHER_DIR, directory))
        if problem is not None:
            raise self.damaged(problem)
        self._teacher_dir = directory
        return directory

    def _teacher_problem(self, directory: Path) -> str | None:
        """What is wrong with the teacher files against the manifest's records (before the manifest,
        against the header's, written first: NotCommitted while one is still missing)."""
        if self.following:
            recorded = self.header["side_files"]
            for key in recorded:
                if not (directory / key[len(TEACHER_DIR) + 1 :]).is_file():
                    raise NotCommitted(f"{key} is not written yet")
        else:
            recorded = self.manifest["teacher_files"]
        recorded = {k: v for k, v in recorded.items() if k.startswith(f"{TEACHER_DIR}/")}
        present = {f"{TEACHER_DIR}/{p.relative_to(directory).as_posix()}" for p in directory.rglob("*") if p.is_file()}
        for key in sorted(present - set(recorded)):
            return f"{key} is not recorded in {MANIFEST} (added after the capture)"
        for key, meta in sorted(recorded.items()):
            path = directory / key[len(TEACHER_DIR) + 1 :]
            if not path.is_file():
                return f"{key} is missing"
            blob = path.read_bytes()
            if len(blob) != meta["bytes"] or _sha256(blob) != meta["sha256"]:
                return (
                    f"{key} differs from the {'header' if self.following else 'manifest'}'s record (edited or "
                    "damaged: the teacher's targets would change)"
                )
        return None

    def head(self, device: str | torch.device = "cpu") -> torch.nn.Module | None:
        """The cached MLM head (float32, eval mode), or None when the cache has none."""
        if not self.settings.head:
            return None
        return load_head(self.teacher_dir(), device)

    def hidden_fit(self) -> Fit:
        """The fitted tensors of a `pq` or `pca` hidden codec (its file checked against the manifest
        and the fingerprint), or None for the codecs without any."""
        if self.settings.outputs.hidden_dtype not in FITTED_CODECS:
            return None
        if self._fit is None:
            path = self.teacher_dir() / FIT_FILE
            if not path.is_file():
                raise self.damaged(f"{TEACHER_DIR}/{FIT_FILE} (the fitted hidden codec) is missing")
            blob = path.read_bytes()
            if _sha256(blob) != self.header["identity"].get("hidden_fit_sha256"):
                raise self.damaged(f"{TEACHER_DIR}/{FIT_FILE} is not the fitted codec the fingerprint names")
            self._fit = fit_from_bytes(blob)
        return self._fit

    def token_counts(self) -> np.ndarray:
        """(V,) token occurrences of the train split, checked against the manifest."""
        key = f"{DATA}/token_counts/c/0"
        meta = (self.manifest or {}).get("teacher_files", {}).get(key)
        blob = self.storage.read_bytes(key) if meta is not None and self.storage.exists(key) else None
        if blob is None or _sha256(blob) != meta["sha256"]:
            raise self.damaged(f"{key} is missing or differs from the manifest's record")
        layout = parse_layout(json.loads(self.storage.read_bytes(f"{DATA}/token_counts/zarr.json")))
        crc = int.from_bytes(blob[-4:], "little")
        return decode_chunk(blob, layout, crc)

    # -- data ----------------------------------------------------------------------------

    def read_rows(self, split: str, start: int, stop: int, names: list[str] | None = None) -> dict[str, np.ndarray]:
        """Raw stored arrays for rows [start, stop) (decode with cache_format.encode)."""
        names = names or list(self.fields)
        lay = self.layouts[split]
        first, last = start // lay.block_rows, (max(stop, start + 1) - 1) // lay.block_rows
        offset = first * lay.block_rows
        out = {}
        for name in names:
            parts = [self._chunk(split, name, c) for c in range(first, last + 1)]
            data = parts[0] if len(parts) == 1 else np.concatenate(parts)
            out[name] = data[start - offset : stop - offset]
        return out

    def _chunk(self, split: str, name: str, chunk: int) -> np.ndarray:
        """One field's inner chunk `chunk` of `split`, decoded, CRC-checked and bound to its place."""
        layout = self.chunk_layouts[(split, name)]
        shard, j = divmod(chunk, layout.chunks_per_shard)
        meta = self.record(split, shard)["files"][name]
        where = f"{split} shard {shard:05d}: the {name}"
        try:
            if self.mirror is not None:
                self.mirror.ensure(meta["path"], meta["bytes"], meta["sha256"])
            offset, nbytes = self._index(split, name, shard, meta, layout)[j].tolist()
            if offset == EMPTY:
                raise ChunkError(f"chunk {j} was never written")
            raw = self._data.read_range(meta["path"], offset, nbytes)
            if len(raw) != nbytes:
                raise ChunkError("file is truncated")
            return decode_chunk(raw, layout, int(decode_crcs(meta["chunk_crc32c"])[j]))
        except FileNotFoundError:
            raise self.damaged(f"{where} file is missing ({meta['path']}; deleted while being read?)") from None
        except ChunkError as exc:
            raise self.damaged(f"{where} data is {exc}") from None

    def _index(self, split: str, name: str, shard: int, meta: dict, layout: ChunkLayout) -> np.ndarray:
        """The shard file's index of inner chunks (read once per process, bounded LRU)."""
        key = (split, name, shard)
        index = self._indexes.get(key)
        if index is None:
            if meta["bytes"] < layout.index_bytes:
                raise ChunkError("file is shorter than its shard index")
            raw = self._data.read_range(meta["path"], meta["bytes"] - layout.index_bytes, layout.index_bytes)
            index = parse_index(bytes(raw), layout)
            self._indexes[key] = index
            if len(self._indexes) > INDEX_CACHE:
                self._indexes.popitem(last=False)
        else:
            self._indexes.move_to_end(key)
        return index

    def prefetch_blocks(self, split: str, blocks: list[int], names: list[str]) -> None:
        """Start fetching the shard files these blocks live in (a mirrored remote cache only)."""
        if self.mirror is None:
            return
        lay = self.layouts[split]
        shards = sorted({b * lay.block_rows // lay.shard_rows for b in blocks})
        if self.following:  # only what is committed: the rest is fetched when it is
            shards = [s for s in shards if (split, s) in self.store.committed_names()]
        files = [self.record(split, s)["files"][n] for s in shards for n in names]
        self.mirror.prefetch([(m["path"], m["bytes"], m["sha256"]) for m in files])

    def read_block(self, split: str, block: int, names: list[str] | None = None) -> dict[str, np.ndarray]:
        """One chunk-aligned block of rows: the unit of fast reads."""
        lay = self.layouts[split]
        start = block * lay.block_rows
        return self.read_rows(split, start, min(start + lay.block_rows, lay.rows), names)

    def iter_blocks(self, split: str, names: list[str] | None = None) -> Iterator[dict[str, np.ndarray]]:
        for b in range(self.layouts[split].blocks):
            yield self.read_block(split, b, names)


def _sha256(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()
