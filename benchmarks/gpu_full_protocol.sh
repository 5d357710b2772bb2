#!/usr/bin/env bash
# The paper's whole 200-epoch CIFAR-10 protocol (Table 1, ISIF) in one go, bf16 with channels_last,
# kNN every 10 epochs and after the last. Use once gpu_check.sh projects under 9 minutes.
# --smoke runs the same command on a CPU with a tiny network, a slice of the data and 2 epochs (for CI).
set -euo pipefail
cd "$(dirname "$0")/.."
SMOKE=0
[[ "${1:-}" == "--smoke" ]] && SMOKE=1
DATA=data/cifar10-jpeg.zip
if [[ ! -f "$DATA" && -f ../shared/datasets/cifar10-jpeg.zip ]]; then
  mkdir -p data && cp ../shared/datasets/cifar10-jpeg.zip "$DATA"   # data/ is ignored by git
fi
python -c "import isif" 2>/dev/null || python -m pip install -q -e .
OUT=${OUT:-runs}
EXTRA=(--precision bf16 --channels-last --eval-every 10)
if [[ $SMOKE == 1 ]]; then
  EXTRA+=(--device cpu --width 0.0625 --batch-size 32 --train-subset 1000 --test-subset 500 --knn-k 50 --epochs 2)
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
start=$(date +%s)
isif train --preset cifar10 --data "$DATA" --out "$OUT/gpu-full" --overwrite "${EXTRA[@]}"
echo "wall time: $(( $(date +%s) - start )) s"
