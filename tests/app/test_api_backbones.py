"""GET /api/v1/backbones: the registry with each backbone's weights as this server sees them, and
jobs that name a backbone whose weights were imported into MODELS_DIR."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.service_support import create_api_key, use_settings

BACKBONES = "/api/v1/backbones"


def _import_stand_in_weights(models_dir: Path, name: str) -> None:
    """A models-folder entry for `name`, as `scan-weights import` writes it (the tensors are a
    stand-in: availability is what these tests look at; no job here runs them)."""
    import torch

    from scan_engine.backbones import ModelsFolder, get_spec

    spec = get_spec(name)
    ModelsFolder(models_dir).store(
        name, spec.timm_model, {"stand_in": torch.zeros(2)}, imported_from="test.pth"
    )


def test_lists_the_bundled_default_present_and_dinov2_absent(
    client: TestClient, empty_hub_caches: Path
) -> None:
    from scan_engine.backbones import get_spec, list_backbones

    response = client.get(BACKBONES)
    assert response.status_code == 200, response.text
    body = response.json()
    by_name = {item["name"]: item for item in body["items"]}
    assert set(by_name) == {spec.name for spec in list_backbones()}
    assert body["default"] == "efficientnet_lite0" and body["items"][0]["name"] == body["default"]

    lite0 = by_name["efficientnet_lite0"]
    assert lite0["weights_present"] and lite0["weights_source"] == "bundled"
    assert lite0["default"] and lite0["unavailable_reason"] is None
    assert (lite0["feature_dim"], lite0["input_size"]) == (1280, 224)

    dinov2 = by_name["dinov2_vits14"]
    spec = get_spec("dinov2_vits14")
    assert not dinov2["weights_present"] and dinov2["weights_source"] is None
    assert (dinov2["feature_dim"], dinov2["input_size"]) == (spec.feature_dim, spec.input_size)
    assert not dinov2["default"]
    assert "scan-weights import dinov2_vits14" in dinov2["unavailable_reason"]
    assert [item["name"] for item in body["items"] if item["default"]] == ["efficientnet_lite0"]


def test_imported_weights_make_a_backbone_present_and_usable(
    client: TestClient, dataset: dict[str, Any], data_dir: Path, empty_hub_caches: Path
) -> None:
    from sqlalchemy import select

    from app.db.models import Job
    from app.db.session import get_sessionmaker

    _import_stand_in_weights(data_dir / "models", "dinov2_vits14")  # MODELS_DIR's default
    dinov2 = next(i for i in client.get(BACKBONES).json()["items"] if i["name"] == "dinov2_vits14")
    assert dinov2["weights_present"] and dinov2["weights_source"] == "models_dir"

    response = client.post(
        "/api/v1/jobs",
        json={"dataset_id": dataset["id"], "num_clusters": 3, "backbone": "dinov2_vits14"},
    )
    assert response.status_code == 202, response.text
    job = response.json()
    client.post(f"/api/v1/jobs/{job['id']}/cancel")
    assert (job["backbone"], job["image_size"], job["preset"]) == (
        "dinov2_vits14",
        224,
        "pretrained",
    )
    with get_sessionmaker()() as other:
        assert other.scalar(select(Job.backbone).where(Job.id == job["id"])) == "dinov2_vits14"


def test_default_backbone_and_models_dir_come_from_the_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shapes_zip: Path, empty_hub_caches: Path
) -> None:
    from app.main import create_app
    from tests.service_support import upload_zip

    models = tmp_path / "shared-models"
    _import_stand_in_weights(models, "dinov2_vits14")
    use_settings(
        monkeypatch,
        DATA_DIR=str(tmp_path / "data"),
        MODELS_DIR=str(models),
        DEFAULT_BACKBONE="dinov2_vits14",
    )
    with TestClient(create_app()) as client:
        body = client.get(BACKBONES).json()
        assert body["default"] == "dinov2_vits14" and body["items"][0]["name"] == "dinov2_vits14"
        assert body["items"][0]["weights_source"] == "models_dir"
        dataset = upload_zip(client, shapes_zip.read_bytes()).json()
        job = client.post("/api/v1/jobs", json={"dataset_id": dataset["id"], "num_clusters": 3})
        assert job.status_code == 202, job.text
        client.post(f"/api/v1/jobs/{job.json()['id']}/cancel")
        assert job.json()["backbone"] == "dinov2_vits14"


def test_needs_an_api_key_like_the_other_routes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.main import create_app

    use_settings(monkeypatch, DATA_DIR=str(tmp_path / "data"), AUTH_MODE="api_keys")
    with TestClient(create_app()) as client:
        assert client.get(BACKBONES).status_code == 401
        key = create_api_key("someone")
        answer = client.get(BACKBONES, headers={"Authorization": f"Bearer {key}"})
        assert answer.status_code == 200 and answer.json()["items"]


def test_new_job_page_offers_the_backbones(client: TestClient, empty_hub_caches: Path) -> None:
    page = client.get("/")
    assert page.status_code == 200
    select = page.text[page.text.index('<select id="backbone"') :]
    select = select[: select.index("</select>")]
    assert 'data-pretrained-presets="pretrained"' in select
    assert '<option value="efficientnet_lite0" selected>' in select  # the default, chosen
    dinov2 = select[select.index('<option value="dinov2_vits14"') :].split("</option>")[0]
    assert " disabled " in dinov2 and "scan-weights import dinov2_vits14" in dinov2  # the reason
    assert "no weights on this server" in dinov2


def test_job_and_gallery_pages_show_backbone_size_and_cache(
    client: TestClient, dataset: dict[str, Any], make_job: Any
) -> None:
    from scan_engine.config import make_config

    config = make_config("pretrained", num_clusters=3).to_json_dict()
    job_id = make_job(
        dataset["id"],
        status="succeeded",
        preset="pretrained",
        backbone="efficientnet_lite0",
        config=config,
        run_report={"route": "pretrained", "image_size": 224, "features_from_cache": True},
    )
    for path in (f"/jobs/{job_id}", f"/jobs/{job_id}/gallery"):
        page = client.get(path)
        assert page.status_code == 200
        assert "backbone efficientnet_lite0 · 224 px · features from the cache" in page.text
    scratch = make_job(dataset["id"], status="queued")  # tiny: SimCLR, run_report not yet known
    assert "SimCLR from scratch · 32 px</span>" in client.get(f"/jobs/{scratch}").text
