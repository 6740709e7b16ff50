#!/usr/bin/env bash
# Reproduce the default models shipped in wbc_batch/models/ from the public data.
# Usage: scripts/train_default_models.sh [DATA=../shared/data] [OUT=wbc_batch/models]
# On a 2-core CPU: about 25 minutes for the segmenter, 5 for crop extraction and 20 for the
# classifier. Seeded; the checkpoints are chosen on the val splits only.
set -euo pipefail
DATA=${1:-../shared/data}
OUT=${2:-wbc_batch/models}
mkdir -p "$OUT"
wbc-batch train segmenter --data "$DATA" -o "$OUT" --steps 1500 --seed 0
wbc-batch train classifier --data "$DATA" -o "$OUT" --epochs 18 --seed 0 --cache "${CACHE:-runs/crops}"
wbc-batch export-onnx --model "$OUT"
