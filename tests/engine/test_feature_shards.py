"""Sharded embedding (scan_engine.feature_shards) with the bundled EfficientNet-Lite0 weights:
shards embedded apart and merged equal one pass over the collection (plain and augmented views,
skipped files), are stored under the key the features stage looks up, and the stage then reads
them from the cache; a merge that would drop or repeat images is refused."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from scan_engine import pipeline
from scan_engine.config import make_config
from scan_engine.feature_cache import FeatureCache, content_key
from scan_engine.feature_shards import (
    load_shard,
    merge_shards,
    save_merged,
    save_shard,
    shard_ranges,
)
from scan_engine.runtime import resolve_runtime
from scan_engine.sample_data import make_shapes_collection
from scan_engine.sources import ImageSources
from scan_engine.stages.features import FeatureRecipe

pytestmark = pytest.mark.slow

# Self-labeling on, so that the shards carry augmented views too.
FAST = {"image_size": 64, "scan": {"epochs": 5}, "selflabel": {"enabled": True, "epochs": 2}}


@dataclasses.dataclass
class Sharded:
    config: object  # ScanConfig
    recipe: FeatureRecipe
    sources: ImageSources
    ranges: list[range]
    parts: list  # (range, EmbeddedFeatures) per shard, as read back from its file
    whole: object  # EmbeddedFeatures of one pass


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> Sharded:
    """22 shapes (one of them broken), embedded in one pass and in shards of 8."""
    root = make_shapes_collection(
        tmp_path_factory.mktemp("shapes"), classes=3, per_class=7, image_size=48, seed=2
    )
    (root / "green_square" / "broken.png").write_bytes(b"not a picture")  # skipped in a shard
    cache = tmp_path_factory.mktemp("cache")
    config = make_config("pretrained", num_clusters=3, feature_cache_dir=str(cache), **FAST)
    runtime = resolve_runtime("cpu", config.precision)
    recipe = FeatureRecipe.for_config(config, cache)
    sources = ImageSources.from_folder(root, labels_from_folders=True)
    one_pass = dataclasses.replace(recipe, cache=FeatureCache(tmp_path_factory.mktemp("one")))
    whole, from_cache = one_pass.cached(sources, runtime)
    assert not from_cache
    key = recipe.cache_key(content_key(sources))
    transfer = tmp_path_factory.mktemp("transfer")
    ranges = shard_ranges(len(sources), 8)
    for index, items in enumerate(ranges):  # as each worker does: embed, write, send
        save_shard(transfer, key, index, recipe.embed(sources, runtime, items=items))
    parts = [(items, load_shard(transfer, key, i)) for i, items in enumerate(ranges)]
    return Sharded(config, recipe, sources, ranges, parts, whole)


def test_shards_merged_equal_one_pass_and_the_stage_reads_them_from_cache(
    sharded: Sharded, tmp_path: Path
) -> None:
    recipe, sources, whole = sharded.recipe, sharded.sources, sharded.whole
    assert len(sources) == 22 and len(whole) == 21 and whole.num_views == 2
    assert [(r.start, r.stop) for r in sharded.ranges] == [(0, 8), (8, 16), (16, 22)]
    assert all(part is not None for _, part in sharded.parts)
    key, path = save_merged(recipe, sources, sharded.parts)
    assert path == recipe.cache.root / f"{key}.npz"
    # What a job without views would look for (and so need not shard): its own entry or this.
    viewless = dataclasses.replace(recipe, augmented_views=0)
    content = content_key(sources)
    assert viewless.accepted_keys(content) == [viewless.cache_key(content), key]
    assert recipe.accepted_keys(content) == [key]

    merged = recipe.cache.load(key)
    assert merged is not None
    assert merged.ids == whole.ids and merged.positions.tolist() == whole.positions.tolist()
    assert merged.skipped == whole.skipped and any("broken" in s.path for s in merged.skipped)
    # Other batch compositions move the float16 rows by a rounding step at most.
    torch.testing.assert_close(merged.features, whole.features, atol=2e-3, rtol=1e-2)
    assert merged.augmented is not None and whole.augmented is not None
    torch.testing.assert_close(merged.augmented, whole.augmented, atol=2e-3, rtol=1e-2)

    result = pipeline.run(sources, sharded.config, tmp_path / "work")
    assert result.report["backbone"]["from_cache"] is True
    assert result.metrics["features"]["embedded"] == 21
    assert result.result_for(3).assignments.shape == (21,)


def test_a_merge_that_would_drop_or_repeat_images_is_refused(sharded: Sharded) -> None:
    sources, parts = sharded.sources, sharded.parts
    assert len(merge_shards(parts, sources)) == 21
    with pytest.raises(ValueError, match="does not start"):
        merge_shards(parts[1:], sources)  # the first shard missing
    with pytest.raises(ValueError, match="cover 16 of 22"):
        merge_shards(parts[:2], sources)  # the last one missing
    with pytest.raises(ValueError, match="does not start"):
        merge_shards([parts[0], parts[0], parts[1], parts[2]], sources)  # one twice
    with pytest.raises(ValueError, match="outside"):
        merge_shards([(parts[0][0], parts[1][1]), (parts[1][0], parts[0][1])], sources)
    with pytest.raises(ValueError, match="step-1 range"):
        sharded.recipe.embed(sources, resolve_runtime("cpu"), items=range(20, 30))
