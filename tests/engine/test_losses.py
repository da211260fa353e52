"""The three losses against naive references written here with explicit loops, plus the
behaviour the method relies on: SCAN's entropy term prevents collapse, self-labeling is
class-balanced and only trains the strong view."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

from scan_engine.losses import ConfidenceCrossEntropy, NTXentLoss, SCANLoss, entropy


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    # Tiny tensors on a shared 2-core box: extra intra-op threads only add contention.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- NT-Xent


def naive_ntxent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> float:
    """SimCLR eq. 1, one sample at a time: -log exp(s_ij/T) / sum_{k != i} exp(s_ik/T)."""
    z = torch.cat([z1, z2]).double().tolist()
    n = len(z)
    batch = n // 2

    def sim(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b, strict=True))

    total = 0.0
    for i in range(n):
        j = i + batch if i < batch else i - batch  # the other view of the same image
        numerator = math.exp(sim(z[i], z[j]) / temperature)
        denominator = sum(math.exp(sim(z[i], z[k]) / temperature) for k in range(n) if k != i)
        total += -math.log(numerator / denominator)
    return total / n


@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_ntxent_matches_naive_loops(temperature: float) -> None:
    generator = torch.Generator().manual_seed(0)
    z1 = F.normalize(torch.randn(6, 5, generator=generator), dim=1)
    z2 = F.normalize(torch.randn(6, 5, generator=generator), dim=1)
    loss = NTXentLoss(temperature)(z1, z2)
    assert loss.shape == ()
    assert loss.item() == pytest.approx(naive_ntxent(z1, z2, temperature), rel=1e-5)


def test_ntxent_lower_for_aligned_views() -> None:
    generator = torch.Generator().manual_seed(1)
    z1 = F.normalize(torch.randn(8, 16, generator=generator), dim=1)
    noise = F.normalize(torch.randn(8, 16, generator=generator), dim=1)
    loss = NTXentLoss(0.1)
    assert loss(z1, z1).item() < loss(z1, noise).item()


# ---------------------------------------------------------------- SCAN


def naive_consistency(anchor_logits: torch.Tensor, neighbor_logits: torch.Tensor) -> list[float]:
    """Per head: mean over samples of -log sum_c p_c(x) p_c(n), one sample at a time."""
    heads, batch, classes = anchor_logits.shape
    out = []
    for h in range(heads):
        total = 0.0
        for b in range(batch):
            a = [math.exp(v) for v in anchor_logits[h, b].tolist()]
            n = [math.exp(v) for v in neighbor_logits[h, b].tolist()]
            sa, sn = sum(a), sum(n)
            total += -math.log(sum(a[c] / sa * n[c] / sn for c in range(classes)))
        out.append(total / batch)
    return out


def naive_mean_entropy(anchor_logits: torch.Tensor) -> list[float]:
    heads, batch, classes = anchor_logits.shape
    out = []
    for h in range(heads):
        mean = [0.0] * classes
        for b in range(batch):
            e = [math.exp(v) for v in anchor_logits[h, b].tolist()]
            s = sum(e)
            for c in range(classes):
                mean[c] += e[c] / s / batch
        out.append(-sum(p * math.log(p) for p in mean if p > 0))
    return out


def test_scan_loss_shapes_and_naive_reference() -> None:
    generator = torch.Generator().manual_seed(0)
    anchors = torch.randn(3, 7, 4, generator=generator)
    neighbors = torch.randn(3, 7, 4, generator=generator)
    total, consistency, spread = SCANLoss(entropy_weight=2.0)(anchors, neighbors)
    assert total.shape == consistency.shape == spread.shape == (3,)
    assert consistency.tolist() == pytest.approx(naive_consistency(anchors, neighbors), rel=1e-5)
    assert spread.tolist() == pytest.approx(naive_mean_entropy(anchors), rel=1e-5)
    assert total.tolist() == pytest.approx((consistency - 2.0 * spread).tolist(), rel=1e-6)


def _one_hot_logits(clusters: list[int], num_classes: int, scale: float = 20.0) -> torch.Tensor:
    # (1, B, C): confident logits pointing at the given clusters.
    return (F.one_hot(torch.tensor(clusters), num_classes).float() * scale)[None]


def test_scan_loss_prefers_confident_consistent_balanced() -> None:
    loss = SCANLoss(entropy_weight=5.0)
    classes = 4
    balanced = [0, 1, 2, 3, 0, 1, 2, 3]
    good = loss(_one_hot_logits(balanced, classes), _one_hot_logits(balanced, classes))[0]
    shifted = [(c + 1) % classes for c in balanced]  # neighbours confidently disagree
    inconsistent = loss(_one_hot_logits(balanced, classes), _one_hot_logits(shifted, classes))[0]
    unsure_logits = torch.zeros(1, 8, classes)
    unsure = loss(unsure_logits, unsure_logits)[0]
    collapsed_assign = [2] * 8
    collapsed = loss(
        _one_hot_logits(collapsed_assign, classes), _one_hot_logits(collapsed_assign, classes)
    )[0]
    assert good.item() < inconsistent.item()
    assert good.item() < unsure.item()
    assert good.item() < collapsed.item()
    # The optimum: no disagreement, and the mean prediction has entropy log C.
    assert good.item() == pytest.approx(-5.0 * math.log(classes), abs=1e-3)


def _blob_pairs(
    num_blobs: int, per_blob: int, dim: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features from a few well-separated random blobs; each anchor's neighbour is another
    point of the same blob (what mined nearest neighbours give on clean data)."""
    centres = torch.randn(num_blobs, dim, generator=generator) * 4
    labels = torch.arange(num_blobs).repeat_interleave(per_blob)
    features = centres[labels] + 0.5 * torch.randn(len(labels), dim, generator=generator)
    # Neighbour: a random other member of the same blob.
    offsets = torch.randint(1, per_blob, (len(labels),), generator=generator)
    neighbor_index = labels * per_blob + (torch.arange(len(labels)) % per_blob + offsets) % per_blob
    return features, features[neighbor_index]


