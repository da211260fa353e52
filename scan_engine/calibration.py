"""Confidence that means something: one softmax temperature fitted without labels.

SCAN heads on fixed features end with sharp softmaxes (the feature scale makes them so), and
self-labeling sharpens them further: a max-probability of 0.99 says nothing about how often the
cluster is right. We fit a temperature T on the model's own evidence instead of labels: the
cluster that independently trained heads give an image (aligned to the final clusters by
Hungarian matching), or, with no other head at hand, the cluster of its mined neighbours.

    T* = argmin_T  -mean_i log softmax(z_i / T)[t_i]

where t_i are those reference clusters. The shown **confidence** of an image is then
max_c softmax(z_i / T*)_c: the estimated probability that another head trained on the same
features, or a neighbour, lands in the same cluster. How often independently trained models
agree tracks their accuracy (Jiang et al., "Assessing Generalization of SGD via Disagreement",
ICLR 2022), so a result whose heads disagree cannot show high confidence.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

__all__ = ["align_clusters", "fit_temperature", "calibrated_probabilities"]

# T is searched on a log grid, then refined: a one-dimensional convex-ish problem, no optimiser.
_TEMPERATURES = np.exp(np.linspace(np.log(0.05), np.log(50.0), 121))


def align_clusters(reference: np.ndarray, other: np.ndarray, num_clusters: int) -> np.ndarray:
    """(C,) map from `other`'s cluster indices to `reference`'s that maximises agreement
    (Hungarian matching on the (C, C) co-occurrence counts). Both (N,) int arrays."""
    counts = np.zeros((num_clusters, num_clusters), dtype=np.int64)
    np.add.at(counts, (np.asarray(other), np.asarray(reference)), 1)
    rows, columns = linear_sum_assignment(-counts)
    mapping = np.arange(num_clusters)
    mapping[rows] = columns
    return mapping


@torch.inference_mode()
def fit_temperature(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """T minimising the cross entropy of softmax(logits / T) against `targets`.

    logits: (N, C); targets: (N,) or (N, R) int cluster indices (R reference labels per image,
    e.g. R other heads or R neighbours)."""
    z = logits.double()
    t = targets.long().reshape(z.shape[0], -1)  # (N, R)

    def loss(temperature: float) -> float:
        log_p = F.log_softmax(z / temperature, dim=1)  # (N, C)
        return float(-log_p.gather(1, t).mean())

    values = [loss(float(temperature)) for temperature in _TEMPERATURES]
    best = int(np.argmin(values))
    low = _TEMPERATURES[max(best - 1, 0)]
    high = _TEMPERATURES[min(best + 1, len(_TEMPERATURES) - 1)]
    fine = np.linspace(low, high, 41)
    return float(fine[int(np.argmin([loss(float(temperature)) for temperature in fine]))])


def calibrated_probabilities(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """(N, C) softmax(logits / T)."""
    return F.softmax(logits.float() / temperature, dim=1)
