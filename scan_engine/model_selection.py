"""Choosing the number of clusters K without labels, and merging an overclustering back to K.

**K selection.** The pipeline trains one head per candidate C (all heads share the backbone, so a
candidate costs only linear heads) and scores every candidate from the model itself, with
P (N, C) the softmax of the chosen head on the plain images, q = mean_i P[i] and F (N, D) the
L2-normalised backbone features:

- consistency  κ(C) = (a - a0) / (1 - a0), where a = mean over images i and their mined
  neighbours n of <P[i], P[n]> (the SCAN consistency term) and a0 = <q, q>, the agreement two
  images drawn at random would have. Chance-corrected (a kappa), because raw agreement always
  favours few clusters.
- balance      β(C) = H(q) / log C, the SCAN entropy term normalised to [0, 1]: 1 when the
  images spread evenly, lower when the head leaves clusters (nearly) empty.
- silhouette   s(C) = mean cosine silhouette of the hard assignments argmax P on F (on a seeded
  sample of at most SILHOUETTE_SAMPLE images); it drops when C merges groups that the features
  keep apart, and when C splits a compact group.
- small        m(C) = share of clusters holding fewer than SMALL_CLUSTER_SHARE · N / C images.

    score(C) = β(C) · (κ(C) + s(C)) / 2  -  m(C)

Each of κ and s is at most 1, so a perfect candidate scores 1. The highest score wins; a tie goes to
the smaller C (the simpler answer). Every candidate's score and components are reported, so a
person can overrule the choice. Labels are never used here; `scripts/validate_k_selection.py`
measures on labelled collections how often the choice lands on the true number of classes.

**Merging.** An overclustering into C clusters is merged to k < C by repeatedly joining the two
clusters the model confuses most: with A = (1 / (N·K)) Σ_i Σ_{n ∈ N(i)} P[i]ᵀ P[n] (C, C), the
probability mass that an image and a mined neighbour split between two clusters, merge the pair
(a, b) with the largest (A[a, b] + A[b, a]) / (2 · min(m[a], m[b])), m = row sums of A (the
share of the smaller cluster's neighbour pairs that cross into the other); A and m are summed over
merged clusters. Prediction applies the same groups by summing probabilities within a group.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from scan_engine.config import ScanConfig
    from scan_engine.runtime import Runtime
    from scan_engine.training import Reporter

__all__ = [
    "SILHOUETTE_SAMPLE",
    "SMALL_CLUSTER_SHARE",
    "CandidateScore",
    "KSelection",
    "neighbor_agreement",
    "neighbor_consistency",
    "cluster_silhouette",
    "score_candidate",
    "select_num_clusters",
    "train_candidate_heads",
    "run_k_selection",
    "neighbor_coassignment",
    "head_consensus",
    "merge_groups",
    "merge_probabilities",
]

logger = logging.getLogger(__name__)

# Silhouette is O(n²); a seeded sample keeps it a fraction of a second at any collection size.
SILHOUETTE_SAMPLE = 2000
# A cluster with fewer images than this share of the even size N / C counts as (nearly) empty.
SMALL_CLUSTER_SHARE = 0.25


def _tensor(values: np.ndarray | torch.Tensor) -> torch.Tensor:
    if isinstance(values, np.ndarray):
        return torch.from_numpy(values)
    return values.detach().cpu()


@torch.inference_mode()
def neighbor_agreement(
    probabilities: np.ndarray | torch.Tensor,
    neighbors: np.ndarray | torch.Tensor,
    chunk: int = 4096,
) -> tuple[float, float]:
    """(a, a0): mean <P[i], P[n]> over images and their mined neighbours, and its chance level
    <q, q>. probabilities: (N, C) rows summing to 1; neighbors: (N, K) int indices."""
    p = _tensor(probabilities).double()
    index = _tensor(neighbors).long()
    total = 0.0
    for start in range(0, p.shape[0], chunk):
        anchor = p[start : start + chunk]  # (b, C)
        neighbor = p[index[start : start + chunk]]  # (b, K, C)
        total += float((anchor.unsqueeze(1) * neighbor).sum())
    agreement = total / (index.shape[0] * index.shape[1])
    mean = p.mean(0)  # (C,)
    return agreement, float(mean @ mean)


def neighbor_consistency(
    probabilities: np.ndarray | torch.Tensor, neighbors: np.ndarray | torch.Tensor
) -> float:
    """κ = (a - a0) / (1 - a0): how much more images agree with their mined neighbours than
    chance (neighbor_agreement); 0 at chance, 1 when every neighbour shares the cluster."""
    agreement, chance = neighbor_agreement(probabilities, neighbors)
    return _kappa(agreement, chance)


def _kappa(agreement: float, chance: float) -> float:
    return (agreement - chance) / max(1.0 - chance, 1e-12)


def cluster_silhouette(
    features: np.ndarray | torch.Tensor,
    assignments: np.ndarray,
    sample: int = SILHOUETTE_SAMPLE,
    seed: int = 0,
) -> float:
    """Mean cosine silhouette of `assignments` (N,) on `features` (N, D); -1 when fewer than two
    clusters are used (one blob explains nothing), on a seeded sample of at most `sample` images."""
    from sklearn.metrics import silhouette_score

    labels = np.asarray(assignments)
    used = np.unique(labels)
    if used.size < 2 or used.size >= labels.size:
        return -1.0
    x = _tensor(features).float().numpy()
    if labels.size > sample:
        rows = np.sort(np.random.default_rng(seed).choice(labels.size, sample, replace=False))
        x, labels = x[rows], labels[rows]
        if np.unique(labels).size < 2:
            return -1.0
    return float(silhouette_score(x, labels, metric="cosine"))


@dataclass(frozen=True)
class CandidateScore:
    """The label-free score of one candidate cluster count and what it is made of."""

    num_clusters: int
    score: float
    consistency: float  # κ: chance-corrected neighbour agreement
    neighbor_agreement: float  # a: mean <p(x), p(n)> over mined neighbour pairs
    chance_agreement: float  # a0 = <q, q>
    balance: float  # β: H(mean prediction) / log C
    silhouette: float  # s: cosine silhouette of the hard assignments on the features
    small_clusters: float  # m: share of clusters below SMALL_CLUSTER_SHARE · N / C images
    used_clusters: int  # clusters holding at least one image

    def to_json(self) -> dict[str, Any]:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def score_candidate(
    probabilities: np.ndarray | torch.Tensor,
    neighbors: np.ndarray | torch.Tensor,
    features: np.ndarray | torch.Tensor,
    seed: int = 0,
) -> CandidateScore:
    """Score one candidate C from its head's probabilities (N, C), the mined neighbours (N, K) and
    the L2-normalised features (N, D); the formula is in the module docstring."""
    p = _tensor(probabilities).double()
    num_images, num_clusters = p.shape
    agreement, chance = neighbor_agreement(p, neighbors)
    consistency = _kappa(agreement, chance)
    mean = p.mean(0)  # (C,)
    entropy = float(-(mean * mean.clamp_min(1e-12).log()).sum())
    balance = entropy / math.log(num_clusters)
    assignments = p.argmax(1).numpy()
    sizes = np.bincount(assignments, minlength=num_clusters)  # (C,)
    small = float(np.mean(sizes < SMALL_CLUSTER_SHARE * num_images / num_clusters))
    silhouette = cluster_silhouette(features, assignments, seed=seed)
    score = balance * (consistency + silhouette) / 2 - small
    return CandidateScore(
        num_clusters=int(num_clusters),
        score=float(score),
        consistency=float(consistency),
        neighbor_agreement=float(agreement),
        chance_agreement=float(chance),
        balance=float(balance),
        silhouette=float(silhouette),
        small_clusters=small,
        used_clusters=int((sizes > 0).sum()),
    )


SCORE_RULE = (
    "score = balance * (consistency + silhouette) / 2 - small_clusters; highest wins, ties to "
    "the smaller C (scan_engine.model_selection)"
)


@dataclass(frozen=True)
class KSelection:
    """Every candidate's score (ascending C) and the chosen K."""

    candidates: list[CandidateScore]
    chosen: int

    def to_json(self) -> dict[str, Any]:
        return {
            "chosen": self.chosen,
            "rule": SCORE_RULE,
            "candidates": [c.to_json() for c in self.candidates],
        }

    @classmethod
    def from_json(cls, saved: dict[str, Any]) -> KSelection:
        return cls([CandidateScore(**c) for c in saved["candidates"]], int(saved["chosen"]))


