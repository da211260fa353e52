"""Clustering metrics against ground-truth labels: ACC, NMI, ARI, cluster->class maps, confusion.

Accuracy needs a mapping from clusters to classes. With as many clusters as classes (or fewer) it
is the one-to-one Hungarian matching that maximises agreement (SCAN paper, Sec. 4); with more
clusters (overclustering) each cluster maps to its most frequent class (majority vote). Clusters
left without a class count as wrong. Every public function returns None when `labels` is None, so
callers can pass an optional ground truth straight through.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

__all__ = [
    "contingency_matrix",
    "hungarian_mapping",
    "majority_vote_mapping",
    "apply_mapping",
    "cluster_accuracy",
    "mapped_accuracy",
    "mapped_confusion_matrix",
    "evaluate",
]

logger = logging.getLogger(__name__)

ArrayLike = np.ndarray | torch.Tensor | list[int]


def _as_labels(values: ArrayLike, name: str) -> np.ndarray:
    """Return a 1-d int64 numpy copy of non-negative integer ids (numpy, torch or list)."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-d, got shape {array.shape}")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{name} must hold integers, got dtype {array.dtype}")
    array = array.astype(np.int64, copy=False)
    if array.size and array.min() < 0:
        raise ValueError(f"{name} must be non-negative")
    return array


