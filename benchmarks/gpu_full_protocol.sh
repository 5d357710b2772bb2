#!/usr/bin/env bash
# The paper's whole 200-epoch CIFAR-10 protocol (Table 1, ISIF) in one go, bf16 with channels_last,
# kNN every 10 epochs and after the last. Use once gpu_check.sh projects under 9 minutes.
# --smoke runs the same command on a CPU with a tiny network, a slice of the data and 2 epochs (for CI).
source "$(dirname "$0")/_setup.sh" "$@"
EXTRA=(--precision bf16 --channels-last --eval-every 10)
if [[ $SMOKE == 1 ]]; then
  EXTRA+=(--device cpu --width 0.0625 --batch-size 32 --train-subset 1000 --test-subset 500 --knn-k 50 --epochs 2)
fi
start=$(date +%s)
isif train --preset cifar10 --data "$DATA" --out "$OUT/gpu-full" --overwrite "${EXTRA[@]}"
echo "wall time: $(( $(date +%s) - start )) s"
