#!/usr/bin/env bash
# Training throughput of the same images three ways, interleaved so that the machine's drift hits each alike:
# the in-memory CIFAR-10 source (the zip, decoded once), the same 50,000 images as an unlabelled flat folder
# decoded once into memory (the default below --memory-gib), and that folder decoded by the DataLoader
# workers every epoch (--memory-gib 0). cifar10-cpu settings, 1,000 images held out in each, one epoch per
# run, no evaluation; prints the training seconds and images/s of each epoch.
#
#   bash benchmarks/files_vs_memory.sh FLAT_FOLDER [ROUNDS] [ZIP]
set -euo pipefail
FLAT=$1
ROUNDS=${2:-2}
ZIP=${3:-../shared/datasets/cifar10-jpeg.zip}
OUT=$(mktemp -d)
common=(--preset cifar10-cpu --epochs 1 --eval-protocol none --holdout 1000 --quiet --overwrite)
for r in $(seq "$ROUNDS"); do
  isif train "${common[@]}" --data "$ZIP" --out "$OUT/memory-zip"
  isif train "${common[@]}" --dataset unlabelled --size 32 --data "$FLAT" --out "$OUT/folder-decoded-once"
  isif train "${common[@]}" --dataset unlabelled --size 32 --data "$FLAT" --memory-gib 0 --out "$OUT/folder-workers"
  for k in memory-zip folder-decoded-once folder-workers; do
    python -c "import json,sys; r=json.loads(open(sys.argv[1]).readlines()[-1]); \
print(f'round $r  {sys.argv[2]:20s} {r[\"train_s\"]:6.1f} s  {r[\"images_per_s\"]:5.0f} images/s')" \
      "$OUT/$k/metrics.jsonl" "$k"
  done
done
rm -rf "$OUT"
