"""Cutting the classifier's training crops in several processes on the CPU.

Cutting one crop runs the segmenter and the cell splitter over the whole image
(`analysis.find_cells`). Part of that is NumPy and OpenCV work in one thread, and a small
image's convolutions keep a second thread only partly busy, so on the CPU N processes of one
thread each cut crops faster than one process of N threads. The `train classifier` log prints
how long each source took.

Each worker process loads the bundle's segmenter itself. Processes are spawned, not forked, so
no thread pool of the parent is copied half-way; as with any spawned pool, a Python script that
trains from its top level needs an `if __name__ == "__main__":` guard (the `wbc-batch` command
has one). Records are cut in chunks, and the chunks' results are put back in the records' order,
so the crops come out in the same order as in one process.
"""

from __future__ import annotations

import signal
import threading
import time
from collections import deque
from contextlib import contextmanager
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

#: most records per task: small enough to report progress (a short list is cut in smaller
#: chunks, at least four per process, to share it out evenly)
CHUNK = 64
#: progress is logged each time this many more records have been cut
LOG_EVERY = 500

_CUTTER = None  # (bundle, segmenting session) of a worker process


def _start_worker(bundle_dir: str, threads: int) -> None:
    """Load the segmenter in a new worker process, which ignores Ctrl-C for its whole life.

    Ctrl-C reaches every process of the terminal's group. A worker stopped by it while it started
    (importing torch takes seconds), or while it waited for work, printed tracebacks over the
    parent's "Interrupted:" line, and once two workers were left waiting for ever. So a worker
    is spawned with SIGINT ignored (`_sigint_ignored`: a new Python keeps an ignored SIGINT
    ignored, from its first instruction), it is ignored here again for a worker started some
    other way, and the parent, which is interrupted, stops the workers (`CropPool.close`)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import cv2
    import torch

    from ..bundle import load_bundle

    global _CUTTER
    torch.set_num_threads(threads)
    cv2.setNumThreads(threads)
    bundle = load_bundle(Path(bundle_dir), check=("segmenter",))  # the classifier is retrained
    _CUTTER = (bundle, segmenting_session(bundle, "cpu"))


@contextmanager
def _sigint_ignored():
    """SIGINT ignored in this process meanwhile (processes it spawns inherit that), where this
    is the main thread, the only one that may set a handler; the handler is put back after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def segmenting_session(bundle, device: str):
    """A torch session of `bundle`'s segmenter alone on `device`, for cutting crops."""
    import torch

    from ..nets import TorchSession, build_segmenter, load_weights

    seg = load_weights(build_segmenter(bundle.meta), bundle.path("segmenter"))
    return TorchSession(seg, torch.nn.Identity(), device)


def cut(kind: str, records: list, session, bundle, size: int, margin: float, log=print) -> tuple:
    """(crops, labels, the images or boxes without a found cell, why each unreadable image
    cannot be read) of `records`: "cells" (single-cell images) or "fields" (images with
    labelled boxes) or "lab" (a lab's records, either kind), cut with `session` and `bundle` in
    this process."""
    from .classifier import extract_field_crops, extract_lab_crops, extract_single_cell_crops

    if kind == "lab":
        return extract_lab_crops(records, session, bundle, size, margin, log)
    if kind == "fields":
        return extract_field_crops(records, session, bundle, size, margin)
    if kind == "cells":
        return extract_single_cell_crops(records, session, bundle, size, margin, log)
    raise ValueError(f"unknown kind of records: {kind!r}")


def _cut_in_worker(kind: str, records: list, size: int, margin: float) -> tuple:
    bundle, session = _CUTTER
    return cut(kind, records, session, bundle, size, margin, log=lambda _: None)


class CropPool:
    """`workers` processes of `threads` threads, each with the segmenter of the bundle in
    `bundle_dir`; they start at the first `cut` and stop at `close` (or the end of a `with`)."""

    def __init__(self, bundle_dir: Path, workers: int, threads: int = 1):
        self.bundle_dir, self.workers, self.threads = Path(bundle_dir), workers, threads
        self._pool = None

    def cut(self, kind: str, records: list, size: int, margin: float, log=print) -> tuple:
        """As `cut` above, the chunks shared out among the processes."""
        if not records:
            return [], [], [], []
        if self._pool is None:
            import multiprocessing

            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_start_worker,
                                             initargs=(str(self.bundle_dir), self.threads))
            log(f"cutting crops in {self.workers} processes of {self.threads} thread"
                f"{'s' if self.threads > 1 else ''} each")
        step = max(1, min(CHUNK, -(-len(records) // (4 * self.workers))))
        chunks = [records[i:i + step] for i in range(0, len(records), step)]
        with _sigint_ignored():  # the first submits spawn the workers
            futures = deque(self._pool.submit(_cut_in_worker, kind, chunk, size, margin)
                            for chunk in chunks)
        crops, labels, missed, unreadable, done, t0 = [], [], [], [], 0, time.time()
        try:
            for chunk in chunks:
                c, y, m, u = futures.popleft().result()   # a chunk's crops are held once, not twice
                crops += c
                labels += y
                missed += m
                unreadable += u
                if (done + len(chunk)) // LOG_EVERY > done // LOG_EVERY:
                    log(f"  crops {done + len(chunk)}/{len(records)} ({time.time() - t0:.0f}s, "
                        f"{len(missed)} without a cell, {len(unreadable)} unreadable)")
                done += len(chunk)
        except BrokenProcessPool as exc:
            raise RuntimeError("a crop-cutting process stopped (its error is printed above, unless it ran "
                               "out of memory); --threads 1 cuts the crops in this process") from exc
        return crops, labels, missed, unreadable

    def close(self, stop: bool = False) -> None:
        """Stop the workers: once their chunks are cut, or with `stop` (an interrupt, an error)
        at once; they ignore Ctrl-C, so `stop` terminates them."""
        if self._pool is not None:
            if stop:
                _terminate_workers(self._pool)
            self._pool.shutdown(cancel_futures=True)
            self._pool = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        self.close(stop=exc_type is not None)


def _terminate_workers(pool: ProcessPoolExecutor) -> None:
    """SIGTERM to the pool's worker processes (which ignore SIGINT): by the executor's own
    `terminate_workers` (Python 3.14 on), else through its process table, the only way before."""
    terminate = getattr(pool, "terminate_workers", None)
    if terminate is not None:
        terminate()
        return
    for process in list((getattr(pool, "_processes", None) or {}).values()):
        process.terminate()
