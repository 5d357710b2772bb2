#!/usr/bin/env bash
# Step / limit at full and quarter width, fp32 and bf16 + channels_last (`isif bench`, one process, this CPU).
# The limit is the step's own forward + backward of the network (same call, layout, precision, gradient reset),
# started from the objective's gradient: the ratio should stay at or below 1 up to noise.
# Usage: bash benchmarks/step_limit.sh [STEPS]   (default 12 timed rounds after 3 warm-up rounds)
set -euo pipefail
STEPS="${1:-12}"
for preset in cifar10 cifar10-cpu; do
  for prec in "--precision fp32 --no-channels-last" "--precision bf16 --channels-last"; do
    echo "== isif bench --preset $preset $prec --steps $STEPS"
    # shellcheck disable=SC2086
    isif bench --preset "$preset" $prec --steps "$STEPS" --json | python -c "
import json, sys
r = json.load(sys.stdin)
print(f\"{r['arch']} width {r['width']} {r['precision']}{' channels_last' if r['channels_last'] else ''}: \"
      f\"step {r['step_images_per_s']:.0f} images/s ({r['step_ms']:.0f} ms), limit {r['limit_images_per_s']:.0f} \"
      f\"images/s ({r['limit_ms']:.0f} ms), augment {r['augment_ms']:.1f} ms, objective {r['objective_ms']:.1f} ms, \"
      f\"step/limit {r['ratio_step_to_limit']:.3f}\")"
  done
done
