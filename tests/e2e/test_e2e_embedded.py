"""End to end in the embedded mode: SQLite, files on disk, jobs in the API's own worker thread."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.e2e.flow import (
    DEFAULT_JOB,
    FINISHED,
    cancel_running_job,
    run_and_check_clustering,
    wait_for,
)
from tests.service_support import files_under, use_settings


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_embedded_service_clusters_an_upload(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shapes_zip_e2e: Path
) -> None:
    from app.main import create_app

    data_dir = tmp_path / "data"
    use_settings(
        monkeypatch,
        DATA_DIR=str(data_dir),
        PROGRESS_INTERVAL_S="0.2",
        CANCEL_CHECK_INTERVAL_S="0.2",
    )
    with TestClient(create_app()) as client:
        assert client.get("/readyz").json()["runner"] == "embedded"
        # No preset named: what `make run` gives, the pretrained route with the bundled backbone.
        job = run_and_check_clustering(client, shapes_zip_e2e, DEFAULT_JOB)
        assert job["backbone"] == "efficientnet_lite0" and job["image_size"] == 224
        assert job["features_from_cache"] is False
        work = data_dir / "jobs" / job["id"] / "work"
        assert (work / "model.pt").is_file() and job[
            "model_path"
        ] == f"jobs/{job['id']}/work/model.pt"
        print("default route metrics", job["metrics"])

        # Another K on the same dataset reads the dataset's cached features: no embedding.
        response = client.post(
            "/api/v1/jobs", json={"dataset_id": job["dataset_id"], "num_clusters": 4}
        )
        assert response.status_code == 202, response.text
        again = wait_for(client, response.json()["id"], FINISHED, 120)
        assert again["status"] == "succeeded", again["error"]
        assert again["features_from_cache"] is True

        cancel_running_job(client, job["dataset_id"])
        metrics = client.get("/metrics").text
        assert 'scan_jobs{status="succeeded"} 2' in metrics
        assert 'scan_jobs{status="cancelled"} 1' in metrics
    assert (data_dir / "scan.db").is_file()
    assert files_under(data_dir / "tmp") == []
