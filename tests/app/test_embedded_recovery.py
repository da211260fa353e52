"""The embedded worker's reaper: a job whose worker stopped is taken up again while the service
keeps running (no restart needed), and numbers the database cannot hold are a 422, not a 500."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.service_support import png_bytes, upload_zip, use_settings, zip_bytes


def test_reaper_reruns_a_job_left_running_by_a_dead_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.db.models import LOCAL_OWNER_ID, Job
    from app.db.session import session_scope
    from app.main import create_app

    use_settings(monkeypatch, DATA_DIR=str(tmp_path / "data"), REAPER_INTERVAL_S="0.3")
    with TestClient(create_app()) as client:
        dataset = upload_zip(client, zip_bytes({"a.png": png_bytes(), "b.png": png_bytes()}))
        with session_scope() as session:  # after start-up: only the reaper can find it
            job = Job(
                owner_id=LOCAL_OWNER_ID,
                dataset_id=dataset.json()["id"],
                status="running",
                num_clusters=2,
                preset="tiny",
                overrides={"scan": {"epochs": -1}},  # fails fast once it runs again
                config={},
                lease_owner="elsewhere:1:gone",
                lease_expires_at=datetime.now(UTC) - timedelta(seconds=1),
                heartbeat_at=datetime.now(UTC) - timedelta(seconds=30),
            )
            session.add(job)
            session.flush()
            job_id = job.id
        found = _settled(client, job_id)
    assert found["status"] == "failed" and found["error"].startswith("ConfigError: scan.epochs")
    assert found["attempts"] == 1


def _settled(client: TestClient, job_id: str) -> dict[str, object]:
    deadline = time.monotonic() + 20
    while (job := client.get(f"/api/v1/jobs/{job_id}").json())["status"] not in (
        "failed",
        "succeeded",
        "cancelled",
    ):
        assert time.monotonic() < deadline, job
        time.sleep(0.1)
    return job


def test_numbers_out_of_the_database_range_are_422(client: TestClient) -> None:
    huge = str(10**30)
    for path in (
        f"/api/v1/datasets?offset={huge}",
        f"/api/v1/jobs?offset={huge}",
        f"/api/v1/jobs/abc/clusters?num_clusters={huge}",
    ):
        response = client.get(path)
        assert response.status_code in (404, 422), path
        assert response.status_code != 500
    response = client.get(f"/api/v1/datasets?offset={huge}")
    assert response.status_code == 422 and "out of range" in response.json()["detail"]
