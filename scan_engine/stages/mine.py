"""Stage 2, mine: embed every image (L2-normalised pretext output: the 128-d projection for
SimCLR, the backbone's features for a pretrained one), its K nearest neighbours by exact inner
product, their purity and the k-means baseline when labels are known."""

from __future__ import annotations

from typing import Any

import torch

from scan_engine import metrics
from scan_engine.config import ScanConfig
from scan_engine.data import ImageCollection
from scan_engine.neighbors import extract_features, knn, purity_at
from scan_engine.stages.base import RunContext, RunState, Stage, StageReport

__all__ = ["MineStage", "kmeans_baseline"]


def kmeans_baseline(
    features: torch.Tensor, collection: ImageCollection, num_clusters: int, seed: int
) -> dict[str, Any] | None:
    """Pretext features + k-means: the paper's baseline, only computed when labels are known."""
    if collection.labels is None:
        return None
    from sklearn.cluster import KMeans

    predictions = KMeans(num_clusters, n_init=3, random_state=seed).fit_predict(features.numpy())
    num_classes = len(collection.class_names) if collection.class_names else None
    return metrics.evaluate(
        collection.labels, predictions, num_classes=num_classes, num_clusters=num_clusters
    )


class MineStage(Stage):
    name = "mine"
    weight = 0.03
    weight_with_fixed_backbone = 0.03
    rate_from_wall_time = True

    def settings(self, config: ScanConfig) -> dict[str, Any]:
        # The k-means baseline kept with the mined neighbours is computed for num_clusters.
        return {"num_neighbors": config.scan.num_neighbors, "num_clusters": config.num_clusters}

    def compute(self, ctx: RunContext, state: RunState) -> dict[str, Any]:
        config, reporter = ctx.config, ctx.reporter
        reporter.update(self.name, 0.0, "embedding", force=True)
        features = state.mined_features  # the features stage's, already unit-norm
        if features is None:
            assert state.embed is not None
            features = extract_features(
                state.embed,
                ctx.images,
                config.eval_batch_size,
                ctx.runtime.device,
                ctx.runtime.amp_dtype,
                progress=lambda done, total: reporter.update(
                    self.name, 0.6 * done / total, "embedding"
                ),
            )
        k = min(config.scan.num_neighbors, ctx.num_images - 1)
        keep = config.backbone_weights is not None and state.mined_features is None
        neighbors, _ = knn(features, k)
        reporter.update(self.name, 0.8, "k-means baseline", force=True)
        purity = purity_at(neighbors, ctx.collection.labels, ks=sorted({1, 5, k}))
        return {
            "neighbors": torch.from_numpy(neighbors),
            # Backbone features from a file are the heads' input later: kept, not recomputed.
            "features": features if keep else None,
            "purity": {str(key): value for key, value in (purity or {}).items()} or None,
            "kmeans": kmeans_baseline(features, ctx.collection, config.num_clusters, config.seed),
        }

    def restore(self, ctx: RunContext, state: RunState, payload: dict[str, Any]) -> StageReport:
        state.neighbors = payload["neighbors"]
        if payload["features"] is not None:
            state.mined_features = payload["features"]
        ctx.reporter.update(self.name, 1.0, "neighbours mined", force=True)
        return StageReport(
            metrics={"neighbor_purity": payload["purity"], "kmeans": payload["kmeans"]}
        )
