"""Upload, listing and image serving; bad uploads leave no rows and no files."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from tests.service_support import files_under, png_bytes, upload_zip, use_settings, zip_bytes


def _stored_files(data_dir: Path) -> list[Path]:
    return files_under(data_dir / "datasets") + files_under(data_dir / "tmp")


def _dataset_count(client: TestClient) -> int:
    return int(client.get("/api/v1/datasets").json()["total"])


def test_upload_records_images_labels_and_thumbnails(
    client: TestClient, dataset: dict[str, Any], shapes_zip: Path, data_dir: Path
) -> None:
    assert dataset["image_count"] == 36
    assert dataset["has_labels"] is True
    assert (
        dataset["class_names"] == sorted(dataset["class_names"])
        and len(dataset["class_names"]) == 3
    )
    assert dataset["skipped"] == [] and dataset["skipped_count"] == 0

    images = client.get(f"/api/v1/datasets/{dataset['id']}/images", params={"limit": 1000}).json()
    assert images["total"] == 36 and len(images["items"]) == 36
    with zipfile.ZipFile(shapes_zip) as archive:
        names = sorted(n for n in archive.namelist() if not n.endswith("/"))
        first = images["items"][0]
        assert [item["filename"] for item in images["items"]] == names
        original = client.get(f"/api/v1/datasets/{dataset['id']}/images/{first['id']}")
        assert original.status_code == 200
        assert original.content == archive.read(first["filename"])  # the bytes as uploaded
    assert original.headers["content-type"] == first["media_type"]
    assert {item["label"] for item in images["items"]} == {0, 1, 2}

    thumb = client.get(
        f"/api/v1/datasets/{dataset['id']}/images/{first['id']}", params={"thumbnail": "true"}
    )
    assert thumb.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(thumb.content)).size == (128, 128)
    # Files live under datasets/<id>: originals and thumbnails, nothing left in tmp.
    assert len(files_under(data_dir / "datasets" / dataset["id"])) == 72
    assert files_under(data_dir / "tmp") == []

    page = client.get(
        f"/api/v1/datasets/{dataset['id']}/images", params={"offset": 30, "limit": 10}
    ).json()
    assert [i["position"] for i in page["items"]] == list(range(30, 36))
    listed = client.get("/api/v1/datasets").json()
    assert listed["total"] == 1 and listed["items"][0]["id"] == dataset["id"]
    assert client.get(f"/api/v1/datasets/{dataset['id']}").json() == dataset


def test_bad_entries_are_skipped_with_reasons(client: TestClient) -> None:
    bad_png = png_bytes()[:40]  # truncated: a PNG header, then nothing
    payload = zip_bytes(
        {
            "cats/a.png": png_bytes(),
            "cats/b.png": png_bytes(colour=(0, 0, 255)),
            "cats/notes.txt": b"not an image",
            "cats/broken.png": bad_png,
            "cats/tiny.png": png_bytes(size=(3, 3)),
            "../escape.png": png_bytes(),
            "/etc/absolute.png": png_bytes(),
            ".hidden/c.png": png_bytes(),
            "__MACOSX/cats/._a.png": b"resource fork",
        }
    )
    response = upload_zip(client, payload, name="mixed")
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["name"] == "mixed" and body["image_count"] == 2
    reasons = {entry["path"]: entry["reason"] for entry in body["skipped"]}
    assert set(reasons) == {
        "cats/notes.txt",
        "cats/broken.png",
        "cats/tiny.png",
        "../escape.png",
        "/etc/absolute.png",
    }
    assert "not an image" in reasons["cats/notes.txt"]
    assert "small" in reasons["cats/tiny.png"]
    assert "escapes" in reasons["../escape.png"] and "escapes" in reasons["/etc/absolute.png"]
    assert body["skipped_count"] == 5
    assert body["has_labels"] is False  # labels_from_folders is off by default


def test_labels_need_every_image_in_a_folder(client: TestClient) -> None:
    payload = zip_bytes({"top.png": png_bytes(), "dogs/a.png": png_bytes()})
    body = upload_zip(client, payload, labels_from_folders="true").json()
    assert body["image_count"] == 2 and body["has_labels"] is False and body["class_names"] is None


def test_single_wrapping_folder_is_looked_through(client: TestClient) -> None:
    payload = zip_bytes(
        {"photos/cats/a.png": png_bytes(), "photos/dogs/b.png": png_bytes(colour=(1, 2, 3))}
    )
    body = upload_zip(client, payload, labels_from_folders="1").json()
    assert body["class_names"] == ["cats", "dogs"]


@pytest.mark.parametrize(
    ("payload", "status", "words"),
    [
        (b"this is not a zip at all", 400, "not a zip"),
        (zip_bytes({"readme.txt": b"hello", "data.csv": b"1,2,3"}), 422, "no usable image"),
        (zip_bytes({}), 422, "no image"),
        (zip_bytes({"../../evil.png": png_bytes()}), 422, "escapes"),
    ],
    ids=["not-a-zip", "no-images", "empty-zip", "only-escaping"],
)
def test_refused_uploads_leave_nothing(
    client: TestClient, data_dir: Path, payload: bytes, status: int, words: str
) -> None:
    response = upload_zip(client, payload)
    assert response.status_code == status, response.text
    assert words in response.json()["detail"]
    assert _dataset_count(client) == 0
    assert _stored_files(data_dir) == []


def test_form_problems(client: TestClient, data_dir: Path) -> None:
    no_file = client.post("/api/v1/datasets", data={"name": "x"}, files={"other": ("a", b"1")})
    assert no_file.status_code == 422 and "'file'" in no_file.json()["detail"]
    not_multipart = client.post("/api/v1/datasets", json={"file": "x"})
    assert not_multipart.status_code == 415
    bad_flag = upload_zip(client, zip_bytes({"a.png": png_bytes()}), labels_from_folders="maybe")
    assert bad_flag.status_code == 422 and "labels_from_folders" in bad_flag.json()["detail"]
    assert _dataset_count(client) == 0 and _stored_files(data_dir) == []


@pytest.fixture
def strict_client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[TestClient, Path]:
    from app.main import create_app

    root = tmp_path / "strict"
    use_settings(
        monkeypatch,
        DATA_DIR=str(root),
        MAX_UPLOAD_BYTES="20000",
        MAX_ZIP_ENTRIES="5",
        MAX_UNCOMPRESSED_BYTES="3000000",
        MAX_COMPRESSION_RATIO="50",
        MAX_IMAGE_PIXELS="10000",
    )
    return TestClient(create_app()), root


def test_size_limits(strict_client: tuple[TestClient, Path]) -> None:
    client, root = strict_client
    with client:
        too_big = upload_zip(client, b"PK" + bytes(30000))
        assert too_big.status_code == 413 and "limit" in too_big.json()["detail"]

        def chunks() -> Any:  # no Content-Length: the limit applies while streaming
            yield b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a.zip"\r\n\r\n'
            for _ in range(10):
                yield bytes(4096)
            yield b"\r\n--xyz--\r\n"

        streamed = client.post(
            "/api/v1/datasets",
            content=chunks(),
            headers={"content-type": "multipart/form-data; boundary=xyz"},
        )
        assert streamed.status_code == 413, streamed.text

        many = zip_bytes({f"{i}.png": png_bytes() for i in range(6)})
        assert upload_zip(client, many).status_code == 413

        expands = zip_bytes({"big.bin": bytes(4_000_000)})  # ~4 kB compressed
        response = upload_zip(client, expands)
        assert response.status_code == 413 and "expands" in response.json()["detail"]

        bomb = zip_bytes({"bomb.bin": bytes(2_000_000), "a.png": png_bytes()})
        response = upload_zip(client, bomb)
        assert response.status_code == 413 and "ratio" in response.json()["detail"]

        huge = zip_bytes({"a.png": png_bytes(), "huge.png": png_bytes(size=(200, 100))})
        response = upload_zip(client, huge)
        assert response.status_code == 201
        assert "too large" in response.json()["skipped"][0]["reason"]
        assert client.get("/api/v1/datasets").json()["total"] == 1
    assert files_under(root / "tmp") == []


def test_unknown_ids_are_404_with_a_message(client: TestClient, dataset: dict[str, Any]) -> None:
    for path in (
        "/api/v1/datasets/nope",
        "/api/v1/datasets/nope/images",
        "/api/v1/datasets/nope/images/nope",
        f"/api/v1/datasets/{dataset['id']}/images/nope",
    ):
        response = client.get(path)
        assert response.status_code == 404, path
        assert "not found" in response.json()["detail"]
    # An image id from another dataset is not served through this one.
    other = upload_zip(client, zip_bytes({"x.png": png_bytes()})).json()
    image_id = client.get(f"/api/v1/datasets/{other['id']}/images").json()["items"][0]["id"]
    assert client.get(f"/api/v1/datasets/{dataset['id']}/images/{image_id}").status_code == 404


def _phone_photos() -> dict[str, tuple[bytes, str]]:
    """HEIC and HEIF written by pillow_heif (libheif), AVIF by Pillow's own plugin where built:
    name -> (bytes, media type)."""
    import numpy as np
    import pillow_heif

    from scan_engine.data import SUPPORTED_FORMATS

    pixels = np.zeros((40, 60, 3), dtype=np.uint8)
    pixels[:, :30], pixels[:, 30:] = (200, 100, 50), (30, 60, 220)
    image = Image.fromarray(pixels)
    photos: dict[str, tuple[bytes, str]] = {}
    for name in ("phone/a.heic", "phone/b.heif"):
        buffer = io.BytesIO()
        pillow_heif.from_pillow(image).save(buffer, quality=90)
        photos[name] = (buffer.getvalue(), "image/heif")
    if "AVIF" in SUPPORTED_FORMATS:
        buffer = io.BytesIO()
        image.save(buffer, format="AVIF", quality=90)
        photos["phone/c.avif"] = (buffer.getvalue(), "image/avif")
    return photos


def test_heic_and_avif_photos_are_accepted(client: TestClient, data_dir: Path) -> None:
    photos = _phone_photos()
    response = upload_zip(client, zip_bytes({name: data for name, (data, _) in photos.items()}))
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["image_count"] == len(photos) and body["skipped"] == []
    items = client.get(f"/api/v1/datasets/{body['id']}/images").json()["items"]
    assert [item["filename"] for item in items] == sorted(photos)
    for item in items:
        data, media_type = photos[item["filename"]]
        assert item["media_type"] == media_type and (item["width"], item["height"]) == (60, 40)
        url = f"/api/v1/datasets/{body['id']}/images/{item['id']}"
        original = client.get(url)
        assert original.content == data and original.headers["content-type"] == media_type
        thumb = Image.open(io.BytesIO(client.get(url, params={"thumbnail": "true"}).content))
        assert thumb.format == "JPEG" and thumb.size == (128, 128)
        left, right = thumb.getpixel((10, 64)), thumb.getpixel((118, 64))
        assert abs(left[0] - 200) < 12 and abs(right[2] - 220) < 12  # the photo, not noise
    # Originals are stored under their format's extension (a .heif is HEIF like a .heic).
    stored = [p.suffix for p in files_under(data_dir / "datasets") if p.parent.name == "images"]
    expected = {"image/heif": ".heic", "image/avif": ".avif"}
    assert sorted(stored) == sorted(expected[media_type] for _, media_type in photos.values())


def test_delete_removes_rows_files_jobs_and_the_feature_cache(
    client: TestClient, dataset: dict[str, Any], make_job: Any, data_dir: Path
) -> None:
    from sqlalchemy import func, select

    from app.db.models import Image as ImageRow
    from app.db.models import Job
    from app.db.session import get_sessionmaker

    job_id = make_job(dataset["id"], status="succeeded")
    features = data_dir / "features" / dataset["id"]
    features.mkdir(parents=True)
    (features / "entry.npz").write_bytes(b"cached features")
    (data_dir / "jobs" / job_id / "work").mkdir(parents=True)
    assert (data_dir / "datasets" / dataset["id"]).is_dir()

    response = client.delete(f"/api/v1/datasets/{dataset['id']}")
    assert response.status_code == 204, response.text
    assert client.get(f"/api/v1/datasets/{dataset['id']}").status_code == 404
    assert not features.exists() and not (data_dir / "jobs" / job_id).exists()
    assert not (data_dir / "datasets" / dataset["id"]).exists()
    with get_sessionmaker()() as other:
        assert other.scalar(select(func.count()).select_from(Job)) == 0
        assert other.scalar(select(func.count()).select_from(ImageRow)) == 0
    assert client.delete(f"/api/v1/datasets/{dataset['id']}").status_code == 404


def test_delete_refuses_while_a_job_is_active(
    client: TestClient, dataset: dict[str, Any], make_job: Any, data_dir: Path
) -> None:
    make_job(dataset["id"], status="running")
    response = client.delete(f"/api/v1/datasets/{dataset['id']}")
    assert response.status_code == 409 and "queued or running" in response.json()["detail"]
    assert client.get(f"/api/v1/datasets/{dataset['id']}").status_code == 200
    assert (data_dir / "datasets" / dataset["id"]).is_dir()
