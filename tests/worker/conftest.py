"""Fixtures for the worker tests: a throwaway PostgreSQL database, migrated."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.service_support import postgres_database, redis_test_url, use_settings


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
