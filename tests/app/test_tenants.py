"""Tenants: API keys (hashed at rest, made by `scan-admin`), owners' data kept apart (another
owner's ids are 404 in the API and the pages), per-owner limits on jobs (429) and storage (413).

The service runs in its production shape for jobs (Celery runner, Redis db 11, no worker: jobs
stay queued), so the default auth mode is api_keys.
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from tests.service_support import (
    create_api_key,
    files_under,
    png_bytes,
    redis_test_settings,
    redis_test_url,
    upload_zip,
    zip_bytes,
)

REPO = Path(__file__).resolve().parents[2]
JOBS = "/api/v1/jobs"
TINY = {"preset": "tiny", "overrides": {"pretext": {"epochs": 1}}}


def _noise_png(side: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def tenant_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    env = {
        "DATA_DIR": str(tmp_path / "data"),
        "CELERY_BROKER_URL": redis_test_url(),
        "MAX_CONCURRENT_JOBS_PER_OWNER": "2",
        "MAX_STORAGE_BYTES_PER_OWNER": "7000",
    }
    with redis_test_settings(monkeypatch, **env):
        yield env


@pytest.fixture
def service(tenant_env: dict[str, str]) -> Iterator[TestClient]:
    from app.main import create_app

    with TestClient(create_app()) as client:
        yield client


def _as(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _finish_with_results(job_id: str, image_ids: list[str]) -> None:
    """Store a clustering for a queued job as a worker would (K = 2, every image assigned)."""
    from sqlalchemy import update

    from app.core.config import get_settings
    from app.db.models import Job
    from app.db.session import get_sessionmaker, session_scope
    from app.runner.results import save_results
    from app.storage import object_store
    from scan_engine.results import ClusteringResult, ClusterSummary, PipelineResult

    with session_scope() as session:
        session.execute(update(Job).where(Job.id == job_id).values(status="running"))
    n = len(image_ids)
    assignments = np.arange(n, dtype=np.int64) % 2  # (N,)
    confidence = np.full(n, 0.9, dtype=np.float32)  # (N,)
    clusters = [ClusterSummary(c, int((assignments == c).sum()), 0.9, c, [c]) for c in range(2)]
    result = PipelineResult(
        results=[ClusteringResult(2, assignments, confidence, clusters, 0, "scan")],
        timings={},
        throughput={},
        metrics={},
        notes=[],
        report={},
        embedding_2d=np.zeros((n, 2), dtype=np.float32),
    )
    storage = object_store(get_settings())
    assert save_results(get_sessionmaker(), job_id, image_ids, result, storage) == "succeeded"


def test_requests_need_a_valid_key(service: TestClient) -> None:
    from app.admin import main as admin

    for path in ("/api/v1/datasets", JOBS, "/api/v1/jobs/abc/clusters"):
        response = service.get(path)
        assert response.status_code == 401, path
        assert "API key is required" in response.json()["detail"]
        assert response.headers["www-authenticate"] == "Bearer"
    page = service.get("/jobs/abc", follow_redirects=False)  # a person is sent to sign in
    assert page.status_code == 303 and page.headers["location"] == "/sign-in?next=%2Fjobs%2Fabc"
    for bad in ("nonsense", "scan_000000000000_guess", "Bearer", ""):
        response = service.get("/api/v1/datasets", headers={"X-API-Key": bad})
        assert response.status_code == 401, bad
    key = create_api_key("alice")
    assert service.get("/api/v1/datasets", headers=_as(key)).status_code == 200
    assert service.get("/api/v1/datasets", headers={"X-API-Key": key}).status_code == 200
    assert (
        service.get("/api/v1/datasets", headers={"Authorization": "Basic " + key}).status_code
        == 401
    )
    assert service.get("/healthz").status_code == 200  # operators' endpoints stay open
    prefix = key.split("_")[1]
    assert admin(["revoke-key", prefix]) == 0
    response = service.get("/api/v1/datasets", headers=_as(key))
    assert response.status_code == 401 and "revoked" in response.json()["detail"]
    assert admin(["revoke-key", prefix]) == 1  # twice: nothing left to revoke


def test_admin_command_makes_hashed_keys(
    service: TestClient, tenant_env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    from sqlalchemy import select

    from app.admin import main as admin
    from app.db.models import ApiKey, Owner
    from app.db.session import session_scope

    env = {**os.environ, **tenant_env, "PYTHONPATH": str(REPO)}
    created = subprocess.run(
        [sys.executable, "-m", "app.admin", "create-key", "--owner", "carol", "--name", "ci"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    key = created.stdout.strip()
    assert key.startswith("scan_") and "shown only this once" in created.stderr
    assert service.get("/api/v1/datasets", headers=_as(key)).status_code == 200
    with session_scope() as session:
        row = session.execute(
            select(ApiKey, Owner.name).join(Owner, Owner.id == ApiKey.owner_id)
        ).one()
        stored = [str(value) for value in vars(row[0]).values()]
        assert row[1] == "carol" and row[0].name == "ci"
        assert row[0].key_hash == hashlib.sha256(key.encode()).hexdigest()
        assert not any(key in value or key.split("_", 2)[2] in value for value in stored)
    assert admin(["list-keys"]) == 0
    listing = capsys.readouterr().out
    assert key.split("_")[1] in listing and "carol" in listing and key not in listing


def test_owners_see_only_their_own_data(service: TestClient) -> None:
    alice, bob = create_api_key("alice"), create_api_key("bob")
    payload = zip_bytes({"a.png": png_bytes(), "b.png": png_bytes(colour=(0, 9, 0))})
    dataset = upload_zip(service, payload, headers=_as(alice)).json()
    images = service.get(f"/api/v1/datasets/{dataset['id']}/images", headers=_as(alice)).json()
    image_ids = [item["id"] for item in images["items"]]
    job = service.post(
        JOBS, json={"dataset_id": dataset["id"], "num_clusters": 2, **TINY}, headers=_as(alice)
    ).json()
    assert job["status"] == "queued"
    _finish_with_results(job["id"], image_ids)
    job_id = job["id"]

    mine = [
        ("GET", f"/api/v1/datasets/{dataset['id']}"),
        ("GET", f"/api/v1/datasets/{dataset['id']}/images"),
        ("GET", f"/api/v1/datasets/{dataset['id']}/images/{image_ids[0]}"),
        ("GET", f"/api/v1/datasets/{dataset['id']}/images/{image_ids[0]}?thumbnail=true"),
        ("GET", f"{JOBS}/{job_id}"),
        ("GET", f"{JOBS}/{job_id}/assignments"),
        ("GET", f"{JOBS}/{job_id}/assignments?format=csv"),
        ("GET", f"{JOBS}/{job_id}/clusters"),
        ("GET", f"{JOBS}/{job_id}/clusters/0/prototype"),
        ("GET", f"{JOBS}/{job_id}/clusters/0/members"),
        ("GET", f"{JOBS}/{job_id}/map"),
        ("GET", f"/jobs/{job_id}"),
        ("GET", f"/jobs/{job_id}/gallery"),
    ]
    for method, path in mine:
        assert service.request(method, path, headers=_as(alice)).status_code == 200, path
        response = service.request(method, path, headers=_as(bob))
        assert response.status_code == 404, path
        if path.startswith("/api"):
            assert "not found" in response.json()["detail"], path
    cancel = service.post(f"{JOBS}/{job_id}/cancel", headers=_as(bob))
    assert cancel.status_code == 404
    stolen = service.post(
        JOBS, json={"dataset_id": dataset["id"], "num_clusters": 2}, headers=_as(bob)
    )
    assert stolen.status_code == 404 and "not found" in stolen.json()["detail"]
    for path in ("/api/v1/datasets", JOBS, f"{JOBS}?dataset_id={dataset['id']}"):
        assert service.get(path, headers=_as(bob)).json()["total"] == 0, path
        assert service.get(path, headers=_as(alice)).json()["total"] == 1, path
    # The same zip from another owner is that owner's own dataset, not a link to alice's.
    again = upload_zip(service, payload, headers=_as(bob))
    assert again.status_code == 201 and again.json()["id"] != dataset["id"]
    assert service.get(f"{JOBS}/{job_id}", headers=_as(alice)).json()["status"] == "succeeded"


def test_per_owner_job_and_storage_limits(service: TestClient, tenant_env: dict[str, str]) -> None:
    alice, bob = create_api_key("alice"), create_api_key("bob")
    small = zip_bytes({"a.png": _noise_png(20, 0), "b.png": _noise_png(20, 1)})  # ~2.5 kB
    dataset = upload_zip(service, small, headers=_as(alice)).json()
    body = {"dataset_id": dataset["id"], "num_clusters": 2, **TINY}
    first = service.post(JOBS, json=body, headers=_as(alice))
    second = service.post(JOBS, json=body, headers=_as(alice))
    assert first.status_code == second.status_code == 202
    third = service.post(JOBS, json=body, headers=_as(alice))
    assert third.status_code == 429 and "MAX_CONCURRENT_JOBS_PER_OWNER" in third.json()["detail"]
    assert third.headers["retry-after"]
    assert service.get(JOBS, headers=_as(alice)).json()["total"] == 2  # nothing recorded
    service.post(f"{JOBS}/{first.json()['id']}/cancel", headers=_as(alice))
    assert service.post(JOBS, json=body, headers=_as(alice)).status_code == 202

    # Storage: 7000 bytes per owner. A 2nd upload that would pass it is refused, whole.
    big = zip_bytes({"c.png": _noise_png(40, 2), "d.png": _noise_png(20, 3)})  # ~6.4 kB more
    before = files_under(Path(tenant_env["DATA_DIR"]) / "datasets")
    refused = upload_zip(service, big, headers=_as(alice))
    assert refused.status_code == 413, refused.text
    assert "storage limit" in refused.json()["detail"]
    assert service.get("/api/v1/datasets", headers=_as(alice)).json()["total"] == 1
    assert files_under(Path(tenant_env["DATA_DIR"]) / "datasets") == before
    assert files_under(Path(tenant_env["DATA_DIR"]) / "tmp") == []
    assert upload_zip(service, big, headers=_as(bob)).status_code == 201  # bob's own room
