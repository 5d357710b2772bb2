#!/usr/bin/env bash
# The GPU check, one command (steps 1-3 under 9 minutes on one H100; step 4 is unmeasured on a GPU so far):
#   1. `isif bench` for the cifar10 preset (Table 1's ResNet-18, batch 128) in bf16 with channels_last;
#   2. 2 epochs of that preset with kNN after each (the paper reports 60% after 2 epochs);
#   3. the projected time of the whole 200-epoch protocol;
#   4. bit-exact resume on this device, with and without --deterministic: 2 epochs straight against the same run
#      killed (kill -9, ISIF_FAULT) after epoch 1 and resumed, final weights compared exactly; and what
#      --deterministic costs (images/s of epoch 2, and `isif bench --deterministic`). Exits 1 when the
#      --deterministic pair differs (on a CPU, when either pair does);
#   5. one line per training method: `isif bench` of its step at the cifar10 preset (ResNet-18 with the CIFAR
#      stem, batch 128 instances, bf16, channels_last), images/s, limit / step, and the projected time of 200
#      epochs, the budget of lightly's published CIFAR-10 table (BYOL 86.9, SimCLR 84.7, DINO 84.0, Barlow Twins
#      84.2, MoCo 83.8, SimSiam 81.9 kNN) that a later GPU session trains against.
# --smoke runs the same steps on a CPU with a tiny network and a slice of the data (for CI).
source "$(dirname "$0")/_setup.sh" "$@"
EXTRA=(--precision bf16 --channels-last)
BENCH=(--steps 50)
EPOCHS=2
RESUME=(--train-subset 5000)  # the resume pairs: 39 steps an epoch at batch 128
if [[ $SMOKE == 1 ]]; then
  EXTRA+=(--device cpu --width 0.0625 --batch-size 32 --train-subset 1000 --test-subset 500 --knn-k 50)
  BENCH=(--steps 2 --device cpu --width 0.0625 --batch-size 32)
  EPOCHS=1
  RESUME=(--device cpu --width 0.0625 --batch-size 32 --train-subset 256)
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

# 2 epochs straight, and the same run killed right after its epoch-1 checkpoint, then resumed in a new process
resume_pair() {  # NAME FLAG...
  local name=$1; shift
  local args=(train --preset cifar10 --data "$DATA" --epochs 2 --eval-protocol none --quiet --overwrite
              --precision bf16 --channels-last "${RESUME[@]}" "$@")
  isif "${args[@]}" --out "$OUT/resume-$name-straight" || return 1
  ISIF_FAULT=epoch-end:1 isif "${args[@]}" --out "$OUT/resume-$name-resumed" 2>/dev/null && return 1  # killed
  isif train --resume "$OUT/resume-$name-resumed" --quiet
}
echo "== resume on this device: 2 epochs straight vs killed after epoch 1 and resumed (bf16, channels_last)"
resume_pair default || echo "the default pair did not finish (see above)"
resume_pair deterministic --deterministic || echo "the --deterministic pair did not finish (see above)"
echo "== --deterministic: the bench's training step"
isif bench --preset cifar10 --precision bf16 --channels-last --deterministic "${BENCH[@]}" \
  | grep -E "training step|step / limit" || echo "isif bench --deterministic failed (see above)"
echo "== every method: its training step (isif bench, cifar10 preset, bf16, channels_last)"
METHODS=$(isif methods | awk '$1 != "random" {print $1}')
[[ $SMOKE == 1 ]] && METHODS="isif dino"  # CI: the loop of this step, on two methods (one with multi-crop)
for m in $METHODS; do
  isif bench --preset cifar10 --method "$m" --precision bf16 --channels-last "${BENCH[@]}" --json \
    > "$OUT/bench-$m.json" 2>"$OUT/bench-$m.err" || { echo "$m: bench failed: $(tail -1 "$OUT/bench-$m.err")"; continue; }
  python - "$m" "$OUT/bench-$m.json" <<'PY'
import json, sys
m, r = sys.argv[1], json.load(open(sys.argv[2]))
step_s = r["step_ms"] / 1000
steps_200 = 200 * (50000 // 128)
print(f"{m:13s} {r['step_images_per_s']:8.0f} images/s  limit / step {r['ratio_step_to_limit']:.2f}  "
      f"200 epochs: {steps_200 * step_s / 3600:.1f} h of steps")
PY
done
python - "$OUT" "$SMOKE" <<'PY'
import json, sys
from pathlib import Path
import torch
from isif.training.checkpoint import load_checkpoint
out, smoke = Path(sys.argv[1]), sys.argv[2] == "1"
def pair(name):
    """(bit-exact or None when a run is missing, what differs, epoch 2's images/s of the straight run)"""
    a, b = out / f"resume-{name}-straight", out / f"resume-{name}-resumed"
    try:
        wa, wb = (load_checkpoint(d / "checkpoints" / "last.pt") for d in (a, b))
        ra, rb = ([json.loads(x) for x in open(d / "metrics.jsonl")] for d in (a, b))
    except Exception as e:
        return None, f"no result ({type(e).__name__})", None
    if (wa["epoch"], wb["epoch"]) != (2, 2):
        return None, f"epochs done {wa['epoch']} and {wb['epoch']}, not 2", None
    diff = [k for k in wa["model"] if not torch.equal(wa["model"][k], wb["model"][k])]
    worst = max(((wa["model"][k].double() - wb["model"][k].double()).abs().max().item() for k in diff), default=0.0)
    loss = [r["loss"] for r in ra] == [r["loss"] for r in rb]
    n = len(wa["model"])
    what = (f"{n - len(diff)}/{n} weight tensors equal" + (f", max |difference| {worst:.3g}" if diff else "")
            + f"; loss per epoch {'equal' if loss else 'different'}")
    return not diff and loss, what, ra[-1]["images_per_s"]
results = {name: pair(name) for name in ("default", "deterministic")}
for name, (same, what, ips) in results.items():
    label = "--deterministic" if name == "deterministic" else "default (cuDNN autotuning)"
    verdict = {True: "yes", False: "NO", None: "unknown"}[same]
    print(f"{label}: resumed run bit-exact: {verdict} ({what})" + (f"; epoch 2 {ips:.0f} images/s" if ips else ""))
(_, _, fast), (_, _, slow) = results["default"], results["deterministic"]
if fast and slow and not smoke:  # on a shared CPU one run each is noise, not a measurement
    print(f"--deterministic trains at {slow / fast:.2f}x the default's images/s (epoch 2, straight runs)")
must = ["deterministic"] + (["default"] if smoke else [])
sys.exit(0 if all(results[m][0] for m in must) else 1)
PY
