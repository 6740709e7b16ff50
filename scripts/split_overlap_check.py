#!/usr/bin/env python3
"""Which val and test images are copies of images the default models learned from?

    python scripts/split_overlap_check.py [--data ../shared/data] [--write-unseen CSV]

The public sets share images. TXL-PBC was put together from Raabin, PBC, BCD and BCCD images,
and its authors removed only the images identical to a BCCD or PBC *test* image, so a TXL-PBC
val or test image can be a BCCD or PBC train image, and a TXL-PBC train image a BCCD val one.
Within PBC and the WBC Image Dataset, a few images are stored twice under two names in two
splits. Each split is clean on its own terms; across the sets the default models read, it is not.

This script hashes every image (SHA-256 of the file's bytes) and says, for the val and test rows
of each set the evaluation reads, how many are byte-identical to an image that a default model
was trained on (`SEGMENTER_TRAIN`, `CLASSIFIER_TRAIN`: the rows `wbc-batch train` reads with
the default recipe) and which set and split each copy comes from. A val image copied from a
training image scores a checkpoint on a cell the model learned; a test image so copied is
measured in-sample.

It then looks for near copies that hashing misses (the same picture saved again, or its
brightness changed): two images of the same size whose 32x32 grey thumbnails differ by less than
`NEAR` grey levels on average. It prints how many val and test images have such a neighbour
among the training images without being a byte copy, and the smallest distance left (how far the
closest other picture is). A copy resized or cropped is not found.

`--write-unseen CSV` writes a split file (`image,split`, paths relative to TXL-PBC's `images`
folder) with the TXL-PBC rows that are copies of no image the segmenter trained on, for
`wbc-batch evaluate --split-file` (`scripts/evaluate_test_splits.sh` set `txl-unseen`). TXL-PBC
measures cell finding, which is the segmenter's alone, so its copies of PBC train crops (which
only the classifier learned from) stay in.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from wbc_batch.atomic import atomic_path  # noqa: E402
from wbc_batch.train.folders import add_data_option  # noqa: E402

SETS = ("wbc1", "wbc2", "pbc", "bccd", "txl")
TITLES = {"wbc1": "WBC Image Dataset 1", "wbc2": "WBC Image Dataset 2", "pbc": "PBC",
          "bccd": "BCCD", "txl": "TXL-PBC"}
# what each default model is trained on (wbc_batch/train/segmenter.py `_gather`,
# classifier.py's crop jobs): the train rows of these sets
SEGMENTER_TRAIN = ("wbc1", "wbc2", "bccd", "txl")
CLASSIFIER_TRAIN = ("wbc1", "wbc2", "bccd", "pbc")
NEAR = 2.0      # mean absolute difference of 32x32 grey thumbnails, in grey levels
THUMB = 32


class Row(NamedTuple):
    """One image of a public set: its path, set (`SETS`), split, and name for the split file."""
    path: Path
    set: str
    split: str
    name: str = ""


def rows(data: Path) -> list:
    """Every image of the five sets with its split: the split files' rows, and TXL-PBC's own
    `images/{train,val,test}` folders (its `name` is relative to `images`)."""
    out = []
    splits = data / "splits"
    with open(splits / "wbc-image-dataset.csv", newline="", encoding="utf-8") as f:
        for r in csv.DictReader(f):
            out.append(Row(data / "wbc-image-dataset" / r["image"], "wbc" + r["dataset"],
                           r["split"], r["image"]))
    with open(splits / "pbc-wbc.csv", newline="", encoding="utf-8") as f:
        out += [Row(data / "pbc-wbc" / r["image"], "pbc", r["split"], r["image"])
                for r in csv.DictReader(f)]
    with open(splits / "bccd.csv", newline="", encoding="utf-8") as f:
        out += [Row(data / "bccd" / r["image"], "bccd", r["split"], r["image"])
                for r in csv.DictReader(f)]
    images = data / "txl-pbc" / "TXL_PBC" / "images"
    for split in ("train", "val", "test"):
        out += [Row(p, "txl", split, p.relative_to(images).as_posix())
                for p in sorted((images / split).iterdir()) if p.is_file()]
    return out


def digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def trained_on(model_sets: tuple) -> set:
    """The (set, split) pairs a model trained on: the train rows of `model_sets`."""
    return {(s, "train") for s in model_sets}


def copies(rows_: list, digests: list, sources: set) -> dict:
    """For each row index, the other rows of `sources` ((set, split) pairs) byte-identical to it:
    {index: [source rows]}, only for the rows that have one."""
    by_digest = defaultdict(list)
    for i, (r, d) in enumerate(zip(rows_, digests)):
        if (r.set, r.split) in sources:
            by_digest[d].append(i)
    out = {}
    for i, d in enumerate(digests):
        found = [rows_[j] for j in by_digest.get(d, ()) if j != i]
        if found:
            out[i] = found
    return out


def thumbnail(path: Path):
    """(height, width, the image's `THUMB` x `THUMB` grey thumbnail as float32), or None when the
    file cannot be read."""
    grey = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if grey is None:
        return None
    small = cv2.resize(grey, (THUMB, THUMB), interpolation=cv2.INTER_AREA)
    return grey.shape[0], grey.shape[1], small.astype(np.float32).ravel()


def nearest_other(query: list, pool: list) -> list:
    """For each query (shape, thumbnail, digest), the smallest mean absolute difference to a
    pool thumbnail of the same shape whose file is not byte-identical to the query's (its byte
    copies are counted by `copies`); inf when no such pool image has its shape."""
    by_shape = defaultdict(list)
    for shape, vec, dig in pool:
        by_shape[shape].append((vec, dig))
    stacked = {s: (np.stack([v for v, _ in items]), np.array([d for _, d in items]))
               for s, items in by_shape.items()}
    out = []
    for shape, vec, dig in query:
        vecs, digs = stacked.get(shape, (None, None))
        if vecs is None:
            out.append(float("inf"))
            continue
        d = np.abs(vecs - vec).mean(axis=1)[digs != dig]
        out.append(float(d.min()) if d.size else float("inf"))
    return out


def source_text(found: list) -> str:
    """"12 BCCD train, 26 PBC train": how many images copy rows of each set and split, from
    each image's copies (a list of `Row` lists)."""
    c = Counter(key for rows_ in found for key in {(r.set, r.split) for r in rows_})
    return ", ".join(f"{n} {TITLES[s]} {sp}" for (s, sp), n in sorted(c.items()))