def select_num_clusters(
    probabilities: Mapping[int, np.ndarray | torch.Tensor],
    neighbors: np.ndarray | torch.Tensor,
    features: np.ndarray | torch.Tensor,
    candidates: list[int] | None = None,
    seed: int = 0,
) -> KSelection:
    """Score every candidate C (default: every key of `probabilities`, {C: (N, C)}) and pick K."""
    counts = sorted(probabilities if candidates is None else candidates)
    if not counts:
        raise ValueError("no candidate cluster counts to choose from")
    scores = [score_candidate(probabilities[c], neighbors, features, seed) for c in counts]
    # max() keeps the first of equal scores, and counts ascend: a tie goes to the smaller C.
    best = max(scores, key=lambda s: round(s.score, 6))
    logger.info(
        "K selection: chose %d from %s",
        best.num_clusters,
        {s.num_clusters: round(s.score, 4) for s in scores},
    )
    return KSelection(scores, best.num_clusters)


@contextlib.contextmanager
def _one_cpu_thread(device: torch.device) -> Iterator[None]:
    """One intra-op thread for the small steps of the candidate heads on a CPU: thread hand-offs
    cost more than they bring there (measured on a busy 2-core machine: 14 ms a step on one
    thread, 100-200 ms on two)."""
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_candidate_heads(
    features: torch.Tensor,
    neighbors: torch.Tensor,
    candidates: list[int],
    *,
    num_heads: int,
    entropy_weight: float,
    steps: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
    progress: Callable[[int, int], None] | None = None,
) -> dict[int, torch.Tensor]:
    """SCAN-train `num_heads` linear heads per candidate C on fixed features; (N, C) probabilities
    of the head with the lowest SCAN loss per C, on the CPU. `progress(step, steps)` is called
    before every step (it may raise StopRequested).

    features: (N, D) L2-normalised, neighbors: (N, K). The heads see the same features for every
    candidate, so no candidate can distort the features the others are scored on.
    """
    from scan_engine.losses import SCANLoss
    from scan_engine.scan import head_losses, sample_neighbors

    device = torch.device(device)
    x = features.to(device).float()  # (N, D)
    num_images, dim = x.shape
    # All heads of all candidates as G = H·len(candidates) heads over C_max outputs, the columns
    # beyond a head's own C masked to -inf: their probability is exactly 0, so one SCAN loss over
    # (G, B, C_max) equals the per-candidate losses, at a fifth of the small ops per step (the
    # per-op overhead dominates at these sizes, above all on a busy CPU).
    widest = max(candidates)
    heads_per_count = torch.tensor([c for c in candidates for _ in range(num_heads)])  # (G,)
    mask = torch.where(torch.arange(widest)[None, :] < heads_per_count[:, None], 0.0, -torch.inf)
    mask = mask.to(device)  # (G, C_max)
    bound = 1.0 / math.sqrt(dim)  # nn.Linear's initialisation
    init = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
    weight = torch.empty(len(heads_per_count), dim, widest).uniform_(-bound, bound, generator=init)
    bias = torch.empty(len(heads_per_count), 1, widest).uniform_(-bound, bound, generator=init)
    weight = weight.to(device).requires_grad_(True)  # (G, D, C_max)
    bias = bias.to(device).requires_grad_(True)  # (G, 1, C_max)
    optimizer = torch.optim.Adam([weight, bias], lr=lr, weight_decay=weight_decay)
    criterion = SCANLoss(entropy_weight)

    def heads(batch: torch.Tensor) -> torch.Tensor:  # (B, D) -> (G, B, C_max)
        return torch.matmul(batch, weight) + bias + mask[:, None, :]

    batch_size = min(batch_size, num_images)
    with _one_cpu_thread(device):
        for step in range(steps):
            if progress is not None:
                progress(step, steps)
            index = torch.randperm(num_images, generator=generator)[:batch_size]
            neighbor_index = sample_neighbors(neighbors, index, generator)
            logits = heads(torch.cat([x[index.to(device)], x[neighbor_index.to(device)]]))
            anchor_logits, neighbor_logits = logits.chunk(2, dim=1)  # (G, B, C_max) each
            total = criterion(anchor_logits, neighbor_logits)[0].sum()
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
    with torch.inference_mode():
        everything = heads(x).float().cpu()  # (G, N, C_max)
    logits_per_count = {
        c: everything[i * num_heads : (i + 1) * num_heads, :, :c]  # (H, N, C)
        for i, c in enumerate(candidates)
    }
    losses = head_losses(logits_per_count, neighbors, entropy_weight)
    return {
        c: torch.softmax(logits_per_count[c][int(torch.tensor(losses[c]).argmin())], dim=1)
        for c in candidates
    }


