"""Hostile zips at every door that reads one: the dataset upload and the prediction upload (real
API, real service) and the command line's loader (scan_engine.data.load_zip). The rules live once
in scan_engine.archive; each case here runs at all three doors, so a rule added once is tested
three times. Each door keeps its own answer: HTTP 4xx JSON for the API, an exception (or a
skipped entry) for the command line; a refusal leaves nothing behind.
"""

from __future__ import annotations

import io
import shutil
import struct
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from scan_engine.archive import ArchiveLimitError, ArchiveLimits, NotAZipError
from tests.service_support import files_under, png_bytes, upload_zip, use_settings, zip_bytes

DOORS = ("dataset", "predict", "cli")
# The same limits at every door: the service reads them from its settings, the CLI is given them.
SETTINGS_LIMITS = {
    "MAX_ZIP_ENTRIES": "5",
    "MAX_UNCOMPRESSED_BYTES": "3000000",
    "MAX_COMPRESSION_RATIO": "50",
    "MAX_ENTRY_BYTES": "5000",
}
CLI_LIMITS = ArchiveLimits(
    max_entries=5, max_total_bytes=3_000_000, max_compression_ratio=50, max_entry_bytes=5000
)
# How each door refuses: not a zip, over a whole-archive limit, no usable image.
NOT_A_ZIP: dict[str, Any] = {"dataset": 400, "predict": 400, "cli": NotAZipError}
OVER_LIMIT: dict[str, Any] = {"dataset": 413, "predict": 413, "cli": ArchiveLimitError}
NO_IMAGE: dict[str, Any] = {"dataset": 422, "predict": 422, "cli": None}  # CLI: empty collection


@dataclass
class Outcome:
    """What a door answered: `refused` (HTTP status or exception type) with a message, or the
    accepted paths and skipped path -> reason."""

    refused: int | type[Exception] | None = None
    message: str = ""
    accepted: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


@dataclass
class Door:
    name: str
    submit: Callable[[bytes], Outcome]
    snapshot: Callable[[], Any]  # what a refusal must leave unchanged (files, rows)


# ---------------------------------------------------------------------------------------------
# The three doors


