"""Build fields that hold several WBCs of different sizes, from BCCD fields of one WBC each.

Most public fields hold one WBC, so the public evaluations barely test what a lab's differential
needs most: small lymphocytes found beside larger neutrophils and monocytes in the same field,
at the field's one working scale. This script tiles BCCD fields of one split, each with one
labelled WBC that the image border does not cut, into mosaics of n x n fields, each shrunk by
1/n, so a mosaic is the size of one field with n x n WBCs of their own sizes in it:

    python scripts/field_mosaics.py -o runs/mosaics            # val fields, n = 2, 3 and 4
    wbc-batch evaluate runs/mosaics/n3 --truth runs/mosaics/n3.csv -o runs/mosaics-n3

`--shrink S` shrinks each field by 1/S instead of 1/n, so larger mosaics hold smaller WBCs,
as a scanner at a lower magnification sees them (`-n 6 --shrink 3`: mosaics of about
1280x960 with 36 WBCs a third of their size; folders `nN-sS/`):

    python scripts/field_mosaics.py -n 6 --shrink 3 -o runs/mosaics

`--repeat R` lays each mosaic R x R times side by side (folders `nN-sS-rR/`), for fields the
size of a large camera's from the few fields a split has: `--split train -n 11 --shrink 2.2
--repeat 2` gives a 6402x4796 field of 484 WBCs of about 90 px, as a 30 MP camera shows them:

    python scripts/field_mosaics.py --split train -n 11 --shrink 2.2 --repeat 2 -o runs/large

Each `nN/` folder holds the mosaics (PNG) and `nN.csv` their truth: one row per WBC with its box
(`xmin,ymin,xmax,ymax`, scaled and moved with its tile) and class. Fields are taken in split
order, a class at a time in turn, so each mosaic mixes classes; each field is used once per n.
Never build them from the test split for development (`--split test` is for a final
measurement only).
"""

from __future__ import annotations

import argparse
import csv
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path
from typing import Optional

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from wbc_batch.train.folders import add_data_option  # noqa: E402

#: a WBC box this close to the image border (px) may be cut by it: the field is not used
BORDER = 3


def one_wbc_fields(data: Path, split: str) -> list:
    """[(image path, class, (xmin, ymin, xmax, ymax))] of the BCCD fields of `split` with one WBC
    box, one subtype label, and the box clear of the border, in split order."""
    root = data / "bccd"
    fields = []
    with open(data / "splits" / "bccd.csv", newline="", encoding="utf-8") as fh:
        rows = [r for r in csv.DictReader(fh) if r["split"] == split]
    for row in rows:
        labels = [s.strip().lower() for s in (row.get("labels") or "").split(",") if s.strip()]
        objs = [o for o in ET.parse(root / row["annotation"]).getroot().findall("object")
                if (o.findtext("name") or "").strip() == "WBC"]
        if len(objs) != 1 or len(labels) != 1:
            continue
        box = tuple(float(objs[0].find("bndbox").findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
        image = root / row["image"]
        h, w = cv2.imread(str(image)).shape[:2]
        if box[0] < BORDER or box[1] < BORDER or box[2] > w - 1 - BORDER or box[3] > h - 1 - BORDER:
            continue
        fields.append((image, labels[0], box))
    return fields


def interleaved(fields: list) -> list:
    """`fields` reordered a class at a time in turn (classes in order of first appearance)."""
    by_class = defaultdict(list)
    for f in fields:
        by_class[f[1]].append(f)
    queues = list(by_class.values())
    out = []
    while any(queues):
        for q in queues:
            if q:
                out.append(q.pop(0))
    return out


def mosaic_stem(n: int, shrink: Optional[float] = None, repeat: int = 1) -> str:
    """The name of the folder (and, + .csv, of the truth) of the mosaics `build` writes."""
    return (f"n{n}" + ("" if shrink is None else f"-s{shrink:g}")
            + ("" if repeat == 1 else f"-r{repeat}"))


def build(fields: list, n: int, out: Path, shrink: Optional[float] = None, repeat: int = 1) -> int:
    """Write mosaics of n x n fields, each shrunk by 1/`shrink` (default: 1/n), each laid
    `repeat` x `repeat` times side by side, into out/`mosaic_stem`/ and their truth to the
    folder's name + .csv; -> how many."""
    stem = mosaic_stem(n, shrink, repeat)
    shrink = n if shrink is None else shrink
    folder = out / stem
    folder.mkdir(parents=True, exist_ok=True)
    count = len(fields) // (n * n)
    rows = []
    for k in range(count):
        tiles, name, boxes = [], f"mosaic_{k:03d}.png", []
        group = fields[k * n * n:(k + 1) * n * n]
        for i, (image, cls, box) in enumerate(group):
            rgb = cv2.imread(str(image))
            h, w = rgb.shape[:2]
            th, tw = round(h / shrink), round(w / shrink)
            tiles.append(cv2.resize(rgb, (tw, th), interpolation=cv2.INTER_AREA))
            r, c = divmod(i, n)
            sx, sy = tw / w, th / h
            boxes.append((round(box[0] * sx) + c * tw, round(box[1] * sy) + r * th,
                          round(box[2] * sx) + c * tw, round(box[3] * sy) + r * th, cls))
        mosaic = np.vstack([np.hstack(tiles[r * n:(r + 1) * n]) for r in range(n)])
        mh, mw = mosaic.shape[:2]
        for dy in range(0, repeat * mh, mh):
            for dx in range(0, repeat * mw, mw):
                rows += [[name, x0 + dx, y0 + dy, x1 + dx, y1 + dy, cls]
                         for x0, y0, x1, y1, cls in boxes]
        cv2.imwrite(str(folder / name), np.tile(mosaic, (repeat, repeat, 1)))
    with open(out / f"{stem}.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "xmin", "ymin", "xmax", "ymax", "class"])
        writer.writerows(rows)
    return count


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_option(parser, ROOT)
    parser.add_argument("--split", default="val", choices=("train", "val", "test"))
    parser.add_argument("-n", type=int, nargs="+", default=[2, 3, 4],
                        help="tiles per side of a mosaic (default: 2 3 4)")
    parser.add_argument("--shrink", type=float, default=None,
                        help="shrink each field by 1/SHRINK (default: 1/n, so a mosaic is one "
                             "field's size); e.g. -n 6 --shrink 3 gives mosaics of about "
                             "1280x960 of WBCs a third of their size")
    parser.add_argument("--repeat", type=int, default=1,
                        help="lay each mosaic REPEAT x REPEAT times side by side (default: 1), "
                             "for a large camera's field size")
    parser.add_argument("-o", "--output", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.shrink is not None and not args.shrink > 0:
        parser.error(f"--shrink must be a positive number, not {args.shrink:g}")
    if args.repeat < 1:
        parser.error(f"--repeat must be 1 or more, not {args.repeat}")
    fields = interleaved(one_wbc_fields(args.data, args.split))
    classes = defaultdict(int)
    for _, cls, _ in fields:
        classes[cls] += 1
    print(f"{len(fields)} {args.split} fields with one WBC clear of the border: "
          + ", ".join(f"{c} {k}" for c, k in classes.items()))
    for n in args.n:
        count = build(fields, n, args.output, args.shrink, args.repeat)
        stem = mosaic_stem(n, args.shrink, args.repeat)
        print(f"n={n}: {count} mosaics of {n}x{n} fields in {args.output / stem}; truth "
              f"{args.output / (stem + '.csv')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
