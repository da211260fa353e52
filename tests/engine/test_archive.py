"""scan_engine.archive on its own: typed limits, entry names, folder labels, reading bounds.

The hostile zips themselves are tested at every door in tests/app/test_hostile_archives.py.
"""

from __future__ import annotations

import struct
import zipfile
from pathlib import Path

import pytest

from scan_engine.archive import (
    ArchiveLimitError,
    ArchiveLimits,
    EntryRefused,
    NotAZipError,
    entry_path,
    folder_labels,
    looks_like_archive,
    looks_like_zip,
    open_untrusted_zip,
)


def _write_zip(path: Path, entries: dict[str, bytes], method: int = zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", compression=method) as archive:
        for name, payload in entries.items():
            archive.writestr(name, payload)
    return path


@pytest.mark.parametrize(
    "fields",
    [
        {"max_entries": 0},
        {"max_total_bytes": -1},
        {"max_entry_bytes": 1.5},
        {"max_path_chars": True},
        {"max_compression_ratio": 1.0},
    ],
)
def test_limits_refuse_nonsense(fields: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=next(iter(fields))):
        ArchiveLimits(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("name", "relative", "reason"),
    [
        ("cats/a.png", "cats/a.png", None),
        ("cats\\b.png", "cats/b.png", None),
        ("./cats//c.png", "cats/c.png", None),
        ("../x.png", None, "(..)"),
        ("a/../../x.png", None, "(..)"),
        ("/etc/x.png", None, "absolute path"),
        ("C:x.png", None, "absolute path"),
        ("a\x00.png", None, "NUL"),
        ("a\x7f.png", None, "control character"),
        ("__MACOSX/._a.png", None, None),
        ("cats/.DS_Store", None, None),
        ("Thumbs.db", None, None),
    ],
)
def test_entry_paths(name: str, relative: str | None, reason: str | None) -> None:
    got_relative, got_reason = entry_path(name)
    assert got_relative == relative
    assert (got_reason is None) == (reason is None)
    if reason is not None:
        assert reason in got_reason  # type: ignore[operator]
    assert entry_path("a/" + "x" * 30, max_chars=20) == (None, "path longer than 20 characters")


def test_folder_labels_look_through_one_wrapping_folder() -> None:
    assert folder_labels(["dogs/1.png", "cats/2.png", "cats/x/3.png"]) == (
        [1, 0, 0],
        ["cats", "dogs"],
    )
    assert folder_labels(["photos/dogs/1.png", "photos/cats/2.png"]) == ([1, 0], ["cats", "dogs"])
    assert folder_labels(["dogs/1.png", "top.png"]) == (None, None)
    assert folder_labels([]) == (None, None)


def test_magic_bytes() -> None:
    assert looks_like_zip(b"PK\x03\x04rest") and looks_like_zip(b"PK\x05\x06")
    assert not looks_like_zip(b"\x89PNG") and not looks_like_zip(b"")
    assert looks_like_archive(b"\x1f\x8b\x08") and looks_like_archive(b"Rar!\x1a")
    assert not looks_like_archive(b"\xff\xd8\xff\xe0") and not looks_like_archive(b"BM")


def test_members_are_sorted_and_reading_is_bounded(tmp_path: Path) -> None:
    path = _write_zip(tmp_path / "a.zip", {"b/2.png": b"two", "a/1.png": b"one", "../x": b"x"})
    with open_untrusted_zip(path) as archive:
        assert list(archive.members) == ["a/1.png", "b/2.png"]
        assert [entry.path for entry in archive.refused] == ["../x"]
        assert archive.read("a/1.png") == b"one"
        size, sha256 = archive.copy_to("b/2.png", tmp_path / "out")
        assert (size, (tmp_path / "out").read_bytes()) == (3, b"two") and len(sha256) == 64


def test_a_lying_header_is_a_corrupt_entry_and_leaves_no_file(tmp_path: Path) -> None:
    payload = bytearray(_write_zip(tmp_path / "lie.zip", {"lie.png": b"x" * 500}).read_bytes())
    central = payload.rindex(b"PK\x01\x02")
    payload[central + 24 : central + 28] = struct.pack("<I", 10)  # claims 10 bytes
    (tmp_path / "lie.zip").write_bytes(bytes(payload))
    with (
        open_untrusted_zip(tmp_path / "lie.zip") as archive,
        pytest.raises(EntryRefused, match="corrupt zip entry"),
    ):
        archive.copy_to("lie.png", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_running_total_is_capped(tmp_path: Path) -> None:
    # Declared sizes within the limit; reading past it (here: the same entry read twice) stops.
    path = _write_zip(tmp_path / "t.zip", {"a.bin": bytes(600)}, zipfile.ZIP_STORED)
    with open_untrusted_zip(path, ArchiveLimits(max_total_bytes=1000)) as archive:
        archive.read("a.bin")
        with pytest.raises(ArchiveLimitError, match="more than 1000 bytes"):
            archive.read("a.bin")


def test_not_a_zip_is_also_a_bad_zip_file(tmp_path: Path) -> None:
    (tmp_path / "x.zip").write_bytes(b"plain text")
    with pytest.raises(zipfile.BadZipFile):
        open_untrusted_zip(tmp_path / "x.zip")
    with pytest.raises(NotAZipError, match="not a zip archive"):
        open_untrusted_zip(tmp_path / "x.zip")
