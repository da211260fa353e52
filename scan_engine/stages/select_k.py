"""Stage 2b, select_k (K unknown, config.num_clusters_range): candidate heads scored on the mined
features fix K before the SCAN step (scan_engine.model_selection)."""

from __future__ import annotations

from typing import Any

from scan_engine.config import ScanConfig
from scan_engine.model_selection import KSelection, run_k_selection
from scan_engine.stages.base import RunContext, RunState, Stage, StageReport, clustering_settings
from scan_engine.stages.mine import kmeans_baseline

__all__ = ["SelectKStage"]


class SelectKStage(Stage):
    name = "select_k"
    weight = 0.02  # linear heads on fixed features: cheap even on a CPU
    weight_with_fixed_backbone = 0.02

    def settings(self, config: ScanConfig) -> dict[str, Any]:
        return clustering_settings(config, with_selflabel=False)

    def compute(self, ctx: RunContext, state: RunState) -> dict[str, Any]:
        assert state.neighbors is not None
        assert state.embed is not None or state.mined_features is not None
        config = ctx.config
        k_selection, mined_features = run_k_selection(
            state.embed,  # type: ignore[arg-type]  # unused when the features are given
            ctx.images,
            state.neighbors,
            config,
            ctx.runtime,
            ctx.reporter,
            state.mined_features,
        )
        # The k-means baseline of the mine stage used a placeholder K: redo it for the choice.
        kmeans = kmeans_baseline(mined_features, ctx.collection, k_selection.chosen, config.seed)
        return {"k_selection": k_selection.to_json(), "kmeans": kmeans}

    def restore(self, ctx: RunContext, state: RunState, payload: dict[str, Any]) -> StageReport:
        chosen = KSelection.from_json(payload["k_selection"]).chosen
        ctx.config = ctx.config.model_copy(update={"num_clusters": chosen})
        state.k_selection = payload["k_selection"]
        ctx.reporter.update(self.name, 1.0, f"K = {chosen}", force=True)
        return StageReport(
            metrics={"k_selection": payload["k_selection"], "kmeans": payload["kmeans"]}
        )
