"""Stage 1 of the pretrained route, features: a named backbone (scan_engine.backbones) embeds
every image once, streamed from its sources (never all pixels in memory), with a few strongly
augmented views for self-labeling; the features are cached per collection, backbone, weights and
preprocessing (scan_engine.feature_cache), so a later run with another K embeds nothing.

Later stages see the embedded rows as the collection: an ImageCollection whose pixel tensor is
(N, 3, 0, 0), since on this route the training loops read only features and the row count.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from scan_engine.backbones import LoadedBackbone, get_spec, load_backbone
from scan_engine.config import ScanConfig
from scan_engine.data import ImageCollection
from scan_engine.embedding import EmbeddedFeatures, Preprocessing, embed_sources
from scan_engine.feature_cache import FeatureCache, cached_embedding, content_key
from scan_engine.models import FeatureInput
from scan_engine.runtime import Runtime
from scan_engine.sources import ImageSources
from scan_engine.stages.base import RunContext, RunState, Stage, StageReport
from scan_engine.stages.selflabel import CACHED_AUGMENTED_VIEWS

__all__ = [
    "FeatureRecipe",
    "FeaturesStage",
    "augmented_views_for",
    "as_sources",
    "listing_as_collection",
    "preprocessing_for",
    "rows_as_collection",
]


def preprocessing_for(config: ScanConfig) -> Preprocessing:
    """The backbone's own preprocessing at config.image_size (its input size unless overridden)."""
    assert config.pretrained_backbone is not None
    spec = get_spec(config.pretrained_backbone)
    return Preprocessing(config.image_size, spec.mean, spec.std, spec.crop_pct, spec.interpolation)


def augmented_views_for(config: ScanConfig) -> int:
    """Strongly augmented views to embed: only self-labeling reads them, and each costs one more
    backbone pass per image (two views triple the embedding time)."""
    selflabel = config.selflabel
    return CACHED_AUGMENTED_VIEWS if selflabel.enabled and selflabel.epochs > 0 else 0


