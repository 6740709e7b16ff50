"""The errors the core raises for a run or a watch as asked for; the CLI turns them into exit
codes."""

from __future__ import annotations


class PipelineError(Exception):
    """A problem with the run as asked for (folders, backend, device, model, writers, truth).
    The CLI reports it as a usage error (exit code 2)."""


class ReportError(RuntimeError):
    """A report writer failed; the other reports and run.json were written."""


class WatchError(RuntimeError):
    """The watcher cannot start (inbox missing, OUT used by another watcher, ledger mismatch).
    The CLI reports it as a usage error (exit code 2)."""
