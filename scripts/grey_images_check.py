#!/usr/bin/env python3
"""How many images of the public datasets `analysis.is_grey` takes for grey (no stain colour), and
in how many `frame.unlit_frame` finds a black frame, `frame.flat_margins` a flat margin and
`frame.light_surround` a white surround (where there is no flat margin, as the analysis takes
it), per set and split. The grey rules (a darkness bar for nuclei, no box trim, every cell flagged
`unusual_stain`), the frame fills and the margin fill (`--fill-margins`) act only on those images,
so where this prints 0 they leave a split's results as they were. It reads the images only, runs
no model and measures nothing on them.

    python scripts/grey_images_check.py [--data ../shared/data] [--splits train val test]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from wbc_batch.train.folders import add_data_option  # noqa: E402
sys.path.insert(0, str(ROOT / "scripts"))

from perturbation_check import SPLITS, dataset_sets  # noqa: E402
from wbc_batch.analysis import is_grey  # noqa: E402
from wbc_batch.frame import flat_margins, light_surround, unlit_frame  # noqa: E402


def count_images(root: Path, names: list) -> tuple:
    """(images read, grey images, images with a black frame, images with a flat margin, images
    with a white surround) among `root/name`; unreadable files are not counted."""
    read = grey = framed = margined = white = 0
    for name in names:
        bgr = cv2.imread(str(root / name), cv2.IMREAD_COLOR)
        if bgr is None:
            continue
        rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        read += 1
        grey += is_grey(rgb)
        framed += unlit_frame(rgb) is not None
        margins = flat_margins(rgb) is not None
        margined += margins
        white += not margins and light_surround(rgb) is not None
    return read, grey, framed, margined, white


def count_grey(root: Path, names: list) -> tuple:
    """(images read, grey images) among `root/name`."""
    return count_images(root, names)[:2]


def _line(read: int, grey: int, framed: int, margined: int, white: int) -> str:
    return (f"{grey} grey of {read} images; {framed} with a black frame; "
            f"{margined} with a flat margin; {white} with a white surround")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_option(ap, ROOT)
    ap.add_argument("--splits", nargs="+", default=list(SPLITS), choices=SPLITS)
    args = ap.parse_args(argv)
    if not (args.data / "splits").is_dir():
        print(f"no data at {args.data} (use --data)", file=sys.stderr)
        return 2
    total = [0, 0, 0, 0, 0]
    for split in args.splits:
        for name, (root, names, _) in dataset_sets(args.data, split, 1).items():
            counts = count_images(root, names)
            total = [t + c for t, c in zip(total, counts)]
            print(f"{name} {split}: {_line(*counts)}", flush=True)
    print(f"all: {_line(*total)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
