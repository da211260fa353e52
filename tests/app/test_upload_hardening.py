"""Hostile and broken uploads: a clear 4xx with a reason or a skipped entry with its reason, never
a 500, and nothing half-written (no rows, no files). Complements test_api_datasets.py, which
covers not-a-zip, no usable image, path escapes, hidden files, size, entry-count, total-size and
ratio limits on the whole zip, and huge-image skips."""

from __future__ import annotations

import io
import struct
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.service_support import files_under, png_bytes, upload_zip, use_settings, zip_bytes


def _nothing_stored(client: TestClient, data_dir: Path) -> None:
    assert client.get("/api/v1/datasets").json()["total"] == 0
    assert files_under(data_dir / "datasets") == []
    assert files_under(data_dir / "tmp") == []


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels (a decompression bomb's shape)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def _zip_with(infos: list[tuple[zipfile.ZipInfo | str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for info, payload in infos:
            archive.writestr(info, payload)
    return buffer.getvalue()


def _skipped(body: dict[str, Any]) -> dict[str, str]:
    return {entry["path"]: entry["reason"] for entry in body["skipped"]}


@pytest.mark.parametrize(
    ("payload", "words"),
    [
        (zip_bytes({"a.png": png_bytes(), "b.png": png_bytes()})[:150], "truncated or corrupt"),
        (b"PK\x03\x04" + bytes(300), "not a zip"),
        (b"PK\x05\x06" + bytes(5), "not a zip"),  # a cut-off end record
        (b"", "not a zip"),
    ],
    ids=["truncated", "local-header-then-garbage", "cut-end-record", "empty-file"],
)
def test_truncated_or_corrupt_zips_are_400(
    client: TestClient, data_dir: Path, payload: bytes, words: str
) -> None:
    response = upload_zip(client, payload)
    assert response.status_code == 400, response.text
    assert words in response.json()["detail"]
    _nothing_stored(client, data_dir)


def test_corrupt_entries_are_skipped_and_a_zip_of_only_corrupt_entries_is_422(
    client: TestClient, data_dir: Path
) -> None:
    good = png_bytes(colour=(10, 200, 10))
    broken = bytearray(
        _zip_with([(zipfile.ZipInfo("bad.png"), png_bytes(size=(40, 40))), ("ok.png", good)])
    )
    # Flip bytes inside the first entry's compressed data: its CRC no longer matches.
    data_start = 30 + len("bad.png")
    for offset in range(data_start + 5, data_start + 15):
        broken[offset] ^= 0xFF
    response = upload_zip(client, bytes(broken))
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["image_count"] == 1 and "corrupt zip entry" in _skipped(body)["bad.png"]

    # A header that lies about the size (says 10 bytes, holds a whole PNG): refused, not trusted.
    lying = bytearray(_zip_with([("lie.png", png_bytes(size=(30, 30)))]))
    central = lying.rindex(b"PK\x01\x02")
    lying[central + 24 : central + 28] = struct.pack("<I", 10)  # uncompressed size
    response = upload_zip(client, bytes(lying))
    assert response.status_code == 422, response.text
    assert "lie.png" in response.json()["detail"]
    assert client.get("/api/v1/datasets").json()["total"] == 1
    assert files_under(data_dir / "tmp") == []


@pytest.mark.filterwarnings("ignore:Duplicate name")  # zipfile warns while writing the test zip
def test_unsafe_and_odd_entries_are_skipped_with_reasons(client: TestClient) -> None:
    link = zipfile.ZipInfo("cats/link.png")
    link.external_attr = (0o120777 << 16) | 0x20  # a symlink as Info-ZIP stores one
    inner = zip_bytes({"x.png": png_bytes()})
    payload = _zip_with(
        [
            ("cats/a.png", png_bytes()),
            ("C:/windows/evil.png", png_bytes()),
            ("D:relative.png", png_bytes()),
            ("..\\..\\backslash.png", png_bytes()),
            ("cats/./../../dots.png", png_bytes()),
            (link, b"/etc/passwd"),
            ("cats/inner.zip", inner),
            ("cats/disguised.png", inner),  # a zip named like an image
            ("cats/tar.gz", b"\x1f\x8b" + bytes(30)),
            ("cats/a.png", png_bytes(colour=(0, 0, 0))),  # same name again
            ("cats/ctrl\x01.png", png_bytes()),
            ("long/" + "x" * 1100 + ".png", png_bytes()),
            ("cats/huge.png", _png_claiming(100_000, 100_000)),
            ("cats/big.png", _png_claiming(9_000, 9_000)),
            ("cats/notes.txt", b"hello"),
            ("cats/empty.png", b""),
        ]
    )
    response = upload_zip(client, payload)
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["image_count"] == 1
    images = client.get(f"/api/v1/datasets/{body['id']}/images").json()["items"]
    assert [image["filename"] for image in images] == ["cats/a.png"]
    stored = client.get(f"/api/v1/datasets/{body['id']}/images/{images[0]['id']}").content
    assert stored == png_bytes()  # the first of the two same-named entries
    reasons = _skipped(body)
    assert "absolute path" in reasons["C:/windows/evil.png"]
    assert "absolute path" in reasons["D:relative.png"]
    assert "(..)" in reasons["..\\..\\backslash.png"] and "(..)" in reasons["cats/./../../dots.png"]
    assert reasons["cats/link.png"] == "symbolic link"
    assert "nested archive" in reasons["cats/inner.zip"]
    assert "nested archive" in reasons["cats/disguised.png"]
    assert "nested archive" in reasons["cats/tar.gz"]
    assert reasons["cats/a.png"] == "duplicate path in the zip"
    assert "control character" in reasons["cats/ctrl?.png"]  # shown with the character masked
    assert any("longer than 1024" in reason for reason in reasons.values())
    assert "decompression bomb" in reasons["cats/huge.png"]
    assert "image too large: 9000x9000" in reasons["cats/big.png"]
    assert "not an image" in reasons["cats/notes.txt"]
    assert reasons["cats/empty.png"] == "empty file"
    assert body["skipped_count"] == 15


@pytest.fixture
def strict_client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    from app.main import create_app

    use_settings(
        monkeypatch,
        DATA_DIR=str(tmp_path / "strict"),
        MAX_UPLOAD_BYTES="200000",
        MAX_ZIP_ENTRIES="4",
        MAX_ENTRY_BYTES="5000",
        MAX_COMPRESSION_RATIO="20",
    )
    with TestClient(create_app()) as client:
        yield client


def test_per_entry_limits_skip_the_entry(strict_client: TestClient) -> None:
    noisy = noise_png(80)  # ~19 kB PNG: over the 5000-byte entry limit
    # zeros.bin: ratio ~1000 for one entry; noise.bin keeps the whole zip's ratio near 13.
    noise = bytes(__import__("numpy").random.default_rng(1).integers(0, 256, 80_000, "uint8"))
    payload = zip_bytes(
        {"ok.png": png_bytes(), "big.png": noisy, "zeros.bin": bytes(1_200_000), "noise.bin": noise}
    )
    response = upload_zip(strict_client, payload)
    assert response.status_code == 201, response.text
    reasons = _skipped(response.json())
    assert "file too large" in reasons["big.png"] and "limit is 5000" in reasons["big.png"]
    assert "compression ratio" in reasons["zeros.bin"]


def test_entry_count_is_checked_before_the_directory_is_read(
    strict_client: TestClient, tmp_path: Path
) -> None:
    from scan_engine.archive import declared_entry_count

    payload = zip_bytes({f"{i}.png": png_bytes() for i in range(5)})
    path = tmp_path / "five.zip"
    path.write_bytes(payload)
    assert declared_entry_count(path) == 5
    response = upload_zip(strict_client, payload)
    assert response.status_code == 413 and "5 entries" in response.json()["detail"]


def test_repeated_upload_returns_the_first_dataset(client: TestClient, data_dir: Path) -> None:
    payload = zip_bytes({"cats/a.png": png_bytes(), "dogs/b.png": png_bytes(colour=(1, 2, 3))})
    first = upload_zip(client, payload, name="first")
    assert first.status_code == 201
    again = upload_zip(client, payload, name="second")
    assert again.status_code == 200, again.text
    assert again.json() == first.json()  # the same dataset, name and all
    assert again.headers["location"] == f"/api/v1/datasets/{first.json()['id']}"
    assert client.get("/api/v1/datasets").json()["total"] == 1
    assert len(files_under(data_dir / "datasets")) == 4  # 2 images + 2 thumbnails, once
    labelled = upload_zip(client, payload, labels_from_folders="true")
    assert labelled.status_code == 201 and labelled.json()["has_labels"]  # another request
    changed = upload_zip(client, zip_bytes({"cats/a.png": png_bytes()}))
    assert changed.status_code == 201
    assert client.get("/api/v1/datasets").json()["total"] == 3
    assert files_under(data_dir / "tmp") == []


def noise_png(side: int) -> bytes:
    """A PNG of random pixels (does not compress): side x side, about 3 * side^2 bytes."""
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()
