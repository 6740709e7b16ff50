#!/usr/bin/env python
"""Regenerate sample_data/ exactly: synthetic smears made by wbc_batch.sample, with ground truth.

    python scripts/make_sample_data.py            # writes sample_data/smears and sample_data/truth
    python scripts/make_sample_data.py --check    # exits 1 if sample_data/ differs from a fresh run

Nothing here comes from ../shared/data: every pixel is drawn by `wbc_batch.sample.make_smear`
with the fixed seeds of `wbc_batch.sample.DEFAULT_SPECS`.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from wbc_batch.sample import DEFAULT_SPECS, write_sample_set  # noqa: E402

PARTS = ("smears", "truth")


def _files(root: Path) -> list:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "sample_data", help="target folder")
    ap.add_argument("--check", action="store_true", help="compare instead of writing")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        made = write_sample_set(fresh, DEFAULT_SPECS)
        if args.check:
            differ = []
            for part in PARTS:
                a, b = fresh / part, args.out / part
                names = sorted(set(_files(a)) | set(_files(b) if b.is_dir() else []))
                differ += [f"{part}/{n}" for n in names
                           if not ((a / n).is_file() and (b / n).is_file()
                                   and filecmp.cmp(a / n, b / n, shallow=False))]
            for name in differ:
                print(f"differs: {name}")
            print("sample_data is up to date" if not differ else f"{len(differ)} file(s) differ")
            return 1 if differ else 0
        args.out.mkdir(parents=True, exist_ok=True)
        for part in PARTS:
            shutil.rmtree(args.out / part, ignore_errors=True)
            shutil.copytree(fresh / part, args.out / part)
    n_cells = sum(len(s.cells) for s in made["smears"].values())
    print(f"wrote {len(made['images'])} images with {n_cells} WBCs and their truth to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
