"""K unknown through the API, and POST /jobs/{id}/predict: a real job chooses K and then puts new
images into its clusters; a job without a stored model answers 409."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.e2e.flow import FAST_OVERRIDES, FINISHED, wait_for
from tests.service_support import png_bytes, zip_bytes

JOBS = "/api/v1/jobs"


def _shapes(shapes_zip: Path, count: int) -> dict[str, bytes]:
    """The first `count` images of the uploaded zip: name -> bytes."""
    with zipfile.ZipFile(shapes_zip) as archive:
        names = sorted(n for n in archive.namelist() if not n.endswith("/"))[:count]
        return {name: archive.read(name) for name in names}


def _predict(client: TestClient, job_id: str, files: list[tuple[str, bytes]], **params: Any):
    return client.post(
        f"{JOBS}/{job_id}/predict",
        files=[("file", (name, payload, "application/octet-stream")) for name, payload in files],
        params=params,
    )


@pytest.fixture
def finished_k_job(client: TestClient, dataset: dict[str, Any]) -> dict[str, Any]:
    """A real job on the 36-image dataset that names no K: K chosen in the default range 2..3."""
    response = client.post(
        JOBS,
        json={
            "dataset_id": dataset["id"],
            "preset": "tiny",
            "overrides": {**FAST_OVERRIDES, "k_selection": {"steps": 40}},
        },
    )
    assert response.status_code == 202, response.text
    queued = response.json()
    assert queued["num_clusters"] is None  # not chosen yet
    assert queued["num_clusters_range"] == [2, 3] and queued["cluster_counts"] == [2, 3]
    job = wait_for(client, queued["id"], FINISHED, timeout_s=300)
    assert job["status"] == "succeeded", job["error"]
    return job


def test_a_job_without_k_chooses_it_and_predicts_new_images(
    client: TestClient, finished_k_job: dict[str, Any], shapes_zip: Path
) -> None:
    job = finished_k_job
    selection = job["k_selection"]
    assert [c["num_clusters"] for c in selection["candidates"]] == [2, 3]
    assert all("score" in c and "silhouette" in c for c in selection["candidates"])
    k = selection["chosen"]
    assert job["num_clusters"] == k and job["config"]["num_clusters"] == k
    assert job["cluster_counts"] == [k] and [r["num_clusters"] for r in job["result_sets"]] == [k]
    assert job["model_path"]
    assert client.get(f"{JOBS}/{job['id']}/clusters").json()["num_clusters"] == k

    # A zip of new images, with one file that is not an image.
    images = _shapes(shapes_zip, 3)
    upload = zip_bytes({**images, "readme.txt": b"not an image"})
    response = _predict(client, job["id"], [("new.zip", upload)])
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["num_clusters"] == k and body["merged_from"] is None
    assert [item["filename"] for item in body["items"]] == sorted(images)
    for item in body["items"]:
        assert 0 <= item["cluster"] < k and 0.0 < item["confidence"] <= 1.0
        assert isinstance(item["outlier"], bool) and item["distance"] >= -1e-6
    assert [s["path"] for s in body["skipped"]] == ["readme.txt"]
    assert body["model"]["format_version"] == 5 and "path" not in body["model"]

    # Several image files in one request, merged down to one cluster.
    files = list(images.items())[:2]
    response = _predict(client, job["id"], files, merge_to=1)
    assert response.status_code == 200, response.text
    body = response.json()
    assert [i["filename"] for i in body["items"]] == [name for name, _ in files]
    assert body["num_clusters"] == 1 and body["merged_from"] == k
    assert body["groups"] == [0] * k and {i["cluster"] for i in body["items"]} == {0}

    merged = client.get(f"{JOBS}/{job['id']}/merge", params={"merge_to": 1})
    assert merged.status_code == 200, merged.text
    assert merged.json()["clusters"] == [{"index": 0, "members": list(range(k)), "size": 36}]

    # What cannot work is a 4xx with a message (one real job serves all of these checks).
    job_id = job["id"]
    missing_head = _predict(client, job_id, [("a.png", png_bytes())], num_clusters=7)
    assert missing_head.status_code == 404 and f"available: [{k}]" in missing_head.text
    too_many = _predict(client, job_id, [("a.png", png_bytes())], merge_to=k + 1)
    assert too_many.status_code == 422
    nothing_usable = _predict(client, job_id, [("a.txt", b"hello")])
    assert nothing_usable.status_code == 422 and "a.txt" in nothing_usable.text
    no_file = client.post(f"{JOBS}/{job_id}/predict", files={"other": ("o.png", png_bytes())})
    assert no_file.status_code == 422 and "'file'" in no_file.text
    not_multipart = client.post(f"{JOBS}/{job_id}/predict", json={"images": []})
    assert not_multipart.status_code == 415
    assert _predict(client, "no-such-job", [("a.png", png_bytes())]).status_code == 404
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("big.png", b"\0" * (64 * 1024 * 1024))  # 64 MiB of zeros: ratio ~1000
    bomb = _predict(client, job_id, [("bomb.zip", buffer.getvalue())])
    assert bomb.status_code == 413 and "ratio" in bomb.text


def test_a_job_without_a_stored_model_is_409(
    client: TestClient, dataset: dict[str, Any], make_job: Any
) -> None:
    for fields in (
        {"status": "succeeded"},  # finished before models were kept
        {"status": "succeeded", "model_path": "jobs/gone/work/model.pt"},  # file removed
        {"status": "running"},
        {"status": "failed", "error": "boom"},
    ):
        job_id = make_job(dataset["id"], **fields)
        response = _predict(client, job_id, [("a.png", png_bytes())])
        assert response.status_code == 409, (fields, response.text)
        detail = response.json()["detail"]
        if fields["status"] == "succeeded":
            assert "no stored model" in detail
        else:
            assert f"is {fields['status']}" in detail
        assert client.get(f"{JOBS}/{job_id}/merge", params={"merge_to": 2}).status_code == 409


def test_k_or_a_range_is_validated(client: TestClient, dataset: dict[str, Any]) -> None:
    for body, message in (
        ({"num_clusters": 3, "num_clusters_range": [2, 4]}, "not both"),
        ({"num_clusters_range": [5, 3]}, "2 <= low <= high"),
        ({"num_clusters_range": [2, 40]}, "exceed the 36 images"),
        ({"num_clusters_range": [2, 4], "overrides": {"num_clusters_range": [2, 3]}}, "own field"),
    ):
        response = client.post(JOBS, json={"dataset_id": dataset["id"], **body})
        assert response.status_code == 422, body
        assert message in response.text, (body, response.text)
