#!/usr/bin/env python3
"""What a WBC cut by the image border does to its field's analysis: the scale estimate, the cut
cell itself, and the other cells found.

    python scripts/border_cut_check.py [--data ../shared/data] [--split val] [--model DIR]
        [--depths 0.15 0.3 0.5 0.75] [--border-arc]

A scanner's fields cut WBCs at their edges, and when such a WBC is the largest thing in its field
it may set the field's scale. The script takes the BCCD fields of a split (val by default) with
exactly one WBC box, whole in the image, and crops each so that only a share `depth` of the box's
extent stays in, at the side nearest the box; the crop keeps the rest of the field. Each crop
and its whole field are analysed with default settings (`find_cells`, no classification), or
with `--border-arc` (`AnalysisParams.border_arc`) for both, and per depth it prints:

- the crop's scale estimate (`diameter_px`) over its whole field's: the median, and how many
  fields were within 15 %, and under 0.85 (cells seen too small: the crop is enlarged past the
  scale its WBCs are found at; a crop without an estimate counts as 0);
- the cut WBC: kept as one cell (a found cell's box overlaps the box's part in the crop at
  IoU >= 0.5), or as two or more cells (two or more found cells overlap that part by half of
  their own box or more). The analysis drops border-cut parts under 30 % of a WBC's disc on
  purpose, so a depth of 0.15 (about 9 % of the disc) should keep none, and 0.5 and 0.75 all;
- the other cells: found cells whose box does not touch the box's part in the crop, against
  the whole field's cells outside the WBC box whose centre lies in the crop. BCCD labels every
  WBC, but leaves out some cut by the border, so these are mostly false cells.

Test rows are for the final measurement only: use val (or train) here.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from wbc_batch.analysis import find_cells  # noqa: E402
from wbc_batch.bundle import load_bundle  # noqa: E402
from wbc_batch.config import AnalysisParams  # noqa: E402
from wbc_batch.imageio import read_image  # noqa: E402
from wbc_batch.metrics import box_iou_matrix  # noqa: E402
from wbc_batch.nets import TorchSession  # noqa: E402
from wbc_batch.results import ImageNotAnalysable  # noqa: E402
from wbc_batch.train import datasets as ds  # noqa: E402
from wbc_batch.train.folders import add_data_option  # noqa: E402

DEPTHS = (0.15, 0.3, 0.5, 0.75)
#: a field is used when its WBC box stays this many px clear of every image edge
MARGIN = 3
#: the crop's estimate is "the same" as its whole field's within this ratio
CLOSE = 0.15


def iou(a: tuple, b: tuple) -> float:
    """Intersection over union of two (x, y, w, h) boxes, as the evaluation matches boxes."""
    return float(box_iou_matrix([a], [b])[0, 0])


def overlap_of(a: tuple, b: tuple) -> float:
    """The share of box `a`'s area that lies in box `b`."""
    iw = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    ih = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    return 0.0 if iw <= 0 or ih <= 0 else iw * ih / float(a[2] * a[3])


def cut(shape: tuple, box: tuple, depth: float) -> tuple:
    """(x0, y0, x1, y1): the crop of an image of `shape` that keeps a share `depth` of `box`'s
    extent, at the image side nearest the box, and everything beyond it on the other side."""
    h, w = shape[:2]
    x, y, bw, bh = box
    gaps = {"left": x, "right": w - (x + bw), "top": y, "bottom": h - (y + bh)}
    side = min(gaps, key=gaps.get)
    if side == "left":
        return int(round(x + (1 - depth) * bw)), 0, w, h
    if side == "right":
        return 0, 0, int(round(x + depth * bw)), h
    if side == "top":
        return 0, int(round(y + (1 - depth) * bh)), w, h
    return 0, 0, w, int(round(y + depth * bh))


def in_crop(box: tuple, crop: tuple) -> tuple:
    """`box` (whole-field pixels) clipped to `crop`, in the crop's pixels."""
    x0, y0, x1, y1 = crop
    bx0, by0 = max(box[0], x0), max(box[1], y0)
    bx1, by1 = min(box[0] + box[2], x1), min(box[1] + box[3], y1)
    return bx0 - x0, by0 - y0, bx1 - bx0, by1 - by0


