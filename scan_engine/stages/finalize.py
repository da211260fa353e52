"""Stage 5, finalize: assignments and confidence per cluster count, prototypes and top members,
metrics when labels are known, a 2-d map of the collection, and model.pt for prediction."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from scan_engine import metrics
from scan_engine.config import ScanConfig
from scan_engine.data import ImageCollection
from scan_engine.predict import MODEL_FILE, prediction_state, save_model
from scan_engine.prototypes import cluster_summaries
from scan_engine.results import ClusteringResult
from scan_engine.stages.base import RunContext, RunState, Stage, StageReport
from scan_engine.stages.scan import cached_head_features

__all__ = ["FinalizeStage", "evaluate", "project_2d"]


def evaluate(
    collection: ImageCollection, predictions: np.ndarray, num_clusters: int
) -> dict[str, Any] | None:
    """ACC/NMI/ARI and the confusion of `predictions` (N,) against the collection's labels."""
    if collection.labels is None:
        return None
    num_classes = len(collection.class_names) if collection.class_names else None
    return metrics.evaluate(
        collection.labels, predictions, num_classes=num_classes, num_clusters=num_clusters
    )


def project_2d(features: torch.Tensor) -> np.ndarray:
    """(N, D) -> (N, 2) by PCA: a cheap, deterministic map of the collection for the gallery."""
    centred = features.float() - features.float().mean(0, keepdim=True)
    if centred.shape[0] < 2:
        return np.zeros((centred.shape[0], 2), dtype=np.float32)
    _, _, components = torch.pca_lowrank(centred, q=min(2, *centred.shape), center=False)
    projected = centred @ components[:, :2]
    if projected.shape[1] < 2:
        projected = F.pad(projected, (0, 2 - projected.shape[1]))
    return projected.numpy().astype(np.float32)


class FinalizeStage(Stage):
    name = "finalize"
    weight = 0.02
    weight_with_fixed_backbone = 0.01

    def settings(self, config: ScanConfig) -> dict[str, Any]:
        return {}

    def checkpointed(self, config: ScanConfig) -> bool:
        return False  # seconds of work, and model.pt is its own output

    def compute(self, ctx: RunContext, state: RunState) -> dict[str, Any]:
        assert state.clustering is not None and state.scan_features is not None
        assert state.neighbors is not None
        config, collection = ctx.config, ctx.collection
        ctx.reporter.update(self.name, 0.0, "assigning", force=True)
        features = cached_head_features(ctx, state)
        if state.final_stage == "selflabel":  # the collapse guard's pass over the kept heads
            assert state.selflabel_features is not None
            final_features, final_logits = state.selflabel_features, state.selflabel_logits
        else:
            final_features, final_logits = state.scan_features, state.scan_logits
        chosen_heads = state.scan_chosen_heads
        results = []
        for c in config.cluster_counts():
            probabilities = F.softmax(final_logits[c][0], dim=1)  # (N, C)
            confidence, assignments = probabilities.max(1)
            assignments_np = assignments.numpy().astype(np.int64)
            confidence_np = confidence.numpy().astype(np.float32)
            clusters = cluster_summaries(
                final_features,
                assignments_np,
                confidence_np,
                c,
                config.prototype_members,
                config.top_members,
            )
            evaluation = None
            if collection.labels is not None:
                scan_predictions = state.scan_logits[c][0].argmax(1).numpy()
                evaluation = {"scan": evaluate(collection, scan_predictions, c)}
                if state.final_stage == "selflabel":
                    evaluation["selflabel"] = evaluate(collection, assignments_np, c)
            results.append(
                ClusteringResult(
                    c,
                    assignments_np,
                    confidence_np,
                    clusters,
                    int(chosen_heads[c]),
                    state.final_stage,
                    evaluation,
                )
            )
        model_path = ctx.work_dir / MODEL_FILE
        save_model(
            model_path,
            state.clustering,
            config,
            prediction_state(
                final_features,
                final_logits,
                state.neighbors,
                heads_on_normalized_features=features is not None,
                head_input_scale=state.clustering.head_input_scale,
                num_clusters=config.num_clusters,
                k_selection=state.k_selection,
            ),
            backbone_reference=state.backbone_reference,
        )
        return {
            "results": results,
            "embedding_2d": project_2d(final_features),
            "model_path": model_path,
        }

    def restore(self, ctx: RunContext, state: RunState, payload: dict[str, Any]) -> StageReport:
        state.results = payload["results"]
        state.embedding_2d = payload["embedding_2d"]
        state.model_path = payload["model_path"]
        return StageReport()