def _train_head(
    entropy_weight: float, anchors: torch.Tensor, neighbors: torch.Tensor, classes: int
) -> torch.Tensor:
    torch.manual_seed(0)
    head = torch.nn.Linear(anchors.shape[1], classes)
    optimizer = torch.optim.Adam(head.parameters(), lr=0.05)
    loss_fn = SCANLoss(entropy_weight)
    for _ in range(150):
        total, _, _ = loss_fn(head(anchors)[None], head(neighbors)[None])
        optimizer.zero_grad()
        total.sum().backward()
        optimizer.step()
    with torch.no_grad():
        return F.softmax(head(anchors), dim=1)  # (N, C)


def test_entropy_term_prevents_collapse() -> None:
    generator = torch.Generator().manual_seed(3)
    classes = 4
    anchors, neighbors = _blob_pairs(num_blobs=classes, per_blob=25, dim=8, generator=generator)
    with_entropy = _train_head(5.0, anchors, neighbors, classes)
    without = _train_head(0.0, anchors, neighbors, classes)

    used_with = with_entropy.argmax(1).unique().numel()
    used_without = without.argmax(1).unique().numel()
    spread_with = entropy(with_entropy.mean(0)).item()
    spread_without = entropy(without.mean(0)).item()

    assert used_with == classes
    assert spread_with > 0.95 * math.log(classes)
    # Only the consistency term: the trivial solution (everything in one cluster) wins.
    assert used_without < classes or spread_without < 0.5 * spread_with
    assert spread_without < spread_with


# ---------------------------------------------------------------- self-labeling


def test_confidence_ce_none_when_nothing_confident() -> None:
    weak = torch.zeros(5, 3)  # uniform: max p = 1/3
    strong = torch.randn(5, 3)
    loss, count = ConfidenceCrossEntropy(threshold=0.9)(weak, strong)
    assert loss is None and count == 0


def test_confidence_ce_counts_confident_only() -> None:
    weak = torch.tensor(
        [[10.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 10.0, 0.0], [1.0, 0.0, 0.0]]
    )  # rows 0 and 2 are confident (p ~ 0.9999), rows 1 and 3 are not
    strong = torch.randn(4, 3)
    loss, count = ConfidenceCrossEntropy(threshold=0.99)(weak, strong)
    assert count == 2
    assert loss is not None
    # Two confident samples of two different classes: equal weights, so plain CE on them.
    expected = F.cross_entropy(strong[[0, 2]], torch.tensor([0, 1]))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_confidence_ce_class_weights_balance_rare_class() -> None:
    generator = torch.Generator().manual_seed(0)
    # 6 confident samples of class 0, 1 of class 2, one unsure sample, C = 3.
    targets = [0, 0, 0, 0, 0, 0, 2]
    weak = torch.cat([F.one_hot(torch.tensor(targets), 3).float() * 12, torch.zeros(1, 3)])
    strong = torch.randn(8, 3, generator=generator)
    loss, count = ConfidenceCrossEntropy(threshold=0.99)(weak, strong)
    assert count == 7 and loss is not None

    # Hand-computed: weight ∝ 1 / class count among confident samples (class 1 absent).
    weights = torch.tensor([1 / 6, 0.0, 1 / 1])
    expected = F.cross_entropy(strong[:7], torch.tensor(targets), weight=weights)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)

    # Which is the mean of the per-class mean losses: the single class-2 sample weighs as much
    # as all six class-0 samples together.
    per_sample = F.cross_entropy(strong[:7], torch.tensor(targets), reduction="none")
    balanced = (per_sample[:6].mean() + per_sample[6]) / 2
    assert loss.item() == pytest.approx(balanced.item(), rel=1e-5)
    unweighted = per_sample.mean()
    assert abs(unweighted.item() - balanced.item()) > 1e-3  # the test can tell them apart


def test_confidence_ce_no_gradient_to_weak_logits() -> None:
    weak = (F.one_hot(torch.tensor([0, 1, 1]), 3).float() * 12).requires_grad_()
    strong = torch.randn(3, 3, requires_grad=True)
    loss, _ = ConfidenceCrossEntropy(threshold=0.99)(weak, strong)
    assert loss is not None
    loss.backward()
    assert weak.grad is None
    assert strong.grad is not None and strong.grad.abs().sum() > 0
