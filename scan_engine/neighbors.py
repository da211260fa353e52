"""Feature extraction, exact k-nearest-neighbour mining and neighbour purity (SCAN step 2).

Features are L2-normalised, so inner product = cosine similarity. `knn` uses faiss `IndexFlatIP`
(exact): the GPU index when faiss was built with GPU support and CUDA is present, otherwise the CPU
index; a CUDA tensor with a CPU-only faiss goes through a chunked torch matmul + topk instead, which
keeps the features on the GPU. The query itself is always removed from its neighbour list.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Literal

import faiss
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from scan_engine.augment import normalize

__all__ = [
    "knn",
    "knn_faiss",
    "knn_torch",
    "neighbor_purity",
    "purity_at",
    "extract_features",
    "set_faiss_threads",
    "faiss_has_gpu",
]

logger = logging.getLogger(__name__)

# faiss GPU brute-force search supports k up to this many results (2048 in faiss >= 1.7.3).
_FAISS_GPU_MAX_K = 2048
# Torch path: similarity block of at most this many floats per chunk (2**26 floats = 256 MiB).
_TORCH_BLOCK_ELEMENTS = 2**26


def set_faiss_threads(num_threads: int) -> None:
    """Set the OpenMP threads faiss uses for CPU search (e.g. the cores a worker owns)."""
    faiss.omp_set_num_threads(max(1, int(num_threads)))


def faiss_has_gpu() -> bool:
    """True when this faiss build has GPU support, sees a GPU, and torch sees CUDA too."""
    return (
        hasattr(faiss, "StandardGpuResources")
        and faiss.get_num_gpus() > 0
        and torch.cuda.is_available()
    )


def _drop_self(indices: np.ndarray, similarities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Remove each query from its own (N, k+1) result list, giving (N, k).

    With duplicate points the query may tie with a twin and not come first, or (when more than
    k+1 points tie) not appear at all; then the last, least similar entry is dropped instead.
    """
    n = indices.shape[0]
    is_self = indices == np.arange(n, dtype=indices.dtype)[:, None]  # (N, k+1)
    is_self[~is_self.any(axis=1), -1] = True
    keep = ~is_self  # exactly k True per row: search results hold distinct ids
    k = indices.shape[1] - 1
    return (
        indices[keep].reshape(n, k).astype(np.int64, copy=False),
        similarities[keep].reshape(n, k).astype(np.float32, copy=False),
    )


def _check(num_points: int, k: int) -> None:
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if k >= num_points:
        raise ValueError(f"k={k} neighbours need more than {k} points, got {num_points}")