def fields(data: Path, split: str):
    """(name, RGB, WBC box) of the split's BCCD fields with one WBC box clear of the border
    (a field whose whole image gives no scale estimate is left out, in `main`)."""
    for r in ds.bccd(data, split):
        if len(r.boxes) != 1:
            continue
        rgb = read_image(r.image)
        h, w = rgb.shape[:2]
        x, y, bw, bh = r.boxes[0]
        if min(x, y, w - (x + bw), h - (y + bh)) >= MARGIN:
            yield Path(r.image).name, rgb, tuple(r.boxes[0])


def measure(rgb, box, depth, whole, session, bundle, params: AnalysisParams = AnalysisParams()) -> dict:
    """One crop's row: its scale ratio to the `whole` field's analysis, the cut WBC's cells,
    and the other cells, with the whole field's in the same part."""
    crop = cut(rgb.shape, box, depth)
    x0, y0, x1, y1 = crop
    try:
        found = find_cells(np.ascontiguousarray(rgb[y0:y1, x0:x1]), session, bundle, params)
    except ImageNotAnalysable:  # cells under 8 px: no estimate, no cells (counted as such)
        found = SimpleNamespace(boxes={}, diameter_px=0.0)
    part = in_crop(box, crop)
    boxes = list(found.boxes.values())
    kept = any(iou(b, part) >= 0.5 for b in boxes)
    pieces = sum(overlap_of(b, part) >= 0.5 for b in boxes)
    others = sum(overlap_of(b, part) == 0 for b in boxes)
    before = 0
    for b in whole.boxes.values():
        cx, cy = b[0] + b[2] / 2, b[1] + b[3] / 2
        if overlap_of(b, box) == 0 and x0 <= cx < x1 and y0 <= cy < y1:
            before += 1
    ratio = found.diameter_px / whole.diameter_px if found.diameter_px else 0.0  # none: under 0.85
    return {"ratio": ratio, "kept": kept, "split": pieces >= 2, "others": others, "before": before}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_option(ap, ROOT)
    ap.add_argument("--split", default="val", choices=("train", "val"),
                    help="BCCD split to crop (default: val; test rows are for the final measurement)")
    ap.add_argument("--model", type=Path, default=None, help="model bundle (default: the shipped one)")
    ap.add_argument("--depths", type=float, nargs="+", default=list(DEPTHS),
                    help="shares of the WBC box's extent left in the crop (default: %(default)s)")
    ap.add_argument("--border-arc", action="store_true",
                    help="analyse with AnalysisParams.border_arc (the option --border-arc)")
    args = ap.parse_args(argv)
    params = AnalysisParams(border_arc=args.border_arc)
    bundle = load_bundle(args.model)
    session = TorchSession.from_bundle(bundle)
    rows = {d: [] for d in args.depths}
    n = 0
    unmeasured = 0
    for name, rgb, box in fields(args.data, args.split):
        try:
            whole = find_cells(rgb, session, bundle, params)
        except ImageNotAnalysable:
            whole = None
        if whole is None or not whole.diameter_px:
            unmeasured += 1
            continue
        n += 1
        for d in args.depths:
            rows[d].append(measure(rgb, box, d, whole, session, bundle, params))
    print(("--border-arc; " if args.border_arc else "default settings; ") + f"BCCD {args.split}: {n} fields with one WBC box clear of the border; each cropped to "
          "a share of the box's extent at its nearest side"
          + (f" ({unmeasured} more left out: no scale estimate on the whole field)" if unmeasured else ""))
    print("depth | scale over whole field: median, within 15 %, under 0.85 | cut WBC kept, as 2+ "
          "cells | other cells (whole field's in the crop)")
    for d, rs in rows.items():
        r = np.array([x["ratio"] for x in rs])
        print(f"{d:.2f} | {np.median(r):.2f}, {int((abs(r - 1) <= CLOSE).sum())} of {n}, "
              f"{int((r < 1 - CLOSE).sum())} of {n} | {sum(x['kept'] for x in rs)} of {n}, "
              f"{sum(x['split'] for x in rs)} | {sum(x['others'] for x in rs)} "
              f"({sum(x['before'] for x in rs)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
