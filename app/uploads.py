"""Zip uploads: stream the request body to disk, check the archive, extract and validate images.

Nothing half-written survives a failure: the zip and the extracted files go to a temp folder
under DATA_DIR/tmp, the dataset and image rows are committed in one transaction, and only then
is the folder renamed into place (rows are deleted again if that rename fails). Whole-upload
problems (not a zip, zip bomb, no usable image, the owner's storage full) raise UploadError with
an HTTP status and a message; problems with single entries (unsafe path, symlink, nested archive,
not an image, corrupt, decompression bomb, too small) skip that entry with a reason.

Zip-bomb limits are checked before extracting (entry count from the end record, before the
central directory is parsed; declared total size; compression ratios) and while extracting (no
entry yields more than it declared, the running total stays under the limit).
"""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
import struct
import zipfile
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError
from python_multipart.multipart import MultipartParser, parse_options_header
from sqlalchemy import delete, func, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from app.core.config import Settings
from app.db.models import Dataset, Owner, new_id
from app.db.models import Image as ImageRow
from app.storage import Storage
from scan_engine.data import (
    MAX_FILE_BYTES,
    SUPPORTED_FORMATS,
    ImageDecodeError,
    decode_image,
)

__all__ = [
    "UploadError",
    "ReceivedUpload",
    "Ingested",
    "receive_multipart",
    "ingest_zip",
    "find_duplicate",
    "check_storage_room",
    "storage_used",
    "parse_bool",
    "folder_labels",
    "remove_quietly",
    "SKIPPED_KEPT",
]

logger = logging.getLogger(__name__)

SKIPPED_KEPT = 1000  # skipped entries stored and returned; the count is always complete
_FILE_FIELD = "file"
_MAX_FIELD_BYTES = 4096
_COPY_CHUNK = 1024 * 1024
_IGNORED_NAMES = frozenset({"__MACOSX", "Thumbs.db", "desktop.ini"})
_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:")
_EXTENSIONS = {"JPEG": ".jpg", "MPO": ".jpg", "PNG": ".png", "WEBP": ".webp", "BMP": ".bmp"}
_EXTENSIONS |= {"GIF": ".gif", "TIFF": ".tif"}
_MAX_PATH_CHARS = 1024  # images.original_path
_ARCHIVE_EXTENSIONS = (".zip", ".jar", ".tar", ".tgz", ".gz", ".bz2", ".xz", ".7z", ".rar")
# Leading bytes of archives: zip (local header, empty zip), gzip, bzip2, xz, 7z, rar.
_ARCHIVE_MAGIC = (
    b"PK\x03\x04",
    b"PK\x05\x06",
    b"\x1f\x8b",
    b"BZh",
    b"\xfd7zXZ",
    b"7z\xbc\xaf",
    b"Rar!",
)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class UploadError(Exception):
    """The whole upload is refused: `status_code` and a message for the client."""

    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message


def printable(text: str, limit: int = _MAX_PATH_CHARS) -> str:
    """`text` with control characters shown as '?' and cut to `limit` (for names and reports)."""
    cleaned = _CONTROL.sub("?", text)
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 3] + "..."


def parse_bool(value: str | None, name: str) -> bool:
    if value is None or value.strip() == "":
        return False
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise UploadError(422, f"{name} must be true or false, got {value!r}")


# ---------------------------------------------------------------------------------------------
# Receiving the request body


@dataclass
class ReceivedUpload:
    zip_path: Path
    filename: str | None
    fields: dict[str, str]
    size_bytes: int
    sha256: str  # of the zip's bytes: a repeated upload is recognised by it