def _pair(labels: ArrayLike, preds: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    labels_np, preds_np = _as_labels(labels, "labels"), _as_labels(preds, "preds")
    if labels_np.shape != preds_np.shape:
        raise ValueError(f"labels {labels_np.shape} and preds {preds_np.shape} differ in length")
    if labels_np.size == 0:
        raise ValueError("labels and preds are empty")
    return labels_np, preds_np


def _count(values: np.ndarray, given: int | None, name: str) -> int:
    """Number of ids: `given` when the caller knows it (ids must fit), else max id + 1."""
    needed = int(values.max()) + 1
    if given is None:
        return needed
    if given < needed:
        raise ValueError(f"{name}={given} but the data holds id {needed - 1}")
    return int(given)


def contingency_matrix(
    labels: ArrayLike | None,
    preds: ArrayLike,
    num_classes: int | None = None,
    num_clusters: int | None = None,
) -> np.ndarray | None:
    """Counts (K classes, C clusters) int64: entry [k, c] = images of class k put in cluster c.

    This is the classes x clusters confusion matrix.
    """
    if labels is None:
        return None
    labels_np, preds_np = _pair(labels, preds)
    num_classes = _count(labels_np, num_classes, "num_classes")
    num_clusters = _count(preds_np, num_clusters, "num_clusters")
    flat = labels_np * num_clusters + preds_np  # (N,) cell index in the (K, C) grid
    counts = np.bincount(flat, minlength=num_classes * num_clusters)
    return counts.reshape(num_classes, num_clusters).astype(np.int64)


def _hungarian_from_counts(counts: np.ndarray) -> dict[int, int]:
    # Maximise matched counts; rectangular matrices match min(K, C) pairs, the rest stay unmatched.
    cluster_ids, class_ids = linear_sum_assignment(counts.T, maximize=True)  # counts.T: (C, K)
    return {int(c): int(k) for c, k in zip(cluster_ids, class_ids, strict=True)}


def hungarian_mapping(
    labels: ArrayLike | None,
    preds: ArrayLike,
    num_classes: int | None = None,
    num_clusters: int | None = None,
) -> dict[int, int] | None:
    """One-to-one cluster -> class mapping maximising agreement (Hungarian matching).

    Works for C != K: only min(C, K) clusters get a class; the others are absent from the dict.
    """
    counts = contingency_matrix(labels, preds, num_classes, num_clusters)
    return None if counts is None else _hungarian_from_counts(counts)


def _majority_from_counts(counts: np.ndarray) -> dict[int, int]:
    # argmax breaks ties towards the lower class id; empty clusters have no majority and no class.
    sizes = counts.sum(axis=0)  # (C,)
    winners = counts.argmax(axis=0)  # (C,)
    return {int(c): int(winners[c]) for c in np.flatnonzero(sizes)}


def majority_vote_mapping(
    labels: ArrayLike | None,
    preds: ArrayLike,
    num_classes: int | None = None,
    num_clusters: int | None = None,
) -> dict[int, int] | None:
    """Many-to-one mapping for overclustering: each non-empty cluster -> its most frequent class."""
    counts = contingency_matrix(labels, preds, num_classes, num_clusters)
    return None if counts is None else _majority_from_counts(counts)


def apply_mapping(preds: ArrayLike, mapping: dict[int, int]) -> np.ndarray:
    """Map cluster ids to class ids, (N,) int64; clusters without a class become -1."""
    preds_np = _as_labels(preds, "preds")
    size = max(int(preds_np.max()) + 1 if preds_np.size else 0, max(mapping, default=-1) + 1)
    table = np.full(size, -1, dtype=np.int64)
    for cluster, cls in mapping.items():
        table[cluster] = cls
    return table[preds_np]


def mapped_accuracy(
    labels: ArrayLike | None, preds: ArrayLike, mapping: dict[int, int]
) -> float | None:
    """Fraction of images whose cluster maps to their class (unmapped clusters count as wrong)."""
    if labels is None:
        return None
    labels_np, preds_np = _pair(labels, preds)
    return float(np.mean(apply_mapping(preds_np, mapping) == labels_np))


def cluster_accuracy(
    labels: ArrayLike | None,
    preds: ArrayLike,
    num_classes: int | None = None,
    num_clusters: int | None = None,
) -> float | None:
    """Clustering accuracy (ACC) under the Hungarian one-to-one matching; works for C != K."""
    counts = contingency_matrix(labels, preds, num_classes, num_clusters)
    if counts is None:
        return None
    mapping = _hungarian_from_counts(counts)
    matched = sum(int(counts[cls, cluster]) for cluster, cls in mapping.items())
    return matched / int(counts.sum())


def mapped_confusion_matrix(
    labels: ArrayLike | None,
    preds: ArrayLike,
    mapping: dict[int, int],
    num_classes: int | None = None,
) -> np.ndarray | None:
    """(K, K) int64: entry [true, predicted] after mapping clusters to classes.

    Images in clusters without a class appear in no column (rows then sum to less than the class
    size); the classes x clusters matrix from `contingency_matrix` shows where they went.
    """
    if labels is None:
        return None
    labels_np, preds_np = _pair(labels, preds)
    num_classes = _count(labels_np, num_classes, "num_classes")
    if mapping and max(mapping.values()) >= num_classes:
        raise ValueError("mapping names a class id >= num_classes")
    mapped = apply_mapping(preds_np, mapping)  # (N,) class id or -1
    keep = mapped >= 0
    flat = labels_np[keep] * num_classes + mapped[keep]
    counts = np.bincount(flat, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).astype(np.int64)


def evaluate(
    labels: ArrayLike | None,
    preds: ArrayLike,
    num_classes: int | None = None,
    num_clusters: int | None = None,
) -> dict[str, Any] | None:
    """All metrics as a JSON-serialisable dict, or None without labels.

    Keys: acc, nmi, ari, method ("hungarian" when C <= K, "majority_vote" when C > K),
    mapping (list, entry c = class of cluster c or None), unmatched (images in clusters without a
    class), confusion (K x C classes x clusters counts), mapped_confusion (K x K), num_classes,
    num_clusters. Pass num_classes / num_clusters when known: empty trailing clusters or classes
    are invisible in the data and would otherwise change K or C (and so the method).
    """
    if labels is None:
        return None
    labels_np, preds_np = _pair(labels, preds)
    counts = contingency_matrix(labels_np, preds_np, num_classes, num_clusters)
    assert counts is not None  # labels are given
    num_classes, num_clusters = counts.shape
    if num_clusters > num_classes:
        method, mapping = "majority_vote", _majority_from_counts(counts)
    else:
        method, mapping = "hungarian", _hungarian_from_counts(counts)
    matched = sum(int(counts[cls, cluster]) for cluster, cls in mapping.items())
    total = int(counts.sum())
    result = {
        "acc": matched / total,
        "nmi": float(normalized_mutual_info_score(labels_np, preds_np)),
        "ari": float(adjusted_rand_score(labels_np, preds_np)),
        "method": method,
        "mapping": [mapping.get(c) for c in range(num_clusters)],
        "unmatched": int(sum(counts[:, c].sum() for c in range(num_clusters) if c not in mapping)),
        "confusion": counts.tolist(),
        "mapped_confusion": mapped_confusion_matrix(
            labels_np, preds_np, mapping, num_classes
        ).tolist(),
        "num_classes": int(num_classes),
        "num_clusters": int(num_clusters),
    }
    logger.debug(
        "evaluate: %s acc=%.4f nmi=%.4f ari=%.4f",
        method,
        result["acc"],
        result["nmi"],
        result["ari"],
    )
    return result
