#!/usr/bin/env python3
"""Where the nucleus stain rule's threshold sits: `analysis.nucleus_contrast` of every cell the
default models find, on the val splits of the public datasets and on empty fields.

    python scripts/nucleus_contrast_check.py [--data ../shared/data] [--sets wbc2 wbc1 pbc bccd txl]
        [--pbc-every 4] [--strips] [--model DIR]
    python scripts/nucleus_contrast_check.py --write-strips DIR [--strips-split val]

`--strips` also scores real fields without a WBC, strips of BCCD val fields clear of every WBC
box (`wbc_free_strips`); `--write-strips` writes them, for `wbc-batch run DIR`.

Cells are found with the rule off (`min_nucleus_contrast=0`, and its grey images' bar
`min_grey_nucleus_contrast=0`), so that every candidate is scored.
A found cell counts as a WBC when it matches a truth box at IoU >= 0.5 (BCCD, TXL-PBC), or when it
is the found cell nearest the centre of a single-cell image (PBC, WBC Image Dataset 1 and 2); the
rest are "other" (false cells, or a second cell at a crop's edge). The empty fields are
`sample.empty_fields()`; blank and black ones are no longer shown to the segmenter
(`analysis.field_cover`), so the lamp falloff field is also scored left uneven. Val rows only:
the threshold must not be read off the test rows.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from wbc_batch.train.folders import add_data_option  # noqa: E402
from wbc_batch.analysis import (contrast_ring, field_stain, find_cells, is_grey,  # noqa: E402
                                nucleus_contrast)
from wbc_batch.bundle import load_bundle  # noqa: E402
from wbc_batch.config import AnalysisParams  # noqa: E402
from wbc_batch.imageio import read_image  # noqa: E402
from wbc_batch.nets import TorchSession  # noqa: E402
from wbc_batch.results import ImageNotAnalysable  # noqa: E402
from wbc_batch.sample import empty_fields  # noqa: E402
from wbc_batch.train import datasets as ds  # noqa: E402
from wbc_batch.train.classifier import _iou  # noqa: E402

RULE_OFF = AnalysisParams(min_nucleus_contrast=0, min_grey_nucleus_contrast=0, min_nucleus_over_field=0)


def val_records(data: Path, name: str, pbc_every: int) -> list:
    if name == "pbc":
        return ds.pbc(data, "val")[::pbc_every]
    if name == "bccd":
        return ds.bccd(data, "val")
    if name == "txl":
        return ds.txl_pbc(data, "val")
    return ds.wbc_image_dataset(data, "val", name[-1])


def scored_cells(rgb, session, bundle, params=RULE_OFF) -> list:
    """(box, nucleus_contrast, its ratio to the field's `field_stain`) of every cell found with
    the rules off; the ratio is inf where the field gives no stain to compare with, and in grey
    images (where that rule does not apply)."""
    found = find_cells(rgb, session, bundle, params)
    ring = contrast_ring(found.diameter_px)
    rgb = found.rgb  # evened out where the lamp falloff was strong, as the rule sees it at run time
    colour = not is_grey(rgb)
    field = field_stain(rgb, found.not_field) if colour else 0.0
    cells = []
    for cid, box in found.boxes.items():
        c = nucleus_contrast(rgb, found.cell_labels, found.mask, cid, box, ring, colour)
        cells.append((box, c, c / field if field > 0 else math.inf))
    return cells


def empty_field_line(rgb, session, bundle, params=RULE_OFF) -> str:
    """The cells found in an empty field with the rules off and their contrast; or, for a field
    the analysis refuses (`ImageNotAnalysable`: WBCs estimated too small), why."""
    try:
        scores = [f"{c:.3f}" for _, c, _ in scored_cells(rgb, session, bundle, params)]
    except ImageNotAnalysable as e:
        return f"refused ({e})"
    return f"{len(scores)} found, contrast {', '.join(scores) or '-'}"


def wbc_free_strips(data: Path, split: str, min_width: int = 200, gap: int = 20) -> list:
    """(name, RGB) of real fields without a WBC: from each BCCD field of `split`, the widest strip
    of full height that keeps `gap` px clear of every WBC box, when at least `min_width` wide.
    (BCCD leaves some WBCs cut by the image border without a box; a strip can hold one.)"""
    strips = []
    for record in ds.bccd(data, split):
        rgb = read_image(record.image)
        w = rgb.shape[1]
        taken = sorted((max(0, int(x) - gap), min(w, int(x + bw) + gap)) for x, _, bw, _ in record.boxes)
        free, start = [], 0
        for x0, x1 in taken:
            free.append((start, x0))
            start = max(start, x1)
        free.append((start, w))
        x0, x1 = max(free, key=lambda f: f[1] - f[0])
        if x1 - x0 >= min_width:
            strips.append((Path(record.image).name, np.ascontiguousarray(rgb[:, x0:x1])))
    return strips


def is_wbc(record, rgb, cells) -> list:
    """For each scored cell: does it stand for a truth WBC (see the module docstring)?"""
    boxes = getattr(record, "boxes", None)
    if boxes is not None:
        return [max((_iou(cell[0], t) for t in boxes), default=0.0) >= 0.5 for cell in cells]
    h, w = rgb.shape[:2]
    dist = [(b[0] + b[2] / 2 - w / 2) ** 2 + (b[1] + b[3] / 2 - h / 2) ** 2 for b, *_ in cells]
    return [i == int(np.argmin(dist)) for i in range(len(cells))]


def summary(values: list, high: bool = False) -> str:
    """The low tail of `values` (min, 1st and 5th percentiles) and their median; with `high`,
    the high tail (max, 99th and 95th percentiles)."""
    if not values:
        return "none"
    v = np.asarray(values)
    ends = (("max", v.max()), ("p99", np.percentile(v, 99)), ("p95", np.percentile(v, 95))) if high \
        else (("min", v.min()), ("p1", np.percentile(v, 1)), ("p5", np.percentile(v, 5)))
    return f"n={len(v)} " + " ".join(f"{k}={x:.3f}" for k, x in ends) + f" median={np.median(v):.3f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_option(ap, ROOT)
    ap.add_argument("--sets", nargs="+", default=["wbc2", "wbc1", "pbc", "bccd", "txl"],
                    choices=["wbc2", "wbc1", "pbc", "bccd", "txl"])
    ap.add_argument("--pbc-every", type=int, default=4, help="score every Nth PBC val image")
    ap.add_argument("--strips", action="store_true",
                    help="also score real fields without a WBC: strips of BCCD val fields clear "
                         "of every WBC box")
    ap.add_argument("--write-strips", type=Path, metavar="DIR",
                    help="only write those strips (val, or --strips-split) to DIR as PNG, to run "
                         "`wbc-batch run DIR` on them, and stop")
    ap.add_argument("--strips-split", default="val", choices=("train", "val"),
                    help="the BCCD split --write-strips cuts (never test)")
    ap.add_argument("--model", type=Path, default=None, help="model bundle (default: the shipped one)")
    args = ap.parse_args(argv)
    if args.write_strips:
        strips = wbc_free_strips(args.data, args.strips_split)
        args.write_strips.mkdir(parents=True, exist_ok=True)
        for name, rgb in strips:
            cv2.imwrite(str(args.write_strips / (Path(name).stem + ".png")),
                        cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        print(f"{len(strips)} {args.strips_split} strips without a WBC box in {args.write_strips}")
        return 0
    bundle = load_bundle(args.model)
    session = TorchSession.from_bundle(bundle)
    print(f"threshold (AnalysisParams.min_nucleus_contrast): {AnalysisParams().min_nucleus_contrast}")
    print(f"ratio bar (AnalysisParams.min_nucleus_over_field): {AnalysisParams().min_nucleus_over_field}")
    fields = [(name, rgb, RULE_OFF) for name, rgb in empty_fields().items()]
    fields.append(("lamp falloff, left uneven", empty_fields()["lamp falloff"],
                   replace(RULE_OFF, min_falloff=0)))
    for name, rgb, params in fields:
        print(f"empty field, {name}: {empty_field_line(rgb, session, bundle, params)}")
    if args.strips:
        strips = wbc_free_strips(args.data, "val")
        cells = [cell for _, rgb in strips for cell in scored_cells(rgb, session, bundle)]
        print(f"BCCD val strips without a WBC box ({len(strips)} fields): {len(cells)} cells found; "
              f"contrast {summary([c for _, c, _ in cells], high=True)}; "
              f"ratio {summary([r for _, _, r in cells if r < math.inf], high=True)}")
    for name in args.sets:
        wbc, other = [], []
        records = val_records(args.data, name, args.pbc_every)
        for record in records:
            rgb = read_image(record.image)
            cells = scored_cells(rgb, session, bundle)
            for (_, c, r), hit in zip(cells, is_wbc(record, rgb, cells)):
                (wbc if hit else other).append((c, r))
        print(f"{name} val ({len(records)} images): WBCs {summary([c for c, _ in wbc])}; "
              f"other cells {summary([c for c, _ in other])}")
        print(f"  ratio to the field's stain: WBCs {summary([r for _, r in wbc if r < math.inf])} "
              f"({sum(r == math.inf for _, r in wbc)} without one); "
              f"other cells {summary([r for _, r in other if r < math.inf], high=True)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
