#!/usr/bin/env bash
# Does the label-free race pick what kNN would pick? Every training method (and the untrained network) on a
# flat folder of CIFAR-10 training images with no label anywhere (names shuffled), ranked by the label-free
# view top-1 of its held-out images; the labelled zip as --eval-data gives each run's kNN, and race.md ends
# with Spearman's rho between the two rankings.
#
#   bash benchmarks/race_label_free.sh [SHARED_DATASETS] [OUT] [IMAGES] [EPOCHS]   (default 10,000 images,
#                                                                                  2 epochs; not yet timed)
set -euo pipefail
DATA=${1:-../shared/datasets}
OUT=${2:-/tmp/isif-race-label-free}
IMAGES=${3:-10000}
EPOCHS=${4:-2}
mkdir -p "$OUT"
if [ ! -d "$OUT/flat" ]; then
  python - "$DATA/cifar10-jpeg.zip" "$OUT/flat" "$IMAGES" <<'PY'
import os, random, sys, zipfile
z, dest, n = zipfile.ZipFile(sys.argv[1]), sys.argv[2], int(sys.argv[3])
names = [x for x in z.namelist() if x.startswith("train/") and not x.endswith("/")]
random.Random(0).shuffle(names)
os.makedirs(dest, exist_ok=True)
for i, x in enumerate(names[:n]):
    with open(os.path.join(dest, f"{i:05d}{os.path.splitext(x)[1].lower()}"), "wb") as f:
        f.write(z.read(x))
print(f"{min(n, len(names))} images -> {dest}")
PY
fi
METHODS=$(isif methods | awk '{print $1}' | paste -sd, -)
isif race --preset cifar10-race --dataset unlabelled --data "$OUT/flat" --size 32 \
  --eval-data "$DATA/cifar10-jpeg.zip" --methods "$METHODS" --epochs "$EPOCHS" --holdout 500 --out "$OUT/race"
cat "$OUT/race/race.md"
