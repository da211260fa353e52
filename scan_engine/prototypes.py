"""Per-cluster summaries for the gallery: size, mean confidence, top members and a prototype.

The prototype follows the SCAN paper (Sec. 4, "prototype behaviour"): the member whose feature is
closest, by cosine similarity, to the mean feature of the cluster's most confident members.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from scan_engine.results import ClusterSummary

__all__ = ["cluster_summaries"]

logger = logging.getLogger(__name__)


def _numpy(values: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().numpy()
    return np.asarray(values)


def cluster_summaries(
    features: np.ndarray | torch.Tensor,
    assignments: np.ndarray | torch.Tensor,
    confidence: np.ndarray | torch.Tensor,
    num_clusters: int,
    prototype_members: int = 10,
    top_members: int = 12,
) -> list[ClusterSummary]:
    """One ClusterSummary per cluster 0..num_clusters-1, indices being positions in the collection.

    features: (N, D) float; assignments: (N,) int cluster ids; confidence: (N,) float max softmax.
    top_members: up to `top_members` ids, most confident first (ties: lower index first).
    prototype: the member closest (cosine) to the mean feature of its `prototype_members` most
    confident members. Empty clusters get size 0, mean confidence 0.0, prototype None.
    """
    if prototype_members < 1 or top_members < 0:
        raise ValueError("prototype_members must be >= 1 and top_members >= 0")
    feats = _numpy(features).astype(np.float32, copy=False)
    assign = _numpy(assignments).astype(np.int64, copy=False)
    conf = _numpy(confidence).astype(np.float64, copy=False)
    n = assign.shape[0]
    if feats.ndim != 2 or feats.shape[0] != n or conf.shape != (n,) or assign.ndim != 1:
        raise ValueError(
            f"shapes do not agree: features {feats.shape}, assignments {assign.shape}, "
            f"confidence {conf.shape}"
        )
    if n and (assign.min() < 0 or assign.max() >= num_clusters):
        raise ValueError(f"assignments must lie in [0, {num_clusters})")

    # Cosine needs unit rows; features usually are already, this guards against a caller's raw ones.
    norms = np.linalg.norm(feats, axis=1, keepdims=True)  # (N, 1)
    unit = feats / np.maximum(norms, 1e-12)  # (N, D)

    # One sort groups images by cluster, most confident first within a cluster; lexsort is
    # stable, so equal confidences keep index order.
    order = np.lexsort((-conf, assign))  # (N,) last key is the primary one
    bounds = np.searchsorted(assign[order], np.arange(num_clusters + 1))  # (C+1,)

    summaries: list[ClusterSummary] = []
    for cluster in range(num_clusters):
        members = order[bounds[cluster] : bounds[cluster + 1]]  # most confident first
        if members.size == 0:
            summaries.append(ClusterSummary(cluster, 0, 0.0, None, []))
            continue
        centre = unit[members[:prototype_members]].mean(axis=0)  # (D,)
        if np.linalg.norm(centre) > 1e-12:
            # argmax returns the first maximum, i.e. the more confident member on a tie.
            prototype = int(members[np.argmax(unit[members] @ centre)])
        else:  # confident members cancel out: no direction to compare against
            prototype = int(members[0])
        summaries.append(
            ClusterSummary(
                index=cluster,
                size=int(members.size),
                mean_confidence=float(conf[members].mean()),
                prototype=prototype,
                top_members=[int(i) for i in members[:top_members]],
            )
        )
    logger.debug(
        "cluster_summaries: %d clusters, %d empty",
        num_clusters,
        sum(s.size == 0 for s in summaries),
    )
    return summaries
