#!/usr/bin/env bash
# The GPU check, one command, under 9 minutes on one H100:
#   1. `isif bench` for the cifar10 preset (Table 1's ResNet-18, batch 128) in bf16 with channels_last;
#   2. 2 epochs of that preset with kNN after each (the paper reports 60% after 2 epochs);
#   3. the projected time of the whole 200-epoch protocol.
# --smoke runs the same steps on a CPU with a tiny network and a slice of the data (for CI).
source "$(dirname "$0")/_setup.sh" "$@"
EXTRA=(--precision bf16 --channels-last)
BENCH=(--steps 50)
EPOCHS=2
if [[ $SMOKE == 1 ]]; then
  EXTRA+=(--device cpu --width 0.0625 --batch-size 32 --train-subset 1000 --test-subset 500 --knn-k 50)
  BENCH=(--steps 2 --device cpu --width 0.0625 --batch-size 32)
  EPOCHS=1
fi
echo "== isif bench (cifar10, bf16, channels_last)"
isif bench --preset cifar10 --precision bf16 --channels-last "${BENCH[@]}"
echo "== $EPOCHS epochs of the cifar10 preset with kNN after each"
isif train --preset cifar10 --data "$DATA" --epochs "$EPOCHS" --out "$OUT/gpu-check" --overwrite "${EXTRA[@]}"
python - "$OUT/gpu-check/metrics.jsonl" <<'PY'
import json, sys
rows = [json.loads(x) for x in open(sys.argv[1])]
per_epoch = rows[-1]["train_s"] / rows[-1]["epoch"]
evals = [r["eval_s"] for r in rows if r.get("eval_s")]
for r in rows:
    print(f"epoch {r['epoch']}: kNN top-1 {r['knn_top1']:.2f}%  {r['images_per_s']:.0f} images/s  "
          f"train {r['train_s']:.1f} s  eval {r.get('eval_s', 0):.1f} s")
ev = sum(evals) / len(evals) if evals else 0.0
print(f"projected 200 epochs: {200 * per_epoch / 60:.1f} min of training "
      f"+ {20 * ev / 60:.1f} min for kNN every 10 epochs = {(200 * per_epoch + 20 * ev) / 60:.1f} min")
PY
