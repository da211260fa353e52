"""Fixtures for the worker tests: a throwaway PostgreSQL database, migrated, and job rows."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.service_support import insert_job, postgres_database, redis_test_url, use_settings


@pytest.fixture
def pg_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Settings for a worker process: PostgreSQL (migrated) and Redis db 11; the DB URL."""
    with postgres_database() as url:
        use_settings(
            monkeypatch,
            DATA_DIR=str(tmp_path / "data"),
            DATABASE_URL=url,
            CELERY_BROKER_URL=redis_test_url(),
        )
        from app.db.migrate import upgrade_to_head

        upgrade_to_head()
        yield url


@pytest.fixture
def make_job(pg_settings: str) -> Any:
    """Insert a dataset (no images) and return a function inserting jobs on it."""
    from app.db.models import LOCAL_OWNER_ID, Dataset
    from app.db.session import session_scope

    with session_scope() as session:
        session.add(
            Dataset(
                id="d1",
                owner_id=LOCAL_OWNER_ID,
                name="d",
                storage_path="datasets/d1",
                image_count=0,
                total_bytes=0,
            )
        )

    def make(status: str = "queued", **fields: Any) -> str:
        values: dict[str, Any] = {
            "owner_id": LOCAL_OWNER_ID,
            "dataset_id": "d1",
            "status": status,
            "num_clusters": 2,
            "preset": "tiny",
            "config": {},
        }
        return insert_job(values | fields)

    return make
