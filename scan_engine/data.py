"""Image collections for the engine: folders, zips, in-memory arrays and benchmark .npz files.

Every image becomes RGB uint8 with its shorter side resized to `image_size` and a centre crop,
and a collection holds all of them once as a (N, 3, S, S) uint8 tensor with a stable id and the
original relative path per image. Files that cannot be used (not an image, corrupt, too small,
decompression bomb, an entry the zip rules of scan_engine.archive refuse) are skipped and
reported with the reason; they never stop the run. A zip over the archive limits, or not a zip,
raises (scan_engine.archive.ArchiveError). An empty collection (N = 0) is returned as such: the
caller decides.

Formats: JPEG, PNG, WebP, BMP, GIF, TIFF, HEIC/HEIF (pillow-heif, registered on import) and AVIF
(Pillow's own plugin, where this Pillow was built with it).

Colour handling: EXIF orientation is applied; grayscale, palette, CMYK and 16-bit images are
converted to RGB (16-bit values are scaled, 65535 -> 255, not clipped); transparent images are
composited on white (dropping alpha would expose whatever colour the invisible pixels happen to
hold, often black). ICC profiles are ignored.
"""

from __future__ import annotations

import io
import logging
import os
import zipfile
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pillow_heif
import torch
from PIL import Image, ImageOps, UnidentifiedImageError, features

from scan_engine.archive import ArchiveError, ArchiveLimits, EntryRefused, open_untrusted_zip
from scan_engine.archive import folder_labels as _folder_label_lists
from scan_engine.archive import is_ignored_name as _is_ignored

__all__ = [
    "SUPPORTED_FORMATS",
    "MAX_IMAGE_PIXELS",
    "MAX_FILE_BYTES",
    "MIN_IMAGE_SIDE",
    "NOT_AN_IMAGE",
    "SkippedFile",
    "ImageCollection",
    "ImageDecodeError",
    "decode_image",
    "decode_with",
    "load_folder",
    "load_zip",
    "load_files",
    "from_arrays",
    "load_npz",
    "load_collection",
]

logger = logging.getLogger(__name__)
# What decode_with returns: whatever its converter makes of the opened picture.
T = TypeVar("T")

# HEIC/HEIF (phone photos) decoded by libheif; registered here, once, for every engine decoder.
pillow_heif.register_heif_opener()
# Pillow formats we open. A whitelist keeps exotic decoders (EPS runs Ghostscript) off user input.
# "JPEG" also opens the multi-picture JPEGs (format "MPO") that many cameras write. AVIF is
# Pillow's own plugin, present when Pillow is built with libavif (pillow-heif 1.x dropped AVIF).
SUPPORTED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "HEIF") + (
    ("AVIF",) if features.check("avif") else ()
)
NOT_AN_IMAGE = "not an image (or not JPEG/PNG/WebP/BMP/GIF/TIFF/HEIC" + (
    "/AVIF)" if "AVIF" in SUPPORTED_FORMATS else ")"
)
# Pillow's own default (about 89.5 megapixels, a 1 GiB RGBA image); larger is a decompression bomb.
MAX_IMAGE_PIXELS = 89_478_485
# Bigger files (or zip entries) are refused before they are read into memory.
MAX_FILE_BYTES = 100 * 1024 * 1024
# Images with a shorter side below this carry no usable content (tracking pixels, spacers).
MIN_IMAGE_SIDE = 8

# Decoding threads: Pillow releases the GIL while decoding and resizing, so a few threads help;
# results are written to fixed slots, so the outcome does not depend on thread timing.
DECODE_THREADS = max(1, min(4, os.cpu_count() or 1))
_IN_FLIGHT_PER_THREAD = 2  # bounds how many zip entries sit in memory at once


@dataclass(frozen=True)
class SkippedFile:
    """A file that was not loaded, with a human-readable reason."""

    path: str
    reason: str


class ImageDecodeError(ValueError):
    """An image that cannot be used; the message is the human reason."""


