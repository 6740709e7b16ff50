"""`wbc-batch watch`: analyse scanner output as it lands in an inbox folder, exactly once.

The watcher owns no results: every decision goes through the ledger (`wbc_batch.ledger`) in
OUT, and the reports are rebuilt from the ledger. What it does with each file:

Ready. A file is analysed only once it is completely written: its size and mtime were unchanged
over the settle interval (`--settle`, two observations at least that far apart; on POSIX a file
whose mtime and ctime are both older than the interval and than `SHARE_CLOCK_SKEW` counts as
settled at first sight, since ctime cannot be set back by a copying tool, and a share's clock
may lag this one's by minutes), and it decodes. A file that does not decode (or
whose overlay cannot be written) is retried with exponential backoff (`RETRY_BASE` seconds, which
the CLI sets to `--settle`, doubling, capped at `RETRY_CAP`) up to `MAX_ATTEMPTS` tries of the
same version (`--max-attempts`); then it is recorded as an error (it shows in images.csv and the
Errors sheet) and never stops the watcher. With the defaults that is 5 tries over about 30 s.
An image whose overlay or mask could not be written is then an error, as in `run`; that failure
is OUT's (a full disk), not the image's, so it is analysed again at the next start. A file that
changes (new size or mtime) starts again from attempt one, so a scanner that stalls
mid-file is never failed for good: once it finishes writing, the file is analysed. A file that
decodes but whose analysis fails is complete, so that failure is recorded at once (as `run`
does). A file modified while it was being analysed has its result thrown away and is analysed
again once it has settled.

Same content, other name. Files are counted by content. A byte-identical copy of a file already
analysed is not analysed or counted again: it gets a row in images.csv with status duplicate and
"duplicate of <name>"; it is not a failure (not in the Errors sheet, not in `--once`'s exit code).
A copy of a file recorded as an error is analysed on its own, as `run` reads a copy of a file it
could not read: it fails (or not) in its own sample.
When the earlier file is gone from the inbox, or no longer holds that content (two files that
swapped names), the new one is taken as that file renamed or moved: its result (and overlay)
moves to the new name, without a new analysis, and the earlier name, if still there, is new.

Changed file. A file whose content changes under the same name is analysed again and its new
result replaces the old rows. A file touched or re-written with the same bytes is not, unless it
was recorded as an error: touching a file that failed tries it again. A settled
file is compared by size, mtime and ctime, so a replacement of the same size whose copy kept the
old mtime (`cp -p`, `rsync -t`) is seen too: no copying tool can set ctime back. A new ctime with
the same bytes (a chmod, a rename within the share, a backup tool's attributes) costs one re-read
of the file to hash it, and keeps its result. A new file is read once: the bytes hashed are the
bytes decoded and analysed.

Files that cannot be read at all. A file listed but not readable (permissions, a scanner holding
it open) is retried with the backoff above, then recorded as an error, which stands until the
file changes (the ledger keeps the version given up on, however it was first seen). An analysed
file (or a duplicate) that changes on disk and cannot be read (chmod 000) keeps its row: after
the same tries its new stat is taken as the same version, until it changes again. A link whose
target is missing (an unmounted share) gets an error row, as in `run`, and is analysed once the
target is back. A name whose bytes are not UTF-8 cannot be a ledger key: it gets an error row
under its escaped form asking for a rename.

Deleted file. Results of analysed files stay in the reports when the file leaves the inbox
(scanners and people archive files after they have been processed; a share that drops out must
not empty the report). Files that were pending, had failed or were duplicates are forgotten
when they disappear (a duplicate's original keeps being counted; if the original goes, a
remaining copy takes its place: its result and drawings, if it was analysed, else a new
analysis).

Reports: rebuilt from the ledger after each image while the queue is empty, and under load at
most every `REPORT_INTERVAL` seconds; both stretched to `REPORT_COST_FACTOR` times the last
rebuild's duration, so that rebuilding a large report never takes more than about 5 % of the
time, also when a scanner adds one image every few seconds; always
written atomically. At start the reports are rebuilt from the ledger at the first idle moment or
after that interval (a crash may have left them behind the ledger), and temporary files of
writes a kill interrupted are removed. Once that first rebuild is written, the reports no
selected writer wrote (report.xlsx after a restart with `--report csv`) are removed, as `run
--overwrite` removes them: they would never be updated again. Reports that cannot be written
(disk full) are tried again `REPORT_RETRY` seconds later; nothing else stops, and every result
is in the ledger.

Memory: when the queue empties after images were analysed, the C heap's free memory goes back
to the system (`heap.release_free_memory`), so that a watcher left running between a scanner's
batches does not keep the memory its analyses freed. The next image is then slower to analyse,
as it faults its memory in again; no image is waiting for it then.

Drawn images: an image's overlay (and mask) is written when it is analysed, moves with a
rename, and is removed once its row no longer holds that result: new content waiting to be
analysed again, a duplicate, an error, or a row forgotten. So no overlay shows cells that no
report counts.

The inbox folder: while it cannot be scanned (a share that dropped out) the watcher says so once,
keeps every result and tries again at each poll; it says when the inbox is back. With filesystem
events the folder is checked every `INBOX_CHECK` seconds: one removed and made again, or a disk
mounted over it, no longer delivers events, so the watcher starts watching the new folder.

Stopping: SIGINT, SIGTERM or SIGHUP (a closed terminal, a dropped SSH session) lets the current
image finish, flushes the reports and exits 0 (a second SIGINT, or a SIGTERM after a SIGINT or
a SIGTERM, stops at once, `interrupts.stop_requests`; the ledger stays consistent either way).
A SIGHUP set to be ignored at start (`nohup`) stays ignored.
`--once` analyses the backlog, including the retries of files that fail to decode, and exits with
a summary of the session; files still being written are left pending for the next run. Its exit
code is 1 when any file is recorded as an error, as with `run`, and 128 + the signal (130 for
SIGINT, 143 for SIGTERM, 129 for SIGHUP) when a signal stopped it before the backlog was done.
With or without `--once`, the exit code is 1 when the last reports could not all be written (a
report writer failed, a full disk): the next start writes them again.
"""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import sqlite3
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

from . import heap, interrupts
from .bundle import sha256_file
from .config import RunConfig
from .devices import fallback_is_news
from .errors import PipelineError, ReportError, WatchError
from .imageio import NotASmearError, decode_smear, link_fault, read_failure, read_file, read_smear
from .ledger import DONE, DUPLICATE, ERROR, LEDGER_NAME, LEDGER_WAIT_S, PENDING, Ledger
from .output_folder import OUTPUT_LOCK, REPORTS_LIST, earlier_reports, remove_report
from .pipeline import OUTPUT_FAILED, analyse_or_fail, output_failed, samples_not_finished
from .plugins import Lifecycle
from .reports import printable
from .results import (ImageResult, across_samples_line, bare_glass_line, failure_lines, one_line,
                      sample_of)
from .resume import open_ledger
from .scale_spread import advice

#: seconds a file's size and mtime must stay unchanged before it is read
DEFAULT_SETTLE = 2.0
#: tries of one file version before it is recorded as an error
MAX_ATTEMPTS = 5
#: first retry delay (s); doubles per failed attempt, capped at RETRY_CAP
RETRY_BASE = 2.0
RETRY_CAP = 60.0
#: under load, reports are rebuilt at most this often (s)
REPORT_INTERVAL = 3.0
#: ... and no more often than this many times the duration of the last rebuild
REPORT_COST_FACTOR = 20
#: with filesystem events, the inbox is still rescanned this often (s), for missed events
SAFETY_RESCAN = 30.0
#: filesystem events that change nothing: the watcher's own reading of each image raises them
#: (inotify's open and close-without-write, which watchdog reports on Linux); taken for changes,
#: they asked for a scan after every image
READ_EVENTS = frozenset({"opened", "closed_no_write"})
#: seconds before writing the reports again after a failed write (disk full, say)
REPORT_RETRY = 30.0
#: a continuous watch says the spread warning again when the size it suggests has moved by this
#: share of the size it said (`_note_spread`)
RESAY_SIZE_CHANGE = 0.10
#: scans are at least this many times their own duration apart (at most ~5 % of the time)
SCAN_COST_FACTOR = 20
#: polling interval used when filesystem events cannot be had and no --poll was given
FALLBACK_POLL = 5.0
#: with filesystem events, the inbox folder is checked this often (s): one stat, to see that it is
#: still the folder watched (not removed and made again, nor a disk mounted over it)
INBOX_CHECK = 2.0
#: OUT's ledger and lock file are checked at least this often (s) while the watcher waits, and
#: before each image and each rebuild of the reports (a few stats): deleted or replaced while
#: the watcher runs (a cleanup script, OUT removed), they are written back and the watcher stops
OUT_CHECK = 2.0
#: how far (s) a share's clock may lag this machine's: a file whose times are older than
#: this and than --settle is settled at first sight (`_observe`); a younger one is watched for
#: --settle, since on a share whose clock is behind, a file still being written looks old
#: (SMB with Kerberos refuses clocks 5 minutes apart)
SHARE_CLOCK_SKEW = 300.0
#: a gap between the wall clock's and the monotonic clock's progress above this (s) is the
#: system clock being set (NTP stepping it, a user), not time a call took (`_follow_clock`)
CLOCK_STEP = 2.0
#: seconds a plugin that failed in a lifecycle hook is left out of them before it is called again
PLUGIN_RETRY_S = 600.0


