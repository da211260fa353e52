"""Operator endpoints, structured logs, DB outages (503 + Retry-After) and `scan-service`."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from tests.service_support import use_settings

REPO = Path(__file__).resolve().parents[2]


def test_openapi_documents_the_api(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    upload = spec["paths"]["/api/v1/datasets"]["post"]
    assert "file" in upload["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]
    for path in (
        "/api/v1/jobs",
        "/api/v1/jobs/{job_id}/cancel",
        "/api/v1/jobs/{job_id}/assignments",
        "/api/v1/jobs/{job_id}/clusters/{cluster_index}/prototype",
        "/api/v1/datasets/{dataset_id}/images/{image_id}",
        "/api/v1/backbones",
    ):
        assert path in spec["paths"], path
    assert client.get("/docs").status_code == 200


def test_health_and_ready(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {
        "status": "ready",
        "runner": "embedded",
        "storage_backend": "local",
        "database": "ok",
        "queue": "ok",
        "storage": "ok",
    }


def test_metrics_in_prometheus_text_format(
    client: TestClient, dataset: dict[str, Any], make_job: Any
) -> None:
    make_job(dataset["id"], status="failed", duration_s=42.0)
    make_job(dataset["id"], status="succeeded", duration_s=5.0)
    make_job(dataset["id"], status="queued")
    response = client.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = {}
    for line in response.text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    assert samples['scan_jobs{status="queued"}'] == 1
    assert samples['scan_jobs{status="running"}'] == 0
    assert samples['scan_job_duration_seconds_bucket{status="failed",le="30"}'] == 0
    assert samples['scan_job_duration_seconds_bucket{status="failed",le="60"}'] == 1
    assert samples['scan_job_duration_seconds_bucket{status="succeeded",le="10"}'] == 1
    assert samples['scan_job_duration_seconds_sum{status="failed"}'] == 42.0
    assert samples['scan_job_duration_seconds_count{status="succeeded"}'] == 1
    assert samples["scan_datasets"] == 1 and samples["scan_images"] == 36


def test_unreachable_database_is_503_with_retry_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.main import create_app

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    use_settings(
        monkeypatch,
        DATA_DIR=str(tmp_path),
        DATABASE_URL=f"postgresql://postgres@127.0.0.1:{port}/nowhere",
        MIGRATE_ON_START="false",
    )
    with TestClient(create_app()) as client:
        client.headers["X-API-Key"] = "scan_0123456789ab_looked-up-in-the-missing-database"
        for path in ("/api/v1/datasets", "/api/v1/jobs/abc", "/readyz"):
            response = client.get(path)
            assert response.status_code == 503, path
            assert response.headers["retry-after"] == "5"
        assert "database" in client.get("/api/v1/jobs").json()["detail"]
        assert client.get("/healthz").status_code == 200


def test_json_log_lines() -> None:
    from app.core.logging import JsonFormatter

    logger = logging.getLogger("scan.test")
    record = logger.makeRecord(
        "scan.test", logging.INFO, __file__, 1, "job %s done", ("j1",), None, extra={"job_id": "j1"}
    )
    entry = json.loads(JsonFormatter().format(record))
    assert entry["message"] == "job j1 done" and entry["job_id"] == "j1"
    assert entry["level"] == "INFO" and entry["logger"] == "scan.test" and "time" in entry


def test_scan_service_starts_embedded_with_no_settings(tmp_path: Path) -> None:
    """`scan-service` (app.main:serve) in a bare folder: SQLite under ./data, migrated, ready."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("DATA_DIR", "DATABASE_URL")}
    env["PYTHONPATH"] = str(REPO)
    process = subprocess.Popen(
        [sys.executable, "-c", "from app.main import serve; serve()", "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2)
                break
            except httpx.TransportError:
                assert process.poll() is None, "scan-service exited"
                assert time.monotonic() < deadline, "scan-service did not start"
                time.sleep(0.3)
        assert ready.status_code == 200 and ready.json()["runner"] == "embedded"
        assert (tmp_path / "data" / "scan.db").is_file()
    finally:
        process.terminate()
        _, stderr = process.communicate(timeout=30)
    lines = [json.loads(line) for line in stderr.decode().splitlines() if line.startswith("{")]
    assert any(line["message"] == "starting scan-service" for line in lines)


def test_unreachable_broker_is_503_and_no_job_is_left(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.main import create_app
    from tests.service_support import png_bytes, upload_zip, zip_bytes

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    use_settings(
        monkeypatch,
        DATA_DIR=str(tmp_path),
        CELERY_BROKER_URL=f"redis://127.0.0.1:{port}/0",
        AUTH_MODE="single_user",
        ALLOW_SINGLE_USER_IN_PRODUCTION="true",
    )
    with TestClient(create_app()) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["queue"].startswith("unreachable")
        assert ready.json()["runner"] == "celery" and ready.json()["database"] == "ok"
        dataset = upload_zip(client, zip_bytes({"a.png": png_bytes(), "b.png": png_bytes()})).json()
        started = time.monotonic()
        response = client.post(
            "/api/v1/jobs", json={"dataset_id": dataset["id"], "num_clusters": 2}
        )
        assert time.monotonic() - started < 10
        assert response.status_code == 503 and response.headers["retry-after"] == "5"
        assert "job queue is unavailable" in response.json()["detail"]
        assert client.get("/api/v1/jobs").json()["total"] == 0  # the row was removed again


def test_stale_upload_folders_are_removed_at_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.main import create_app

    use_settings(monkeypatch, DATA_DIR=str(tmp_path))
    stale, fresh = tmp_path / "tmp" / "upload-old", tmp_path / "tmp" / "upload-new"
    for folder in (stale, fresh):
        folder.mkdir(parents=True)
        (folder / "upload.zip").write_bytes(b"partial")
    os.utime(stale, (time.time() - 2 * 86400, time.time() - 2 * 86400))
    with TestClient(create_app()):
        pass
    assert not stale.exists() and fresh.exists()  # fresh: maybe another replica's upload
