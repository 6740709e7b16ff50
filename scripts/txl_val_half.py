"""Write split files that measure one half of TXL-PBC's val split.

    python scripts/txl_val_half.py judge DIR [--data ../shared/data]
    SPLITS=DIR SPLIT=val ONLY=txl scripts/evaluate_test_splits.sh [--model BUNDLE]

TXL-PBC val is cut in two fixed halves by image name (`segmenter.txl_val_halves`, the same cut
training uses): `select`, on which the shipped run-time rules (min_area_frac, min_nucleus_frac,
border_frac) were chosen and which `train segmenter --select-on-txl` may choose a checkpoint on,
and `judge`, which no choice has seen. A choice made on the select half is judged on the other.

DIR gets a copy of each split file of DATA/splits and a `txl-pbc.csv` (image,split) giving val
only the images of the half named; train and test keep all their images. It is a folder to
measure with, not to train with: training would halve TXL-PBC val again.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from wbc_batch.atomic import atomic_path  # noqa: E402
from wbc_batch.train.datasets import SPLIT_FILES, txl_pbc  # noqa: E402
from wbc_batch.train.segmenter import txl_val_halves  # noqa: E402

HALVES = ("select", "judge")


def half_rows(data: Path, half: str) -> list:
    """(image, split) rows of TXL-PBC, image relative to its `images` folder: every train and test
    image, and the val images of `half`."""
    images = data / "txl-pbc" / "TXL_PBC" / "images"
    chosen = txl_val_halves(txl_pbc(data, "val"))[HALVES.index(half)]
    rows = [(f"val/{r.image.name}", "val") for r in chosen]
    for split in ("train", "test"):  # listed by name only: not one of them is read here
        rows += [(f"{split}/{p.name}", split) for p in sorted((images / split).iterdir())
                 if p.is_file()]
    return rows


def write(folder: Path, data: Path, half: str) -> int:
    """Write the split files into `folder`; -> how many val images the half has."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in SPLIT_FILES:
        shutil.copyfile(data / "splits" / name, folder / name)
    rows = half_rows(data, half)
    with atomic_path(folder / "txl-pbc.csv") as tmp, open(tmp, "w", newline="",
                                                        encoding="utf-8") as f:
        out = csv.writer(f)
        out.writerow(["image", "split"])
        out.writerows(rows)
    return sum(1 for _, split in rows if split == "val")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("half", choices=HALVES)
    ap.add_argument("out", type=Path, help="folder for the split files")
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    args = ap.parse_args(argv)
    if not (args.data / "splits").is_dir():
        ap.error(f"no public data at {args.data} (expected {args.data}/splits); pass --data")
    n = write(args.out, args.data, args.half)
    print(f"{args.out}: TXL-PBC val's {args.half} half, {n} images. Measure it with: "
          f"SPLITS={args.out} SPLIT=val ONLY=txl scripts/evaluate_test_splits.sh")
    return 0


if __name__ == "__main__":
    sys.exit(main())
