"""Signals for `run` and `watch`: SIGTERM and SIGHUP stop a run as Ctrl-C does, and a report set
is never cut in half.

Schedulers, `docker stop` and `kill` send SIGTERM, and a closed terminal SIGHUP; without a
handler either ends the process at once, leaving overlays but no reports (or, after --overwrite,
another run's). `terminate_as_interrupt` turns them into KeyboardInterrupt for the length of a
run, so the runner writes the reports of the images finished so far, as for Ctrl-C (exit code
128 + the signal).

`deferred` holds the first of these signals while the reports are written, then delivers it:
every report in OUT comes from the same results, even when the user presses Ctrl-C while a large
workbook is being saved. A second SIGINT or SIGTERM (after the one that stopped the analysis, or
after the one held) stops at once (`StopNow`), even while a plugin writer hangs; SIGHUP never
does (systemd sends SIGTERM and SIGHUP together, a closing terminal may send it twice).
`shielded` holds every signal for the milliseconds the staged reports take to be put in place,
so that no signal leaves half a set. `stop_requests` is the watcher's: the first signal asks it to
stop after the current image, and a second SIGINT or SIGTERM stops at once, as in `run`.

All of them only act in the main thread (Python runs signal handlers there); elsewhere they do
nothing. A signal the parent process set to be ignored (`nohup`, `cmd &` in a shell without job
control) stays ignored.
"""

from __future__ import annotations

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

#: the signals that, coming after another, stop at once (not SIGHUP: see the module docstring)
STOPPING = tuple(s for s in (getattr(signal, "SIGINT", None), getattr(signal, "SIGTERM", None))
                 if s is not None)


class StopNow(KeyboardInterrupt):
    """A second SIGINT or SIGTERM: stop at once, without the reports the first one lets finish.
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

    def interrupt(signum, frame):
        received.append(signum)
        if len(received) == 1:
            raise KeyboardInterrupt
        if signum in STOPPING:  # a second SIGHUP (with systemd's SIGTERM, or from a closing
            raise StopNow(signum)  # terminal) must not cut the first one's reports

    old = _install(interrupt)
    try:
        yield received
    finally:
        _restore(old)


class stop_requests:
    """For a loop that stops between its items (`watch`): the first SIGINT, SIGTERM or SIGHUP asks
    `target.stop(signum)` to stop after the current item; one that comes before a target is
    attached (while models load) is passed on when it is. A second SIGINT or SIGTERM raises
    `StopNow` at once; a second SIGHUP does nothing. A context manager; signals set to be
    ignored stay ignored, and the handlers before are put back at its end."""

    def __init__(self):
        self.target = None
        self.requested: Optional[int] = None  # the first signal received
        self._old: dict = {}

    def attach(self, target) -> None:
        self.target = target
        if self.requested is not None:
            target.stop(self.requested)

    def _handle(self, signum, frame):
        if self.requested is not None:
            if signum in STOPPING:
                raise StopNow(signum)
            return
        self.requested = signum
        if self.target is not None:
            self.target.stop(signum)

    def __enter__(self) -> stop_requests:
        if _main_thread():
            self._old = _install(self._handle)
        return self

    def __exit__(self, *exc) -> bool:
        _restore(self._old)
        return False


@contextmanager
def deferred(stopping: bool = False):
    """SIGINT, SIGTERM and SIGHUP wait until the block ends; then the first one received is
    delivered to the handler that was in place before. A SIGINT or SIGTERM that comes after
    another (held here, or, with `stopping`, the one that already asked the caller to stop)
    raises `StopNow` at once, and nothing held is delivered. Inside another `deferred` block
    it does nothing: the outer one decides."""
    if not _main_thread() or getattr(_deferring, "on", False):
        yield
        return
    held: list = []

    def hold(signum, frame):
        if signum in STOPPING and (stopping or held):
            held.clear()
            raise StopNow(signum)
        held.append(signum)

    old = _install(hold)
    _deferring.on = True
    try:
        yield
    finally:
        _deferring.on = False
        _restore(old)
        if held:
            signal.raise_signal(held[0])


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