def knn_faiss(
    features: np.ndarray, k: int, use_gpu: bool | None = None, gpu_device: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product kNN with faiss on (N, D) float32 features; see `knn` for the outputs.

    `use_gpu` None picks the GPU index when `faiss_has_gpu()`.
    """
    x = np.ascontiguousarray(features, dtype=np.float32)  # faiss wants C-contiguous float32
    if x.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {x.shape}")
    _check(x.shape[0], k)
    if use_gpu is None:
        use_gpu = faiss_has_gpu() and k + 1 <= _FAISS_GPU_MAX_K
    index = faiss.IndexFlatIP(x.shape[1])
    if use_gpu:
        resources = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(resources, gpu_device, index)
    index.add(x)
    similarities, indices = index.search(x, k + 1)  # (N, k+1) each, most similar first
    return _drop_self(indices, similarities)


@torch.inference_mode()
def knn_torch(
    features: torch.Tensor, k: int, chunk_size: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product kNN by chunked matmul + topk on the features' own device.

    Each chunk of queries builds a (chunk, N) similarity block; `chunk_size` None keeps that block
    under 2**26 floats. Outputs as in `knn`, on the CPU.
    """
    if features.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {tuple(features.shape)}")
    n = features.shape[0]
    _check(n, k)
    x = features.detach().to(torch.float32).contiguous()  # (N, D)
    if chunk_size is None:
        chunk_size = max(1, _TORCH_BLOCK_ELEMENTS // n)
    indices = torch.empty((n, k + 1), dtype=torch.int64, device=x.device)
    similarities = torch.empty((n, k + 1), dtype=torch.float32, device=x.device)
    # Exact search: keep TF32 (which a training loop may have switched on) out of this matmul.
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        for start in range(0, n, chunk_size):
            block = x[start : start + chunk_size] @ x.T  # (chunk, N)
            values, positions = block.topk(k + 1, dim=1)  # (chunk, k+1), most similar first
            similarities[start : start + chunk_size] = values
            indices[start : start + chunk_size] = positions
    finally:
        torch.set_float32_matmul_precision(precision)
    return _drop_self(indices.cpu().numpy(), similarities.cpu().numpy())


def knn(
    features: np.ndarray | torch.Tensor,
    k: int,
    method: Literal["auto", "faiss", "torch"] = "auto",
) -> tuple[np.ndarray, np.ndarray]:
    """K nearest neighbours of every row by exact inner product, the row itself excluded.

    features: (N, D) float32, L2-normalised, numpy or torch (any device).
    Returns indices (N, k) int64 and similarities (N, k) float32, most similar first.
    "auto": a CUDA tensor with a CPU-only faiss goes to `knn_torch`, everything else to faiss
    (its GPU index when available).
    """
    if method not in ("auto", "faiss", "torch"):
        raise ValueError(f"unknown knn method {method!r}")
    is_tensor = isinstance(features, torch.Tensor)
    if method == "auto":
        on_cuda = is_tensor and features.device.type == "cuda"
        method = "torch" if on_cuda and not faiss_has_gpu() else "faiss"
    if method == "torch":
        tensor = features if is_tensor else torch.from_numpy(np.asarray(features))
        logger.debug("knn: torch matmul+topk on %s, k=%d", tensor.device, k)
        return knn_torch(tensor, k)
    gpu_device = 0
    if is_tensor:
        if features.device.type == "cuda" and features.device.index is not None:
            gpu_device = features.device.index
        features = features.detach().to("cpu", torch.float32).numpy()
    logger.debug("knn: faiss IndexFlatIP, k=%d", k)
    return knn_faiss(features, k, gpu_device=gpu_device)


def _labels_numpy(labels: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    return np.asarray(labels)


def neighbor_purity(
    indices: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor | None
) -> float | None:
    """Mean fraction of neighbours sharing the query's label; None without labels.

    indices: (N, k) neighbour ids from `knn`; labels: (N,).
    """
    if labels is None:
        return None
    labels_np = _labels_numpy(labels)
    indices_np = _labels_numpy(indices)
    if indices_np.ndim != 2 or indices_np.shape[0] != labels_np.shape[0]:
        raise ValueError(f"indices {indices_np.shape} do not match labels {labels_np.shape}")
    if indices_np.size == 0:
        raise ValueError("no neighbours to score")
    same = labels_np[indices_np] == labels_np[:, None]  # (N, k)
    return float(same.mean())


def purity_at(
    indices: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor | None,
    ks: Iterable[int] = (1, 5, 20),
) -> dict[int, float] | None:
    """Neighbour purity using only the first k neighbours, for each k in `ks`; None without labels.

    ks larger than the number of mined neighbours are left out.
    """
    if labels is None:
        return None
    indices_np = _labels_numpy(indices)
    available = indices_np.shape[1] if indices_np.ndim == 2 else 0
    result: dict[int, float] = {}
    for k in sorted(set(ks)):
        if 1 <= k <= available:
            purity = neighbor_purity(indices_np[:, :k], labels)
            assert purity is not None
            result[k] = purity
    return result


def extract_features(
    fn: Callable[[torch.Tensor], torch.Tensor],
    images_uint8: torch.Tensor,
    batch_size: int,
    device: str | torch.device,
    autocast_dtype: torch.dtype | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Embed uint8 images: `fn(normalize(batch))` per batch, L2-normalised, (N, D) float32 on CPU.

    images_uint8: (N, 3, S, S) uint8; stays where it is, each batch moves to `device` on its own.
    autocast_dtype: e.g. torch.bfloat16 / torch.float16 to run `fn` under autocast.
    An nn.Module `fn` runs in eval mode (batch-norm statistics, no dropout) and gets its mode back.
    progress(done, total) is called after every batch.
    """
    if images_uint8.ndim != 4 or images_uint8.dtype != torch.uint8:
        raise ValueError(
            "images must be (N, 3, S, S) uint8, "
            f"got {tuple(images_uint8.shape)} {images_uint8.dtype}"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = images_uint8.shape[0]
    if n == 0:
        raise ValueError("no images to embed")
    device = torch.device(device)
    was_training = isinstance(fn, nn.Module) and fn.training
    if was_training:
        fn.eval()  # type: ignore[union-attr]
    features: torch.Tensor | None = None  # (N, D), allocated once D is known
    try:
        with (
            torch.inference_mode(),
            torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None),
        ):
            for start in range(0, n, batch_size):
                batch = images_uint8[start : start + batch_size].to(device, non_blocking=True)
                output = fn(normalize(batch)).float()  # (B, D)
                if output.ndim != 2 or output.shape[0] != batch.shape[0]:
                    raise ValueError(f"fn must return (B, D) features, got {tuple(output.shape)}")
                output = F.normalize(output, dim=1)
                if features is None:
                    # A normal (non-inference) tensor, so callers may train on it later.
                    with torch.inference_mode(False):
                        features = torch.empty((n, output.shape[1]), dtype=torch.float32)
                features[start : start + output.shape[0]] = output.cpu()
                if progress is not None:
                    progress(min(start + batch_size, n), n)
    finally:
        if was_training:
            fn.train()  # type: ignore[union-attr]
    assert features is not None
    return features
