"""kNN mining against a brute-force reference, purity, and batched feature extraction."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from scan_engine import neighbors


def _unit_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _brute_force(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Reference: sort all dot products, self excluded by setting its score to -inf."""
    sims = (x.astype(np.float64) @ x.T.astype(np.float64)).astype(np.float64)  # (N, N)
    np.fill_diagonal(sims, -np.inf)
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(sims, order, axis=1)


def test_faiss_knn_equals_brute_force() -> None:
    x = _unit_rows(np.random.default_rng(0), 300, 16)
    indices, sims = neighbors.knn(x, 10)
    expected_indices, expected_sims = _brute_force(x, 10)
    assert indices.dtype == np.int64 and indices.shape == (300, 10)
    assert sims.dtype == np.float32 and sims.shape == (300, 10)
    np.testing.assert_array_equal(indices, expected_indices)
    np.testing.assert_allclose(sims, expected_sims, atol=1e-5)
    assert not (indices == np.arange(300)[:, None]).any()


def test_duplicates_and_ties_are_handled() -> None:
    rng = np.random.default_rng(1)
    base = _unit_rows(rng, 20, 8)
    # Every point appears 4 times: the query ties with 3 twins at similarity 1, and with k=2 more
    # points tie at the top than the k+1 results faiss returns, so self may be cut off.
    x = np.concatenate([base, base, base, base])  # (80, 8)
    for method in ("faiss", "torch"):
        indices, sims = neighbors.knn(x, 2, method=method)
        assert indices.shape == (80, 2)
        assert not (indices == np.arange(80)[:, None]).any(), method
        np.testing.assert_allclose(sims, 1.0, atol=1e-5)
        # Every neighbour is a twin (same base row), and the two are distinct.
        assert (indices % 20 == (np.arange(80) % 20)[:, None]).all(), method
        assert (indices[:, 0] != indices[:, 1]).all(), method
    # With k=5 the 3 twins come first, then the true next neighbours of the base point.
    indices, sims = neighbors.knn(x, 5)
    np.testing.assert_allclose(sims[:, :3], 1.0, atol=1e-5)
    _, expected_sims = _brute_force(x, 5)
    np.testing.assert_allclose(sims, expected_sims, atol=1e-5)
    gathered = np.einsum("nd,nkd->nk", x, x[indices])  # similarities of the returned ids
    np.testing.assert_allclose(gathered, sims, atol=1e-5)


def test_torch_chunked_path_equals_faiss_on_cpu_tensors() -> None:
    x = _unit_rows(np.random.default_rng(2), 257, 12)
    faiss_indices, faiss_sims = neighbors.knn(x, 7, method="faiss")
    tensor = torch.from_numpy(x)
    for chunk_size in (None, 1, 50):
        indices, sims = neighbors.knn_torch(tensor, 7, chunk_size=chunk_size)
        np.testing.assert_array_equal(indices, faiss_indices)
        np.testing.assert_allclose(sims, faiss_sims, atol=1e-5)
    # A CPU tensor on "auto" goes to faiss and gives the same answer.
    indices, _ = neighbors.knn(tensor, 7)
    np.testing.assert_array_equal(indices, faiss_indices)


def test_knn_rejects_k_too_large() -> None:
    x = _unit_rows(np.random.default_rng(3), 5, 4)
    with pytest.raises(ValueError, match="more than"):
        neighbors.knn(x, 5)
    assert neighbors.knn(x, 4)[0].shape == (5, 4)


def test_purity_hand_case() -> None:
    labels = np.array([0, 0, 1, 1])
    indices = np.array([[1, 2], [0, 3], [3, 1], [2, 0]])
    # Row 0: 1 same of 2; row 1: 1/2; row 2: 1/2; row 3: 1/2 -> 0.5. First column only: all same.
    assert neighbors.neighbor_purity(indices, labels) == pytest.approx(0.5)
    assert neighbors.purity_at(indices, labels, ks=(1, 2, 20)) == {1: 1.0, 2: 0.5}
    assert neighbors.neighbor_purity(indices, None) is None
    assert neighbors.purity_at(indices, None) is None


class _MeanColour(nn.Module):
    """Tiny feature map: per-channel mean and a learned mix; BatchNorm shows the eval switch."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 5)
        self.norm = nn.BatchNorm1d(5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, 5)
        return self.norm(self.linear(x.mean(dim=(2, 3))))


def test_extract_features_normalised_ordered_and_batch_independent() -> None:
    from scan_engine.augment import normalize

    torch.manual_seed(0)
    images = torch.randint(0, 256, (23, 3, 8, 8), dtype=torch.uint8)
    model = _MeanColour()
    model.train()
    calls: list[tuple[int, int]] = []
    features = neighbors.extract_features(
        model, images, batch_size=5, device="cpu", progress=lambda d, t: calls.append((d, t))
    )
    assert features.shape == (23, 5) and features.dtype == torch.float32
    assert features.device.type == "cpu" and not features.is_inference()
    torch.testing.assert_close(features.norm(dim=1), torch.ones(23))
    assert model.training  # mode restored
    assert calls[-1] == (23, 23) and len(calls) == 5
    assert images.dtype == torch.uint8  # the collection is untouched

    # Row i is image i's feature: compare with a direct, unbatched evaluation.
    model.eval()
    with torch.no_grad():
        expected = nn.functional.normalize(model(normalize(images)), dim=1)
    torch.testing.assert_close(features, expected, atol=1e-5, rtol=1e-5)
    for batch_size in (1, 7, 64):
        other = neighbors.extract_features(model, images, batch_size, "cpu")
        torch.testing.assert_close(other, features, atol=1e-5, rtol=1e-5)

    # bf16 autocast on the CPU still returns float32 unit rows close to the float32 result.
    cast = neighbors.extract_features(model, images, 8, "cpu", autocast_dtype=torch.bfloat16)
    assert cast.dtype == torch.float32
    torch.testing.assert_close(cast.norm(dim=1), torch.ones(23))
    assert (cast * features).sum(dim=1).min() > 0.95
