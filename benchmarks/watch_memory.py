"""A watcher's memory over a long session: `wbc-batch watch` fed one field at a time, as a
scanner feeds it.

`benchmarks/memory_growth.py` measures a batch: memory the analysis freed and glibc kept grew
to 1.9 GB over 150 fields of random sizes, and to 3.8 GB over 1,000. `watch` gives that memory
back each time its queue empties after analysing (`wbc_batch.heap.release_free_memory`). This
measures what that leaves: it starts a real `wbc-batch watch INBOX -o OUT` subprocess (the
shipped models, `--no-overlays`), then drops generated smears (`sample.make_smear`, two WBCs
each, of random sizes from 300 x 300 to 1100 x 900 px: the fields memory_growth.py draws with
its default seed) into INBOX one at a time, each once the one before is in the ledger (a
scanner slower than the analysis), and every `--every` images prints the watcher's resident
memory (VmRSS, read from /proc a second after its poll interval, when it has found its queue
empty and trimmed), its highest so far (VmHWM), and the median seconds from a field's arrival
to its result in the ledger (which include `--settle` and the `--poll` wait). A field the
watcher records as an error counts as finished, and the errors are counted at the end. At the
end it stops the watcher with SIGTERM (as a scheduler or `kill` does: SIGINT would be ignored
where this script runs in the background of a shell without job control, and the watcher keeps
a signal ignored that it was started with).

    python benchmarks/watch_memory.py --images 200
    python benchmarks/watch_memory.py --images 200 --backend onnx

Linux only (/proc). Not a test: the lead runs it with the real models.
"""

from __future__ import annotations

import argparse
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def status_mb(pid: int, field: str) -> int:
    """`field` (VmRSS, VmHWM) of process `pid` in MB, from /proc."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) // 1024
    raise RuntimeError(f"no {field} in /proc/{pid}/status")


def finished(ledger: Path, status: str = "") -> int:
    """How many files the ledger holds a result for, or with `status` that status (0 before
    it exists)."""
    if not ledger.exists():
        return 0
    con = sqlite3.connect(f"file:{ledger}?mode=ro", uri=True, timeout=5)
    where = "status = ?" if status else "status != ?"
    try:
        return con.execute(f"SELECT COUNT(*) FROM files WHERE {where}",
                           (status or "pending",)).fetchone()[0]
    except sqlite3.OperationalError:  # the table is not made yet
        return 0
    finally:
        con.close()


def drop(inbox: Path, i: int, rng) -> None:
    """Write field i into `inbox` whole: encoded beside it, then renamed in."""
    from wbc_batch.sample import encode_image, make_smear

    w, h = int(rng.integers(300, 1100)), int(rng.integers(300, 900))  # as memory_growth.py
    data = encode_image(make_smear(w, h, n_wbc=2, seed=i).rgb, ".png")
    tmp = inbox.parent / f"field{i:05d}.png"
    tmp.write_bytes(data)
    os.replace(tmp, inbox / tmp.name)


def report(n: int, pid: int, waits: list, t0: float) -> None:
    """One line: after `n` images, the watcher's memory and the median wait for a result."""
    print(f"{n} images: resident {status_mb(pid, 'VmRSS')} MB, highest {status_mb(pid, 'VmHWM')}"
          f" MB, median {statistics.median(waits):.2f} s from arrival to result, "
          f"{time.time() - t0:.0f} s", flush=True)


def positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError("must be 1 or more")
    return n


def main(argv=None) -> int:
    import numpy as np

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=positive, default=200)
    ap.add_argument("--every", type=positive, default=25, help="print every N images (default 25)")
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--settle", type=float, default=0.5, help="watch --settle (default 0.5 s)")
    ap.add_argument("--poll", type=float, default=0.5, help="watch --poll (default 0.5 s)")
    ap.add_argument("--timeout", type=float, default=120.0,
                    help="give up when one field takes longer than this (s)")
    args = ap.parse_args(argv)
    if not Path("/proc/self/status").exists():
        sys.exit("this benchmark reads /proc (Linux)")
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="wbc-watch-memory-") as tmp:
        inbox, out = Path(tmp) / "inbox", Path(tmp) / "out"
        inbox.mkdir()
        cmd = [sys.executable, "-m", "wbc_batch", "watch", str(inbox), "-o", str(out),
               "--no-overlays", "--backend", args.backend, "--threads", str(args.threads),
               "--settle", str(args.settle), "--poll", str(args.poll)]
        log = open(Path(tmp) / "watch.log", "w+")  # a file: a pipe nobody reads could fill
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        ledger, waits, t0 = out / "ledger.sqlite", [], time.time()
        print(f"watch pid {proc.pid}: {' '.join(cmd[3:])}")
        try:
            for i in range(args.images):
                if i and (i % args.every == 0):
                    time.sleep(args.poll + 1.0)  # the queue has emptied: the watcher trims
                    report(i, proc.pid, waits, t0)
                drop(inbox, i, rng)
                start = time.time()
                while finished(ledger) < i + 1:
                    gone = proc.poll() is not None
                    if gone or time.time() - start > args.timeout:
                        log.seek(0)
                        why = (f"watch exited {proc.returncode}" if gone else
                               f"field {i} took over {args.timeout:g} s")
                        sys.exit(f"{why}; its log ends:\n{log.read()[-2000:]}")
                    time.sleep(0.05)
                waits.append(time.time() - start)
            time.sleep(args.poll + 1.0)  # the queue empties: the watcher trims
            report(args.images, proc.pid, waits, t0)
            print(f"{finished(ledger, 'error')} of them recorded as errors")
        finally:
            if proc.poll() is None:
                stop = time.time()
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=120)
                    print(f"watch exited {proc.returncode}, {time.time() - stop:.1f} s after "
                          "SIGTERM")
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                    print("watch did not exit within 120 s of SIGTERM: killed")
            log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
