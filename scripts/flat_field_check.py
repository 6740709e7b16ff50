#!/usr/bin/env python3
"""Fields with nothing in them against fields with cells: what `analysis.field_cover` makes of
each, and which of them the analysis takes for glass (no WBC, unseen by the segmenter).

    python scripts/flat_field_check.py [--data ../shared/data] [--split val] [--pbc-every 5]
                                       [--seeds 7 8] [--sets wbc2 wbc1 pbc bccd txl]

Fields with nothing in them, drawn here: bare glass (`glass_fields`, every grey level, noise
level, size and tint, for each seed), the same glass with dust or stain precipitate on it
(`dusty_glass`), dark frames (`dark_frames`: black to dim, with and without noise) and glass
with strong camera noise, dim or bright, raw or softened (`noisy_glass`). Fields
with cells, from the public sets' `--split` (never test): every image of each set (PBC every
`--pbc-every`-th), as it is and under each change of `scripts/perturbation_check.py` (in
memory, not re-encoded as that script does; each field as the analysis measures it, its frame
filled and cut off and its lamp falloff evened out: `as_analysed`), under two shorter exposures
(`EXPOSURES`), two stronger defocus blurs (`DEFOCUS`) and three fadings towards the glass
(`FADINGS`); and BCCD's and TXL-PBC's fields tiled 3x3 and shrunk to WBCs of 4 to 8 px
(`shrunk_fields`), which `run` must go on refusing as too small.

Each line gives a kind of field, how many there are, the least and the most cover, and how
many the analysis takes for glass; the rest are analysed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from perturbation_check import PERTURBATIONS, dataset_sets  # noqa: E402
from wbc_batch import analysis  # noqa: E402
from wbc_batch.analysis import COVER_DARKER, MIN_COVER, field_cover  # noqa: E402
from wbc_batch.config import AnalysisParams  # noqa: E402
from wbc_batch.frame import fill_frame  # noqa: E402
from wbc_batch.illumination import even_out  # noqa: E402
from wbc_batch.imageio import read_image  # noqa: E402
from wbc_batch.train import datasets as ds  # noqa: E402
from wbc_batch.train.folders import add_data_option  # noqa: E402

#: exposure factors: the image's levels multiplied by each (a smear exposed too short)
EXPOSURES = (0.5, 0.25)
#: Gaussian sigmas (px) of a defocus stronger than perturbation_check's `blur` (2 px)
DEFOCUS = (4.0, 8.0)
#: what is left of each pixel's difference from the glass (each channel's 90th percentile): a
#: stain faded or washed out, or light scattered over the field
FADINGS = (0.5, 0.25, 0.15)
#: the shrink factors of the tiled BCCD fields: WBCs of about 110 px come out 4.4, 6 and 7.7 px
SHRINK = (0.04, 0.055, 0.07)
#: the WBC sizes (px, the median sqrt(w h) of a field's WBC boxes) TXL-PBC fields are shrunk to
TINY_PX = (4.4, 6.0, 7.7)


def verdict(rgb: np.ndarray) -> tuple:
    """(cover, what the analysis does: "glass" or "analysed"), of the field as the analysis
    measures it at the default settings (`as_analysed`)."""
    cover = field_cover(as_analysed(rgb))
    return cover, "glass" if cover < MIN_COVER else "analysed"


def as_analysed(rgb: np.ndarray, params: AnalysisParams = AnalysisParams()) -> np.ndarray:
    """The image whose cover `analysis.find_cells` measures: its frame painted as glass and
    cut off where it leaves a smaller field (`_surround`, `_field_box`), then its lamp falloff
    evened out (`even_out`)."""
    frame, _ = analysis._surround(rgb, params.fill_margins, params.fill_white_stop)
    if frame is not None:
        rgb = fill_frame(rgb, frame)
        box = analysis._field_box(frame)
        if box is not None:
            y0, y1, x0, x1 = box
            rgb = np.ascontiguousarray(rgb[y0:y1, x0:x1])
    if params.min_falloff:
        rgb, _ = even_out(rgb, params.min_falloff)
    return rgb


def glass_fields(seed: int = 7) -> list:
    """(name, RGB) of bare glass fields: every grey level, noise level, size and tint (the draw
    of `scripts/empty_field_check.py` at commit 873dffb)."""
    rng = np.random.default_rng(seed)
    out = []
    for level in (190, 215, 235, 250):
        for sd in (2, 5, 9):
            for h, w in ((480, 640), (300, 300)):
                for tint in ((0, 0, 0), (8, -6, 4)):
                    rgb = np.clip(rng.normal(level, sd, (h, w, 3)) + tint, 0, 255).astype(np.uint8)
                    if sd == 9:
                        rgb = cv2.GaussianBlur(rgb, (0, 0), 0.8)
                    out.append((f"glass {level} sd {sd} {w}x{h} tint {tint}", rgb))
    return out


def dusty_glass(seed: int = 7) -> list:
    """(name, RGB) of `glass_fields(seed)` with 1 to 12 specks on each, 2 to 8 px across: dust
    (neutral, grey levels 30 to 150) or stain precipitate (purple), as a field off the smear
    shows them."""
    rng = np.random.default_rng(seed + 1000)
    out = []
    for name, rgb in glass_fields(seed):
        rgb = rgb.copy()
        for _ in range(int(rng.integers(1, 13))):
            h, w = rgb.shape[:2]
            at = (int(rng.integers(4, w - 4)), int(rng.integers(4, h - 4)))
            colour = ((int(rng.integers(30, 151)),) * 3 if rng.random() < 0.6
                      else (120, 40, 150))
            cv2.circle(rgb, at, int(rng.integers(1, 5)), colour, -1, lineType=cv2.LINE_AA)
        out.append((f"{name} with specks", rgb))
    return out


def dark_frames(seed: int = 7) -> list:
    """(name, RGB) of frames taken with the lamp off or far too short an exposure: black to dim
    levels, with noise of 0 to 9 grey levels."""
    rng = np.random.default_rng(seed)
    out = []
    for level in (0, 8, 20, 40):
        for sd in (0, 2, 5, 9):
            rgb = np.clip(rng.normal(level, sd, (480, 640, 3)), 0, 255).astype(np.uint8)
            out.append((f"dark {level} sd {sd}", rgb))
    return out


def noisy_glass(seed: int = 7) -> list:
    """(name, RGB) of glass with strong camera noise: dim to bright levels, noise of 6 to 12 grey
    levels, raw (each pixel its own) or softened by a Gaussian of 0.8 px (a demosaiced or
    compressed camera's), where `glass_fields` softens only its strongest."""
    rng = np.random.default_rng(seed + 2000)
    out = []
    for level in (60, 120, 190, 235):
        for sd in (6, 9, 12):
            for h, w in ((480, 640), (300, 300)):
                for soft in (0.0, 0.8):
                    rgb = np.clip(rng.normal(level, sd, (h, w, 3)), 0, 255).astype(np.uint8)
                    if soft:
                        rgb = cv2.GaussianBlur(rgb, (0, 0), soft)
                    out.append((f"noisy glass {level} sd {sd} {w}x{h} soft {soft:g}", rgb))
    return out


def shrunk_fields(data: Path, split: str, name: str = "bccd") -> list:
    """(name, RGB) of each of the split's fields of BCCD (`name` "bccd") or TXL-PBC ("txl") with
    a WBC box, tiled 3x3 and shrunk by each of `SHRINK` (BCCD) or to WBCs of each of `TINY_PX`
    (TXL-PBC)."""
    out = []
    records = ds.bccd(data, split) if name == "bccd" else ds.txl_pbc(data, split)
    for record in records:
        if not record.boxes:
            continue
        tiled = np.tile(read_image(record.image), (3, 3, 1))
        size = float(np.median([np.sqrt(bw * bh) for *_, bw, bh in record.boxes]))
        for f in SHRINK if name == "bccd" else [px / size for px in TINY_PX]:
            out.append((f"{Path(record.image).name} x{f:.3f}",
                        cv2.resize(tiled, None, fx=f, fy=f, interpolation=cv2.INTER_AREA)))
    return out


def changes() -> dict:
    """name -> function on uint8 RGB: perturbation_check's changes, the shorter exposures, the
    stronger defocus and the fadings."""
    out = {name: fn for name, (_, fn, _) in PERTURBATIONS.items()}
    for f in EXPOSURES:
        out[f"exposure x{f:g}"] = (lambda f: lambda rgb: (rgb.astype(np.float32) * f + 0.5)
                                   .astype(np.uint8))(f)
    for sigma in DEFOCUS:
        out[f"defocus {sigma:g} px"] = (lambda s: lambda rgb: cv2.GaussianBlur(rgb, (0, 0), s))(
            sigma)
    for a in FADINGS:
        out[f"faded x{a:g}"] = (lambda a: lambda rgb: faded(rgb, a))(a)
    return out


def faded(rgb: np.ndarray, a: float) -> np.ndarray:
    """The image with `a` of each pixel's difference from the glass (each channel's 90th
    percentile) left."""
    glass = np.percentile(rgb.reshape(-1, 3), 90, axis=0).astype(np.float32)
    return np.clip(glass + (rgb.astype(np.float32) - glass) * a + 0.5, 0, 255).astype(np.uint8)


def line(kind: str, rows: list) -> str:
    """One printed line for a kind of field from its `verdict` rows."""
    covers = [r[0] for r in rows]
    glass = sum(1 for r in rows if r[1] == "glass")
    return (f"{kind}: {len(rows)} fields; cover {100 * min(covers):.2f} to "
            f"{100 * max(covers):.2f} %; glass {glass}, analysed {len(rows) - glass}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_option(ap, ROOT)
    ap.add_argument("--split", default="val", choices=("train", "val"),
                    help="the split of the public sets' images (never test)")
    ap.add_argument("--pbc-every", type=int, default=5, help="every N-th PBC image")
    ap.add_argument("--seeds", type=int, nargs="+", default=[7, 8],
                    help="the draws of the glass fields and dark frames")
    ap.add_argument("--sets", nargs="+", default=["wbc2", "wbc1", "pbc", "bccd", "txl"],
                    choices=("wbc2", "wbc1", "pbc", "bccd", "txl"))
    args = ap.parse_args(argv)
    print(f"glass: cover (share darker than the glass by over {100 * COVER_DARKER:g} % of its "
          f"level) under {100 * MIN_COVER:g} %")
    for seed in args.seeds:
        print(line(f"bare glass (seed {seed})", [verdict(rgb) for _, rgb in glass_fields(seed)]))
        print(line(f"glass with specks (seed {seed})",
                   [verdict(rgb) for _, rgb in dusty_glass(seed)]))
        print(line(f"dark frames (seed {seed})", [verdict(rgb) for _, rgb in dark_frames(seed)]))
        print(line(f"noisy glass (seed {seed})", [verdict(rgb) for _, rgb in noisy_glass(seed)]))
    fns = changes()
    sets = dataset_sets(args.data, args.split, args.pbc_every)
    for name in args.sets:
        root, names, _ = sets[name]
        rows = {change: [] for change in fns}
        for image in names:
            rgb = read_image(root / image)
            for change, fn in fns.items():
                rows[change].append(verdict(fn(rgb)))
        for change, got in rows.items():
            print(line(f"{name} {args.split}, {change}", got), flush=True)
        if name in ("bccd", "txl"):
            shrunk = shrunk_fields(args.data, args.split, name)
            print(line(f"{name} {args.split} tiled 3x3, shrunk to WBCs of 4 to 8 px",
                       [verdict(rgb) for _, rgb in shrunk]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
