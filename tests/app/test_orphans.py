"""`scan-admin remove-orphans` on both stores: the objects of datasets and jobs without a row
go once they are old enough; a dataset's own objects and a fresh upload in progress stay."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.seaweedfs import SeaweedFS
from tests.service_support import upload_zip, use_settings


@pytest.fixture(params=["local", "s3"])
def service(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    env = {"DATA_DIR": str(tmp_path / "data")}
    if request.param == "s3":
        server: SeaweedFS = request.getfixturevalue("seaweedfs")
        env |= server.settings_env() | {"S3_PREFIX": f"orphans-{uuid.uuid4().hex[:10]}/"}
    use_settings(monkeypatch, **env)
    from app.main import create_app

    with TestClient(create_app()) as client:
        yield client


def test_orphans_are_listed_then_removed_and_rows_keep_their_objects(
    service: TestClient, shapes_zip: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from app.admin import main as admin
    from app.core.config import get_settings
    from app.storage import object_store

    dataset = upload_zip(service, shapes_zip.read_bytes()).json()
    store = object_store(get_settings())
    kept = {info.key for info in store.list(f"datasets/{dataset['id']}/")}
    store.put_bytes("datasets/ghost1/images/000000.png", b"left by a crash")
    store.put_bytes("jobs/ghost2/work/pretext.pt", b"left by a deletion")
    store.put_bytes("features/ghost1/abc.npz", b"cached")

    assert admin(["remove-orphans"]) == 0  # all of them younger than an hour
    assert capsys.readouterr().out == ""
    time.sleep(1.1)
    assert admin(["remove-orphans", "--older-than-s", "1", "--dry-run"]) == 0
    listed = capsys.readouterr().out.split()
    assert listed == ["datasets/ghost1/", "features/ghost1/", "jobs/ghost2/"]
    assert store.exists("jobs/ghost2/work/pretext.pt")  # a dry run deletes nothing

    assert admin(["remove-orphans", "--older-than-s", "1"]) == 0
    assert capsys.readouterr().out.split() == listed
    remaining = {info.key for info in store.list("")}
    assert kept and kept <= remaining  # the dataset's own objects stay
    assert not any("ghost" in key for key in remaining)
    if os.environ.get("STORAGE_BACKEND") != "s3":
        assert not (Path(get_settings().DATA_DIR) / "datasets" / "ghost1").exists()
