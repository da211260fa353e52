"""SCAN heads on fixed features: the collapse guard, calibrated confidence and head consensus,
on generated Gaussian blobs (no downloads, seconds on a CPU)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from scan_engine import metrics
from scan_engine.calibration import align_clusters, fit_temperature
from scan_engine.feature_heads import FeatureHeadsSettings, cluster_features, keep_selflabel
from scan_engine.model_selection import head_consensus
from scan_engine.neighbors import knn

GROUPS, PER_GROUP, DIM = 4, 150, 16


def _blobs(spread: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """GROUPS Gaussian blobs on the unit sphere: features (N, D), neighbours (N, 20), labels."""
    generator = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(GROUPS, DIM, generator=generator), dim=1)
    labels = np.repeat(np.arange(GROUPS), PER_GROUP)
    noise = spread / DIM**0.5 * torch.randn(len(labels), DIM, generator=generator)
    features = F.normalize(centres[labels] + noise, dim=1)
    neighbors = torch.from_numpy(knn(features.numpy(), 20)[0])
    return features, neighbors, labels


def test_overconfident_heads_get_confidence_that_matches_accuracy() -> None:
    # Overlapping blobs and a very sharp head: raw max-probability far above the accuracy.
    features, neighbors, labels = _blobs(spread=2.0)
    settings = FeatureHeadsSettings(steps=300, feature_scale=100.0, selflabel_steps=100)
    result = cluster_features(features, neighbors, GROUPS, settings, seed=0)
    accuracy = metrics.evaluate(labels, result.assignments, num_clusters=GROUPS)["acc"]
    raw_logits = result.probabilities.log() * result.temperature  # undo the fitted temperature
    raw_confidence = float(F.softmax(raw_logits, 1).max(1)[0].mean())
    assert raw_confidence > accuracy + 0.1, (raw_confidence, accuracy)
    assert abs(float(result.confidence.mean()) - accuracy) < 0.08, (result.stats, accuracy)
    assert result.temperature > 1.5
    # The folded head reproduces the calibrated probabilities.
    refolded = F.softmax(result.feature_scale * features @ result.weight + result.bias, 1)
    assert torch.allclose(refolded, result.probabilities, atol=1e-4)


def test_fit_temperature_recovers_the_sharpening() -> None:
    # Targets drawn from softmax(z); logits handed over sharpened 8x: T close to 8.
    generator = torch.Generator().manual_seed(0)
    true_logits = 2.0 * torch.randn(4000, 5, generator=generator)
    targets = torch.multinomial(F.softmax(true_logits, 1), 1, generator=generator)[:, 0]
    assert abs(fit_temperature(8.0 * true_logits, targets) - 8.0) < 0.8


def test_guard_keeps_scan_when_selflabel_empties_a_cluster() -> None:
    scan = np.repeat(np.arange(GROUPS), 25)
    swallowed = scan.copy()
    swallowed[swallowed == 3] = 2  # self-labeling merged cluster 3 into 2
    keep, note = keep_selflabel(scan, 0.8, swallowed, 0.9, GROUPS)
    assert not keep and "SCAN result is kept" in note and "empty" in note
    keep, note = keep_selflabel(scan, 0.8, scan, 0.7, GROUPS)  # lower consistency
    assert not keep and "consistency" in note
    assert keep_selflabel(scan, 0.8, scan, 0.85, GROUPS)[0]


def test_harmful_selflabel_never_ends_with_an_empty_cluster() -> None:
    # A low threshold and a huge step size make self-labeling erratic; whichever head is kept,
    # every cluster is used and the stats say which stage gave the result.
    features, neighbors, _ = _blobs(spread=2.0)
    harmful = FeatureHeadsSettings(
        steps=200, selflabel_threshold=0.3, selflabel_lr=20.0, selflabel_steps=40
    )
    result = cluster_features(features, neighbors, GROUPS, harmful, seed=0)
    assert result.non_empty_clusters == GROUPS, result.stats
    if result.final_stage == "scan":
        assert "SCAN result is kept" in result.stats["note"]
        assert np.array_equal(result.assignments, result.scan_assignments)


def test_helpful_selflabel_is_kept_with_every_cluster_used() -> None:
    features, neighbors, labels = _blobs(spread=0.8)
    result = cluster_features(
        features, neighbors, GROUPS, FeatureHeadsSettings(steps=200, selflabel_steps=100)
    )
    assert result.final_stage == "selflabel", result.stats
    assert result.non_empty_clusters == GROUPS
    assert metrics.evaluate(labels, result.assignments)["acc"] > 0.95


def test_head_consensus_picks_the_head_the_others_agree_with() -> None:
    truth = np.repeat(np.arange(3), 20)
    permuted = np.array([2, 0, 1])[truth]  # the same partition under other names
    noisy = truth.copy()
    noisy[:15] = 2  # a head that merged most of cluster 0 into cluster 2
    scores = head_consensus(np.stack([noisy, truth, permuted]), 3)
    assert scores[1] == scores[2] == max(scores)
    assert scores[0] < scores[1]
    assert head_consensus(truth[None], 3).tolist() == [1.0]


def test_align_clusters_undoes_a_permutation() -> None:
    reference = np.repeat(np.arange(4), 5)
    other = np.array([3, 1, 0, 2])[reference]
    mapping = align_clusters(reference, other, 4)
    assert np.array_equal(mapping[other], reference)
