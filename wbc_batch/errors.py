"""The errors the core raises for a run or a watch as asked for; the CLI turns them into exit
codes."""

from __future__ import annotations


class WbcBatchError(Exception):
    """The base of every error wbc-batch raises on purpose, each a subclass of it and, where its
    kind suggests one, of a built-in error (ValueError for a bad value, RuntimeError for a
    state): `except WbcBatchError` catches them all, in a program that uses wbc-batch as a
    library. PipelineError, whose causes are of both kinds, is neither; its subclasses are."""


class PipelineError(WbcBatchError):
    """A problem with the run as asked for (folders, backend, device, model, writers, truth).
    The CLI reports it as a usage error (exit code 2)."""


class RunnerClosedError(PipelineError, RuntimeError):
    """A `Runner` was called after `close()`: make a new one."""


class ReportError(WbcBatchError, RuntimeError):
    """A report writer failed; the other reports and run.json were written."""


class WatchError(WbcBatchError, RuntimeError):
    """The watcher cannot start (inbox missing, OUT used by another watcher, ledger mismatch).
    The CLI reports it as a usage error (exit code 2)."""


class ConfigError(WbcBatchError, ValueError):
    """A value of `RunConfig` or `AnalysisParams` that the command line would refuse, naming
    the field."""
