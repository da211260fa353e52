"""Stage 1, pretext: SimCLR on the collection, or a pretrained ResNet loaded from a local file
(config.backbone_weights), in which case nothing trains and the backbone stays fixed."""

from __future__ import annotations

from typing import Any

from scan_engine.config import ScanConfig
from scan_engine.models import build_backbone, load_backbone_weights
from scan_engine.pretext import build_contrastive_model, run_pretext
from scan_engine.stages.base import RunContext, RunState, Stage, StageReport

__all__ = ["PretextStage", "PRETEXT_SETTINGS"]

# What the pretext's result depends on.
PRETEXT_SETTINGS = (
    "image_size",
    "backbone",
    "backbone_width",
    "backbone_weights",
    "pretext",
    "precision",
    "seed",
)


class PretextStage(Stage):
    name = "pretext"
    weight = 0.62
    # With the backbone fixed after the pretext, SCAN and self-labeling train heads on cached
    # features (seconds), so nearly the whole budget goes to the pretext.
    weight_with_fixed_backbone = 0.9

    def settings(self, config: ScanConfig) -> dict[str, Any]:
        values = config.to_json_dict()
        return {key: values[key] for key in PRETEXT_SETTINGS}

    def checkpointed(self, config: ScanConfig) -> bool:
        return config.backbone_weights is None  # a file on disk is its own checkpoint

    def compute(self, ctx: RunContext, state: RunState) -> dict[str, Any]:
        config = ctx.config
        if config.backbone_weights is not None:
            backbone = build_backbone(config.backbone, config.backbone_width, config.image_size)
            load_backbone_weights(backbone, config.backbone_weights)
            self._built = backbone
            return {"backbone": backbone.state_dict()}
        contrastive = build_contrastive_model(config)
        stats = run_pretext(
            contrastive,
            ctx.images,
            config,
            ctx.runtime,
            ctx.reporter,
            ctx.generator,
            ctx.budget.for_stage(self.name),
        )
        self._built = contrastive
        return {"model": contrastive.state_dict(), "stats": vars(stats)}

    def restore(self, ctx: RunContext, state: RunState, payload: dict[str, Any]) -> StageReport:
        config = ctx.config
        if "backbone" in payload:  # loaded from a file: the mined features are its output
            backbone = self.take_built() or build_backbone(
                config.backbone, config.backbone_width, config.image_size
            )
            backbone.load_state_dict(payload["backbone"])
            state.embed = ctx.runtime.prepare(backbone)
            state.backbone = backbone
            return StageReport(notes=["pretrained backbone: pretext skipped, backbone frozen"])
        contrastive = self.take_built() or build_contrastive_model(config)
        contrastive.load_state_dict(payload["model"])
        state.embed = ctx.runtime.prepare(contrastive)
        state.backbone = contrastive.backbone
        stats = payload["stats"]
        return StageReport(
            images_per_s=stats["images_per_s"],
            metrics={"pretext": {k: stats[k] for k in ("steps", "epochs", "final_loss")}},
        )
