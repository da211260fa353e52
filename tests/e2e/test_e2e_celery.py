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

from tests.e2e.flow import (
    FAST_OVERRIDES,
    cancel_running_job,
    run_and_check_clustering,
    upload_shapes,
    wait_for,
)
from tests.service_support import (
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


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(child) for child in path.read_text().split()] if path.exists() else []


def _kill_worker_child_mid_job(client: TestClient, worker_pid: int, tmp_path: Path) -> None:
    """SIGKILL the pool process running a job: the message is requeued and the job resumes."""
    import signal

    from scan_engine.sample_data import make_shapes_zip

    small = make_shapes_zip(tmp_path / "small.zip", classes=3, per_class=20, image_size=32)
    dataset = upload_shapes(client, small)  # 60 images: this run only has to get restarted
    response = client.post(
        "/api/v1/jobs",
        json={
            "dataset_id": dataset["id"],
            "num_clusters": 3,
            "preset": "tiny",
            "overrides": FAST_OVERRIDES,
        },
    )
    job = wait_for(client, response.json()["id"], ("running",), 120, stage="pretext")
    (child,) = _children(worker_pid)  # --concurrency 1: one pool process
    os.kill(child, signal.SIGKILL)
    job = wait_for(client, job["id"], ("succeeded", "failed", "cancelled"), 240)
    assert job["status"] == "succeeded", job["error"]
    assert job["attempts"] == 2  # claimed again after the loss, not run twice in parallel


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_celery_worker_clusters_an_upload(
    production_env: dict[str, str], tmp_path: Path, shapes_zip_e2e: Path
) -> None:
    from app.main import create_app

    log_path = tmp_path / "worker.log"
    with TestClient(create_app()) as client:  # start-up migrates the test database
        ready = client.get("/readyz").json()
        assert ready == {"status": "ready", "runner": "celery", "database": "ok", "queue": "ok"}
        worker = _start_worker(production_env, log_path)
        try:
            job = run_and_check_clustering(client, shapes_zip_e2e)
            assert job["attempts"] == 1
            _kill_worker_child_mid_job(client, worker.pid, tmp_path)
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
