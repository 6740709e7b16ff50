"""Signals for `run` and `watch`: SIGTERM and SIGHUP stop a run as Ctrl-C does, and a report set
is never cut in half.

Schedulers, `docker stop` and `kill` send SIGTERM, and a closed terminal SIGHUP; without a
handler either ends the process at once, leaving overlays but no reports (or, after --overwrite,
another run's). `terminate_as_interrupt` turns them into KeyboardInterrupt for the length of a
run, so the runner writes the reports of the images finished so far, as for Ctrl-C (exit code
128 + the signal).

`deferred` holds the first of these signals while the reports are written, then delivers it:
every report in OUT comes from the same results, even when the user presses Ctrl-C while a large
workbook is being saved. A second signal (after the one that stopped the analysis, or after the
one held) stops at once (`StopNow`), even while a plugin writer hangs, when someone asks twice
(`_forces`): a SIGINT (Ctrl-C pressed again), or a SIGTERM after a SIGINT or a SIGTERM (`kill`
after Ctrl-C, or sent again). SIGHUP never does, and neither does a SIGTERM that follows SIGHUPs
alone: systemd sends SIGTERM and SIGHUP together, a closing terminal may send SIGHUP twice, and
a dropped SSH session's SIGHUP may be followed by logind's SIGTERM, none of which asks to lose
the reports.
`shielded` holds every signal for the milliseconds the staged reports take to be put in place,
so that no signal leaves half a set. `stop_requests` is the watcher's: the first signal asks it to
stop after the current image, and a second one that asks twice stops at once, as in `run`.

Every handler records its signal before it decides anything, and decides from the whole record
(`_asks_twice`): Python may run a second signal's handler inside the first one's (the second
came while the first one's line was written), and a handler that decided before it recorded
took the second signal for a first; a writer that hung then held both, for good. Only a
signal that may force (`STOPPING`) decides to stop at once, so a SIGHUP after a stop is still
nothing. One order is left: a handler run as another's begins, before that one has recorded
anything, takes the first place, and the other signal is not seen (Python runs no line of a
handler before a nested one); two signals within microseconds may then count as one.

All of them only act in the main thread (Python runs signal handlers there); elsewhere they do
nothing. A signal the parent process set to be ignored (`nohup`, `cmd &` in a shell without job
control) stays ignored.
"""

from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager
from typing import Optional

#: SIGHUP too: a closed terminal or a dropped SSH session must not lose a run's reports
SIGNALS = tuple(s for s in (getattr(signal, "SIGINT", None), getattr(signal, "SIGTERM", None),
                            getattr(signal, "SIGHUP", None)) if s is not None)

#: what a Ctrl-C says when it comes before a run or a session started (while Python imports
#: the CLI, or plugins and models load): nothing was read or written
BEFORE_START = "Interrupted before anything was done."

#: the signals that, coming after another, may stop at once (not SIGHUP: see `_forces`)
STOPPING = tuple(s for s in (getattr(signal, "SIGINT", None), getattr(signal, "SIGTERM", None))
                 if s is not None)

#: the signals received in the current run or watch session (`terminate_as_interrupt`,
#: `stop_requests`), for `deferred`, which does not see the first one
_received: list = []

#: set by the console script (`wbc_batch.__main__`): the process ends with its command, so a
#: finished run may keep signals from its last lines (`calm_to_the_end`); an embedding program
#: keeps its own handlers
owns_process = False


def _forces(signum: int, *before) -> bool:
    """Whether `signum`, coming after the signals of the lists `before`, stops at once: a SIGINT
    (a person pressing Ctrl-C again), or a SIGTERM after a SIGINT or a SIGTERM (asked again);
    not a SIGTERM after SIGHUPs alone, and never a SIGHUP (the module docstring)."""
    if signum not in STOPPING:
        return False
    return signum == signal.SIGINT or any(s in STOPPING for seen in before for s in seen)


def _asks_twice(signals: list, earlier=(), stopping: bool = False) -> bool:
    """Whether `signals`, received in this order after `earlier`, hold one that stops at once
    (`_forces`): one that comes after another of `signals`, or, with `stopping` (the caller was
    already asked to stop), any. Decided from the whole record, not from the signal that
    arrives: a handler run inside another one's, after that one recorded its signal, sees it
    (the module docstring gives the order left)."""
    return any((i or stopping) and _forces(s, signals[:i], earlier)
               for i, s in enumerate(signals))


def calm_to_the_end(*earlier: int) -> None:
    """For the console script, once a run has finished and its reports are written: from here to
    the process's end (its closing lines, Python's shutdown) a first signal changes nothing, and
    a second that asks twice (`_forces`) ends the process at once with 128 + that signal. A
    Ctrl-C just after "Done" printed a traceback, or made a complete run exit 130. `earlier`:
    the signal that stopped the run, after which the next one that asks twice ends the process
    at once (it was killed by that signal's default action, its exit code not the one the
    closing line gave, sometimes with a traceback from Python's shutdown). Does nothing where
    `owns_process` is false or outside the main thread."""
    if not (owns_process and _main_thread()):
        return
    seen: list = list(earlier)

    def late(signum, frame):
        seen.append(signum)  # first (the module docstring)
        if signum in STOPPING and _asks_twice(seen):
            os._exit(128 + signum)

    _install(late)