@dataclass(eq=False, repr=False)
class ImageCollection:
    """Images held once as a (N, 3, S, S) uint8 tensor, with a stable id and path per image.

    Row i of `images` is the image `ids[i]`, found at `paths[i]`, with ground truth `labels[i]`
    when known (an index into `class_names`).
    """

    images: torch.Tensor  # (N, 3, S, S) uint8, contiguous
    ids: list[str]
    paths: list[str]
    labels: np.ndarray | None = None  # (N,) int64
    class_names: list[str] | None = None
    skipped: list[SkippedFile] = field(default_factory=list)

    def __post_init__(self) -> None:
        images = self.images
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8:
            raise ValueError("images must be a uint8 torch tensor")
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[2] != images.shape[3]:
            raise ValueError(f"images must have shape (N, 3, S, S), got {tuple(images.shape)}")
        self.images = images.contiguous()
        n = images.shape[0]
        self.ids = list(self.ids)
        self.paths = list(self.paths)
        if len(self.ids) != n or len(self.paths) != n:
            raise ValueError(f"{n} images but {len(self.ids)} ids and {len(self.paths)} paths")
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
        return int(self.images.shape[0])

    def __repr__(self) -> str:
        size = self.images.shape[-1]
        classes = None if self.class_names is None else len(self.class_names)
        return (
            f"ImageCollection(n={len(self)}, image_size={size}, labelled={self.labels is not None},"
            f" classes={classes}, skipped={len(self.skipped)})"
        )

    def subset(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> ImageCollection:
        """A new collection with the images at `indices` (positions or a boolean mask), in order.

        The images are copied, so the subset does not keep the full tensor alive. `skipped` is
        carried over: it describes how the source was loaded.
        """
        if isinstance(indices, torch.Tensor):
            indices = indices.detach().cpu().numpy()
        index = np.asarray(indices)
        n = len(self)
        if index.dtype == np.bool_:
            if index.shape != (n,):
                raise ValueError(f"boolean mask must have shape ({n},), got {index.shape}")
            index = np.flatnonzero(index)
        index = index.astype(np.int64, copy=False).reshape(-1)
        if index.size and (index.min() < 0 or index.max() >= n):
            raise IndexError(f"subset indices out of range for a collection of {n}")
        return ImageCollection(
            images=self.images[torch.from_numpy(index)],
            ids=[self.ids[i] for i in index],
            paths=[self.paths[i] for i in index],
            labels=None if self.labels is None else self.labels[index].copy(),
            class_names=None if self.class_names is None else list(self.class_names),
            skipped=list(self.skipped),
        )


# ---------------------------------------------------------------------------------------------
# One image


def decode_image(source: bytes | str | Path, image_size: int) -> np.ndarray:
    """Decode one image file (its bytes or its path) to a (S, S, 3) uint8 RGB array.

    Applies the EXIF orientation, takes the first frame of animations, converts every colour mode
    to RGB, resizes the shorter side to `image_size` and crops the centre square.
    Raises ImageDecodeError with the reason when the file cannot be used.
    """
    image_size = _check_image_size(image_size)
    return decode_with(source, lambda image: _to_square_rgb(image, image_size))


def decode_with(source: bytes | str | Path, convert: Callable[[Image.Image], T]) -> T:
    """Open one image file (its bytes or its path) and return `convert(opened image)`.

    The one place that checks a file's size and turns every way Pillow can fail on hostile or
    broken input into an ImageDecodeError with a reason a person can act on.
    """
    if isinstance(source, bytes | bytearray | memoryview):
        if len(source) == 0:
            raise ImageDecodeError("empty file")
        if len(source) > MAX_FILE_BYTES:
            raise ImageDecodeError(f"file too large ({len(source)} bytes)")
        opened: Any = io.BytesIO(source)
    else:
        try:
            size = os.stat(source).st_size
        except OSError as exc:
            raise ImageDecodeError(f"cannot read file: {exc.strerror or exc}") from exc
        if size == 0:
            raise ImageDecodeError("empty file")
        if size > MAX_FILE_BYTES:
            raise ImageDecodeError(f"file too large ({size} bytes)")
        opened = source
    try:
        with Image.open(opened, formats=SUPPORTED_FORMATS) as image:
            return convert(image)
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(f"decompression bomb: {exc}") from exc
    except (FileNotFoundError, IsADirectoryError, PermissionError) as exc:
        raise ImageDecodeError(f"cannot read file: {exc.strerror or exc}") from exc
    except UnidentifiedImageError as exc:
        raise ImageDecodeError(NOT_AN_IMAGE) from exc
    except MemoryError as exc:
        raise ImageDecodeError("out of memory while decoding") from exc
    except Exception as exc:  # Pillow plugins raise many types on malformed input
        raise ImageDecodeError(f"corrupt image: {exc}") from exc


def _check_image_size(image_size: int) -> int:
    if isinstance(image_size, bool) or not isinstance(image_size, int | np.integer):
        raise ValueError(f"image_size must be an int, got {image_size!r}")
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    return int(image_size)


def _to_square_rgb(image: Image.Image, image_size: int) -> np.ndarray:
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageDecodeError(
            f"decompression bomb: {width}x{height} pixels is over the limit of {MAX_IMAGE_PIXELS}"
        )
    if min(width, height) < MIN_IMAGE_SIDE:
        raise ImageDecodeError(f"too small: {width}x{height} pixels")
    if image.format in ("JPEG", "MPO"):
        # Let libjpeg decode at 1/2, 1/4 or 1/8 scale when the result stays >= image_size: a
        # large photo then decodes many times faster; the exact resize below still follows.
        image.draft(None, (image_size, image_size))
    image.load()  # decode now, so a truncated file fails here and is reported as corrupt
    try:
        image = ImageOps.exif_transpose(image)
    except Exception as exc:  # broken EXIF in otherwise good pixels: keep the image unrotated
        logger.debug("ignoring unreadable EXIF: %s", exc)
    return np.array(_resize_square(_to_rgb(image), image_size), dtype=np.uint8)


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> "RGB"; alpha is composited on white, 16-bit is scaled to 8-bit."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I") or mode == "F":
        gray = _high_depth_to_uint8(np.asarray(image), mode)  # (H, W) uint8
        return Image.fromarray(gray).convert("RGB")
    if mode == "P":
        palette_alpha = image.palette is not None and image.palette.mode == "RGBA"
        has_alpha = "transparency" in image.info or palette_alpha
        image = image.convert("RGBA" if has_alpha else "RGB")
        mode = image.mode
        if mode == "RGB":
            return image
    if mode in ("RGBA", "RGBa", "LA", "La", "PA"):
        foreground = image.convert("RGBA")
        background = Image.new("RGBA", foreground.size, (255, 255, 255, 255))
        background.alpha_composite(foreground)
        return background.convert("RGB")
    try:
        return image.convert("RGB")  # L, 1, CMYK, YCbCr, RGBX, ...
    except ValueError as exc:
        raise ImageDecodeError(f"unsupported colour mode {mode}") from exc


