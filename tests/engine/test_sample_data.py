"""Tests for scan_engine.sample_data: real files, determinism, zip variant, distinct classes."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest
from PIL import Image

from scan_engine.data import load_folder, load_zip
from scan_engine.sample_data import (
    SHAPES,
    make_shapes_arrays,
    make_shapes_collection,
    make_shapes_zip,
    shape_class_names,
)


def test_collection_writes_real_files_in_class_folders(tmp_path):
    root = make_shapes_collection(tmp_path / "shapes", classes=4, per_class=5, image_size=32)
    assert root == tmp_path / "shapes"
    names = shape_class_names(4)
    assert names == ["red_circle", "green_square", "blue_triangle", "yellow_cross"]
    assert sorted(p.name for p in root.iterdir()) == sorted(names)
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    assert len(files) == 20
    assert "red_circle/0000.png" in files and "red_circle/0001.jpg" in files
    with Image.open(root / "red_circle" / "0001.jpg") as image:
        assert image.format == "JPEG" and image.size == (32, 32) and image.mode == "RGB"
    with Image.open(root / "blue_triangle" / "0004.png") as image:
        assert image.format == "PNG"

    collection = load_folder(root, image_size=32, labels_from_folders=True)
    assert len(collection) == 20 and collection.skipped == []
    assert collection.class_names == sorted(names)


def test_same_seed_same_files_other_seed_other_files(tmp_path):
    a = make_shapes_collection(tmp_path / "a", classes=2, per_class=3, image_size=24, seed=3)
    b = make_shapes_collection(tmp_path / "b", classes=2, per_class=3, image_size=24, seed=3)
    c = make_shapes_collection(tmp_path / "c", classes=2, per_class=3, image_size=24, seed=4)
    relative = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert all((a / r).read_bytes() == (b / r).read_bytes() for r in relative)
    assert any((a / r).read_bytes() != (c / r).read_bytes() for r in relative)


def test_zip_matches_folder(tmp_path):
    options = {"classes": 3, "per_class": 4, "image_size": 24, "formats": ("png", "jpg", "webp")}
    root = make_shapes_collection(tmp_path / "shapes", **options)
    zip_path = make_shapes_zip(tmp_path / "out" / "shapes.zip", **options)
    with zipfile.ZipFile(zip_path) as archive:
        names = sorted(archive.namelist())
        assert names == sorted(p.relative_to(root).as_posix() for p in root.rglob("*.*"))
        assert all(archive.read(n) == (root / n).read_bytes() for n in names)
    assert make_shapes_zip(tmp_path / "again.zip", **options).read_bytes() == zip_path.read_bytes()
    loaded = load_zip(zip_path, image_size=24, labels_from_folders=True)
    assert len(loaded) == 12 and loaded.class_names == sorted(shape_class_names(3))


def test_arrays_equal_the_png_files(tmp_path):
    images, labels, names = make_shapes_arrays(classes=3, per_class=2, image_size=20, seed=1)
    assert images.shape == (6, 20, 20, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(labels, [0, 0, 1, 1, 2, 2])
    root = make_shapes_collection(tmp_path, classes=3, per_class=2, image_size=20, seed=1)
    with Image.open(root / names[1] / "0000.png") as image:
        np.testing.assert_array_equal(np.asarray(image), images[2])


def foreground_colour(image: np.ndarray) -> np.ndarray:
    """Mean colour of the pixels that differ most from the image's own background (its border)."""
    pixels = image.astype(float)  # (S, S, 3)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    distance = np.abs(pixels - np.median(border, axis=0)).sum(-1)  # (S, S)
    return pixels[distance >= np.quantile(distance, 0.9)].mean(0)


def test_all_twelve_classes_have_distinct_dominant_colours():
    """Nearest class mean of the foreground colour tells all 12 classes apart on held-out images."""
    images, labels, _ = make_shapes_arrays(classes=len(SHAPES), per_class=16, image_size=32)
    features = np.stack([foreground_colour(image) for image in images])  # (N, 3)
    train = np.arange(len(labels)) % 2 == 0
    means = np.stack([features[train & (labels == k)].mean(0) for k in range(len(SHAPES))])
    distances = ((features[~train, None, :] - means[None]) ** 2).sum(-1)
    assert (distances.argmin(1) == labels[~train]).mean() >= 0.95


def test_images_vary_within_a_class():
    images, _, _ = make_shapes_arrays(classes=1, per_class=8, image_size=32)
    # Position, size, rotation and background differ: no two images are near-identical.
    flat = images.reshape(8, -1).astype(float)
    pairwise = np.abs(flat[:, None] - flat[None]).mean(-1)
    assert pairwise[~np.eye(8, dtype=bool)].min() > 5


@pytest.mark.parametrize(
    "arguments",
    [{"classes": 0}, {"classes": 13}, {"per_class": 0}, {"image_size": 8}, {"formats": ("heic",)}],
)
def test_bad_arguments_raise(tmp_path, arguments):
    with pytest.raises(ValueError):
        make_shapes_collection(tmp_path, **arguments)
