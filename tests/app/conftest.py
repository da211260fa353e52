"""Fixtures for the API tests: an embedded service (SQLite, in-process worker) per test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.service_support import insert_job, upload_zip, use_settings


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh DATA_DIR with the embedded defaults (SQLite inside it)."""
    root = tmp_path / "data"
    use_settings(
        monkeypatch, DATA_DIR=str(root), PROGRESS_INTERVAL_S="0", CANCEL_CHECK_INTERVAL_S="0"
    )
    return root


@pytest.fixture
def client(data_dir: Path) -> Iterator[TestClient]:
    from app.main import create_app

    with TestClient(create_app()) as test_client:
        yield test_client


@pytest.fixture(scope="session")
def shapes_zip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 classes x 12 small images, png and jpg, in class folders."""
    from scan_engine.sample_data import make_shapes_zip

    return make_shapes_zip(
        tmp_path_factory.mktemp("zips") / "shapes.zip", classes=3, per_class=12, image_size=32
    )


@pytest.fixture
def dataset(client: TestClient, shapes_zip: Path) -> dict[str, Any]:
    response = upload_zip(client, shapes_zip.read_bytes(), labels_from_folders="true")
    assert response.status_code == 201, response.text
    return response.json()


@pytest.fixture
def make_job(data_dir: Path) -> Any:
    """Insert a job row directly (not dispatched): for states a real run would pass through.

    A "running" job holds a live lease of a worker elsewhere unless the fields say otherwise
    (lease_expires_at in the past: its worker died).
    """
    from datetime import UTC, datetime, timedelta

    from app.db.models import LOCAL_OWNER_ID
    from scan_engine.config import make_config

    def make(dataset_id: str, status: str = "queued", num_clusters: int = 3, **fields: Any) -> str:
        config = make_config("tiny", num_clusters=num_clusters)
        lease: dict[str, Any] = {}
        if status == "running":
            lease = {
                "lease_owner": "elsewhere:1:test",
                "lease_expires_at": datetime.now(UTC) + timedelta(hours=1),
            }
        values: dict[str, Any] = lease | {
            "owner_id": LOCAL_OWNER_ID,
            "dataset_id": dataset_id,
            "status": status,
            "num_clusters": num_clusters,
            "overcluster": None,
            "cluster_counts": config.cluster_counts(),
            "preset": "tiny",
            "overrides": {},
            "config": config.to_json_dict(),
        }
        return insert_job(values | fields)

    return make


@pytest.fixture
def empty_hub_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No Hugging Face hub cache and no torch.hub checkpoints: only bundled weights and the
    models folder count, whatever this machine has downloaded before."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    return tmp_path
