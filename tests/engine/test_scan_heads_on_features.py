"""SCAN heads on cached features (the pretrained route's step): the kept head follows
scan.head_selection, and noise on the neighbour's feature still finds well separated groups."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from scan_engine import metrics
from scan_engine.config import make_config
from scan_engine.models import ClusteringModel
from scan_engine.neighbors import knn
from scan_engine.runtime import resolve_runtime
from scan_engine.scan import augment_features, infer, run_scan
from scan_engine.training import Reporter

CLUSTERS = 3
HEADS = 4
DIM = 16


def _separated_features() -> tuple[torch.Tensor, np.ndarray]:
    generator = torch.Generator().manual_seed(0)
    labels = np.repeat(np.arange(CLUSTERS), 60)
    centres = torch.eye(CLUSTERS, DIM)[torch.from_numpy(labels)]
    return F.normalize(centres + 0.25 * torch.randn(len(labels), DIM, generator=generator)), labels


def _train(selection: str, noise: float):
    features, labels = _separated_features()
    neighbors = torch.from_numpy(knn(features.numpy(), 10)[0])
    scan = {"epochs": 150, "num_heads": HEADS, "update_backbone": False}
    config = make_config(
        "tiny",
        num_clusters=CLUSTERS,
        scan={**scan, "head_selection": selection, "feature_noise": noise},
    )
    torch.manual_seed(0)  # the heads' initialisation: the same heads for either selection
    model = ClusteringModel(torch.nn.Identity(), DIM, [CLUSTERS], HEADS, head_input_scale=20.0)
    runtime = resolve_runtime("cpu", "float32")
    images = torch.zeros(len(labels), 3, 8, 8, dtype=torch.uint8)  # unread: heads on features
    stats = run_scan(
        model,
        images,
        neighbors,
        config,
        runtime,
        Reporter({"scan": 1.0}),
        torch.Generator().manual_seed(1),
        features=features,
    )
    _, logits = infer(model, images, runtime, 64, features=features)
    return stats, logits[CLUSTERS], labels


@pytest.mark.parametrize("selection", ["loss", "consensus"])
def test_the_kept_head_follows_the_head_selection(selection: str) -> None:
    stats, logits, _ = _train(selection, 0.0)
    losses, consensus = stats.head_losses[CLUSTERS], stats.head_consensus[CLUSTERS]
    assert len(losses) == len(consensus) == HEADS
    expected = int(np.argmin(losses)) if selection == "loss" else int(np.argmax(consensus))
    assert stats.chosen_heads == {CLUSTERS: expected}
    assert logits.shape[0] == 1  # only the kept head remains
    # Same seeds, same heads: the other selection saw the same losses and agreements.
    other, _, _ = _train("consensus" if selection == "loss" else "loss", 0.0)
    assert other.head_losses == stats.head_losses
    assert other.head_consensus == stats.head_consensus


def test_heads_with_feature_noise_find_separated_groups() -> None:
    stats, logits, labels = _train("consensus", 0.5)
    predicted = logits[0].argmax(1).numpy()
    assert metrics.evaluate(labels, predicted, num_clusters=CLUSTERS)["acc"] >= 0.95
    assert max(stats.head_consensus[CLUSTERS]) > 0.9


def test_feature_noise_keeps_unit_norm_and_has_the_asked_size() -> None:
    features, _ = _separated_features()
    noisy = augment_features(features, 0.5, torch.Generator().manual_seed(5))
    assert torch.allclose(noisy.norm(dim=1), torch.ones(len(features)), atol=1e-5)
    # Noise of relative norm 0.5 on a unit vector: about 0.5 before renormalising.
    assert 0.3 < float((noisy - features).norm(dim=1).median()) < 0.6
    assert augment_features(features, 0.0, torch.Generator()) is features
