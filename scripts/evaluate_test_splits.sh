#!/usr/bin/env bash
# Measure the models on the fixed splits of the public datasets, printing each set's numbers.
#
#   scripts/evaluate_test_splits.sh [extra evaluate options, e.g. --backend onnx --model DIR]
#
# Environment:
#   SPLIT           test (default; final measurement only) or val (for development)
#   WBC_BATCH_DATA  the shared data folder (default: ../shared/data)
#   OUT             where the result folders go (default: results/eval-$SPLIT)
#   ONLY            space-separated subset of: wbc2 wbc1 pbc bccd txl (default: all)
#   SPLITS          the split files (default: $WBC_BATCH_DATA/splits); a folder written by
#                   `scripts/split_overlap_check.py --write-unseen DIR` measures each set
#                   without its images that copy one the models learned from (its
#                   txl-pbc.csv then chooses TXL-PBC's rows too)
#
# Each evaluation is `wbc-batch evaluate` on exactly one split; its folder holds the usual
# reports plus accuracy.csv and the Accuracy sheet of report.xlsx. Overlays are left out for speed.
set -uo pipefail

cd "$(dirname "$0")/.."
SPLIT="${SPLIT:-test}"
DATA="${WBC_BATCH_DATA:-../shared/data}"
OUT="${OUT:-results/eval-$SPLIT}"
ONLY="${ONLY:-wbc2 wbc1 pbc bccd txl}"
EXTRA=("$@")
status=0

# the script fixes which rows are read: an extra option that chooses them again would be taken
# last and measure another split under this one's name
for arg in "${EXTRA[@]}"; do
    case "$arg" in
        --split|--split=*|--split-file|--split-file=*|--where|--where=*|--truth|--truth=*|--truth-format|--truth-format=*|--output|--output=*|-o*|-[!-]*o*)
            echo "$arg is set by this script (choose the split with SPLIT=val or SPLIT=test)" >&2
            exit 2 ;;
    esac
done

if [ ! -d "$DATA/splits" ]; then
    echo "no data at $DATA (set WBC_BATCH_DATA)" >&2
    exit 2
fi
SPLITS="${SPLITS:-$DATA/splits}"
for f in wbc-image-dataset.csv pbc-wbc.csv bccd.csv; do
    if [ ! -f "$SPLITS/$f" ]; then
        echo "no $f in $SPLITS (SPLITS names a folder of split files)" >&2
        exit 2
    fi
done
# TXL-PBC keeps its splits in folders; a split file, where SPLITS has one, chooses its rows
TXL_ROWS=()
[ -f "$SPLITS/txl-pbc.csv" ] && TXL_ROWS=(--split-file "$SPLITS/txl-pbc.csv")

evaluate() {  # name, title, evaluate arguments...
    local name="$1" title="$2"
    shift 2
    case " $ONLY " in *" $name "*) ;; *) return 0 ;; esac
    echo
    echo "=== $title ($SPLIT) ==="
    echo "wbc-batch evaluate $* -o $OUT/$name --overwrite --no-overlays ${EXTRA[*]}"
    wbc-batch evaluate "$@" -o "$OUT/$name" --overwrite --no-overlays "${EXTRA[@]}"
    local rc=$?
    [ "$rc" -gt "$status" ] && status=$rc
    [ "$rc" -ne 0 ] && echo "(exit code $rc)"
    return 0
}

WBC="$DATA/wbc-image-dataset"
evaluate wbc2 "WBC Image Dataset 2: pixels (whole WBC, nucleus) and class labels" \
    "$WBC" --truth "$WBC" --split-file "$SPLITS/wbc-image-dataset.csv" --split "$SPLIT" \
    --where dataset=2
evaluate wbc1 "WBC Image Dataset 1: pixels and class labels" \
    "$WBC" --truth "$WBC" --split-file "$SPLITS/wbc-image-dataset.csv" --split "$SPLIT" \
    --where dataset=1
evaluate pbc "PBC: 5-class accuracy, macro-F1, calibration (ECE)" \
    "$DATA/pbc-wbc" --truth "$DATA/splits/pbc-wbc.csv" --truth-format csv \
    --split-file "$SPLITS/pbc-wbc.csv" --split "$SPLIT"
evaluate bccd "BCCD: finding WBCs (box IoU >= 0.5); class on images with one labelled WBC" \
    "$DATA/bccd" --truth "$DATA/bccd" --truth-format voc \
    --split-file "$SPLITS/bccd.csv" --split "$SPLIT"
evaluate txl "TXL-PBC: finding WBCs (box IoU >= 0.5)" \
    "$DATA/txl-pbc/TXL_PBC/images" --truth "$DATA/txl-pbc/TXL_PBC/labels/$SPLIT" \
    --truth-format yolo "${TXL_ROWS[@]}" --split "$SPLIT"

echo
echo "Results in $OUT/ (exit code $status)"
exit "$status"
