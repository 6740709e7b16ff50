"""Built-in plugin: `wbc-batch watch`, analyse scanner output as it lands in an inbox folder.

    wbc-batch watch INBOX -o OUT [--poll SECONDS] [--once] [--settle SECONDS]
                    [--max-attempts N] [run's model, hardware and output options]

Exactly once, across restarts and crashes, through the ledger OUT/ledger.sqlite; what happens
to slow, copied, renamed, changed, deleted and unreadable files is described in
`wbc_batch.watch` (and the README). Exit codes: 0 after SIGINT, SIGTERM or SIGHUP (the current
image is finished and the reports flushed first) or after `--once` with no file in error; 1 after
`--once` when some file is recorded as an error, and whenever the last reports could not all be
written (a report writer failed: run.json's report_errors; a full disk); 2 usage error; 128 +
the signal (130 SIGINT, 143 SIGTERM, 129 SIGHUP) when a signal stops `--once` before the end of
the backlog; 128 + the second signal (130 Ctrl-C, 143 SIGTERM) after a second SIGINT, or a SIGTERM
after a SIGINT or a SIGTERM, which stops at once, as in `run`.
"""

from __future__ import annotations

import signal

import click

from wbc_batch.cli import (FiniteFloatRange, FolderPath, RUN_GROUPS, GroupedCommand, SetupError,
                           build_config, model_options)
from wbc_batch.hookspecs import hookimpl
from wbc_batch.watch import DEFAULT_SETTLE, MAX_ATTEMPTS

#: the longest --settle and --poll (s): one day; longer waits overflow the timers
MAX_WAIT = 86400.0

#: run's option groups, without its ground truth (watch takes no --truth)
WATCH_GROUPS = (("Watching", ("poll", "once", "settle", "max_attempts")),) + tuple(
    (title, names) for title, names in RUN_GROUPS if "truth" not in names)


@click.command("watch", cls=GroupedCommand, option_groups=WATCH_GROUPS)
@click.argument("inbox", metavar="INBOX", type=FolderPath())
@click.option("-o", "--output", type=FolderPath(), required=True, metavar="OUT",
              help="Folder for the results and the ledger (created; may lie inside INBOX, or "
                   "INBOX inside it, but not in its overlays/ or masks/; must be on a local "
                   "disk).")
@model_options
@click.option("--poll", type=FiniteFloatRange(min=0.1, max=MAX_WAIT), default=None,
              metavar="SECONDS",
              help="Look for new files every SECONDS instead of waiting for filesystem events "
                   "(network shares deliver none).")
@click.option("--once", is_flag=True,
              help="Process the backlog (retries included), print a summary and exit; for "
                   "cron. Exit code 0, 1 when a file is in error, a report could not be "
                   "written or the inbox could not be reached at the end, 128 + the signal (130 "
                   "Ctrl-C, 143 SIGTERM, 129 SIGHUP) when stopped before the end of the "
                   "backlog.")
@click.option("--settle", type=FiniteFloatRange(min=0, max=MAX_WAIT), default=DEFAULT_SETTLE,
              show_default=True,
              metavar="SECONDS", help="A file is read only once its size, mtime and ctime have "
                                      "stayed unchanged this long. Also the first retry delay.")
@click.option("--max-attempts", type=click.IntRange(min=1), default=MAX_ATTEMPTS,
              show_default=True, metavar="N",
              help="Tries of a file that cannot be read (with doubling delays) before it is "
                   "recorded as an error.")
@click.pass_context
def watch_command(ctx, inbox, output, poll, once, settle, max_attempts, **opts):
    """Analyse the images in INBOX, then every new one as it appears, each exactly once.

    Results go to OUT as with `run` (cells.csv, images.csv, summary.csv, report.xlsx,
    overlays/), rebuilt after each image (at most every few seconds, and for a large folder
    about 5 % of the time) from the ledger OUT/ledger.sqlite. Restarted, it resumes where it
    stopped. A status line on stderr
    shows files processed, queued and in error. Ctrl-C, SIGTERM or SIGHUP (a closed terminal,
    a dropped SSH session): the current image is finished, the reports flushed, exit 0; under
    nohup, SIGHUP is ignored. With --once, a signal before the end of the backlog exits
    128 + the signal (130 for Ctrl-C, 143 for SIGTERM, 129 for SIGHUP), as `run` does.

    Files are counted by content: a byte-identical copy of an analysed file is not counted
    again (a row with status duplicate, "duplicate of NAME"); when the first file has left the
    inbox (or no longer holds that content: two files that swapped names), the copy is taken
    for it renamed or moved, and its result moves with it. A file
    whose content changes is analysed again and its new result replaces the old; an analysed
    file that is deleted stays reported. A file recorded as an error is tried again when it
    changes or is touched.
    """
    from wbc_batch.interrupts import StopNow
    from wbc_batch.pipeline import PipelineError
    from wbc_batch.plugins import PluginError, get_plugin_manager
    from wbc_batch.watch import WatchError, WatchOptions, watch

    config = build_config(inbox, output, **opts)
    options = WatchOptions(settle=settle, poll=poll, once=once, max_attempts=max_attempts,
                           retry_base=max(settle, 0.25))
    ctx.ensure_object(dict)
    try:
        pm = ctx.obj.get("pm") or get_plugin_manager()
        code = watch(config, options, pm=pm)
    except (WatchError, PipelineError, PluginError) as exc:
        raise SetupError(str(exc)) from None
    except StopNow as exc:  # a second signal that asks twice (interrupts._forces)
        click.echo("\nStopped at once (second signal); the ledger is consistent and the "
                   "reports are rebuilt at the next start.", err=True)
        ctx.exit(128 + exc.signum)
    except KeyboardInterrupt:  # before the watcher's own handlers were in place
        click.echo("\nInterrupted before the watcher started; nothing was analysed.", err=True)
        ctx.exit(128 + signal.SIGINT)
    ctx.exit(code)


@hookimpl
def wbc_register_commands(cli):
    cli.add_command(watch_command)
