#!/usr/bin/env bash
# How well does the classifier recipe do on a microscope it never saw?
#
#   scripts/leave_one_microscope_out.sh [SOURCE=wbc1]
#
# Trains the default classifier recipe (same seed, epochs and segmenter as the shipped bundle)
# with one public source left out of training and of checkpoint choice, then runs the whole
# pipeline on that source's val split. SOURCE is wbc1 (WBC Image Dataset 1, Jiangxi Tecom),
# wbc2 (Dataset 2, CellaVision) or bccd. For comparison, the same evaluation of the shipped
# bundle is run first. Val rows only: test rows are never read. About 30 min on 2 CPU cores.
# At the end, scripts/review_flags.py says how many of the wrong answers were flagged for review
# (the classifier trained without SOURCE fits its stain reference without SOURCE too).
# TRAIN_OPTS adds training options, e.g. TRAIN_OPTS=--strong-colour WORK=runs/strong.
# Then `python scripts/lab_fine_tune.py --bundle $WORK/bundle --source SOURCE` measures how many
# of that microscope's own labelled images bring it back (wbc1, wbc2: single cells in class
# folders; bccd: whole fields with a box truth, given as --lab-truth).
set -euo pipefail
cd "$(dirname "$0")/.."
SOURCE=${1:-wbc1}
DATA=${WBC_BATCH_DATA:-../shared/data}
WORK=${WORK:-runs/leave-out-$SOURCE}
case "$SOURCE" in wbc1|wbc2|bccd) ;; *) echo "SOURCE must be wbc1, wbc2 or bccd" >&2; exit 2 ;; esac
mkdir -p "$WORK/bundle"
cp wbc_batch/models/segmenter.safetensors wbc_batch/models/bundle.json "$WORK/bundle/"
echo "=== shipped bundle on $SOURCE val ==="
SPLIT=val ONLY="$SOURCE" OUT="$WORK/eval-shipped" scripts/evaluate_test_splits.sh
wbc-batch train classifier --data "$DATA" -o "$WORK/bundle" --epochs 18 --seed 0 \
    --cache "${CACHE:-runs/train/crops}" --leave-out "$SOURCE" ${TRAIN_OPTS:-}
echo "=== classifier trained without $SOURCE, on $SOURCE val ==="
SPLIT=val ONLY="$SOURCE" OUT="$WORK/eval-left-out" scripts/evaluate_test_splits.sh --model "$WORK/bundle"
echo "=== review flags: shipped bundle, then the classifier trained without $SOURCE ==="
python scripts/review_flags.py "$WORK/eval-shipped/$SOURCE" "$WORK/eval-left-out/$SOURCE"
