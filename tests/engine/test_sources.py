"""Tests for scan_engine.sources: listing folders, zips, files and arrays without decoding."""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scan_engine.data import ImageDecodeError, SkippedFile, load_npz
from scan_engine.sources import ImageSources, open_rgb, open_sources


def encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def picture(width: int = 40, height: int = 30, colour: tuple[int, int, int] = (200, 100, 50)):
    return Image.new("RGB", (width, height), colour)


@pytest.fixture()
def class_folder(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    (root / "cat").mkdir(parents=True)
    (root / "dog").mkdir()
    (root / ".hidden").mkdir()
    (root / "cat" / "a.png").write_bytes(encode(picture(), "PNG"))
    (root / "cat" / "b.jpg").write_bytes(encode(picture(), "JPEG"))
    (root / "dog" / "c.png").write_bytes(encode(picture(colour=(0, 0, 255)), "PNG"))
    (root / "dog" / "notes.txt").write_text("not an image")  # listed; refused when decoded
    (root / "dog" / "Thumbs.db").write_bytes(b"junk")
    (root / ".hidden" / "d.png").write_bytes(encode(picture(), "PNG"))
    return root


def test_folder_lists_without_decoding_and_labels_from_folders(class_folder: Path) -> None:
    sources = ImageSources.from_folder(class_folder, labels_from_folders=True)
    assert sources.ids == ["cat/a.png", "cat/b.jpg", "dog/c.png", "dog/notes.txt"]
    assert sources.class_names == ["cat", "dog"]
    assert sources.labels.tolist() == [0, 0, 1, 1]
    assert sources.kind == "folder" and sources.skipped == []
    assert sources.read(0) == class_folder / "cat" / "a.png"
    with pytest.raises(ImageDecodeError, match="not an image"):
        open_rgb(sources.read(3), 16)
    assert ImageSources.from_folder(class_folder).labels is None


def test_folder_signature_follows_the_file(class_folder: Path) -> None:
    sources = ImageSources.from_folder(class_folder)
    before = sources.signature(0)
    assert ImageSources.from_folder(class_folder).signature(0) == before  # stable
    (class_folder / "cat" / "a.png").write_bytes(encode(picture(41, 30), "PNG"))
    assert sources.signature(0) != before


def test_folder_item_that_vanished_is_a_read_error(class_folder: Path) -> None:
    sources = ImageSources.from_folder(class_folder)
    (class_folder / "cat" / "a.png").unlink()
    with pytest.raises(ImageDecodeError, match="not a regular file"):
        sources.read(0)
    assert sources.signature(0) == "missing"


def test_zip_lists_entries_and_refuses_unsafe_ones(tmp_path: Path) -> None:
    path = tmp_path / "upload.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("photos/cat/a.png", encode(picture(), "PNG"))
        archive.writestr("photos/dog/b.png", encode(picture(colour=(0, 0, 255)), "PNG"))
        archive.writestr("photos/dog/broken.jpg", b"\xff\xd8 not really")
        archive.writestr("../evil.png", encode(picture(), "PNG"))
        archive.writestr("__MACOSX/photos/._a.png", b"resource fork")
        archive.writestr("photos/", b"")
    with ImageSources.from_zip(path, labels_from_folders=True) as sources:
        assert sources.ids == ["photos/cat/a.png", "photos/dog/b.png", "photos/dog/broken.jpg"]
        assert sources.class_names == ["cat", "dog"]  # the wrapping folder is looked through
        assert sources.labels.tolist() == [0, 1, 1]
        reason = "unsafe path: escapes the archive's folder (..)"
        assert sources.skipped == [SkippedFile("../evil.png", reason)]
        data = sources.read(1)
        assert isinstance(data, bytes)
        assert np.asarray(open_rgb(data, 8))[0, 0].tolist() == [0, 0, 255]
        with pytest.raises(ImageDecodeError):
            open_rgb(sources.read(2), 8)
        signatures = {sources.signature(i) for i in range(len(sources))}
        assert len(signatures) == 3  # CRC + size from the zip directory


def test_files_keep_order_ids_and_labels(tmp_path: Path) -> None:
    first = tmp_path / "one.png"
    second = tmp_path / "two.png"
    first.write_bytes(encode(picture(), "PNG"))
    second.write_bytes(encode(picture(), "PNG"))
    sources = ImageSources.from_files(
        [("b", second), ("a", first)], labels=[1, 0], class_names=["x", "y"]
    )
    assert sources.ids == ["b", "a"]
    assert sources.paths == [str(second), str(first)]
    assert sources.read(1) == first
    assert sources.labels.tolist() == [1, 0]
    with pytest.raises(ValueError, match="unique"):
        ImageSources.from_files([("a", first), ("a", second)])
    with pytest.raises(ValueError, match="labels"):
        ImageSources.from_files([("a", first)], labels=[0, 1])


def test_array_items_are_views_with_content_signatures() -> None:
    images = np.zeros((3, 12, 10, 3), dtype=np.uint8)
    images[1] = 7
    sources = ImageSources.from_array(images, labels=[0, 1, 1], class_names=["a", "b"])
    assert sources.ids == ["000000", "000001", "000002"]
    assert np.shares_memory(sources.read(1), images)
    assert sources.signature(0) == sources.signature(2) != sources.signature(1)
    assert open_rgb(sources.read(1), 8).size == (10, 12)
    with pytest.raises(ValueError, match="uint8"):
        ImageSources.from_array(images.astype(np.float32))


def test_npz_rows_and_ids_match_the_collection_loader(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    path = tmp_path / "bench.npz"
    images = rng.integers(0, 256, (20, 16, 16, 3), dtype=np.uint8)
    np.savez(path, images=images, labels=np.arange(20) % 2, class_names=np.array(["a", "b"]))
    sources = ImageSources.from_npz(path, limit=5, seed=3)
    collection = load_npz(path, limit=5, seed=3)
    assert sources.ids == collection.ids
    assert sources.labels.tolist() == collection.labels.tolist()
    assert np.array_equal(sources.read(0), images[int(sources.ids[0])])
    assert open_sources(path).kind == "array"


def test_open_sources_by_what_the_path_is(class_folder: Path, tmp_path: Path) -> None:
    assert open_sources(class_folder).kind == "folder"
    path = tmp_path / "a.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("x.png", encode(picture(), "PNG"))
    with open_sources(path) as sources:
        assert sources.kind == "zip"
    with pytest.raises(FileNotFoundError):
        open_sources(tmp_path / "missing")
    (tmp_path / "plain.txt").write_text("hello")
    with pytest.raises(ValueError, match="not a folder"):
        open_sources(tmp_path / "plain.txt")


def test_open_rgb_converts_modes_and_drafts_large_jpegs(tmp_path: Path) -> None:
    transparent = Image.new("RGBA", (20, 20), (255, 0, 0, 0))
    assert np.asarray(open_rgb(encode(transparent, "PNG"), 8))[0, 0].tolist() == [255, 255, 255]
    gray = Image.new("L", (20, 20), 128)
    assert np.asarray(open_rgb(encode(gray, "PNG"), 8))[0, 0].tolist() == [128, 128, 128]
    large = tmp_path / "large.jpg"
    large.write_bytes(encode(picture(800, 600), "JPEG"))
    drafted = open_rgb(large, 100)
    assert drafted.mode == "RGB"
    assert min(drafted.size) >= 100 and drafted.size[0] < 800  # decoded at a reduced scale
    assert open_rgb(large, 1000).size == (800, 600)
    with pytest.raises(ImageDecodeError, match="empty"):
        open_rgb(b"", 8)
    with pytest.raises(ImageDecodeError, match="too small"):
        open_rgb(np.zeros((4, 4, 3), dtype=np.uint8), 8)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    sources = ImageSources.from_files([("f", fifo)])
    with pytest.raises(ImageDecodeError, match="not a regular file"):
        sources.read(0)
