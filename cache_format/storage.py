"""Where a cache's files live: one small interface every file of the layout goes through.

Keys are '/'-separated paths relative to the cache root (`cache.json`, `commits/train-00000.json`,
`data.zarr/train/hidden/c/0/0/0`). The same operations serve a local directory and, through
`zarr_store()`, the Zarr arrays. `create` is the exclusive publish that makes a shard's commit
record (and a lock) appear exactly once.
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import obstore
import zarr
from obstore.exceptions import AlreadyExistsError
from zarr.storage import LocalStore

from cache_format.atomic import PARTIAL, fsync_dir, write_bytes_atomic
from cache_format.credentials import check_credentials
from pipeline.errors import CacheError


def safe_key(key: str) -> bool:
    """A key names a place inside the cache: relative, no `..` component, no empty name."""
    parts = key.replace("\\", "/").split("/")
    return bool(key) and not key.startswith(("/", "\\")) and ".." not in parts and "" not in parts[:-1]


class LocalStorage:
    """A cache in a local (or shared POSIX) directory."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()

    def __str__(self) -> str:
        return str(self.root)

    @property
    def url(self) -> str:
        return str(self.root)

    def _path(self, key: str) -> Path:
        if key and not safe_key(key):
            raise CacheError(f"{self.url}: refusing the path {key!r}, which leaves the cache directory")
        return self.root / key

    def _owned(self, key: str) -> Path:
        """The path of `key` for a write or a delete: also refused when a symlink on the way leads
        out of the cache (a delete must never reach a file the cache does not hold)."""
        path = self._path(key)
        real, root = os.path.realpath(path), os.path.realpath(self.root)
        if os.path.commonpath([real, root]) != root:
            raise CacheError(
                f"{self.url}: {key} leads outside the cache (to {real}) through a symlink; remove the link"
            )
        return path

    def exists(self, key: str = "") -> bool:
        return self._path(key).exists()

    def size(self, key: str) -> int | None:
        """Bytes of the file at `key`, None when it does not exist."""
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError:
            return None

    def read_bytes(self, key: str) -> bytes:
        return self._path(key).read_bytes()

    def read_range(self, key: str, offset: int, length: int) -> bytearray:
        """`length` bytes of `key` from `offset` (FileNotFoundError, or fewer bytes past the end)."""
        buf = bytearray(length)
        with self._path(key).open("rb", buffering=0) as fh:
            fh.seek(offset)
            got = fh.readinto(buf)
        return buf if got == length else buf[:got]

    @contextlib.contextmanager
    def view(self, key: str) -> Iterator[np.ndarray]:
        """The whole file as a read-only uint8 array, memory-mapped (no copy; the map goes when the
        last array viewing it does)."""
        with self._path(key).open("rb") as fh:
            if os.fstat(fh.fileno()).st_size == 0:
                yield np.zeros(0, dtype=np.uint8)
                return
            mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        yield np.frombuffer(mapped, dtype=np.uint8)

    def write_bytes(self, key: str, data: bytes) -> None:
        """Publish `data` at `key` atomically (a reader sees the old or the new content)."""
        path = self._owned(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(path, data)

    def create(self, key: str, data: bytes) -> bool:
        """Publish `data` at `key` only if nothing is there; False when it already exists."""
        path = self._owned(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            write_bytes_atomic(path, data, exclusive=True)
        except FileExistsError:
            return False
        return True

    def delete(self, key: str) -> None:
        self._owned(key).unlink(missing_ok=True)

    def list(self, prefix: str = "") -> list[str]:
        """Keys of the files under `prefix`, sorted."""
        return sorted(self.sizes(prefix))

    def sizes(self, prefix: str = "") -> dict[str, int]:
        """Key -> bytes of every file under `prefix` (one walk)."""
        return dict(self.iter_sizes(prefix))

    def iter_sizes(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        """(key, bytes) of every file under `prefix`, streamed (nothing held per file); a symlink
        that leads out of the cache is refused, one that stays inside is listed as what it points to."""
        base = self._path(prefix)
        if base.is_dir():
            yield from self._walk(base, os.path.realpath(self.root), set())

    def _walk(self, directory: Path, root: str, seen: set[str]) -> Iterator[tuple[str, int]]:
        """Another process may rename or remove files while they are listed (an atomic write's
        temp file, a lease released): what is gone by the time it is looked at is not listed."""
        seen.add(os.path.realpath(directory))
        try:
            entries = os.scandir(directory)
        except FileNotFoundError:
            return
        with entries:
            for entry in entries:
                path = Path(entry.path)
                if entry.is_symlink():
                    real = os.path.realpath(path)
                    if os.path.commonpath([real, root]) != root:
                        key = path.relative_to(self.root)
                        raise CacheError(
                            f"{self.url}: {key} is a symlink to {real}, outside the cache; a cache holds its own "
                            "files: replace the link with the file, or remove it"
                        )
                    if real in seen:
                        continue
                if entry.is_dir():
                    yield from self._walk(path, root, seen)
                elif entry.is_file():
                    try:
                        size = entry.stat().st_size
                    except FileNotFoundError:
                        continue
                    yield str(path.relative_to(self.root)), size

    def sha256(self, key: str) -> str:
        """Streamed hash of the file at `key`."""
        digest = hashlib.sha256()
        with self._path(key).open("rb") as fh:
            while block := fh.read(1 << 22):
                digest.update(block)
        return digest.hexdigest()

    def fsync(self, key: str) -> None:
        with self._path(key).open("rb") as fh:
            os.fsync(fh.fileno())

    def zarr_store(self, read_only: bool = False) -> zarr.abc.store.Store:
        return LocalStore(self.root, read_only=read_only)

    def is_empty(self) -> bool:
        return not self.root.exists() or not any(self.root.iterdir())

    def is_foreign_file(self) -> bool:
        """The cache location is an existing file, not a directory."""
        return self.root.exists() and not self.root.is_dir()

    def delete_all(self) -> None:
        """Remove the whole cache: renamed away first (atomic), so no reader sees a half-deleted one."""
        if not self.root.exists():
            return
        trash = self.root.with_name(f".{self.root.name}.deleting-{uuid.uuid4().hex[:8]}")
        os.replace(self.root, trash)
        fsync_dir(self.root.parent)
        shutil.rmtree(trash, ignore_errors=True)

    def remove_partials(self) -> int:
        """Delete temp files a killed writer left behind (zarr's and ours end in `.partial`)."""
        found = list(self.root.rglob(f"*{PARTIAL}")) if self.root.is_dir() else []
        for p in found:
            p.unlink(missing_ok=True)
        return len(found)

    def local_path(self, key: str = "") -> Path:
        return self._path(key)


class ObjectStorage:
    """A cache under an object-store prefix (s3://, gs://, az://), through obstore.

    Credentials and endpoint come from the standard environment (AWS_* with AWS_ENDPOINT_URL for
    S3-compatible stores, GOOGLE_APPLICATION_CREDENTIALS, AZURE_*), or from `options` (obstore's
    config keys, e.g. endpoint, region, skip_signature; `allow_http` and timeouts are client
    options). Puts are atomic; `create` is a conditional put (If-None-Match: *).
    """

    def __init__(self, url: str, options: dict | None = None):
        from obstore.store import from_url

        self.url = url.rstrip("/")
        options = check_credentials(self.url, options or {})
        client = {k: options.pop(k) for k in list(options) if k in _CLIENT_OPTIONS}
        self._store = from_url(self.url, client_options=client or None, **options)

    def __str__(self) -> str:
        return self.url

    def exists(self, key: str = "") -> bool:
        return self.size(key) is not None if key else bool(self.list())

    def size(self, key: str) -> int | None:
        try:
            return int(obstore.head(self._store, key)["size"])
        except FileNotFoundError:
            return None

    def read_bytes(self, key: str) -> bytes:
        return bytes(obstore.get(self._store, key).bytes())

    def read_range(self, key: str, offset: int, length: int):
        """`length` bytes of `key` from `offset` (one ranged GET; FileNotFoundError when missing)."""
        return obstore.get_range(self._store, key, start=offset, length=length)

    @contextlib.contextmanager
    def view(self, key: str) -> Iterator[np.ndarray]:
        """The whole object as a read-only uint8 array (one GET)."""
        yield np.frombuffer(obstore.get(self._store, key).bytes(), dtype=np.uint8)

    def write_bytes(self, key: str, data: bytes) -> None:
        if not safe_key(key):
            raise CacheError(f"{self.url}: refusing the key {key!r}, which leaves the cache prefix")
        obstore.put(self._store, key, data)

    def create(self, key: str, data: bytes) -> bool:
        if not safe_key(key):
            raise CacheError(f"{self.url}: refusing the key {key!r}, which leaves the cache prefix")
        try:
            obstore.put(self._store, key, data, mode="create")
        except AlreadyExistsError:
            return False
        return True

    def delete(self, key: str) -> None:
        if not safe_key(key):
            raise CacheError(f"{self.url}: refusing the key {key!r}, which leaves the cache prefix")
        with contextlib.suppress(FileNotFoundError):
            obstore.delete(self._store, key)

    def list(self, prefix: str = "") -> list[str]:
        prefix = prefix.rstrip("/")
        keys = [m["path"] for page in obstore.list(self._store, prefix=prefix or None) for m in page]
        return sorted(k for k in keys if not prefix or k == prefix or k.startswith(prefix + "/"))

    def sizes(self, prefix: str = "") -> dict[str, int]:
        """Key -> bytes of every object under `prefix` (one paginated listing, no HEAD per object)."""
        return dict(self.iter_sizes(prefix))

    def iter_sizes(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        """(key, bytes) of every object under `prefix`, page by page (1,000 objects a request)."""
        prefix = prefix.rstrip("/")
        for page in obstore.list(self._store, prefix=prefix or None):
            for m in page:
                if not prefix or m["path"] == prefix or m["path"].startswith(prefix + "/"):
                    yield m["path"], int(m["size"])

    def sha256(self, key: str) -> str:
        """Streamed: the object is hashed as it arrives, never held whole."""
        digest = hashlib.sha256()
        for chunk in obstore.get(self._store, key):
            digest.update(chunk)
        return digest.hexdigest()

    def fsync(self, key: str) -> None:
        """A completed put is durable."""

    def zarr_store(self, read_only: bool = False) -> zarr.abc.store.Store:
        from zarr.storage import ObjectStore

        return ObjectStore(self._store, read_only=read_only)

    def is_empty(self) -> bool:
        return not self.list()

    def is_foreign_file(self) -> bool:
        return False

    def delete_all(self) -> None:
        """The manifest first (readers refuse an incomplete cache), then the header, then the rest."""
        for key in ("manifest.json", "cache.json"):
            self.delete(key)
        for key in self.list():
            self.delete(key)

    def remove_partials(self) -> int:
        return 0  # puts are atomic: a killed writer leaves no partial object

    def local_path(self, key: str = "") -> Path:
        raise NotImplementedError(f"{self.url} is not on a local filesystem")

    def download(self, prefix: str, dest: Path) -> Path:
        """Copy the objects under `prefix` into the local directory `dest` (atomically, once)."""
        if dest.is_dir():
            return dest
        tmp = dest.with_name(f"{dest.name}.{uuid.uuid4().hex[:8]}{PARTIAL}")
        for key in self.list(prefix):
            target = tmp / key[len(prefix) :].lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(self.read_bytes(key))
        try:
            os.replace(tmp, dest)
        except OSError:  # another process got there first
            shutil.rmtree(tmp, ignore_errors=True)
        return dest


_CLIENT_OPTIONS = {"allow_http", "timeout", "connect_timeout", "allow_invalid_certificates", "proxy_url"}
OBJECT_SCHEMES = ("s3://", "s3a://", "gs://", "gcs://", "az://", "azure://", "abfs://", "abfss://", "memory://")
Storage = LocalStorage | ObjectStorage
"""Where a cache lives: a local directory, or an object-store prefix."""


def is_remote(location: str | Path) -> bool:
    return str(location).startswith(OBJECT_SCHEMES)


def open_storage(location: str | Path, options: dict | None = None) -> Storage:
    """The storage of a cache location: a local path, `file://PATH`, or an object-store URL."""
    text = str(location)
    if is_remote(text):
        return ObjectStorage(text, options)
    return LocalStorage(text.removeprefix("file://"))
