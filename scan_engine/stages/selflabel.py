"""Stage 4, selflabel: confident predictions become labels for strongly augmented views
(scan_engine.selflabel). When no prediction is ever confident, or self-labeling would empty
clusters or lower the agreement with the mined neighbours, the SCAN result is kept."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from scan_engine.augment import StrongAugment
from scan_engine.config import ScanConfig
from scan_engine.feature_heads import keep_selflabel
from scan_engine.model_selection import neighbor_consistency
from scan_engine.runtime import Runtime
from scan_engine.scan import infer
from scan_engine.selflabel import run_selflabel
from scan_engine.stages.base import RunContext, RunState, Stage, StageReport, clustering_settings
from scan_engine.stages.scan import cached_head_features
from scan_engine.training import device_generator

__all__ = ["SelfLabelStage", "augmented_features", "CACHED_AUGMENTED_VIEWS"]

# Strongly augmented feature views cached for self-labeling when the backbone is fixed.
CACHED_AUGMENTED_VIEWS = 2


def augmented_features(
    backbone: torch.nn.Module,
    images: torch.Tensor,
    config: ScanConfig,
    runtime: Runtime,
    generator: torch.Generator,
) -> torch.Tensor:
    """(V, N, D) features of V strongly augmented views, computed once when the backbone is
    fixed (the heads' strong views then cost no backbone pass per step)."""
    augment = StrongAugment(config.image_size)
    on_device = device_generator(runtime.device, generator)
    views = []
    backbone.eval()
    with torch.inference_mode():
        for _ in range(CACHED_AUGMENTED_VIEWS):
            parts = []
            for start in range(0, images.shape[0], config.eval_batch_size):
                batch = runtime.images(images[start : start + config.eval_batch_size])
                with runtime.autocast():
                    strong = augment(batch, generator=on_device)
                    parts.append(F.normalize(backbone(strong).float(), dim=1).cpu())
            views.append(torch.cat(parts))
    with torch.inference_mode(False):
        return torch.stack(views).clone()


def _collapse_guard(ctx: RunContext, state: RunState) -> list[str]:
    """Why the self-labeled heads must not replace the SCAN heads, one line per cluster count
    (empty: keep them). Self-labeling may only sharpen a result: a count whose self-labeled head
    leaves more (nearly) empty clusters, or agrees less with the mined neighbours, than its SCAN
    head is refused (scan_engine.feature_heads.keep_selflabel), and then the whole SCAN model
    is kept, since on the fine-tuned route one backbone serves every count."""
    assert state.clustering is not None and state.neighbors is not None
    features, logits = infer(
        state.clustering,
        ctx.images,
        ctx.runtime,
        ctx.config.eval_batch_size,
        features=cached_head_features(ctx, state),
    )
    refusals = []
    for c in ctx.config.cluster_counts():
        scan_probabilities = F.softmax(state.scan_logits[c][0], dim=1)
        selflabel_probabilities = F.softmax(logits[c][0], dim=1)
        keep, why = keep_selflabel(
            scan_probabilities.argmax(1).numpy(),
            neighbor_consistency(scan_probabilities, state.neighbors),
            selflabel_probabilities.argmax(1).numpy(),
            neighbor_consistency(selflabel_probabilities, state.neighbors),
            c,
        )
        if not keep:
            refusals.append(f"C={c}: {why}")
    if not refusals:  # finalize reads the kept heads' outputs instead of a second pass
        state.selflabel_features, state.selflabel_logits = features, logits
    return refusals


class SelfLabelStage(Stage):
    name = "selflabel"
    weight = 0.11
    weight_with_fixed_backbone = 0.03

    def settings(self, config: ScanConfig) -> dict[str, Any]:
        return clustering_settings(config, with_selflabel=True)

    def skip_reason(self, ctx: RunContext, state: RunState) -> str | None:
        if not ctx.config.selflabel.enabled or ctx.config.selflabel.epochs == 0:
            return "self-labeling disabled by the config"
        return None

    def compute(self, ctx: RunContext, state: RunState) -> dict[str, Any]:
        assert state.clustering is not None
        features = cached_head_features(ctx, state)
        augmented = state.augmented_features  # the features stage's cached views
        if features is not None and augmented is None:
            augmented = augmented_features(
                state.clustering.backbone, ctx.images, ctx.config, ctx.runtime, ctx.generator
            )
        stats = run_selflabel(
            state.clustering,
            ctx.images,
            ctx.config,
            ctx.runtime,
            ctx.reporter,
            ctx.generator,
            ctx.budget.for_stage(self.name),
            features=features,
            augmented_features=augmented,
        )
        return {
            "model": state.clustering.state_dict(),
            "stats": vars(stats),
            "trained": stats.trained,
        }

    def restore(self, ctx: RunContext, state: RunState, payload: dict[str, Any]) -> StageReport:
        assert state.clustering is not None and state.scan_state is not None
        stats = payload["stats"]
        keys = ("steps", "epochs", "confident_per_epoch", "skipped_batches")
        report = StageReport(
            images_per_s=stats["images_per_s"], metrics={"selflabel": {k: stats[k] for k in keys}}
        )
        if payload["trained"]:
            state.clustering.load_state_dict(payload["model"])
            refusals = _collapse_guard(ctx, state)
            if refusals:
                state.clustering.load_state_dict(state.scan_state)
                report.notes.extend(refusals)
            else:
                state.final_stage = self.name
        else:
            state.clustering.load_state_dict(state.scan_state)
            report.notes.append(
                f"self-labeling found no prediction above the {ctx.config.selflabel.threshold} "
                "confidence threshold; the SCAN result is kept"
            )
        return report
