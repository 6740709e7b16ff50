"""How a process's memory grows as it analyses images of many sizes (a long `run`, a folder
from several cameras), and what two ways of handing the C heap's free memory back would cost
(Linux with glibc): `--trim` / `--trim-every N` call glibc's `malloc_trim(0)` after each image or
every N images (`wbc_batch.heap.release_free_memory`, which `watch` calls when its queue
empties); `--mmap-threshold BYTES` fixes glibc's mmap threshold, so that every block of that size
or more is mapped on its own and unmapped when freed (glibc's own threshold rises, up to 32 MB,
as such blocks are freed).

Generates IMAGES sample smears (`sample.make_smear`, two WBCs each) of random sizes from 300 x
300 to 1100 x 900 px, analyses each with the shipped models on the CPU
(`analysis.analyze`, through `--backend`), and prints the process's resident memory (VmRSS,
Linux; after the trim where one falls there), its highest so far (VmHWM) and the seconds so far
every `--every` images and at the end.

    python benchmarks/memory_growth.py --images 150
    python benchmarks/memory_growth.py --images 150 --trim
    python benchmarks/memory_growth.py --images 150 --trim-every 10
    python benchmarks/memory_growth.py --images 150 --mmap-threshold 1048576
    python benchmarks/memory_growth.py --images 150 --backend onnx

Compare the seconds only between runs on the same idle machine, one after the other.
"""

from __future__ import annotations

import argparse
import ctypes
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def resident_mb(field: str = "VmRSS") -> int:
    """This process's resident memory in MB (Linux's /proc; 0 elsewhere); `field` "VmHWM" for
    its highest so far."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) // 1024
    except OSError:
        pass
    return 0


def fix_mmap_threshold(threshold: int) -> bool:
    """glibc's mallopt(M_MMAP_THRESHOLD, threshold); whether it was taken."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return mallopt(-3, int(threshold)) == 1  # M_MMAP_THRESHOLD (malloc.h)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=150)
    ap.add_argument("--every", type=int, default=25, help="print every this many images")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--trim", action="store_true",
                    help="call glibc's malloc_trim(0) after each image")
    ap.add_argument("--trim-every", type=int, default=0, metavar="N",
                    help="call glibc's malloc_trim(0) after every N images (N >= 1)")
    ap.add_argument("--mmap-threshold", type=int, default=0, metavar="BYTES",
                    help="fix glibc's mmap threshold at BYTES (default: glibc's own, which rises "
                         "as blocks are freed, up to 32 MB)")
    ap.add_argument("--backend", default="torch", help="a backend's name (torch, onnx)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    if args.trim_every < 0 or args.mmap_threshold < 0:
        ap.error("--trim-every and --mmap-threshold take a number >= 0")

    threshold = args.mmap_threshold
    if threshold and not fix_mmap_threshold(threshold):
        sys.exit(f"glibc's mmap threshold cannot be set to {threshold} here (Linux with glibc)")

    import numpy as np

    from wbc_batch.analysis import analyze
    from wbc_batch.bundle import load_bundle
    from wbc_batch.heap import release_free_memory
    from wbc_batch.pipeline import open_session
    from wbc_batch.plugins import get_backends, get_plugin_manager
    from wbc_batch.sample import make_smear

    trim = None
    if args.trim or args.trim_every:
        if not release_free_memory():
            sys.exit("--trim needs glibc's malloc_trim (Linux)")
        trim = release_free_memory
    bundle = load_bundle(None)
    backend = get_backends(get_plugin_manager())[args.backend]
    session = open_session(backend, bundle, "cpu", args.threads)
    rng = np.random.default_rng(args.seed)
    heap_said = f"mmap threshold fixed at {threshold} bytes" if threshold else "glibc's mmap threshold"
    trim_said = ("malloc_trim after each image" if args.trim else
                 f"malloc_trim every {args.trim_every} images" if trim else "no trim")
    print(f"{args.backend} backend, {args.threads} threads; {heap_said}; {trim_said}; "
          f"{args.images} images; resident memory at the start: {resident_mb()} MB")
    t0 = time.perf_counter()
    for i in range(1, args.images + 1):
        w, h = int(rng.integers(300, 1100)), int(rng.integers(300, 900))
        analyze(make_smear(w, h, n_wbc=2, seed=args.seed * 100_000 + i).rgb, session, bundle)
        if trim is not None and (args.trim or i % args.trim_every == 0):
            trim()
        if i % args.every == 0 or i == args.images:
            now, peak = resident_mb(), resident_mb("VmHWM")
            print(f"  after {i:4d} images: {now:5d} MB, highest {peak:5d} MB  "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
