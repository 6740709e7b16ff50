"""Peak GPU memory and time of `wbc-batch run` on CUDA, one image at a time against several.

    python benchmarks/gpu_memory.py [--bccd DIR] [--workers 8]

For each image set (64 BCCD 640x480 fields when --bccd holds them; 24 synthetic 1440x900 fields
with 6 WBCs; 6 synthetic 4000x3000 fields with small WBCs, which are segmented in tiles), runs
the torch backend on `cuda` with 1 analysis worker and with --workers, and prints the wall time
and PyTorch's peak allocated and reserved GPU memory. Needs a CUDA GPU that PyTorch can use.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import cv2


def make_folder(kind) -> Path:
    from wbc_batch.sample import make_smear

    folder = Path(tempfile.mkdtemp(prefix="wbc-gpu-mem-"))
    if isinstance(kind, Path):
        for p in sorted(kind.glob("*.jpg"))[:64]:
            shutil.copy(p, folder / p.name)
        return folder
    width, height, n_images, n_wbc, diameter = kind
    for i in range(n_images):
        smear = make_smear(width, height, n_wbc=n_wbc, diameter=diameter, seed=i)
        cv2.imwrite(str(folder / f"f{i}.jpg"), cv2.cvtColor(smear.rgb, cv2.COLOR_RGB2BGR))
    return folder


def measure(folder: Path, workers: int) -> dict:
    import torch

    from wbc_batch.config import RunConfig
    from wbc_batch.pipeline import Runner

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    runner = Runner(RunConfig(input_dir=folder, output_dir=folder / "out", device="cuda",
                              save_overlays=False, quiet=True))
    runner.analysis_workers = workers
    t0 = time.perf_counter()
    outcome = runner.run()
    seconds = time.perf_counter() - t0
    result = {"images": len(outcome.results), "seconds": seconds,
              "allocated": torch.cuda.max_memory_allocated() / 2 ** 30,
              "reserved": torch.cuda.max_memory_reserved() / 2 ** 30,
              "serialised": runner.session.serialised}
    runner.close()
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bccd", type=Path, default=Path("../shared/data/bccd/BCCD/JPEGImages"))
    ap.add_argument("--workers", type=int, default=8)
    args = ap.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("no CUDA GPU that PyTorch can use", file=sys.stderr)
        return 2
    print(f"GPU: {torch.cuda.get_device_name(0)}; torch {torch.__version__}")
    kinds = ([("64 BCCD fields 640x480", args.bccd)] if args.bccd.is_dir() else []) + [
        ("24 fields 1440x900", (1440, 900, 24, 6, None)),
        ("6 fields 4000x3000, tiled", (4000, 3000, 6, 30, (90, 110))),
    ]
    for name, kind in kinds:
        for workers in (1, args.workers):
            folder = make_folder(kind)
            r = measure(folder, workers)
            shutil.rmtree(folder, ignore_errors=True)
            print(f"{name:26} workers {workers}: {r['images']} images in {r['seconds']:.1f} s; peak GPU "
                  f"memory {r['allocated']:.2f} GiB allocated, {r['reserved']:.2f} GiB reserved"
                  + ("; ran out of memory, then one pass at a time" if r["serialised"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
