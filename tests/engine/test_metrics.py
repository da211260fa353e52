"""Clustering metrics: hand-computed cases and agreement with scikit-learn."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from scan_engine import metrics


def test_hungarian_on_permuted_labels_is_perfect() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, size=200)
    permutation = np.array([3, 0, 4, 1, 2])
    preds = permutation[labels]
    assert metrics.cluster_accuracy(labels, preds) == 1.0
    mapping = metrics.hungarian_mapping(labels, preds)
    assert mapping == {int(permutation[k]): k for k in range(5)}
    result = metrics.evaluate(labels, preds)
    assert result["acc"] == 1.0 and result["nmi"] == pytest.approx(1.0)
    assert result["ari"] == pytest.approx(1.0) and result["method"] == "hungarian"


def test_accuracy_hand_case() -> None:
    labels = [0, 0, 0, 1, 1, 1, 2, 2]
    preds = [1, 1, 0, 0, 0, 2, 2, 2]
    # Contingency (class x cluster): class0 -> {c1: 2, c0: 1}, class1 -> {c0: 2, c2: 1},
    # class2 -> {c2: 2}. Best matching c1->0, c0->1, c2->2 gets 2 + 2 + 2 = 6 of 8.
    assert metrics.cluster_accuracy(labels, preds) == pytest.approx(6 / 8)
    assert metrics.hungarian_mapping(labels, preds) == {0: 1, 1: 0, 2: 2}
    assert metrics.mapped_accuracy(labels, preds, {0: 1, 1: 0, 2: 2}) == pytest.approx(6 / 8)


def test_nmi_ari_match_sklearn() -> None:
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, size=300)
    preds = np.where(rng.random(300) < 0.7, labels, rng.integers(0, 6, size=300))
    result = metrics.evaluate(labels, preds)
    assert result["nmi"] == pytest.approx(normalized_mutual_info_score(labels, preds))
    assert result["ari"] == pytest.approx(adjusted_rand_score(labels, preds))
    assert 0.0 < result["nmi"] < 1.0 and 0.0 < result["ari"] < 1.0


def test_majority_vote_for_overclustering_hand_case() -> None:
    # 2 classes, 4 clusters (cluster 3 is empty): clusters 0 and 1 are mostly class 0, 2 is class 1.
    labels = [0, 0, 0, 1, 0, 0, 1, 1, 1, 0]
    preds = [0, 0, 0, 0, 1, 1, 2, 2, 2, 2]
    mapping = metrics.majority_vote_mapping(labels, preds, num_clusters=4)
    assert mapping == {0: 0, 1: 0, 2: 1}
    result = metrics.evaluate(labels, preds, num_classes=2, num_clusters=4)
    assert result["method"] == "majority_vote"
    # Right: 3 of cluster 0, 2 of cluster 1, 3 of cluster 2.
    assert result["acc"] == pytest.approx(8 / 10)
    assert result["mapping"] == [0, 0, 1, None]
    assert result["unmatched"] == 0
    assert result["confusion"] == [[3, 2, 1, 0], [1, 0, 3, 0]]
    assert result["mapped_confusion"] == [[5, 1], [1, 3]]
    # Hungarian on the same data may use only one cluster per class, so it scores lower.
    assert metrics.cluster_accuracy(labels, preds) == pytest.approx(6 / 10)


def test_fewer_clusters_than_classes_counts_unmatched_as_wrong() -> None:
    labels = [0, 0, 1, 1, 2, 2]
    preds = [0, 0, 1, 1, 1, 1]
    # Only two clusters: class 2 (or 1) can never be right. Best is 2 + 2 of 6.
    assert metrics.cluster_accuracy(labels, preds) == pytest.approx(4 / 6)
    result = metrics.evaluate(labels, preds)
    assert result["method"] == "hungarian"
    assert result["acc"] == pytest.approx(4 / 6)
    assert result["mapping"][0] == 0 and result["mapping"][1] in (1, 2)
    assert np.array(result["mapped_confusion"]).sum() == 6


def test_more_clusters_than_classes_hungarian_leaves_clusters_unmatched() -> None:
    labels = [0, 0, 0, 1, 1, 1]
    preds = [0, 0, 2, 1, 1, 1]
    assert metrics.hungarian_mapping(labels, preds) == {0: 0, 1: 1}
    # Cluster 2 has no class under one-to-one matching: its image counts as wrong.
    assert metrics.cluster_accuracy(labels, preds) == pytest.approx(5 / 6)
    assert metrics.apply_mapping(preds, {0: 0, 1: 1}).tolist() == [0, 0, -1, 1, 1, 1]


def test_confusion_matrix_hand_case() -> None:
    labels = [0, 1, 1, 2, 2, 2]
    preds = [1, 1, 0, 0, 0, 2]
    counts = metrics.contingency_matrix(labels, preds)
    assert counts.tolist() == [[0, 1, 0], [1, 1, 0], [2, 0, 1]]
    mapped = metrics.mapped_confusion_matrix(labels, preds, {0: 2, 1: 1, 2: 0})
    assert mapped.tolist() == [[0, 1, 0], [0, 1, 1], [1, 0, 2]]
    # Known sizes add empty rows / columns.
    assert metrics.contingency_matrix(labels, preds, num_classes=4, num_clusters=5).shape == (4, 5)


def test_evaluate_is_json_serialisable_and_accepts_tensors() -> None:
    labels = torch.tensor([0, 0, 1, 1])
    preds = torch.tensor([1, 1, 0, 0])
    result = metrics.evaluate(labels, preds)
    assert json.loads(json.dumps(result)) == result
    assert result["acc"] == 1.0 and result["mapping"] == [1, 0]


def test_labels_none_gives_none() -> None:
    preds = [0, 1, 1]
    assert metrics.evaluate(None, preds) is None
    assert metrics.cluster_accuracy(None, preds) is None
    assert metrics.hungarian_mapping(None, preds) is None
    assert metrics.majority_vote_mapping(None, preds) is None
    assert metrics.contingency_matrix(None, preds) is None


def test_bad_input_is_rejected() -> None:
    with pytest.raises(ValueError, match="differ"):
        metrics.evaluate([0, 1], [0, 1, 1])
    with pytest.raises(ValueError, match="non-negative"):
        metrics.evaluate([0, -1], [0, 1])
    with pytest.raises(ValueError, match="num_classes"):
        metrics.evaluate([0, 3], [0, 1], num_classes=2)