class _MultipartSink:
    """Callbacks for python-multipart: the `file` part goes to disk, small fields to memory."""

    def __init__(self, dest: Path) -> None:
        self.dest = dest
        self.fields: dict[str, str] = {}
        self.filename: str | None = None
        self.file_seen = False
        self._file: Any = None
        self._headers: dict[str, bytes] = {}
        self._header_field = b""
        self._header_value = b""
        self._name: str | None = None
        self._value = bytearray()
        self.digest = hashlib.sha256()

    def callbacks(self) -> dict[str, Any]:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": self._header_field_data,
            "on_header_value": self._header_value_data,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
        }

    def _part_begin(self) -> None:
        self._headers = {}
        self._header_field = self._header_value = b""
        self._name = None
        self._value = bytearray()

    def _header_field_data(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def _header_value_data(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._header_field.decode("latin-1").lower()] = self._header_value
        self._header_field = self._header_value = b""

    def _headers_finished(self) -> None:
        _, params = parse_options_header(self._headers.get("content-disposition", b""))
        name = params.get(b"name", b"").decode("utf-8", "replace")
        self._name = name
        if name == _FILE_FIELD:
            if self.file_seen:
                raise UploadError(422, "send exactly one 'file' field")
            self.file_seen = True
            raw_filename = params.get(b"filename")
            self.filename = raw_filename.decode("utf-8", "replace") if raw_filename else None
            self._file = self.dest.open("wb")

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._file is not None:
            self._file.write(data[start:end])
            self.digest.update(data[start:end])
        else:
            self._value += data[start:end]
            if len(self._value) > _MAX_FIELD_BYTES:
                raise UploadError(422, f"form field {self._name!r} is too long")

    def _part_end(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        elif self._name:
            self.fields[self._name] = self._value.decode("utf-8", "replace")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


async def receive_multipart(
    content_type: str | None,
    content_length: str | None,
    body: AsyncIterator[bytes],
    dest: Path,
    max_bytes: int,
) -> ReceivedUpload:
    """Stream a multipart/form-data body to `dest` chunk by chunk, enforcing `max_bytes` (413).

    The zip is expected in the part named "file"; other parts are small text fields.
    """
    media_type, params = parse_options_header(content_type or "")
    if media_type != b"multipart/form-data" or not params.get(b"boundary"):
        raise UploadError(
            415, "send the zip as multipart/form-data with the archive in a field named 'file'"
        )
    if content_length and content_length.isdigit() and int(content_length) > max_bytes:
        raise UploadError(413, f"upload is larger than the limit of {max_bytes} bytes")
    sink = _MultipartSink(dest)
    parser = MultipartParser(params[b"boundary"], sink.callbacks())  # type: ignore[arg-type]
    received = 0
    try:
        async for chunk in body:
            received += len(chunk)
            if received > max_bytes:
                raise UploadError(413, f"upload is larger than the limit of {max_bytes} bytes")
            parser.write(chunk)
        parser.finalize()
    except UploadError:
        raise
    except Exception as error:  # python-multipart raises several types on malformed bodies
        raise UploadError(400, f"malformed multipart body: {error}") from None
    finally:
        sink.close()
    if not sink.file_seen:
        raise UploadError(422, "the form has no 'file' field holding the zip")
    return ReceivedUpload(dest, sink.filename, sink.fields, received, sink.digest.hexdigest())


# ---------------------------------------------------------------------------------------------
# Checking and extracting the zip


@dataclass
class _Accepted:
    original_path: str
    position: int
    extension: str
    media_type: str
    size_bytes: int
    sha256: str
    width: int
    height: int


@dataclass
class _Extraction:
    accepted: list[_Accepted] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)

    def skip(self, path: str, reason: str) -> None:
        self.skipped.append({"path": printable(path), "reason": printable(reason)})


def _member_path(name: str) -> tuple[str | None, str | None]:
    """(normalised relative path, None), (None, reason) if unsafe, or (None, None) to ignore."""
    name = name.replace("\\", "/")
    if "\x00" in name:
        return None, "unsafe path (NUL character)"
    if name.startswith("/") or _WINDOWS_DRIVE.match(name):
        return None, "path escapes the upload folder (absolute path)"
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        return None, "path escapes the upload folder (..)"
    if not parts or any(part.startswith(".") or part in _IGNORED_NAMES for part in parts):
        return None, None  # hidden files, macOS resource forks: not content, not worth a reason
    if _CONTROL.search(name):
        return None, "unsafe path (control character)"
    relative = "/".join(parts)
    if len(relative) > _MAX_PATH_CHARS:
        return None, f"path longer than {_MAX_PATH_CHARS} characters"
    return relative, None


def _declared_entry_count(zip_path: Path) -> int | None:
    """Entries the zip's end record declares, read before zipfile parses the central directory
    (a huge directory would otherwise cost memory first); None when there is no end record."""
    try:
        with zip_path.open("rb") as handle:
            end = zipfile._EndRecData(handle)  # type: ignore[attr-defined]
    except (OSError, struct.error, ValueError):
        return None
    return None if end is None else int(end[zipfile._ECD_ENTRIES_TOTAL])  # type: ignore[attr-defined]


def _check_archive(infos: list[zipfile.ZipInfo], settings: Settings) -> None:
    """Whole-archive zip-bomb limits (413): entry count, total size, overall ratio."""
    if len(infos) > settings.MAX_ZIP_ENTRIES:
        raise UploadError(
            413, f"zip has {len(infos)} entries; the limit is {settings.MAX_ZIP_ENTRIES}"
        )
    total = sum(info.file_size for info in infos)
    if total > settings.MAX_UNCOMPRESSED_BYTES:
        raise UploadError(
            413,
            f"zip expands to {total} bytes; the limit is {settings.MAX_UNCOMPRESSED_BYTES}",
        )
    compressed = sum(info.compress_size for info in infos)
    if total > _COPY_CHUNK and total / max(compressed, 1) > settings.MAX_COMPRESSION_RATIO:
        raise UploadError(
            413,
            f"zip compression ratio {total / max(compressed, 1):.0f} is over the limit of "
            f"{settings.MAX_COMPRESSION_RATIO:.0f} (zip bomb?)",
        )


def _entry_problem(info: zipfile.ZipInfo, relative: str, settings: Settings) -> str | None:
    if info.flag_bits & 0x1:
        return "encrypted zip entry"
    if (info.external_attr >> 16) & 0o170000 == 0o120000:
        return "symbolic link"
    if relative.lower().endswith(_ARCHIVE_EXTENSIONS):
        return "nested archive (archives inside the zip are not extracted)"
    ratio = info.file_size / max(info.compress_size, 1)
    if info.file_size > _COPY_CHUNK and ratio > settings.MAX_COMPRESSION_RATIO:
        return f"compression ratio {ratio:.0f} is over the limit (zip bomb?)"
    limit = min(settings.MAX_ENTRY_BYTES, MAX_FILE_BYTES)
    if info.file_size > limit:
        return f"file too large ({info.file_size} bytes; the limit is {limit})"
    return None


def _copy_entry(archive: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path) -> tuple[int, str]:
    """Stream one entry to `target`; (bytes written, sha256). Never more than its declared size."""
    digest = hashlib.sha256()
    written = 0
    with archive.open(info) as source, target.open("wb") as out:
        while chunk := source.read(_COPY_CHUNK):
            written += len(chunk)
            if written > info.file_size:  # zipfile bounds this too; a lying header is corrupt
                raise zipfile.BadZipFile("entry is longer than its header says")
            digest.update(chunk)
            out.write(chunk)
    return written, digest.hexdigest()


def _inspect_image(path: Path, settings: Settings) -> tuple[str, int, int]:
    """(Pillow format, width, height) from the header; raises ImageDecodeError with the reason."""
    if path.stat().st_size == 0:
        raise ImageDecodeError("empty file")
    try:
        with Image.open(path, formats=SUPPORTED_FORMATS) as image:
            fmt, (width, height) = image.format or "", image.size
    except Image.DecompressionBombError as error:
        raise ImageDecodeError(f"decompression bomb: {error}") from None
    except UnidentifiedImageError:
        with path.open("rb") as handle:
            if handle.read(8).startswith(_ARCHIVE_MAGIC):
                raise ImageDecodeError(
                    "nested archive (archives inside the zip are not extracted)"
                ) from None
        raise ImageDecodeError("not an image (or not JPEG/PNG/WebP/BMP/GIF/TIFF)") from None
    except Exception as error:  # malformed headers raise many types
        raise ImageDecodeError(f"corrupt image: {error}") from None
    if width * height > settings.MAX_IMAGE_PIXELS:
        raise ImageDecodeError(
            f"image too large: {width}x{height} pixels, limit {settings.MAX_IMAGE_PIXELS}"
        )
    if min(width, height) < settings.MIN_IMAGE_SIDE:
        raise ImageDecodeError(f"too small: {width}x{height} pixels")
    return fmt, width, height


def _extract(zip_path: Path, work: Path, settings: Settings) -> _Extraction:
    """Extract usable images to work/images and thumbnails to work/thumbs."""
    result = _Extraction()
    (work / "images").mkdir()
    (work / "thumbs").mkdir()
    declared = _declared_entry_count(zip_path)
    if declared is not None and declared > settings.MAX_ZIP_ENTRIES:
        raise UploadError(
            413, f"zip has {declared} entries; the limit is {settings.MAX_ZIP_ENTRIES}"
        )
    try:
        archive = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, struct.error):
        raise UploadError(
            400,
            "the upload is not a zip archive (or a truncated or corrupt one: its central "
            "directory cannot be read)",
        ) from None
    with archive:
        infos = [info for info in archive.infolist() if not info.is_dir()]
        _check_archive(infos, settings)
        extracted = 0
        members: dict[str, zipfile.ZipInfo] = {}
        for info in infos:
            relative, problem = _member_path(info.filename)
            if problem is not None:
                result.skip(info.filename, problem)
            elif relative is None:
                continue
            elif relative in members:
                result.skip(info.filename, "duplicate path in the zip")
            elif (problem := _entry_problem(info, relative, settings)) is not None:
                result.skip(relative, problem)
            else:
                members[relative] = info
        for relative in sorted(members):
            position = len(result.accepted)
            raw = work / "images" / f"{position:06d}.tmp"
            try:
                size, sha256 = _copy_entry(archive, members[relative], raw)
                extracted += size
                if extracted > settings.MAX_UNCOMPRESSED_BYTES:  # a lying header: stop now
                    raise UploadError(
                        413,
                        f"zip expands to more than {settings.MAX_UNCOMPRESSED_BYTES} bytes",
                    )
                fmt, width, height = _inspect_image(raw, settings)
                thumbnail = decode_image(raw, settings.THUMBNAIL_SIZE)  # (T, T, 3) uint8
            except NotImplementedError as error:
                raw.unlink(missing_ok=True)
                result.skip(relative, f"unsupported zip entry: {error}")
                continue
            except (zipfile.BadZipFile, zlib.error, EOFError, struct.error) as error:
                raw.unlink(missing_ok=True)
                result.skip(relative, f"corrupt zip entry: {error}")
                continue
            except ImageDecodeError as error:
                raw.unlink(missing_ok=True)
                result.skip(relative, str(error))
                continue
            extension = _EXTENSIONS.get(fmt, "." + fmt.lower())
            raw.rename(work / "images" / f"{position:06d}{extension}")
            Image.fromarray(thumbnail).save(work / "thumbs" / f"{position:06d}.jpg", quality=85)
            result.accepted.append(
                _Accepted(
                    original_path=relative,
                    position=position,
                    extension=extension,
                    media_type=Image.MIME.get(fmt, "application/octet-stream"),
                    size_bytes=size,
                    sha256=sha256,
                    width=width,
                    height=height,
                )
            )
    return result


