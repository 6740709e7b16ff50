#!/usr/bin/env python3
"""Which val and test images are copies of images the default models learned from?

    python scripts/split_overlap_check.py [--data ../shared/data] [--write-unseen DIR]
                                          [--write-clean DIR] [--no-near]

The public sets share images. TXL-PBC was put together from Raabin, PBC, BCD and BCCD images,
and its authors removed only the images identical to a BCCD or PBC *test* image, so a TXL-PBC
val or test image can be a BCCD or PBC train image, and a TXL-PBC train image a BCCD val one.
BCCD's fields overlap: some test fields show, shifted, the field of a train image. Within PBC
and the WBC Image Dataset, a few cells are stored twice, under two names in two splits. Each
split is clean on its own terms; across the sets the default models read, it is not.

A copy is either byte-identical (SHA-256 of the file) or a near copy: the same picture shifted,
saved again, or refocused, found among the images of the same size. Each image is turned grey,
scaled to a short side of `SHORT` px, and high-pass filtered (minus a Gaussian blur of `SIGMA`
px), so that only its fine detail is compared, not the round shape every single-cell image has;
the central half of one is then slid over the other (normalised cross-correlation). Two images
scoring `NEAR` or more are counted as a copy; scores from `LOOK` to `NEAR` are listed for a
person to look at. A copy resized, rotated, flipped or cropped to another size is not found.
Each image is compared with its `CANDIDATES` most alike images of the same size (correlation of
32x32 grey thumbnails) only.

The script prints two tables: for the val and test rows of each set, how many copy an image a
default model was trained on (`SEGMENTER_TRAIN`, `CLASSIFIER_TRAIN`: the train rows `wbc-batch
train` reads with the default recipe); and for the test rows, how many copy a val image that
chose a model's checkpoint (`SEGMENTER_CHOSEN_ON`, `CLASSIFIER_CHOSEN_ON`). Each says which set
and split the copies come from. A val image copied from a training image scores a checkpoint on
a cell the model learned; a test image so copied is measured in-sample.

`--write-unseen DIR` writes the split files again without those copies, for
`SPLITS=DIR scripts/evaluate_test_splits.sh`: DIR/wbc-image-dataset.csv, pbc-wbc.csv and
bccd.csv (the rows of the originals, less the val and test rows that copy an image a model the
set measures learned from or, for test rows, was chosen on; `MEASURED_BY`), and txl-pbc.csv
(`image,split`, relative to TXL-PBC's `images` folder). TXL-PBC measures cell finding, which is
the segmenter's alone, so its copies of PBC crops, which only the classifier learned from or was
chosen on, stay in; PBC measures classification alone, so its copies of TXL-PBC train images
stay in.

`--write-clean DIR` writes split files for training instead, for `wbc-batch train ... --splits
DIR` (`scripts/train_default_models.sh` with SPLITS=DIR): every train row that a val or test row
copies is left out, and so is every val row that chose a checkpoint (`SEGMENTER_CHOSEN_ON`,
`CLASSIFIER_CHOSEN_ON`) and that a test row copies; test rows all stay. Models trained on them
learned from no copy of a val or test image and were chosen on no copy of a test image, so far
as this script finds copies.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import NamedTuple, Optional

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from wbc_batch.atomic import atomic_path  # noqa: E402
from wbc_batch.bundle import sha256_file as digest  # noqa: E402
from wbc_batch.train.folders import add_data_option  # noqa: E402

SETS = ("wbc1", "wbc2", "pbc", "bccd", "txl")
TITLES = {"wbc1": "WBC Image Dataset 1", "wbc2": "WBC Image Dataset 2", "pbc": "PBC",
          "bccd": "BCCD", "txl": "TXL-PBC"}
# what each default model learns from (wbc_batch/train/segmenter.py `_gather`, classifier.py's
# crop jobs: the train rows of these sets) and the sets whose val rows choose its checkpoint
SEGMENTER_TRAIN = ("wbc1", "wbc2", "bccd", "txl")
SEGMENTER_CHOSEN_ON = ("wbc1", "wbc2", "bccd")
CLASSIFIER_TRAIN = ("wbc1", "wbc2", "bccd", "pbc")
CLASSIFIER_CHOSEN_ON = ("wbc1", "wbc2", "bccd", "pbc")
# the models whose output each set's evaluation measures (scripts/evaluate_test_splits.sh)
MEASURED_BY = {"wbc1": ("segmenter", "classifier"), "wbc2": ("segmenter", "classifier"),
               "pbc": ("classifier",), "bccd": ("segmenter", "classifier"),
               "txl": ("segmenter",)}
NEAR = 0.75         # a near copy: `similarity` at least this
LOOK = 0.6          # listed for a person to look at, from this up to NEAR
SHORT = 128         # px, the short side images are compared at
SIGMA = 4.0         # px at SHORT, the blur taken away (high pass)
THUMB = 32          # px, the thumbnails that pick the candidates
CANDIDATES = 20     # most alike images of the same size compared in full, where there are
ALL_PAIRS = 200_000  # more query-pool pairs of one size than this
BYTE = 2.0          # the score of a byte copy, above every similarity


class Row(NamedTuple):
    """One image of a public set: its path, set (`SETS`), split, and name in its split file."""
    path: Path
    set: str
    split: str
    name: str


class Looks(NamedTuple):
    """What near copies are found by: the image's size, its normalised thumbnail, its high-pass
    image at `SHORT` px."""
    size: tuple
    thumb: np.ndarray
    band: np.ndarray


class Model(NamedTuple):
    """The (set, split) pairs a default model learned from and was chosen on."""
    name: str
    trained: frozenset
    chosen: frozenset


MODELS = (
    Model("segmenter", frozenset((s, "train") for s in SEGMENTER_TRAIN),
          frozenset((s, "val") for s in SEGMENTER_CHOSEN_ON)),
    Model("classifier", frozenset((s, "train") for s in CLASSIFIER_TRAIN),
          frozenset((s, "val") for s in CLASSIFIER_CHOSEN_ON)),
)


def rows(data: Path) -> list:
    """Every image of the five sets with its split: the split files' rows, and TXL-PBC's own
    `images/{train,val,test}` folders (its `name` is relative to `images`)."""
    out = []
    splits = data / "splits"
    for r in _csv_rows(splits / "wbc-image-dataset.csv"):
        out.append(Row(data / "wbc-image-dataset" / r["image"], "wbc" + r["dataset"],
                       r["split"], r["image"]))
    out += [Row(data / "pbc-wbc" / r["image"], "pbc", r["split"], r["image"])
            for r in _csv_rows(splits / "pbc-wbc.csv")]
    out += [Row(data / "bccd" / r["image"], "bccd", r["split"], r["image"])
            for r in _csv_rows(splits / "bccd.csv")]
    images = data / "txl-pbc" / "TXL_PBC" / "images"
    for split in ("train", "val", "test"):
        out += [Row(p, "txl", split, p.relative_to(images).as_posix())
                for p in sorted((images / split).iterdir()) if p.is_file()]
    return out


def _csv_rows(path: Path) -> list:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def looks(path: Path) -> Optional[Looks]:
    """`Looks` of the image at `path`, or None when it cannot be decoded."""
    grey = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    return None if grey is None else looks_of(grey)


def looks_of(image: np.ndarray) -> Looks:
    """`Looks` of a grey (or BGR) uint8 image."""
    grey = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    thumb = cv2.resize(grey, (THUMB, THUMB), interpolation=cv2.INTER_AREA).astype(np.float32).ravel()
    thumb -= thumb.mean()
    thumb /= np.linalg.norm(thumb) + 1e-6
    h, w = grey.shape
    s = SHORT / min(h, w)
    small = cv2.resize(grey, (max(1, round(w * s)), max(1, round(h * s))),
                       interpolation=cv2.INTER_AREA).astype(np.float32)
    return Looks((h, w), thumb, small - cv2.GaussianBlur(small, (0, 0), SIGMA))


def similarity(a: Looks, b: Looks) -> float:
    """How alike two images of the same size are (1 for the same picture): the central half of
    `a`'s high-pass image is slid over `b`'s to find the shift that matches best (up to a
    quarter of the image), and the normalised cross-correlation of the whole area the two then
    share is the score. Matching the centre alone would score two different round cells of one
    size alike; the area around them tells them apart."""
    h, w = a.band.shape
    y0, x0 = h // 4, w // 4
    fit = cv2.matchTemplate(b.band, a.band[y0: h - y0, x0: w - x0], cv2.TM_CCOEFF_NORMED)
    _, _, _, (x, y) = cv2.minMaxLoc(fit)
    dx, dy = x - x0, y - y0     # b shows a's content moved by (dx, dy)
    hh, ww = h - abs(dy), w - abs(dx)
    pa = a.band[max(0, -dy): max(0, -dy) + hh, max(0, -dx): max(0, -dx) + ww].ravel()
    pb = b.band[max(0, dy): max(0, dy) + hh, max(0, dx): max(0, dx) + ww].ravel()
    pa, pb = pa - pa.mean(), pb - pb.mean()
    return float(pa @ pb / (np.sqrt((pa @ pa) * (pb @ pb)) + 1e-9))


def matches(rows_: list, digests: list, features: Optional[list], query: list,
            pool: list) -> dict:
    """For each row index in `query`, the rows of `pool` it copies: {index: [(pool index,
    score)]}, with score `BYTE` for a byte copy and the `similarity` for the others scoring `LOOK`
    or more (near copies when `features` is given; None compares bytes only). A row never
    copies itself."""
    out = defaultdict(list)
    by_digest = defaultdict(list)
    for j in pool:
        by_digest[digests[j]].append(j)
    for i in query:
        out[i] += [(j, BYTE) for j in by_digest.get(digests[i], ()) if j != i]
    if features is not None:
        for i, j, score in _near(digests, features, query, pool):
            out[i].append((j, score))
    return {i: found for i, found in out.items() if found}


def _near(digests: list, features: list, query: list, pool: list):
    """(query index, pool index, similarity) of the not byte-identical pairs of the same size
    scoring `LOOK` or more. Where a size has more than `ALL_PAIRS` query-pool pairs, each query
    is compared with its `CANDIDATES` most alike pool images only (thumbnail correlation, which
    a shift lowers: the single-cell crops, centred on their cell, are the ones so many)."""
    by_size = defaultdict(list)
    for j in pool:
        if features[j] is not None:
            by_size[features[j].size].append(j)
    asked = Counter(features[i].size for i in query if features[i] is not None)
    thumbs = {size: np.stack([features[j].thumb for j in idx]) for size, idx in by_size.items()}
    for i in query:
        f = features[i]
        if f is None or f.size not in by_size:
            continue
        idx = by_size[f.size]
        few = asked[f.size] * len(idx) > ALL_PAIRS
        if few:
            idx = [idx[k] for k in np.argsort(-(thumbs[f.size] @ f.thumb))]
        picked = [j for j in idx if digests[j] != digests[i]]
        for j in picked[:CANDIDATES] if few else picked:
            score = similarity(f, features[j])
            if score >= LOOK:
                yield i, j, score


def copies_of(found: list) -> list:
    """The pool rows among `found` ((index, score) pairs) that count as copies."""
    return [j for j, score in found if score >= NEAR]


def source_text(rows_: list, copied: list) -> str:
    """"12 BCCD train, 26 PBC train": how many images copy rows of each set and split, from
    each image's copied row indices (a list of lists)."""
    c = Counter(key for idx in copied for key in {(rows_[j].set, rows_[j].split) for j in idx})
    return ", ".join(f"{n} {TITLES[s]} {sp}" for (s, sp), n in sorted(c.items()))


