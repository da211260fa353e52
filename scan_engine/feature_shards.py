"""One collection's backbone features embedded in shards (ranges of item positions), on several
workers, and put back together into the cache entry the features stage looks up.

A shard embeds its items with their positions in the whole collection, and the augmented views
are seeded by (seed, position), so the merged rows equal one pass over everything (up to the
float noise of other batch sizes). The merge is stored under `FeatureRecipe.cache_key`, so the
features stage then finds it "from cache" and nothing else in the pipeline changes. A shard's
rows travel as a file of the cache's own format (scan_engine.feature_cache) under a name of
their own, so that one module still reads and writes that format.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from scan_engine.embedding import EmbeddedFeatures
from scan_engine.feature_cache import FeatureCache, content_key
from scan_engine.sources import ImageSources
from scan_engine.stages.features import FeatureRecipe

__all__ = ["shard_ranges", "shard_name", "save_shard", "load_shard", "merge_shards", "save_merged"]


def shard_ranges(count: int, shard_size: int) -> list[range]:
    """Item positions 0..count-1 in consecutive ranges of `shard_size` (the last one shorter)."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    return [range(start, min(start + shard_size, count)) for start in range(0, count, shard_size)]


def shard_name(cache_key: str, index: int) -> str:
    """The file name (without .npz) of shard `index` of the entry `cache_key`."""
    return f"{cache_key}.shard{index:05d}"


def save_shard(folder: Path, cache_key: str, index: int, part: EmbeddedFeatures) -> Path:
    """Write one shard's rows to `folder` (whole file, renamed into place); its path."""
    return FeatureCache(folder).save(shard_name(cache_key, index), part)


def load_shard(folder: Path, cache_key: str, index: int) -> EmbeddedFeatures | None:
    """The shard's rows from `folder`, or None when its file is missing or unreadable (written
    for another shard or entry, torn): embed that shard again."""
    return FeatureCache(folder).load(shard_name(cache_key, index))


def merge_shards(
    parts: Sequence[tuple[range, EmbeddedFeatures]], sources: ImageSources
) -> EmbeddedFeatures:
    """One EmbeddedFeatures from (range, rows) shards that tile 0..len(sources)-1 in order.

    Raises ValueError when the ranges leave a gap or overlap, or a shard holds rows of items
    outside its range: a merge that would silently drop or repeat images.
    """
    expected = 0
    for items, part in parts:
        if items.start != expected or items.step != 1:
            raise ValueError(f"shard {items} does not start at item {expected}")
        positions = part.positions
        if len(positions) and (
            positions.min() < items.start
            or positions.max() >= items.stop
            or np.any(np.diff(positions) <= 0)
        ):
            raise ValueError(f"shard {items} holds rows of items outside it, or out of order")
        if [sources.ids[i] for i in positions] != part.ids:
            raise ValueError(f"shard {items} names other images than the collection")
        expected = items.stop
    if expected != len(sources):
        raise ValueError(f"the shards cover {expected} of {len(sources)} items")
    rows = [part for _, part in parts]
    if not rows:
        raise ValueError("no shards to merge")
    views = {part.num_views for part in rows}
    if len(views) > 1:
        raise ValueError(f"shards with different numbers of augmented views: {sorted(views)}")
    dims = {int(part.features.shape[1]) for part in rows}
    if len(dims) > 1:
        raise ValueError(f"shards with different feature sizes: {sorted(dims)}")
    augmented = None
    if rows and rows[0].augmented is not None:
        augmented = torch.cat([part.augmented for part in rows], dim=1)  # type: ignore[misc]
    # The rate of one worker: total rows over the summed time the shards took.
    seconds = sum(len(part) / part.images_per_s for part in rows if part.images_per_s > 0)
    total = sum(len(part) for part in rows)
    skipped = {item for part in rows for item in part.skipped} | set(sources.skipped)
    merged = EmbeddedFeatures(
        features=torch.cat([part.features for part in rows], dim=0),  # (N, D)
        augmented=augmented,  # (V, N, D) or None
        ids=[image_id for part in rows for image_id in part.ids],
        positions=np.concatenate([part.positions for part in rows]).astype(np.int64),
        skipped=sorted(skipped, key=lambda item: item.path),
        images_per_s=total / seconds if seconds > 0 else 0.0,
    )
    return merged.with_labels_from(sources)


def save_merged(
    recipe: FeatureRecipe,
    sources: ImageSources,
    parts: Sequence[tuple[range, EmbeddedFeatures]],
) -> tuple[str, Path]:
    """Merge the shards and store them as the cache entry of `sources`: (key, path)."""
    merged = merge_shards(parts, sources)
    key = recipe.cache_key(content_key(sources))
    return key, recipe.cache.save(key, merged)
