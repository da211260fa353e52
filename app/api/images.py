"""Serving stored image files: originals, thumbnails, and PNG conversion for odd formats."""

from __future__ import annotations

import io
from pathlib import Path

from fastapi import HTTPException
from fastapi.responses import FileResponse, Response
from PIL import Image

from app.db.models import Image as ImageRow
from app.storage import Storage

__all__ = ["image_response"]

_CACHE = {"Cache-Control": "public, max-age=31536000, immutable"}  # ids never change content
_WEB_TYPES = ("image/png", "image/jpeg")


def _to_png(path: Path) -> bytes:
    with Image.open(path) as image:
        image.seek(0)  # first frame of animations
        converted = image.convert("RGBA" if "A" in image.getbands() else "RGB")
        buffer = io.BytesIO()
        converted.save(buffer, format="PNG")
    return buffer.getvalue()


def image_response(
    row: ImageRow, storage: Storage, *, thumbnail: bool = False, png_or_jpeg: bool = False
) -> Response:
    """The stored original (or its JPEG thumbnail) of `row`; with `png_or_jpeg`, other formats
    are converted to PNG on the fly."""
    relative = row.thumbnail_path if thumbnail else row.stored_path
    path = storage.abspath(relative)
    if not path.is_file():
        raise HTTPException(404, f"the file of image {row.id} is missing from storage")
    if thumbnail:
        return FileResponse(path, media_type="image/jpeg", headers=_CACHE)
    if png_or_jpeg and row.media_type not in _WEB_TYPES:
        return Response(_to_png(path), media_type="image/png", headers=_CACHE)
    return FileResponse(path, media_type=row.media_type, headers=_CACHE)