@pytest.fixture(scope="session")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model.pt written by a real (very short) pipeline run, for the prediction door."""
    from scan_engine import pipeline
    from scan_engine.config import make_config
    from scan_engine.data import load_folder
    from scan_engine.sample_data import make_shapes_collection
    from tests.e2e.flow import FAST_OVERRIDES

    root = make_shapes_collection(
        tmp_path_factory.mktemp("door_shapes"), classes=2, per_class=10, image_size=32
    )
    collection = load_folder(root, image_size=32)
    work = tmp_path_factory.mktemp("door_work")
    pipeline.run(collection, make_config("tiny", num_clusters=2, **FAST_OVERRIDES), work)
    return work / "model.pt"


def _service(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[TestClient, Path]:
    from app.main import create_app

    root = tmp_path / "data"
    use_settings(monkeypatch, DATA_DIR=str(root), **SETTINGS_LIMITS)
    return TestClient(create_app()), root


def _service_snapshot(client: TestClient, root: Path) -> Any:
    total = client.get("/api/v1/datasets").json()["total"]
    return total, files_under(root / "datasets"), files_under(root / "jobs")


def _skipped(entries: list[dict[str, str]]) -> dict[str, str]:
    return {entry["path"]: entry["reason"] for entry in entries}


def _dataset_door(client: TestClient, root: Path) -> Door:
    def submit(payload: bytes) -> Outcome:
        response = upload_zip(client, payload)
        assert files_under(root / "tmp") == [], "the upload's temp folder was left behind"
        if response.status_code != 201:
            return Outcome(response.status_code, response.json()["detail"])
        body = response.json()
        listed = client.get(f"/api/v1/datasets/{body['id']}/images").json()["items"]
        return Outcome(
            accepted=[image["filename"] for image in listed], skipped=_skipped(body["skipped"])
        )

    return Door("dataset", submit, lambda: _service_snapshot(client, root))


def _predict_door(client: TestClient, root: Path, model_file: Path) -> Door:
    from app.db.models import LOCAL_OWNER_ID
    from scan_engine.config import make_config
    from tests.service_support import insert_job

    # The job needs a dataset row; its model is the real one the pipeline wrote.
    response = upload_zip(client, zip_bytes({"seed.png": png_bytes()}))
    assert response.status_code == 201, response.text
    (root / "jobs" / "door" / "work").mkdir(parents=True)
    shutil.copy(model_file, root / "jobs" / "door" / "work" / "model.pt")
    config = make_config("tiny", num_clusters=2)
    job_id = insert_job(
        {
            "owner_id": LOCAL_OWNER_ID,
            "dataset_id": response.json()["id"],
            "status": "succeeded",
            "num_clusters": 2,
            "cluster_counts": [2],
            "preset": "tiny",
            "overrides": {},
            "config": config.to_json_dict(),
            "model_path": "jobs/door/work/model.pt",
        }
    )

    def submit(payload: bytes) -> Outcome:
        response = client.post(
            f"/api/v1/jobs/{job_id}/predict",
            files=[("file", ("upload.zip", payload, "application/zip"))],
        )
        assert files_under(root / "tmp") == []
        if response.status_code != 200:
            assert response.status_code != 500, response.text
            return Outcome(response.status_code, response.json()["detail"])
        body = response.json()
        return Outcome(
            accepted=[item["filename"] for item in body["items"]],
            skipped=_skipped(body["skipped"]),
        )

    return Door("predict", submit, lambda: _service_snapshot(client, root))


def _cli_door(folder: Path) -> Door:
    from scan_engine.data import load_zip

    folder.mkdir()

    def submit(payload: bytes) -> Outcome:
        path = folder / "input.zip"
        path.write_bytes(payload)
        try:
            collection = load_zip(path, image_size=32, limits=CLI_LIMITS)
        except (NotAZipError, ArchiveLimitError) as error:
            return Outcome(type(error), str(error))
        finally:
            assert sorted(p.name for p in folder.iterdir()) == ["input.zip"]
        outcome = Outcome(
            accepted=collection.paths,
            skipped={item.path: item.reason for item in collection.skipped},
        )
        if not collection.paths:  # the CLI reports an empty collection: the caller decides
            outcome.refused, outcome.message = None, "empty collection"
        return outcome

    def written() -> list[str]:  # besides the input the test wrote: nothing, ever
        return sorted(p.name for p in folder.iterdir() if p.name != "input.zip")

    return Door("cli", submit, written)


@pytest.fixture(params=DOORS)
def door(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Door]:
    if request.param == "cli":
        yield _cli_door(tmp_path / "cli")
        return
    client, root = _service(tmp_path, monkeypatch)
    with client:
        if request.param == "dataset":
            yield _dataset_door(client, root)
        else:
            yield _predict_door(client, root, request.getfixturevalue("model_file"))


def _refused(door: Door, payload: bytes, expected: dict[str, Any], words: str) -> None:
    """`payload` is refused the door's way, with `words` in the message, and leaves nothing."""
    before = door.snapshot()
    outcome = door.submit(payload)
    assert outcome.refused == expected[door.name], outcome
    assert words in outcome.message, outcome.message
    assert outcome.accepted == []
    assert door.snapshot() == before


# ---------------------------------------------------------------------------------------------
# Entries skipped with a reason, the good image beside them kept


def _symlink(name: str) -> zipfile.ZipInfo:
    link = zipfile.ZipInfo(name)
    link.external_attr = (0o120777 << 16) | 0x20  # a symlink as Info-ZIP stores one
    return link


