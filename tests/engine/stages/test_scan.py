"""The scan stage and the SCAN-step functions it calls: head selection's loss, neighbour
sampling, and heads trained on cached features when the backbone is fixed."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from scan_engine.scan import head_losses, sample_neighbors
from scan_engine.stages.base import RunState
from scan_engine.stages.mine import MineStage
from scan_engine.stages.scan import ScanStage

from .conftest import CLASSES, MeanColour


def _naive_head_loss(logits: torch.Tensor, neighbors: torch.Tensor, weight: float) -> float:
    """One head, (N, C) logits: mean over all (image, neighbour) pairs of -log <p_i, p_j>,
    minus weight times the entropy of the mean prediction, one pair at a time."""
    p = F.softmax(logits.double(), dim=1).tolist()
    n, k = neighbors.shape
    consistency = 0.0
    for i in range(n):
        for j in neighbors[i].tolist():
            consistency -= math.log(sum(a * b for a, b in zip(p[i], p[j], strict=True)))
    mean = [sum(row[c] for row in p) / n for c in range(len(p[0]))]
    entropy = -sum(m * math.log(m) for m in mean if m > 0)
    return consistency / (n * k) - weight * entropy


def test_head_losses_match_a_naive_reference() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = {3: torch.randn(4, 10, 3, generator=generator) * 2}  # (H, N, C)
    neighbors = torch.randint(0, 10, (10, 4), generator=generator)
    losses = head_losses(logits, neighbors, entropy_weight=5.0, chunk=3)  # chunks of 3 rows
    for head in range(4):
        expected = _naive_head_loss(logits[3][head], neighbors, 5.0)
        assert math.isclose(losses[3][head], expected, rel_tol=1e-4, abs_tol=1e-5)


def test_the_head_that_agrees_with_the_neighbours_and_spreads_wins() -> None:
    labels = torch.arange(12) % 3
    neighbors = torch.stack([torch.nonzero(labels == labels[i]).flatten()[:3] for i in range(12)])
    agreeing = F.one_hot(labels, 3).float() * 8  # confident, consistent, balanced
    collapsed = F.one_hot(torch.zeros(12, dtype=torch.long), 3).float() * 8  # one cluster
    random = torch.randn(12, 3, generator=torch.Generator().manual_seed(1)) * 8
    losses = head_losses({3: torch.stack([collapsed, random, agreeing])}, neighbors, 5.0)[3]
    assert min(range(3), key=losses.__getitem__) == 2


def test_sample_neighbors_draws_uniformly_from_each_row() -> None:
    neighbors = torch.arange(40).view(4, 10)  # row r holds 10r..10r+9
    index = torch.tensor([2] * 20_000)
    drawn = sample_neighbors(neighbors, index, torch.Generator().manual_seed(0))
    assert drawn.shape == (20_000,)
    counts = torch.bincount(drawn - 20, minlength=10)
    assert counts.sum() == 20_000 and counts.numel() == 10  # only row 2's neighbours
    assert counts.min() > 1700 and counts.max() < 2300  # 2000 each expected
    again = sample_neighbors(neighbors, index, torch.Generator().manual_seed(0))
    assert torch.equal(drawn, again)


def test_fixed_backbone_trains_heads_on_cached_features(colour_collection, make_context) -> None:
    ctx = make_context(
        colour_collection,
        num_clusters=CLASSES,
        scan={"epochs": 30, "update_backbone": False, "lr": 1e-2, "num_neighbors": 5},
    )
    assert ctx.config.fixed_backbone
    backbone = MeanColour()
    state = RunState(embed=backbone, backbone=backbone)
    MineStage().restore(ctx, state, MineStage().compute(ctx, state))
    stage = ScanStage()
    payload = stage.compute(ctx, state)
    report = stage.restore(ctx, state, payload)
    assert state.head_features is not None and state.head_features.shape == (36, 4)
    assert torch.allclose(state.head_features.norm(dim=1), torch.ones(36))
    assert set(state.scan_chosen_heads) == {CLASSES}
    assert report.metrics["scan"]["chosen_heads"] == state.scan_chosen_heads
    assert len(report.metrics["scan"]["head_losses"][CLASSES]) == ctx.config.scan.num_heads
    assert state.clustering.head_input_scale == ctx.config.scan.feature_scale
    predictions = state.scan_logits[CLASSES][0].argmax(1)
    labels = torch.from_numpy(colour_collection.labels)
    # Every colour is one cluster of its own (up to the cluster numbering).
    pairs = {(int(a), int(b)) for a, b in zip(labels, predictions, strict=True)}
    assert len(pairs) == CLASSES and len({b for _, b in pairs}) == CLASSES

    # A payload loaded later (a resumed run) restores the same model.
    resumed = RunState(embed=backbone, backbone=backbone, neighbors=state.neighbors)
    ScanStage().restore(ctx, resumed, payload)
    assert torch.equal(resumed.scan_logits[CLASSES], state.scan_logits[CLASSES])
