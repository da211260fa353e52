"""The object store on local disk: key `a/b.png` is the file DATA_DIR/a/b.png (the default).

Every write goes to a temp file under DATA_DIR/tmp (same filesystem) and is renamed into place,
so a reader or a crash never sees half an object; a temp file left by a crash is removed by
`Storage.clean_stale_temp` at the next start. The root must exist (the API creates DATA_DIR at
start): a missing or unmounted root is StorageUnavailable, not an empty store.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import BinaryIO

from app.storage.objects import (
    ObjectInfo,
    ObjectStore,
    StorageKeyMissing,
    StorageUnavailable,
    check_key,
    check_prefix,
)

__all__ = ["FilesystemObjectStore"]

logger = logging.getLogger(__name__)

_COPY_CHUNK = 1024 * 1024
_MISSING = (errno.ENOENT, errno.ENOTDIR, errno.EISDIR)


class FilesystemObjectStore(ObjectStore):
    """Objects as files under `root`."""

    kind = "local"

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()

    def path_of(self, key: str) -> Path:
        """The file that holds `key` (a checked key cannot leave the root)."""
        return self.root / check_key(key)

    # -- errors -------------------------------------------------------------------------------

    def _error(self, error: OSError, key: str) -> Exception:
        """StorageKeyMissing for a missing file under a healthy root, else StorageUnavailable."""
        if error.errno in _MISSING and self.root.is_dir():
            return StorageKeyMissing(key)
        return StorageUnavailable(f"local storage at {self.root}: {error.strerror or error}")

    def _require_root(self) -> None:
        if not self.root.is_dir():
            raise StorageUnavailable(f"local storage root {self.root} is not a folder")

    # -- writes -------------------------------------------------------------------------------

    @contextmanager
    def _atomic_file(self, key: str) -> Iterator[BinaryIO]:
        """A temp file that becomes `key` when the block ends without error."""
        target = self.path_of(key)
        self._require_root()
        try:
            scratch = self.root / "tmp"
            scratch.mkdir(exist_ok=True)
            descriptor, temp_name = tempfile.mkstemp(dir=scratch, prefix="object-", suffix=".part")
        except OSError as error:
            raise self._error(error, key) from error
        try:
            with os.fdopen(descriptor, "wb") as handle:
                yield handle
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(temp_name, target)
            except OSError as error:
                raise StorageUnavailable(f"could not write {key!r}: {error.strerror}") from error
        except BaseException:
            Path(temp_name).unlink(missing_ok=True)
            raise

    @staticmethod
    def _write(handle: BinaryIO, data: bytes, key: str) -> None:
        try:
            handle.write(data)
        except OSError as error:  # a full or failing disk
            raise StorageUnavailable(f"could not write {key!r}: {error.strerror}") from error

    def put_bytes(self, key: str, data: bytes, content_type: str | None = None) -> None:
        with self._atomic_file(key) as handle:
            self._write(handle, data, key)

    def put_stream(self, key: str, stream: BinaryIO, content_type: str | None = None) -> int:
        written = 0
        with self._atomic_file(key) as handle:
            while chunk := stream.read(_COPY_CHUNK):
                self._write(handle, chunk, key)
                written += len(chunk)
        return written

    def put_folder(self, folder: Path, prefix: str, threads: int = 1) -> int:
        """One rename when `folder` is on the store's filesystem and nothing is stored under
        `prefix` yet (an upload's temp folder under DATA_DIR/tmp), else file by file."""
        count = len(self.folder_keys(folder, prefix))
        self._require_root()
        folder = Path(folder)
        target = self.root / prefix.removesuffix("/")
        try:
            same_disk = folder.stat().st_dev == self.root.stat().st_dev
            if same_disk and not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(folder, target)
                return count
        except OSError as error:
            raise StorageUnavailable(f"could not store {prefix!r}: {error.strerror}") from error
        return super().put_folder(folder, prefix, threads)

    # -- reads --------------------------------------------------------------------------------

    def get_bytes(self, key: str) -> bytes:
        try:
            return self.path_of(key).read_bytes()
        except OSError as error:
            raise self._error(error, key) from error

    def get_range(self, key: str, start: int, length: int) -> bytes:
        if start < 0 or length < 0:
            raise ValueError("start and length must not be negative")
        try:
            with self.path_of(key).open("rb") as handle:
                handle.seek(start)
                return handle.read(length)
        except OSError as error:
            raise self._error(error, key) from error

    def open_read(self, key: str) -> AbstractContextManager[BinaryIO]:
        try:
            return self.path_of(key).open("rb")
        except OSError as error:
            raise self._error(error, key) from error

    def size(self, key: str) -> int:
        path = self.path_of(key)
        try:
            stat = path.stat()
        except OSError as error:
            raise self._error(error, key) from error
        if not path.is_file():
            raise StorageKeyMissing(key)
        return stat.st_size

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        check_prefix(prefix)
        self._require_root()
        # Walk only the deepest folder the prefix names; filter the rest as a string prefix.
        folder = self.root / prefix.rpartition("/")[0]
        found: list[ObjectInfo] = []
        for directory, _, files in os.walk(folder):
            for name in files:
                path = Path(directory) / name
                key = path.relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    try:
                        stat = path.stat()
                        found.append(ObjectInfo(key, stat.st_size, stat.st_mtime))
                    except FileNotFoundError:
                        continue  # deleted while listing
        yield from sorted(found, key=lambda info: info.key)

    # -- deletes ------------------------------------------------------------------------------

    def delete(self, key: str) -> None:
        try:
            self.path_of(key).unlink(missing_ok=True)
        except IsADirectoryError:
            return  # a folder is not an object
        except OSError as error:
            if error.errno not in _MISSING:
                raise self._error(error, key) from error

    def delete_prefix(self, prefix: str) -> int:
        check_prefix(prefix, folder=True)
        self._require_root()
        folder = self.root / prefix
        if not folder.is_dir():
            return 0
        count = sum(len(files) for _, _, files in os.walk(folder))
        try:
            shutil.rmtree(folder)
        except OSError as error:
            raise StorageUnavailable(f"could not delete {prefix!r}: {error.strerror}") from error
        return count

    # -- browsers and readiness ---------------------------------------------------------------

    def presigned_get_url(
        self, key: str, expires_s: int, filename: str | None = None
    ) -> str | None:
        check_key(key)
        return None  # the API reads the file and sends it itself

    def check(self, timeout_s: float) -> None:
        self._require_root()
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise StorageUnavailable(f"local storage root {self.root} is not writable")
