"""Receiving an upload: the multipart/form-data body streamed to disk chunk by chunk.

The zip (the part named "file") goes straight to a file while its sha256 is computed, so a
repeated upload is recognised without reading it again; the other parts are small text fields.
The size limit applies while receiving (413), not after the whole body has arrived.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from python_multipart.multipart import MultipartParser, parse_options_header

from app.uploads.errors import UploadError

__all__ = ["ReceivedUpload", "receive_multipart", "parse_bool"]

_FILE_FIELD = "file"
_MAX_FIELD_BYTES = 4096


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


def parse_bool(value: str | None, name: str) -> bool:
    """A form field's true/false (1/0, yes/no, on/off; empty is false); 422 for anything else."""
    if value is None or value.strip() == "":
        return False
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise UploadError(422, f"{name} must be true or false, got {value!r}")