def folder_labels(paths: list[str]) -> tuple[list[int] | None, list[str] | None]:
    """Labels from each path's top-level folder; None when any image sits at the top level.

    A single wrapping folder around the class folders (photos/cat/1.jpg) is looked through,
    as scan_engine.data does for folders and zips.
    """
    parts = [path.split("/") for path in paths]
    if not parts or any(len(p) < 2 for p in parts):
        return None, None
    depth = 1 if len({p[0] for p in parts}) == 1 and all(len(p) >= 3 for p in parts) else 0
    class_names = sorted({p[depth] for p in parts})
    index = {name: i for i, name in enumerate(class_names)}
    return [index[p[depth]] for p in parts], class_names


def _no_images_message(extraction: _Extraction) -> str:
    if not extraction.skipped:
        return "the zip holds no image files"
    shown = "; ".join(f"{s['path']}: {s['reason']}" for s in extraction.skipped[:5])
    more = len(extraction.skipped) - 5
    return f"the zip holds no usable image ({len(extraction.skipped)} skipped: {shown}" + (
        f"; and {more} more)" if more > 0 else ")"
    )


@dataclass
class Ingested:
    dataset_id: str
    created: bool  # False: the same owner had already uploaded these zip bytes


def storage_used(session: Session, owner_id: str) -> int:
    """Bytes of stored images (originals) of one owner."""
    used = session.scalar(
        select(func.coalesce(func.sum(Dataset.total_bytes), 0)).where(Dataset.owner_id == owner_id)
    )
    return int(used or 0)


