"""The pretext stage: SimCLR trains and restores; a backbone file is loaded, not trained."""

from __future__ import annotations

import torch

from scan_engine.models import build_backbone
from scan_engine.stages.base import RunState
from scan_engine.stages.pretext import PretextStage


def test_simclr_payload_restores_the_trained_model(colour_collection, make_context) -> None:
    ctx = make_context(colour_collection)
    stage = PretextStage()
    assert stage.checkpointed(ctx.config)
    payload = stage.compute(ctx, RunState())
    assert payload["stats"]["steps"] >= 1 and payload["stats"]["images_per_s"] > 0
    state = RunState()
    report = stage.restore(ctx, state, payload)
    assert report.images_per_s == payload["stats"]["images_per_s"]
    assert set(report.metrics["pretext"]) == {"steps", "epochs", "final_loss"}
    restored = {k: v for k, v in state.embed.state_dict().items()}
    for key, value in payload["model"].items():
        assert torch.equal(restored[key], value), key
    assert state.backbone is state.embed.backbone  # the clustering model starts from it


def test_a_backbone_file_is_loaded_and_not_checkpointed(
    colour_collection, make_context, tmp_path
) -> None:
    ctx = make_context(colour_collection)
    saved = build_backbone("resnet18", 8, 16)
    weights = tmp_path / "backbone.pt"
    torch.save(saved.state_dict(), weights)
    ctx = make_context(colour_collection, backbone_weights=str(weights))
    stage = PretextStage()
    assert not stage.checkpointed(ctx.config)
    assert ctx.config.fixed_backbone  # a loaded backbone never trains
    state = RunState()
    report = stage.restore(ctx, state, stage.compute(ctx, state))
    assert report.images_per_s is None and "pretext" not in report.metrics
    assert any("pretext skipped" in note for note in report.notes)
    for key, value in saved.state_dict().items():
        assert torch.equal(state.backbone.state_dict()[key], value), key
    assert state.embed is state.backbone  # neighbours are mined on the backbone's features