def _zip(entries: list[tuple[zipfile.ZipInfo | str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for info, payload in entries:
            archive.writestr(info, payload)
    return buffer.getvalue()


def _mark_encrypted(payload: bytes, name: str) -> bytes:
    """Set the 'encrypted' flag of `name` in the central directory (zipfile will not write it)."""
    data = bytearray(payload)
    header = data.index(b"PK\x01\x02")
    while data[header + 46 : header + 46 + len(name)] != name.encode():
        header = data.index(b"PK\x01\x02", header + 4)
    (flags,) = struct.unpack_from("<H", data, header + 8)
    struct.pack_into("<H", data, header + 8, flags | 0x1)
    return bytes(data)


def _noise(count: int, seed: int = 1) -> bytes:
    return bytes(np.random.default_rng(seed).integers(0, 256, count, dtype=np.uint8))


def _noise_png(side: int) -> bytes:
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


GOOD = "cats/a.png"
SKIP_CASES: dict[str, tuple[list[tuple[zipfile.ZipInfo | str, bytes]], dict[str, list[str]]]] = {
    "traversal": (
        [("../evil.png", png_bytes()), ("cats/../../up.png", png_bytes())]
        + [("..\\..\\windows.png", png_bytes())],
        {
            "../evil.png": ["unsafe path", "escapes", "(..)"],
            "cats/../../up.png": ["unsafe path", "escapes", "(..)"],
            "..\\..\\windows.png": ["unsafe path", "escapes", "(..)"],
        },
    ),
    "absolute-path": (
        [("/etc/absolute.png", png_bytes()), ("C:/windows/evil.png", png_bytes())]
        + [("D:relative.png", png_bytes())],
        {
            "/etc/absolute.png": ["unsafe path", "absolute path"],
            "C:/windows/evil.png": ["unsafe path", "absolute path"],
            "D:relative.png": ["unsafe path", "absolute path"],
        },
    ),
    "symlink": (
        [(_symlink("cats/link.png"), b"/etc/passwd"), (_symlink("cats/up"), b"../../..")],
        {"cats/link.png": ["symbolic link"], "cats/up": ["symbolic link"]},
    ),
    "nested-archive": (
        [("cats/inner.zip", zip_bytes({"x.png": png_bytes()}))]
        + [("cats/disguised.png", zip_bytes({"y.png": png_bytes()}))]
        + [("cats/t.tar.gz", b"\x1f\x8b" + bytes(30)), ("cats/no_name", b"7z\xbc\xaf" + bytes(9))],
        {
            "cats/inner.zip": ["nested archive"],
            "cats/disguised.png": ["nested archive"],  # found by its content
            "cats/t.tar.gz": ["nested archive"],
            "cats/no_name": ["nested archive"],
        },
    ),
    "entry-ratio": (
        # One entry of zeros (ratio ~1000); the noise keeps the whole zip's ratio near 15.
        [("zeros.bin", bytes(1_200_000)), ("noise.bin", _noise(80_000))],
        {"zeros.bin": ["compression ratio", "zip bomb"], "noise.bin": ["file too large"]},
    ),
    "entry-size": (
        [("cats/big.png", _noise_png(80))],  # ~19 kB: over the 5000-byte entry limit
        {"cats/big.png": ["file too large", "limit is 5000"]},
    ),
    "odd-names": (
        [("cats/ctrl\x01.png", png_bytes()), ("long/" + "x" * 1100 + ".png", png_bytes())],
        {"cats/ctrl\x01.png": ["control character"], "long/": ["longer than 1024"]},
    ),
}


def _reason_for(skipped: dict[str, str], path: str) -> str:
    """The reason given for `path` (a prefix for paths too long to write out; control characters
    may be shown masked by the service)."""
    for shown, reason in skipped.items():
        if (
            shown == path
            or shown == path.replace("\x01", "?")
            or (path.endswith("/") and shown.startswith(path))
        ):
            return reason
    raise AssertionError(f"{path!r} not skipped; skipped: {sorted(skipped)}")


@pytest.mark.parametrize("case", sorted(SKIP_CASES))
def test_unsafe_entries_are_skipped_with_their_reason(door: Door, case: str) -> None:
    entries, expected = SKIP_CASES[case]
    outcome = door.submit(_zip([(GOOD, png_bytes()), *entries]))
    assert outcome.refused is None, outcome
    assert outcome.accepted == [GOOD]
    assert len(outcome.skipped) == len(expected)
    for path, words in expected.items():
        reason = _reason_for(outcome.skipped, path)
        assert all(word in reason for word in words), (path, reason)


def test_encrypted_and_duplicate_entries_are_skipped(door: Door) -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate name
        payload = _zip(
            [(GOOD, png_bytes()), ("cats/secret.png", png_bytes()), (GOOD, png_bytes((30, 30)))]
        )
    outcome = door.submit(_mark_encrypted(payload, "cats/secret.png"))
    assert outcome.accepted == [GOOD]
    assert outcome.skipped == {
        "cats/secret.png": "encrypted zip entry",
        GOOD: "duplicate path in the zip",
    }


def test_hidden_and_system_files_are_ignored_without_a_reason(door: Door) -> None:
    payload = _zip(
        [(GOOD, png_bytes())]
        + [("__MACOSX/cats/._a.png", b"resource fork"), (".DS_Store", b"junk")]
        + [("cats/Thumbs.db", b"junk"), ("cats/.hidden.png", png_bytes())]
    )
    outcome = door.submit(payload)
    assert outcome.accepted == [GOOD] and outcome.skipped == {}


# ---------------------------------------------------------------------------------------------
# Whole archives refused


def test_a_zip_bomb_by_ratio_is_refused(door: Door) -> None:
    payload = zip_bytes({"bomb.bin": bytes(2_000_000), GOOD: png_bytes()})  # ratio ~1000
    _refused(door, payload, OVER_LIMIT, "compression ratio")


def test_a_zip_bomb_by_total_size_is_refused(door: Door) -> None:
    payload = zip_bytes({"big.bin": bytes(4_000_000), GOOD: png_bytes()})  # ~4 kB compressed
    _refused(door, payload, OVER_LIMIT, "expands to 4")


def test_too_many_entries_are_refused(door: Door) -> None:
    payload = zip_bytes({f"cats/{i}.png": png_bytes() for i in range(6)})
    _refused(door, payload, OVER_LIMIT, "6 entries; the limit is 5")


def test_a_huge_directory_is_refused_from_the_end_record(door: Door) -> None:
    # An end record declaring 60,000 entries before a directory of one: refused before parsing.
    payload = bytearray(zip_bytes({GOOD: png_bytes()}))
    end = payload.rindex(b"PK\x05\x06")
    struct.pack_into("<HH", payload, end + 8, 60_000, 60_000)
    _refused(door, bytes(payload), OVER_LIMIT, "60000 entries")


@pytest.mark.parametrize(
    "payload",
    [
        b"this is not a zip at all",
        zip_bytes({"a.png": png_bytes(), "b.png": png_bytes()})[:150],
        b"PK\x03\x04" + bytes(300),
        b"PK\x05\x06" + bytes(5),
        b"",
    ],
    ids=["text", "truncated", "local-header-then-garbage", "cut-end-record", "empty-file"],
)
def test_what_is_not_a_zip_is_refused(door: Door, payload: bytes) -> None:
    _refused(door, payload, NOT_A_ZIP, "not a zip archive")


@pytest.mark.parametrize(
    "entries",
    [{}, {"readme.txt": b"hello", "cats/": b""}, {"__MACOSX/._a.png": b"fork"}],
    ids=["empty-zip", "no-image", "only-ignored"],
)
def test_a_zip_without_a_usable_image(door: Door, entries: dict[str, bytes]) -> None:
    payload = zip_bytes(entries)
    if door.name == "cli":  # an empty collection; the command line decides what to say
        outcome = door.submit(payload)
        assert outcome.accepted == [] and outcome.message == "empty collection"
        assert set(outcome.skipped) == ({"readme.txt"} if "readme.txt" in entries else set())
        return
    _refused(door, payload, NO_IMAGE, "no usable image" if "readme.txt" in entries else "image")


def test_the_engine_defaults_are_the_service_defaults_and_the_settings_reach_the_rules() -> None:
    from app.core.config import Settings
    from app.uploads import archive_limits

    defaults = Settings.model_fields
    limits = ArchiveLimits()
    assert limits.max_entries == defaults["MAX_ZIP_ENTRIES"].default
    assert limits.max_total_bytes == defaults["MAX_UNCOMPRESSED_BYTES"].default
    assert limits.max_entry_bytes == defaults["MAX_ENTRY_BYTES"].default
    assert limits.max_compression_ratio == defaults["MAX_COMPRESSION_RATIO"].default
    settings = Settings(_env_file=None, **SETTINGS_LIMITS)  # type: ignore[call-arg, arg-type]
    assert archive_limits(settings) == CLI_LIMITS
    assert archive_limits(settings, max_entries=3).max_entries == 3
