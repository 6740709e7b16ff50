"""Built-in plugin: `wbc-batch evaluate`, a run restricted to the images that have ground truth.

    wbc-batch evaluate INPUT --truth PATH [--truth-format NAME]
                       [--split-file CSV --split NAME [--where COL=VALUE]] -o OUT
                       [run options]

The images are: with `--split-file`, exactly the rows of that split (the CSV's `image` column,
relative to INPUT; `--where dataset=2` keeps the rows whose `dataset` column is 2); with
`--split` alone, the folder INPUT/NAME (TXL-PBC's `images/test`); otherwise every image under
INPUT that the truth knows. The run is the normal pipeline, so OUT holds the normal reports plus
accuracy.csv and the Accuracy sheet; the headline numbers are printed on stdout. Images of the
chosen set that have no truth are run but not scored, and named in a warning; without
`--split-file`, so are the truth entries that match no image, so a truth/name mismatch can never
quietly shrink the test set. Images and truth are paired one to one (`TruthSet.resolve`).

A `--split-file` needs an explicit `--split`: the test rows are for final measurement only, so
evaluating on them is never a default (use `--split val` while developing).
"""

from __future__ import annotations

import logging
from pathlib import Path

import click

from wbc_batch.cli import RUN_GROUPS, FolderPath, GroupedCommand, SetupError, model_options
from wbc_batch.hookspecs import hookimpl
from wbc_batch.reports import printable

#: images named in the "no ground truth" warning before "... and N more"
MAX_LISTED = 5


def choose_images(input_dir: Path, output_dir: Path, truth, split_file=None, split=None,
                  where=None, left_out=None, not_read=None, passed_over=None) -> list:
    """The images to evaluate (see the module docstring). Where a folder is searched, the
    folders it could not enter and the files of image formats that are not read are appended to
    `left_out` and `not_read` (`discovery.discover_images`), as `run` records them, and the
    images that reach a truth entry whose name another image matches exactly (`F1.PNG` beside
    `f1.png`) to `passed_over`: they are not evaluated.

    :raises click.UsageError: an unusable split, or no image with ground truth at all.
    """
    from wbc_batch.discovery import discover_images, relative_name
    from wbc_batch.truth import TruthError, select_split

    if split_file is not None:
        if not split:
            raise click.UsageError("--split-file needs --split (e.g. --split val; test is for final "
                                   "measurement only)")
        try:
            return select_split(split_file, split, input_dir, where)
        except TruthError as exc:
            raise click.UsageError(str(exc)) from None
    if where:
        raise click.UsageError("--where filters the rows of a --split-file")
    if split:
        folder = input_dir / split
        if not folder.is_dir():
            raise click.UsageError(f"--split {split} without --split-file needs the folder "
                                   f"{folder} (as TXL-PBC's images/{split})")
        return discover_images(folder, exclude=output_dir, left_out=left_out, not_read=not_read)
    found = discover_images(input_dir, exclude=output_dir, left_out=left_out, not_read=not_read)
    # as the scoring pairs them, one image per truth entry: `F1.JPG` beside `f1.jpg` reaches
    # f1.jpg's truth only where f1.jpg is not there; an entry several images reach alike keeps
    # them, to be named as ambiguous
    names = {relative_name(p, input_dir): p for p in found}
    paired, ambiguous = truth.resolve(names)
    chosen = set(paired) | {name for several in ambiguous.values() for name in several}
    if passed_over is not None:
        passed_over += [n for n in names if n not in chosen and truth.key_for(n) is not None]
    return [p for name, p in names.items() if name in chosen]


EVALUATE_GROUPS = (("Images and ground truth", ("truth", "truth_format", "split_file", "split",
                                                "where")),
                   *((title, names) for title, names in RUN_GROUPS if "truth" not in names))


@click.command("evaluate", cls=GroupedCommand, option_groups=EVALUATE_GROUPS)
@click.argument("input_dir", metavar="INPUT", type=click.Path(exists=True, file_okay=False,
                                                              path_type=Path))
