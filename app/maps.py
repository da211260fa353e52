"""The 2-D map of a job's collection in the object store: `jobs/<id>/embedding_2d.npy`.

The engine hands back `PipelineResult.embedding_2d`, an (N, 2) float32 PCA projection of the final
features, rows in the engine's image order. Stored here with rows in image-position order (the
order of Image.position and Assignment.position), so a reader lines it up with the assignments
without the engine's id list. Written by the job runner, read by the gallery's map endpoint.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence

import numpy as np

from app.storage import ObjectStore, StorageKeyMissing

__all__ = ["EMBEDDING_FILE", "embedding_relpath", "save_embedding", "load_embedding"]

logger = logging.getLogger(__name__)

EMBEDDING_FILE = "embedding_2d.npy"


def embedding_relpath(job_id: str) -> str:
    """The object key of a job's map."""
    return f"jobs/{job_id}/{EMBEDDING_FILE}"


def save_embedding(
    store: ObjectStore, job_id: str, embedding: np.ndarray, positions: Sequence[int]
) -> None:
    """Store `embedding` (N, 2), whose row i is the image at position `positions[i]`."""
    embedding = np.asarray(embedding, dtype=np.float32)
    if embedding.ndim != 2 or embedding.shape != (len(positions), 2):
        raise ValueError(f"embedding of shape {embedding.shape} for {len(positions)} images")
    ordered = np.empty_like(embedding)  # (N, 2), row p = image at position p
    ordered[np.asarray(positions, dtype=np.int64)] = embedding
    buffer = io.BytesIO()
    np.save(buffer, ordered, allow_pickle=False)
    store.put_bytes(embedding_relpath(job_id), buffer.getvalue())  # whole objects only


def load_embedding(store: ObjectStore, job_id: str) -> np.ndarray | None:
    """The job's (N, 2) float32 map in image-position order, or None when none is stored."""
    try:
        data = store.get_bytes(embedding_relpath(job_id))
    except StorageKeyMissing:
        return None
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except (OSError, ValueError):
        logger.warning("unreadable map", extra={"job_id": job_id}, exc_info=True)
        return None
