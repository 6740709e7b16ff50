#!/usr/bin/env python3
"""How many of its own labelled cells does a lab need? Fine-tunes a bundle's classifier on k
labelled cells of one microscope, standing in for a lab's, and runs the whole pipeline on that
microscope's val split.

    python scripts/lab_fine_tune.py --bundle BUNDLE [--source wbc1] [--sizes 25 50 100 176]
        [--work runs/lab-wbc1] [--data ../shared/data] [--split val] [-- TRAIN OPTIONS]

BUNDLE should be trained without SOURCE, so that the microscope is new to it:
`scripts/leave_one_microscope_out.sh wbc1` leaves one in runs/leave-out-wbc1/bundle. For each k,
a stratified, seeded choice of k SOURCE train images is linked (copied where links are not
possible) into WORK/k<k>/lab/<class>/, the `--lab-classes` layout, and

    wbc-batch train classifier --no-public --init BUNDLE --lab-classes WORK/k<k>/lab -o WORK/k<k>/bundle

fine-tunes a copy of the bundle, as a lab without the public datasets would. `wbc-batch evaluate`
then runs it on SOURCE's split. The row k = 0 is BUNDLE itself. Prints a table (training time,
accuracy, macro-F1, ECE, cells flagged unusual_stain) and writes it to WORK/lab_fine_tune.csv.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from wbc_batch.train.folders import add_data_option  # noqa: E402
sys.path.insert(0, str(ROOT / "scripts"))

from perturbation_check import dataset_sets, read_summary  # noqa: E402
from wbc_batch import CLASSES  # noqa: E402
from wbc_batch.atomic import atomic_write_text  # noqa: E402
from wbc_batch.train import datasets as ds  # noqa: E402

SOURCES = {"wbc1": "1", "wbc2": "2"}  # single-cell sources with class labels: WBC Image Datasets 1, 2


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


def write_lab_folder(records: list, folder: Path) -> Path:
    """The `--lab-classes` layout: FOLDER/<class>/<nnnn>-<name>, links to the source images."""
    for i, r in enumerate(records):
        dst = folder / r.cls / f"{i:04d}-{Path(r.image).name}"
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            dst.symlink_to(Path(r.image).resolve())
        except OSError:
            shutil.copy2(r.image, dst)
    return folder


def fine_tune(bundle: Path, lab: Path, out: Path, train_options: list) -> float:
    """Fine-tune a copy of `bundle`'s classifier on `lab` alone; returns the wall time in s."""
    out.mkdir(parents=True, exist_ok=True)
    for name in ("segmenter.safetensors", "bundle.json"):
        shutil.copy2(bundle / name, out / name)
    cmd = ["wbc-batch", "train", "classifier", "--no-public", "--init", str(bundle),
           "--lab-classes", str(lab), "-o", str(out), *train_options]
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
    ap.add_argument("--source", default="wbc1", choices=list(SOURCES))
    ap.add_argument("--sizes", type=int, nargs="+", default=[25, 50, 100, 176])
    ap.add_argument("--work", type=Path, default=None, help="default: runs/lab-SOURCE")
    add_data_option(ap, ROOT)
    ap.add_argument("--split", default="val", help="split to evaluate on (val; test only at the end)")
    ap.add_argument("--seed", type=int, default=0, help="which cells are chosen")
    ap.add_argument("train_options", nargs=argparse.REMAINDER,
                    help="after --: passed to wbc-batch train classifier (e.g. --epochs 30)")
    args = ap.parse_args(argv)
    train_options = [a for a in args.train_options if a != "--"]
    work = args.work or ROOT / "runs" / f"lab-{args.source}"
    if not (args.data / "splits").is_dir():
        print(f"no data at {args.data} (use --data)", file=sys.stderr)
        return 2
    records = [r for r in ds.wbc_image_dataset(args.data, "train", SOURCES[args.source]) if r.cls in CLASSES]
    rows = [{"k": 0, "train_s": 0.0, **evaluate(args.bundle, args.source, args.data, args.split,
                                                 work / "k0" / "eval")}]
    for k in args.sizes:
        run = work / f"k{k}"
        if run.exists():
            shutil.rmtree(run)
        cells = choose_cells(records, k, args.seed)
        lab = write_lab_folder(cells, run / "lab")
        seconds = fine_tune(args.bundle, lab, run / "bundle", train_options)
        rows.append({"k": len(cells), "train_s": seconds,
                     **evaluate(run / "bundle", args.source, args.data, args.split, run / "eval")})
    _report(rows, work, args)
    return 0


def _report(rows: list, work: Path, args) -> None:
    head = ["k", "train_s", "cells", "accuracy", "macro_f1", "ece", "unusual_stain"]
    lines = [",".join(head)] + [",".join(f"{r[h]:.4f}" if isinstance(r[h], float) else str(r[h])
                                         for h in head) for r in rows]
    atomic_write_text(work / "lab_fine_tune.csv", "\n".join(lines) + "\n")
    print(f"\n{args.source} {args.split}, whole pipeline; classifier of {args.bundle} fine-tuned on k "
          f"labelled {args.source} train cells")
    print("| labelled cells | training (s) | accuracy | macro-F1 | ECE | unusual_stain |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['k']} | {r['train_s']:.0f} | {100 * r['accuracy']:.2f} % | {r['macro_f1']:.3f} "
              f"| {r['ece']:.3f} | {r['unusual_stain']} / {r['cells']} |")


if __name__ == "__main__":
    sys.exit(main())
