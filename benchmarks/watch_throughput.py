"""Throughput of `watch --once` against `run` on the same backlog (issue #4: watch >= 90 % of run).

Makes a backlog of synthetic smears (wbc_batch.sample), then times, in this process and with the
same configuration, `pipeline.run` into one output folder and `watch --once` into another, each
end to end (model loading, every image, the reports). What differs is what watch adds: the
ledger, the readiness checks and hashing, the report rebuilds. The two are run alternately
`--repeat` times (after one untimed warm-up of each) and the best time of each is kept.
Besides wall time it reports CPU time (all threads of this process), which other jobs on a
shared machine disturb much less: compare the CPU ratio when the machine is busy.

    python benchmarks/watch_throughput.py --n 200 --backend onnx --threads 2

Prints images/s for both and the ratio. Not a test: the lead runs it with the real models.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path


def make_backlog(folder: Path, n: int, width: int, height: int) -> None:
    from wbc_batch.sample import encode_image, make_smear

    for i in range(n):
        smear = make_smear(width, height, n_wbc=1 + i % 4, seed=i)
        path = folder / f"sample{i % 4}" / f"field{i:04d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode_image(smear.rgb, ".jpg"))
    old = time.time() - 3600  # a backlog: written long ago (settled at first sight)
    for path in folder.rglob("*.jpg"):
        os.utime(path, (old, old))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100, help="images in the backlog")
    ap.add_argument("--size", default="640x480", help="WIDTHxHEIGHT of each field")
    ap.add_argument("--backend", default="onnx")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", type=Path, default=None, help="model bundle (default: packaged)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-overlays", action="store_true")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--keep", type=Path, default=None, help="work in this folder and keep it")
    args = ap.parse_args(argv)

    from wbc_batch.config import RunConfig
    from wbc_batch.pipeline import run
    from wbc_batch.watch import WatchOptions, watch

    width, height = (int(v) for v in args.size.lower().split("x"))
    work = args.keep or Path(tempfile.mkdtemp(prefix="wbc-watch-bench-"))
    inbox = work / "inbox"
    if not inbox.exists():
        make_backlog(inbox, args.n, width, height)
    n = sum(1 for _ in inbox.rglob("*.jpg"))

    def config(out: Path) -> RunConfig:
        return RunConfig(input_dir=inbox, output_dir=out, backend=args.backend, device=args.device,
                         model_dir=args.model, save_overlays=not args.no_overlays, overwrite=True,
                         threads=args.threads, quiet=True)

    def time_run() -> tuple:
        out = work / "out-run"
        shutil.rmtree(out, ignore_errors=True)
        t, c = time.perf_counter(), time.process_time()
        run(config(out), images=None)
        return time.perf_counter() - t, time.process_time() - c

    def time_watch() -> tuple:
        out = work / "out-watch"
        shutil.rmtree(out, ignore_errors=True)
        t, c = time.perf_counter(), time.process_time()
        with open(os.devnull, "w") as quiet:
            watch(config(out), WatchOptions(once=True), stream=quiet)
        return time.perf_counter() - t, time.process_time() - c

    time_run(), time_watch()  # warm-up: file cache, lazy imports
    best_run = best_watch = (float("inf"), float("inf"))
    for _ in range(args.repeat):
        r, w = time_run(), time_watch()
        best_run = (min(best_run[0], r[0]), min(best_run[1], r[1]))
        best_watch = (min(best_watch[0], w[0]), min(best_watch[1], w[1]))
    (best_run, cpu_run), (best_watch, cpu_watch) = best_run, best_watch
    run_rate, watch_rate = n / best_run, n / best_watch
    print(f"backlog: {n} images {width}x{height}, backend {args.backend} ({args.device}), "
          f"{args.threads} threads, overlays {'off' if args.no_overlays else 'on'}")
    print(f"run:          {run_rate:7.2f} images/s  ({best_run:.1f} s)")
    print(f"watch --once: {watch_rate:7.2f} images/s  ({best_watch:.1f} s)")
    print(f"watch / run:  {watch_rate / run_rate:7.1%}  (target >= 90 %)")
    print(f"CPU time: run {cpu_run:.1f} s, watch {cpu_watch:.1f} s; "
          f"watch / run by CPU: {cpu_run / cpu_watch:.1%}")
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
