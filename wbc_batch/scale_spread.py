"""Whether the WBC sizes estimated image by image in one run agree.

One microscope and objective give one WBC size in pixels, up to the spread of the cells
themselves. A field without any WBC has none to measure, so its estimate settles on red cells
or smaller things, and its red cells are then taken for WBCs (docs/EXPERIMENTS.md, "Fields
without a WBC"). Where a run's estimates spread much more widely than in a set of images from
one microscope, the run says so and advises `--diameter`.

`WIDE_SPREAD` is the largest ratio of the 95th to the 5th percentile of the estimates over the
val splits of the public sets from one microscope each (BCCD, WBC Image Dataset 1 and 2, PBC),
times 1.25 for other labs' smears (docs/EXPERIMENTS.md, "The spread of a run's WBC sizes"). The
5th percentile, not the 10th, so that a run with one field in ten without a WBC is caught.

With the warning comes a size to try (`suggest`): the median estimate over the images that hold
a cell not flagged `needs_review`. The false cells of a field without a WBC are nearly all
flagged, so those images are mostly fields with a WBC. Where fewer than `MIN_IMAGES` hold such a
cell, or their own sizes spread widely too (95th over 5th percentile at `WIDE_SPREAD` or more:
many false cells classified with confidence), no size is suggested (docs/EXPERIMENTS.md, "A size
to give with the spread warning"). Nor is one in a grey image's run or one of unusual stains,
whose every cell is flagged.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

#: a run whose 95th percentile WBC size is at least this many times its 5th is said to spread
WIDE_SPREAD = 2.3
#: fewer images with an estimate than this are not judged: their percentiles say little
MIN_IMAGES = 10
#: the key of the report facts (the Summary sheet's "Run" list) that holds `advice`
WARNING_FACT = "WBC size warning"


def _percentiles(sizes) -> tuple:
    """(the 5th and the 95th percentile of `sizes`, the second over the first rounded as run.json
    records it: judged as written, so that run.json never reads 2.3 and not wide)."""
    p5, p95 = (float(v) for v in np.percentile(sizes, [5, 95]))
    return p5, p95, round(p95 / p5, 2)


def suggest(results) -> Optional[float]:
    """The median WBC size estimated (`diameter_px`, rounded to a pixel) over those of `results`
    (ImageResults) that are ok, have a size and hold a cell not flagged `needs_review`; None
    where fewer than `MIN_IMAGES` do, or where their sizes spread widely themselves (false cells
    classified with confidence, in fields without a WBC)."""
    sizes = [r.diameter_px for r in results if r.ok and r.diameter_px > 0
             and math.isfinite(r.diameter_px) and any(not c.needs_review for c in r.cells)]
    if len(sizes) < MIN_IMAGES or _percentiles(sizes)[2] >= WIDE_SPREAD:
        return None
    return float(round(float(np.median(sizes))))


def measure(results, diameter_given: Optional[float]) -> Optional[dict]:
    """The spread of the WBC sizes estimated for `results` (ImageResults; those ok and with a
    size, `diameter_px` > 0): `{"images", "p5_px", "median_px", "p95_px", "ratio", "wide",
    "suggested_px"}` (`suggest`); None when the size was given (`diameter_given`, not
    estimated) or fewer than `MIN_IMAGES` have one."""
    if diameter_given:
        return None
    sizes = [r.diameter_px for r in results if r.ok and r.diameter_px > 0]
    if len(sizes) < MIN_IMAGES:
        return None
    p5, p95, ratio = _percentiles(sizes)
    return {"images": len(sizes), "p5_px": round(p5, 1),
            "median_px": round(float(np.median(sizes)), 1), "p95_px": round(p95, 1),
            "ratio": ratio, "wide": bool(ratio >= WIDE_SPREAD), "suggested_px": suggest(results)}


def span(spread: Optional[dict]) -> Optional[str]:
    """A spread's (`measure`) 5th to 95th percentile as text, in whole pixels ("106 to 232");
    None without one: the report's fact and the advice say it alike."""
    return f"{spread['p5_px']:.0f} to {spread['p95_px']:.0f}" if spread else None


def advice(spread: Optional[dict]) -> Optional[str]:
    """What to do about a wide spread (`measure`), with the size to try where `suggest` gave one;
    None when it is not wide."""
    if not spread or not spread.get("wide"):
        return None
    size = spread.get("suggested_px")
    try_size = (f" If so, try --diameter {size:.0f}: the median size of the images holding a cell "
                "not flagged needs_review (cells.csv).") if size else ""
    return (f"The WBC sizes estimated per image spread widely: {span(spread)} px from the 5th "
            "to the 95th percentile (wbc_diameter_px in images.csv). If one microscope and "
            "objective took these images, fields without a WBC were probably analysed at a wrong "
            "size, with red cells or debris taken for WBCs: run again with --diameter, the WBCs' "
            f"size in pixels (README, \"Fields without any WBC\").{try_size}")
