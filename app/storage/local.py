"""The local data folder (DATA_DIR): its layout, temp folders for uploads, absolute paths.

Rows store paths relative to the root; those relative paths are also the object keys of
app.storage.objects, so the filesystem store (app.storage.filesystem) reads the same files.

Layout: datasets/<id>/images/<position><ext>, datasets/<id>/thumbs/<position>.jpg,
jobs/<id>/work (pipeline checkpoints, features), tmp/ (uploads in flight; same filesystem so the
local object store moves a finished upload into place with one rename), scratch/ (a worker's
copies of objects from an S3 store), models/ (local backbone weights).

An upload in flight holds an advisory lock (flock) on tmp/<folder>/.lock. The kernel drops it
when the process dies, however it dies, so a restarted API can tell a half upload left by a
crash (unlocked: removed at start) from another replica's upload in progress (locked: kept).
"""

from __future__ import annotations

import fcntl
import logging
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from app.storage.objects import StoragePathError

__all__ = ["Storage", "StoragePathError"]

logger = logging.getLogger(__name__)


_LOCK_NAME = ".lock"


class Storage:
    """Resolves relative paths under `root` and owns the directory layout."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()

    def abspath(self, relative: str) -> Path:
        """Absolute path of a stored relative path; refuses anything escaping the root."""
        path = (self.root / PurePosixPath(relative)).resolve()
        if path != self.root and self.root not in path.parents:
            raise StoragePathError(f"path {relative!r} escapes the storage root")
        return path

    def relpath(self, path: Path) -> str:
        return Path(path).resolve().relative_to(self.root).as_posix()

    @staticmethod
    def dataset_dir(dataset_id: str) -> str:
        return f"datasets/{dataset_id}"

    @staticmethod
    def job_dir(job_id: str) -> str:
        return f"jobs/{job_id}"

    @staticmethod
    def job_work_dir(job_id: str) -> str:
        return f"jobs/{job_id}/work"

    @staticmethod
    def model_copy_dir(job_id: str) -> str:
        """Where this host keeps its copy of a job's model fetched from S3 for prediction."""
        return f"scratch/models/{job_id}"

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    def make_temp_dir(self, prefix: str) -> Path:
        """A fresh folder under root/tmp (same filesystem as its final place)."""
        path = self.root / "tmp" / f"{prefix}-{uuid.uuid4().hex}"
        path.mkdir(parents=True)
        return path

    @contextmanager
    def locked_temp_dir(self, prefix: str) -> Iterator[Path]:
        """A fresh temp folder, locked while the block runs and removed after it."""
        path = self.make_temp_dir(prefix)
        handle = (path / _LOCK_NAME).open("wb")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
            yield path
        finally:
            self.remove(path)
            handle.close()  # releases the lock

    @staticmethod
    def _abandoned(path: Path, grace_s: float) -> bool | None:
        """True: its lock is free (the process holding it died); False: in use; None: no lock."""
        lock = path / _LOCK_NAME
        try:
            handle = lock.open("rb")
        except (FileNotFoundError, NotADirectoryError):  # no lock, or a temp file (an object)
            return None
        with handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            # Just created and not locked yet by its owner: leave it a moment.
            return time.time() - lock.stat().st_mtime > grace_s

    @staticmethod
    def lock_folder(path: Path) -> BinaryIO:
        """Make `path` and hold its lock until the returned handle is closed or the process
        dies (a worker's scratch folder: `remove_abandoned` tells the dead ones)."""
        path.mkdir(parents=True, exist_ok=True)
        handle = (path / _LOCK_NAME).open("wb")
        fcntl.flock(handle, fcntl.LOCK_EX)
        return handle

    def remove_abandoned(self, parent: Path, grace_s: float = 2.0) -> int:
        """Remove the folders under `parent` whose lock is free (the process holding it died,
        however it died); how many. Locked folders and folders without a lock stay."""
        removed = 0
        for path in Path(parent).glob("*"):
            try:
                if self._abandoned(path, grace_s):
                    self.remove(path)
                    removed += 1
            except OSError:
                continue
        if removed:
            logger.info("removed %d abandoned scratch folders under %s", removed, parent)
        return removed

    def clean_stale_temp(self, max_age_s: float, grace_s: float = 2.0) -> int:
        """Remove temp folders left by a crash; how many were removed.

        A locked folder is another process's upload in progress and stays; an unlocked one is
        an abandoned half upload; one without a lock file goes once older than `max_age_s`.
        """
        removed = 0
        cutoff = time.time() - max_age_s
        for path in (self.root / "tmp").glob("*"):
            try:
                abandoned = self._abandoned(path, grace_s)
                if abandoned or (abandoned is None and path.stat().st_mtime < cutoff):
                    self.remove(path)
                    removed += 1
            except OSError:
                continue
        if removed:
            logger.info("removed %d abandoned upload folders", removed)
        return removed

    def remove(self, path: Path | str) -> None:
        """Delete a file or folder (absolute, or relative to root); missing is fine."""
        target = self.abspath(path) if isinstance(path, str) else Path(path)
        try:
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)
        except OSError:
            logger.warning("could not remove %s", target, exc_info=True)
