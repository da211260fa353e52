#!/usr/bin/env bash
# The benchmark set behind benchmarks/README.md. Run on a quiet machine (nothing else using the
# cores); every command prints one JSON line, appended to benchmarks/results.jsonl.
# Usage: benchmarks/run.sh [throughput|knn|memory|quality]...   (default: all but quality)
set -euo pipefail
cd "$(dirname "$0")/.."
BENCH=".venv/bin/scan-bench"
DATA="${SCAN_BENCH_DATA:-../shared/datasets}"
OUT=benchmarks/results.jsonl
run() { echo "+ scan-bench $*" >&2; "$BENCH" "$@" | tee -a "$OUT"; }

for what in "${@:-throughput knn memory}"; do
  for part in $what; do
    case "$part" in
      throughput)
        # The reference's setting: stock ResNet-18, 32 px, SimCLR batch 512, two views.
        run --stage pretext --preset paper --steps 2 --repeat 3
        run --stage pretext --preset paper --steps 2 --repeat 3 --set compile=true
        run --stage scan --preset paper --steps 3 --repeat 3
        run --stage selflabel --preset paper --steps 2 --repeat 3
        # What the cpu preset trains (ResNet-18 at half width).
        run --stage pretext --preset cpu --steps 3 --repeat 3
        run --stage scan --preset cpu --steps 3 --repeat 3
        run --stage selflabel --preset cpu --steps 3 --repeat 3
        ;;
      knn) run --stage knn --repeat 3 ;;
      memory)
        run --stage memory --data "$DATA/cifar10_train.npz" --memory-n 50000
        run --stage memory --data "$DATA/cifar10_test.npz" --memory-n 10000 --set image_size=96
        ;;
      quality) run --data "$DATA/cifar10_test.npz" --preset cpu --budget-s "${BUDGET_S:-1800}" ;;
      *) echo "unknown part $part" >&2; exit 2 ;;
    esac
  done
done
