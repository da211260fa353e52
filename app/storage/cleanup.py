"""Removing the objects of deleted rows: after the commit, best effort."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from app.storage.objects import ObjectStore, StorageError

__all__ = ["remove_prefixes"]

logger = logging.getLogger(__name__)


def remove_prefixes(store: ObjectStore, prefixes: Iterable[str]) -> int:
    """Delete every object under each folder prefix; how many. Called once the rows are gone:
    a store that fails leaves stray objects (logged), never a row naming a missing object."""
    removed = 0
    for prefix in prefixes:
        try:
            removed += store.delete_prefix(prefix)
        except StorageError:
            logger.warning("could not remove the objects under %s", prefix, exc_info=True)
    return removed
