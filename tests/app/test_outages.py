"""PostgreSQL or Redis going away and coming back: 503 with a clear message and Retry-After,
no orphan rows or files, and the service recovers by itself once they are back.

The outages are real but private: PostgreSQL is reached through a TCP proxy that the test
closes and reopens (the shared server never notices), Redis is a redis-server of the test's own.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from fastapi.testclient import TestClient

from tests.service_support import (
    PG_SERVER_URL,
    RedisServer,
    TcpProxy,
    files_under,
    png_bytes,
    postgres_database,
    upload_zip,
    use_settings,
    zip_bytes,
)

JOBS = "/api/v1/jobs"
NO_KEYS = {"AUTH_MODE": "single_user", "ALLOW_SINGLE_USER_IN_PRODUCTION": "true"}


def _zip(seed: int) -> bytes:
    return zip_bytes(
        {"a.png": png_bytes(colour=(seed, 0, 0)), "b.png": png_bytes(colour=(0, seed, 0))}
    )


@pytest.fixture
def proxied_postgres() -> Iterator[tuple[str, TcpProxy]]:
    """A fresh test database, reached through a proxy: (its URL via the proxy, the proxy)."""
    with postgres_database() as url:
        server = urlsplit(PG_SERVER_URL)
        proxy = TcpProxy(server.hostname or "127.0.0.1", server.port or 5432).up()
        via_proxy = url.replace(
            f"{server.hostname}:{server.port or 5432}", f"127.0.0.1:{proxy.port}"
        )
        try:
            yield via_proxy, proxy
        finally:
            proxy.down()


def test_postgres_outage(
    proxied_postgres: tuple[str, TcpProxy], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.main import create_app

    url, proxy = proxied_postgres
    data_dir = tmp_path / "data"
    # No storage pre-check: the upload is received in full and meets the outage at ingest.
    use_settings(
        monkeypatch,
        DATA_DIR=str(data_dir),
        DATABASE_URL=url,
        MAX_STORAGE_BYTES_PER_OWNER="0",
        DB_RETRY_AFTER_S="7",
        **NO_KEYS,
    )
    with TestClient(create_app()) as client:
        first = upload_zip(client, _zip(1))
        assert first.status_code == 201, first.text
        stored = files_under(data_dir / "datasets")

        proxy.down()
        for method, path in [
            ("GET", "/api/v1/datasets"),
            ("GET", f"/api/v1/datasets/{first.json()['id']}"),
            ("POST", JOBS),
            ("GET", "/readyz"),
        ]:
            body = (
                {"dataset_id": first.json()["id"], "num_clusters": 2} if method == "POST" else None
            )
            response = client.request(method, path, json=body)
            assert response.status_code == 503, (path, response.text)
            assert response.headers["retry-after"] == "7"
        assert "database is unavailable" in client.get("/api/v1/datasets").json()["detail"]
        during = upload_zip(client, _zip(2))
        assert during.status_code == 503 and "database" in during.json()["detail"]
        assert files_under(data_dir / "datasets") == stored  # no orphan files
        assert files_under(data_dir / "tmp") == []
        assert client.get("/healthz").status_code == 200  # the process itself is fine

        proxy.up()  # back: the next requests work again, no restart needed
        assert client.get("/readyz").status_code == 200
        assert upload_zip(client, _zip(2)).status_code == 201
        listed = client.get("/api/v1/datasets").json()
        assert listed["total"] == 2  # nothing recorded during the outage


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.stop()


def test_redis_outage_during_job_creation(
    private_redis: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.main import create_app

    use_settings(
        monkeypatch, DATA_DIR=str(tmp_path / "data"), CELERY_BROKER_URL=private_redis.url, **NO_KEYS
    )
    with TestClient(create_app()) as client:
        dataset = upload_zip(client, _zip(3)).json()
        body = {"dataset_id": dataset["id"], "num_clusters": 2, "preset": "tiny"}
        assert client.post(JOBS, json=body).status_code == 202  # queued (no worker here)

        private_redis.stop()
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["queue"].startswith("unreachable")
        response = client.post(JOBS, json=body)
        assert response.status_code == 503, response.text
        assert "job queue is unavailable" in response.json()["detail"]
        assert response.headers["retry-after"] == "5"
        assert client.get(JOBS).json()["total"] == 1  # no orphan row for the refused job

        private_redis.start()  # same port: the broker connection comes back by itself
        assert client.post(JOBS, json=body).status_code == 202
        assert client.get("/readyz").status_code == 200
        jobs = client.get(JOBS).json()
        assert jobs["total"] == 2 and {job["status"] for job in jobs["items"]} == {"queued"}
