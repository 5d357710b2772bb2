#!/usr/bin/env bash
# Learning from unlabelled folders on this machine, as a user would (the README's "Your own images" figures):
#
# 1. CIFAR-10's 50,000 training images unpacked into one flat folder without their class folders (names
#    shuffled, no label anywhere), trained with cifar10-cpu's settings and the labelled zip as --eval-data
#    (kNN: its train/ as the bank, test/ as the queries), beside the same preset on the in-memory zip with
#    the same number of held-out images; the label-free metrics against kNN per epoch with correlations.
# 2. tiny-imagenet-unseen's 10,000 training images as a flat folder with no preset at all (the default
#    images-cpu), Recall@K on its 100 unseen test classes through --eval-data.
# 3. near-duplicates planted in CIFAR-10's test images, found with the run of step 1.
# 4. the scan of 100,000 small files, first run and cached.
#
#   bash benchmarks/unlabelled_folders.sh [SHARED_DATASETS] [OUT]     (about 75 minutes on 2 CPU cores)
set -euo pipefail
DATA=${1:-../shared/datasets}
OUT=${2:-/tmp/isif-unlabelled-bench}
mkdir -p "$OUT"
flat() {  # flat ZIP PREFIX DEST: the zip's PREFIX/<class>/* images into DEST as shuffled numbered files
  python - "$@" <<'PY'
import os, random, sys, zipfile
z, prefix, dest = zipfile.ZipFile(sys.argv[1]), sys.argv[2], sys.argv[3]
names = [n for n in z.namelist() if n.startswith(prefix + "/") and not n.endswith("/")]
random.Random(0).shuffle(names)
os.makedirs(dest, exist_ok=True)
for i, n in enumerate(names):
    with open(os.path.join(dest, f"{i:05d}{os.path.splitext(n)[1].lower()}"), "wb") as f:
        f.write(z.read(n))
print(f"{len(names)} images -> {dest}")
PY
}
[ -d "$OUT/cifar-flat" ] || flat "$DATA/cifar10-jpeg.zip" train "$OUT/cifar-flat"
isif train --preset cifar10-cpu --dataset unlabelled --data "$OUT/cifar-flat" --size 32 \
  --eval-data "$DATA/cifar10-jpeg.zip" --out "$OUT/cifar-flat-run" --overwrite
isif train --preset cifar10-cpu --data "$DATA/cifar10-jpeg.zip" --holdout 1000 --out "$OUT/cifar-mem-run" --overwrite
python benchmarks/label_free_vs_knn.py "$OUT/cifar-flat-run"
python benchmarks/label_free_vs_knn.py "$OUT/cifar-mem-run"

[ -d "$OUT/tiny-flat" ] || flat "$DATA/tiny-imagenet-unseen.zip" train "$OUT/tiny-flat"
isif train --data "$OUT/tiny-flat" --eval-data "$DATA/tiny-imagenet-unseen.zip" --out "$OUT/tiny-run" --overwrite
python benchmarks/label_free_vs_knn.py "$OUT/tiny-run"

python benchmarks/duplicates_planted.py --checkpoint "$OUT/cifar-flat-run" --data "$DATA/cifar10-jpeg.zip" \
  --out "$OUT/duplicates" --threshold 0.8 0.85 0.9 0.95
python benchmarks/scan_files.py --files 100000
