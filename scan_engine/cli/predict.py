"""`scan-predict`: put new images into the clusters of a finished run, without retraining.

    scan-predict scan-results/ new-photos/ --out predictions.csv
    scan-predict scan-results/work/model.pt new.zip --num-clusters 20 --merge-to 10

MODEL is a model.pt, a pipeline work folder or a `scan-cluster --out` folder; INPUT is a folder,
a .zip or an .npz of images. One row per image: image_id, path, cluster, confidence, distance
(cosine, to the nearest cluster centroid) and outlier (see scan_engine.predict for the rule), as
CSV, or as JSON when --out ends in .json; to stdout without --out.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import sys
import zipfile
from pathlib import Path
from typing import Any

from scan_engine.data import load_collection

logger = logging.getLogger(__name__)

FIELDS = ["image_id", "path", "cluster", "confidence", "distance", "outlier"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scan-predict",
        description="Assign new images to the clusters of a finished SCAN run (no retraining).",
    )
    parser.add_argument(
        "model",
        type=Path,
        help="model.pt, a work folder, or a scan-cluster --out folder (it holds work/model.pt)",
    )
    parser.add_argument("input", type=Path, help="a folder, .zip or .npz of new images")
    parser.add_argument(
        "--out", type=Path, default=None, help="predictions file (.csv or .json); default stdout"
    )
    parser.add_argument(
        "--num-clusters",
        type=int,
        default=None,
        help="which trained cluster count C to predict into (default: the run's K)",
    )
    parser.add_argument(
        "--merge-to",
        type=int,
        default=None,
        help="merge the C clusters down to this many, joining the ones the model confuses most",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    return parser


def prediction_rows(ids: list[str], paths: list[str], prediction: Any) -> list[dict[str, Any]]:
    """One dict per image, in FIELDS order (distance and outlier None for a format-1 model)."""
    rows = []
    for i, (image_id, path) in enumerate(zip(ids, paths, strict=True)):
        rows.append(
            {
                "image_id": image_id,
                "path": path,
                "cluster": int(prediction.assignments[i]),
                "confidence": round(float(prediction.confidence[i]), 6),
                "distance": None
                if prediction.distance is None
                else round(float(prediction.distance[i]), 6),
                "outlier": None if prediction.outlier is None else bool(prediction.outlier[i]),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from scan_engine.predict import ModelFormatError, load_model  # torch after argument errors

    try:
        predictor = load_model(args.model, device=args.device)
        collection = load_collection(args.input, predictor.image_size)
    except (ModelFormatError, FileNotFoundError, ValueError, zipfile.BadZipFile) as error:
        print(f"scan-predict: {error}", file=sys.stderr)
        return 2
    for skipped in collection.skipped:
        print(f"skipped {skipped.path}: {skipped.reason}", file=sys.stderr)
    if len(collection) == 0:
        print(f"scan-predict: no usable image in {args.input}", file=sys.stderr)
        return 2
    try:
        prediction = predictor.predict(collection, args.num_clusters, args.merge_to)
    except ValueError as error:
        print(f"scan-predict: {error}", file=sys.stderr)
        return 2
    rows = prediction_rows(collection.ids, collection.paths, prediction)
    if args.out is not None and args.out.suffix.lower() == ".json":
        document = {
            "model": predictor.describe(),
            "num_clusters": prediction.num_clusters,
            "merged_from": prediction.merged_from,
            "groups": prediction.groups,
            "predictions": rows,
            "skipped": [{"path": s.path, "reason": s.reason} for s in collection.skipped],
        }
        args.out.write_text(json.dumps(document, indent=2))
    else:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
        if args.out is None:
            sys.stdout.write(buffer.getvalue())
        else:
            args.out.write_text(buffer.getvalue())
    outliers = 0 if prediction.outlier is None else int(prediction.outlier.sum())
    print(
        f"{len(rows)} images into {prediction.num_clusters} clusters "
        f"({outliers} outliers, {len(collection.skipped)} skipped)",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
