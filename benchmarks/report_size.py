"""How long each report writer takes as a run's cells grow (a large `watch` folder's reports).

Builds the report tables of IMAGES synthetic results of CELLS cells each (no images, no
models: what the writers are given after an analysis), then times each installed report
writer writing them into a temporary folder, best of `--repeat`. A `watch` session rebuilds
its reports at most every REPORT_COST_FACTOR times the last rebuild's duration, so these times
also say how stale a large watch folder's reports can get under load.

    python benchmarks/report_size.py --images 2000 20000 --cells 5

Prints one line per size: cells, then seconds per writer and the report.xlsx size.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path


def synthetic_results(images: int, cells: int) -> list:
    """`images` ok results of `cells` cells each, over 20 samples, classes and flags varied."""
    from wbc_batch import CLASSES
    from wbc_batch.results import CellResult, ImageResult

    out = []
    for i in range(images):
        found = []
        for k in range(cells):
            cls = CLASSES[(i + k) % len(CLASSES)]
            conf = 0.6 + 0.39 * ((i * 7 + k * 3) % 10) / 10
            probs = tuple(conf if c == cls else (1 - conf) / 4 for c in CLASSES)
            found.append(CellResult(k + 1, cls, conf, probs, 20 + 60 * k, 40, 55, 52, 2300, 900,
                                    conf < 0.8))
        out.append(ImageResult(image=f"S{i % 20:02d}/field_{i:05d}.jpg", status="ok", width=640,
                               height=480, cells=tuple(found), seconds=1.0, diameter_px=58.0))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, nargs="+", default=[2000])
    parser.add_argument("--cells", type=int, default=5, help="cells per image")
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args(argv)

    from wbc_batch.plugins import get_plugin_manager, get_report_writers
    from wbc_batch.reports import build_tables

    writers = get_report_writers(get_plugin_manager())
    for n in args.images:
        tables = build_tables(synthetic_results(n, args.cells), run_info={"save_overlays": True})
        timings, size = {}, None
        for name, writer in sorted(writers.items()):
            best = float("inf")
            for _ in range(args.repeat):
                with tempfile.TemporaryDirectory() as tmp:
                    t0 = time.perf_counter()
                    writer.write(Path(tmp), tables)
                    best = min(best, time.perf_counter() - t0)
                    if name == "xlsx":
                        size = (Path(tmp) / "report.xlsx").stat().st_size
            timings[name] = best
        shown = "  ".join(f"{name} {s:.1f} s" for name, s in timings.items())
        print(f"{n:,} images, {n * args.cells:,} cells: {shown}"
              + (f"  (report.xlsx {size / 2**20:.1f} MiB)" if size else ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
