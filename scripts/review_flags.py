#!/usr/bin/env python3
"""How well do the review flags catch the classifier's mistakes? For `wbc-batch evaluate` result
folders, prints per folder: cells, right; how many are flagged needs_review, and of those for an
unusual stain; and the silent errors (wrong and not flagged), with the stain check and with the
confidence threshold alone.

    python scripts/review_flags.py [--review-threshold 0.8] EVAL_DIR [EVAL_DIR ...]

Only images with exactly one found cell count. On single-cell sets (WBC Image Dataset, PBC) the
evaluation scores that cell against the image's label; on box sets (BCCD) the image must also
have one truth box, matched by that cell, with a class label.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from wbc_batch.config import DEFAULT_REVIEW_THRESHOLD  # noqa: E402


def flag_table(folder: Path, review_threshold: float = DEFAULT_REVIEW_THRESHOLD) -> dict:
    """Counts for one evaluate folder (its accuracy.csv and cells.csv)."""
    acc = pd.read_csv(folder / "accuracy.csv", dtype=str, keep_default_na=False)
    per = acc[acc.section == "per_image"].pivot(index="scope", columns="metric", values="value")
    if "correct" in per:  # single-cell images: the label's verdict on the one cell
        per = per[per["correct"] != ""]
        ok = per["correct"].isin(["True", "1", "1.0"])
    else:  # fields: one truth box, matched by the one cell found, with a class label
        per = per[(per["truth_boxes"] == "1") & (per["found_cells"] == "1") & (per["matched"] == "1")
                  & (per["labelled_correct"] != "")]
        ok = per["labelled_correct"] == "1"
    right = pd.DataFrame({"image": per.index, "correct": ok.to_numpy()})
    cells = pd.read_csv(folder / "cells.csv")
    one = cells[cells.groupby("image")["image"].transform("size") == 1]
    m = one.merge(right, on="image")
    wrong = ~m.correct
    low = m.confidence < review_threshold
    return {"set": folder.name, "cells": len(m), "right": int(m.correct.sum()),
            "needs_review": int(m.needs_review.sum()), "unusual_stain": int(m.unusual_stain.sum()),
            "silent_errors": int((wrong & ~m.needs_review).sum()),
            "silent_errors_confidence_only": int((wrong & ~low).sum())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folders", nargs="+", type=Path)
    ap.add_argument("--review-threshold", type=float, default=DEFAULT_REVIEW_THRESHOLD,
                    help="the threshold the evaluation ran with")
    args = ap.parse_args(argv)
    rows = [flag_table(f, args.review_threshold) for f in args.folders]
    print("| folder | cells | right | needs_review | of them unusual_stain | silent errors "
          "| silent errors, confidence alone |")
    print("|---|---|---|---|---|---|---|")
    for f, r in zip(args.folders, rows):
        print(f"| {f} | {r['cells']} | {r['right']} | {r['needs_review']} | {r['unusual_stain']} "
              f"| {r['silent_errors']} | {r['silent_errors_confidence_only']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
