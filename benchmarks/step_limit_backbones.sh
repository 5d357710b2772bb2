#!/usr/bin/env bash
# Step / limit for the built-in ResNet-18 and timm backbones (a ResNet, a ConvNeXt, a small ViT) at the same
# side, with cifar10-cpu's recipe (batch 128 instances = 256 images, bf16 + channels_last): the objective,
# augmentation and data handling must add under 15% to the network's own forward + backward, whatever it is.
# Usage: bash benchmarks/step_limit_backbones.sh [STEPS] [SIZE]   (default 12 timed rounds, 64 px)
set -euo pipefail
STEPS="${1:-12}"
SIZE="${2:-64}"
for arch in resnet18_cifar timm:resnet18 timm:convnext_atto timm:vit_tiny_patch16_224; do
  echo "== isif bench --preset cifar10-cpu --arch $arch --size $SIZE --steps $STEPS"
  isif bench --preset cifar10-cpu --arch "$arch" --size "$SIZE" --steps "$STEPS" --json | python -c "
import json, sys
r = json.load(sys.stdin)
width = f' width {r[\"width\"]}' if r['arch'] == 'resnet18_cifar' else ''
print(f\"{r['arch']}{width} {r['size']} px {r['precision']}{' channels_last' if r['channels_last'] else ''}: \"
      f\"step {r['step_images_per_s']:.0f} images/s ({r['step_ms']:.0f} ms), limit {r['limit_images_per_s']:.0f} \"
      f\"images/s ({r['limit_ms']:.0f} ms), augment {r['augment_ms']:.1f} ms, objective {r['objective_ms']:.1f} ms, \"
      f\"step/limit {r['ratio_step_to_limit']:.3f}\")"
done
