"""Creating, listing and cancelling jobs; bad parameters are 422 with a message, bad ids 404."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

JOBS = "/api/v1/jobs"


def _job(client: TestClient, job_id: str) -> dict[str, Any]:
    response = client.get(f"{JOBS}/{job_id}")
    assert response.status_code == 200
    return response.json()


def test_create_job_commits_then_queues(
    client: TestClient, dataset: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from sqlalchemy import select

    from app.db.models import Job
    from app.db.session import get_sessionmaker

    dispatcher = client.app.state.dispatcher  # type: ignore[attr-defined]
    real_enqueue = dispatcher.enqueue
    seen_at_enqueue: list[tuple[str, str | None]] = []

    def enqueue(job_id: str) -> None:
        # A session of its own (another connection): it sees the row only once committed.
        with get_sessionmaker()() as other:
            status = other.scalar(select(Job.status).where(Job.id == job_id))
        seen_at_enqueue.append((job_id, status))
        real_enqueue(job_id)  # and on to the real embedded worker

    monkeypatch.setattr(dispatcher, "enqueue", enqueue)
    response = client.post(
        JOBS,
        json={
            "dataset_id": dataset["id"],
            "num_clusters": 3,
            "overcluster": [5, 6],
            "preset": "tiny",
            "overrides": {"pretext": {"epochs": 1}, "scan": {"epochs": 1}},
        },
    )
    assert response.status_code == 202, response.text
    job = response.json()
    assert seen_at_enqueue == [(job["id"], "queued")]  # committed before it was enqueued, once
    assert response.headers["location"] == f"{JOBS}/{job['id']}"
    assert job["status"] in ("queued", "running")  # just handed to the worker
    assert job["cluster_counts"] == [3, 5, 6]
    assert job["config"]["pretext"]["epochs"] == 1 and job["config"]["preset"] == "tiny"
    assert job["overrides"] == {"pretext": {"epochs": 1}, "scan": {"epochs": 1}}
    client.post(f"{JOBS}/{job['id']}/cancel")  # keep the embedded worker idle

    listed = client.get(JOBS, params={"dataset_id": dataset["id"]}).json()
    assert listed["total"] == 1 and listed["items"][0]["id"] == job["id"]
    assert client.get(JOBS, params={"dataset_id": "other"}).json()["total"] == 0


def test_default_preset_and_factor(client: TestClient, dataset: dict[str, Any]) -> None:
    response = client.post(
        JOBS, json={"dataset_id": dataset["id"], "num_clusters": 4, "overcluster": 2}
    )
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["preset"] == "pretrained" and job["cluster_counts"] == [4, 8]
    assert (job["route"], job["backbone"], job["image_size"]) == (
        "pretrained",
        "efficientnet_lite0",
        224,
    )
    assert job["features_from_cache"] is None  # not run yet
    client.post(f"{JOBS}/{job['id']}/cancel")


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"num_clusters": 1}, "greater than or equal to 2"),
        ({"num_clusters": 37}, "exceed the 36 images"),
        ({"num_clusters": 3, "overcluster": [4, 40]}, "[40] exceed"),
        ({"num_clusters": 20, "overcluster": 2}, "[40] exceed"),
        ({"num_clusters": 3, "overcluster": 0.5}, "overcluster factor must be >= 1"),
        ({"num_clusters": 3, "overcluster": [1]}, ">= 2"),
        ({"num_clusters": 3, "preset": "huge"}, "unknown preset 'huge'"),
        ({"num_clusters": 3, "overrides": {"scan": {"epoch": 3}}}, "scan.epoch"),
        ({"num_clusters": 3, "overrides": {"pretext": {"lr": -1}}}, "pretext.lr"),
        ({"num_clusters": 3, "overrides": {"num_clusters": 4}}, "own field"),
        ({"num_clusters": 3, "overrides": {"backbone_weights": "/etc/passwd"}}, "models folder"),
        (
            {"num_clusters": 3, "overrides": {"pretrained_backbone": "dinov2_vits14"}},
            "set backbone with its own field",
        ),
        ({"num_clusters": 3, "overrides": {"models_dir": "/"}}, "models_dir belong to the server"),
        ({"num_clusters": 3, "backbone": "resnet9000"}, "unknown backbone 'resnet9000'; known:"),
        (
            {"num_clusters": 3, "preset": "tiny", "backbone": "efficientnet_lite0"},
            "preset 'tiny' trains its own features from scratch",
        ),
        (
            # A convolutional backbone runs at any size asked (test_config: a ViT refuses).
            {"num_clusters": 3, "overrides": {"image_size": 4}},
            "image_size",
        ),
        ({"num_clusters": 3, "colour": "blue"}, "colour"),
        ({"num_clusters": "three"}, "num_clusters"),
    ],
)
def test_bad_job_parameters_are_422_with_a_message(
    client: TestClient, dataset: dict[str, Any], body: dict[str, Any], words: str
) -> None:
    response = client.post(JOBS, json={"dataset_id": dataset["id"], **body})
    assert response.status_code == 422, response.text
    assert words in str(response.json()["detail"])
    assert client.get(JOBS).json()["total"] == 0  # nothing recorded


def test_backbone_without_weights_is_422_naming_scan_weights(
    client: TestClient, dataset: dict[str, Any], empty_hub_caches: Path
) -> None:
    response = client.post(
        JOBS, json={"dataset_id": dataset["id"], "num_clusters": 3, "backbone": "dinov2_vits14"}
    )
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert "'dinov2_vits14' has no weights" in detail
    assert "scan-weights import dinov2_vits14 /path/to/dinov2_vits14_pretrain.pth" in detail
    assert "scan-weights fetch dinov2_vits14" in detail
    assert client.get(JOBS).json()["total"] == 0


def test_job_row_stores_the_backbone(
    client: TestClient, dataset: dict[str, Any], data_dir: Path
) -> None:
    from sqlalchemy import select

    from app.db.models import Job
    from app.db.session import get_sessionmaker

    chosen = client.post(
        JOBS,
        json={"dataset_id": dataset["id"], "num_clusters": 3, "backbone": "efficientnet_lite0"},
    )
    scratch = client.post(
        JOBS, json={"dataset_id": dataset["id"], "num_clusters": 3, "preset": "cpu"}
    )
    assert chosen.status_code == scratch.status_code == 202, (chosen.text, scratch.text)
    for response in (chosen, scratch):
        client.post(f"{JOBS}/{response.json()['id']}/cancel")
    with get_sessionmaker()() as other:
        rows = dict(other.execute(select(Job.id, Job.backbone)).all())
        config = other.scalar(select(Job.config).where(Job.id == chosen.json()["id"]))
    assert rows == {chosen.json()["id"]: "efficientnet_lite0", scratch.json()["id"]: None}
    assert config["pretrained_backbone"] == "efficientnet_lite0" and config["image_size"] == 224
    assert config["models_dir"] is None  # this server's folders are the worker's business
    public = scratch.json()
    assert (public["route"], public["backbone"], public["image_size"]) == ("scratch", None, 32)


def test_backbone_weights_from_the_models_folder(
    client: TestClient, dataset: dict[str, Any], data_dir: Path
) -> None:
    (data_dir / "models").mkdir()
    (data_dir / "models" / "resnet18.pt").write_bytes(b"weights")
    response = client.post(
        JOBS,
        json={
            "dataset_id": dataset["id"],
            "num_clusters": 3,
            "preset": "cpu",
            "overrides": {"backbone_weights": "resnet18.pt"},
        },
    )
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["overrides"]["backbone_weights"] == str(data_dir / "models" / "resnet18.pt")
    client.post(f"{JOBS}/{job['id']}/cancel")


def test_unknown_ids_are_404(client: TestClient) -> None:
    missing_dataset = client.post(JOBS, json={"dataset_id": "nope", "num_clusters": 3})
    assert missing_dataset.status_code == 404 and "dataset nope" in missing_dataset.json()["detail"]
    for method, path in [
        ("GET", f"{JOBS}/nope"),
        ("POST", f"{JOBS}/nope/cancel"),
        ("GET", f"{JOBS}/nope/assignments"),
        ("GET", f"{JOBS}/nope/clusters"),
        ("GET", f"{JOBS}/nope/clusters/0/prototype"),
    ]:
        response = client.request(method, path)
        assert response.status_code == 404, path
        assert response.json()["detail"] == "job nope not found"


def test_cancel_queued_job_is_immediate_and_idempotent(
    client: TestClient, dataset: dict[str, Any], make_job: Any
) -> None:
    job_id = make_job(dataset["id"], status="queued")
    first = client.post(f"{JOBS}/{job_id}/cancel")
    assert first.status_code == 200
    assert first.json()["status"] == "cancelled" and first.json()["finished_at"] is not None
    again = client.post(f"{JOBS}/{job_id}/cancel")
    assert again.status_code == 200 and again.json()["status"] == "cancelled"


def test_cancel_running_job_sets_the_flag(
    client: TestClient, dataset: dict[str, Any], make_job: Any
) -> None:
    job_id = make_job(dataset["id"], status="running")
    for _ in range(2):
        response = client.post(f"{JOBS}/{job_id}/cancel")
        assert response.status_code == 202
        assert response.json()["status"] == "running" and response.json()["cancel_requested"]


@pytest.mark.parametrize("status", ["succeeded", "failed"])
def test_cancel_finished_job_is_409(
    client: TestClient, dataset: dict[str, Any], make_job: Any, status: str
) -> None:
    job_id = make_job(dataset["id"], status=status)
    response = client.post(f"{JOBS}/{job_id}/cancel")
    assert response.status_code == 409
    assert f"already {status}" in response.json()["detail"]
    assert _job(client, job_id)["status"] == status


def test_results_of_unfinished_job_are_409(
    client: TestClient, dataset: dict[str, Any], make_job: Any
) -> None:
    job_id = make_job(dataset["id"], status="running")
    for path in ("assignments", "clusters", "clusters/0/prototype"):
        response = client.get(f"{JOBS}/{job_id}/{path}")
        assert response.status_code == 409 and "is running" in response.json()["detail"]


def test_list_jobs_filters_by_status(
    client: TestClient, dataset: dict[str, Any], make_job: Any
) -> None:
    queued = make_job(dataset["id"], status="queued")
    make_job(dataset["id"], status="failed", error="boom")
    listed = client.get(JOBS, params={"status": "queued"}).json()
    assert [j["id"] for j in listed["items"]] == [queued]
    assert client.get(JOBS).json()["total"] == 2
    assert client.get(JOBS, params={"status": "weird"}).status_code == 422