@click.option("--truth", type=click.Path(exists=True, path_type=Path), required=True,
              metavar="PATH", help="Ground truth: a dataset folder, annotations, labels or a CSV.")
@click.option("--truth-format", default=None, metavar="NAME",
              help="Truth reader to use (default: the first that recognises PATH; see "
                   "`wbc-batch plugins`).")
@click.option("--split-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, metavar="CSV",
              help="Split CSV (columns image, split; image relative to INPUT).")
@click.option("--split", default=None, metavar="NAME",
              help="Split to evaluate (train, val, test); without --split-file: the folder "
                   "INPUT/NAME.")
@click.option("--where", multiple=True, metavar="COLUMN=VALUE",
              help="Keep only the split-file rows with this value (repeatable), e.g. "
                   "--where dataset=2.")
@click.option("-o", "--output", type=FolderPath(), required=True, metavar="OUT",
              help="Folder for the results and accuracy.csv.")
@model_options
@click.pass_context
def evaluate_command(ctx, input_dir, truth, truth_format, split_file, split, where, output,
                     **opts):
    """Run the pipeline on the images of INPUT that have ground truth (or on one split of
    them) and report accuracy: pixel IoU / Recall / ACC where masks are given, class accuracy,
    per-class F1, confusion matrix and calibration where classes are given, cell-finding recall
    and precision where boxes are given. Exit code as for `run` (0, 1 some images failed, 2
    usage error, 130, 143 or 129 when Ctrl-C, SIGTERM or SIGHUP stopped it)."""
    from wbc_batch.cli import build_config, cut_short, echo_err, execute, summarise
    from wbc_batch.metrics import format_accuracy
    from wbc_batch.output_folder import check_output
    from wbc_batch.pipeline import PipelineError, Runner
    from wbc_batch.plugins import PluginError, get_plugin_manager

    conditions = _conditions(where)
    config = build_config(input_dir, output, truth=truth, truth_format=truth_format, **opts)
    ctx.ensure_object(dict)
    pm = ctx.obj.get("pm") or get_plugin_manager()
    say = (lambda msg: None) if config.quiet else echo_err
    try:
        check_output(config)
        runner = Runner(config, pm)
    except (PipelineError, PluginError) as exc:
        raise SetupError(str(exc)) from None
    except KeyboardInterrupt:  # Ctrl-C while the models load: nothing was written, as `run`
        echo_err("\nInterrupted before any image was analysed.")
        ctx.exit(130)
    try:
        passed_over = []
        images = runner.without_truth_masks(choose_images(
            config.input_dir, config.output_dir, runner.truth, split_file, split, conditions,
            left_out=runner.left_out, not_read=runner.not_read, passed_over=passed_over),
            say=False)  # said by announce(), once OUT is claimed
        untruthed, unused, shadowed = _pairing(runner, config, images, truth, split_file)
    except BaseException:
        runner.close()
        raise
    runner.warn_untruthed = False  # named by announce(), with the file names
    runner.truth_covers_run = split_file is None  # a split file's truth covers every split

    def announce():
        if runner.masks_note:
            logging.getLogger("wbc_batch").warning("%s", runner.masks_note)
        cond = "".join(f", {c}={v}" for c, v in conditions.items())
        chosen = f"split {split!r}{cond} of {split_file.name}" if split_file else (
            f"folder {split}" if split else "images with ground truth")
        say(f"evaluate: {len(images)} image(s) ({chosen}) in {config.input_dir}; truth "
            f"{truth} read as {runner.truth.reader!r}; backend {config.backend} on {runner.device}")
        if untruthed:
            echo_err(f"Warning: {len(untruthed)} of {len(images)} image(s) have no ground truth "
                     f"and are not scored: {_listing(untruthed)}")
        if passed_over:
            echo_err(f"Note: {len(passed_over)} image(s) reach ground truth whose name another "
                     f"image has exactly, and are not evaluated: {_listing(passed_over)}")
        if shadowed:
            echo_err(f"Warning: {shadowed}")
        if unused:
            echo_err(f"Warning: {len(unused)} of {len(runner.truth)} ground-truth entries match no "
                     f"image and are not scored: {_listing(unused)}")

    def stopped(finished):
        """The closing lines of the images finished; the accuracy only for a complete run: that
        of part of a split would read as the split's (accuracy.csv has it, marked)."""
        summarise(finished, config, say, stopped=cut_short(finished))
        if not cut_short(finished):
            click.echo(format_accuracy(runner.last_accuracy or {}))

    outcome = execute(ctx, runner, images, announce, stopped=stopped)
    summarise(outcome, config, say)
    click.echo(format_accuracy(runner.last_accuracy or {}))
    ctx.exit(outcome.exit_code)


