"""The object store interface: one API over local files (DATA_DIR) and S3-compatible storage.

Keys are relative POSIX paths such as `datasets/<id>/images/0.png`, the same strings the
database stores, so a row names its object the same way on either backend. A key never leaves
the store's root (or, on S3, its key prefix): `check_key` refuses absolute keys, `..`, empty
segments and backslashes before any backend sees them.

Writes are whole-object: a reader sees the old object or the new one, never half of one (local:
a temp file renamed into place; S3: one PUT, or a multipart upload completed only at the end).
"""

from __future__ import annotations

import logging
import mimetypes
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TypeVar

__all__ = [
    "ObjectInfo",
    "ObjectStore",
    "StorageError",
    "StorageKeyMissing",
    "StoragePathError",
    "StorageUnavailable",
    "check_key",
    "check_prefix",
]

logger = logging.getLogger(__name__)
_Item = TypeVar("_Item")

# S3's own limit on a key, in UTF-8 bytes.
MAX_KEY_BYTES = 1024
# Parallel requests of one folder transfer: S3 answers each small object in a round trip, so a
# few in flight hide the latency; more only queue on the store.
TRANSFER_THREADS = 16


class StorageError(Exception):
    """Something went wrong in the object store."""


class StoragePathError(StorageError, ValueError):
    """A key (or relative path) that would leave the storage root, or is not a plain key."""


class StorageKeyMissing(StorageError):
    """No object is stored under this key."""

    def __init__(self, key: str) -> None:
        super().__init__(f"no object stored under {key!r}")
        self.key = key


class StorageUnavailable(StorageError):
    """The store cannot be reached or refused the request (-> 503 with Retry-After)."""


@dataclass(frozen=True)
class ObjectInfo:
    """One stored object, as listings report it."""

    key: str
    size: int
    modified: float | None = None  # seconds since the epoch, as the store reports it


