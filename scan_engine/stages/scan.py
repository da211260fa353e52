"""Stage 3, scan: the SCAN clustering step, one backbone and `num_heads` heads for every cluster
count; the head scan.head_selection names is kept: lowest loss, or the consensus head
(scan_engine.scan).

With a fixed backbone (config.fixed_backbone) the heads train on cached, L2-normalised backbone
features, read times scan.feature_scale; otherwise the backbone is fine-tuned on images.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from scan_engine.config import ScanConfig
from scan_engine.models import ClusteringModel
from scan_engine.neighbors import extract_features
from scan_engine.scan import infer, run_scan
from scan_engine.stages.base import RunContext, RunState, Stage, StageReport, clustering_settings

__all__ = ["ScanStage", "cached_head_features"]


def cached_head_features(ctx: RunContext, state: RunState) -> torch.Tensor | None:
    """(N, D) L2-normalised backbone features the heads read when the backbone is fixed
    (computed once per run), None when the backbone trains with the heads."""
    if not ctx.config.fixed_backbone:
        return None
    if state.head_features is None:
        if state.mined_features is not None:  # backbone from a file: mined on these already
            state.head_features = state.mined_features
        else:
            assert state.backbone is not None
            state.head_features = extract_features(
                state.backbone,
                ctx.images,
                ctx.config.eval_batch_size,
                ctx.runtime.device,
                ctx.runtime.amp_dtype,
            )
    return state.head_features


def _clustering_model(ctx: RunContext, state: RunState) -> ClusteringModel:
    assert state.backbone is not None
    config = ctx.config
    model = ClusteringModel(
        copy.deepcopy(state.backbone),
        state.backbone.feature_dim,
        config.cluster_counts(),
        config.scan.num_heads,
        head_input_scale=config.scan.feature_scale if config.fixed_backbone else 1.0,
    )
    model.backbone.requires_grad_(not config.fixed_backbone)
    return model


class ScanStage(Stage):
    name = "scan"
    weight = 0.22
    weight_with_fixed_backbone = 0.03

    def settings(self, config: ScanConfig) -> dict[str, Any]:
        return clustering_settings(config, with_selflabel=False)

    def compute(self, ctx: RunContext, state: RunState) -> dict[str, Any]:
        assert state.neighbors is not None
        model = _clustering_model(ctx, state)
        stats = run_scan(
            model,
            ctx.images,
            state.neighbors,
            ctx.config,
            ctx.runtime,
            ctx.reporter,
            ctx.generator,
            ctx.budget.for_stage(self.name),
            features=cached_head_features(ctx, state),
        )
        self._built = model  # heads already kept
        return {"model": model.state_dict(), "stats": vars(stats)}

    def restore(self, ctx: RunContext, state: RunState, payload: dict[str, Any]) -> StageReport:
        stats = payload["stats"]
        model = self.take_built()
        if model is None:
            model = _clustering_model(ctx, state)
            model.keep_heads(stats["chosen_heads"])
        model.load_state_dict(payload["model"])
        state.scan_state = copy.deepcopy(model.state_dict())
        state.scan_chosen_heads = stats["chosen_heads"]
        state.clustering = ctx.runtime.prepare(model)  # type: ignore[assignment]
        assert state.clustering is not None
        state.scan_features, state.scan_logits = infer(
            state.clustering,
            ctx.images,
            ctx.runtime,
            ctx.config.eval_batch_size,
            features=cached_head_features(ctx, state),
        )
        keys = ("steps", "epochs", "chosen_heads", "head_losses")
        return StageReport(
            images_per_s=stats["images_per_s"], metrics={"scan": {k: stats[k] for k in keys}}
        )