def check_storage_room(
    session_factory: sessionmaker[Session], owner_id: str, settings: Settings, adding: int = 0
) -> None:
    """UploadError(413) when `adding` more bytes would take the owner over its storage limit."""
    limit = settings.MAX_STORAGE_BYTES_PER_OWNER
    if not limit:
        return
    with session_factory() as session:
        _refuse_over_limit(storage_used(session, owner_id), adding, limit)


def _refuse_over_limit(used: int, adding: int, limit: int) -> None:
    if used + adding > limit or (adding == 0 and used >= limit):
        raise UploadError(
            413,
            f"storage limit reached: this owner stores {used} bytes of images, this upload "
            f"adds {adding}, the limit is {limit} bytes (MAX_STORAGE_BYTES_PER_OWNER)",
        )


def find_duplicate(
    session_factory: sessionmaker[Session],
    owner_id: str,
    content_sha256: str,
    labels_from_folders: bool,
) -> str | None:
    """The id of the owner's dataset made from the same zip bytes and labels flag, if any."""
    with session_factory() as session:
        return session.scalar(
            select(Dataset.id).where(
                Dataset.owner_id == owner_id,
                Dataset.content_sha256 == content_sha256,
                Dataset.labels_from_folders == labels_from_folders,
            )
        )


def ingest_zip(
    zip_path: Path,
    work: Path,
    *,
    name: str,
    labels_from_folders: bool,
    settings: Settings,
    storage: Storage,
    session_factory: sessionmaker[Session],
    owner_id: str,
    content_sha256: str | None = None,
) -> Ingested:
    """Extract a received zip (inside the temp folder `work`) and record it for `owner_id`.

    On success `work` has been moved to datasets/<id>; on failure the caller removes `work`.
    A zip this owner already uploaded (same `content_sha256` and labels flag) is not stored
    twice: the existing dataset is returned with created=False.
    """
    if content_sha256 is not None:
        existing = find_duplicate(session_factory, owner_id, content_sha256, labels_from_folders)
        if existing is not None:
            return Ingested(existing, created=False)
    extraction = _extract(zip_path, work, settings)
    zip_path.unlink(missing_ok=True)
    if not extraction.accepted:
        raise UploadError(422, _no_images_message(extraction))

    labels, class_names = None, None
    if labels_from_folders:
        labels, class_names = folder_labels([a.original_path for a in extraction.accepted])
        if labels is None:
            logger.info("upload %s: images outside folders, no labels from folders", name)

    dataset_id = new_id()
    base = storage.dataset_dir(dataset_id)
    total_bytes = sum(a.size_bytes for a in extraction.accepted)
    image_rows = [
        {
            "id": new_id(),
            "dataset_id": dataset_id,
            "position": a.position,
            "original_path": a.original_path,
            "stored_path": f"{base}/images/{a.position:06d}{a.extension}",
            "thumbnail_path": f"{base}/thumbs/{a.position:06d}.jpg",
            "media_type": a.media_type,
            "size_bytes": a.size_bytes,
            "sha256": a.sha256,
            "width": a.width,
            "height": a.height,
            "label": None if labels is None else labels[a.position],
        }
        for a in extraction.accepted
    ]
    try:
        with session_factory() as session, session.begin():
            # The owner's row lock serialises its concurrent uploads (PostgreSQL), so two of
            # them cannot both fit under the storage limit that only one fits under.
            session.execute(select(Owner.id).where(Owner.id == owner_id).with_for_update())
            if settings.MAX_STORAGE_BYTES_PER_OWNER:
                used = storage_used(session, owner_id)
                _refuse_over_limit(used, total_bytes, settings.MAX_STORAGE_BYTES_PER_OWNER)
            session.add(
                Dataset(
                    id=dataset_id,
                    owner_id=owner_id,
                    name=printable(name, 255),
                    storage_path=base,
                    image_count=len(image_rows),
                    total_bytes=total_bytes,
                    has_labels=labels is not None,
                    class_names=class_names,
                    skipped=extraction.skipped[:SKIPPED_KEPT],
                    skipped_count=len(extraction.skipped),
                    content_sha256=content_sha256,
                    labels_from_folders=labels_from_folders,
                )
            )
            session.flush()
            session.execute(insert(ImageRow), image_rows)  # one executemany, not row by row
    except IntegrityError:
        # The same zip, uploaded twice at once: the other request stored it first.
        if content_sha256 is not None:
            existing = find_duplicate(
                session_factory, owner_id, content_sha256, labels_from_folders
            )
            if existing is not None:
                return Ingested(existing, created=False)
        raise
    try:
        storage.move_into_place(work, base)
    except BaseException:
        logger.exception("could not move upload %s into place; removing its rows", dataset_id)
        with session_factory() as session, session.begin():
            session.execute(delete(ImageRow).where(ImageRow.dataset_id == dataset_id))
            session.execute(delete(Dataset).where(Dataset.id == dataset_id))
        raise
    logger.info(
        "dataset stored",
        extra={
            "dataset_id": dataset_id,
            "owner_id": owner_id,
            "images": len(image_rows),
            "skipped": len(extraction.skipped),
        },
    )
    return Ingested(dataset_id, created=True)


def remove_quietly(path: Path) -> None:
    """Delete a temp folder and everything in it; missing is fine."""
    shutil.rmtree(path, ignore_errors=True)
