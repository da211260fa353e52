"""Objects that no row names: an upload or a job whose process died between writing its objects
and committing its rows, or a deletion whose store went away before the objects did.

A folder `datasets/<id>/`, `jobs/<id>/` or `features/<dataset id>/` is an orphan when the
database holds no such dataset or job and its newest object is older than `older_than_s` (an
upload in progress has objects and no row yet, for a few seconds or minutes). Run by
`scan-admin remove-orphans`.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict

from sqlalchemy import select
from sqlalchemy.orm import InstrumentedAttribute, Session, sessionmaker

from app.db.models import Dataset, Job
from app.storage.objects import ObjectStore

__all__ = ["find_orphans", "remove_orphans", "ORPHAN_ROOTS"]

logger = logging.getLogger(__name__)

# Top-level folder -> the id column that names its subfolders.
ORPHAN_ROOTS: dict[str, InstrumentedAttribute[str]] = {
    "datasets": Dataset.id,
    "features": Dataset.id,
    "jobs": Job.id,
}


def find_orphans(
    store: ObjectStore, factory: sessionmaker[Session], older_than_s: float
) -> list[str]:
    """Folder prefixes (`jobs/<id>/`) of objects no row names, untouched for `older_than_s`."""
    cutoff = time.time() - older_than_s
    orphans: list[str] = []
    for root, column in ORPHAN_ROOTS.items():
        newest: dict[str, float] = defaultdict(float)
        for info in store.list(f"{root}/"):
            folder = info.key[len(root) + 1 :].partition("/")[0]
            newest[folder] = max(newest[folder], info.modified or time.time())
        if not newest:
            continue
        with factory() as session:
            known = set(session.scalars(select(column).where(column.in_(list(newest)))))
        orphans += [
            f"{root}/{folder}/"
            for folder, modified in sorted(newest.items())
            if folder not in known and modified < cutoff
        ]
    return orphans


def remove_orphans(
    store: ObjectStore, factory: sessionmaker[Session], older_than_s: float
) -> list[str]:
    """Delete the orphan folders; which ones."""
    orphans = find_orphans(store, factory, older_than_s)
    for prefix in orphans:
        count = store.delete_prefix(prefix)
        logger.info("removed %d orphan objects under %s", count, prefix)
    return orphans
