#!/usr/bin/env python3
"""Can the red cells' size tell a field without WBCs from a field of small WBCs?

    python scripts/red_cell_scale_check.py [--data ../shared/data] [--model DIR] [--sizer FILE]
        [--glass F] [--split train]
    python scripts/red_cell_scale_check.py --wbc-over-rbc [--splits DIR]

In a field without a WBC the analysis's scale estimate has no WBC to measure, settles on red
cells or debris, and the field is enlarged until they pass for WBCs (docs/EXPERIMENTS.md,
"Fields without a WBC"). Every field has red cells, and a WBC is larger than a red cell in
every smear, so the estimate could be refused when it is too small for the red cells beside it.
This script measures whether that can work, on val rows (never test):

1. How far apart the two kinds of field are, even with the red cells' true size: the estimate
   (`find_cells`'s diameter, default settings) over the median size sqrt(w h) of the field's
   truth RBC boxes clear of the border, on BCCD and TXL-PBC val fields (which hold WBCs) and
   on the strips of BCCD val fields clear of every WBC box (`nucleus_contrast_check.py
   --strips`, which hold none); with, for each bar T, the strips and the cells found on them
   under T times the true size, and the fields with WBCs under it.
2. The same with the red cells' size estimated from the image, as the analysis would have to:
   `correlation_length`, the best of the estimators tried (docs/EXPERIMENTS.md), scaled to the
   truth by its median ratio on the BCCD val fields; and how well it follows the truth.
3. With `--sizer FILE`, the same with a learned red-cell sizer's size (`wbc_batch.red_cells`).

`--glass F` paints the right F of every image's width as glass first (each channel's 99th
percentile, with camera noise of sd 2, seeded): a field at the edge of the smear. The
correlation length's scaling (2.) is then taken on the painted BCCD fields, so it absorbs part
of the glass. `--split train` reads the train rows instead (a second look: the sizer learned
from them).

`--generated` prints instead, with `--sizer FILE`, how the sizer reads smears drawn by the sample
generator (`wbc_batch.sample.make_smear`, whose red cells are drawn `RBC_SIZE` of the WBC size
across): truth over learned size at sparse to crowded red cells and at several WBC sizes. No
public image is read.

`--wbc-over-rbc` prints instead, over the sizer's train fields (BCCD and TXL-PBC train, from
the split files in `--splits`, e.g. `split_overlap_check.py --write-clean DIR`'s), the WBC
boxes' median size over the red cells' size per field: its median is what `--red-cell-bar`
takes a field's WBCs to measure (`red_cells.WBC_OVER_RBC`).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from nucleus_contrast_check import wbc_free_strips  # noqa: E402
from wbc_batch.analysis import find_cells  # noqa: E402
from wbc_batch.bundle import load_bundle  # noqa: E402
from wbc_batch.imageio import read_image  # noqa: E402
from wbc_batch.nets import TorchSession  # noqa: E402
from wbc_batch.red_cells import RedCellSizer, red_cell_size  # noqa: E402
from wbc_batch.train import datasets as ds  # noqa: E402
from wbc_batch.train import red_cells as train_red_cells  # noqa: E402
from wbc_batch.train.red_cells import yolo_boxes  # noqa: E402
from wbc_batch.train.folders import add_data_option  # noqa: E402

BARS = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2)


def rbc_size(boxes: list, w: int, h: int) -> float:
    """The field's red cells' size as the sizer's training reads it, from one box on."""
    return train_red_cells.rbc_size(boxes, w, h, min_boxes=1)


def fields(data: Path, name: str, split: str = "val"):
    """(image path, RGB, its red cells' size: `rbc_size` of its RBC boxes) of each field of
    BCCD or TXL-PBC in `split`, one at a time."""
    records = ds.bccd(data, split) if name == "bccd" else ds.txl_pbc(data, split)
    for r in records:
        rgb = read_image(r.image)
        h, w = rgb.shape[:2]
        stem = Path(r.image).stem
        boxes = (ds.read_voc_boxes(data / "bccd" / "BCCD" / "Annotations" / (stem + ".xml"), "RBC")
                 if name == "bccd" else
                 yolo_boxes(data / "txl-pbc" / "TXL_PBC" / "labels" / split / (stem + ".txt"), w, h,
                            "1"))
        yield r.image, rgb, rbc_size(boxes, w, h)


