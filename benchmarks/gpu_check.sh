#!/usr/bin/env bash
# The GPU checks as one short script (about 8 minutes on one H200): the CUDA path end to end on the
# generated shapes, stage throughput of the stock ResNet-18 under AMP + channels_last, kNN on the
# GPU (faiss GPU index when installed, else chunked matmul + top-k), and a timed shortened `gpu`
# schedule on CIFAR-10 test. Every command prints one JSON line, appended to $OUT_FILE.
# Usage: benchmarks/gpu_check.sh   (needs .venv; SCAN_BENCH_DATA = folder of cifar10_test.npz)
set -euo pipefail
cd "$(dirname "$0")/.."
BENCH=".venv/bin/scan-bench"
DATA="${SCAN_BENCH_DATA:-../shared/datasets}"
OUT_FILE="${OUT_FILE:-benchmarks/gpu_results.jsonl}"
run() { echo "+ scan-bench $*" >&2; timeout 420 "$BENCH" --device cuda "$@" | tee -a "$OUT_FILE"; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
.venv/bin/python -c "import torch; assert torch.cuda.is_available(), 'no CUDA'; print(torch.cuda.get_device_name())"

# 1. The CUDA path end to end on 4 classes of generated shapes (float32 and AMP).
.venv/bin/python -m scan_engine.sample_data /tmp/gpu-shapes >/dev/null
.venv/bin/scan-cluster /tmp/gpu-shapes --clusters 4 --preset tiny --labels-from-folders \
  --device cuda --out /tmp/gpu-tiny --quiet
.venv/bin/scan-cluster /tmp/gpu-shapes --clusters 4 --preset tiny --labels-from-folders \
  --device cuda --set precision=auto --out /tmp/gpu-tiny-amp --quiet
.venv/bin/python - <<'EOF'
import json
for name in ("gpu-tiny", "gpu-tiny-amp"):
    report = json.load(open(f"/tmp/{name}/report.json"))
    print(name, report["machine"].get("device"), json.dumps(report["metrics"])[:300])
EOF

# 2. Stage throughput, stock ResNet-18 (the reference's setting) and the gpu preset's batches.
run --stage pretext --preset paper --steps 20 --repeat 3
run --stage pretext --preset gpu --steps 20 --repeat 3
run --stage scan --preset paper --steps 20 --repeat 3
run --stage selflabel --preset paper --steps 10 --repeat 3
# 3. kNN of 50,000 x 512, k = 20, on the GPU.
run --stage knn --repeat 3
# 4. A timed, shortened gpu schedule on cifar10_test (10k): ACC/NMI/ARI per stage.
run --data "$DATA/cifar10_test.npz" --preset gpu --budget-s 300
