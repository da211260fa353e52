"""Backbone features cached per collection, so that a later job on the same images never embeds
again (another K, overclustering, another seed for the heads).

A cache entry is one uncompressed .npz under the cache folder, named by `FeatureCache.key`: the
collection's content key (ids + each item's signature, see `content_key`), the backbone name,
its weights' sha256, the preprocessing, the number of augmented views and their seed. Writes go
to a temporary file that is renamed into place, so a reader sees a whole entry or none; an entry
that cannot be read (torn by a crash, another format) is ignored with a warning and recomputed.
This module is the only one that reads or writes the format (CACHE_FORMAT).

The runtime's precision is not part of the key: features computed under bf16 autocast and in
float32 differ in the third decimal, and either serves a later job equally well.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from scan_engine.data import SkippedFile
from scan_engine.embedding import EmbeddedFeatures, Preprocessing, embed_sources
from scan_engine.runtime import Runtime
from scan_engine.sources import ImageSources

__all__ = ["CACHE_FORMAT", "FeatureCache", "content_key", "cached_embedding"]

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1
_KEY_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def content_key(sources: ImageSources) -> str:
    """A stable digest of what the collection holds: its kind, ids in order and item signatures.

    Cheap: a stat per file (size + mtime), the zip directory's CRCs, or a hash of array rows;
    no image is decoded. Items skipped at listing are not part of it.
    """
    digest = hashlib.sha256(f"{sources.kind}\n{len(sources)}\n".encode())
    for index, image_id in enumerate(sources.ids):
        digest.update(f"{image_id}\t{sources.signature(index)}\n".encode())
    return digest.hexdigest()


class FeatureCache:
    """Cached EmbeddedFeatures under `root`, one file per key."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def key(
        self,
        content_key: str,
        backbone_name: str,
        weights_sha256: str,
        input_size: int,
        augmented_views: int,
        *,
        seed: int = 0,
        preprocessing: Mapping[str, Any] | None = None,
    ) -> str:
        """The entry name: readable backbone and size, then a digest of everything that matters.

        `preprocessing` (Preprocessing.describe()) separates weights used with another mean/std
        or crop; `seed` only matters when there are augmented views.
        """
        identity = {
            "format": CACHE_FORMAT,
            "content": content_key,
            "backbone": backbone_name,
            "weights_sha256": weights_sha256,
            "input_size": int(input_size),
            "augmented_views": int(augmented_views),
            "seed": int(seed) if augmented_views else None,
            "preprocessing": None if preprocessing is None else dict(preprocessing),
        }
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]
        readable = re.sub(r"[^A-Za-z0-9._-]+", "_", backbone_name).strip("._-")[:60] or "backbone"
        return f"{readable}-{int(input_size)}px-v{int(augmented_views)}-{digest}"

    def entry_key(
        self,
        content: str,
        *,
        backbone_name: str,
        weights_sha256: str,
        preprocessing: Preprocessing,
        augmented_views: int,
        seed: int = 0,
    ) -> str:
        """The key `cached_embedding` looks a collection up under; `content`: its content_key."""
        return self.key(
            content,
            backbone_name,
            weights_sha256,
            preprocessing.input_size,
            augmented_views,
            seed=seed,
            preprocessing=preprocessing.describe(),
        )

    def path(self, key: str) -> Path:
        if not _KEY_PATTERN.match(key):
            raise ValueError(f"not a feature cache key: {key!r}")
        return self.root / f"{key}.npz"

    def load(self, key: str) -> EmbeddedFeatures | None:
        """The entry for `key`, or None when there is none or it cannot be read (a warning)."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            return _read_entry(path, key)
        except Exception as exc:  # torn or foreign file: np.load and the checks raise many types
            logger.warning("ignoring unreadable feature cache entry %s: %s", path, exc)
            return None

    def save(self, key: str, embedded: EmbeddedFeatures) -> Path:
        """Write the entry for `key` atomically (temporary file, then rename); returns its path."""
        path = self.path(key)
        self.root.mkdir(parents=True, exist_ok=True)
        meta = {
            "format": CACHE_FORMAT,
            "key": key,
            "ids": embedded.ids,
            "skipped": [[item.path, item.reason] for item in embedded.skipped],
            "images_per_s": embedded.images_per_s,
        }
        arrays: dict[str, np.ndarray] = {
            "meta": np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8),
            "features": embedded.features.contiguous().numpy(),
            "positions": embedded.positions,
        }
        if embedded.augmented is not None:
            arrays["augmented"] = embedded.augmented.contiguous().numpy()
        descriptor, temporary = tempfile.mkstemp(dir=self.root, prefix=f".{key}.", suffix=".tmp")
        try:
            with os.fdopen(descriptor, "wb") as handle:
                np.savez(handle, **arrays)  # type: ignore[arg-type]  # stubs: kwargs
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        logger.info("cached features for %d images in %s", len(embedded), path)
        return path


def _read_entry(path: Path, key: str) -> EmbeddedFeatures:
    with np.load(path, allow_pickle=False) as data:
        meta = json.loads(data["meta"].tobytes().decode("utf-8"))
        if meta.get("format") != CACHE_FORMAT:
            raise ValueError(f"format {meta.get('format')!r}, expected {CACHE_FORMAT}")
        if meta.get("key") != key:
            raise ValueError(f"written for key {meta.get('key')!r}")
        features = torch.from_numpy(data["features"])
        augmented = torch.from_numpy(data["augmented"]) if "augmented" in data.files else None
        positions = data["positions"].astype(np.int64, copy=False)
    return EmbeddedFeatures(
        features=features,
        augmented=augmented,
        ids=[str(image_id) for image_id in meta["ids"]],
        positions=positions,
        skipped=[SkippedFile(str(p), str(reason)) for p, reason in meta["skipped"]],
        images_per_s=float(meta["images_per_s"]),
    )


def cached_embedding(
    cache: FeatureCache,
    sources: ImageSources,
    module: nn.Module,
    *,
    backbone_name: str,
    weights_sha256: str,
    preprocessing: Preprocessing,
    runtime: Runtime,
    batch_size: int | None = None,
    decode_workers: int = 2,
    augmented_views: int = 0,
    seed: int = 0,
    reusable_views: Sequence[int] = (),
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> tuple[EmbeddedFeatures, bool]:
    """The collection's features from the cache, else streamed and cached: (features, from_cache).

    Labels and class names always come from `sources` (they depend on how it was listed).
    With `augmented_views` 0, an entry cached with one of `reusable_views` views also serves
    (same plain rows; its views are dropped), before anything is embedded.
    """
    content = content_key(sources)

    def key_with(views: int) -> str:
        return cache.entry_key(
            content,
            backbone_name=backbone_name,
            weights_sha256=weights_sha256,
            preprocessing=preprocessing,
            augmented_views=views,
            seed=seed,
        )

    key = key_with(augmented_views)
    lookups = [key] + ([key_with(v) for v in reusable_views] if augmented_views == 0 else [])
    for lookup in lookups:
        cached = cache.load(lookup)
        if cached is not None and _matches(cached, sources):
            logger.info("features for %d images from the cache (%s)", len(cached), lookup)
            if lookup != key:
                cached = dataclasses.replace(cached, augmented=None)
            # Listing-time refusals are not in the content key: report the current ones too.
            cached.skipped = sorted({*cached.skipped, *sources.skipped}, key=lambda item: item.path)
            return cached.with_labels_from(sources), True
    embedded = embed_sources(
        sources,
        module,
        preprocessing=preprocessing,
        runtime=runtime,
        batch_size=batch_size,
        decode_workers=decode_workers,
        augmented_views=augmented_views,
        seed=seed,
        progress=progress,
        should_stop=should_stop,
    )
    cache.save(key, embedded)
    return embedded, False


def _matches(cached: EmbeddedFeatures, sources: ImageSources) -> bool:
    """The entry's rows name the sources' items (guards against a hash collision or a bug)."""
    positions = cached.positions
    if len(positions) and (positions.min() < 0 or positions.max() >= len(sources)):
        logger.warning("feature cache entry does not fit the collection: recomputing")
        return False
    if [sources.ids[i] for i in positions] != cached.ids:
        logger.warning("feature cache entry names other images: recomputing")
        return False
    return True