def correlation_length(rgb: np.ndarray, side: int = 256, level: float = 0.5) -> float:
    """A threshold-free size of the field's objects (original pixels): on a copy whose shorter
    side is `side`, the lag at which the radial autocorrelation of the green channel's darkening
    (against its 95th percentile, the glass; less a wide blur, the lighting) falls to `level` of
    its value at lag 1 (lag 0 holds the noise). Red cells fill most of a smear, so it follows
    their size, but a WBC's dark nucleus lengthens it."""
    h, w = rgb.shape[:2]
    s = side / min(h, w)
    small = cv2.resize(rgb, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
    g = small[..., 1].astype(np.float32)
    d = np.clip(1 - (g + 1) / (np.percentile(g, 95) + 1), 0, 1)
    x = d - cv2.GaussianBlur(d, (0, 0), min(d.shape) / 6)
    x -= x.mean()
    hh, ww = x.shape
    cut = (slice(hh - hh // 2, hh + hh // 2), slice(ww - ww // 2, ww + ww // 2))
    ac = _correlation(x)[cut] / np.maximum(_correlation(np.ones_like(x))[cut], 1)  # per pixel pair
    yy, xx = np.mgrid[-(hh // 2):hh // 2, -(ww // 2):ww // 2]
    r = np.round(np.sqrt(yy ** 2 + xx ** 2)).astype(int).ravel()
    prof = np.bincount(r, ac.ravel()) / np.maximum(1, np.bincount(r))
    p = prof[:min(hh, ww) // 2] / prof[1]
    k = int(np.argmax(p[1:] < level)) + 1
    return ((k - 1) + (p[k - 1] - level) / (p[k - 1] - p[k])) / s


def _correlation(a: np.ndarray) -> np.ndarray:
    """The autocorrelation of `a` at every lag (zero lag at the centre), without wrapping round."""
    f = np.fft.rfft2(a, s=(2 * a.shape[0], 2 * a.shape[1]))
    return np.fft.fftshift(np.fft.irfft2(np.abs(f) ** 2))


def painted(rgb: np.ndarray, share: float, rng) -> np.ndarray:
    """`rgb` with the right `share` of its width glass: each channel's 99th percentile, with
    camera noise of sd 2."""
    if share <= 0:
        return rgb
    where = np.zeros(rgb.shape[:2], bool)
    where[:, rgb.shape[1] - int(round(share * rgb.shape[1])):] = True
    return train_red_cells.paint_glass(rgb, where, 2.0, rng)


def measured(rgb, session, bundle, sizer=None) -> tuple:
    """(the analysis's scale estimate, cells found, correlation length, the learned red-cell
    size, nan without `sizer`) of one image."""
    found = find_cells(rgb, session, bundle)
    learned = red_cell_size(rgb, sizer) if sizer is not None else None
    return (found.diameter_px, len(found.boxes), correlation_length(rgb),
            math.nan if learned is None else learned)


def percentiles(v) -> str:
    v = np.asarray(v, float)
    return " ".join(f"p{q}={np.percentile(v, q):.2f}" for q in (0, 5, 10, 25, 50, 75, 90, 100))


def measured_rows(data: Path, session, bundle, sizer=None, split: str = "val",
                  glass: float = 0.0) -> tuple:
    """(table, counts) for the BCCD and TXL-PBC fields of `split` and their strips, each with
    the right `glass` of it painted (`painted`): table is {set: (n, 5) array of (truth RBC
    size, scale estimate, cells found, correlation length, learned size)} without the rows that
    have no truth RBC size; counts is {set: (images, cells found)} over every row."""
    rng = np.random.default_rng(0)

    def measure(rgb) -> tuple:
        return measured(painted(rgb, glass, rng), session, bundle, sizer)

    rows, truth = {}, {}  # truth: each BCCD field's red-cell size, for the strips cut from it
    for name in ("bccd", "txl"):
        rows[name] = []
        for image, rgb, size in fields(data, name, split):
            rows[name].append((size, *measure(rgb)))
            if name == "bccd":  # the strips are cut from BCCD fields only
                truth[Path(image).name] = size
    rows["strips"] = [(truth[name], *measure(rgb)) for name, rgb in wbc_free_strips(data, split)]
    counts = {k: (len(v), int(sum(r[2] for r in v))) for k, v in rows.items()}
    return {k: np.array([r for r in v if not math.isnan(r[0])], float) for k, v in rows.items()}, counts


def print_bars(table: dict, label: str, size) -> None:
    """The scale estimate over `size(rows)` (a red-cell size) per set, and what each bar in
    `BARS` would catch."""
    print(f"\nscale estimate over {label}:")
    for k, t in table.items():
        print(f"  {k}: {percentiles(t[:, 1] / size(t))}")
    print("  bar T: strips (cells found on them) under T x the size | fields with WBCs under it")
    s = table["strips"]
    for bar in BARS:
        under = s[:, 1] < bar * size(s)
        wbc = [int((t[:, 1] < bar * size(t)).sum()) for t in (table["bccd"], table["txl"])]
        print(f"  T={bar:.1f}: strips {int(under.sum())} of {len(s)} ({int(s[under, 2].sum())} of "
              f"{int(s[:, 2].sum())} cells) | BCCD {wbc[0]} of {len(table['bccd'])}, "
              f"TXL-PBC {wbc[1]} of {len(table['txl'])}")


#: `--generated`: the sample generator's red-cell cover, WBC sizes (px) and seeds
DENSITIES = (0.2, 0.45, 0.7)
GENERATED_WBC_PX = (60.0, 90.0, 130.0)
GENERATED_SEEDS = range(4)


def generated_rows(sizer) -> dict:
    """{red-cell cover: [truth over learned size]} over generated 640 x 480 smears, one WBC
    each, the truth being the drawn red cells' size (their radius varies about it by 12 %)."""
    from wbc_batch.sample import RBC_SIZE, make_smear

    out = {}
    for density in DENSITIES:
        out[density] = [
            d * RBC_SIZE / red_cell_size(make_smear(640, 480, cells=1, diameter=d, seed=seed,
                                                    rbc_density=density).rgb, sizer)
            for d in GENERATED_WBC_PX for seed in GENERATED_SEEDS]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_option(ap, ROOT)
    ap.add_argument("--model", type=Path, default=None, help="model bundle (default: the shipped one)")
    ap.add_argument("--sizer", type=Path, default=None, metavar="FILE",
                    help="a red-cell sizer's weights (wbc_batch.red_cells): its sizes are "
                         "measured too")
    ap.add_argument("--glass", type=float, default=0.0, metavar="F",
                    help="paint the right F of each image's width as glass first (default 0)")
    ap.add_argument("--split", choices=("val", "train"), default="val",
                    help="the rows to read (default val; the sizer learned from train)")
    ap.add_argument("--generated", action="store_true",
                    help="with --sizer: print how it reads generated smears, and stop")
    ap.add_argument("--wbc-over-rbc", action="store_true",
                    help="print the WBC over red-cell size ratios of the train fields, and stop")
    ap.add_argument("--splits", type=Path, default=None, metavar="DIR",
                    help="split files for --wbc-over-rbc (default: DATA/splits)")
    args = ap.parse_args(argv)
    if not 0 <= args.glass < 1:
        ap.error("--glass is a share of the width, from 0 up to (not including) 1")
    if (args.generated or args.wbc_over_rbc) and (args.glass or args.split != "val"):
        ap.error("--glass and --split measure the public fields: not with --generated or "
                 "--wbc-over-rbc")
    if args.wbc_over_rbc:
        ratios = train_red_cells.wbc_over_red_cells(args.data, "train", args.splits)
        print(f"WBC over red-cell size, {len(ratios)} train fields with both: {percentiles(ratios)}")
        return 0
    sizer = RedCellSizer.load(args.sizer) if args.sizer else None
    if args.generated:
        if sizer is None:
            ap.error("--generated needs --sizer FILE")
        print("generated smears 640 x 480, truth over learned size (WBCs of "
              f"{', '.join(f'{d:g}' for d in GENERATED_WBC_PX)} px, {len(GENERATED_SEEDS)} seeds):")
        for density, q in generated_rows(sizer).items():
            q = np.asarray(q)
            print(f"  red cells covering {density:g} of the free field: median {np.median(q):.2f}, "
                  f"coefficient of variation {q.std() / q.mean():.3f}, min {q.min():.2f}, "
                  f"max {q.max():.2f}")
        return 0
    bundle = load_bundle(args.model)
    table, counts = measured_rows(args.data, TorchSession.from_bundle(bundle), bundle, sizer,
                                  args.split, args.glass)
    for k, (images, cells) in counts.items():
        print(f"{k}: {images} {args.split} images, {len(table[k])} with RBC boxes clear of the "
              "border, "
              f"{cells} cells found")
    calib = float(np.median(table["bccd"][:, 0] / table["bccd"][:, 3]))
    print(f"\ncorrelation length x {calib:.2f} (its median ratio to the truth RBC size on BCCD "
          f"{args.split} fields) against the truth RBC size, truth / estimate:")
    for k, t in table.items():
        q = t[:, 0] / (calib * t[:, 3])
        print(f"  {k}: median {np.median(q):.2f}, coefficient of variation {q.std() / q.mean():.3f}, "
              f"min {q.min():.2f}, max {q.max():.2f}")
    print_bars(table, "the truth RBC size", lambda t: t[:, 0])
    print_bars(table, "the estimated RBC size", lambda t: calib * t[:, 3])
    if sizer is not None:
        print("\nthe learned red-cell size (red_cells.red_cell_size) against the truth RBC size, "
              "truth / estimate:")
        for k, t in table.items():
            q = t[:, 0] / t[:, 4]
            print(f"  {k}: median {np.median(q):.2f}, coefficient of variation "
                  f"{q.std() / q.mean():.3f}, min {q.min():.2f}, max {q.max():.2f}")
        print_bars(table, "the learned RBC size", lambda t: t[:, 4])
    return 0


if __name__ == "__main__":
    sys.exit(main())
