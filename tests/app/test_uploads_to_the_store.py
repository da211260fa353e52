"""Uploads on the S3 backend (a real SeaweedFS): the images and thumbnails go to the store under
the dataset's prefix, the rows hold their keys, nothing stays on the API's disk; a store that
is down refuses the upload with 503 and Retry-After and leaves no row and no object."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.seaweedfs import SeaweedFS
from tests.service_support import files_under, upload_zip, use_settings


@pytest.fixture
def s3_client(
    seaweedfs: SeaweedFS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[TestClient]:
    from app.main import create_app

    prefix = f"t-{tmp_path.name[-20:]}/".replace("_", "-")
    use_settings(
        monkeypatch, DATA_DIR=str(tmp_path / "data"), S3_PREFIX=prefix, **seaweedfs.settings_env()
    )
    with TestClient(create_app()) as client:
        yield client


def _keys(server: SeaweedFS, prefix: str) -> set[str]:
    client = server.client()
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=server.bucket, Prefix=prefix)
    return {item["Key"][len(prefix) :] for page in pages for item in page.get("Contents", [])}


def test_an_upload_is_stored_under_the_datasets_prefix(
    s3_client: TestClient, seaweedfs: SeaweedFS, shapes_zip: Path, tmp_path: Path
) -> None:
    from app.core.config import get_settings
    from app.db.models import Image
    from app.db.session import session_scope

    response = upload_zip(s3_client, shapes_zip.read_bytes(), labels_from_folders="true")
    assert response.status_code == 201, response.text
    dataset = response.json()
    with session_scope() as session:
        rows = session.query(Image).filter_by(dataset_id=dataset["id"]).all()
    stored = _keys(seaweedfs, get_settings().S3_PREFIX)
    expected = {row.stored_path for row in rows} | {row.thumbnail_path for row in rows}
    assert len(rows) == dataset["image_count"] == 36
    assert stored == expected  # exactly the objects the rows name, nothing more
    assert all(key.startswith(f"datasets/{dataset['id']}/") for key in stored)
    data_dir = tmp_path / "data"
    assert not (data_dir / "datasets").exists()  # nothing kept on the API's own disk
    assert [p for p in files_under(data_dir / "tmp") if p.name != ".lock"] == []


def test_a_store_outage_refuses_the_upload_and_leaves_nothing(
    private_seaweedfs: SeaweedFS, shapes_zip: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.main import create_app

    env = private_seaweedfs.settings_env() | {
        "DATA_DIR": str(tmp_path / "data"),
        "S3_TIMEOUT_S": "2",
        "S3_MAX_ATTEMPTS": "1",
        "STORAGE_RETRY_AFTER_S": "9",
    }
    use_settings(monkeypatch, **env)
    with TestClient(create_app()) as client:
        private_seaweedfs.stop()
        refused = upload_zip(client, shapes_zip.read_bytes())
        assert refused.status_code == 503, refused.text
        assert refused.headers["retry-after"] == "9"
        assert client.get("/api/v1/datasets").json()["total"] == 0
        assert [p for p in files_under(tmp_path / "data" / "tmp")] == []

        private_seaweedfs.start()
        assert _keys(private_seaweedfs, "") == set()
        again = upload_zip(client, shapes_zip.read_bytes())
        assert again.status_code == 201, again.text  # the same zip, now stored
        assert len(_keys(private_seaweedfs, "datasets/")) == 2 * again.json()["image_count"]
