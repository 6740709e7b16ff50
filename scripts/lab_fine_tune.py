#!/usr/bin/env python3
"""How many of its own labelled cells does a lab need? Fine-tunes a bundle's classifier on k
labelled images of one microscope, standing in for a lab's, and runs the whole pipeline on that
microscope's val split.

    python scripts/lab_fine_tune.py --bundle BUNDLE [--source wbc1|wbc2|bccd] [--sizes 25 50 100]
        [--work runs/lab-wbc1] [--data ../shared/data] [--splits DIR] [--split val] [-- TRAIN OPTIONS]

BUNDLE should be trained without SOURCE, so that the microscope is new to it:
`scripts/leave_one_microscope_out.sh wbc1` leaves one in runs/leave-out-wbc1/bundle. For each k,
a stratified, seeded choice of k SOURCE train images is linked (copied where links are not
possible) into WORK/k<k>/lab/, and

    wbc-batch train classifier --no-public --init BUNDLE LAB OPTIONS -o WORK/k<k>/bundle

fine-tunes a copy of the bundle, as a lab without the public datasets would. For the single-cell
sources (wbc1, wbc2) the images lie in the `--lab-classes` layout, WORK/k<k>/lab/<class>/; for
BCCD (`--source bccd`), whose cells are boxes on whole fields, the fields lie in
WORK/k<k>/lab/fields/ with a box truth WORK/k<k>/lab/truth.csv (image,x,y,width,height,class),
given as `--lab-truth`: the train fields whose WBC boxes all carry the one subtype BCCD's
labels.csv gives, so that each box has its class. `wbc-batch evaluate` then runs it on SOURCE's
split (that of DATA/splits, also with --splits, which only narrows the train images chosen from).
The row k = 0 is BUNDLE itself; without --sizes, k runs over 25, 50, 100 and every
labelled train image. Prints a table (training time, accuracy, macro-F1, ECE, cells flagged
unusual_stain) and writes it to WORK/lab_fine_tune.csv.
Train rows are the only rows trained on; use the val split for development, test for the final
measurement only.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from wbc_batch.train.folders import add_data_option  # noqa: E402
sys.path.insert(0, str(ROOT / "scripts"))

from perturbation_check import dataset_sets, read_summary  # noqa: E402
from wbc_batch import CLASSES  # noqa: E402
from wbc_batch.atomic import atomic_write_text  # noqa: E402
from wbc_batch.train import datasets as ds  # noqa: E402

SOURCES = {"wbc1": "1", "wbc2": "2"}  # single-cell sources with class labels: WBC Image Datasets 1, 2
FIELD_SOURCES = ("bccd",)              # whole fields with labelled boxes, given as --lab-truth


class LabField(NamedTuple):
    """A field whose WBC boxes (x, y, w, h) all have the class `cls`."""

    image: Path
    boxes: list
    cls: str


def labelled_records(data: Path, source: str, splits: Path | None = None) -> list:
    """SOURCE's train images that have a class (train rows of the split files in `splits`, by
    default DATA/splits): ClassRecords, or LabFields for BCCD."""
    if source in FIELD_SOURCES:
        return [LabField(r.image, r.boxes, r.classes[0]) for r in ds.bccd(data, "train", splits)
                if r.boxes and r.classes[0] in CLASSES]
    return [r for r in ds.wbc_image_dataset(data, "train", SOURCES[source], splits) if r.cls in CLASSES]


def choose_cells(records: list, k: int, seed: int = 0) -> list:
    """k of the labelled records, each class in its share of the whole (largest remainders),
    the same ones for the same seed. Each class's cells are the first of one seeded shuffle, so
    a larger k mostly adds cells to a smaller k's choice."""
    if k >= len(records):
        return list(records)
    by_class = {c: [r for r in records if r.cls == c] for c in CLASSES}
    rng = random.Random(seed)
    for rs in by_class.values():
        rng.shuffle(rs)
    quota = {c: k * len(rs) / len(records) for c, rs in by_class.items()}
    take = {c: int(q) for c, q in quota.items()}
    for c in sorted(quota, key=lambda c: (take[c] - quota[c], CLASSES.index(c)))[:k - sum(take.values())]:
        take[c] += 1
    return [r for c in CLASSES for r in by_class[c][:take[c]]]


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        dst.symlink_to(Path(src).resolve())
    except OSError:
        shutil.copy2(src, dst)


def write_lab_folder(records: list, folder: Path) -> list:
    """The records laid out as a lab would give them; -> the `train classifier` options naming
    them. ClassRecords: `--lab-classes FOLDER`, FOLDER/<class>/<nnnn>-<name>. LabFields:
    `--lab-truth FOLDER/fields FOLDER/truth.csv`, FOLDER/fields/<nnnn>-<name> with one CSV row per
    box. The images are links to the source images."""
    if not all(isinstance(r, LabField) for r in records):
        for i, r in enumerate(records):
            _link(r.image, folder / r.cls / f"{i:04d}-{Path(r.image).name}")
        return ["--lab-classes", str(folder)]
    rows = [["image", "x", "y", "width", "height", "class"]]
    for i, r in enumerate(records):
        name = f"{i:04d}-{Path(r.image).name}"
        _link(r.image, folder / "fields" / name)
        rows += [[name, *map(str, box), r.cls] for box in r.boxes]
    atomic_write_text(folder / "truth.csv", "".join(",".join(row) + "\n" for row in rows))
    return ["--lab-truth", str(folder / "fields"), str(folder / "truth.csv")]


