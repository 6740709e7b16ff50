"""End-to-end throughput of `wbc-batch run` against model inference alone.

    python benchmarks/throughput.py [--images DIR] [--n 24] [--threads 2] [--device auto] [--workers N]

Prints images per second for each backend (torch, onnx) with and without overlays, and the
time of model inference alone on the same images: every batch the pipeline sent to the
segmenter and classifier is recorded, then replayed through the same session with nothing else
running. "pipeline / inference" is the share of inference-only speed the whole pipeline keeps
(read, scale estimate, segment, split, classify, overlays, masks, reports; target >= 80 %).
"onnx / torch" compares the backends' end-to-end speed on the CPU (target >= 1.3x).

Without --images, the fields are 640x480 synthetic smears from `wbc_batch.sample` (2 to 4
WBCs each); with --images, the 640x480 JPEGs found there (e.g. ../shared/data/bccd/BCCD/JPEGImages).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np


class RecordingSession:
    """Wraps a ModelSession, keeping each input batch for the replay."""

    def __init__(self, inner):
        self.inner = inner
        self.device = inner.device
        self.fallback_note = inner.fallback_note
        self.calls = []

    def segment(self, batch):
        self.calls.append(("segment", batch))
        return self.inner.segment(batch)

    def classify(self, batch):
        self.calls.append(("classify", batch))
        return self.inner.classify(batch)


def make_images(folder: Path, n: int, source: Path | None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if source is not None:
        files = sorted(p for p in source.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:n]
        for p in files:
            shutil.copy(p, folder / p.name)
        return
    from wbc_batch.sample import make_smear

    rng = np.random.default_rng(0)
    for i in range(n):
        smear = make_smear(640, 480, n_wbc=int(rng.integers(2, 5)), seed=100 + i)
        cv2.imwrite(str(folder / f"field_{i:03d}.jpg"), cv2.cvtColor(smear.rgb, cv2.COLOR_RGB2BGR),
                    [cv2.IMWRITE_JPEG_QUALITY, 92])


def bench(backend: str, images: Path, overlays: bool, threads: int, device: str = "auto",
          workers: int = 0, repeats: int = 2) -> dict:
    from wbc_batch.config import RunConfig
    from wbc_batch.pipeline import Runner

    best = None
    for _ in range(repeats):
        out = Path(tempfile.mkdtemp(prefix="wbc-bench-"))
        cfg = RunConfig(input_dir=images, output_dir=out / "out", backend=backend, threads=threads,
                        device=device, save_overlays=overlays, quiet=True)
        runner = Runner(cfg)
        if workers:
            runner.analysis_workers = workers
        rec = RecordingSession(runner.session)
        runner.session = rec
        # warm-up: one image, not timed (first calls allocate)
        first = sorted(images.iterdir())[0]
        runner.process_array(cv2.cvtColor(cv2.imread(str(first)), cv2.COLOR_BGR2RGB), first.name)
        rec.calls.clear()
        t0 = time.perf_counter()
        outcome = runner.run()
        wall = time.perf_counter() - t0
        n = len(outcome.results)
        # replay exactly the batches of the timed run through the bare session
        t1 = time.perf_counter()
        for kind, batch in rec.calls:
            getattr(rec.inner, kind)(batch)
        infer = time.perf_counter() - t1
        runner.close()
        shutil.rmtree(out, ignore_errors=True)
        res = {"n": n, "wall": wall, "infer": infer, "cells": outcome.n_cells,
               "device": runner.device, "workers": runner.analysis_workers}
        if best is None or wall < best["wall"]:
            best = res
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=Path, default=None)
    ap.add_argument("--n", type=int, default=24)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--backends", default="torch,onnx")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (as for `wbc-batch run`)")
    ap.add_argument("--workers", type=int, default=0,
                    help="images analysed at once (default: the pipeline's choice for the device)")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="wbc-bench-images-"))
    make_images(work, args.n, args.images)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores visible, "
          f"{args.threads} threads; python {platform.python_version()}, torch {torch.__version__}")
    print(f"images: {args.n} x 640x480 {'from ' + str(args.images) if args.images else 'synthetic smears'}")
    print(f"{'backend':8} {'device':7} {'workers':>7} {'overlays':9} {'img/s':>7} {'infer-only img/s':>17} "
          f"{'pipeline/infer':>15} {'cells':>6}")
    speeds = {}
    for backend in args.backends.split(","):
        for overlays in (True, False):
            r = bench(backend, work, overlays, args.threads, args.device, args.workers)
            ips, iips = r["n"] / r["wall"], r["n"] / r["infer"]
            speeds[(backend, overlays)] = ips
            print(f"{backend:8} {r['device']:7} {r['workers']:7d} {'yes' if overlays else 'no':9} {ips:7.2f} {iips:17.2f} "
                  f"{100 * ips / iips:14.1f}% {r['cells']:6d}")
    if ("torch", True) in speeds and ("onnx", True) in speeds:
        print(f"onnx / torch end to end: {speeds[('onnx', True)] / speeds[('torch', True)]:.2f}x with overlays, "
              f"{speeds[('onnx', False)] / speeds[('torch', False)]:.2f}x without")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
