"""Read access to a complete cache, checked when it opens and on every read.

Opening (training, evaluation, inspection) refuses a cache whose header and manifest disagree,
whose identity does not hash to its fingerprint, whose metadata files (cache.json, every
zarr.json) differ from the hashes the manifest recorded, or whose shard files are missing or
have another size than recorded. Every read checks that the shard files it touches are still
there (zarr would return fill values for a missing one), and every inner chunk's CRC32C is
verified as it is decoded: damaged data is an error naming the split, the field and the shard,
never numbers.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import zarr
from zarr.storage import LocalStore

from cache_format.head import load_head
from cache_format.lock import ReaderLease
from cache_format.manifest import HEADER_KEYS, fingerprint
from cache_format.mirror import ShardMirror
from cache_format.settings import (
    DEFAULT_CACHE_DIR,
    CacheSettings,
    MaskingConfig,
    OutputsConfig,
    TeacherInfo,
    TokenizerInfo,
)
from cache_format.storage import LocalStorage, open_storage
from cache_format.store import DATA, FORMAT, FORMAT_VERSION, HEADER, MANIFEST, TEACHER_DIR, CacheError, CacheStore
from pipeline.config import from_dict
from pipeline.errors import ConfigError


def _safe_key(key: str) -> bool:
    """A manifest path must stay inside the cache."""
    return not key.startswith(("/", "\\")) and ".." not in key.replace("\\", "/").split("/")


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
        if require_complete and self.manifest is None:
            raise CacheError(
                f"{self.url} is incomplete (no {MANIFEST}); rerun `pipeline cache-teacher` with the same config "
                "to finish it"
            )
        self.fields = {f.name: f for f in self.store.fields()}
        self.layouts = self.store.layouts()
        self._files = self._shard_files(strict=check) if self.manifest is not None else {}
        if check and self.manifest is not None:
            self._check_open()
        self.settings = self._settings()
        self.mirror = None
        store = self.storage.zarr_store(read_only=True)
        if local_cache is not None and local_cache[1] > 0 and not self.is_local:
            root = Path(local_cache[0]).expanduser() / self.header["fingerprint"]
            self.mirror = ShardMirror(self.storage, root, int(local_cache[1] * 1e9))
            self.mirror.mirror_files(self.store.metadata_keys()[1:])  # every zarr.json
            store = LocalStore(root, read_only=True)
        self._root = zarr.open_group(store=store, path=DATA, mode="r")
        self._seen: set[tuple[str, str, int]] = set()
        self._lease = ReaderLease(self.storage) if lease else None

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

    # -- checks --------------------------------------------------------------------------

    def _damaged(self, what: str) -> CacheError:
        return CacheError(
            f"{self.url}: {what}; run `pipeline verify {self.url}` (and `--repair`, then rerun cache-teacher)"
        )

    def _shard_files(self, strict: bool) -> dict[tuple[str, str, int], tuple[str, int]]:
        """(split, field, shard) -> (storage key, recorded bytes), from the manifest; a path that
        leaves the cache is refused (`strict`) or left out (then reading that shard is refused)."""
        out = {}
        for record in self.manifest["shards"]:
            for name, meta in record["files"].items():
                if not _safe_key(meta["path"]):
                    if strict:
                        raise self._damaged(f"manifest.json names a path outside the cache ({meta['path']})")
                    continue
                out[(record["split"], name, record["shard"])] = (meta["path"], int(meta["bytes"]))
        return out

    def _check_open(self) -> None:
        m = self.manifest
        for key in HEADER_KEYS:
            if self.header.get(key) != m.get(key):
                raise self._damaged(f"{HEADER} and {MANIFEST} disagree on `{key}` (one of them was edited)")
        if fingerprint(self.header["identity"]) != self.header["fingerprint"]:
            raise self._damaged(f"the identity in {HEADER} does not hash to its fingerprint (it was edited)")
        for key, meta in m.get("metadata", {}).items():
            if not _safe_key(key):
                raise self._damaged(f"manifest.json names a path outside the cache ({key})")
            if self.storage.size(key) != meta["bytes"] or self.storage.sha256(key) != meta["sha256"]:
                raise self._damaged(f"{key} differs from the manifest's record (edited or damaged)")
        sizes = self.storage.sizes(DATA)  # one listing, not a request per file
        for split, lay in self.layouts.items():
            for shard in range(lay.shards):
                for name in self.fields:
                    self._check_shard_file(split, name, shard, sizes)

    def _check_shard_file(self, split: str, name: str, shard: int, sizes: dict[str, int] | None = None) -> None:
        entry = self._files.get((split, name, shard))
        if entry is None:
            raise self._damaged(f"{split} shard {shard:05d} has no {name} record in the manifest")
        key, recorded = entry
        size = sizes.get(key) if sizes is not None else self.storage.size(key)
        if size is None:
            raise self._damaged(f"{split} shard {shard:05d}: the {name} file is missing ({key})")
        if size != recorded:
            raise self._damaged(
                f"{split} shard {shard:05d}: the {name} file has {size} bytes, {recorded} recorded ({key})"
            )

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
                head=bool((self.manifest or {}).get("head", False)),
                splits=list(self.layouts),
            )
        except (ConfigError, KeyError, TypeError) as exc:
            raise self._damaged(f"its settings do not load ({exc})") from None

    # -- teacher files -------------------------------------------------------------------

    def teacher_dir(self) -> Path:
        """A local directory with the teacher's config, head and tokenizer files (for a remote cache,
        a copy under $DISTILCACHE_HOME/remote/<fingerprint>/, made once)."""
        if self.is_local:
            return self.storage.local_path(TEACHER_DIR)
        dest = Path(DEFAULT_CACHE_DIR).expanduser() / "remote" / self.header["fingerprint"] / TEACHER_DIR
        dest.parent.mkdir(parents=True, exist_ok=True)
        return self.storage.download(TEACHER_DIR, dest)

    def head(self, device: str | torch.device = "cpu") -> torch.nn.Module | None:
        """The cached MLM head (float32, eval mode), or None when the cache has none."""
        if not self.settings.head:
            return None
        return load_head(self.teacher_dir(), device)

    def token_counts(self) -> np.ndarray:
        return self._root["token_counts"][...]

    # -- data ----------------------------------------------------------------------------

    def read_rows(self, split: str, start: int, stop: int, names: list[str] | None = None) -> dict[str, np.ndarray]:
        """Raw stored arrays for rows [start, stop) (decode with cache_format.encode)."""
        names = names or list(self.fields)
        lay = self.layouts[split]
        shards = range(start // lay.shard_rows, (max(stop, start + 1) - 1) // lay.shard_rows + 1)
        out = {}
        for name in names:
            for shard in shards:  # zarr would read a missing shard file as fill values
                self._ready(split, name, shard)
            try:
                out[name] = self._root[split][name][start:stop]
            except (ValueError, RuntimeError) as exc:  # a CRC32C or decompression failure
                where = ", ".join(f"{s:05d}" for s in shards)
                raise self._damaged(f"{split} shard {where}: the {name} data is damaged ({str(exc)[:80]})") from None
        return out

    def _ready(self, split: str, name: str, shard: int) -> None:
        """The shard file is there with its recorded size (local disk: checked at every read; object
        storage: once per reader; through the mirror: fetched if needed)."""
        if self.mirror is not None:
            self.mirror.ensure(*self._files[(split, name, shard)])
        elif self.is_local or (split, name, shard) not in self._seen:
            self._check_shard_file(split, name, shard)
            self._seen.add((split, name, shard))

    def prefetch_blocks(self, split: str, blocks: list[int], names: list[str]) -> None:
        """Start fetching the shard files these blocks live in (a mirrored remote cache only)."""
        if self.mirror is None:
            return
        lay = self.layouts[split]
        shards = sorted({b * lay.block_rows // lay.shard_rows for b in blocks})
        self.mirror.prefetch([self._files[(split, n, s)] for s in shards for n in names])

    def read_block(self, split: str, block: int, names: list[str] | None = None) -> dict[str, np.ndarray]:
        """One chunk-aligned block of rows: the unit of fast reads."""
        lay = self.layouts[split]
        start = block * lay.block_rows
        return self.read_rows(split, start, min(start + lay.block_rows, lay.rows), names)

    def iter_blocks(self, split: str, names: list[str] | None = None) -> Iterator[dict[str, np.ndarray]]:
        for b in range(self.layouts[split].blocks):
            yield self.read_block(split, b, names)
