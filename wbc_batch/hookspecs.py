"""Every hook of wbc-batch, written as a contract.

Plugins implement these with `@hookimpl` (`from wbc_batch.hookspecs import hookimpl`). Built-in
plugins (in `plugins/`) implement them exactly the way a third-party plugin does and are declared
in the same `wbc_batch` entry-point group (setup.cfg); `get_plugin_manager` registers them from
`wbc_batch.plugins.BUILTINS`, so that they are there with entry-point autoloading off too.
"""

import pluggy

hookspec = pluggy.HookspecMarker("wbc_batch")
hookimpl = pluggy.HookimplMarker("wbc_batch")


# --- registration: things the core collects once into name -> object mappings -----------------
# Each is called once per plugin manager (again only when a plugin is registered or removed).
# An object without a `name`, a class in place of an instance, one without the methods its
# protocol needs, a name another plugin already offers, or a hook that raises is a fault of
# the plugin: `wbc-batch plugins` lists it as BROKEN and every other command refuses to start.

@hookspec
def wbc_register_backends():
    """Offer inference backends.

    :returns: a list of objects fulfilling `wbc_batch.backend.Backend` (each with a unique
        `name`), or None.
    """


@hookspec
def wbc_register_report_writers():
    """Offer report writers (the built-ins are "csv" and "xlsx").

    :returns: a list of objects fulfilling `wbc_batch.reports.ReportWriter` (each with a unique
        `name`), or None.
    """


@hookspec
def wbc_register_truth_readers():
    """Offer ground-truth readers for `--truth`.

    :returns: a list of objects fulfilling `wbc_batch.truth.TruthReader` (each with a unique
        `name`), or None.
    """


@hookspec
def wbc_register_commands(cli):
    """Add click commands to the `wbc-batch` command group. Replacing or removing a command
    wbc-batch (or another plugin) already has is a fault, as is raising.

    :param cli: the `click.Group` of the command line; call `cli.add_command(...)` on it. A
        command finds the plugin manager in `click.get_current_context().obj["pm"]`.
    """


# --- lifecycle: one run, then one call per image -----------------------------------------------
# A plugin that raises in one of these is named in a warning and left out of the lifecycle hooks
# for the rest of the run, or in `watch` for the next 10 minutes unless it failed in
# `wbc_run_start` (`plugins.Lifecycle`); the run, its reports and the other plugins go on.
# KeyboardInterrupt is not caught: it stops the run as Ctrl-C does.

@hookspec
def wbc_run_start(config, total):
    """A run (or a watch session's backlog) starts.

    :param config: the `wbc_batch.config.RunConfig` of the run.
    :param total: the number of images queued so far (watch mode may add more later).
    """


@hookspec
def wbc_image_start(image, index, total):
    """An image is about to be analysed. In `watch`, a file that could not be read yet (still
    being written, locked) or that changed while it was analysed is tried again later: each try
    starts with this hook, and `wbc_image_done` comes once, for the last.

    :param image: its path relative to the input folder, with forward slashes.
    :param index: 0-based position in the run.
    :param total: the number of images queued so far.
    """


@hookspec
def wbc_image_done(result, index, total):
    """An image has been analysed (or has failed).

    In `run`, an image's overlay and mask are written in the background while the next image
    is analysed, and this hook comes once they are written: it may follow `wbc_image_start` of
    the next image (on a GPU, of the next several: they are analysed at once). It comes for
    each image once, in input order. `index` identifies the image.

    :param result: the `wbc_batch.results.ImageResult`; `result.status` is "ok", "error", or
        "duplicate" for a copy of a file counted under another name (no failure).
    :param index: 0-based position in the run.
    :param total: the number of images queued so far.
    """


@hookspec
def wbc_run_end(config, results, seconds):
    """A run has finished: called after its reports were written, or tried (a report writer
    failed, a signal cut the run short: run.json's `report_errors` and `interrupted` say so).

    :param config: the `wbc_batch.config.RunConfig` of the run.
    :param results: the list of `ImageResult` of this run (from `watch`, every file of the
        ledger); a copy of a file counted under another name has status "duplicate".
    :param seconds: wall time of the run.
    """
