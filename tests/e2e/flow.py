"""The end-to-end client flow shared by the embedded and the Celery e2e tests."""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path
from typing import Any

from PIL import Image

# Small enough for a shared 2-core CPU (~15 s), still every stage of the pipeline.
FAST_OVERRIDES: dict[str, Any] = {
    "pretext": {"epochs": 1},
    "scan": {"epochs": 1, "num_heads": 1},
    "selflabel": {"epochs": 1},
}
FINISHED = ("succeeded", "failed", "cancelled")


def wait_for(
    client: Any, job_id: str, statuses: tuple[str, ...], timeout_s: float, stage: str | None = None
) -> dict[str, Any]:
    """Poll the job until its status is one of `statuses` (and at `stage`); the last job JSON."""
    deadline = time.monotonic() + timeout_s
    while True:
        job = client.get(f"/api/v1/jobs/{job_id}").json()
        if job["status"] in statuses and (stage is None or job["stage"] == stage):
            return job
        assert job["status"] not in FINISHED, job
        assert time.monotonic() < deadline, f"job still {job['status']} after {timeout_s} s"
        time.sleep(0.25)


def upload_shapes(client: Any, zip_path: Path) -> dict[str, Any]:
    with zip_path.open("rb") as handle:
        response = client.post(
            "/api/v1/datasets",
            files={"file": (zip_path.name, handle, "application/zip")},
            data={"labels_from_folders": "true"},
        )
    assert response.status_code == 201, response.text
    return response.json()


def _all_assignments(client: Any, job_id: str, num_clusters: int) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    while True:
        page = client.get(
            f"/api/v1/jobs/{job_id}/assignments",
            params={"num_clusters": num_clusters, "offset": len(items), "limit": 64},
        ).json()
        items += page["items"]
        if not page["items"] or len(items) >= page["total"]:
            assert len(items) == page["total"]
            return items


# What a job request adds per route: the scratch route in its smallest schedule, or nothing (the
# service's default: the pretrained route with the bundled backbone).
SCRATCH_JOB: dict[str, Any] = {"preset": "tiny", "overrides": FAST_OVERRIDES}
DEFAULT_JOB: dict[str, Any] = {}
FIRST_STAGE = {"tiny": "pretext", None: "features"}


def run_and_check_clustering(
    client: Any, zip_path: Path, job_settings: dict[str, Any], timeout_s: float = 240
) -> dict[str, Any]:
    """Upload, cluster into K=3 with C=6 overclustering, and check every result endpoint."""
    dataset = upload_shapes(client, zip_path)
    image_ids = [
        item["id"]
        for item in client.get(
            f"/api/v1/datasets/{dataset['id']}/images", params={"limit": 1000}
        ).json()["items"]
    ]
    assert len(image_ids) == dataset["image_count"]
    response = client.post(
        "/api/v1/jobs",
        json={
            "dataset_id": dataset["id"],
            "num_clusters": 3,
            "overcluster": [6],
            **job_settings,
        },
    )
    assert response.status_code == 202, response.text
    job = wait_for(client, response.json()["id"], FINISHED, timeout_s)
    assert job["status"] == "succeeded", job["error"]
    assert job["progress"] == 1.0 and job["finished_at"] and job["started_at"]
    first = FIRST_STAGE[job_settings.get("preset")]
    assert {first, "mine", "scan", "selflabel", "finalize"} <= set(job["timings"])
    assert [r["num_clusters"] for r in job["result_sets"]] == [3, 6]
    assert all(r["metrics"] for r in job["result_sets"])  # labels from folders -> ACC/NMI/ARI
    assert job["metrics"] is not None

    for num_clusters in (3, 6):
        assignments = _all_assignments(client, job["id"], num_clusters)
        ids = [a["image_id"] for a in assignments]
        assert sorted(ids) == sorted(image_ids)  # every image exactly once
        assert all(0 <= a["cluster"] < num_clusters for a in assignments)
        assert all(0.0 <= a["confidence"] <= 1.0 for a in assignments)

        rows = list(
            csv.DictReader(
                io.StringIO(
                    client.get(
                        f"/api/v1/jobs/{job['id']}/assignments",
                        params={"num_clusters": num_clusters, "format": "csv"},
                    ).text
                )
            )
        )
        assert sorted(r["image_id"] for r in rows) == sorted(image_ids)

        clusters = client.get(
            f"/api/v1/jobs/{job['id']}/clusters", params={"num_clusters": num_clusters}
        ).json()["clusters"]
        assert [c["index"] for c in clusters] == list(range(num_clusters))
        assert sum(c["size"] for c in clusters) == len(image_ids)
        for cluster in clusters:
            if cluster["size"] == 0:
                continue
            assert cluster["prototype_image_id"] in image_ids
            assert set(cluster["top_members"]) <= set(image_ids)
            prototype = client.get(
                f"/api/v1/jobs/{job['id']}/clusters/{cluster['index']}/prototype",
                params={"num_clusters": num_clusters},
            )
            assert prototype.status_code == 200
            assert prototype.headers["content-type"] in ("image/png", "image/jpeg")
            Image.open(io.BytesIO(prototype.content)).load()

    default = client.get(f"/api/v1/jobs/{job['id']}/assignments", params={"limit": 1}).json()
    assert default["num_clusters"] == 3 and default["total"] == len(image_ids)
    return job


def cancel_running_job(client: Any, dataset_id: str, timeout_s: float = 120) -> dict[str, Any]:
    """Start a long job, cancel it once running, and expect it cancelled at the next step."""
    response = client.post(
        "/api/v1/jobs",
        json={
            "dataset_id": dataset_id,
            "num_clusters": 3,
            "preset": "tiny",
            "overrides": {"pretext": {"epochs": 200}},
        },
    )
    assert response.status_code == 202, response.text
    # Once training has begun: the stop flag must work inside a stage, not only before it.
    job = wait_for(client, response.json()["id"], ("running",), timeout_s, stage="pretext")
    cancel = client.post(f"/api/v1/jobs/{job['id']}/cancel")
    assert cancel.status_code in (200, 202) and cancel.json()["cancel_requested"]
    job = wait_for(client, job["id"], ("cancelled",), 30)  # stops at its next step
    assert job["finished_at"] is not None and job["result_sets"] == []
    assert job["stage"] == "pretext" and job["progress"] < 0.5
    again = client.post(f"/api/v1/jobs/{job['id']}/cancel")
    assert again.status_code == 200 and again.json()["status"] == "cancelled"
    return job
