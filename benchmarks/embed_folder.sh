#!/usr/bin/env bash
# isif embed throughput on a real folder: tiny-imagenet-unseen's 15,000 images (train/ and test/, 64x64 JPEG)
# with 0 and 2 DataLoader workers, then killed (kill -9 after its first shard) and resumed; the resumed result
# is compared with the uninterrupted one.
#
#   bash benchmarks/embed_folder.sh CHECKPOINT_OR_RUN [ZIP] [OUT]
set -euo pipefail
RUN=$1
ZIP=${2:-../shared/datasets/tiny-imagenet-unseen.zip}
OUT=${3:-/tmp/isif-embed-bench}
mkdir -p "$OUT"
[ -d "$OUT/images" ] || python -c "
import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])" "$ZIP" "$OUT/images"
n=$(find "$OUT/images" -iname '*.jpeg' | wc -l)
timed() {  # timed LABEL ARGS...: wall seconds of one isif embed
  local label=$1; shift
  local t0=$(date +%s.%N)
  "$@" > /dev/null
  local t1=$(date +%s.%N)
  python -c "import sys; s=float(sys.argv[2])-float(sys.argv[1]); print(f'| $label | {s:.1f} | {int(sys.argv[3])/s:,.0f} |')" "$t0" "$t1" "$n"
}
echo "| run ($n images) | seconds | images/s |"
echo "|---|---:|---:|"
for w in 0 2; do
  rm -rf "$OUT/w$w"
  timed "--workers $w" isif embed "$RUN" "$OUT/images" --out "$OUT/w$w" --workers "$w" --shard-size 5000 --quiet
done
rm -rf "$OUT/killed"
ISIF_FAULT=embed-shard:1 isif embed "$RUN" "$OUT/images" --out "$OUT/killed" --workers 2 --shard-size 5000 --quiet \
  > /dev/null 2>&1 || echo "(killed after the first shard, exit $?)" >&2
timed "resumed after kill -9 (2 of 3 shards left), --workers 2" \
  isif embed "$RUN" "$OUT/images" --out "$OUT/killed" --workers 2 --shard-size 5000 --quiet
timed "rerun, nothing changed" isif embed "$RUN" "$OUT/images" --out "$OUT/killed" --workers 2 --quiet
python - "$OUT" <<'PY'
import sys, numpy as np
out = sys.argv[1]
a, b = np.load(f"{out}/w2/features.npy"), np.load(f"{out}/killed/features.npy")
same = open(f"{out}/w2/paths.txt").read() == open(f"{out}/killed/paths.txt").read()
print(f"resumed == uninterrupted: paths {same}, features bit-identical {np.array_equal(a, b)}")
c = np.load(f"{out}/w0/features.npy")
print(f"--workers 0 vs 2: max |difference| {np.abs(c - a).max():.2e}")
PY