@dataclass(frozen=True)
class WatchOptions:
    """How `watch` behaves, beyond what `run` shares (`RunConfig`).

    poll: None uses filesystem events (watchdog), with a rescan every SAFETY_RESCAN seconds;
        a number of seconds polls the inbox at that interval (network shares deliver no events).
    """

    settle: float = DEFAULT_SETTLE
    poll: Optional[float] = None
    once: bool = False
    max_attempts: int = MAX_ATTEMPTS
    retry_base: float = RETRY_BASE
    retry_cap: float = RETRY_CAP
    report_interval: float = REPORT_INTERVAL

    def backoff(self, attempts: int) -> float:
        """Seconds to wait after the `attempts`-th failed try."""
        return min(self.retry_cap, self.retry_base * 2 ** max(0, attempts - 1))


def _utf8(name: str) -> bool:
    """False for a file name whose bytes are not UTF-8 (Python keeps them as lone surrogates)."""
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


#: errors of a path that no longer leads to a file: missing, a file where a folder was, a loop
_GONE = (errno.ENOENT, errno.ENOTDIR, errno.ELOOP)


def _stat_key(st) -> tuple:
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _file_id(path: Path) -> Optional[tuple]:
    """(st_dev, st_ino) of a file or folder, None when it cannot be reached: one removed and
    made again, replaced by a rename, or a disk mounted over a folder, has another."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _content(path: Path) -> tuple:
    """(sha256, bytes) of the file, read whole. One too large to hold (far beyond any image
    `decode_smear` takes) is hashed in chunks instead, with None for its bytes: its analysis
    reads it again and fails as `run` does, and a changed file is never taken for its earlier
    version.

    :raises OSError: as `imageio.read_file`."""
    try:
        data = read_file(path)
    except MemoryError:
        return sha256_file(path), None
    return hashlib.sha256(data).hexdigest(), data


def _read_and_decode(path: Path) -> tuple:
    """The read-ahead's work: (the file's bytes, its RGB), or (the bytes or None, the exception
    that stopped the read or the decoding), for `Watcher._settled_content` and `_decoded`."""
    try:
        data = read_file(path)
    except (OSError, MemoryError) as exc:
        return None, exc
    try:
        return data, decode_smear(data)
    except Exception as exc:  # noqa: BLE001 - raised by `_decoded`, in the analysis's turn
        return data, exc


def _decoded(ahead, data: Optional[bytes], path: Path):
    """The RGB `_analyse` analyses: the read-ahead's (the future of `_read_and_decode`, for this
    version), else `data`, the bytes hashed, decoded now, else the file read now.

    :raises ImageReadError: or what else the decoding raised (NotASmearError for a mask)."""
    if ahead is not None:
        read, out = ahead.result()
        if read is not None:  # read there; decoded, or why not
            if isinstance(out, BaseException):
                raise out
            return out
    if data is not None:
        return decode_smear(data)
    return read_smear(path)


def _is_folder(path: Path) -> bool:
    """Whether `path` is a folder now (False for a share that cannot be reached at all)."""
    try:
        return path.is_dir()
    except OSError:
        return False


def _n(count: int, word: str) -> str:
    """'1 error', '2 errors'."""
    return f"{count} {word}{'' if count == 1 else 's'}"


@dataclass
class _Seen:
    """What the watcher has observed of a file that is not settled in the ledger yet."""

    key: tuple          # (size, mtime_ns, ctime_ns) at the last observation
    since: float        # when that key was first observed
    not_before: float = 0.0   # scheduled retry time
    changed: bool = False     # the key changed at least once while observed
    rereads: int = 0          # failed reads of a done file's new version (`_reread_failed`)


@dataclass
class _Job:
    """One image being analysed (see `Watcher._claim`)."""

    rel: str
    path: Path
    key: tuple
    sha: str
    index: int
    total: int
    result: Optional[ImageResult] = None
    future: object = None
    retry: bool = False  # a failure of this kind is retried (read or write errors)
    #: the file's bytes as hashed (`Watcher._settled_content`), decoded by `_analyse` unless
    #: the read-ahead decoded them already; dropped once decoded
    data: Optional[bytes] = None
    read_s: float = 0.0  # the read's seconds (waiting for the read-ahead's, if it read them)


@dataclass
class Counters:
    analysed: int = 0
    retried: int = 0
    duplicates: int = 0
    renamed: int = 0
    unchanged: int = 0
    stale: int = 0  # analysed while still being written, result thrown away


def _held_by_another(exc: sqlite3.OperationalError) -> bool:
    """Whether SQLite gave up waiting for another connection's lock ("database is locked")."""
    text = str(exc).lower()
    return "locked" in text or "busy" in text


