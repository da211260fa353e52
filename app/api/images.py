"""Serving stored image files: originals, thumbnails, and PNG conversion for odd formats.

The caller has checked that the image is the owner's. On S3 the browser is then sent (307) to a
presigned URL of the object, valid PRESIGNED_URL_EXPIRES_S: the bytes never pass through the
API. On the local store the API sends the file itself, as before there was an object store.
"""

from __future__ import annotations

import io
from typing import BinaryIO

from fastapi import HTTPException
from fastapi.responses import FileResponse, RedirectResponse, Response
from PIL import Image

from app.db.models import Image as ImageRow
from app.storage import FilesystemObjectStore, ObjectStore

__all__ = ["image_response"]

_CACHE = {"Cache-Control": "public, max-age=31536000, immutable"}  # ids never change content
_WEB_TYPES = ("image/png", "image/jpeg")


def _to_png(source: BinaryIO) -> bytes:
    with Image.open(source) as image:
        image.seek(0)  # first frame of animations
        converted = image.convert("RGBA" if "A" in image.getbands() else "RGB")
        buffer = io.BytesIO()
        converted.save(buffer, format="PNG")
    return buffer.getvalue()


def image_response(
    row: ImageRow,
    store: ObjectStore,
    expires_s: int,
    *,
    thumbnail: bool = False,
    png_or_jpeg: bool = False,
) -> Response:
    """The stored original (or its JPEG thumbnail) of `row`; with `png_or_jpeg`, other formats
    are converted to PNG on the fly (read through the API on either backend)."""
    key = row.thumbnail_path if thumbnail else row.stored_path
    media_type = "image/jpeg" if thumbnail else row.media_type
    if png_or_jpeg and media_type not in _WEB_TYPES:
        with store.open_read(key) as source:  # StorageKeyMissing -> 404
            png = _to_png(io.BytesIO(source.read()))
        return Response(png, media_type="image/png", headers=_CACHE)
    if isinstance(store, FilesystemObjectStore):
        path = store.path_of(key)
        if not path.is_file():
            raise HTTPException(404, f"the file of image {row.id} is missing from storage")
        return FileResponse(path, media_type=media_type, headers=_CACHE)
    name = row.original_path.rsplit("/", 1)[-1] if not thumbnail else None
    url = store.presigned_get_url(key, expires_s, filename=name)
    assert url is not None  # only the local store serves through the API
    # The redirect may be reused while its URL is valid, not longer.
    cache = {"Cache-Control": f"private, max-age={max(0, expires_s - 30)}"}
    return RedirectResponse(url, status_code=307, headers=cache)
