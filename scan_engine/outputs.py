"""Write a finished run to a folder: assignments (CSV + JSON), clusters.json, prototype PNGs and
report.json. The command line uses it; the service stores the same things in its database."""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from scan_engine.data import ImageCollection
from scan_engine.results import PipelineResult

logger = logging.getLogger(__name__)

__all__ = ["write_outputs", "collection_image"]

# The smallest side a prototype PNG gets: 32 px training images are upscaled to be looked at.
PROTOTYPE_MIN_SIDE = 128


def collection_image(collection: ImageCollection, index: int) -> Image.Image:
    """Image `index` as held for training (S×S), as a PIL image."""
    array = collection.images[index].permute(1, 2, 0).numpy()  # (S, S, 3) uint8
    return Image.fromarray(np.ascontiguousarray(array))


def _viewable(image: Image.Image) -> Image.Image:
    side = min(image.size)
    if side >= PROTOTYPE_MIN_SIDE:
        return image
    scale = -(-PROTOTYPE_MIN_SIDE // side)
    return image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)


def write_outputs(
    result: PipelineResult,
    collection: ImageCollection,
    out_dir: str | Path,
    original: Callable[[int], Image.Image | None] | None = None,
) -> Path:
    """Write every output of `result` under `out_dir`; returns the folder.

    `original(i)` may return the full-size source image for prototypes; without it (or when it
    returns None) the training-size image is upscaled.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    main_k = result.report["config"]["num_clusters"]
    all_assignments = []
    all_clusters = []
    for clustering in result.results:
        c = clustering.num_clusters
        suffix = "" if c == main_k else f"_c{c}"
        rows = [
            {
                "image_id": collection.ids[i],
                "path": collection.paths[i],
                "cluster": int(clustering.assignments[i]),
                "confidence": round(float(clustering.confidence[i]), 6),
            }
            for i in range(len(collection))
        ]
        with (out_dir / f"assignments{suffix}.csv").open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=["image_id", "path", "cluster", "confidence"])
            writer.writeheader()
            writer.writerows(rows)
        all_assignments.append({"num_clusters": c, "assignments": rows})

        prototype_dir = out_dir / "prototypes" / f"c{c}"
        prototype_dir.mkdir(parents=True, exist_ok=True)
        clusters = []
        for summary in clustering.clusters:
            entry = summary.to_json(collection.ids)
            if summary.prototype is not None:
                name = f"cluster_{summary.index:03d}.png"
                image = original(summary.prototype) if original is not None else None
                if image is None:
                    image = collection_image(collection, summary.prototype)
                _viewable(image.convert("RGB")).save(prototype_dir / name)
                entry["prototype_path"] = collection.paths[summary.prototype]
                entry["prototype_file"] = str(Path("prototypes") / f"c{c}" / name)
            clusters.append(entry)
        all_clusters.append(
            {
                "num_clusters": c,
                "stage": clustering.stage,
                "head": clustering.head,
                "metrics": clustering.metrics,
                "clusters": clusters,
            }
        )
    (out_dir / "assignments.json").write_text(json.dumps(all_assignments))
    (out_dir / "clusters.json").write_text(json.dumps(all_clusters, indent=2))
    (out_dir / "report.json").write_text(json.dumps(result.report, indent=2))
    logger.info("outputs written to %s", out_dir)
    return out_dir