def copy_table(rows_: list, found: dict, splits: tuple, sources: dict) -> None:
    """Print, for the `splits` rows of each set, how many copy a row (by bytes, or near) of each
    model's `sources` ({model name: (set, split) pairs}) and of which set and split (an image can
    copy rows of two sets)."""
    names = list(sources)
    print(f"  {'set':<22} {'split':<5} {'images':>6} {'byte':>5} {'near':>5} "
          + " ".join(f"{n:>10}" for n in names) + f" {'any':>5}  copies of")
    for s in SETS:
        for split in splits:
            idx = [i for i, r in enumerate(rows_) if r.set == s and r.split == split]
            if not idx:
                continue
            copied = {i: [j for j in copies_of(found.get(i, []))
                          if any((rows_[j].set, rows_[j].split) in src for src in sources.values())]
                      for i in idx}
            copied = {i: js for i, js in copied.items() if js}
            byte = sum(any(score == BYTE and j in copied[i] for j, score in found[i]) for i in copied)
            per_model = [sum(any((rows_[j].set, rows_[j].split) in sources[n] for j in js)
                             for js in copied.values()) for n in names]
            print(f"  {TITLES[s]:<22} {split:<5} {len(idx):>6} {byte:>5} {len(copied) - byte:>5} "
                  + " ".join(f"{k:>10}" for k in per_model)
                  + f" {len(copied):>5}  {source_text(rows_, list(copied.values())) or '-'}")