def _high_depth_to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """16-bit, 32-bit int or float gray (H, W) -> uint8 (H, W), scaled rather than clipped.

    16-bit modes map 0..65535 linearly to 0..255 (rounded). Mode "I" holds 16-bit data for some
    formats, so values within 0..65535 are read as 16-bit; other ranges are stretched min..max.
    Float images in 0..1 are scaled by 255, other float ranges stretched min..max.
    """
    if mode.startswith("I;16") or mode == "I":
        wide = values.astype(np.int64)
        if mode != "I" or (wide.size and wide.min() >= 0 and wide.max() <= 65535):
            return ((wide * 255 + 32767) // 65535).astype(np.uint8)
        return _stretch(wide.astype(np.float64))
    floats = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    if floats.size and floats.min() >= 0.0 and floats.max() <= 1.0:
        return np.rint(floats * 255.0).astype(np.uint8)
    return _stretch(floats)


def _stretch(values: np.ndarray) -> np.ndarray:
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.rint((values - low) * (255.0 / (high - low))).astype(np.uint8)


def _resize_square(image: Image.Image, image_size: int) -> Image.Image:
    """Centre square crop, resized to image_size: the same as shorter side -> S, centre crop."""
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    if side == image_size:  # nothing to resample: a plain crop keeps the pixels exact
        left, top = int(left), int(top)
        return image.crop((left, top, left + side, top + side)) if width != height else image
    # box= crops and resizes in one antialiased pass; reducing_gap first shrinks by an integer
    # factor (fast) and keeps the result visually identical to a full-quality resize.
    return image.resize(
        (image_size, image_size),
        Image.Resampling.BICUBIC,
        box=(left, top, left + side, top + side),
        reducing_gap=3.0,
    )


# ---------------------------------------------------------------------------------------------
# Many images


@dataclass
class _Job:
    """One file to decode: `read` runs in the calling thread (zip reads are sequential)."""

    id: str
    path: str
    read: Callable[[], bytes | Path]


def _decode_jobs(
    jobs: Sequence[_Job], image_size: int
) -> tuple[torch.Tensor, list[int], list[SkippedFile]]:
    """Decode jobs into one preallocated tensor; returns (images, kept job indices, skipped)."""
    image_size = _check_image_size(image_size)
    images = torch.empty((len(jobs), 3, image_size, image_size), dtype=torch.uint8)
    slots = images.numpy()  # (N, 3, S, S) view sharing memory with `images`
    reasons: list[str | None] = [None] * len(jobs)

    def decode_into(index: int, source: bytes | Path) -> None:
        slots[index] = decode_image(source, image_size).transpose(2, 0, 1)  # (S,S,3) -> (3,S,S)

    def finish(index: int, future: Future[None]) -> None:
        try:
            future.result()
        except ImageDecodeError as exc:
            reasons[index] = str(exc)

    window = max(1, DECODE_THREADS * _IN_FLIGHT_PER_THREAD)
    with ThreadPoolExecutor(max_workers=DECODE_THREADS, thread_name_prefix="decode") as pool:
        pending: deque[tuple[int, Future[None]]] = deque()
        for index, job in enumerate(jobs):
            try:
                source = job.read()
            except ImageDecodeError as exc:
                reasons[index] = str(exc)
                continue
            except ArchiveError:  # the whole zip is refused (a lying header passed the limit)
                raise
            except Exception as exc:  # unreadable zip entry: bad CRC, unsupported compression
                reasons[index] = f"cannot read: {exc}"
                continue
            pending.append((index, pool.submit(decode_into, index, source)))
            while len(pending) >= window:
                finish(*pending.popleft())
        while pending:
            finish(*pending.popleft())

    kept = [i for i, reason in enumerate(reasons) if reason is None]
    skipped = [SkippedFile(jobs[i].path, r) for i, r in enumerate(reasons) if r is not None]
    if len(kept) < len(jobs):
        # One copy of the survivors; the preallocated tensor is dropped.
        images = images[torch.tensor(kept, dtype=torch.long)].contiguous()
    return images, kept, skipped


def _collect(
    jobs: Sequence[_Job],
    image_size: int,
    skipped_before: Iterable[SkippedFile],
    labels_from_folders: bool,
    source_name: str,
) -> ImageCollection:
    images, kept, skipped = _decode_jobs(jobs, image_size)
    skipped = sorted([*skipped_before, *skipped], key=lambda item: item.path)
    paths = [jobs[i].path for i in kept]
    labels, class_names = _folder_labels(paths) if labels_from_folders else (None, None)
    _log_loaded(source_name, len(paths), skipped)
    return ImageCollection(
        images=images,
        ids=[jobs[i].id for i in kept],
        paths=paths,
        labels=labels,
        class_names=class_names,
        skipped=skipped,
    )


def _log_loaded(source_name: str, count: int, skipped: Sequence[SkippedFile]) -> None:
    logger.info("loaded %d images from %s, skipped %d", count, source_name, len(skipped))
    for item in skipped:
        logger.debug("skipped %s: %s", item.path, item.reason)


def _folder_labels(paths: Sequence[str]) -> tuple[np.ndarray | None, list[str] | None]:
    """Labels from the top-level folder of each relative path; None when any image is at the top.

    When every image sits under one common wrapping folder with class folders inside (what zipping
    a folder usually produces: photos/cat/1.jpg), the wrapper is looked through.
    """
    labels, class_names = _folder_label_lists(paths)
    if labels is None:
        if paths:
            logger.info("some images are not inside a folder: no labels from folders")
        return None, None
    return np.array(labels, dtype=np.int64), class_names


def load_folder(
    root: str | Path, image_size: int = 32, labels_from_folders: bool = False
) -> ImageCollection:
    """Load every image under `root` (recursively), sorted by relative path.

    Ids and paths are the relative posix paths. Hidden files and folders (".*"), "__MACOSX",
    "Thumbs.db" and "desktop.ini" are ignored; other files that are not usable images are skipped
    with a reason. Symlinked folders are not followed.
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
    jobs = [_Job(rel, rel, _regular_file_reader(full)) for rel, full in found]
    return _collect(jobs, image_size, [], labels_from_folders, str(root))


def _regular_file_reader(path: Path) -> Callable[[], Path]:
    def read() -> Path:
        # A FIFO or device would block or never end; a dangling symlink is not a file either.
        if not path.is_file():
            raise ImageDecodeError("not a regular file")
        return path

    return read


def load_zip(
    path: str | Path,
    image_size: int = 32,
    labels_from_folders: bool = False,
    limits: ArchiveLimits | None = None,
) -> ImageCollection:
    """Load every image in a zip archive, reading entries into memory one at a time.

    Ids and paths are the entries' normalised relative paths, sorted. The rules and `limits`
    (default ArchiveLimits()) of scan_engine.archive apply: directories, "__MACOSX/" and hidden
    entries are ignored; unsafe paths, duplicates, encrypted entries, symbolic links, nested
    archives, oversized or unreadable entries are skipped with a reason. Raises NotAZipError (a
    zipfile.BadZipFile) when `path` is not a zip and ArchiveLimitError when it is over a limit.
    """
    path = Path(path)
    with open_untrusted_zip(path, limits) as archive:
        skipped = [SkippedFile(entry.path, entry.reason) for entry in archive.refused]

        def reader(relative: str) -> Callable[[], bytes]:
            def read() -> bytes:
                try:
                    return archive.read(relative)
                except EntryRefused as refused:
                    raise ImageDecodeError(str(refused)) from None

            return read

        jobs = [_Job(rel, rel, reader(rel)) for rel in archive.members]
        return _collect(jobs, image_size, skipped, labels_from_folders, str(path))


def load_files(
    entries: Sequence[tuple[str, str | Path]],
    image_size: int = 32,
    labels: Sequence[int] | None = None,
    class_names: Sequence[str] | None = None,
) -> ImageCollection:
    """Load (id, file path) pairs in the given order, e.g. the stored files of an uploaded dataset.

    Paths in the result (and in `skipped`) are the given paths as strings.
    `labels`, when given, has one entry per pair and is kept for the images that load.
    """
    ids = [str(image_id) for image_id, _ in entries]
    if len(set(ids)) != len(ids):
        raise ValueError("ids in entries must be unique")
    if labels is not None and len(labels) != len(entries):
        raise ValueError(f"{len(entries)} entries but {len(labels)} labels")
    jobs = [
        _Job(image_id, str(file_path), _regular_file_reader(Path(file_path)))
        for image_id, (_, file_path) in zip(ids, entries, strict=True)
    ]
    images, kept, skipped = _decode_jobs(jobs, image_size)
    _log_loaded(f"{len(entries)} files", len(kept), skipped)
    kept_labels = None
    if labels is not None:
        kept_labels = np.asarray(labels, dtype=np.int64)[np.asarray(kept, dtype=np.int64)]
    return ImageCollection(
        images=images,
        ids=[ids[i] for i in kept],
        paths=[jobs[i].path for i in kept],
        labels=kept_labels,
        class_names=None if class_names is None else list(class_names),
        skipped=skipped,
    )


# ---------------------------------------------------------------------------------------------
# Arrays and benchmark files


def from_arrays(
    images: np.ndarray,
    labels: Sequence[int] | np.ndarray | None = None,
    class_names: Sequence[str] | None = None,
    ids: Sequence[str] | None = None,
    image_size: int | None = None,
) -> ImageCollection:
    """A collection from an (N, H, W, 3) uint8 RGB array (benchmarks, tests).

    Ids default to the zero-padded row number ("000123"); paths equal the ids. With `image_size`
    set and different from the arrays' size, each image gets the same shorter-side resize and
    centre crop as files do; without it, non-square arrays are centre-cropped to their shorter side.
    """
    array = np.asarray(images)
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] != 3:
        raise ValueError(
            f"images must be an (N, H, W, 3) uint8 array, got {array.dtype} {array.shape}"
        )
    n, height, width, _ = array.shape
    if ids is None:
        ids = [f"{i:06d}" for i in range(n)]
    ids = [str(image_id) for image_id in ids]
    if image_size is None and height != width:
        image_size = min(height, width)  # the tensor is square: centre crop
    if image_size is None or height == width == image_size:
        tensor = torch.empty((n, 3, height, width), dtype=torch.uint8)
        tensor.numpy()[...] = array.transpose(0, 3, 1, 2)  # (N,H,W,3) -> (N,3,H,W), one copy
    else:
        image_size = _check_image_size(image_size)
        tensor = torch.empty((n, 3, image_size, image_size), dtype=torch.uint8)
        slots = tensor.numpy()
        for i in range(n):
            square = _resize_square(Image.fromarray(array[i]), image_size)
            slots[i] = np.asarray(square).transpose(2, 0, 1)
    return ImageCollection(
        images=tensor,
        ids=ids,
        paths=list(ids),
        labels=None if labels is None else np.asarray(labels, dtype=np.int64),
        class_names=None if class_names is None else list(class_names),
    )


def load_npz(
    path: str | Path, limit: int | None = None, seed: int = 0, image_size: int | None = None
) -> ImageCollection:
    """Load a benchmark .npz (images, labels, class_names, paths; see shared/datasets/README.md).

    The files are class-major, so `limit` takes a random subset drawn with `seed` (kept in file
    order), never the first rows. Ids are the zero-padded row numbers in the file, so an image
    keeps its id whatever the limit; paths are the file's `paths` when present.
    """
    with np.load(path, allow_pickle=False) as data:
        if "images" not in data.files:
            raise ValueError(f"{path} has no 'images' array")
        images = data["images"]
        labels = data["labels"] if "labels" in data.files else None
        class_names = [str(c) for c in data["class_names"]] if "class_names" in data.files else None
        paths = [str(p) for p in data["paths"]] if "paths" in data.files else None
    n = len(images)
    rows = np.arange(n)
    if limit is not None:
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        if limit < n:
            rows = np.sort(np.random.default_rng(seed).permutation(n)[:limit])
            images = images[rows]
            labels = None if labels is None else labels[rows]
    collection = from_arrays(
        images,
        labels=labels,
        class_names=class_names,
        ids=[f"{row:06d}" for row in rows],
        image_size=image_size,
    )
    if paths is not None:
        collection.paths = [paths[row] for row in rows]
    logger.info("loaded %d of %d images from %s", len(collection), n, path)
    return collection


def load_collection(
    path: str | Path, image_size: int = 32, labels_from_folders: bool = False
) -> ImageCollection:
    """Load a folder, a .zip or a benchmark .npz (which has its own labels), by what `path` is."""
    path = Path(path)
    if path.is_dir():
        return load_folder(path, image_size, labels_from_folders)
    if not path.exists():
        raise FileNotFoundError(f"no such file or folder: {path}")
    if path.suffix.lower() == ".npz":
        return load_npz(path, image_size=image_size)
    if path.suffix.lower() == ".zip" or zipfile.is_zipfile(path):
        return load_zip(path, image_size, labels_from_folders)
    raise ValueError(f"not a folder, .zip or .npz: {path}")