class StopNow(KeyboardInterrupt):
    """A second signal that asks twice (`_forces`): stop at once, without the reports the first
    one lets finish.
    `signum`: the signal that stopped it."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


_deferring = threading.local()  # whether a `deferred` block is running in this thread


def _restore(old: dict) -> None:
    for s, handler in old.items():
        signal.signal(s, signal.SIG_DFL if handler is None else handler)  # None: set outside Python


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _install(handler) -> dict:
    """Put `handler` on every signal not set to be ignored; -> {signal: the handler before}."""
    old = {}
    for s in SIGNALS:
        if signal.getsignal(s) is not signal.SIG_IGN:
            old[s] = signal.signal(s, handler)
    return old


@contextmanager
def terminate_as_interrupt():
    """Within the block SIGTERM and SIGHUP raise KeyboardInterrupt (as SIGINT does). Yields a list that
    holds the signal numbers received, so the caller can exit with 128 + the signal."""
    received: list = []
    if not _main_thread() or not hasattr(signal, "SIGTERM"):
        yield received
        return
    interrupted = []  # whether a KeyboardInterrupt was raised: once, by whichever handler

    def interrupt(signum, frame):
        received.append(signum)  # first (the module docstring)
        _received.append(signum)
        # not a second SIGHUP (with systemd's SIGTERM, or from a closing terminal), nor logind's
        # SIGTERM after one: those must not cut the reports
        if signum in STOPPING and _asks_twice(received):
            raise StopNow(signum)
        if not interrupted:
            interrupted.append(signum)
            raise KeyboardInterrupt

    old = _install(interrupt)
    _received.clear()
    try:
        yield received
    finally:
        _restore(old)
        _received.clear()


class stop_requests:
    """For a loop that stops between its items (`watch`): the first SIGINT, SIGTERM or SIGHUP asks
    `target.stop(signum)` to stop after the current item; one that comes before a target is
    attached (while models load) is passed on when it is. A second one that asks twice
    (`_forces`: Ctrl-C again, SIGTERM after Ctrl-C or SIGTERM) raises `StopNow` at once; the
    others do nothing. A context manager; signals set to be
    ignored stay ignored, and the handlers before are put back at its end."""

    def __init__(self):
        self.target = None
        self.requested: Optional[int] = None  # the first signal received
        self._old: dict = {}
        self._installed = False  # in the main thread only

    def attach(self, target) -> None:
        self.target = target
        if self.requested is not None:
            target.stop(self.requested)

    def _handle(self, signum, frame):
        _received.append(signum)  # first (the module docstring); this session's signals
        if signum in STOPPING and _asks_twice(_received):
            raise StopNow(signum)
        if self.requested is not None:
            return
        self.requested = signum
        if self.target is not None:
            self.target.stop(signum)

    def __enter__(self) -> stop_requests:
        if _main_thread():
            _received.clear()
            self._old = _install(self._handle)
            self._installed = True
        return self

    def __exit__(self, *exc) -> bool:
        if self._installed:  # a watcher in another thread leaves the main thread's record be
            _restore(self._old)
            _received.clear()
            self._installed = False
        return False


@contextmanager
def deferred(stopping: bool = False, doing: str = "the reports are written"):
    """SIGINT, SIGTERM and SIGHUP wait until the block ends, as the line on stderr says that
    the first one held gives (`doing`: what the block does); then the first one received is
    delivered to the handler that was in place before. A signal that comes after another (held
    here, or, with `stopping`, the one that already asked the caller to stop) and asks twice
    (`_forces`) raises `StopNow` at once, and nothing held is delivered. Inside another
    `deferred` block it does nothing: the outer one decides."""
    if not _main_thread() or getattr(_deferring, "on", False):
        yield
        return
    held: list = []

    def hold(signum, frame):
        held.append(signum)  # first (the module docstring)
        if _asks_twice(held, _received, stopping):
            held.clear()
            raise StopNow(signum)
        if len(held) == 1:
            _say_held(signum, doing)

    old = _install(hold)
    _deferring.on = True
    try:
        yield
    finally:
        _deferring.on = False
        _restore(old)
        if held:
            signal.raise_signal(held[0])


def _say_held(signum: int, doing: str) -> None:
    """One line on stderr for a signal `deferred` holds: without it, a first signal while a slow
    writer runs (a large workbook, a plugin's upload) seemed to do nothing. Written with
    os.write, which a signal handler may call while the main thread is in the middle of a
    buffered write to stderr."""
    again = " (or SIGTERM)" if signum in STOPPING else ""
    text = (f"\nwbc-batch: {signal.Signals(signum).name} received while {doing}: that is "
            f"finished first; Ctrl-C{again} stops at once\n")
    try:
        os.write(2, text.encode("utf-8", "replace"))
    except OSError:  # no stderr (a service's closed stream): the signal still waits
        pass


@contextmanager
def shielded():
    """Every signal waits until the block ends (keep it to milliseconds), then each one received
    is delivered, in order, to the handler that was in place before (a `deferred` block's, which
    may then stop at once)."""
    if not _main_thread():
        yield
        return
    held: list = []
    old = _install(lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        _restore(old)
        for signum in held:
            signal.raise_signal(signum)