class Watcher:
    """The watch loop over one inbox, one OUT, one ledger and one `pipeline.Runner`.

    Of the runner it uses `process_array(rgb, rel) -> (ImageResult, ImageAnalysis)`,
    `save_outputs(rel, rgb, analysis)` and `write_reports(results, **facts)` (plus `device`
    and `fallback_note` when present); `pm` (optional) receives the lifecycle hooks.
    Single-threaded apart from one reader and one writer thread; `stop()` may be called from a
    signal handler or another thread.
    """

    def __init__(self, config: RunConfig, runner, ledger: Ledger,
                 options: WatchOptions = WatchOptions(), pm=None, stream=None, quiet=None,
                 lock=None):
        """`lock`: the handle of OUT's lock file (`_lock`), when this watcher holds it: a lock
        file deleted or replaced under it is noticed (`_check_out`)."""
        self.config = config
        self.inbox = Path(config.input_dir)
        self.out = Path(config.output_dir)
        self.runner = runner
        self.ledger = ledger
        self.options = options
        self.pm = pm
        self.stream = stream if stream is not None else sys.stderr
        self.quiet = config.quiet if quiet is None else quiet
        self.counters = Counters()
        self._analysed_at_trim = 0  # `counters.analysed` when the heap was last trimmed
        self._seen: dict = {}
        self._stop = False
        self._wake = threading.Event()
        self._last_scan = 0.0
        self._scan_seconds = 0.0
        self._scan_requested = True
        self._dirty = True  # reports are rebuilt once at start: a crash may have left them behind
        self._last_flush = time.time()
        self._flush_seconds = 0.0
        self._report_failed = False
        self._reports_checked = False  # stale reports of other writers removed (`_flush`)
        # the wide spread of the WBC sizes as last said (`_note_spread`): None, not said (or
        # narrowed since); 0.0, said without a size to try; else the size said
        self._spread_said: Optional[float] = None
        self._earlier_reports = earlier_reports(self.out)  # the last session's, by its run.json
        self._status_text = ""
        self._status_time = 0.0
        self._index = 0      # images done (reported) so far
        self._indices: dict = {}  # rel -> its index in the hooks, from its first attempt to done
        self._next_index = 0
        self._observer = None
        self._poll = options.poll
        self._inflight: Optional[_Job] = None
        self._pool: Optional[ThreadPoolExecutor] = None
        self._reader: Optional[ThreadPoolExecutor] = None
        self._reads: dict = {}
        self._warned: set = set()  # discovery's warnings already given (`_warn_once`)
        self._inbox_lost = False  # the last scan could not read the inbox (said once)
        self._inbox_id: Optional[tuple] = None  # the folder the observer watches (`_file_id`)
        self._observer_lost = False  # the observer saw the inbox folder itself removed
        self._last_id_check = 0.0
        self._clock = (time.time(), time.monotonic())  # the marks `_follow_clock` compares
        self._signal: Optional[int] = None  # the signal that stopped the watcher, if one did
        self._errors: list = []  # (rel, error) recorded as errors this session, for --once
        # a plugin failing in a hook never stops the watcher, nor is it silenced for good
        self._lifecycle = Lifecycle(pm, retry_after=PLUGIN_RETRY_S)
        self._lock = lock
        # the files this watcher writes its state to, as opened (`_check_out`)
        self._out_id = _file_id(self.out)
        self._ledger_id = _file_id(ledger.path)
        self._wal_id = _file_id(_wal(ledger.path))  # held open by the ledger's connection
        self._relock_failed: Optional[str] = None  # why OUT's lock could not be taken again
        self._lock_id = _handle_id(lock)
        self._last_out_check = time.time()
        self._out_lost: Optional[str] = None  # why OUT's ledger or lock is no longer ours

    # --- control ------------------------------------------------------------------------------

    def stop(self, signum: Optional[int] = None) -> None:
        """Ask the loop to stop after the current image (safe from a signal handler). `signum`:
        the signal that asked, so that `--once` cut short exits with 128 + it."""
        if signum is not None and self._signal is None:
            self._signal = signum
        self._stop = True
        self._wake.set()

    def request_scan(self) -> None:
        """Something changed in the inbox (a filesystem event): rescan soon."""
        self._scan_requested = True
        self._wake.set()

    # --- main loop ----------------------------------------------------------------------------

    def run(self) -> int:
        """Watch until `stop()` (or, with --once, the end of the backlog); returns the exit
        code: 0; 1 when the last reports could not be written, when the ledger cannot be
        written (a full disk: said in one line, the reports flushed from what it holds), or
        after --once with a file in error; 128 + the signal when one stopped --once before the
        backlog was done."""
        try:
            return self._run()
        except sqlite3.OperationalError as exc:  # "database or disk is full", "disk I/O error"
            ledger = self.out / LEDGER_NAME
            if _held_by_another(exc):  # a database browser left with a write open, say
                mend = (f"another program has held {ledger} for more than {LEDGER_WAIT_S} s: "
                        "close it (a database browser with unsaved changes, say)")
            else:
                mend = f"free space in {self.out} (or mend the disk)"
            self._say(f"the ledger {ledger} cannot be written ({exc}): the watcher stops. Every "
                      f"result recorded before is kept; {mend} and start it again, and the "
                      "images not recorded yet are analysed then", error=True)
            self._dirty = True
            # the reports of what the ledger holds, if they fit
            self._flush(force=True, last=True)
            return 1

    def _run(self) -> int:
        start = time.time()
        finished = False  # --once got to the end of the backlog
        if not self.options.once:
            self._start_observer()
        try:
            self._say(self._start_line())
            note = getattr(self.runner, "fallback_note", "")
            if note:
                self._say(f"Note: {note}", error=fallback_is_news(self.config.device))
            retried = self.ledger.retry_errors(OUTPUT_FAILED)
            if retried:
                self._say(f"{retried} image(s) whose overlay or mask could not be written are "
                          "analysed again")
            self._scan(time.time())
            self._hook("wbc_run_start", config=self.config, total=len(self._seen))
            while not self._stop:
                self._follow_clock()
                now = time.time()
                if self._check_out(now):
                    break
                if self._scan_due(now):
                    self._scan(now)
                batch = self._ready(now)
                for k, rel in enumerate(batch):
                    if self._stop or self._check_out(time.time()):
                        break
                    following = batch[k + 1] if k + 1 < len(batch) else None
                    for stale in set(self._reads) - {rel, following}:
                        del self._reads[stale]  # read ahead for a batch given up on
                    if following is not None:
                        self._read_ahead(following)  # decoded while `rel` is analysed
                    self._process(rel)
                    self._status()
                    if self._check_out(time.time()):
                        break  # before the reports: OUT may be another process's now
                    # before the scan check: with a scan due after every image (a scanner
                    # adding files all the time), the reports were rebuilt only once the queue
                    # was empty, their "complete" standing for hours (at most every interval)
                    self._flush(force=False, busy=True)
                    if self._scan_due(time.time()):
                        break  # new files may sort before the rest of this batch
                if self._stop:
                    break
                if not batch:
                    self._flush(force=False, busy=False)
                    if self.options.once and not self._waiting():
                        finished = True
                        break
                    self._status()
                    if self.counters.analysed != self._analysed_at_trim:  # going idle
                        self._analysed_at_trim = self.counters.analysed
                        heap.release_free_memory()  # the memory the analyses freed
                    self._sleep(time.time())
        finally:
            self._stop_observer()
            try:
                self._drain()
            finally:
                self._reads.clear()
                for pool in (self._pool, self._reader):
                    if pool is not None:
                        pool.shutdown(wait=True, cancel_futures=True)
                self._pool = self._reader = None
        if self._check_out(time.time()):  # a stop or the end of --once just after a deletion
            code = self._lost_out(start)
            if self.options.once:  # as --once's closing lines name them, for a cron job's mail
                for line in failure_lines(self._errors):
                    self._say(line, error=True)
            return code
        self._flush(force=True, last=True)
        self._status(final=True)
        cut_short = self.options.once and self._signal is not None and not finished
        # --once whose inbox went away (a share dropped out): its files vanished from the queue,
        # which is no end of the backlog, and a cron job must not take it for one
        unreachable = self.options.once and not cut_short and not _is_folder(self.inbox)
        if self.options.once:
            self._summary(self._signal if cut_short else None, unreachable)
        elif self._signal is not None:
            self._stopped_line(self._signal)
        results = self.ledger.results()
        self._hook("wbc_run_end", config=self.config, results=results,
                   seconds=time.time() - start)
        if cut_short:  # as `run` when interrupted: a cron job must not take it for done
            return 128 + self._signal
        if self._dirty or unreachable:  # the last reports could not be written (said above)
            return 1
        if self.options.once and self.ledger.counts()[ERROR]:
            return 1
        return 0

    # --- OUT's own files -----------------------------------------------------------------------

    def _check_out(self, now: float) -> bool:
        """Whether OUT, its ledger (and the ledger's write-ahead log) and its lock file at
        their paths are still the ones this watcher opened (a few stats: asked before each
        image, each rebuild of the reports and the session's end, and every `OUT_CHECK` s while
        waiting). A ledger deleted (OUT removed, a cleanup script) had taken every later
        result with it while the watcher said they were safe, and the next start was refused
        (reports without a ledger); a lock file gone let a second watcher write the same OUT.
        A lock file gone alone is taken again, said, and the watcher goes on; otherwise
        returns True and stops the watcher (`_lost_out`)."""
        if self._out_lost is not None:
            return True
        self._last_out_check = now
        if self._out_id is not None and _file_id(self.out) != self._out_id:
            self._out_lost = f"its output folder {self.out} was removed or moved"
        elif _file_id(self.ledger.path) != self._ledger_id:
            self._out_lost = f"its ledger {self.ledger.path} was deleted or replaced"
        elif self._wal_id is not None and _file_id(_wal(self.ledger.path)) != self._wal_id:
            self._out_lost = (f"its ledger's write-ahead log {_wal(self.ledger.path)} was "
                              "deleted or replaced")
        elif self._lock_id is not None and _file_id(self.out / OUTPUT_LOCK) != self._lock_id:
            why = self._relock()
            if why is None:
                self._say(f"{self.out / OUTPUT_LOCK} was deleted or replaced while the watcher "
                          "ran (a cleanup of old files?); it took OUT's lock again and goes on",
                          error=True)
                return False
            self._out_lost = f"its lock file {self.out / OUTPUT_LOCK} was deleted or replaced"
            self._relock_failed = why
        if self._out_lost is not None:
            self._stop = True
        return self._out_lost is not None

    def _relock(self) -> Optional[str]:
        """Take OUT's lock again (its lock file gone): None when held, else why not (another
        run or watcher holds it, or the folder cannot be written)."""
        from .output_folder import OutputBusyError, lock_output

        try:
            new = lock_output(self.out)
        except OutputBusyError:
            return "busy"
        except PipelineError as exc:
            return str(exc)
        if self._lock is not None:
            self._lock.close()
        self._lock, self._lock_id = new, _handle_id(new)
        return None

    def _lost_out(self, start: float) -> int:
        """Stop after `_check_out` found OUT's files gone: take OUT's lock again and write the
        ledger back from the copy this watcher still holds open, so that a restart resumes with
        every result; where another run or watcher holds OUT now, or it cannot be written,
        write nothing there. Exit 1: a service manager restarts it, and the restart writes the
        reports."""
        results = self.ledger.results()
        counts = self.ledger.counts()
        self._hook("wbc_run_end", config=self.config, results=results, seconds=time.time() - start)
        self._status(final=True)
        why = self._relock_failed
        lock_gone = self._lock_id is not None and _file_id(self.out / OUTPUT_LOCK) != self._lock_id
        if why is None and lock_gone:
            why = self._relock()
        if why is not None:
            return self._out_taken(counts, why)
        if _file_id(self.ledger.path) == self._ledger_id and (
                self._wal_id is None or _file_id(_wal(self.ledger.path)) == self._wal_id):
            self._say(f"Stopped: {self._out_lost} while the watcher ran; its ledger, which is "
                      "where it was, keeps every result. Start the watcher again: it goes on "
                      "from there", error=True)
            return 1
        try:
            self.ledger.restore()
            self._ledger_id = self._wal_id = None  # closed: the end of the session
        except (OSError, sqlite3.Error) as exc:
            self._say(f"Stopped: {self._out_lost} while the watcher ran, and its ledger could "
                      f"not be written back ({exc}); the images recorded since the last start "
                      "are analysed again at the next start", error=True)
            return 1
        drawings = (" (drawings that went with the old folder are not made again)"
                    if self._out_lost.startswith("its output folder") else "")
        self._say(f"Stopped: {self._out_lost} while the watcher ran; the ledger was written "
                  f"back from the watcher's open copy ({counts[DONE]} processed, "
                  f"{_n(counts[ERROR], 'error')}, {_n(counts[PENDING], 'file')} pending), so no "
                  f"result is lost{drawings}. Start the watcher again: it writes the reports "
                  "then", error=True)
        return 1

    def _out_taken(self, counts: dict, why: str) -> int:
        """`_lost_out` where OUT's lock cannot be taken again (`why`: "busy" when another run
        or watcher holds it): nothing more is written there."""
        if why == "busy":
            where = f"another run or watcher has locked {self.out} since"
        else:
            where = f"OUT cannot be locked again ({why})"
        if _file_id(self.ledger.path) == self._ledger_id:  # the ledger there is still this one
            self._say(f"Stopped: {self._out_lost} while the watcher ran, and {where}; the ledger "
                      f"there{', which it may be using,' if why == 'busy' else ''} holds this "
                      f"watcher's results ({counts[DONE]} processed). Start the watcher again "
                      f"once {'the other is done' if why == 'busy' else 'that is mended'}: it "
                      "goes on from there", error=True)
        else:
            self._say(f"Stopped: {self._out_lost} while the watcher ran, and {where}: the "
                      f"ledger ({counts[DONE]} processed) is not written there. Start the watcher "
                      "again with another output folder; the images are analysed again then",
                      error=True)
        return 1

    def _start_line(self) -> str:
        if self.options.once:
            how = "the backlog only (--once)"
        elif self._poll is not None:
            how = f"polling every {self._poll:g} s"
        else:
            how = "filesystem events"
        device = getattr(self.runner, "device", self.config.device)
        return (f"watching {self.inbox} -> {self.out}: {how}; backend {self.config.backend} on "
                f"{device}; settle {self.options.settle:g} s. "
                "Ctrl-C stops after the current image.")

    def _scan_gap(self) -> float:
        """Least time between scans: scanning a huge inbox must not eat the analysis time."""
        return max(0.5, SCAN_COST_FACTOR * self._scan_seconds)

    def _scan_due(self, now: float) -> bool:
        gap = self._scan_gap()
        if self._scan_requested:
            return now - self._last_scan >= gap
        if self.options.once:
            return False
        if self._inbox_replaced(now):
            self._scan_requested = True  # `_scan` starts watching the new folder
            return now - self._last_scan >= gap
        interval = self._poll if self._poll is not None else SAFETY_RESCAN
        return now - self._last_scan >= max(interval, gap)

    def _follow_clock(self) -> None:
        """Move the watcher's marks of wall-clock time (last scan, rebuild and inbox check,
        each file's settling and retry) by a step of the system clock, so that what was due in
        a minute stays due in a minute: NTP setting the clock back an hour had the watcher
        sleep for that hour, new files unseen. File times are the files' own, read anew."""
        wall, mono = time.time(), time.monotonic()
        step = (wall - self._clock[0]) - (mono - self._clock[1])
        self._clock = (wall, mono)
        if abs(step) < CLOCK_STEP:
            return
        self._last_scan += step
        self._last_flush += step
        self._last_id_check += step
        self._last_out_check += step
        for seen in self._seen.values():
            seen.since += step
            if seen.not_before:
                seen.not_before += step

    def _sleep(self, now: float) -> None:
        """Wait for an event, the next poll, the next settle check or retry, or a stop."""
        self._follow_clock()  # a step while the last batch ran: the deadlines below follow it
        now = time.time()
        self._wake.clear()  # flags (_scan_requested, _stop) carry anything set before this
        deadlines = []
        if not self.options.once:
            interval = self._poll if self._poll is not None else SAFETY_RESCAN
            deadlines.append(self._last_scan + interval)
        if self._scan_requested:
            deadlines.append(self._last_scan + self._scan_gap())
        if self._observer is not None:
            deadlines.append(self._last_id_check + INBOX_CHECK)
        deadlines.append(self._last_out_check + OUT_CHECK)
        if self._dirty:  # changed results waiting for their rebuild (`_flush`)
            deadlines.append(self._report_due())
        for seen in self._seen.values():
            if not (self.options.once and seen.changed):
                deadlines.append(max(seen.since + self.options.settle, seen.not_before))
        if self._stop:
            return
        timeout = max(0.05, min(deadlines) - now) if deadlines else 1.0
        self._wake.wait(timeout)

    # --- scanning -----------------------------------------------------------------------------

    def _scan(self, now: float) -> None:
        """Compare the inbox with the ledger: new and changed files are observed, files that
        left the inbox are handled (see the module docstring)."""
        from .discovery import discover_images, relative_name

        self._scan_requested = False
        t0 = time.perf_counter()
        try:
            if not self.inbox.is_dir():
                raise FileNotFoundError(f"inbox not found: {self.inbox}")
            if self._watch_lost() and _file_id(self.inbox) is not None:
                self._restart_observer()  # before listing: a file landing now is seen either way
            not_read, left_out = [], []
            paths = discover_images(self.inbox, exclude=self.out, warn=self._warn_once,
                                    left_out=left_out, not_read=not_read)
            self.runner.not_read = not_read  # run.json and the Summary count them
        except OSError as exc:
            # A share that dropped out: keep everything as it is and try again at each poll,
            # saying so once, not at every poll.
            if not self._inbox_lost:
                self._say(f"cannot scan the inbox ({exc}); retrying until it is back")
                self._inbox_lost = True
            self._last_scan = now
            return
        if self._inbox_lost:
            self._inbox_lost = False
            self._say("inbox reachable again")
        versions = self.ledger.versions()
        present = set()
        new = []
        unsettled = set()  # sizes of the files not settled yet: one may be a moved file
        for path in paths:
            rel = relative_name(path, self.inbox)
            if not _utf8(rel):
                present.add(self._refuse_name(rel, versions))
                continue
            present.add(rel)
            try:
                st = path.stat()
            except OSError as exc:
                why = link_fault(path, exc)  # a share that is not mounted; a loop
                if why is not None:
                    self._error_once(rel, why, versions)
                continue
            row = versions.get(rel)  # ((size, mtime_ns, ctime_ns), status, next_retry)
            pending = row is not None and row[1] == PENDING
            if row is not None and not pending and row[0] == _stat_key(st):
                self._seen.pop(rel, None)  # this version is settled (done, error or duplicate)
                continue
            # a retry time the ledger holds is the wall clock's: set back since, at most the
            # longest backoff away
            retry_at = min(row[2], now + self.options.retry_cap) if pending else 0.0
            self._observe(rel, st, now, retry_at=retry_at)
            unsettled.add(st.st_size)
            if row is None:
                new.append((rel, *_stat_key(st)))
        if new:
            self.ledger.observe(new)
        for rel in [r for r in self._seen if r not in present]:
            del self._seen[rel]
        for rel, row in versions.items():
            if rel not in present and row[1] != DONE:
                # pending, failed or duplicate, and gone: nothing to count
                self._drop_artifacts(rel)  # of an earlier version, analysed before it changed
                self._requeue(self.ledger.forget(rel))
                self._dirty = True
        if not left_out:  # a folder it could not enter may hold them still: no move decided
            # not while a file not yet settled has its size, which a rename or a copy keeps:
            # hashed, it takes its own row back (a sample folder renamed, or copied elsewhere
            # and deleted, beside another sample holding copies of its fields, had its counts
            # handed to those copies for good)
            self._pass_on({rel for rel, row in versions.items()
                           if rel not in present and row[1] == DONE
                           and row[0][0] not in unsettled}, present)
        self._last_scan = now
        self._scan_seconds = time.perf_counter() - t0

    def _pass_on(self, gone: set, present: set) -> None:
        """Analysed files that have left the inbox (`gone`) while a copy is still there (copied,
        then the original deleted: a move, as a lab mends a misfiled field): the first copy takes
        the row, result and drawings, as a rename does, so that it is counted in its own sample
        as `run` counts it. Without a copy a row stays (an archived file keeps its result)."""
        if not gone:
            return
        heirs = {}
        for dup in self.ledger.entries(DUPLICATE):  # few rows: one query, not one per gone row
            if dup.duplicate_of in gone and dup.rel in present and self._unchanged(dup):
                heirs.setdefault(dup.duplicate_of, dup)
        for rel, heir in sorted(heirs.items()):
            self._move_artifacts(rel, heir.rel, False)  # files first: a kill repeats the move
            released = []
            self.ledger.rename(rel, heir.rel, heir.size, heir.mtime_ns, released, heir.ctime_ns)
            self._requeue(released)
            self.counters.renamed += 1
            self._say(f"{heir.rel}: counted in place of {rel}, its copy, which has left the "
                      "inbox")
            self._dirty = True

    def _unchanged(self, entry) -> bool:
        """Whether the file of ledger row `entry` still has the stat the row holds (a copy
        rewritten since is new content: analysed as such, it takes no other file's row)."""
        try:
            st = (self.inbox / entry.rel).stat()
        except OSError:
            return False
        return _stat_key(st) == entry.version and entry.rel not in self._seen

    def _warn_once(self, text: str) -> None:
        """A warning of the inbox scan (a folder left out, a broken link), given once per
        watcher rather than at every scan."""
        if text not in self._warned:
            self._warned.add(text)
            self._say(text, error=True)  # a folder left out: said with --quiet too, as in `run`

    def _refuse_name(self, rel: str, versions: dict) -> str:
        """A name whose bytes are not UTF-8 cannot be a ledger key: it gets an error row under
        its escaped form (`reports.storable`) once, asking for a rename. Returns that form."""
        from .reports import storable

        shown = storable(rel)
        self._error_once(shown, "the file name is not valid UTF-8 (its odd bytes are shown as "
                                "\\xNN): rename the file to have it analysed", versions)
        return shown

    def _error_once(self, rel: str, error: str, versions: dict) -> None:
        """An error row for a file that cannot be read at all, with size and mtime 0, so that
        once it can be read (a link's share is back) the next scan sees a change and analyses
        it. A file already settled keeps its row: a done image stays reported, as when deleted."""
        if rel in versions and versions[rel][1] != PENDING:
            return
        self.ledger.observe([(rel, 0, 0, 0)])
        self.ledger.record_failure(rel, error, 1, 0.0, final_result=ImageResult.failed(rel, error),
                                   version=(0, 0, 0))
        self._errors.append((rel, error))
        self._say(f"{rel}: {error}", error=True)
        self._dirty = True

    def _observe(self, rel: str, st, now: float, retry_at: float = 0.0) -> _Seen:
        key = _stat_key(st)
        seen = self._seen.get(rel)
        if seen is None:
            seen = _Seen(key=key, since=now, not_before=retry_at)
            age = now - max(st.st_mtime, st.st_ctime)
            if os.name == "posix" and age >= max(self.options.settle, SHARE_CLOCK_SKEW):
                seen.since = now - self.options.settle  # untouched for the whole interval already
            self._seen[rel] = seen
        elif seen.key != key:
            seen.key, seen.since, seen.changed, seen.rereads = key, now, True, 0
        return seen

    def _requeue(self, rels) -> None:
        """Files the ledger has just turned back into pending (duplicates whose original stopped
        holding their content) join the queue."""
        now = time.time()
        for rel in rels:
            if rel == "" or rel in self._seen:
                continue
            try:
                st = (self.inbox / rel).stat()
            except OSError:
                continue  # gone too: the next scan forgets it
            self._observe(rel, st, now)
            self._dirty = True

    def _ready(self, now: float) -> list:
        """Files settled and due, in path order."""
        settle = self.options.settle
        busy = self._inflight.rel if self._inflight is not None else None
        return sorted(rel for rel, s in self._seen.items()
                      if now - s.since >= settle and s.not_before <= now and rel != busy
                      and not (self.options.once and s.changed))

    def _waiting(self) -> bool:
        """--once: is any file of the backlog still to be decided (settling or awaiting a retry)?
        Files that changed while observed are being written: left for the next run."""
        return any(not s.changed for s in self._seen.values())

    # --- one file -----------------------------------------------------------------------------
    #
    # Three steps, so that writing one image's overlay overlaps the next image's analysis (as in
    # `run`): `_claim` decides what the file is (ledger only, no analysis), `_analyse` reads and
    # analyses it and starts writing its overlay in the background, `_finish` waits for that
    # write, checks the file did not change meanwhile, and commits result + status together.
    # At most one analysed image waits to be finished; a kill before `_finish` commits leaves it
    # pending, to be analysed again.

    def _claim(self, rel: str) -> Optional[_Job]:
        """Settled, hashed and new content: a job to analyse. Anything else (still being
        written, unchanged bytes, a duplicate, a rename) is settled here and gives None."""
        seen = self._seen.get(rel)
        if seen is None:
            return None
        content = self._settled_content(rel, seen)
        if content is None:
            return None
        sha, data, read_s = content
        if self._inflight is not None and self._inflight.sha == sha:
            self._finish(self._inflight)  # an identical copy is being analysed: let it land first
        entry = self.ledger.get(rel)
        if self._settled_by_content(rel, sha, entry, seen.key):
            return None
        size, mtime_ns, ctime_ns = seen.key
        changed = entry is not None and entry.status in (DONE, DUPLICATE) and entry.sha256 != sha
        if changed:
            self._say(f"{rel}: changed on disk; analysed again, its result replacing the "
                      "earlier one's (a new file under an archived file's name does too)")
        if entry is None or entry.sha256 != sha or entry.status != PENDING:
            self._requeue(self.ledger.set_pending(rel, size, mtime_ns, sha, ctime_ns))
        elif entry.version != seen.key:
            self.ledger.touch(rel, size, mtime_ns, ctime_ns)
        if changed:  # after the row stops holding it: a kill in between leaves a pending row,
            self._drop_artifacts(rel)  # analysed again (or forgotten, with it) at the restart
        index = self._index_of(rel)
        return _Job(rel=rel, path=self.inbox / rel, key=seen.key, sha=sha, index=index,
                    total=max(self._index + len(self._seen), index + 1), data=data,
                    read_s=read_s)

    def _settled_content(self, rel: str, seen: _Seen) -> Optional[tuple]:
        """(sha256, bytes, seconds the read took) of the file when its stat is still the one that
        settled (`seen.key`) before and after it was read (bytes None: too large, `_content`);
        else None, with the file observed again, forgotten (gone),
        or, when it cannot be read, failed or retried (`_reread_failed`).

        The file is read once: by the read-ahead (`_read_ahead`) when it read this version, else
        here; `_analyse` decodes the same bytes, so the content hashed is the content analysed."""
        path = self.inbox / rel
        try:
            st = path.stat()
        except OSError:
            self._seen.pop(rel, None)  # gone; the next scan forgets its ledger row
            self.request_scan()
            return None
        if _stat_key(st) != seen.key:
            self._observe(rel, st, time.time())  # still being written: settle again
            return None
        t = time.perf_counter()
        try:
            data = self._read_ahead_bytes(rel, seen.key)
            sha, data = (hashlib.sha256(data).hexdigest(), data) if data is not None else \
                _content(path)
            st2 = path.stat()
        except FileNotFoundError:
            self.request_scan()
            return None
        except OSError as exc:
            entry = self.ledger.get(rel)
            if entry is not None and entry.status in (DONE, DUPLICATE):
                self._reread_failed(rel, seen, exc)
                return None
            # Listed but not readable (permissions, a scanner holding it open): a failed attempt,
            # retried with backoff like a half-written file, never a busy loop.
            index = self._index_of(rel)
            job = _Job(rel=rel, path=path, key=seen.key, sha="", index=index,
                       total=max(self._index + len(self._seen), index + 1), retry=True,
                       result=ImageResult.failed(rel, f"cannot read file: {exc.strerror or exc}"))
            self._finish(job)
            return None
        if _stat_key(st2) != seen.key:
            self._observe(rel, st2, time.time())
            return None
        return sha, data, time.perf_counter() - t

    def _read_ahead_bytes(self, rel: str, key: tuple) -> Optional[bytes]:
        """The bytes the read-ahead read of `rel`'s version `key` (it started after that stat was
        taken, and the caller checks the stat again after), or None: not read ahead, or read
        from another version.

        :raises OSError: the read-ahead's read failed (one try of the file, as the caller's);
            one too large to hold gives None, for the caller to hash in chunks."""
        at, ahead = self._reads.get(rel, (None, None))
        if ahead is None or at != key:
            return None
        data, out = ahead.result()
        if data is None:
            del self._reads[rel]  # a retry reads the file again
            if isinstance(out, OSError):
                raise out
        return data

    def _settled_by_content(self, rel: str, sha: str, entry, key: tuple) -> bool:
        """Settle `rel` without analysis when its content is known: the same bytes as its own
        row (touched, dropped again, chmod-ed), a copy of another analysed file still in the
        inbox (a duplicate), or an analysed file that is gone or no longer holds it (a rename,
        or two files that swapped names). True when settled here; a copy of a failed file is
        not (it is analysed on its own)."""
        size, mtime_ns, ctime_ns = key
        if entry is not None and entry.sha256 == sha and entry.status in (DONE, DUPLICATE):
            # Not an error: touching a file that failed (its overlay could not be written)
            # retries it.
            self.ledger.touch(rel, size, mtime_ns, ctime_ns)
            self.counters.unchanged += 1
            self._seen.pop(rel, None)
            return True
        owner = self.ledger.owner_of(sha, exclude=rel)
        if owner is None:
            return False
        if owner.status == ERROR:
            if not (self.inbox / owner.rel).exists():  # a failed file that has gone: forget its row
                self._drop_artifacts(owner.rel)
                self._requeue(self.ledger.forget(owner.rel))
            # A copy of a failed file is analysed on its own, as in `run`: it fails (or not) in
            # its own sample, which would otherwise count neither it nor its failure.
            return False
        if self._still_holds(owner):
            self._drop_artifacts(rel)  # of the content it held before, if it was analysed
            self._requeue(self.ledger.mark_duplicate(rel, size, mtime_ns, sha, owner.rel,
                                                     ctime_ns))
            self.counters.duplicates += 1
            other = sample_of(owner.rel) != sample_of(rel)
            self._say(f"{rel}: duplicate of {owner.rel}, not counted again"
                      + (f" (a file of another sample, so not counted in sample "
                         f"{sample_of(rel) or '.'}: check that each sample's folder holds its "
                         "own images)" if other else ""))
            self._settled(rel)
            return True
        had = entry is not None and bool(entry.sha256)  # a result of its own, now stale
        self._move_artifacts(owner.rel, rel, had)  # files first: a kill repeats the move
        released = []
        self.ledger.rename(owner.rel, rel, size, mtime_ns, released, ctime_ns)
        self._requeue(released)  # copies of the content `rel` held before
        self.counters.renamed += 1
        if (self.inbox / owner.rel).exists():  # its new content is a new file to it
            self._say(f"{rel}: holds what {owner.rel} held when it was analysed (renamed, or "
                      f"the two swapped names); result kept, and {owner.rel} is taken as a new "
                      "file")
            self._requeue([owner.rel])
        else:
            self._say(f"{rel}: renamed from {owner.rel}; result kept")
        self._settled(rel)
        return True

    def _still_holds(self, owner) -> bool:
        """Whether `owner`'s file is in the inbox and still holds the content its row records:
        its size, mtime and ctime are the row's, or, where they changed, its bytes hash to the
        row's sha256 (two files that swapped names keep theirs). A file that is there but cannot be
        read (chmod-ed) is taken to hold it: it stays the owner; one whose path no longer leads
        to a file (a folder on the way replaced by a file, a link loop) is gone."""
        path = self.inbox / owner.rel
        try:
            st = path.stat()
        except OSError as exc:
            return exc.errno not in _GONE
        if _stat_key(st) == owner.version:
            return True
        if st.st_size != owner.size:
            return False
        try:
            return sha256_file(path) == owner.sha256
        except OSError as exc:
            return exc.errno not in _GONE

    def _index_of(self, rel: str) -> int:
        """The hooks' `index` of the file: new for each file, kept over its retries, so that
        the image analysed while the previous one's overlay is written never shares it. Files
        given one that left the queue without being done (gone, a duplicate after all) are
        forgotten; their numbers are not given again."""
        busy = self._inflight.rel if self._inflight is not None else None
        for stale in [r for r in self._indices if r not in self._seen and r not in (rel, busy)]:
            del self._indices[stale]
        if rel not in self._indices:
            self._indices[rel] = self._next_index
            self._next_index += 1
        return self._indices[rel]

    def _reread_failed(self, rel: str, seen: _Seen, exc: OSError) -> None:
        """A done file (or a duplicate of one) has a new mtime or ctime but cannot be read to see
        whether its bytes changed (most often a chmod). Its row is never lost to that (an error
        row is simply failed again): the read is retried with
        backoff, and after `max_attempts` tries the new stat is taken as the same version, so it
        is not read again until it changes again (making it readable changes its ctime)."""
        seen.rereads += 1
        if seen.rereads < self.options.max_attempts:
            seen.not_before = time.time() + self.options.backoff(seen.rereads)
            return
        self.ledger.touch(rel, *seen.key)
        self._seen.pop(rel, None)
        self._say(f"{rel}: changed on disk but cannot be read ({exc.strerror or exc}); "
                  "its earlier row is kept")

    def _analyse(self, job: _Job) -> None:
        """Read and analyse; start writing the overlay/mask. Sets `job.result` (never raises)."""
        self._hook("wbc_image_start", image=job.rel, index=job.index, total=job.total)
        t0 = time.perf_counter()
        key, ahead = self._reads.pop(job.rel, (None, None))
        if ahead is not None and key != job.key:
            ahead = None  # read ahead from a version that has changed since: read it again
        data, job.data = job.data, None
        try:
            rgb = _decoded(ahead, data, job.path)
        except Exception as exc:  # ImageReadError, or the read-ahead thread's surprise
            job.result = ImageResult.failed(job.rel, read_failure(exc),
                                            job.read_s + time.perf_counter() - t0)
            # half-written, or a share hiccup: try again later (a label mask stays one)
            job.retry = not isinstance(exc, NotASmearError)
            return
        finally:
            data = ahead = None  # the file's bytes are not held through the analysis
        result, analysis = analyse_or_fail(self.runner.process_array, rgb, job.rel,
                                           self.config.backend, t0)
        if not result.ok:
            # The file decoded, so it is complete: an analysis failure is final at once.
            job.result = result
            return
        # seconds: read + analysis, as in `run` (the overlay is written in the background)
        job.result = replace(result, image=job.rel,
                             seconds=round(job.read_s + time.perf_counter() - t0, 6))
        if self.config.save_overlays or self.config.save_masks:
            job.future = self._writer().submit(self.runner.save_outputs, job.rel, rgb, analysis)

    def _finish(self, job: _Job) -> None:
        """Wait for the job's files, check the input did not change, and commit."""
        if self._inflight is job:
            self._inflight = None
        result = job.result
        if job.future is not None:
            try:
                job.future.result()
            except Exception as exc:  # disk full, permissions: worth another try later
                result = output_failed(result, exc)
                job.retry = True
        try:
            st = job.path.stat()
        except OSError:
            st = None
        entry = self.ledger.get(job.rel)
        if st is None or _stat_key(st) != job.key or entry is None:
            # Written to (or removed) while we read it: the result may be of a half file, and
            # what was drawn for it shows cells no report holds (a session may end before the
            # new version is analysed: --once, a stop)
            self.counters.stale += 1
            self._drop_artifacts(job.rel)
            if st is not None:
                self._observe(job.rel, st, time.time())  # analysed again once it settles
            else:
                self._seen.pop(job.rel, None)
                self.request_scan()
            return
        if result.ok:
            self.ledger.record_done(job.rel, result)
            self.counters.analysed += 1
            self._seen.pop(job.rel, None)
        else:
            max_attempts = self.options.max_attempts if job.retry else 1
            entry = self.ledger.record_failure(job.rel, result.error, max_attempts,
                                               final_result=result, version=job.key,
                                               retry_in=self.options.backoff)
            if entry.status != ERROR:
                self.counters.retried += 1
                seen = self._seen.get(job.rel)
                if seen is not None:
                    seen.not_before = entry.next_retry
                return  # not done yet: no hook, no report change
            self._say(f"{job.rel}: {result.error}"
                      + (f" (gave up after {_n(entry.attempts, 'attempt')})" if job.retry else ""),
                      error=True)
            self._errors.append((job.rel, result.error))
            self._drop_artifacts(job.rel)  # a partial write, or an earlier version's
            self._seen.pop(job.rel, None)
        self._dirty = True
        self._hook("wbc_image_done", result=result, index=job.index, total=job.total)
        self._indices.pop(job.rel, None)
        self._index += 1

    def _drain(self) -> None:
        """Finish the image in flight, if any."""
        if self._inflight is not None:
            self._finish(self._inflight)

    def _process(self, rel: str) -> None:
        job = self._claim(rel)
        if job is None:
            self._reads.pop(rel, None)  # settled unanalysed: what was read ahead is not needed
            return
        self._analyse(job)
        self._drain()  # the previous image, whose overlay was written during this analysis
        if job.future is None:
            self._finish(job)  # nothing to wait for
        else:
            self._inflight = job

    def _writer(self):
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="wbc-watch-write")
        return self._pool

    def _read_ahead(self, rel: str) -> None:
        """Decode the next file of the batch while this one is analysed (as `run` does). Safe
        because `_analyse` uses it only for a job of the version it was read at, and `_finish`
        checks the file's size/mtime/ctime are still those it settled with."""
        seen = self._seen.get(rel)
        if seen is not None and rel not in self._reads:
            if self._reader is None:
                self._reader = ThreadPoolExecutor(1, thread_name_prefix="wbc-watch-read")
            # kept with the stat key it was read at: used only for a job of that same version
            self._reads[rel] = (seen.key, self._reader.submit(_read_and_decode,
                                                              self.inbox / rel))

    def _settled(self, rel: str) -> None:
        self._dirty = True
        self._seen.pop(rel, None)

    def _drop_artifacts(self, rel: str) -> None:
        """Remove the overlay and mask of `rel` (`output_folder.artifact_path`) when its row stops
        holding the result they were drawn for (new content, a duplicate, an error, a forgotten
        row): they would show cells that no report counts. A row that keeps its result never
        comes here; a rename moves its files (`_move_artifacts`)."""
        from .output_folder import remove_artifacts

        for path, exc in remove_artifacts(self.out, rel):
            self._say(f"cannot remove {path} ({exc.strerror or exc}); it shows an earlier "
                      f"version of {rel}")

    def _move_artifacts(self, old: str, new: str, new_had_result: bool) -> None:
        """Overlay and mask files follow a renamed image (OUT/<kind>/<rel>.png). One the new
        name had (a file analysed under it before) goes, moved over or, where the renamed image
        has none (analysed with --no-overlays), removed: it showed other cells. Only a new
        name whose ledger row held a result (`new_had_result`) can have such a file: without
        one, a file there was moved before a kill cut the rename short (the ledger is renamed
        after the files), and it stays."""
        from .output_folder import artifact_path

        for kind in ("overlays", "masks"):
            src, dst = artifact_path(self.out, kind, old), artifact_path(self.out, kind, new)
            try:
                if src.exists():
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(src, dst)
                elif new_had_result:
                    dst.unlink(missing_ok=True)
            except OSError:
                pass

    # --- reports and status -------------------------------------------------------------------

    def _flush(self, force: bool, busy: bool = False, last: bool = False) -> None:
        """Rebuild the reports when results changed (`force`: now, else when due). `last`: the
        session's final flush, after which only the next start writes them again."""
        now = time.time()
        if not force and busy and now - self._last_flush < self._report_gap(busy=True):
            return
        self._drain()
        if not self._dirty:
            return
        if not force and now < self._report_due():  # `_sleep` wakes when it is due
            return
        t0 = time.perf_counter()
        try:
            # a signal that already asked to stop makes the next one stop at once, even while a
            # writer hangs (the ledger is consistent; the next start writes the reports)
            with interrupts.deferred(stopping=self._signal is not None):
                results = self.ledger.results()
                written = self.runner.write_reports(
                    results, watch=self._run_facts(),
                    duplicates_across_samples=self._across_samples(),
                    **self._unfinished(results))
        except Exception as exc:  # noqa: BLE001 - disk full, a writer's bug: results stay in the ledger
            self._say(_report_failure(exc, last), error=True)
            self._report_failed = True
            self._last_flush = time.time()
            return
        self._report_failed = False
        if not self._reports_checked:
            self._reports_checked = True
            self._remove_stale_reports(written)
        self._flush_seconds = time.perf_counter() - t0
        self._last_flush = time.time()
        self._dirty = False
        self._note_spread()

    def _report_gap(self, busy: bool) -> float:
        """Least time between two report rebuilds: REPORT_COST_FACTOR times the last one, so
        that rebuilding takes at most about 5 % of the time, and under load `report_interval`
        at least. Idle too: a scanner adding one image every few seconds made a large folder
        rebuild its reports after every image, most of the CPU's time."""
        cost = REPORT_COST_FACTOR * self._flush_seconds
        return max(self.options.report_interval, cost) if busy else cost

    def _report_due(self) -> float:
        """When an idle rebuild of changed results is due (`_report_gap`; REPORT_RETRY after a
        failed one)."""
        if self._report_failed:
            return self._last_flush + REPORT_RETRY
        return self._last_flush + self._report_gap(busy=False)

    def _note_spread(self) -> None:
        """In a continuous session, say once, above the status line, when the WBC sizes of
        OUT's images come to spread widely (`scale_spread`, from the reports just written);
        again when a size to try first comes with it (the images that suggest one arrive
        later, or agree later) or moves by `RESAY_SIZE_CHANGE` of the size said, and if the
        spread has narrowed in between. `--once` says it in its closing lines (`_summary`), as
        `run` does."""
        if self.options.once:
            return
        measured = (getattr(self.runner, "last_run_info", None) or {}).get("scale_spread")
        spread = advice(measured)
        if not spread:
            self._spread_said = None
            return
        size, said = float(measured.get("suggested_px") or 0.0), self._spread_said
        if said is None or (size and (not said or abs(size - said) >= RESAY_SIZE_CHANGE * said)):
            self._say(spread)
            self._spread_said = size

    def _remove_stale_reports(self, written) -> None:
        """Remove the reports (`output_folder.RESULT_FILES`, and the files the last session's
        run.json lists, `output_folder.earlier_reports`: a plugin writer's too) that this
        session's writers did not write: left by a session with other `--report` writers, or by
        the run an `--overwrite` took over, they would never be updated again. As `run
        --overwrite` removes them, but only once this session's reports are written (`written`:
        their paths), so that no report is ever missing meanwhile."""
        from .output_folder import RESULT_FILES

        if not written:  # a runner that does not say what it wrote
            return
        kept = {os.path.realpath(p) for p in written}
        left = False
        for path in [*self._earlier_reports, *(self.out / name for name in RESULT_FILES)]:
            if os.path.realpath(path) not in kept:
                try:
                    remove_report(path, self.out)
                except OSError as exc:
                    left = True
                    self._say(f"cannot remove the stale report {path} "
                              f"({exc.strerror or exc}): it is no longer updated", error=True)
        if not left:  # what an --overwrite cut short noted (`REPORTS_LIST`) is gone too
            (self.out / REPORTS_LIST).unlink(missing_ok=True)

    def _run_facts(self) -> dict:
        """What run.json says about this watch session."""
        return {"ledger": LEDGER_NAME, "settle_s": self.options.settle,
                "events": "poll" if self._poll is not None else "watchdog",
                "poll_s": self._poll, "once": self.options.once,
                "max_attempts": self.options.max_attempts, "counts": self.ledger.counts(),
                "session": {"analysed": self.counters.analysed, "retries": self.counters.retried,
                            "duplicates": self.counters.duplicates,
                            "renamed": self.counters.renamed,
                            "discarded_stale": self.counters.stale}}

    def _unfinished(self, results: list) -> dict:
        """run.json's `samples_not_finished`, as a stopped `run` writes it, for the samples with
        files pending: {} when none is."""
        pending = [e.rel for e in self.ledger.entries(PENDING)]
        if not pending:
            return {}
        return {"samples_not_finished": samples_not_finished(
            [r.image for r in results] + pending, results)}

    def _across_samples(self) -> list:
        """run.json's `duplicates_across_samples`, as `run` writes it: the duplicates whose
        counted file lies in another sample."""
        return [{"image": e.rel, "copy_of": e.duplicate_of}
                for e in self.ledger.entries(DUPLICATE)
                if e.duplicate_of and sample_of(e.rel) != sample_of(e.duplicate_of)]

    def _status(self, final: bool = False) -> None:
        """The status line: on a terminal redrawn in place (at most 5 times a second), else a
        line every few seconds when something changed."""
        if self.quiet:
            return
        tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        now = time.time()
        if not final and now - self._status_time < (0.2 if tty else 2.0):
            return
        counts = self.ledger.counts()
        text = (f"watch: {counts[DONE]} processed, {len(self._seen)} queued, "
                f"{_n(counts[ERROR], 'error')}"
                + (f", {_n(counts[DUPLICATE], 'duplicate')}" if counts[DUPLICATE] else ""))
        if text == self._status_text and not (final and tty):  # a tty's final ends its line
            return
        self._write(("\r\033[K" + text + ("\n" if final else "")) if tty else text + "\n")
        self._status_text = text
        self._status_time = now

    def _stopped_line(self, signum: int) -> None:
        """A watcher's last line when a signal stopped it: a service's log then shows that it
        stopped on purpose, and whether its reports were written."""
        counts, c = self.ledger.counts(), self.counters
        reports = ("the reports could not be written (said above); the next start writes them"
                   if self._dirty else "the reports are written")
        copies = f", {_n(counts[DUPLICATE], 'duplicate')}" if counts[DUPLICATE] else ""
        self._say(f"Stopped by {signal.Signals(signum).name}: this session analysed "
                  f"{c.analysed}; {self.out} holds {counts[DONE]} processed, "
                  f"{_n(counts[ERROR], 'error')}{copies}, {_n(counts[PENDING], 'file')} pending; "
                  f"{reports}.", error=self._dirty)

    def _summary(self, cut_short_by: Optional[int], unreachable: bool = False) -> None:
        """--once's closing lines, as `run` ends: what this session did, the files left pending
        for the next run and what OUT holds in all; OUT's images taken for bare glass, and a
        wide spread of the WBC sizes estimated over OUT's images (`scale_spread`), both from
        the reports just written; then the files it recorded as errors with their reasons (the
        first `MAX_LISTED_ERRORS`). `cut_short_by`: the signal that stopped the session before
        the end of the backlog, if one did; `unreachable`: the inbox could not be reached at
        the end."""
        counts, c = self.ledger.counts(), self.counters
        if cut_short_by is not None:
            head = (f"Stopped by {signal.Signals(cut_short_by).name} before the end of the "
                    "backlog")
        elif unreachable:
            head = (f"Stopped: the inbox {self.inbox} cannot be reached, so the backlog was not "
                    "seen to its end")
        else:
            head = "Done"
        session = [f"analysed {c.analysed}", _n(len(self._errors), "error")]
        if c.duplicates:
            session.append(_n(c.duplicates, "duplicate"))
        if c.renamed:
            session.append(f"{c.renamed} renamed")
        pending = counts[PENDING]
        self._say(f"{head}: this session {', '.join(session)}; "
                  f"{_n(pending, 'file')} left pending for the next run"
                  + (" (being written, or awaiting a retry)"
                     if pending and cut_short_by is None and not unreachable else "")
                  + f". {self.out} holds {counts[DONE]} processed, "
                  f"{_n(counts[ERROR], 'error')}.", error=unreachable)
        across = across_samples_line(self._across_samples())
        if across:
            self._say(f"  {across}")
        info = getattr(self.runner, "last_run_info", None) or {}
        glass = bare_glass_line(info.get("bare_glass"))  # of OUT's images, as the reports are
        if glass:
            self._say(f"  {glass}")
        spread = advice(info.get("scale_spread"))
        if spread:  # as `run` says it: fields without a WBC, from a scanner that saves them all
            self._say(f"  {spread}")
        for line in failure_lines(self._errors):
            self._say(line, error=True)

    def _say(self, message: str, error: bool = False) -> None:
        """A line on the stream; with `quiet` only an `error` (a file recorded as one, a report
        or ledger that cannot be written, a requested GPU not used): quiet drops the chatter,
        not what went wrong."""
        if self.quiet and not error:
            return
        tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._write(("\r\033[K" if tty else "") + printable(message) + "\n")
        self._status_text = ""

    def _write(self, text: str) -> None:
        """Write to the stream; a closed terminal or pipe (SIGHUP, a dropped SSH session,
        `| head`) must not stop a watcher whose results are all in the ledger."""
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):  # EIO, EPIPE; ValueError: the stream was closed
            pass

    def _hook(self, name: str, **kwargs) -> None:
        self._lifecycle(name, **kwargs)

    # --- filesystem events --------------------------------------------------------------------

    def _start_observer(self) -> None:
        if self._poll is not None:
            return
        try:
            from watchdog.events import FileSystemEventHandler
            from watchdog.observers import Observer
        except ImportError:
            self._poll = FALLBACK_POLL
            self._say(f"watchdog is not installed: polling the inbox every {FALLBACK_POLL:g} s")
            return
        watcher = self
        out, inbox = str(self.out.resolve()), str(self.inbox.resolve())

        def under(path: str, folder: str) -> bool:
            return path == folder or path.startswith(folder + os.sep)

        inbox_in_out = under(inbox, out)

        def ours(path) -> bool:
            path = os.fsdecode(path)
            return not path or (under(path, out) and not (inbox_in_out and under(path, inbox)))

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event):
                if event.event_type in READ_EVENTS:
                    return  # our own reading of an image changes nothing
                if (os.fsdecode(getattr(event, "src_path", "")) == inbox
                        and event.event_type in ("deleted", "moved")):
                    watcher._observer_lost = True  # its watch ended with it (`_watch_lost`)
                if ours(getattr(event, "src_path", "")) and ours(getattr(event, "dest_path", "")):
                    return  # our own reports (OUT may lie inside the inbox, or it in OUT)
                watcher.request_scan()

        try:
            # noted before scheduling: a folder replaced in between is caught at the next check
            self._inbox_id, self._last_id_check = _file_id(self.inbox), time.time()
            self._observer_lost = False
            observer = Observer()
            observer.schedule(Handler(), str(self.inbox.resolve()), recursive=True)
            observer.daemon = True
            observer.start()
        except Exception as exc:  # inotify limits, unsupported filesystems
            self._poll = FALLBACK_POLL
            self._say(f"no filesystem events here ({exc}): polling every {FALLBACK_POLL:g} s")
            return
        self._observer = observer

    def _stop_observer(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer = None

    def _inbox_replaced(self, now: float) -> bool:
        """With filesystem events, `_watch_lost` every `INBOX_CHECK` seconds (one stat): a
        folder that no events come from any more must not wait for the next safety rescan."""
        if self._observer is None or now - self._last_id_check < INBOX_CHECK:
            return False
        self._last_id_check = now
        return self._watch_lost()

    def _watch_lost(self) -> bool:
        """Does the observer no longer watch the folder at the inbox's path? True when that
        folder was removed (its watch ended with it, even if the one made again got the same
        inode number, as ext4 gives), when the path leads to another folder (the old one moved
        away, a disk mounted over it: another `_file_id`), or when it is gone."""
        if self._observer is None:
            return False
        if self._observer_lost or not all(e.is_alive() for e in getattr(self._observer,
                                                                        "emitters", ())):
            return True
        return _file_id(self.inbox) != self._inbox_id

    def _restart_observer(self) -> None:
        """Watch the folder now at the inbox's path (see `_watch_lost`)."""
        self._say(f"the inbox {self.inbox} was removed or replaced (made again, moved, or a disk "
                  "mounted over it): watching the folder now there for new files")
        self._stop_observer()
        self._start_observer()


# --- entry point used by the CLI -----------------------------------------------------------------

def _wal(path: Path) -> Path:
    """The write-ahead log SQLite keeps beside a database in WAL mode."""
    return Path(f"{path}-wal")


def _handle_id(handle) -> Optional[tuple]:
    """(device, inode) of an open file (a lock handle), or None."""
    try:
        st = os.fstat(handle.fileno())
    except (AttributeError, OSError, ValueError):
        return None
    return (st.st_dev, st.st_ino)


def _lock(out: Path):
    """Hold OUT's lock (`output_folder.lock_output`) for the life of the process, so that two
    watchers never share a ledger, nor a run and a watcher one folder's reports."""
    from .output_folder import lock_output

    try:
        return lock_output(out)
    except PipelineError as exc:
        raise WatchError(str(exc)) from None


def watch(config: RunConfig, options: WatchOptions = WatchOptions(), runner=None, pm=None,
          stream=None) -> int:
    """Run the watcher until a signal (or, with `options.once`, the end of the backlog).

    Returns the exit code (`Watcher.run`: 0; with `once`, 1 when some file is recorded as an
    error, 128 + the signal when a signal stopped it before the end of the backlog).
    Raises WatchError (or `pipeline.PipelineError` while loading the models) for folders,
    ledgers, backends or models it cannot use: usage errors.
    """
    from .output_folder import check_folders, remove_output_leftovers

    try:
        check_folders(config)
    except PipelineError as exc:
        raise WatchError(str(exc)) from None
    out = Path(config.output_dir)
    made = _first_missing(out)
    lock = _lock(out)
    remove_output_leftovers(out)  # of a watcher killed mid-write; we hold the lock
    stopper = interrupts.stop_requests()
    watcher = None
    try:
        with stopper:  # from here on, a signal while the models load stops the watcher cleanly
            own_runner = runner is None
            if own_runner:
                from .pipeline import Runner

                try:
                    runner = Runner(config, pm=pm)
                except BaseException:  # a model refused: leave no OUT behind, as `run` does
                    if made is not None:
                        _unmake(out, made)
                    raise
            if pm is None:
                pm = getattr(runner, "pm", None)
            progress = _block_progress(pm)  # the status line replaces the progress bar
            try:
                ledger = open_ledger(config, runner)
                try:
                    watcher = Watcher(config, runner, ledger, options, pm=pm, stream=stream,
                                      lock=lock)
                    stopper.attach(watcher)
                    return watcher.run()
                finally:
                    ledger.close()
            finally:
                _unblock_progress(pm, progress)
                if own_runner and hasattr(runner, "close"):
                    runner.close()
    finally:
        lock.close()
        if watcher is not None and watcher._lock is not None:  # taken again (`_lost_out`)
            watcher._lock.close()


def _first_missing(out: Path):
    """The topmost folder of the path `out` that is not there yet (`out` itself, or one above
    it), which taking OUT's lock will make; None when `out` is there."""
    missing = None
    for folder in (out, *out.parents):
        if os.path.lexists(folder):
            return missing
        missing = folder
    return missing


def _unmake(out: Path, made: Path) -> None:
    """Remove the folder `out` that this watcher made and left holding only its lock file, and
    the folders above it up to `made` (`_first_missing`) that it made for it."""
    from .output_folder import OUTPUT_LOCK

    try:
        (out / OUTPUT_LOCK).unlink()
        for folder in (out, *out.parents):
            if folder.name != "..":  # x/.. of `-o x/../out` is no folder of its own
                folder.rmdir()
            if folder == made:
                break
    except OSError:  # something else is there now: leave it
        pass


def _block_progress(pm):
    """Block the built-in progress bar plugin on `pm` for the watcher's life (its status line
    takes the bar's place); -> the plugin blocked, or None."""
    plugin = pm.get_plugin("progress") if pm is not None else None
    if plugin is not None:
        pm.set_blocked("progress")
    return plugin


def _unblock_progress(pm, plugin) -> None:
    """Give the caller's plugin manager its progress plugin back (`_block_progress`), where
    pluggy can (`unblock`, pluggy 1.4 and later)."""
    if plugin is not None and hasattr(pm, "unblock"):
        pm.unblock("progress")
        pm.register(plugin, name="progress")


def _report_failure(exc: Exception, last: bool) -> str:
    """The line saying why the reports could not be written, and when they will be: later in
    this session, or (`last`) at the next start, the exit code being 1 meanwhile."""
    when = ("the next start writes the reports again (exit code 1)" if last else
            "the reports are written again later")
    if isinstance(exc, ReportError):  # it names the writer that failed, or the file
        return f"{one_line(exc)}; every result is kept in the ledger, and {when}"
    return (f"cannot write the reports ({type(exc).__name__}: {one_line(exc)}); every result is "
            f"kept in the ledger, and {when}")
