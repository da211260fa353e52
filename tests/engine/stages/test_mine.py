"""The mine stage: K nearest neighbours without the image itself, purity, k-means baseline."""

from __future__ import annotations

import numpy as np

from scan_engine.stages.base import RunState
from scan_engine.stages.mine import MineStage

from .conftest import PER_CLASS, MeanColour


def test_neighbours_share_the_colour_and_never_include_the_image(
    colour_collection, make_context
) -> None:
    ctx = make_context(colour_collection)
    state = RunState(embed=MeanColour())
    stage = MineStage()
    payload = stage.compute(ctx, state)
    report = stage.restore(ctx, state, payload)
    neighbors = state.neighbors.numpy()
    assert neighbors.shape == (len(colour_collection), ctx.config.scan.num_neighbors)
    rows = np.arange(len(colour_collection))[:, None]
    assert not np.any(neighbors == rows)
    labels = colour_collection.labels
    assert np.all(labels[neighbors] == labels[:, None])
    assert report.metrics["neighbor_purity"]["1"] == 1.0
    assert report.metrics["kmeans"]["acc"] == 1.0  # separable colours: k-means gets them all
    # Scratch pretext: its projection is no head input, so no features are kept.
    assert state.mined_features is None


def test_k_is_capped_by_the_collection(colour_collection, make_context) -> None:
    small = colour_collection.subset(list(range(PER_CLASS - 4, PER_CLASS + 2)))  # 6 images
    ctx = make_context(small, num_clusters=2, scan={"num_neighbors": 20})
    state = RunState(embed=MeanColour())
    stage = MineStage()
    stage.restore(ctx, state, stage.compute(ctx, state))
    assert state.neighbors.shape == (6, 5)
    assert stage.settings(ctx.config) == {"num_neighbors": 20, "num_clusters": 2}