def fine_tune(bundle: Path, lab: list, out: Path, train_options: list) -> float:
    """Fine-tune a copy of `bundle`'s classifier on the lab's images alone (`lab`: the options
    naming them, from `write_lab_folder`); returns the wall time in s."""
    out.mkdir(parents=True, exist_ok=True)
    for name in ("segmenter.safetensors", "bundle.json"):
        shutil.copy2(bundle / name, out / name)
    cmd = ["wbc-batch", "train", "classifier", "--no-public", "--init", str(bundle),
           *lab, "-o", str(out), *train_options]
    print(" ".join(cmd), flush=True)
    t0 = time.time()
    with open(out / "train.log", "w") as log:
        subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=True)
    return time.time() - t0


def evaluate(bundle: Path, source: str, data: Path, split: str, out: Path) -> dict:
    """The pipeline's class scores for `bundle` on the source's split, and its unusual_stain count."""
    root, _, eval_args = dataset_sets(data, split, 1)[source]
    cmd = ["wbc-batch", "evaluate", str(root), *eval_args, "-o", str(out), "--overwrite",
           "--no-overlays", "--model", str(bundle)]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, stdout=subprocess.DEVNULL, check=True)
    summary = read_summary(out / "accuracy.csv")
    counts = json.loads((out / "run.json").read_text())["counts"]
    return {"cells": counts["cells"], "accuracy": summary[("classes", "accuracy")],
            "macro_f1": summary[("classes", "macro_f1")], "ece": summary[("classes", "ece")],
            "unusual_stain": counts.get("unusual_stain", 0)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, required=True, help="bundle trained without SOURCE")
    ap.add_argument("--source", default="wbc1", choices=[*SOURCES, *FIELD_SOURCES])
    ap.add_argument("--sizes", type=int, nargs="+", default=None,
                    help="numbers of labelled train images (default: 25 50 100 and all of them)")
    ap.add_argument("--work", type=Path, default=None, help="default: runs/lab-SOURCE")
    add_data_option(ap, ROOT)
    ap.add_argument("--split", default="val", help="split to evaluate on (val; test only at the end)")
    ap.add_argument("--seed", type=int, default=0, help="which cells are chosen")
    ap.add_argument("--splits", type=Path, default=None, metavar="DIR",
                    help="choose the train images from DIR's split files (e.g. those of "
                         "`split_overlap_check.py --write-clean DIR`, without the train images "
                         "that val or test images copy); the evaluation keeps DATA/splits")
    ap.add_argument("train_options", nargs=argparse.REMAINDER,
                    help="after --: passed to wbc-batch train classifier (e.g. --epochs 30)")
    args = ap.parse_args(argv)
    train_options = [a for a in args.train_options if a != "--"]
    work = args.work or ROOT / "runs" / f"lab-{args.source}"
    if not (args.data / "splits").is_dir():
        print(f"no data at {args.data} (use --data)", file=sys.stderr)
        return 2
    records = labelled_records(args.data, args.source, args.splits)
    sizes = args.sizes or sorted({min(k, len(records)) for k in (25, 50, 100, len(records))})
    rows = [{"k": 0, "train_s": 0.0, **evaluate(args.bundle, args.source, args.data, args.split,
                                                 work / "k0" / "eval")}]
    for k in sizes:
        run = work / f"k{k}"
        if run.exists():
            shutil.rmtree(run)
        chosen = choose_cells(records, k, args.seed)
        lab = write_lab_folder(chosen, run / "lab")
        seconds = fine_tune(args.bundle, lab, run / "bundle", train_options)
        rows.append({"k": len(chosen), "train_s": seconds,
                     **evaluate(run / "bundle", args.source, args.data, args.split, run / "eval")})
    _report(rows, work, args)
    return 0


def _report(rows: list, work: Path, args) -> None:
    head = ["k", "train_s", "cells", "accuracy", "macro_f1", "ece", "unusual_stain"]
    lines = [",".join(head)] + [",".join(f"{r[h]:.4f}" if isinstance(r[h], float) else str(r[h])
                                         for h in head) for r in rows]
    atomic_write_text(work / "lab_fine_tune.csv", "\n".join(lines) + "\n")
    print(f"\n{args.source} {args.split}, whole pipeline; classifier of {args.bundle} fine-tuned on k "
          f"labelled {args.source} train {'fields' if args.source in FIELD_SOURCES else 'cells'}")
    print("| labelled images | training (s) | accuracy | macro-F1 | ECE | unusual_stain |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['k']} | {r['train_s']:.0f} | {100 * r['accuracy']:.2f} % | {r['macro_f1']:.3f} "
              f"| {r['ece']:.3f} | {r['unusual_stain']} / {r['cells']} |")


if __name__ == "__main__":
    sys.exit(main())
