"""How many crops a stain reference needs: the share of one microscope's cells it flags as an
unusual stain, fitted on n crops of that microscope (PBC val), for several n, and the share of
another microscope's cells (BCCD val) it flags.

A reference is meant to flag about 1 % of cells like its own (`stain.THRESHOLD_PERCENTILE`).
Fitted on few crops, its threshold (a percentile of those crops' own distances) sits too low,
and cells of the very microscope it was fitted on are flagged too; a threshold set to flag
fewer of them (from crops left out of the fit, tried) flagged none of another microscope's
cells in many fits. This says what a lab fine-tuning on few cells should expect
(`train.classifier.MIN_STAIN_CROPS`, `FEW_STAIN_CROPS`). Each reference is fitted on n of the
first 500 crops (a seeded choice, `--repeats` times) and judged on the next 400 and on BCCD
val's WBC boxes; the PBC crops are the central 128x128 of each image, every crop resized to
96x96. Val rows only.

    python scripts/stain_reference_size_check.py --sizes 20 50 100 200 300

Prints, per n: the mean share of PBC cells flagged with its lowest and highest over the
repeats, and the median share of BCCD cells with its lowest.
"""

from __future__ import annotations

import argparse
import csv
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wbc_batch.train.folders import add_data_option  # noqa: E402

FIT_POOL, JUDGED = 500, 400


def central_crop(path: Path) -> np.ndarray:
    import cv2

    from wbc_batch.imageio import read_image

    rgb = read_image(path)
    h, w = rgb.shape[:2]
    return np.ascontiguousarray(cv2.resize(rgb[h // 2 - 64:h // 2 + 64, w // 2 - 64:w // 2 + 64],
                                           (96, 96), interpolation=cv2.INTER_AREA))


def bccd_crops(data: Path) -> list:
    """BCCD val's WBC boxes, each cut out and resized to 96x96: another microscope's cells."""
    import cv2

    from wbc_batch.imageio import read_image

    out = []
    with open(data / "splits" / "bccd.csv", newline="", encoding="utf-8") as fh:
        rows = [r for r in csv.DictReader(fh) if r["split"] == "val"]
    for row in rows:
        rgb = read_image(data / "bccd" / row["image"])
        for obj in ET.parse(data / "bccd" / row["annotation"]).getroot().iter("object"):
            if (obj.findtext("name") or "").strip().upper() != "WBC":
                continue
            x0, y0, x1, y1 = (int(float(obj.find("bndbox").findtext(k)))
                              for k in ("xmin", "ymin", "xmax", "ymax"))
            cell = rgb[max(y0, 0):y1, max(x0, 0):x1]
            if cell.size:
                out.append(cv2.resize(np.ascontiguousarray(cell), (96, 96),
                                      interpolation=cv2.INTER_AREA))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_option(parser, Path(__file__).resolve().parents[1])
    parser.add_argument("--sizes", type=int, nargs="+", default=[20, 50, 100, 200, 300])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pool", type=int, default=FIT_POOL, help="crops the fits are drawn from")
    parser.add_argument("--judged", type=int, default=JUDGED, help="other crops they are judged on")
    args = parser.parse_args(argv)

    from wbc_batch.stain import StainReference, stain_features

    with open(args.data / "splits" / "pbc-wbc.csv", newline="", encoding="utf-8") as fh:
        rows = [r for r in csv.DictReader(fh) if r["split"] == "val"]
    rng = np.random.default_rng(args.seed)
    chosen = rng.permutation(len(rows))[:args.pool + args.judged]
    crops = [central_crop(args.data / "pbc-wbc" / rows[i]["image"]) for i in chosen]
    judged = np.array([f for f in map(stain_features, crops[args.pool:]) if f is not None])
    other = np.array([f for f in map(stain_features, bccd_crops(args.data)) if f is not None])
    print(f"PBC val: fitted on n of {args.pool} crops, judged on {len(judged)} others and on "
          f"{len(other)} BCCD val cells")
    for n in args.sizes:
        shares, foreign = [], []
        for _ in range(args.repeats):
            pick = rng.choice(args.pool, n, replace=False)
            ref = StainReference.fit({"lab": [crops[i] for i in pick]})
            shares.append(100 * float((ref.distances(judged) > ref.threshold).mean()))
            if len(other):
                foreign.append(100 * float((ref.distances(other) > ref.threshold).mean()))
        line = (f"n {n:>4}: PBC {np.mean(shares):5.1f} % flagged (lowest {min(shares):.1f}, "
                f"highest {max(shares):.1f}, {args.repeats} fits)")
        if foreign:
            line += f"; BCCD {np.median(foreign):.1f} % (lowest {min(foreign):.1f})"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
