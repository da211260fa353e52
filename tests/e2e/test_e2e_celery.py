"""End to end in the production shape: PostgreSQL, Redis and a real `celery worker` process."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.e2e.flow import cancel_running_job, run_and_check_clustering
from tests.service_support import (
    create_api_key,
    flush_redis_test_db,
    postgres_database,
    redis_test_url,
    require_redis,
    use_settings,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def production_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    require_redis()
    with postgres_database() as url:
        env = {
            "DATA_DIR": str(tmp_path / "data"),
            "DATABASE_URL": url,
            "CELERY_BROKER_URL": redis_test_url(),
            "JOB_RUNNER": "celery",
            "PROGRESS_INTERVAL_S": "0.2",
            "CANCEL_CHECK_INTERVAL_S": "0.2",
            "LOG_FORMAT": "json",
        }
        use_settings(monkeypatch, **env)
        flush_redis_test_db()
        try:
            yield env
        finally:
            flush_redis_test_db()


def _start_worker(env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    full_env = {**os.environ, **env, "PYTHONPATH": str(REPO)}
    command = [
        sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker",
        "-Q", "gpu", "--concurrency", "1", "--hostname", f"test-{uuid.uuid4().hex[:8]}@%h",
        "--without-gossip", "--without-mingle", "--loglevel", "INFO",
    ]  # fmt: skip
    with log_path.open("wb") as log:
        return subprocess.Popen(command, cwd=REPO, env=full_env, stdout=log, stderr=log)


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
        assert ready == {"status": "ready", "runner": "celery", "database": "ok", "queue": "ok"}
        worker = _start_worker(production_env, log_path)
        try:
            job = run_and_check_clustering(client, shapes_zip_e2e)
            assert job["attempts"] == 1
            # kill -9 mid-job and the redelivery pitfall: tests/e2e/test_faults_celery.py
            cancel_running_job(client, job["dataset_id"])
        except BaseException:
            print(log_path.read_text()[-6000:])  # the worker's side of the story
            raise
        finally:
            worker.terminate()
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
    assert "job finished" in log_path.read_text()
