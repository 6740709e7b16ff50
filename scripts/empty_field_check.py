#!/usr/bin/env python3
"""Empty fields against fields of WBCs too small to analyse: what the scale estimate makes of
each, how much of what it took for WBC is nucleus, and what `run` then does with the field
(`analysis.NUCLEUS_EVIDENCE`).

    python scripts/empty_field_check.py [--data ../shared/data] [--set bccd] [--split val]
                                        [--seed 7] [--model DIR]

Three kinds of field, each analysed with the default settings:

1. bare glass, drawn here (seeded by `--seed`): four grey levels, three noise levels (the
   strongest softened, as a camera's optics soften it), two sizes, neutral or tinted; no WBC,
   no red cell;
2. BCCD only: the strips of the split's fields clear of every WBC box
   (`nucleus_contrast_check.py`'s `wbc_free_strips`): real smear without a WBC;
3. the split's fields of the set tiled 3x3 and shrunk so that their WBCs are 4 to 8 px: WBCs too
   small to analyse, which `run` must refuse as such. BCCD's are shrunk by `SHRINK` (its WBCs
   are about 110 px across); TXL-PBC's, each field by its own WBC boxes' median size, to
   `TINY_PX`.

For each it prints how many fields the estimate put under `MIN_DIAMETER_PX`, the nucleus share
of those (the least and the most), and the outcome: refused as too small, analysed with WBCs
found, or analysed with none; "before" is the outcome without the bar (`NUCLEUS_EVIDENCE` 0:
every estimate under the least diameter refused, as before the bar), "now" with it.
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

from nucleus_contrast_check import wbc_free_strips  # noqa: E402
from wbc_batch import analysis  # noqa: E402
from wbc_batch.analysis import estimate_diameter, find_cells, nucleus_share  # noqa: E402
from wbc_batch.bundle import load_bundle  # noqa: E402
from wbc_batch.config import MIN_DIAMETER_PX  # noqa: E402
from wbc_batch.imageio import read_image  # noqa: E402
from wbc_batch.nets import TorchSession  # noqa: E402
from wbc_batch.preprocess import channel_stats  # noqa: E402
from wbc_batch.results import ImageNotAnalysable  # noqa: E402
from wbc_batch.train import datasets as ds  # noqa: E402
from wbc_batch.train.folders import add_data_option  # noqa: E402

#: the shrink factors of the tiled BCCD fields: WBCs of about 110 px come out 4.4, 6 and 7.7 px
SHRINK = (0.04, 0.055, 0.07)
#: the WBC sizes (px, the median sqrt(w h) of a field's WBC boxes) TXL-PBC fields are shrunk to
TINY_PX = (4.4, 6.0, 7.7)


def glass_fields(seed: int = 7) -> list:
    """(name, RGB) of bare glass fields: every grey level, noise level, size and tint."""
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


def analysed(rgb: np.ndarray, session, bundle, bar: float) -> str:
    """What the analysis does with the field with `NUCLEUS_EVIDENCE` at `bar`: "too small",
    "WBCs" or "none"."""
    kept, analysis.NUCLEUS_EVIDENCE = analysis.NUCLEUS_EVIDENCE, bar
    try:
        found = find_cells(rgb, session, bundle)
    except ImageNotAnalysable:
        return "too small"
    finally:
        analysis.NUCLEUS_EVIDENCE = kept
    return "WBCs" if found.boxes else "none"


def outcome(rgb: np.ndarray, session, bundle) -> tuple:
    """(the scale estimate or None, the nucleus share of its pass, the outcome before the bar,
    the outcome now); the bar acts only under the least diameter, so elsewhere the field is
    analysed once."""
    diameter, first = estimate_diameter(rgb, session, bundle.diameter,
                                        channel_stats(rgb, exclude=None))
    share = nucleus_share(first[1]) if first is not None else 0.0
    now = analysed(rgb, session, bundle, analysis.NUCLEUS_EVIDENCE)
    small = diameter and diameter < MIN_DIAMETER_PX
    return diameter, share, analysed(rgb, session, bundle, 0.0) if small else now, now


def report(kind: str, rows: list) -> None:
    """One line per kind: fields, those estimated under the least diameter with their nucleus
    shares, and the outcomes before the bar and now."""
    under = [share for d, share, *_ in rows if d and d < MIN_DIAMETER_PX]
    shares = (f" (nucleus share {100 * min(under):.1f} to {100 * max(under):.1f} %)"
              if under else "")
    changed = sum(1 for r in rows if r[2] != r[3])
    print(f"{kind}: {len(rows)} fields; estimated under {MIN_DIAMETER_PX:g} px: {len(under)}"
          f"{shares}; outcome changed by the bar: {changed}")
    for when, at in (("before", 2), ("now", 3)):
        done = {k: sum(1 for r in rows if r[at] == k) for k in ("too small", "WBCs", "none")}
        print(f"  {when}: refused as too small {done['too small']}, analysed with WBCs found "
              f"{done['WBCs']}, with none {done['none']}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_option(ap, ROOT)
    ap.add_argument("--set", default="bccd", choices=("bccd", "txl"),
                    help="the set of the shrunk fields (and, BCCD's, of the strips)")
    ap.add_argument("--split", default="val", choices=("train", "val"),
                    help="the split of the strips and the shrunk fields (never test)")
    ap.add_argument("--seed", type=int, default=7, help="the draw of the bare glass fields")
    ap.add_argument("--model", type=Path, default=None,
                    help="model bundle (default: the shipped one)")
    args = ap.parse_args(argv)
    bundle = load_bundle(args.model)
    session = TorchSession.from_bundle(bundle)
    print(f"nucleus share needed to refuse WBCs as too small (analysis.NUCLEUS_EVIDENCE): "
          f"{100 * analysis.NUCLEUS_EVIDENCE:.0f} %")
    split, title = args.split, {"bccd": "BCCD", "txl": "TXL-PBC"}[args.set]
    kinds = [(f"bare glass (seed {args.seed})", lambda: glass_fields(args.seed))]
    if args.set == "bccd":
        kinds.append((f"BCCD {split} strips without a WBC",
                      lambda: wbc_free_strips(args.data, split)))
    kinds.append((f"{title} {split} fields tiled 3x3 and shrunk to WBCs of 4 to 8 px",
                  lambda: shrunk_fields(args.data, split, args.set)))
    for kind, fields in kinds:
        report(kind, [outcome(rgb, session, bundle) for _, rgb in fields()])
    return 0


if __name__ == "__main__":
    sys.exit(main())
