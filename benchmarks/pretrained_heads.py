"""k-means, SCAN and SCAN + self-label on a features .npz (keys features, labels): ACC/NMI/ARI,
wall time per step, medians over seeds, and the CPU it ran on.

    python benchmarks/pretrained_heads.py /work/cache/cifar10_lite0_224.npz --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans

from scan_engine import metrics
from scan_engine.feature_heads import FeatureHeadsSettings, cluster_features
from scan_engine.neighbors import knn


def _cpu() -> str:
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
        keep = [line for line in lines if line.startswith(("Model name", "CPU family", "CPU(s)"))]
        return "; ".join(" ".join(line.split()) for line in keep)
    except OSError:
        return platform.processor()


def _scores(labels: np.ndarray, predictions: np.ndarray, num_clusters: int) -> dict[str, float]:
    result = metrics.evaluate(labels, predictions, num_clusters=num_clusters)
    return {key: round(result[key], 4) for key in ("acc", "nmi", "ari")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("npz")
    parser.add_argument("--clusters", type=int, default=10)
    parser.add_argument("--neighbors", type=int, default=20)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out")
    args = parser.parse_args()
    data = np.load(args.npz)
    features = F.normalize(torch.from_numpy(data["features"].astype(np.float32)), dim=1)
    labels = data["labels"]
    started = time.monotonic()
    neighbors = torch.from_numpy(knn(features.numpy(), args.neighbors)[0])
    mine_s = time.monotonic() - started
    runs = []
    for seed in args.seeds:
        started = time.monotonic()
        kmeans = KMeans(args.clusters, n_init=10, random_state=seed).fit_predict(features.numpy())
        kmeans_s = time.monotonic() - started
        result = cluster_features(features, neighbors, args.clusters, FeatureHeadsSettings(), seed)
        result.stats.pop("head_assignments")
        runs.append(
            {
                "seed": seed,
                "kmeans": _scores(labels, kmeans, args.clusters),
                "scan": _scores(labels, result.scan_assignments, args.clusters),
                "final": _scores(labels, result.assignments, args.clusters),
                "final_stage": result.final_stage,
                "mean_confidence": result.stats["mean_confidence"],
                "non_empty_clusters": result.non_empty_clusters,
                "wall_s": {"kmeans": round(kmeans_s, 2), **result.stats["timings_s"]},
            }
        )
        print(json.dumps(runs[-1]), flush=True)
    median = {
        stage: {m: float(np.median([r[stage][m] for r in runs])) for m in ("acc", "nmi", "ari")}
        for stage in ("kmeans", "scan", "final")
    }
    report = {"machine": _cpu(), "npz": args.npz, "mine_s": round(mine_s, 2), "runs": runs}
    report["median"] = median
    print(json.dumps(median))
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(report, handle, indent=1)


if __name__ == "__main__":
    main()