def run_k_selection(
    embed: torch.nn.Module,
    images: torch.Tensor,
    neighbors: torch.Tensor,
    config: ScanConfig,
    runtime: Runtime,
    reporter: Reporter,
    features: torch.Tensor | None = None,
) -> tuple[KSelection, torch.Tensor]:
    """The pipeline's K selection, between mining and the SCAN step: candidate heads for every
    count of config.num_clusters_range on the mined features (`embed`'s L2-normalised output,
    or `features` (N, D) when already cached), scored and compared. Returns the selection and
    the (N, D) features it used, on the CPU.

    Uses its own generator seeded from config.seed, so choosing K changes nothing downstream.
    """
    from scan_engine.neighbors import extract_features

    if features is None:
        reporter.update("select_k", 0.0, "choosing K: embedding", force=True)
        features = extract_features(
            embed, images, config.eval_batch_size, runtime.device, runtime.amp_dtype
        )
    candidates = config.candidate_counts()
    settings = config.k_selection

    def progress(step: int, steps: int) -> None:
        reporter.update(
            "select_k",
            step / max(steps, 1),
            f"choosing K among {len(candidates)}: step {step}/{steps}",
        )

    probabilities = train_candidate_heads(
        features,
        neighbors,
        candidates,
        num_heads=config.scan.num_heads,
        entropy_weight=config.scan.entropy_weight,
        steps=settings.steps,
        batch_size=settings.batch_size,
        lr=settings.lr,
        weight_decay=config.scan.weight_decay,
        generator=torch.Generator().manual_seed(config.seed),
        device=runtime.device,
        progress=progress,
    )
    features = features.cpu()
    return select_num_clusters(probabilities, neighbors, features, seed=config.seed), features