def report(rows_: list, digests: list) -> tuple:
    """Print the copy table; -> the segmenter's copies, as `copies` gives them."""
    seg = copies(rows_, digests, trained_on(SEGMENTER_TRAIN))
    cls = copies(rows_, digests, trained_on(CLASSIFIER_TRAIN))
    print("Val and test rows byte-identical to an image a default model was trained on (an image "
          "can copy rows of two sets):")
    print(f"  {'set':<22} {'split':<5} {'images':>6} {'segmenter':>9} {'classifier':>10} "
          f"{'either':>6}  copies of")
    for s in SETS:
        for split in ("val", "test"):
            idx = [i for i, r in enumerate(rows_) if r.set == s and r.split == split]
            if not idx:
                continue
            either = [i for i in idx if i in seg or i in cls]
            found = [seg.get(i, []) + cls.get(i, []) for i in either]
            print(f"  {TITLES[s]:<22} {split:<5} {len(idx):>6} {sum(i in seg for i in idx):>9} "
                  f"{sum(i in cls for i in idx):>10} {len(either):>6}  "
                  f"{source_text(found) or '-'}")
    return seg


def near_report(rows_: list, digests: list) -> None:
    """Print, per set and split, the val and test images with a near copy among the training
    images of either model that is not a byte copy, and the smallest distance left."""
    train = trained_on(SEGMENTER_TRAIN) | trained_on(CLASSIFIER_TRAIN)
    thumbs = [thumbnail(r.path) for r in rows_]
    keyed = [None if t is None else ((t[0], t[1]), t[2], d) for t, d in zip(thumbs, digests)]
    pool = [k for r, k in zip(rows_, keyed) if k is not None and (r.set, r.split) in train]
    print(f"\nNear copies (32x32 grey thumbnails of the same size, mean difference under {NEAR} "
          "grey levels, byte copies left out) among the training images:")
    for s in SETS:
        for split in ("val", "test"):
            query = [k for r, k in zip(rows_, keyed)
                     if r.set == s and r.split == split and k is not None]
            if not query:
                continue
            d = nearest_other(query, pool)
            finite = [x for x in d if np.isfinite(x)]
            least = f"{min(finite):.2f}" if finite else "no image of the same size"
            print(f"  {TITLES[s]:<22} {split:<5} {sum(x < NEAR for x in d):>4} near copies; "
                  f"smallest other distance {least}")
    unread = sum(k is None for k in keyed)
    if unread:
        print(f"  ({unread} files could not be decoded and were left out)")


def write_unseen(path: Path, rows_: list, seg: dict) -> int:
    """Write the TXL-PBC rows that copy no image the segmenter trained on as a split file (cell
    finding is the segmenter's alone: the classifier only names the cells found); -> how many
    test rows it holds."""
    kept = [r for i, r in enumerate(rows_) if r.set == "txl" and i not in seg]
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["image", "split"])
        w.writerows([r.name, r.split] for r in kept)
    return sum(r.split == "test" for r in kept)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_option(ap, ROOT)
    ap.add_argument("--write-unseen", type=Path, default=None, metavar="CSV",
                    help="write the TXL-PBC rows that copy no image the segmenter trained on as "
                         "a split file")
    ap.add_argument("--no-near", action="store_true", help="skip the near-copy pass (faster)")
    args = ap.parse_args(argv)
    if not (args.data / "splits").is_dir():
        print(f"no data at {args.data} (set WBC_BATCH_DATA or --data)", file=sys.stderr)
        return 2
    rows_ = rows(args.data)
    digests = [digest(r.path) for r in rows_]
    seg = report(rows_, digests)
    if not args.no_near:
        near_report(rows_, digests)
    if args.write_unseen is not None:
        n = write_unseen(args.write_unseen, rows_, seg)
        print(f"\n{args.write_unseen}: the TXL-PBC rows that copy no image the segmenter "
              f"trained on ({n} test)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
