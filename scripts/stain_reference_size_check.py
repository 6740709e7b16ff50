"""How many crops a stain reference needs: the share of one microscope's cells it flags as an
unusual stain, fitted on n crops of that microscope (PBC val), for several n.

A reference is meant to flag about 1 % of cells like its own (`stain.THRESHOLD_PERCENTILE`).
Fitted on few crops, its threshold (a percentile of those crops' own distances) sits too low,
and cells of the very microscope it was fitted on are flagged. This picks
`train.classifier.MIN_STAIN_CROPS`. Each reference is fitted on n of the first 500 crops (a
seeded choice, `--repeats` times) and judged on the next 400; the crops are the central 128x128
of PBC val images, resized to 96x96. Val rows only.

    python scripts/stain_reference_size_check.py --sizes 20 50 100 200 300

Prints, per n: the mean share flagged, and its lowest and highest over the repeats.
"""

from __future__ import annotations

import argparse
import csv
import sys
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
    print(f"PBC val: fitted on n of {args.pool} crops, judged on {len(judged)} others")
    for n in args.sizes:
        shares = []
        for _ in range(args.repeats):
            pick = rng.choice(args.pool, n, replace=False)
            ref = StainReference.fit({"lab": [crops[i] for i in pick]})
            shares.append(100 * float((ref.distances(judged) > ref.threshold).mean()))
        print(f"n {n:>4}: {np.mean(shares):5.1f} % flagged (lowest {min(shares):.1f}, highest "
              f"{max(shares):.1f}, {args.repeats} fits)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
