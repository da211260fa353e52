"""Ingesting a received zip: check it, extract and validate the images, record the dataset.

The zip rules and limits are scan_engine.archive's (the settings' limits passed in, see
`archive_limits`); what is left here is what only a stored dataset needs: each image's header
checked against the service's pixel limits, the original kept byte for byte, a thumbnail, rows.

Nothing half-written survives a failure: the zip is received and extracted in a temp folder
under this host's DATA_DIR/tmp, the images and thumbnails are written to the object store under
the new dataset's prefix (the local store: one rename of that folder into DATA_DIR/datasets/<id>),
and only then are the dataset and image rows committed, in one transaction. A failure before the
commit (the store going away, the storage limit, the same zip stored meanwhile) deletes the
objects again, so no row ever names a missing object. Whole-upload
problems (not a zip, zip bomb, no usable image, the owner's storage full) raise UploadError with
an HTTP status and a message; problems with single entries (unsafe path, symlink, nested archive,
not an image, corrupt, decompression bomb, too small) skip that entry with a reason.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from sqlalchemy import func, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from app.core.config import Settings
from app.db.models import Dataset, Owner, new_id
from app.db.models import Image as ImageRow
from app.storage import ObjectStore, StorageError
from app.uploads.errors import MAX_PATH_CHARS, UploadError, printable
from scan_engine.archive import (
    ArchiveLimitError,
    ArchiveLimits,
    EntryRefused,
    NotAZipError,
    folder_labels,
    open_untrusted_zip,
)
from scan_engine.data import (
    MAX_FILE_BYTES,
    NOT_AN_IMAGE,
    SUPPORTED_FORMATS,
    ImageDecodeError,
    decode_image,
)

__all__ = [
    "Ingested",
    "ingest_zip",
    "archive_limits",
    "refusal",
    "find_duplicate",
    "check_storage_room",
    "storage_used",
    "SKIPPED_KEPT",
]

logger = logging.getLogger(__name__)

SKIPPED_KEPT = 1000  # skipped entries stored and returned; the count is always complete
# Stored originals are named by position and format (the zip's names are not trusted on disk).
_EXTENSIONS = {"JPEG": ".jpg", "MPO": ".jpg", "PNG": ".png", "WEBP": ".webp", "BMP": ".bmp"}
_EXTENSIONS |= {"GIF": ".gif", "TIFF": ".tif", "HEIF": ".heic", "AVIF": ".avif"}


def archive_limits(settings: Settings, max_entries: int | None = None) -> ArchiveLimits:
    """The settings' zip limits for scan_engine.archive (`max_entries` lowers the entry count)."""
    entries = settings.MAX_ZIP_ENTRIES
    return ArchiveLimits(
        max_entries=entries if max_entries is None else min(entries, max_entries),
        max_total_bytes=settings.MAX_UNCOMPRESSED_BYTES,
        max_entry_bytes=min(settings.MAX_ENTRY_BYTES, MAX_FILE_BYTES),
        max_compression_ratio=settings.MAX_COMPRESSION_RATIO,
        max_path_chars=MAX_PATH_CHARS,
    )


def refusal(error: NotAZipError | ArchiveLimitError) -> UploadError:
    """The HTTP answer to a refused zip: 400 when it is not one, 413 when it is over a limit."""
    if isinstance(error, NotAZipError):
        return UploadError(400, f"the upload is {error}")
    return UploadError(413, str(error))


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
        raise ImageDecodeError(NOT_AN_IMAGE) from None
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
    (work / "images").mkdir(parents=True)
    (work / "thumbs").mkdir()
    try:
        archive = open_untrusted_zip(zip_path, archive_limits(settings))
    except (NotAZipError, ArchiveLimitError) as error:
        raise refusal(error) from None
    with archive:
        for refused in archive.refused:
            result.skip(refused.path, refused.reason)
        for relative in archive.members:
            position = len(result.accepted)
            raw = work / "images" / f"{position:06d}.tmp"
            try:
                size, sha256 = archive.copy_to(relative, raw)
                fmt, width, height = _inspect_image(raw, settings)
                thumbnail = decode_image(raw, settings.THUMBNAIL_SIZE)  # (T, T, 3) uint8
            except ArchiveLimitError as error:  # a lying header passed the total: stop now
                raise refusal(error) from None
            except (EntryRefused, ImageDecodeError) as error:
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
    store: ObjectStore,
    session_factory: sessionmaker[Session],
    owner_id: str,
    content_sha256: str | None = None,
) -> Ingested:
    """Extract a received zip (inside the temp folder `work`) and record it for `owner_id`.

    The images and thumbnails are stored under `datasets/<id>/` in `store` before the rows are
    committed; the caller removes `work` afterwards, whatever happened.
    A zip this owner already uploaded (same `content_sha256` and labels flag) is not stored
    twice: the existing dataset is returned with created=False.
    """
    if content_sha256 is not None:
        existing = find_duplicate(session_factory, owner_id, content_sha256, labels_from_folders)
        if existing is not None:
            return Ingested(existing, created=False)
    extracted = work / "dataset"  # images/ and thumbs/, stored as they are
    extraction = _extract(zip_path, extracted, settings)
    zip_path.unlink(missing_ok=True)
    if not extraction.accepted:
        raise UploadError(422, _no_images_message(extraction))

    labels, class_names = None, None
    if labels_from_folders:
        labels, class_names = folder_labels([a.original_path for a in extraction.accepted])
        if labels is None:
            logger.info("upload %s: images outside folders, no labels from folders", name)

    dataset_id = new_id()
    base = f"datasets/{dataset_id}"
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
    # Refused before anything is written; checked again under the owner's lock below.
    check_storage_room(session_factory, owner_id, settings, total_bytes)
    store.put_folder(extracted, base + "/")  # all or nothing; StorageUnavailable -> 503
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
        _remove_objects(store, base)
        if content_sha256 is not None:
            existing = find_duplicate(
                session_factory, owner_id, content_sha256, labels_from_folders
            )
            if existing is not None:
                return Ingested(existing, created=False)
        raise
    except BaseException:
        _remove_objects(store, base)
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


def _remove_objects(store: ObjectStore, base: str) -> None:
    """Delete the objects of a dataset whose rows were not committed (best effort: a store
    that went away leaves them, logged; no row names them)."""
    try:
        store.delete_prefix(base + "/")
    except StorageError:
        logger.warning("could not remove the objects of %s", base, exc_info=True)
