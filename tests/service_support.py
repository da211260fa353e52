"""Helpers for the service tests (tests/app, tests/worker, tests/e2e).

Each test database is a fresh PostgreSQL database `scan_test_<random>` dropped afterwards, and
Celery uses its own Redis db number, so tests never touch anyone else's data. The service reads
its settings from the environment: `use_settings` sets variables, clears the cached settings and
forgets cached engines. Nothing from `app` is imported at module level (engine tests share the
session and may check what importing scan_engine loads).
"""

from __future__ import annotations

import io
import os
import socket
import uuid
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

PG_SERVER_URL = os.environ.get("SCAN_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432")
REDIS_URL = os.environ.get("SCAN_TEST_REDIS_URL", "redis://127.0.0.1:6379")
REDIS_TEST_DB = int(os.environ.get("SCAN_TEST_REDIS_DB", "11"))


def _reachable(url: str, default_port: int) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection(
            (parts.hostname or "127.0.0.1", parts.port or default_port), 1
        ):
            return True
    except OSError:
        return False


def require_postgres() -> None:
    if not _reachable(PG_SERVER_URL, 5432):
        pytest.fail(f"PostgreSQL not reachable at {PG_SERVER_URL}: run scripts/services.sh")


def require_redis() -> None:
    if not _reachable(REDIS_URL, 6379):
        pytest.fail(f"Redis not reachable at {REDIS_URL}: run scripts/services.sh")


@contextmanager
def postgres_database() -> Iterator[str]:
    """Create `scan_test_<random>`, yield its URL, drop it (even if connections linger)."""
    require_postgres()
    from sqlalchemy import create_engine, text

    name = f"scan_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(f"{PG_SERVER_URL}/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield f"{PG_SERVER_URL}/{name}"
    finally:
        from app.db.session import dispose_engines

        dispose_engines()
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def redis_test_url() -> str:
    return f"{REDIS_URL}/{REDIS_TEST_DB}"


def flush_redis_test_db() -> None:
    import redis

    client = redis.Redis.from_url(redis_test_url())
    client.flushdb()
    client.close()


def use_settings(monkeypatch: pytest.MonkeyPatch, **env: str) -> None:
    """Point the service at `env` (and only that) for the rest of the test."""
    from app.core.config import Settings, get_settings
    from app.db.session import dispose_engines

    # Every variable the service reads is cleared first, so the developer's shell cannot leak in.
    for name in Settings.model_fields:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    dispose_engines()


def png_bytes(
    size: tuple[int, int] = (24, 24), colour: tuple[int, int, int] = (200, 30, 30)
) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def zip_bytes(entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, payload in entries.items():
            archive.writestr(name, payload)
    return buffer.getvalue()


def upload_zip(client: Any, payload: bytes, filename: str = "upload.zip", **fields: str) -> Any:
    """POST a zip to /api/v1/datasets through a TestClient (or any httpx-like client)."""
    return client.post(
        "/api/v1/datasets", files={"file": (filename, payload, "application/zip")}, data=fields
    )


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())