def head_consensus(predictions: np.ndarray, num_clusters: int) -> np.ndarray:
    """(H,) mean agreement of each head with every other head, after Hungarian alignment.

    predictions: (H, N) hard clusters of H heads trained on the same features. A label-free head
    selection: the head that the others agree with most is the medoid of the run, which on
    fixed features beats the lowest-SCAN-loss head (that one is often sharp but lopsided). A
    single head scores 1."""
    from scan_engine.calibration import align_clusters

    heads = np.asarray(predictions)
    count = heads.shape[0]
    agreement = np.eye(count)
    for i in range(count):
        for j in range(i + 1, count):
            mapping = align_clusters(heads[i], heads[j], num_clusters)
            agreement[i, j] = agreement[j, i] = float(np.mean(mapping[heads[j]] == heads[i]))
    if count == 1:
        return np.ones(1)
    return (agreement.sum(1) - 1.0) / (count - 1)


@torch.inference_mode()
def neighbor_coassignment(
    probabilities: np.ndarray | torch.Tensor,
    neighbors: np.ndarray | torch.Tensor,
    chunk: int = 4096,
) -> np.ndarray:
    """A (C, C) = (1 / (N·K)) Σ_i Σ_{n ∈ N(i)} P[i]ᵀ P[n], symmetrised: how much probability
    mass the model splits between two clusters over (image, mined neighbour) pairs. Sums to 1."""
    p = _tensor(probabilities).double()
    index = _tensor(neighbors).long()
    num_clusters = p.shape[1]
    total = torch.zeros(num_clusters, num_clusters, dtype=torch.float64)
    for start in range(0, p.shape[0], chunk):
        anchor = p[start : start + chunk]  # (b, C)
        neighbor_mean = p[index[start : start + chunk]].sum(1)  # (b, C): summed over K
        total += anchor.T @ neighbor_mean
    total /= index.shape[0] * index.shape[1]
    return ((total + total.T) / 2).numpy()


def merge_groups(coassignment: np.ndarray, k: int) -> np.ndarray:
    """(C,) new cluster index in [0, k) for each of C clusters, merging the most confused pair
    until k remain (see the module docstring). New indices follow the smallest old index."""
    matrix = np.array(coassignment, dtype=np.float64)
    num_clusters = matrix.shape[0]
    if matrix.shape != (num_clusters, num_clusters):
        raise ValueError(f"coassignment must be square, got {matrix.shape}")
    if not 1 <= k <= num_clusters:
        raise ValueError(f"can merge {num_clusters} clusters into 1..{num_clusters}, not {k}")
    groups: list[list[int]] = [[c] for c in range(num_clusters)]
    while len(groups) > k:
        mass = matrix.sum(1)  # (G,)
        cross = matrix / np.maximum(np.minimum.outer(mass, mass), 1e-12)  # (G, G)
        np.fill_diagonal(cross, -np.inf)
        a, b = np.unravel_index(int(np.argmax(cross)), cross.shape)
        a, b = min(a, b), max(a, b)
        groups[a] += groups.pop(b)
        # Merge b into a: add its row and column, then drop them.
        matrix[a, :] += matrix[b, :]
        matrix[:, a] += matrix[:, b]
        matrix = np.delete(np.delete(matrix, b, axis=0), b, axis=1)
    order = sorted(range(len(groups)), key=lambda g: min(groups[g]))
    mapping = np.empty(num_clusters, dtype=np.int64)
    for new_index, g in enumerate(order):
        mapping[groups[g]] = new_index
    return mapping


def merge_probabilities(
    probabilities: np.ndarray | torch.Tensor, groups: np.ndarray
) -> torch.Tensor:
    """(N, C) probabilities -> (N, k): each merged cluster gets the sum over its members."""
    p = _tensor(probabilities).float()
    mapping = torch.from_numpy(np.asarray(groups, dtype=np.int64))
    merged = torch.zeros(p.shape[0], int(mapping.max()) + 1, dtype=p.dtype)
    return merged.index_add_(1, mapping, p)
