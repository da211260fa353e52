"""A job's files while a worker runs it: where the engine reads and writes, and how that reaches
the object store.

Local store (the embedded default): the folders are the store. The engine works in
DATA_DIR/jobs/<id>/work, reads the images where the upload stored them and caches features in
DATA_DIR/features/<dataset id>; nothing is copied.

S3: the worker copies what it needs into a scratch folder of its own, DATA_DIR/scratch/jobs/<id>
(emptied at the start of every attempt: nothing a killed attempt left there is trusted; locked
while the run lasts, so the next run on this host removes the folders of runs that died), and
writes back under the same keys the local layout uses:

- before the run: the job's checkpoints `jobs/<id>/work/*.pt` and the dataset's feature cache
  `features/<dataset id>/`, so any worker resumes where the last one stopped, and the dataset's
  images (by key): all of them for the scratch route; on the pretrained route only those the
  backbone reads, a block at a time, so a job whose features are cached reads no image;
- after each stage: the checkpoints and cache entries that changed (each file is finished
  before the engine renames it into place, so only whole files go up; a store hiccup here is
  logged and the files go up at the next stage);
- at the end (`publish`, called by app.runner.results inside the transaction that marks the job
  succeeded): the model file, report and log, so no job is marked finished before every object
  of its result is written.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from app.backbones import FEATURES_DIR
from app.core.config import Settings
from app.storage import FilesystemObjectStore, ObjectStore, Storage, StorageError

if TYPE_CHECKING:
    from scan_engine.sources import ImageSources

__all__ = ["JobFiles"]

logger = logging.getLogger(__name__)

# scan_engine.predict.MODEL_FILE (not imported: that loads torch into the API's processes too).
MODEL_FILE = "model.pt"
_COPY_MTIME_NS = 0  # the mtime of every image copied from the store (see image_paths)


def _whole_file(path: Path) -> bool:
    """Not a temp file the engine is still writing (`x.tmp`, `.x.123.tmp`)."""
    return path.is_file() and not path.name.startswith(".") and path.suffix != ".tmp"


class JobFiles:
    """The folders of one job run on this worker, and their copies in the store."""

    def __init__(self, store: ObjectStore, settings: Settings, job_id: str, dataset_id: str):
        self.store = store
        self.job_id = job_id
        self.work_prefix = f"jobs/{job_id}/work/"
        self.features_prefix = f"{FEATURES_DIR}/{dataset_id}/"
        self.local = isinstance(store, FilesystemObjectStore)
        if isinstance(store, FilesystemObjectStore):
            self.scratch: Path | None = None
            self.work_dir = store.path_of(self.work_prefix.rstrip("/"))
            self.feature_cache_dir = store.path_of(self.features_prefix.rstrip("/"))
        else:
            self.scratch = Path(settings.DATA_DIR) / "scratch" / "jobs" / job_id
            self.work_dir = self.scratch / "work"
            self.feature_cache_dir = self.scratch / "features"
        self._pushed: dict[Path, tuple[int, int]] = {}  # file -> (size, mtime_ns) in the store
        self._stage: str | None = None
        self._data = Storage(settings.DATA_DIR)
        self._lock: BinaryIO | None = None

    # -- before the run -----------------------------------------------------------------------

    def prepare(self) -> None:
        """An empty scratch folder with the job's checkpoints and the dataset's feature cache
        from the store (S3); the local store needs nothing."""
        if self.scratch is None:
            self.work_dir.mkdir(parents=True, exist_ok=True)
            return
        shutil.rmtree(self.scratch, ignore_errors=True)
        self._lock = Storage.lock_folder(self.scratch)
        self._data.remove_abandoned(self.scratch.parent)  # runs on this host that died
        for prefix, folder in (
            (self.work_prefix, self.work_dir),
            (self.features_prefix, self.feature_cache_dir),
        ):
            folder.mkdir(parents=True, exist_ok=True)
            wanted = [info for info in self.store.list(prefix) if _restorable(info.key, prefix)]
            pairs = [(info.key, folder / info.key[len(prefix) :]) for info in wanted]
            self.store.get_files(pairs)
            for _, path in pairs:
                self._remember(path)
            if pairs:
                logger.info(
                    "restored %d objects of %s from the store",
                    len(pairs),
                    prefix,
                    extra={"job_id": self.job_id},
                )

    def image_sources(
        self,
        image_ids: Sequence[str],
        keys: Sequence[str],
        labels: Sequence[int] | None = None,
        class_names: Sequence[str] | None = None,
    ) -> ImageSources:
        """The images as streamed sources for the pretrained route. Local store: the stored
        files. S3: nothing is fetched until an item is read (a job whose features are cached
        reads none), then its block of images at a time (_StoreImages)."""
        from scan_engine.sources import ImageSources

        if isinstance(self.store, FilesystemObjectStore):
            entries = list(zip(image_ids, self.image_paths(keys), strict=True))
            return ImageSources.from_files(entries, labels=labels, class_names=class_names)
        images = _StoreImages(self, keys)
        return ImageSources(
            ids=list(image_ids),
            paths=[str(path) for path in images.paths],
            reader=images.read,
            signer=images.sign,
            kind="files",  # signed as fetched copies sign: the same content key either way
            labels=None if labels is None else list(labels),
            class_names=None if class_names is None else list(class_names),
        )

    def image_paths(self, keys: Sequence[str]) -> list[Path]:
        """A local file for each image key, in order (S3: fetched into the scratch folder)."""
        if isinstance(self.store, FilesystemObjectStore):
            return [self.store.path_of(key) for key in keys]
        assert self.scratch is not None
        paths = [self.scratch / "images" / key for key in keys]
        self.store.get_files(list(zip(keys, paths, strict=True)))
        for path in paths:
            # The engine's feature-cache key signs each file by size and mtime: a fresh copy
            # would sign anew on every host and attempt. A stored image never changes (its key
            # holds the dataset id and position), so every copy gets one fixed mtime.
            os.utime(path, ns=(_COPY_MTIME_NS, _COPY_MTIME_NS))
        return paths

    # -- during the run -----------------------------------------------------------------------

    def with_checkpoints(self, progress: Callable[[Any], None]) -> Callable[[Any], None]:
        """`progress` that also pushes new checkpoints to the store when a stage begins (the
        previous stage's checkpoint is whole on disk by then)."""

        def report(event: Any) -> None:
            progress(event)
            if event.stage != self._stage:
                self._stage = event.stage
                self.push_checkpoints()

        return report

    def push_checkpoints(self) -> None:
        """Checkpoints and feature-cache entries changed since the last push go to the store;
        a failure is logged (they go up at the next push, and the run goes on)."""
        if self.local:
            return
        try:
            self._push(self.work_dir, self.work_prefix, _is_checkpoint)
            self._push(self.feature_cache_dir, self.features_prefix, lambda p: True)
        except StorageError:
            logger.warning(
                "could not store the checkpoints; retried at the next stage",
                extra={"job_id": self.job_id},
                exc_info=True,
            )

    # -- the end ------------------------------------------------------------------------------

    def publish(self, model_path: str | None) -> str | None:
        """Write every file of the result to the store; the model file's key. Raises
        StorageUnavailable when the store is down (the job is then not marked succeeded)."""
        key = None if model_path is None else self.key_of(Path(model_path))
        if not self.local:
            self._push(self.work_dir, self.work_prefix, lambda p: True)
            self._push(self.feature_cache_dir, self.features_prefix, lambda p: True)
        return key

    def key_of(self, path: Path) -> str:
        """The key of a file in the work folder; ValueError for any other path (rows hold keys
        of the job's own files, never a path on some worker's disk)."""
        try:
            relative = Path(path).resolve().relative_to(self.work_dir.resolve())
        except ValueError:
            raise ValueError(f"{path} is not a file of job {self.job_id}'s work folder") from None
        return self.work_prefix + relative.as_posix()

    def close(self) -> None:
        """Remove the scratch folder (S3); the local folders are the store and stay."""
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)
        if self._lock is not None:
            self._lock.close()  # releases the lock
            self._lock = None

    # -- helpers ------------------------------------------------------------------------------

    def _remember(self, path: Path) -> None:
        stat = path.stat()
        self._pushed[path] = (stat.st_size, stat.st_mtime_ns)

    def _push(self, folder: Path, prefix: str, wanted: Callable[[Path], bool]) -> None:
        if not folder.is_dir():
            return
        for path in sorted(folder.rglob("*")):
            if not _whole_file(path) or not wanted(path):
                continue
            stat = path.stat()
            if self._pushed.get(path) == (stat.st_size, stat.st_mtime_ns):
                continue
            self.store.put_file(prefix + path.relative_to(folder).as_posix(), path)
            self._pushed[path] = (stat.st_size, stat.st_mtime_ns)


