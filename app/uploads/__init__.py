"""Dataset uploads, in three steps with one module each:

- multipart: stream the multipart/form-data body to a file in a temp folder (size limit while
  receiving, sha256 on the way);
- ingest: check the zip with scan_engine.archive's rules and the settings' limits, extract and
  validate the images, write them to the object store, then record the dataset in one transaction;
- errors: UploadError (HTTP status and message) and `printable` for names shown to clients.
"""

from app.uploads.errors import UploadError, printable
from app.uploads.ingest import (
    SKIPPED_KEPT,
    Ingested,
    archive_limits,
    check_storage_room,
    find_duplicate,
    ingest_zip,
    refusal,
    storage_used,
)
from app.uploads.multipart import ReceivedUpload, parse_bool, receive_multipart

__all__ = [
    "UploadError",
    "printable",
    "ReceivedUpload",
    "receive_multipart",
    "parse_bool",
    "Ingested",
    "ingest_zip",
    "archive_limits",
    "refusal",
    "find_duplicate",
    "check_storage_room",
    "storage_used",
    "SKIPPED_KEPT",
]
