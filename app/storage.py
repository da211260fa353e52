"""Files on local disk under one root (DATA_DIR); rows store paths relative to it.

Layout: datasets/<id>/images/<position><ext>, datasets/<id>/thumbs/<position>.jpg,
jobs/<id>/work (pipeline checkpoints, features), tmp/ (uploads in flight; same filesystem so a
finished upload moves into place with one rename), models/ (local backbone weights).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import uuid
from pathlib import Path, PurePosixPath

__all__ = ["Storage", "StoragePathError"]

logger = logging.getLogger(__name__)


class StoragePathError(ValueError):
    """A relative path that would leave the storage root."""


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

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    def make_temp_dir(self, prefix: str) -> Path:
        """A fresh folder under root/tmp (same filesystem as its final place)."""
        path = self.root / "tmp" / f"{prefix}-{uuid.uuid4().hex}"
        path.mkdir(parents=True)
        return path

    def clean_stale_temp(self, max_age_s: float) -> int:
        """Remove temp folders older than `max_age_s` (left by a crash); how many were removed.

        Only old ones: another API replica may be receiving an upload into tmp/ right now.
        """
        removed = 0
        cutoff = time.time() - max_age_s
        for path in (self.root / "tmp").glob("*"):
            try:
                if path.stat().st_mtime < cutoff:
                    self.remove(path)
                    removed += 1
            except OSError:
                continue
        return removed

    def move_into_place(self, source: Path, relative: str) -> Path:
        """Rename a finished temp folder to its final relative place (atomic on one filesystem)."""
        target = self.abspath(relative)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, target)
        return target

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