def find_all(rows_: list, digests: list, features: Optional[list]) -> tuple:
    """-> (val and test rows against every model's training rows, test rows against every
    model's chosen-on val rows), each as `matches` gives it."""
    trained = set().union(*(m.trained for m in MODELS))
    chosen = set().union(*(m.chosen for m in MODELS))
    evaluated = [i for i, r in enumerate(rows_) if r.split in ("val", "test")]
    tests = [i for i in evaluated if rows_[i].split == "test"]
    pool_t = [j for j, r in enumerate(rows_) if (r.set, r.split) in trained]
    pool_c = [j for j, r in enumerate(rows_) if (r.set, r.split) in chosen]
    return (matches(rows_, digests, features, evaluated, pool_t),
            matches(rows_, digests, features, tests, pool_c))


def report(rows_: list, vs_trained: dict, vs_chosen: dict, near: bool) -> None:
    """Print both copy tables and the pairs to look at."""
    how = (f"byte copies, and near copies scoring {NEAR} or more" if near else
           "byte copies only (--no-near)")
    print(f"Val and test rows that copy an image a default model was trained on ({how}):")
    copy_table(rows_, vs_trained, ("val", "test"), {m.name: m.trained for m in MODELS})
    print("\nTest rows that copy a val image that chose a default model's checkpoint:")
    copy_table(rows_, vs_chosen, ("test",), {m.name: m.chosen for m in MODELS})
    if not near:
        return
    print(f"\nPairs scoring {LOOK} to {NEAR}, not counted as copies (look at them):")
    pairs = sorted({(score, i, j) for found in (vs_trained, vs_chosen) for i, js in found.items()
                    for j, score in js if LOOK <= score < NEAR}, reverse=True)
    for score, i, j in pairs:
        a, b = rows_[i], rows_[j]
        print(f"  {score:.3f}  {TITLES[a.set]} {a.split} {a.name}  ~  "
              f"{TITLES[b.set]} {b.split} {b.name}")
    if not pairs:
        print("  none")


