"""Storage: the local data folder's layout (`Storage`) and the object store interface with its
two backends, local files (`FilesystemObjectStore`, the default) and S3 (`S3ObjectStore`)."""

from app.storage.cleanup import remove_prefixes
from app.storage.factory import make_object_store, object_store
from app.storage.filesystem import FilesystemObjectStore
from app.storage.local import Storage
from app.storage.objects import (
    ObjectInfo,
    ObjectStore,
    StorageError,
    StorageKeyMissing,
    StoragePathError,
    StorageUnavailable,
    check_key,
)
from app.storage.s3 import S3ObjectStore

__all__ = [
    "FilesystemObjectStore",
    "ObjectInfo",
    "ObjectStore",
    "S3ObjectStore",
    "Storage",
    "StorageError",
    "StorageKeyMissing",
    "StoragePathError",
    "StorageUnavailable",
    "check_key",
    "make_object_store",
    "remove_prefixes",
    "object_store",
]
