"""Cluster summaries on a hand-made example: sizes, top-member order, prototypes, empty clusters."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from scan_engine.prototypes import cluster_summaries


def _example() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    s = np.sqrt(0.5)
    features = np.array(
        [
            [1.0, 0.0, 0.0],  # 0: cluster 0, confidence 0.9
            [0.0, 1.0, 0.0],  # 1: cluster 0, confidence 0.8
            [s, s, 0.0],  # 2: cluster 0, least confident, but exactly between 0 and 1
            [0.0, 0.0, 1.0],  # 3: cluster 2, confidence 0.7
            [0.0, s, s],  # 4: cluster 2, most confident
            [0.0, 0.0, 0.0],  # 5: cluster 2, same confidence as 3; set below
        ],
        dtype=np.float32,
    )
    # Row 5 bisects rows 3 and 4, the two most confident members of cluster 2.
    features[5] = (features[3] + features[4]) / np.linalg.norm(features[3] + features[4])
    assignments = np.array([0, 0, 0, 2, 2, 2])
    confidence = np.array([0.9, 0.8, 0.5, 0.7, 0.95, 0.7], dtype=np.float32)
    return features, assignments, confidence


def test_summaries_hand_example() -> None:
    features, assignments, confidence = _example()
    summaries = cluster_summaries(
        features, assignments, confidence, num_clusters=3, prototype_members=2, top_members=2
    )
    assert [s.index for s in summaries] == [0, 1, 2]

    first, empty, last = summaries
    assert first.size == 3
    assert first.mean_confidence == pytest.approx((0.9 + 0.8 + 0.5) / 3)
    assert first.top_members == [0, 1]  # most confident first, cut at top_members
    # Mean of the 2 most confident (rows 0 and 1) points along row 2, the least confident member.
    assert first.prototype == 2

    assert (empty.size, empty.prototype, empty.top_members, empty.mean_confidence) == (
        0,
        None,
        [],
        0.0,
    )

    assert last.size == 3
    assert last.top_members == [4, 3]  # 3 and 5 tie at 0.7: lower index first
    # The mean of two unit rows is equally close to both; the bisecting row 5 is closer still.
    assert last.prototype == 5
    assert json.dumps(last.to_json())  # plain ints and floats


def test_prototype_members_changes_the_prototype() -> None:
    features, assignments, confidence = _example()
    # Only the single most confident member: the prototype is that member itself.
    summaries = cluster_summaries(features, assignments, confidence, 3, prototype_members=1)
    assert summaries[0].prototype == 0 and summaries[2].prototype == 4
    assert summaries[0].top_members == [0, 1, 2]  # top_members defaults to 12: all members


def test_accepts_tensors_and_unnormalised_features() -> None:
    features, assignments, confidence = _example()
    scaled = features * np.array([[3.0], [0.5], [7.0], [2.0], [1.0], [9.0]], dtype=np.float32)
    summaries = cluster_summaries(
        torch.from_numpy(scaled),
        torch.from_numpy(assignments),
        torch.from_numpy(confidence),
        3,
        prototype_members=2,
    )
    # Cosine ignores the row norms, so the answer is unchanged.
    assert summaries[0].prototype == 2 and summaries[2].prototype == 5


def test_assignments_out_of_range_rejected() -> None:
    features, assignments, confidence = _example()
    with pytest.raises(ValueError, match="assignments"):
        cluster_summaries(features, assignments, confidence, num_clusters=2)
