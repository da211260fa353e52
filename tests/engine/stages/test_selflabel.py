"""Self-labeling: the plateau stop, the first-epoch stop when nothing is confident, and the
stage keeping the SCAN result (with a note) when self-labeling never trained."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from scan_engine.config import make_config
from scan_engine.models import ClusteringModel
from scan_engine.runtime import resolve_runtime
from scan_engine.selflabel import run_selflabel
from scan_engine.stages.base import RunState
from scan_engine.stages.selflabel import SelfLabelStage
from scan_engine.training import Reporter

N, DIM, C = 60, 8, 3


def _features_and_model(head_scale: float) -> tuple[torch.Tensor, ClusteringModel]:
    """(N, DIM) unit features in C tight groups and a one-head model whose head points at
    the group centres times `head_scale` (large: confident; zero: uniform predictions)."""
    generator = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(C, DIM, generator=generator), dim=1)
    noise = 0.01 * torch.randn(N, DIM, generator=generator)
    features = F.normalize(centres[torch.arange(N) % C] + noise, dim=1)
    model = ClusteringModel(nn.Identity(), DIM, [C], num_heads=1, head_input_scale=1.0)
    head = model.heads[str(C)][0]
    with torch.no_grad():
        head.weight.copy_(centres * head_scale)
        head.bias.zero_()
    return features, model


def _run(head_scale: float, epochs: int = 20, patience: int = 3):
    features, model = _features_and_model(head_scale)
    config = make_config(
        "tiny",
        num_clusters=C,
        selflabel={"epochs": epochs, "batch_size": 20, "plateau_patience": patience, "lr": 1e-5},
    )
    images = torch.zeros(N, 3, 8, 8, dtype=torch.uint8)  # only their number is read
    augmented = torch.stack([features, features])  # (V, N, D)
    stats = run_selflabel(
        model,
        images,
        config,
        resolve_runtime("cpu", "float32"),
        Reporter({"selflabel": 1.0}),
        torch.Generator().manual_seed(0),
        features=features,
        augmented_features=augmented,
    )
    return stats, model


def test_stops_when_the_confident_count_plateaus() -> None:
    stats, _ = _run(head_scale=50.0, epochs=20, patience=3)
    # Every sample is confident from the first epoch on: no gain for 3 epochs, then stop.
    assert stats.confident_per_epoch == [N] * 4
    assert stats.stopped_early and stats.trained
    assert stats.epochs == 4 and stats.steps == 4 * (N // 20)


def test_nothing_confident_stops_after_the_first_epoch() -> None:
    stats, _ = _run(head_scale=0.0)
    assert stats.confident_per_epoch == [0]
    assert not stats.trained and stats.skipped_batches == N // 20


def test_the_stage_keeps_the_scan_result_when_nothing_was_confident(
    colour_collection, make_context
) -> None:
    ctx = make_context(colour_collection)
    _, model = _features_and_model(head_scale=0.0)
    scan_state = copy.deepcopy(model.state_dict())
    state = RunState(clustering=model, scan_state=scan_state)
    with torch.no_grad():
        model.heads[str(C)][0].bias.fill_(1.0)  # as if training had changed the weights
    payload = {"model": model.state_dict(), "trained": False, "stats": _stats_record()}
    report = SelfLabelStage().restore(ctx, state, payload)
    assert state.final_stage == "scan"
    assert torch.equal(model.heads[str(C)][0].bias, scan_state["heads.3.0.bias"])
    assert any("confidence threshold" in note for note in report.notes)


def test_disabled_self_labeling_is_skipped_with_a_reason(colour_collection, make_context) -> None:
    stage = SelfLabelStage()
    off = make_context(colour_collection, selflabel={"enabled": False})
    no_epochs = make_context(colour_collection, selflabel={"epochs": 0})
    on = make_context(colour_collection)
    assert stage.skip_reason(off, RunState()) == "self-labeling disabled by the config"
    assert stage.skip_reason(no_epochs, RunState()) is not None
    assert stage.skip_reason(on, RunState()) is None


def _stats_record() -> dict:
    return {
        "steps": 3,
        "epochs": 1.0,
        "images_per_s": 10.0,
        "wall_s": 0.1,
        "confident_per_epoch": [0],
        "skipped_batches": 3,
        "stopped_early": False,
    }


def _guard_case(colour_collection, make_context, collapse: bool):
    """A SCAN head that separates the three groups, then a self-labeled head that either sends
    every image to one cluster (collapse) or is a sharper copy of the SCAN head."""
    ctx = make_context(colour_collection, num_clusters=C, scan={"update_backbone": False})
    count = len(colour_collection)
    generator = torch.Generator().manual_seed(1)
    centres = F.normalize(torch.randn(C, DIM, generator=generator), dim=1)
    noise = 0.01 * torch.randn(count, DIM, generator=generator)
    features = F.normalize(centres[torch.arange(count) % C] + noise, dim=1)
    neighbors = torch.stack([(torch.arange(count) + C * k) % count for k in (1, 2, 3)], dim=1)
    model = ClusteringModel(nn.Identity(), DIM, [C], num_heads=1, head_input_scale=1.0)
    head = model.heads[str(C)][0]
    with torch.no_grad():
        head.weight.copy_(centres * 10.0)
        head.bias.zero_()
    scan_state = copy.deepcopy(model.state_dict())
    state = RunState(
        clustering=model,
        scan_state=scan_state,
        neighbors=neighbors,
        scan_features=features,
        scan_logits={C: (features @ head.weight.T).detach().unsqueeze(0)},
        head_features=features,
    )
    with torch.no_grad():
        if collapse:
            head.weight.zero_()
            head.bias.copy_(torch.tensor([5.0, 0.0, 0.0]))
        else:
            head.weight.mul_(3.0)
    payload = {"model": model.state_dict(), "trained": True, "stats": _stats_record()}
    report = SelfLabelStage().restore(ctx, state, payload)
    return state, scan_state, report


def test_the_guard_keeps_the_scan_result_when_self_labeling_empties_clusters(
    colour_collection, make_context
) -> None:
    state, scan_state, report = _guard_case(colour_collection, make_context, collapse=True)
    assert state.final_stage == "scan"
    head = state.clustering.heads[str(C)][0]
    assert torch.equal(head.weight, scan_state["heads.3.0.weight"])
    assert torch.equal(head.bias, scan_state["heads.3.0.bias"])
    assert any("empty clusters" in note and "SCAN result is kept" in note for note in report.notes)


def test_the_guard_keeps_a_self_labeled_head_that_only_sharpens(
    colour_collection, make_context
) -> None:
    state, scan_state, report = _guard_case(colour_collection, make_context, collapse=False)
    assert state.final_stage == "selflabel"
    head = state.clustering.heads[str(C)][0]
    assert torch.allclose(head.weight, 3.0 * scan_state["heads.3.0.weight"])
    assert not any("SCAN result is kept" in note for note in report.notes)