def check_key(key: str) -> str:
    """`key` itself when it is a plain relative POSIX key; StoragePathError otherwise."""
    if not isinstance(key, str) or not key:
        raise StoragePathError("an object key must be a non-empty string")
    if len(key.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
        raise StoragePathError(f"object key longer than {MAX_KEY_BYTES} bytes")
    if "\\" in key or "\x00" in key or key.startswith("/"):
        raise StoragePathError(f"object key {key!r} is not a relative POSIX key")
    if any(part in ("", ".", "..") for part in key.split("/")):
        raise StoragePathError(f"object key {key!r} has an empty, '.' or '..' segment")
    return key


def check_prefix(prefix: str, *, folder: bool = False) -> str:
    """A listing prefix: empty (everything) or the start of a key. With `folder`, it must name
    a folder (`jobs/<id>/`), so that deleting `jobs/1/` can never take `jobs/10/` with it."""
    if prefix == "" and not folder:
        return prefix
    if folder and not prefix.endswith("/"):
        raise StoragePathError(f"a folder prefix must end with '/': {prefix!r}")
    check_key(prefix.removesuffix("/") if prefix.endswith("/") else prefix + "x")
    return prefix


class ObjectStore(ABC):
    """Whole objects under relative keys. Every method raises StorageUnavailable when the store
    cannot be reached, StoragePathError for a bad key, StorageKeyMissing for a missing object."""

    #: "local" or "s3"
    kind: str

    @abstractmethod
    def put_bytes(self, key: str, data: bytes, content_type: str | None = None) -> None:
        """Store `data` under `key` (replacing any object there)."""

    @abstractmethod
    def put_stream(self, key: str, stream: BinaryIO, content_type: str | None = None) -> int:
        """Store everything read from `stream` without holding it whole in memory (S3: a
        multipart upload once it exceeds one part); the number of bytes stored."""

    def put_file(self, key: str, path: Path, content_type: str | None = None) -> int:
        """Store the file at `path`; its size."""
        with Path(path).open("rb") as stream:
            return self.put_stream(key, stream, content_type)

    def put_folder(self, folder: Path, prefix: str, threads: int = TRANSFER_THREADS) -> int:
        """Store every file under `folder` as `prefix` + its relative path; how many.

        All or nothing: on an error the objects written so far are deleted again (as far as the
        store still answers; what it refuses is logged) and the error is raised. `folder` may be
        consumed (the local store renames it into place).
        """
        pairs = self.folder_keys(folder, prefix)
        try:
            _in_parallel(
                lambda pair: self.put_file(pair[0], pair[1], mimetypes.guess_type(pair[1].name)[0]),
                pairs,
                threads,
            )
        except BaseException:
            try:
                self.delete_prefix(prefix)
            except StorageError:
                logger.warning("could not remove the partial upload %s", prefix, exc_info=True)
            raise
        return len(pairs)

    @staticmethod
    def folder_keys(folder: Path, prefix: str) -> list[tuple[str, Path]]:
        """(key, file) for every file under `folder`; StoragePathError before anything is
        written when one of them would not make a plain key."""
        check_prefix(prefix, folder=True)
        files = sorted(p for p in Path(folder).rglob("*") if p.is_file())
        return [(check_key(prefix + p.relative_to(folder).as_posix()), p) for p in files]

    def get_files(self, pairs: Sequence[tuple[str, Path]], threads: int = TRANSFER_THREADS) -> None:
        """Copy each (key, local path) object to its path, several at a time."""
        _in_parallel(lambda pair: self.get_file(pair[0], pair[1]), pairs, threads)

    @abstractmethod
    def get_bytes(self, key: str) -> bytes:
        """The whole object."""

    @abstractmethod
    def get_range(self, key: str, start: int, length: int) -> bytes:
        """Up to `length` bytes from offset `start` (fewer at the end of the object)."""

    @abstractmethod
    def open_read(self, key: str) -> AbstractContextManager[BinaryIO]:
        """A context manager yielding a readable stream of the object (read in chunks)."""

    def get_file(self, key: str, path: Path, chunk_bytes: int = 1024 * 1024) -> int:
        """Copy the object to the local file `path` (for workers' scratch folders); its size."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        written = 0
        with self.open_read(key) as source, path.open("wb") as sink:
            while chunk := source.read(chunk_bytes):
                sink.write(chunk)
                written += len(chunk)
        return written

    @abstractmethod
    def size(self, key: str) -> int:
        """Size of the object in bytes."""

    def exists(self, key: str) -> bool:
        try:
            self.size(key)
        except StorageKeyMissing:
            return False
        return True

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every object whose key starts with `prefix` (a plain string prefix, as on S3), in
        key order."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove one object; a missing one is fine."""

    @abstractmethod
    def delete_prefix(self, prefix: str) -> int:
        """Remove every object under the folder `prefix` (ending in '/'); how many."""

    @abstractmethod
    def presigned_get_url(
        self, key: str, expires_s: int, filename: str | None = None
    ) -> str | None:
        """A URL a browser can GET the object from for `expires_s` seconds, or None where the
        API serves the bytes itself (local files)."""

    @abstractmethod
    def check(self, timeout_s: float) -> None:
        """Raise StorageUnavailable unless the store answers (readiness)."""


def _in_parallel(action: Callable[[_Item], object], items: Sequence[_Item], threads: int) -> None:
    """Run `action(item)` for every item on up to `threads` threads; the first error cancels
    the items not started yet and is raised once the running ones end."""
    if threads <= 1 or len(items) <= 1:
        for item in items:
            action(item)
        return
    with ThreadPoolExecutor(max_workers=min(threads, len(items))) as pool:
        futures = [pool.submit(action, item) for item in items]
        wait(futures, return_when=FIRST_EXCEPTION)
        for future in futures:
            future.cancel()  # no-op for those done or running
        for future in futures:
            if not future.cancelled() and (error := future.exception()) is not None:
                raise error
