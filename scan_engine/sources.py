"""Image collections without pixels: what the items are and how to read one, decoded on demand.

`ImageSources` lists a folder, a zip, a list of files or an in-memory (N, H, W, 3) uint8 array
(CIFAR .npz benchmarks, tests) without decoding anything, so that the pretrained route can stream
a collection of any size through a backbone (scan_engine.embedding). Each item has a stable id,
its relative path, a `read(i)` giving its bytes, its file path or its (H, W, 3) array, and a cheap
`signature(i)` that changes when the item does (the feature cache's content key). Files that
turn out not to be usable images are found while streaming and reported then; listing reports
only what the listing itself can see (unsafe, encrypted, oversized zip entries).

The decoding rules (formats, size limits, colour modes, EXIF orientation) are scan_engine.data's:
`open_rgb` applies them and keeps the whole picture, so a caller can crop it as it likes.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from scan_engine.archive import entry_path
from scan_engine.data import (
    MAX_FILE_BYTES,
    MAX_IMAGE_PIXELS,
    MIN_IMAGE_SIDE,
    ImageDecodeError,
    SkippedFile,
    _folder_labels,
    _is_ignored,
    _to_rgb,
    decode_with,
)

__all__ = ["ItemData", "ImageSources", "open_rgb", "open_sources"]

logger = logging.getLogger(__name__)

# What `ImageSources.read` gives: an encoded file's bytes, its path, or an (H, W, 3) uint8 array.
ItemData = bytes | Path | np.ndarray


@dataclass(eq=False, repr=False)
class ImageSources:
    """A collection as a list of readable items: item i is `ids[i]`, found at `paths[i]`.

    `labels[i]` (an index into `class_names`) when known. `skipped` holds what the listing
    already refused. Make one with `from_folder`, `from_zip`, `from_files`, `from_array` or
    `from_npz`; a zip-backed one holds the archive open until `close()` (or use `with`).
    """

    ids: list[str]
    paths: list[str]
    reader: Callable[[int], ItemData]
    signer: Callable[[int], str]
    kind: str  # "folder", "zip", "files" or "array": part of the content key
    labels: np.ndarray | None = None  # (N,) int64
    class_names: list[str] | None = None
    skipped: list[SkippedFile] = field(default_factory=list)
    closer: Callable[[], None] | None = None

    def __post_init__(self) -> None:
        self.ids = [str(image_id) for image_id in self.ids]
        self.paths = [str(path) for path in self.paths]
        n = len(self.ids)
        if len(self.paths) != n:
            raise ValueError(f"{n} ids but {len(self.paths)} paths")
        if len(set(self.ids)) != n:
            raise ValueError("image ids must be unique")
        if self.labels is not None:
            self.labels = np.asarray(self.labels, dtype=np.int64)
            if self.labels.shape != (n,):
                raise ValueError(f"labels must have shape ({n},), got {self.labels.shape}")
        if self.class_names is not None:
            self.class_names = [str(name) for name in self.class_names]
            if self.labels is not None and n and int(self.labels.max()) >= len(self.class_names):
                raise ValueError("a label is out of range of class_names")

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return (
            f"ImageSources(kind={self.kind}, n={len(self)}, labelled={self.labels is not None},"
            f" skipped={len(self.skipped)})"
        )

    def __enter__(self) -> ImageSources:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def read(self, index: int) -> ItemData:
        """Item `index` as bytes, a path or an (H, W, 3) uint8 array; safe from many threads.

        Raises ImageDecodeError with the reason when the item cannot be read.
        """
        return self.reader(index)

    def signature(self, index: int) -> str:
        """A short string that changes when item `index` changes (size+mtime, CRC or hash)."""
        return self.signer(index)

    def close(self) -> None:
        if self.closer is not None:
            self.closer()

    # -----------------------------------------------------------------------------------------
    # Makers

    @classmethod
    def from_folder(cls, root: str | Path, labels_from_folders: bool = False) -> ImageSources:
        """Every file under `root` (recursively), sorted by relative path; nothing is decoded.

        The same rules as scan_engine.data.load_folder: ids and paths are relative posix paths,
        hidden and system files are ignored, symlinked folders are not followed.
        """
        root = Path(root)
        if not root.is_dir():
            raise NotADirectoryError(f"not a folder: {root}")
        found: list[tuple[str, Path]] = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [name for name in dirnames if not _is_ignored(name)]
            for name in filenames:
                if not _is_ignored(name):
                    full = Path(dirpath) / name
                    found.append((full.relative_to(root).as_posix(), full))
        found.sort()
        relative = [rel for rel, _ in found]
        files = [full for _, full in found]
        labels, class_names = _folder_labels(relative) if labels_from_folders else (None, None)
        logger.info("listed %d files under %s", len(files), root)
        return cls(
            ids=relative,
            paths=relative,
            reader=_file_reader(files),
            signer=_stat_signer(files),
            kind="folder",
            labels=labels,
            class_names=class_names,
        )

    @classmethod
    def from_zip(cls, path: str | Path, labels_from_folders: bool = False) -> ImageSources:
        """Every entry of a zip archive, sorted by normalised path; entries are read on demand.

        The entry rules mirror scan_engine.data.load_zip (unsafe paths, encrypted, duplicate and
        oversized entries are skipped with a reason; directories and hidden entries ignored).
        Raises zipfile.BadZipFile when `path` is not a zip archive.
        """
        path = Path(path)
        archive = zipfile.ZipFile(path)
        try:
            members, skipped = _list_zip(archive)
        except BaseException:
            archive.close()
            raise
        relative = sorted(members)
        infos = [members[rel] for rel in relative]
        labels, class_names = _folder_labels(relative) if labels_from_folders else (None, None)
        logger.info("listed %d entries in %s, skipped %d", len(infos), path, len(skipped))
        return cls(
            ids=relative,
            paths=relative,
            reader=_zip_reader(archive, infos),
            signer=lambda i: f"{infos[i].CRC:08x}:{infos[i].file_size}",
            kind="zip",
            labels=labels,
            class_names=class_names,
            skipped=sorted(skipped, key=lambda item: item.path),
            closer=archive.close,
        )

    @classmethod
    def from_files(
        cls,
        entries: Sequence[tuple[str, str | Path]],
        labels: Sequence[int] | np.ndarray | None = None,
        class_names: Sequence[str] | None = None,
    ) -> ImageSources:
        """(id, file path) pairs in the given order, e.g. the stored files of an uploaded set."""
        ids = [str(image_id) for image_id, _ in entries]
        files = [Path(file_path) for _, file_path in entries]
        if labels is not None and len(labels) != len(entries):
            raise ValueError(f"{len(entries)} entries but {len(labels)} labels")
        return cls(
            ids=ids,
            paths=[str(file_path) for _, file_path in entries],
            reader=_file_reader(files),
            signer=_stat_signer(files),
            kind="files",
            labels=None if labels is None else np.asarray(labels, dtype=np.int64),
            class_names=None if class_names is None else list(class_names),
        )

    @classmethod
    def from_array(
        cls,
        images: np.ndarray,
        labels: Sequence[int] | np.ndarray | None = None,
        class_names: Sequence[str] | None = None,
        ids: Sequence[str] | None = None,
        paths: Sequence[str] | None = None,
    ) -> ImageSources:
        """Rows of an (N, H, W, 3) uint8 RGB array (benchmarks, tests); read as views, not copies.

        Ids default to the zero-padded row number ("000123"), paths to the ids.
        """
        array = np.asarray(images)
        if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] != 3:
            raise ValueError(
                f"images must be an (N, H, W, 3) uint8 array, got {array.dtype} {array.shape}"
            )
        ids = [f"{i:06d}" for i in range(len(array))] if ids is None else [str(i) for i in ids]
        if len(ids) != len(array):
            raise ValueError(f"{len(array)} images but {len(ids)} ids")
        return cls(
            ids=ids,
            paths=list(ids) if paths is None else [str(p) for p in paths],
            reader=lambda i: array[i],
            signer=lambda i: _array_signature(array[i]),
            kind="array",
            labels=None if labels is None else np.asarray(labels, dtype=np.int64),
            class_names=None if class_names is None else list(class_names),
        )

    @classmethod
    def from_npz(cls, path: str | Path, limit: int | None = None, seed: int = 0) -> ImageSources:
        """A benchmark .npz, with the row selection and ids of scan_engine.data.load_npz."""
        with np.load(path, allow_pickle=False) as data:
            if "images" not in data.files:
                raise ValueError(f"{path} has no 'images' array")
            images = data["images"]
            labels = data["labels"] if "labels" in data.files else None
            names = [str(c) for c in data["class_names"]] if "class_names" in data.files else None
            stored_paths = [str(p) for p in data["paths"]] if "paths" in data.files else None
        rows = np.arange(len(images))
        if limit is not None:
            if limit < 0:
                raise ValueError(f"limit must be >= 0, got {limit}")
            if limit < len(images):
                rows = np.sort(np.random.default_rng(seed).permutation(len(images))[:limit])
                images = images[rows]
                labels = None if labels is None else labels[rows]
        ids = [f"{row:06d}" for row in rows]
        paths = None if stored_paths is None else [stored_paths[row] for row in rows]
        return cls.from_array(images, labels=labels, class_names=names, ids=ids, paths=paths)


def open_sources(path: str | Path, labels_from_folders: bool = False) -> ImageSources:
    """Sources for a folder, a .zip or a benchmark .npz (which has its own labels)."""
    path = Path(path)
    if path.is_dir():
        return ImageSources.from_folder(path, labels_from_folders)
    if not path.exists():
        raise FileNotFoundError(f"no such file or folder: {path}")
    if path.suffix.lower() == ".npz":
        return ImageSources.from_npz(path)
    if path.suffix.lower() == ".zip" or zipfile.is_zipfile(path):
        return ImageSources.from_zip(path, labels_from_folders)
    raise ValueError(f"not a folder, .zip or .npz: {path}")


# ---------------------------------------------------------------------------------------------
# Readers and signatures


def _file_reader(files: Sequence[Path]) -> Callable[[int], Path]:
    def read(index: int) -> Path:
        path = files[index]
        # A FIFO or device would block or never end; a dangling symlink is not a file either.
        if not path.is_file():
            raise ImageDecodeError("not a regular file")
        return path

    return read


def _stat_signer(files: Sequence[Path]) -> Callable[[int], str]:
    # Size + modification time: a stat per file instead of reading every byte. Stored uploads
    # never change in place; a copied folder gets new times and so a new key (a safe miss).
    def sign(index: int) -> str:
        try:
            stat = os.stat(files[index])
        except OSError:
            return "missing"
        return f"{stat.st_size}:{stat.st_mtime_ns}"

    return sign


def _array_signature(image: np.ndarray) -> str:
    digest = hashlib.blake2b(image.tobytes(), digest_size=12).hexdigest()
    return f"{image.shape[0]}x{image.shape[1]}:{digest}"


def _list_zip(archive: zipfile.ZipFile) -> tuple[dict[str, zipfile.ZipInfo], list[SkippedFile]]:
    """Usable entries by normalised path, and the refused ones; the rules of data.load_zip."""
    members: dict[str, zipfile.ZipInfo] = {}
    skipped: list[SkippedFile] = []
    for info in archive.infolist():
        if info.is_dir():
            continue
        relative, problem = entry_path(info.filename)
        if problem is not None:
            skipped.append(SkippedFile(info.filename, problem))
        elif relative is None:
            continue
        elif relative in members:
            skipped.append(SkippedFile(info.filename, "duplicate path in the zip"))
        elif info.flag_bits & 0x1:
            skipped.append(SkippedFile(relative, "encrypted zip entry"))
        elif info.file_size > MAX_FILE_BYTES:
            skipped.append(SkippedFile(relative, f"file too large ({info.file_size} bytes)"))
        else:
            members[relative] = info
    return members, skipped


def _zip_reader(
    archive: zipfile.ZipFile, infos: Sequence[zipfile.ZipInfo]
) -> Callable[[int], bytes]:
    # ZipFile shares one file handle between readers under its own lock, but opening an entry
    # also touches shared state, so reads are serialised: decompression is a small share of the
    # decode cost (photos are stored or barely deflated).
    lock = threading.Lock()

    def read(index: int) -> bytes:
        try:
            with lock:
                return archive.read(infos[index])
        except Exception as exc:  # bad CRC, unsupported compression, truncated archive
            raise ImageDecodeError(f"cannot read: {exc}") from exc

    return read


# ---------------------------------------------------------------------------------------------
# One item -> RGB picture


def open_rgb(data: ItemData, min_side: int) -> Image.Image:
    """Decode one item to a whole RGB picture whose shorter side is at least about `min_side`.

    JPEGs decode at 1/2, 1/4 or 1/8 scale when the result keeps `min_side` (many times faster for
    large photos); other formats decode at full size. EXIF orientation is applied, every colour
    mode becomes RGB with scan_engine.data's rules. Raises ImageDecodeError with the reason.
    """
    if isinstance(data, np.ndarray):
        if data.dtype != np.uint8 or data.ndim != 3 or data.shape[-1] != 3:
            raise ImageDecodeError(
                f"array item must be (H, W, 3) uint8, got {data.dtype} {data.shape}"
            )
        if min(data.shape[:2]) < MIN_IMAGE_SIDE:
            raise ImageDecodeError(f"too small: {data.shape[1]}x{data.shape[0]} pixels")
        return Image.fromarray(np.ascontiguousarray(data))
    return decode_with(data, lambda image: _whole_rgb(image, min_side))


def _whole_rgb(opened: Image.Image, min_side: int) -> Image.Image:
    image = opened
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageDecodeError(
            f"decompression bomb: {width}x{height} pixels is over the limit of {MAX_IMAGE_PIXELS}"
        )
    if min(width, height) < MIN_IMAGE_SIDE:
        raise ImageDecodeError(f"too small: {width}x{height} pixels")
    if image.format in ("JPEG", "MPO"):
        # libjpeg scales by 1/2, 1/4 or 1/8 while both sides stay >= the box: the shorter one binds.
        image.draft(None, (min_side, min_side))
    image.load()  # decode now, so a truncated file fails here and is reported as corrupt
    try:
        image = ImageOps.exif_transpose(image)
    except Exception as exc:  # broken EXIF in otherwise good pixels: keep the image unrotated
        logger.debug("ignoring unreadable EXIF: %s", exc)
    rgb = _to_rgb(image)
    # Closing the file destroys the opened image's pixels: hand back a detached one.
    return rgb.copy() if rgb is opened else rgb