def unseen(rows_: list, vs_trained: dict, vs_chosen: dict) -> set:
    """The val and test row indices to leave out of an evaluation of their set: copies of an
    image that a model the set measures (`MEASURED_BY`) learned from, or, for test rows, was
    chosen on."""
    out = set()
    for i, r in enumerate(rows_):
        models = [m for m in MODELS if m.name in MEASURED_BY[r.set]]
        sources = set().union(*(m.trained for m in models))
        if r.split == "test":
            sources |= set().union(*(m.chosen for m in models))
        for found in (vs_trained, vs_chosen):
            if any((rows_[j].set, rows_[j].split) in sources for j in copies_of(found.get(i, []))):
                out.add(i)
    return out


def clean(rows_: list, vs_trained: dict, vs_chosen: dict) -> set:
    """The row indices to leave out of training and checkpoint choice: the train rows that a
    val or test row copies, and the chosen-on val rows that a test row copies."""
    return {j for found in (vs_trained, vs_chosen) for js in found.values()
            for j in copies_of(js)}


def write_without(folder: Path, data: Path, rows_: list, left_out: set) -> Counter:
    """Write the split files without the rows `left_out` into `folder` (see the module's
    docstring); -> how many rows were left out, per (set, split)."""
    folder.mkdir(parents=True, exist_ok=True)
    gone = {(rows_[i].set, rows_[i].name) for i in left_out}
    keyed = {"wbc-image-dataset.csv": lambda r: ("wbc" + r["dataset"], r["image"]),
             "pbc-wbc.csv": lambda r: ("pbc", r["image"]),
             "bccd.csv": lambda r: ("bccd", r["image"])}
    for name, key in keyed.items():
        original = _csv_rows(data / "splits" / name)
        _write_csv(folder / name, list(original[0]),
                   [r for r in original if key(r) not in gone])
    _write_csv(folder / "txl-pbc.csv", ["image", "split"],
               [{"image": r.name, "split": r.split} for r in rows_
                if r.set == "txl" and ("txl", r.name) not in gone])
    return Counter((rows_[i].set, rows_[i].split) for i in left_out)


