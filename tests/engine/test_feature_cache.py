"""Tests for scan_engine.feature_cache: a second job reuses the features (the backbone is not run
again), keys separate what matters, torn entries are recomputed, writes are atomic."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from scan_engine.embedding import Preprocessing
from scan_engine.feature_cache import FeatureCache, cached_embedding, content_key
from scan_engine.runtime import resolve_runtime
from scan_engine.sources import ImageSources

PREPROCESSING = Preprocessing(16, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), crop_pct=1.0)
RUNTIME = resolve_runtime("cpu", "float32")


class CountingBackbone(nn.Module):
    """A tiny backbone that counts the images it has embedded."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.images_seen = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.images_seen += x.shape[0]
        return self.conv(x).mean(dim=(2, 3))  # (B, 6)


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    rng = np.random.default_rng(0)
    for name in ["a/1.png", "a/2.png", "b/3.png", "b/4.png"]:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(path)
    (root / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    return root


def run(cache: FeatureCache, sources: ImageSources, module: nn.Module, **options: object):
    settings: dict[str, object] = {
        "backbone_name": "tiny/conv:v1",
        "weights_sha256": "ab" * 32,
        "preprocessing": PREPROCESSING,
        "runtime": RUNTIME,
        "batch_size": 3,
    }
    settings.update(options)
    return cached_embedding(cache, sources, module, **settings)  # type: ignore[arg-type]


def test_a_second_job_reuses_the_cached_features(folder: Path, tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path / "cache")
    module = CountingBackbone()
    first, from_cache = run(cache, ImageSources.from_folder(folder), module, augmented_views=2)
    assert not from_cache and module.images_seen == 4 * 3  # 4 usable images, 1 + 2 views
    assert [item.path for item in first.skipped] == ["b/broken.png"]

    second_module = CountingBackbone()
    sources = ImageSources.from_folder(folder, labels_from_folders=True)  # another job's listing
    second, from_cache = run(cache, sources, second_module, augmented_views=2)
    assert from_cache
    assert second_module.images_seen == 0  # not embedded again
    assert torch.equal(second.features, first.features)
    assert torch.equal(second.augmented, first.augmented)
    assert second.ids == first.ids and second.positions.tolist() == first.positions.tolist()
    assert second.skipped == first.skipped
    assert second.labels.tolist() == [0, 0, 1, 1] and second.class_names == ["a", "b"]
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [
        cache.key(
            content_key(sources),
            "tiny/conv:v1",
            "ab" * 32,
            16,
            2,
            preprocessing=PREPROCESSING.describe(),
        )
        + ".npz"
    ]  # one entry, no temporary files left behind


def test_an_entry_with_views_serves_a_job_without_views_but_not_the_reverse(
    folder: Path, tmp_path: Path
) -> None:
    cache = FeatureCache(tmp_path / "cache")
    with_views, _ = run(
        cache, ImageSources.from_folder(folder), CountingBackbone(), augmented_views=2
    )

    module = CountingBackbone()
    plain, from_cache = run(
        cache, ImageSources.from_folder(folder), module, augmented_views=0, reusable_views=(2,)
    )
    assert from_cache and module.images_seen == 0
    assert torch.equal(plain.features, with_views.features) and plain.augmented is None
    assert len(list((tmp_path / "cache").iterdir())) == 1  # nothing new written

    # Without the allowance a job without views embeds; views are never made up from a plain
    # entry (here in a cache of its own, which holds only that one).
    plain_only = FeatureCache(tmp_path / "plain")
    module = CountingBackbone()
    _, from_cache = run(plain_only, ImageSources.from_folder(folder), module, augmented_views=0)
    assert not from_cache and module.images_seen == 4
    module = CountingBackbone()
    viewed, from_cache = run(
        plain_only, ImageSources.from_folder(folder), module, augmented_views=2, reusable_views=(0,)
    )
    assert not from_cache and viewed.num_views == 2 and module.images_seen == 4 * 3


def test_keys_separate_backbone_weights_size_views_seed_and_preprocessing() -> None:
    cache = FeatureCache("unused")
    base = {
        "content_key": "c" * 64,
        "backbone_name": "vit_small_patch14_dinov2.lvd142m",
        "weights_sha256": "ab" * 32,
        "input_size": 224,
        "augmented_views": 0,
    }
    key = cache.key(**base)  # type: ignore[arg-type]
    assert key.startswith("vit_small_patch14_dinov2.lvd142m-224px-v0-")
    assert cache.key(**base) == key  # type: ignore[arg-type]
    changes = [
        {"content_key": "d" * 64},
        {"backbone_name": "convnext_tiny"},
        {"weights_sha256": "cd" * 32},
        {"input_size": 256},
        {"augmented_views": 2},
    ]
    keys = {cache.key(**{**base, **change}) for change in changes}  # type: ignore[arg-type]
    assert len(keys) == len(changes) and key not in keys
    assert cache.key(**base, seed=3) == key  # type: ignore[arg-type]  # no views: no seed
    with_views = {**base, "augmented_views": 2}
    assert cache.key(**with_views, seed=3) != cache.key(**with_views)  # type: ignore[arg-type]
    other_crop = Preprocessing(224, (0.5,) * 3, (0.5,) * 3, crop_pct=1.0).describe()
    assert cache.key(**base, preprocessing=other_crop) != key  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not a feature cache key"):
        cache.path("../escape")


def test_content_key_follows_the_images(folder: Path) -> None:
    before = content_key(ImageSources.from_folder(folder))
    assert content_key(ImageSources.from_folder(folder, labels_from_folders=True)) == before
    Image.new("RGB", (30, 30), (1, 2, 3)).save(folder / "a" / "1.png")
    assert content_key(ImageSources.from_folder(folder)) != before
    images = np.zeros((3, 8, 8, 3), dtype=np.uint8)
    array_key = content_key(ImageSources.from_array(images))
    images[2, 0, 0, 0] = 1
    assert content_key(ImageSources.from_array(images)) != array_key


def test_a_torn_entry_is_ignored_and_recomputed(
    folder: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = FeatureCache(tmp_path / "cache")
    first, _ = run(cache, ImageSources.from_folder(folder), CountingBackbone())
    (entry,) = (tmp_path / "cache").iterdir()
    entry.write_bytes(entry.read_bytes()[: entry.stat().st_size // 2])  # a crash mid-write

    module = CountingBackbone()
    with caplog.at_level(logging.WARNING, logger="scan_engine.feature_cache"):
        again, from_cache = run(cache, ImageSources.from_folder(folder), module)
    assert not from_cache and module.images_seen == 4
    assert "ignoring unreadable feature cache entry" in caplog.text
    assert torch.equal(again.features, first.features)
    _, from_cache = run(cache, ImageSources.from_folder(folder), CountingBackbone())
    assert from_cache  # the recomputed entry was written whole


def test_an_entry_for_another_key_is_not_used(folder: Path, tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path / "cache")
    sources = ImageSources.from_folder(folder)
    embedded, _ = run(cache, sources, CountingBackbone())
    (entry,) = (tmp_path / "cache").iterdir()
    os.replace(entry, cache.path("renamed-entry"))
    assert cache.load("renamed-entry") is None
    assert cache.load("never-written") is None


def test_a_failed_write_leaves_nothing_behind(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = FeatureCache(tmp_path / "cache")
    embedded, _ = run(cache, ImageSources.from_folder(folder), CountingBackbone())
    key = "other-key"

    def failing_replace(source: str, target: Path) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        cache.save(key, embedded)
    assert not cache.path(key).exists()
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.endswith(".tmp")]
