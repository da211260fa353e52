"""The gallery's reads (cluster members, the 2-D map) and the HTML pages, over stored results."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

JOBS = "/api/v1/jobs"


@pytest.fixture
def finished_job(client: TestClient, dataset: dict[str, Any], make_job: Any) -> dict[str, Any]:
    """A succeeded job (K = 3) over the 36-image dataset, stored by
    app.runner.results.save_results, with its map stored by app.maps.save_embedding; engine
    order = reversed upload order."""
    from app.core.config import get_settings
    from app.db.session import get_sessionmaker
    from app.maps import save_embedding
    from app.runner.results import save_results
    from app.storage import object_store
    from scan_engine.results import ClusteringResult, ClusterSummary, PipelineResult

    job_id = make_job(dataset["id"], status="running", num_clusters=3)
    images = client.get(f"/api/v1/datasets/{dataset['id']}/images", params={"limit": 100}).json()
    ids = [item["id"] for item in reversed(images["items"])]
    positions = [item["position"] for item in reversed(images["items"])]
    n = len(ids)
    rng = np.random.default_rng(0)
    assignments = np.arange(n, dtype=np.int64) % 3  # (N,)
    confidence = rng.uniform(0.3, 1.0, n).astype(np.float32)  # (N,), no ties
    clusters = []
    for c in range(3):
        members = np.flatnonzero(assignments == c)
        order = members[np.argsort(-confidence[members])]
        clusters.append(
            ClusterSummary(c, len(members), float(confidence[members].mean()), int(order[0]))
        )
    embedding = np.stack([np.arange(n), -np.arange(n)], 1).astype(np.float32)  # (N, 2)
    result = PipelineResult(
        results=[ClusteringResult(3, assignments, confidence, clusters, 0, "scan")],
        timings={},
        throughput={},
        metrics={},
        notes=[],
        report={},
        embedding_2d=embedding,
    )
    storage = object_store(get_settings())
    assert save_results(get_sessionmaker(), job_id, ids, result, storage) == "succeeded"
    save_embedding(storage, job_id, embedding, positions)
    truth = {
        image_id: {"cluster": int(a), "confidence": float(p), "x": float(e[0])}
        for image_id, a, p, e in zip(ids, assignments, confidence, embedding, strict=True)
    }
    return {"id": job_id, "ids": ids, "truth": truth, "storage": storage}


def test_members_page_through_a_cluster_most_confident_first(
    client: TestClient, finished_job: dict[str, Any]
) -> None:
    truth = finished_job["truth"]
    expected = sorted(
        (i for i, t in truth.items() if t["cluster"] == 1), key=lambda i: -truth[i]["confidence"]
    )
    seen: list[str] = []
    while True:
        page = client.get(
            f"{JOBS}/{finished_job['id']}/clusters/1/members",
            params={"offset": len(seen), "limit": 5},
        ).json()
        assert page["total"] == 12 and page["num_clusters"] == 3
        if not page["items"]:
            break
        assert {item["cluster"] for item in page["items"]} == {1}
        seen += [item["image_id"] for item in page["items"]]
    assert seen == expected


def test_members_refuse_unknown_clusters_and_unfinished_jobs(
    client: TestClient, finished_job: dict[str, Any], dataset: dict[str, Any], make_job: Any
) -> None:
    url = f"{JOBS}/{finished_job['id']}/clusters"
    assert client.get(f"{url}/3/members").status_code == 404
    assert client.get(f"{url}/0/members", params={"num_clusters": 7}).status_code == 404
    running = make_job(dataset["id"], status="running")
    assert client.get(f"{JOBS}/{running}/clusters/0/members").status_code == 409
    assert client.get(f"{JOBS}/{running}/map").status_code == 409


def test_map_lines_points_up_with_their_images(
    client: TestClient, finished_job: dict[str, Any]
) -> None:
    data = client.get(f"{JOBS}/{finished_job['id']}/map").json()
    assert data["total"] == 36 and len(data["x"]) == 36
    assert sorted(data["image_id"]) == sorted(finished_job["ids"])
    for image_id, x, y, cluster in zip(
        data["image_id"], data["x"], data["y"], data["cluster"], strict=True
    ):
        assert cluster == finished_job["truth"][image_id]["cluster"]
        assert x == finished_job["truth"][image_id]["x"] and y == -x

    sample = client.get(f"{JOBS}/{finished_job['id']}/map", params={"limit": 10}).json()
    again = client.get(f"{JOBS}/{finished_job['id']}/map", params={"limit": 10}).json()
    assert sample["total"] == 36 and len(sample["x"]) == 10 and sample == again


def test_map_missing_or_mismatched_is_a_404(
    client: TestClient, finished_job: dict[str, Any]
) -> None:
    from app.maps import embedding_relpath

    path = finished_job["storage"].path_of(embedding_relpath(finished_job["id"]))
    np.save(path, np.zeros((5, 2), dtype=np.float32))
    response = client.get(f"{JOBS}/{finished_job['id']}/map")
    assert response.status_code == 404 and "does not match" in response.json()["detail"]
    path.unlink()
    response = client.get(f"{JOBS}/{finished_job['id']}/map")
    assert response.status_code == 404 and "no stored 2-D map" in response.json()["detail"]


def test_pages_render(client: TestClient, finished_job: dict[str, Any]) -> None:
    home = client.get("/")
    assert home.status_code == 200 and "text/html" in home.headers["content-type"]
    assert '<option value="tiny"' in home.text and "/static/index.js" in home.text
    job = client.get(f"/jobs/{finished_job['id']}")
    assert job.status_code == 200 and f'data-job-id="{finished_job["id"]}"' in job.text
    gallery = client.get(f"/jobs/{finished_job['id']}/gallery")
    assert gallery.status_code == 200 and "/static/gallery.js" in gallery.text
    missing = client.get("/jobs/no-such-job/gallery")
    assert missing.status_code == 404 and "Not found" in missing.text
    for name in ("app.css", "common.js", "index.js", "job.js", "gallery.js"):
        assert client.get(f"/static/{name}").status_code == 200
    assert "/jobs/{job_id}/map" in str(client.get("/openapi.json").json()["paths"])