@dataclass(frozen=True)
class FeatureRecipe:
    """How this stage embeds a collection for a config: the loaded backbone, its preprocessing
    at config.image_size, the augmented views self-labeling reads and their seed, and the cache.

    One object for the stage and for a pass split over several workers (scan_engine.
    feature_shards), so that the shards embed the same rows and their merge is stored under the
    very key this stage then looks up.
    """

    backbone: LoadedBackbone
    preprocessing: Preprocessing
    augmented_views: int
    seed: int
    cache: FeatureCache

    @classmethod
    def for_config(cls, config: ScanConfig, work_dir: str | Path) -> FeatureRecipe:
        """Loads the backbone; the cache is config.feature_cache_dir, else work_dir/features."""
        assert config.pretrained_backbone is not None
        return cls(
            backbone=load_backbone(config.pretrained_backbone, models_dir=config.models_dir),
            preprocessing=preprocessing_for(config),
            augmented_views=augmented_views_for(config),
            seed=config.seed,
            cache=FeatureCache(config.feature_cache_dir or Path(work_dir) / "features"),
        )

    def cache_key(self, content: str) -> str:
        """The cache entry of the collection whose content_key is `content`."""
        return self.cache.entry_key(
            content,
            backbone_name=self.backbone.spec.name,
            weights_sha256=self.backbone.weights_sha256,
            preprocessing=self.preprocessing,
            augmented_views=self.augmented_views,
            seed=self.seed,
        )

    @property
    def reusable_views(self) -> tuple[int, ...]:
        # Without views, an entry a self-labeling job cached with views serves as well.
        return () if self.augmented_views else (CACHED_AUGMENTED_VIEWS,)

    def accepted_keys(self, content: str) -> list[str]:
        """Every cache entry `cached` takes for that collection, its own first."""
        others = [replace(self, augmented_views=v).cache_key(content) for v in self.reusable_views]
        return [self.cache_key(content), *others]

    def embed(
        self,
        sources: ImageSources,
        runtime: Runtime,
        *,
        items: range | None = None,
        progress: Callable[[int, int], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> EmbeddedFeatures:
        """Embed `sources` (only `items`, rows keeping their global positions), uncached."""
        return embed_sources(
            sources,
            self.backbone.module,
            preprocessing=self.preprocessing,
            runtime=runtime,
            augmented_views=self.augmented_views,
            seed=self.seed,
            progress=progress,
            should_stop=should_stop,
            items=items,
        )

    def cached(
        self,
        sources: ImageSources,
        runtime: Runtime,
        *,
        progress: Callable[[int, int], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> tuple[EmbeddedFeatures, bool]:
        """The features of `sources` from the cache, else embedded and cached: (rows, cached)."""
        return cached_embedding(
            self.cache,
            sources,
            self.backbone.module,
            backbone_name=self.backbone.spec.name,
            weights_sha256=self.backbone.weights_sha256,
            preprocessing=self.preprocessing,
            runtime=runtime,
            augmented_views=self.augmented_views,
            seed=self.seed,
            reusable_views=self.reusable_views,
            progress=progress,
            should_stop=should_stop,
        )


def rows_as_collection(embedded: EmbeddedFeatures, paths: list[str]) -> ImageCollection:
    """The embedded rows as a collection for the later stages: ids, paths, labels, skipped."""
    return ImageCollection(
        images=torch.empty((len(embedded), 3, 0, 0), dtype=torch.uint8),
        ids=list(embedded.ids),
        paths=[paths[i] for i in embedded.positions],
        labels=embedded.labels,
        class_names=embedded.class_names,
        skipped=list(embedded.skipped),
    )


def as_sources(collection: ImageCollection | ImageSources) -> ImageSources:
    """The pretrained route's input: ImageSources as given, or an ImageCollection's rows."""
    if isinstance(collection, ImageSources):
        return collection
    sources = ImageSources.from_array(
        collection.images.permute(0, 2, 3, 1).contiguous().numpy(),  # (N, S, S, 3)
        labels=collection.labels,
        class_names=collection.class_names,
        ids=collection.ids,
        paths=collection.paths,
    )
    sources.skipped = list(collection.skipped)
    return sources


def listing_as_collection(sources: ImageSources) -> ImageCollection:
    """The listed items as a pixel-less collection, until the features stage has run."""
    return ImageCollection(
        images=torch.empty((len(sources), 3, 0, 0), dtype=torch.uint8),
        ids=list(sources.ids),
        paths=list(sources.paths),
        labels=sources.labels,
        class_names=sources.class_names,
        skipped=list(sources.skipped),
    )


class FeaturesStage(Stage):
    name = "features"
    weight = 0.9  # embedding is the run's cost; the heads take seconds
    weight_with_fixed_backbone = 0.9

    def settings(self, config: ScanConfig) -> dict[str, Any]:
        # What the features depend on beyond the weights (their sha256: result_key).
        return {
            "pretrained_backbone": config.pretrained_backbone,
            "image_size": config.image_size,
            "precision": config.precision,
            "seed": config.seed,
        }

    def checkpointed(self, config: ScanConfig) -> bool:
        return False  # the feature cache is this stage's checkpoint, shared across runs

    def result_key(self, payload: dict[str, Any]) -> str | None:
        return payload["cache_key"]

    def compute(self, ctx: RunContext, state: RunState) -> dict[str, Any]:
        config, sources = ctx.config, ctx.sources
        assert config.pretrained_backbone is not None and sources is not None
        ctx.reporter.update(self.name, 0.0, f"loading {config.pretrained_backbone}", force=True)
        recipe = FeatureRecipe.for_config(config, ctx.work_dir)
        backbone, preprocessing = recipe.backbone, recipe.preprocessing
        embedded, from_cache = recipe.cached(
            sources,
            ctx.runtime,
            progress=lambda done, total: ctx.reporter.update(
                "features", done / max(total, 1), f"embedding {done}/{total}"
            ),
            should_stop=ctx.reporter.should_stop,
        )
        return {
            "embedded": embedded,
            "from_cache": from_cache,
            "cache_key": f"{content_key(sources)}:{backbone.weights_sha256}",
            "paths": list(sources.paths),
            "backbone": {
                "name": backbone.spec.name,
                "weights_sha256": backbone.weights_sha256,
                "weights_source": backbone.weights_source,
                "preprocessing": preprocessing.describe(),
            },
        }

    def restore(self, ctx: RunContext, state: RunState, payload: dict[str, Any]) -> StageReport:
        embedded: EmbeddedFeatures = payload["embedded"]
        if len(embedded) < 2:
            from scan_engine.config import ConfigError

            raise ConfigError(f"only {len(embedded)} images could be embedded; at least 2 needed")
        ctx.collection = rows_as_collection(embedded, payload["paths"])
        # Unit-norm features for the kNN and the heads (as on every fixed-backbone route).
        features = F.normalize(embedded.features.float(), dim=1)  # (N, D)
        state.mined_features = state.head_features = features
        if embedded.augmented is not None:
            state.augmented_features = F.normalize(embedded.augmented.float(), dim=2)  # (V, N, D)
        state.backbone = FeatureInput(features.shape[1])  # type: ignore[assignment]
        state.backbone_reference = payload["backbone"]
        rate = None if payload["from_cache"] else float(embedded.images_per_s)
        details = {
            "route": "pretrained",
            **payload["backbone"],
            "image_size": ctx.config.image_size,
            "from_cache": bool(payload["from_cache"]),
            "images_per_s": rate,
            "embedded": len(embedded),
            "feature_dim": int(features.shape[1]),
        }
        return StageReport(images_per_s=rate, metrics={"features": details})
