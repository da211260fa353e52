"""What a refused upload tells the client: UploadError (status and message), printable names."""

from __future__ import annotations

import re

__all__ = ["UploadError", "printable", "MAX_PATH_CHARS"]

MAX_PATH_CHARS = 1024  # images.original_path
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class UploadError(Exception):
    """The whole upload is refused: `status_code` and a message for the client."""

    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message


def printable(text: str, limit: int = MAX_PATH_CHARS) -> str:
    """`text` with control characters shown as '?' and cut to `limit` (for names and reports)."""
    cleaned = _CONTROL.sub("?", text)
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 3] + "..."
