"""End to end in the production shape: PostgreSQL, Redis and a real `celery worker` process."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.e2e.flow import SCRATCH_JOB, cancel_running_job, run_and_check_clustering
from tests.service_support import (
    celery_service_env,
    create_api_key,
    start_celery_worker,
    stop_process,
)


@pytest.fixture
def production_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    with celery_service_env(tmp_path, monkeypatch) as env:
        yield env


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_celery_worker_clusters_an_upload(
    production_env: dict[str, str], tmp_path: Path, shapes_zip_e2e: Path
) -> None:
    from app.main import create_app

    log_path = tmp_path / "worker.log"
    with TestClient(create_app()) as client:  # start-up migrates the test database
        client.headers["Authorization"] = f"Bearer {create_api_key('e2e')}"
        ready = client.get("/readyz").json()
        assert ready == {
            "status": "ready",
            "runner": "celery",
            "database": "ok",
            "queue": "ok",
            "storage": "ok",
            "storage_backend": "local",
        }
        worker = start_celery_worker(production_env, log_path)
        try:
            job = run_and_check_clustering(client, shapes_zip_e2e, SCRATCH_JOB)
            assert job["attempts"] == 1
            # kill -9 mid-job and the redelivery pitfall: tests/e2e/test_faults_celery.py
            cancel_running_job(client, job["dataset_id"])
        except BaseException:
            print(log_path.read_text()[-6000:])  # the worker's side of the story
            raise
        finally:
            stop_process(worker)
    assert "job finished" in log_path.read_text()
