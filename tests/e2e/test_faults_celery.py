"""Worker faults with real processes: PostgreSQL, Redis and two `celery worker` processes.

The broker's visibility timeout is 3 s and the job runs much longer, so Redis hands the job's
message to the second worker while the first still runs it (the known Celery pitfall with
acks_late). The job lease makes that harmless: the second delivery exits without touching the
job. Then the pool process running the job is killed with SIGKILL after its pretext stage was
checkpointed: the job is taken up again (Celery's requeue or the reaper, whichever comes first),
resumes from the checkpoint instead of retraining, and finishes, having run exactly twice.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.e2e.flow import FINISHED, upload_shapes, wait_for
from tests.service_support import (
    celery_service_env,
    create_api_key,
    print_log_tails,
    start_celery_worker,
    stop_process,
)

# SCAN long enough (~17 s on a quiet Xeon) that the job still runs when the second delivery comes,
# 3 s visibility timeout plus up to a 1.5 s sweep after the first: with 2 epochs a quiet CPU
# finished the whole job in 4.3 s, before Redis handed the message on.
OVERRIDES = {
    "pretext": {"epochs": 1},
    "scan": {"epochs": 120, "num_heads": 1},
    "selflabel": {"epochs": 1},
}
SECOND_DELIVERY = "running under another worker's lease"


@pytest.fixture
def fault_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    with celery_service_env(
        tmp_path,
        monkeypatch,
        CELERY_VISIBILITY_TIMEOUT_S="3",
        JOB_LEASE_S="6",
        JOB_HEARTBEAT_S="1",
        REAPER_INTERVAL_S="2",
    ) as env:
        yield env


def _log_lines(paths: list[Path]) -> list[dict[str, Any]]:
    lines = []
    for path in paths:
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    lines.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    return lines


def _said(paths: list[Path], words: str, job_id: str | None = None) -> int:
    return sum(
        1
        for line in _log_lines(paths)
        if words in line.get("message", "") and job_id in (None, line.get("job_id"))
    )


def _lease_pid(job_id: str) -> int:
    from app.db.models import Job
    from app.db.session import session_scope

    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job is not None and job.lease_owner, "the running job holds no lease"
        return int(job.lease_owner.split(":")[1])


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_redelivery_and_sigkill_mid_job(fault_env: dict[str, str], tmp_path: Path) -> None:
    from app.main import create_app
    from scan_engine.sample_data import make_shapes_zip

    logs = [tmp_path / "worker-a.log", tmp_path / "worker-b.log"]
    shapes = make_shapes_zip(tmp_path / "shapes.zip", classes=3, per_class=10, image_size=32)
    with TestClient(create_app()) as client:  # start-up migrates the test database
        client.headers["Authorization"] = f"Bearer {create_api_key('ci')}"
        dataset = upload_shapes(client, shapes)
        workers = [start_celery_worker(fault_env, log, "fault") for log in logs]
        try:
            response = client.post(
                "/api/v1/jobs",
                json={
                    "dataset_id": dataset["id"],
                    "num_clusters": 3,
                    "preset": "tiny",
                    "overrides": OVERRIDES,
                },
            )
            assert response.status_code == 202, response.text
            job_id = response.json()["id"]
            work = Path(fault_env["DATA_DIR"]) / "jobs" / job_id / "work"

            # Past the 3 s visibility timeout the message went to the other worker too; wait
            # for that and for the pretext checkpoint, then kill the job's process.
            deadline = time.monotonic() + 120
            while not (_said(logs, SECOND_DELIVERY, job_id) and (work / "pretext.pt").exists()):
                job = client.get(f"/api/v1/jobs/{job_id}").json()
                assert job["status"] not in FINISHED, job
                assert time.monotonic() < deadline, "no second delivery or no checkpoint seen"
                time.sleep(0.2)
            job = client.get(f"/api/v1/jobs/{job_id}").json()
            assert job["status"] == "running" and job["attempts"] == 1  # not started twice

            pretext_written = (work / "pretext.pt").stat().st_mtime_ns
            os.kill(_lease_pid(job_id), signal.SIGKILL)  # the pool process running it

            job = wait_for(client, job_id, FINISHED, 180)
            assert job["status"] == "succeeded", job["error"]
            assert job["attempts"] == 2  # once more after the kill, never two at a time
            assert (work / "pretext.pt").stat().st_mtime_ns == pretext_written
            assert _said(logs, "resuming: stage pretext loaded")
            # Taken up by Celery's requeue (a dead lease is taken over) or by the reaper.
            assert _said(logs, "taking over a job whose worker stopped", job_id) or _said(
                logs, "stale job queued", job_id
            )
            assignments = client.get(f"/api/v1/jobs/{job_id}/assignments").json()
            assert assignments["total"] == 30
        except BaseException:
            print_log_tails(logs)
            raise
        finally:
            for worker in workers:
                worker.terminate()  # both at once; stop_process then waits for each
            for worker in workers:
                stop_process(worker)
