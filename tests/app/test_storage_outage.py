"""The API and an object store that goes away: /readyz reports it (503 with Retry-After), and a
request that needs the store gets 503 with Retry-After, not a 500. The store is a private
SeaweedFS server, stopped and started again mid-test."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from tests.seaweedfs import SeaweedFS
from tests.service_support import free_port, use_settings


def _with_store_route(app: FastAPI) -> FastAPI:
    """A route that reads one object, as the image and result routes do."""
    from fastapi import Depends

    from app.api.deps import get_object_store

    @app.get("/test-object/{key:path}")
    def read_object(key: str, store=Depends(get_object_store)) -> dict[str, int]:  # noqa: ANN001
        return {"size": len(store.get_bytes(key))}

    return app


def test_readiness_and_requests_follow_the_store(
    private_seaweedfs: SeaweedFS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.main import create_app

    env = private_seaweedfs.settings_env() | {
        "DATA_DIR": str(tmp_path / "data"),
        "S3_TIMEOUT_S": "2",
        "S3_MAX_ATTEMPTS": "1",
        "STORAGE_RETRY_AFTER_S": "7",
    }
    use_settings(monkeypatch, **env)
    private_seaweedfs.client().put_object(
        Bucket=private_seaweedfs.bucket, Key="datasets/d/images/0.png", Body=b"12345"
    )
    with TestClient(_with_store_route(create_app())) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert ready.json()["storage"] == "ok" and ready.json()["storage_backend"] == "s3"
        assert client.get("/test-object/datasets/d/images/0.png").json() == {"size": 5}
        missing = client.get("/test-object/datasets/d/images/1.png")
        assert missing.status_code == 404 and "missing" in missing.json()["detail"]

        private_seaweedfs.stop()
        ready = client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["storage"].startswith("unreachable: StorageUnavailable")
        assert ready.json()["database"] == "ok"
        assert "retry-after" in ready.headers
        refused = client.get("/test-object/datasets/d/images/0.png")
        assert refused.status_code == 503, refused.text
        assert refused.headers["retry-after"] == "7"
        assert "file store is unavailable" in refused.json()["detail"]


def test_a_missing_bucket_is_not_ready(
    seaweedfs: SeaweedFS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.main import create_app

    env = seaweedfs.settings_env() | {"DATA_DIR": str(tmp_path / "data"), "S3_BUCKET": "nobucket"}
    use_settings(monkeypatch, **env)
    with TestClient(create_app()) as client:
        ready = client.get("/readyz")
    assert ready.status_code == 503 and ready.json()["storage"].startswith("unreachable")


def test_the_api_creates_a_missing_bucket_when_told(
    seaweedfs: SeaweedFS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import uuid

    from app.main import create_app

    bucket = f"made-at-start-{uuid.uuid4().hex[:8]}"
    env = seaweedfs.settings_env() | {"DATA_DIR": str(tmp_path / "data"), "S3_BUCKET": bucket}
    use_settings(monkeypatch, **env, S3_CREATE_BUCKET="true")
    for _ in range(2):  # made by the first start, found by the second
        with TestClient(create_app()) as client:
            ready = client.get("/readyz")
        assert ready.status_code == 200, ready.text
    seaweedfs.client().head_bucket(Bucket=bucket)


def test_an_endpoint_where_nothing_listens_is_not_ready(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.main import create_app

    use_settings(
        monkeypatch,
        DATA_DIR=str(tmp_path / "data"),
        STORAGE_BACKEND="s3",
        S3_ENDPOINT_URL=f"http://127.0.0.1:{free_port()}",
        S3_BUCKET="scan",
    )
    with TestClient(create_app()) as client:
        ready = client.get("/readyz")
    assert ready.status_code == 503 and ready.json()["storage"].startswith("unreachable")


def test_the_s3_backend_needs_a_bucket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import ValidationError

    from app.core.config import Settings

    use_settings(monkeypatch, DATA_DIR=str(tmp_path), STORAGE_BACKEND="s3")
    with pytest.raises(ValidationError, match="S3_BUCKET"):
        Settings()