def _conditions(where) -> dict:
    """--where COLUMN=VALUE options as {column: value}."""
    conditions = {}
    for item in where:
        column, sep, value = item.partition("=")
        if not sep or not column.strip():
            raise click.BadParameter(f"expected COLUMN=VALUE, got {item!r}", param_hint="'--where'")
        conditions[column.strip()] = value.strip()
    return conditions


def _pairing(runner, config, images: list, truth, split_file) -> tuple:
    """Pair the chosen images with the truth: -> (images without truth, truth entries that
    match no image, the warning for those that name an image paired with another spelling of
    its name (`TruthSet.shadowed`) or ""; the last two only without a split file, whose truth
    may cover the other splits). A truth name several images reach is logged by the run.

    :raises click.UsageError: no image pairs with the truth, saying why where it can.
    """
    from wbc_batch.discovery import relative_name
    from wbc_batch.truth import shadowed_text

    names = [relative_name(p, config.input_dir) for p in images]
    paired, ambiguous = runner.truth.resolve(names)
    untruthed = [n for n in names if n not in paired]
    if not images or len(untruthed) == len(names):
        why = _ambiguity(ambiguous) or _several_fit(runner.truth, config, names)
        which = (f"none of the {len(names)} image(s) chosen in {config.input_dir} matches"
                 if names else f"no image in {config.input_dir} matches")
        unread = (f"; {len(runner.not_read)} file(s) in formats that are not read were left out, "
                  f"such as {runner.not_read[0]}" if runner.not_read else "")
        raise SetupError(f"no image to evaluate: {which} the ground truth in {truth} "
                         f"(reader {runner.truth.reader!r}){why}{unread}")
    unused = runner.truth.unmatched(paired, ambiguous) if split_file is None else []
    twice = runner.truth.shadowed(paired, unused)
    shadowed = shadowed_text(twice, paired) if twice else ""
    return untruthed, [k for k in unused if k not in twice], shadowed


def _listing(names: list) -> str:
    more = f" and {len(names) - MAX_LISTED} more" if len(names) > MAX_LISTED else ""
    return ", ".join(printable(n) for n in names[:MAX_LISTED]) + more


def _ambiguity(ambiguous: dict) -> str:
    """Why images matched no truth when the reason is that each truth name fits several."""
    if not ambiguous:
        return ""
    key, claimants = next(iter(ambiguous.items()))
    listed = ", ".join(claimants[:3]) + (" ..." if len(claimants) > 3 else "")
    return (f": truth {key} matches {len(claimants)} images ({listed})"
            + (f", and {len(ambiguous) - 1} more truth names match several" if len(ambiguous) > 1
               else "") + "; give the images' folders in the truth names")


def _several_fit(truth, config, names: list) -> str:
    """Why no image matched when several truth names fit each. With no image chosen (without a
    split, only the images with truth are), the input folder's images are asked."""
    from wbc_batch.discovery import discover_images, relative_name

    if not names:
        names = [relative_name(p, config.input_dir)  # said once already, by choose_images
                 for p in discover_images(config.input_dir, exclude=config.output_dir,
                                          warn=lambda _: None)]
    note = truth.several_fit_note(names)
    return f": {note}" if note else ""


@hookimpl
def wbc_register_commands(cli):
    cli.add_command(evaluate_command)
