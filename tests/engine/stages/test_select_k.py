"""The select_k stage: K chosen among the range on the mined features, then fixed for the run."""

from __future__ import annotations

from scan_engine.stages.base import RunState
from scan_engine.stages.mine import MineStage
from scan_engine.stages.select_k import SelectKStage

from .conftest import CLASSES, MeanColour


def test_three_colours_give_k_three_and_the_config_follows(colour_collection, make_context) -> None:
    ctx = make_context(colour_collection, num_clusters_range=[2, 5])
    assert ctx.config.num_clusters == 2  # the range's low end until chosen
    state = RunState(embed=MeanColour())
    MineStage().restore(ctx, state, MineStage().compute(ctx, state))
    stage = SelectKStage()
    payload = stage.compute(ctx, state)
    report = stage.restore(ctx, state, payload)
    assert payload["k_selection"]["chosen"] == CLASSES
    assert [c["num_clusters"] for c in payload["k_selection"]["candidates"]] == [2, 3, 4, 5]
    assert ctx.config.num_clusters == CLASSES
    assert ctx.config.cluster_counts() == [CLASSES]
    assert state.k_selection == report.metrics["k_selection"] == payload["k_selection"]
    # The k-means baseline is redone for the chosen K.
    assert report.metrics["kmeans"]["acc"] == 1.0


def test_k_selection_reports_its_own_progress(colour_collection, make_context) -> None:
    events = []
    ctx = make_context(colour_collection, num_clusters_range=[2, 4])
    ctx.reporter.callback = events.append
    ctx.reporter.min_interval_s = 0.0
    state = RunState(embed=MeanColour())
    MineStage().restore(ctx, state, MineStage().compute(ctx, state))
    events.clear()
    SelectKStage().compute(ctx, state)
    assert events and {e.stage for e in events} == {"select_k"}
    assert max(e.stage_fraction for e in events) > 0.5
