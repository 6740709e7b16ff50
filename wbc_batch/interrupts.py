"""Signals for `run`: SIGTERM and SIGHUP stop a run as Ctrl-C does, and a report set is never cut
in half.

Schedulers, `docker stop` and `kill` send SIGTERM, and a closed terminal SIGHUP; without a
handler either ends the process at once, leaving overlays but no reports (or, after --overwrite,
another run's). `terminate_as_interrupt` turns them into KeyboardInterrupt for the length of a
run, so the runner writes the reports of the images finished so far, as for Ctrl-C (exit code
128 + the signal).

`deferred` holds these signals while the reports are written, then delivers the first one
held: every report in OUT comes from the same results, even when the user presses Ctrl-C while a
large workbook is being saved.

Both only act in the main thread (Python runs signal handlers there); elsewhere they do nothing.
A signal the parent process set to be ignored (`nohup`, `cmd &` in a shell without job control)
stays ignored.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

#: SIGHUP too: a closed terminal or a dropped SSH session must not lose a run's reports
SIGNALS = tuple(s for s in (getattr(signal, "SIGINT", None), getattr(signal, "SIGTERM", None),
                            getattr(signal, "SIGHUP", None)) if s is not None)


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
        if len(received) == 1:  # a second signal (SIGTERM and SIGHUP together, from systemd or
            raise KeyboardInterrupt  # a closed terminal) must not cut the first one's reports

    old = _install(interrupt)
    try:
        yield received
    finally:
        _restore(old)


@contextmanager
def deferred():
    """SIGINT, SIGTERM and SIGHUP wait until the block ends; then the first one received is delivered
    to the handler that was in place before."""
    if not _main_thread():
        yield
        return
    held: list = []
    old = _install(lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        _restore(old)
        if held:
            signal.raise_signal(held[0])
