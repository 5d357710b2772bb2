#!/usr/bin/env bash
# Unseen classes at CPU scale: ISIF vs NCE vs the untrained network on tiny-imagenet-unseen
# (100 training classes, Recall@K / MAP@R / NMI on 100 other classes), the same preset, seed and epochs
# for every method; then the retrieval grid of the ISIF run. About 45 minutes on 2 CPU cores.
#
#   bash benchmarks/tiny_imagenet_unseen.sh [ZIP] [OUT]
set -euo pipefail
ZIP=${1:-../shared/datasets/tiny-imagenet-unseen.zip}
OUT=${2:-runs/tiny-unseen}
isif race --preset tiny-imagenet-cpu --methods random,isif,nce --data "$ZIP" --out "$OUT"
for m in random isif nce; do
  isif eval retrieval --checkpoint "$OUT/$m" --json
done
# the grid: the test images as a folder gallery, one query from every 13th class
TEST="$OUT/test-images"
python - "$ZIP" "$TEST" <<'PY'
import os, sys, zipfile
z, out = zipfile.ZipFile(sys.argv[1]), sys.argv[2]
for name in z.namelist():
    parts = name.split("/")
    if parts[0] == "test" and len(parts) == 3 and parts[2]:
        os.makedirs(os.path.join(out, parts[1]), exist_ok=True)
        with open(os.path.join(out, parts[1], parts[2]), "wb") as f:
            f.write(z.read(name))
PY
QUERIES=$(python -c "
import os, sys
c = sorted(os.listdir('$TEST'))
print(' '.join(os.path.join('$TEST', c[i], sorted(os.listdir(os.path.join('$TEST', c[i])))[0]) for i in range(0, 100, 13)))")
isif embed "$OUT/isif" "$TEST" --out "$OUT/test-embeddings"
# shellcheck disable=SC2086
isif search "$OUT/isif" $QUERIES --gallery "$OUT/test-embeddings" --k 8 --tile 80 --out "$OUT/search-isif.png"
