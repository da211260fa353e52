"""The finalize stage: one result per cluster count, metrics, the 2-d map, and a model.pt that
records the fixed backbone truthfully and predicts what the run assigned."""

from __future__ import annotations

import numpy as np
import torch

from scan_engine.predict import MODEL_FORMAT_VERSION, load_model
from scan_engine.stages.base import RunState
from scan_engine.stages.finalize import FinalizeStage, project_2d
from scan_engine.stages.mine import MineStage
from scan_engine.stages.pretext import PretextStage
from scan_engine.stages.scan import ScanStage

from .conftest import CLASSES


def _finished_state(ctx) -> RunState:
    state = RunState()
    for stage in (PretextStage(), MineStage(), ScanStage()):
        stage.restore(ctx, state, stage.compute(ctx, state))
    return state


def test_results_model_file_and_prediction(colour_collection, make_context) -> None:
    # The cpu-preset route: SimCLR backbone, then heads on its fixed, cached features.
    ctx = make_context(
        colour_collection,
        num_clusters=CLASSES,
        overcluster=[5],
        scan={"epochs": 20, "update_backbone": False, "lr": 1e-2, "num_neighbors": 5},
    )
    state = _finished_state(ctx)
    stage = FinalizeStage()
    assert not stage.checkpointed(ctx.config)
    stage.restore(ctx, state, stage.compute(ctx, state))
    assert [r.num_clusters for r in state.results] == [CLASSES, 5]
    for result in state.results:
        assert (
            result.stage == "scan" and result.head == state.scan_chosen_heads[result.num_clusters]
        )
        assert sum(c.size for c in result.clusters) == len(colour_collection)
        assert set(result.metrics) == {"scan"}  # no self-labeling ran
    assert state.embedding_2d.shape == (len(colour_collection), 2)

    saved = torch.load(state.model_path, weights_only=True)
    assert saved["format_version"] == MODEL_FORMAT_VERSION
    assert saved["fixed_backbone"] is True  # the pretext trained it, nothing after did
    assert saved["head_input"] == "normalized"
    predictor = load_model(state.model_path)
    for result in state.results:
        predicted = predictor.predict(colour_collection, num_clusters=result.num_clusters)
        np.testing.assert_array_equal(predicted.assignments, result.assignments)


def test_a_trained_backbone_is_recorded_as_not_fixed(colour_collection, make_context) -> None:
    ctx = make_context(colour_collection, num_clusters=CLASSES)
    state = _finished_state(ctx)
    FinalizeStage().restore(ctx, state, FinalizeStage().compute(ctx, state))
    saved = torch.load(state.model_path, weights_only=True)
    assert saved["fixed_backbone"] is False and saved["head_input"] == "raw"


def test_project_2d_keeps_the_main_direction() -> None:
    generator = torch.Generator().manual_seed(0)
    along = torch.linspace(-5, 5, 50).unsqueeze(1) * torch.tensor([[1.0, 1.0, 0.0]])
    features = along + 0.01 * torch.randn(50, 3, generator=generator)
    projected = project_2d(features)
    assert projected.shape == (50, 2) and projected.dtype == np.float32
    first = projected[:, 0]
    assert abs(np.corrcoef(first, np.linspace(-5, 5, 50))[0, 1]) > 0.999
    assert project_2d(features[:1]).shape == (1, 2)
