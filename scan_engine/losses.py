"""The three losses of the method, each an nn.Module holding its own hyper-parameters.

NTXentLoss: SimCLR pretext (Chen et al. 2020). SCANLoss: neighbours agree + entropy of the mean
prediction (SCAN, eq. 2). ConfidenceCrossEntropy: self-labeling on confident samples, weighted
inversely to each class's share (SCAN, section 3.3).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["NTXentLoss", "SCANLoss", "ConfidenceCrossEntropy", "entropy"]


class NTXentLoss(nn.Module):
    """Normalised temperature-scaled cross entropy over 2B views; positives are the paired views."""

    def __init__(self, temperature: float = 0.1) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        # z1, z2: (B, D), L2-normalised projections of two views of the same B images.
        batch = z1.shape[0]
        z = torch.cat([z1, z2]).float()  # (2B, D)
        logits = z @ z.T / self.temperature  # (2B, 2B)
        logits.fill_diagonal_(float("-inf"))  # a view is never its own negative
        targets = torch.cat([torch.arange(batch, 2 * batch), torch.arange(batch)]).to(z.device)
        return F.cross_entropy(logits, targets)


def entropy(probabilities: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return -(probabilities * torch.log(probabilities.clamp_min(1e-8))).sum(dim)


class SCANLoss(nn.Module):
    """-mean log <p(x), p(n)>  -  λ · H(mean_batch p(x)), per head.

    Takes logits of shape (H, B, C) for the anchors and their neighbours and returns per-head
    (total, consistency, entropy), each (H,), so that heads can be compared and the best kept.
    """

    def __init__(self, entropy_weight: float = 5.0) -> None:
        super().__init__()
        self.entropy_weight = entropy_weight

    def forward(
        self, anchor_logits: torch.Tensor, neighbor_logits: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        anchor = F.softmax(anchor_logits.float(), dim=-1)  # (H, B, C)
        neighbor = F.softmax(neighbor_logits.float(), dim=-1)
        agreement = (anchor * neighbor).sum(-1)  # (H, B)
        consistency = -torch.log(agreement.clamp_min(1e-8)).mean(-1)  # (H,)
        spread = entropy(anchor.mean(1))  # (H,) entropy of the mean prediction per head
        return consistency - self.entropy_weight * spread, consistency, spread


class ConfidenceCrossEntropy(nn.Module):
    """Cross entropy on the strong view against the weak view's confident argmax.

    Returns None when no sample in the batch is confident (the caller skips that step). Class
    weights are inverse to each class's share among the confident samples of the batch, so that
    self-labeling does not let a dominant cluster swallow the others.
    """

    def __init__(self, threshold: float = 0.99) -> None:
        super().__init__()
        self.threshold = threshold

    def forward(
        self, weak_logits: torch.Tensor, strong_logits: torch.Tensor
    ) -> tuple[torch.Tensor | None, int]:
        # weak_logits, strong_logits: (B, C); weak has no gradient.
        probabilities = F.softmax(weak_logits.detach().float(), dim=1)
        confidence, targets = probabilities.max(1)
        mask = confidence > self.threshold
        count = int(mask.sum())
        if count == 0:
            return None, 0
        targets = targets[mask]
        num_classes = weak_logits.shape[1]
        counts = torch.bincount(targets, minlength=num_classes).float()
        weights = torch.zeros(num_classes, device=weak_logits.device)
        present = counts > 0
        weights[present] = count / counts[present]  # inverse share of the confident samples
        weights = weights / weights[present].sum() * present.sum()
        loss = F.cross_entropy(strong_logits[mask].float(), targets, weight=weights)
        return loss, count
