"""How a process's memory grows as it analyses images of many sizes (a long `watch`, a folder
from several cameras), and what handing the C heap's free memory back after each image would
cost (`--trim`: glibc's `malloc_trim(0)`, Linux only).

Generates IMAGES sample smears (`sample.make_smear`, two WBCs each) of random sizes from 300 x
300 to 1100 x 900 px, analyses each with the shipped models on the CPU
(`analysis.analyze`), and prints the process's resident memory (VmRSS, Linux) and the seconds
so far every `--every` images and at the end.

    python benchmarks/memory_growth.py --images 150
    python benchmarks/memory_growth.py --images 150 --trim

Compare the seconds only between runs on the same idle machine, one after the other.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def resident_mb() -> int:
    """This process's resident memory in MB (Linux's /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) // 1024
    except OSError:
        pass
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=150)
    ap.add_argument("--every", type=int, default=25, help="print every this many images")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--trim", action="store_true",
                    help="call glibc's malloc_trim(0) after each image")
    args = ap.parse_args(argv)

    import numpy as np

    from wbc_batch.analysis import analyze
    from wbc_batch.bundle import load_bundle
    from wbc_batch.nets import TorchSession
    from wbc_batch.sample import make_smear

    trim = None
    if args.trim:
        try:
            trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):
            sys.exit("--trim needs glibc's malloc_trim (Linux)")
    bundle = load_bundle(None)
    session = TorchSession.from_bundle(bundle)
    rng = np.random.default_rng(args.seed)
    print(f"{'malloc_trim after each image' if trim else 'no trim'}; {args.images} images; "
          f"resident memory at the start: {resident_mb()} MB")
    t0 = time.perf_counter()
    for i in range(1, args.images + 1):
        w, h = int(rng.integers(300, 1100)), int(rng.integers(300, 900))
        analyze(make_smear(w, h, n_wbc=2, seed=args.seed * 100_000 + i).rgb, session, bundle)
        if trim is not None:
            trim(0)
        if i % args.every == 0 or i == args.images:
            print(f"  after {i:4d} images: {resident_mb():5d} MB  ({time.perf_counter() - t0:.0f} s)",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