class _StoreImages:
    """A dataset's images in the store, fetched into the scratch folder on first read.

    Each item signs itself as its fetched copy will (stored size, the fixed copy mtime), so
    the feature cache's content key needs only one listing of the images, no download. Reading
    an item fetches its whole block (BLOCK images, in parallel) once: a full pass keeps the
    transfer threads busy, and a pass over one shard fetches that shard's blocks only.
    """

    BLOCK = 256

    def __init__(self, files: JobFiles, keys: Sequence[str]) -> None:
        self._files = files
        self._keys = list(keys)
        assert files.scratch is not None
        self.paths = [files.scratch / "images" / key for key in self._keys]
        folders = sorted({key.rsplit("/", 1)[0] + "/" for key in self._keys})
        self._sizes = {
            info.key: info.size for folder in folders for info in files.store.list(folder)
        }
        self._fetched: set[int] = set()
        self._locks = [threading.Lock() for _ in range(0, len(self._keys), self.BLOCK)]

    def sign(self, index: int) -> str:
        size = self._sizes.get(self._keys[index])
        return "missing" if size is None else f"{size}:{_COPY_MTIME_NS}"

    def read(self, index: int) -> Path:
        block = index // self.BLOCK
        with self._locks[block]:
            if block not in self._fetched:
                start = block * self.BLOCK
                wanted = [
                    key for key in self._keys[start : start + self.BLOCK] if key in self._sizes
                ]
                self._files.image_paths(wanted)
                self._fetched.add(block)
        path = self.paths[index]
        if not path.is_file():
            from scan_engine.data import ImageDecodeError

            raise ImageDecodeError("not in the store")
        return path


def _restorable(key: str, prefix: str) -> bool:
    """What a new attempt takes from the store: whole checkpoints and cache entries (never a
    result file of an earlier attempt: those are rewritten by the run)."""
    name = key[len(prefix) :]
    if prefix.startswith("jobs/"):
        return "/" not in name and _is_checkpoint(Path(name))
    return not name.startswith(".") and not name.endswith(".tmp")


def _is_checkpoint(path: Path) -> bool:
    return path.suffix == ".pt" and path.name != MODEL_FILE
