"""Result endpoints over results stored by app.runner.results.save_results (real engine
result objects)."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from tests.service_support import png_bytes, upload_zip, zip_bytes

JOBS = "/api/v1/jobs"


def _clustering(num_clusters: int, n: int, empty: int | None = None) -> Any:
    from scan_engine.results import ClusteringResult, ClusterSummary

    used = [c for c in range(num_clusters) if c != empty]
    assignments = np.array([used[i % len(used)] for i in range(n)], dtype=np.int64)  # (N,)
    confidence = np.linspace(0.5, 1.0, n, dtype=np.float32)  # (N,)
    clusters = []
    for c in range(num_clusters):
        members = np.flatnonzero(assignments == c)
        order = members[np.argsort(-confidence[members])]
        clusters.append(
            ClusterSummary(
                index=c,
                size=len(members),
                mean_confidence=float(confidence[members].mean()) if len(members) else 0.0,
                prototype=int(order[0]) if len(members) else None,
                top_members=[int(i) for i in order[:3]],
            )
        )
    return ClusteringResult(
        num_clusters=num_clusters,
        assignments=assignments,
        confidence=confidence,
        clusters=clusters,
        head=1,
        stage="selflabel",
        metrics={"acc": np.float64(0.75)},
    )


@pytest.fixture
def finished_job(client: TestClient, dataset: dict[str, Any], make_job: Any) -> dict[str, Any]:
    """A succeeded job with result sets for C = 3 and C = 5 (cluster 4 of C = 5 empty)."""
    from app.core.config import get_settings
    from app.db.session import get_sessionmaker
    from app.runner.results import save_results
    from app.storage import object_store
    from scan_engine.results import PipelineResult

    job_id = make_job(dataset["id"], status="running", num_clusters=3)
    images = client.get(f"/api/v1/datasets/{dataset['id']}/images", params={"limit": 100}).json()
    # Engine order deliberately differs from upload order: results map back by image id.
    ids = [item["id"] for item in reversed(images["items"])]
    result = PipelineResult(
        results=[_clustering(3, len(ids)), _clustering(5, len(ids), empty=4)],
        timings={"pretext": 1.5, "scan": 2.0},
        throughput={"pretext": 100.0},
        metrics={"kmeans_acc": np.float32(0.5)},
        notes=["a note"],
        report={},
        embedding_2d=np.arange(2 * len(ids), dtype=np.float32).reshape(-1, 2),  # (N, 2)
    )
    status = save_results(get_sessionmaker(), job_id, ids, result, object_store(get_settings()))
    assert status == "succeeded"
    return {"id": job_id, "ids": ids, "dataset": dataset}


def test_job_reports_result_sets(client: TestClient, finished_job: dict[str, Any]) -> None:
    job = client.get(f"{JOBS}/{finished_job['id']}").json()
    assert job["status"] == "succeeded" and job["progress"] == 1.0
    assert job["timings"] == {"pretext": 1.5, "scan": 2.0}
    assert job["metrics"] == {"kmeans_acc": 0.5} and job["notes"] == ["a note"]
    assert [(r["num_clusters"], r["cluster_count"]) for r in job["result_sets"]] == [(3, 3), (5, 4)]
    assert job["result_sets"][0]["metrics"] == {"acc": 0.75}
    # The engine's report said nothing about its route: nothing is made up.
    assert job["run_report"] is None and job["features_from_cache"] is None


def test_the_route_the_engine_reports_is_kept_with_the_job(
    client: TestClient, dataset: dict[str, Any], make_job: Any
) -> None:
    from app.core.config import get_settings
    from app.db.session import get_sessionmaker
    from app.runner.results import save_results
    from app.storage import object_store
    from scan_engine.results import PipelineResult

    job_id = make_job(
        dataset["id"], status="running", num_clusters=3, backbone="efficientnet_lite0"
    )
    images = client.get(f"/api/v1/datasets/{dataset['id']}/images", params={"limit": 100}).json()
    ids = [item["id"] for item in images["items"]]
    report = {  # the shape scan_engine.pipeline reports
        "route": "pretrained",
        "backbone": {
            "name": "efficientnet_lite0",
            "weights_sha256": "ab" * 32,
            "weights_source": "package",
            "image_size": np.int64(224),  # engine numbers come back as plain JSON
            "from_cache": True,
            "images_per_s": None,
        },
        "timings_s": {"mine": 0.1},  # the rest of the report stays in report.json
    }
    result = PipelineResult([_clustering(3, len(ids))], {}, {}, {}, [], report)
    save_results(get_sessionmaker(), job_id, ids, result, object_store(get_settings()))
    job = client.get(f"{JOBS}/{job_id}").json()
    assert job["run_report"] == {
        "route": "pretrained",
        "backbone": "efficientnet_lite0",
        "image_size": 224,
        "features_from_cache": True,
        "weights_sha256": "ab" * 32,
        "weights_source": "package",
    }
    assert (job["route"], job["backbone"], job["image_size"], job["features_from_cache"]) == (
        "pretrained",
        "efficientnet_lite0",
        224,
        True,
    )


def test_the_2d_map_is_stored_in_image_position_order(finished_job: dict[str, Any]) -> None:
    from app.core.config import get_settings
    from app.maps import load_embedding
    from app.storage import object_store

    stored = load_embedding(object_store(get_settings()), finished_job["id"])
    assert stored is not None and stored.shape == (36, 2)
    # Engine row i is the image at position 35 - i (the fixture reversed the upload order).
    assert stored[35].tolist() == [0.0, 1.0] and stored[0].tolist() == [70.0, 71.0]


def test_assignments_pages_cover_every_image_once(
    client: TestClient, finished_job: dict[str, Any]
) -> None:
    seen: list[str] = []
    offset = 0
    while True:
        page = client.get(
            f"{JOBS}/{finished_job['id']}/assignments", params={"offset": offset, "limit": 10}
        ).json()
        assert page["total"] == 36 and page["num_clusters"] == 3
        if not page["items"]:
            break
        seen += [item["image_id"] for item in page["items"]]
        offset += 10
    assert sorted(seen) == sorted(finished_job["ids"]) and len(set(seen)) == 36
    first = client.get(f"{JOBS}/{finished_job['id']}/assignments", params={"limit": 1}).json()
    item = first["items"][0]
    # Upload order: position 0 is the first zip path; it was the engine's last row.
    assert item["image_id"] == finished_job["ids"][-1] and "/" in item["filename"]
    assert item["cluster"] == (35 % 3) and item["confidence"] == pytest.approx(1.0)

    only = client.get(
        f"{JOBS}/{finished_job['id']}/assignments", params={"num_clusters": 5, "cluster": 1}
    ).json()
    assert only["total"] == 9 and {i["cluster"] for i in only["items"]} == {1}


@pytest.mark.parametrize("how", ["query", "accept"])
def test_assignments_csv_has_every_image_once(
    client: TestClient, finished_job: dict[str, Any], how: str
) -> None:
    url = f"{JOBS}/{finished_job['id']}/assignments"
    if how == "query":
        response = client.get(url, params={"format": "csv", "num_clusters": 5})
    else:
        response = client.get(url, params={"num_clusters": 5}, headers={"Accept": "text/csv"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/csv")
    assert "attachment" in response.headers["content-disposition"]
    rows = list(csv.DictReader(io.StringIO(response.text)))
    assert len(rows) == 36 and {r["image_id"] for r in rows} == set(finished_job["ids"])
    assert {int(r["cluster"]) for r in rows} == {0, 1, 2, 3}


def test_clusters_and_prototypes(client: TestClient, finished_job: dict[str, Any]) -> None:
    body = client.get(f"{JOBS}/{finished_job['id']}/clusters").json()
    assert body["num_clusters"] == 3 and body["head"] == 1 and body["stage"] == "selflabel"
    assert [c["index"] for c in body["clusters"]] == [0, 1, 2]
    assert sum(c["size"] for c in body["clusters"]) == 36
    for cluster in body["clusters"]:
        assert cluster["prototype_image_id"] in finished_job["ids"]
        assert len(cluster["top_members"]) == 3
        response = client.get(f"{JOBS}/{finished_job['id']}/clusters/{cluster['index']}/prototype")
        assert response.status_code == 200
        assert response.headers["content-type"] in ("image/png", "image/jpeg")
        Image.open(io.BytesIO(response.content)).load()

    five = client.get(f"{JOBS}/{finished_job['id']}/clusters", params={"num_clusters": 5}).json()
    assert five["clusters"][4]["size"] == 0 and five["clusters"][4]["prototype_image_id"] is None
    empty = client.get(
        f"{JOBS}/{finished_job['id']}/clusters/4/prototype", params={"num_clusters": 5}
    )
    assert empty.status_code == 404 and "empty" in empty.json()["detail"]
    missing = client.get(f"{JOBS}/{finished_job['id']}/clusters/9/prototype")
    assert missing.status_code == 404 and "cluster 9 not found" in missing.json()["detail"]


def test_unknown_cluster_count_is_404_listing_the_available(
    client: TestClient, finished_job: dict[str, Any]
) -> None:
    for path in ("assignments", "clusters", "clusters/0/prototype"):
        response = client.get(f"{JOBS}/{finished_job['id']}/{path}", params={"num_clusters": 4})
        assert response.status_code == 404
        assert "available: [3, 5]" in response.json()["detail"]


def test_prototype_in_an_odd_format_is_served_as_png(client: TestClient, make_job: Any) -> None:
    from app.core.config import get_settings
    from app.db.session import get_sessionmaker
    from app.runner.results import save_results
    from app.storage import object_store
    from scan_engine.results import PipelineResult

    buffer = io.BytesIO()
    Image.new("RGB", (20, 20), (10, 200, 10)).save(buffer, format="BMP")
    dataset = upload_zip(
        client, zip_bytes({"a.bmp": buffer.getvalue(), "b.png": png_bytes()})
    ).json()
    ids = [i["id"] for i in client.get(f"/api/v1/datasets/{dataset['id']}/images").json()["items"]]
    job_id = make_job(dataset["id"], status="running", num_clusters=2)
    result = PipelineResult([_clustering(2, 2)], {}, {}, {}, [], {})
    save_results(get_sessionmaker(), job_id, ids, result, object_store(get_settings()))
    response = client.get(f"{JOBS}/{job_id}/clusters/0/prototype")
    assert response.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(response.content)).format == "PNG"
    original = client.get(f"/api/v1/datasets/{dataset['id']}/images/{ids[0]}")
    assert original.headers["content-type"] == "image/bmp"  # originals are served as uploaded


def test_deleting_a_job_removes_its_results_and_files(
    client: TestClient, finished_job: dict[str, Any], make_job: Any, data_dir: Path
) -> None:
    job_id = finished_job["id"]
    job_folder = data_dir / "jobs" / job_id
    assert (job_folder / "embedding_2d.npy").is_file()
    running = make_job(finished_job["dataset"]["id"], status="running")
    refused = client.delete(f"{JOBS}/{running}")
    assert refused.status_code == 409 and "cancel it" in refused.json()["detail"]

    assert client.delete(f"{JOBS}/{job_id}").status_code == 204
    assert client.get(f"{JOBS}/{job_id}").status_code == 404
    assert client.get(f"{JOBS}/{job_id}/assignments").status_code == 404
    assert not job_folder.exists()
    dataset = client.get(f"/api/v1/datasets/{finished_job['dataset']['id']}")
    assert dataset.status_code == 200  # the dataset stays
    assert client.delete(f"{JOBS}/{job_id}").status_code == 404