def _write_csv(path: Path, header: list, records: list) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=header)
        w.writeheader()
        w.writerows(records)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_option(ap, ROOT)
    ap.add_argument("--write-unseen", type=Path, default=None, metavar="DIR",
                    help="write the split files without the copies into DIR, for "
                         "SPLITS=DIR scripts/evaluate_test_splits.sh")
    ap.add_argument("--write-clean", type=Path, default=None, metavar="DIR",
                    help="write split files for training into DIR: without the train rows (and "
                         "the chosen-on val rows) that a val or test row (a test row) copies, for "
                         "wbc-batch train --splits DIR")
    ap.add_argument("--no-near", action="store_true",
                    help="byte copies only: skip decoding every image (faster)")
    args = ap.parse_args(argv)
    if not (args.data / "splits").is_dir():
        print(f"no data at {args.data} (set WBC_BATCH_DATA or --data)", file=sys.stderr)
        return 2
    rows_ = rows(args.data)
    digests = [digest(r.path) for r in rows_]
    features = None if args.no_near else [looks(r.path) for r in rows_]
    vs_trained, vs_chosen = find_all(rows_, digests, features)
    report(rows_, vs_trained, vs_chosen, near=features is not None)
    if features is not None and any(f is None for f in features):
        print(f"({sum(f is None for f in features)} files could not be decoded: compared by "
              "bytes only)")
    if args.write_unseen is not None:
        left = write_without(args.write_unseen, args.data, rows_,
                             unseen(rows_, vs_trained, vs_chosen))
        print(f"\nSplit files without the copies in {args.write_unseen}; left out: {_counts(left)}")
    if args.write_clean is not None:
        left = write_without(args.write_clean, args.data, rows_, clean(rows_, vs_trained, vs_chosen))
        print(f"\nSplit files for training without the copied images in {args.write_clean}; "
              f"left out: {_counts(left)}")
    return 0


def _counts(left: Counter) -> str:
    return ", ".join(f"{n} {TITLES[s]} {sp}" for (s, sp), n in sorted(left.items())) or "nothing"


if __name__ == "__main__":
    sys.exit(main())
