"""The process's object store, chosen by STORAGE_BACKEND (local files or S3)."""

from __future__ import annotations

import threading

from app.core.config import Settings
from app.storage.filesystem import FilesystemObjectStore
from app.storage.objects import ObjectStore
from app.storage.s3 import S3ObjectStore

__all__ = ["object_store", "make_object_store"]

_stores: dict[tuple[object, ...], ObjectStore] = {}
_lock = threading.Lock()


def make_object_store(settings: Settings) -> ObjectStore:
    """A new store for these settings (its S3 client is made on first use)."""
    if settings.STORAGE_BACKEND == "s3":
        return S3ObjectStore(
            bucket=settings.S3_BUCKET,
            endpoint_url=settings.S3_ENDPOINT_URL,
            region=settings.S3_REGION,
            access_key_id=settings.S3_ACCESS_KEY_ID,
            secret_access_key=settings.S3_SECRET_ACCESS_KEY.get_secret_value(),
            prefix=settings.S3_PREFIX,
            public_endpoint_url=settings.S3_PUBLIC_ENDPOINT_URL,
            part_bytes=settings.S3_MULTIPART_PART_BYTES,
            timeout_s=settings.S3_TIMEOUT_S,
            max_attempts=settings.S3_MAX_ATTEMPTS,
        )
    return FilesystemObjectStore(settings.DATA_DIR)


def object_store(settings: Settings) -> ObjectStore:
    """The one store per process for these settings, so every caller shares one S3 client."""
    identity = (
        settings.STORAGE_BACKEND,
        settings.DATA_DIR,
        settings.S3_ENDPOINT_URL,
        settings.S3_PUBLIC_ENDPOINT_URL,
        settings.S3_BUCKET,
        settings.S3_REGION,
        settings.S3_ACCESS_KEY_ID,
        settings.S3_SECRET_ACCESS_KEY.get_secret_value(),
        settings.S3_PREFIX,
        settings.S3_MULTIPART_PART_BYTES,
        settings.S3_TIMEOUT_S,
        settings.S3_MAX_ATTEMPTS,
    )
    store = _stores.get(identity)
    if store is None:
        with _lock:
            store = _stores.setdefault(identity, make_object_store(settings))
    return store
