#!/usr/bin/env python3
"""Where the nucleus stain rule's threshold sits: `analysis.nucleus_contrast` of every cell the
default models find, on the val splits of the public datasets and on empty fields.

    python scripts/nucleus_contrast_check.py [--data ../shared/data] [--sets wbc2 wbc1 pbc bccd txl]
        [--pbc-every 4] [--model DIR]

Cells are found with the rule off (`min_nucleus_contrast=0`, and its grey images' bar
`min_grey_nucleus_contrast=0`), so that every candidate is scored.
A found cell counts as a WBC when it matches a truth box at IoU >= 0.5 (BCCD, TXL-PBC), or when it
is the found cell nearest the centre of a single-cell image (PBC, WBC Image Dataset 1 and 2); the
rest are "other" (false cells, or a second cell at a crop's edge). The empty fields are
`sample.empty_fields()`. Val rows only: the threshold must not be read off the test rows.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from wbc_batch.train.folders import default_data  # noqa: E402
from wbc_batch.analysis import contrast_ring, find_cells, is_grey, nucleus_contrast  # noqa: E402
from wbc_batch.bundle import load_bundle  # noqa: E402
from wbc_batch.config import AnalysisParams  # noqa: E402
from wbc_batch.imageio import read_image  # noqa: E402
from wbc_batch.nets import TorchSession  # noqa: E402
from wbc_batch.sample import empty_fields  # noqa: E402
from wbc_batch.train import datasets as ds  # noqa: E402
from wbc_batch.train.classifier import _iou  # noqa: E402

RULE_OFF = AnalysisParams(min_nucleus_contrast=0, min_grey_nucleus_contrast=0)


def val_records(data: Path, name: str, pbc_every: int) -> list:
    if name == "pbc":
        return ds.pbc(data, "val")[::pbc_every]
    if name == "bccd":
        return ds.bccd(data, "val")
    if name == "txl":
        return ds.txl_pbc(data, "val")
    return ds.wbc_image_dataset(data, "val", name[-1])


def scored_cells(rgb, session, bundle) -> list:
    """(box, nucleus_contrast) of every cell found with the rule off."""
    found = find_cells(rgb, session, bundle, RULE_OFF)
    ring = contrast_ring(found.diameter_px)
    rgb = found.rgb  # evened out where the lamp falloff was strong, as the rule sees it at run time
    colour = not is_grey(rgb)
    return [(box, nucleus_contrast(rgb, found.cell_labels, found.mask, cid, box, ring, colour))
            for cid, box in found.boxes.items()]


def is_wbc(record, rgb, cells) -> list:
    """For each scored cell: does it stand for a truth WBC (see the module docstring)?"""
    boxes = getattr(record, "boxes", None)
    if boxes is not None:
        return [max((_iou(box, t) for t in boxes), default=0.0) >= 0.5 for box, _ in cells]
    h, w = rgb.shape[:2]
    dist = [(b[0] + b[2] / 2 - w / 2) ** 2 + (b[1] + b[3] / 2 - h / 2) ** 2 for b, _ in cells]
    return [i == int(np.argmin(dist)) for i in range(len(cells))]


def summary(values: list) -> str:
    if not values:
        return "none"
    v = np.asarray(values)
    return (f"n={len(v)} min={v.min():.3f} p1={np.percentile(v, 1):.3f} p5={np.percentile(v, 5):.3f} "
            f"median={np.median(v):.3f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=default_data(ROOT),
                    help="the public datasets (default: $WBC_BATCH_DATA, else ../shared/data "
                         "beside the repository)")
    ap.add_argument("--sets", nargs="+", default=["wbc2", "wbc1", "pbc", "bccd", "txl"],
                    choices=["wbc2", "wbc1", "pbc", "bccd", "txl"])
    ap.add_argument("--pbc-every", type=int, default=4, help="score every Nth PBC val image")
    ap.add_argument("--model", type=Path, default=None, help="model bundle (default: the shipped one)")
    args = ap.parse_args(argv)
    bundle = load_bundle(args.model)
    session = TorchSession.from_bundle(bundle)
    print(f"threshold (AnalysisParams.min_nucleus_contrast): {AnalysisParams().min_nucleus_contrast}")
    for name, rgb in empty_fields().items():
        scores = [f"{c:.3f}" for _, c in scored_cells(rgb, session, bundle)]
        print(f"empty field, {name}: {len(scores)} found, contrast {', '.join(scores) or '-'}")
    for name in args.sets:
        wbc, other = [], []
        records = val_records(args.data, name, args.pbc_every)
        for record in records:
            rgb = read_image(record.image)
            cells = scored_cells(rgb, session, bundle)
            for (_, c), hit in zip(cells, is_wbc(record, rgb, cells)):
                (wbc if hit else other).append(c)
        print(f"{name} val ({len(records)} images): WBCs {summary(wbc)}; other cells {summary(other)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
