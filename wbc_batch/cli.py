"""The `wbc-batch` command line: a thin click layer over `wbc_batch.pipeline`.

Options become a frozen `RunConfig`; errors become exit codes: 0 no image failed, 1 the run
completed but some images failed, 2 a usage error (bad option, folder, backend, model...).
Plugins add commands (watch, train, evaluate, a third party's) through `wbc_register_commands`.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import signal
import sys
from pathlib import Path

import click

from . import __version__
from .config import (DEFAULT_REVIEW_THRESHOLD, FLAGGED_CELL_SETTINGS, MAX_THREADS, MIN_DIAMETER_PX,
                     AnalysisParams, RunConfig)
from .devices import DeviceError, parse_device
from .interrupts import BEFORE_START
from .results import MAX_LISTED_ERRORS, failure_lines

EXIT_USAGE = 2
DEFAULT_WRITERS = ("csv", "xlsx")

#: what a command plugin (`wbc_register_commands`) may import from this module, as the built-in
#: watch, train and evaluate commands do; each keeps the contract its docstring or comment gives
#: (README, "Commands from plugins"). The rest of this module may change without notice.
COMMAND_HELPERS = ("SetupError", "GroupedCommand", "RUN_GROUPS", "FiniteFloatRange", "FolderPath",
                   "model_options", "build_config", "execute", "summarise", "cut_short",
                   "echo_err")


class SetupError(click.ClickException):
    """A run that cannot start for a reason other than how the command was typed (a backend or
    truth reader that fails, a model bundle that cannot be read, two plugins offering one
    name): "Error: ..." and exit code 2, without the usage line and "Try --help" that a
    `click.UsageError` prints, which sent a lab user to the help for a plugin's crash."""

    exit_code = EXIT_USAGE


# --- help grouped by concern ---------------------------------------------------------------------

class GroupedCommand(click.Command):
    """A command whose --help lists options under headings; each option names its heading in
    `option_groups`, (title, option names) pairs (options not listed go under "Other")."""

    def __init__(self, *args, option_groups=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.option_groups = option_groups

    def format_options(self, ctx, formatter):
        records = {}
        for param in self.get_params(ctx):
            if not isinstance(param, click.Option):  # click 8.5 gives arguments a record too
                continue
            rec = param.get_help_record(ctx)
            if rec is not None:
                records[param.name] = rec
        used = set()
        for title, names in self.option_groups:
            rows = [records[n] for n in names if n in records]
            used.update(names)
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)
        rest = [rec for name, rec in records.items() if name not in used]
        if rest:
            with formatter.section("Other"):
                formatter.write_dl(rest)


class FolderPath(click.Path):
    """click.Path (a `Path`) that refuses an empty value: `Path("")` is the current folder, so
    `wbc-batch run "$SCANNER_DIR" -o "$OUT"` with a variable unset had analysed, or written
    into, the folder the script happened to run in."""

    def __init__(self, **kwargs):
        super().__init__(path_type=Path, **kwargs)

    def convert(self, value, param, ctx):
        if isinstance(value, str) and value == "":
            self.fail("is empty: it names no folder (in a script, a variable that is not set?); "
                      "name the current folder '.'", param, ctx)
        return super().convert(value, param, ctx)


class FiniteFloatRange(click.FloatRange):
    """click.FloatRange that also refuses nan and inf (nan passes every range check)."""

    def convert(self, value, param, ctx):
        value = super().convert(value, param, ctx)
        if not math.isfinite(value):
            self.fail(f"{value} is not a finite number.", param, ctx)
        return value


class Probability(FiniteFloatRange):
    """A probability, 0 to 1; a value given in percent (80 for 0.8) is refused saying so."""

    def __init__(self):
        super().__init__(0, 1)

    def convert(self, value, param, ctx):
        try:
            return super().convert(value, param, ctx)
        except click.BadParameter as exc:
            text = str(value).strip()
            percent = text.endswith("%")
            try:
                number = float(text.rstrip("%").strip())
            except ValueError:  # not a number: click's own message
                raise exc from None
            # 15 % would flag nothing (no top probability of five classes is under 0.2): no hint
            if percent or 20 < number <= 100:
                self.fail(f"{value} is not between 0 and 1: a probability, not a percentage "
                          f"(for {number:g} %, give {number / 100:g}).", param, ctx)
            raise


def model_options(f):
    """Options shared by `run` and plugin commands that analyse images (e.g. `watch`)."""
    for decorator in reversed([
        click.option("--backend", default="torch", show_default=True, metavar="NAME",
                     help="Inference backend (see `wbc-batch plugins`): torch or onnx built in."),
        click.option("--device", default="auto", show_default=True, metavar="auto|cpu|cuda[:N]",
                     help="auto: the first CUDA GPU if there is one, else the CPU. Without a GPU, "
                          "cuda falls back to the CPU with a note."),
        click.option("--threads", type=click.IntRange(0, MAX_THREADS), default=0, show_default=True,
                     metavar="N",
                     help="CPU threads for inference (0: the library's default, all cores; at most "
                          "1024)."),
        click.option("--model", "model_dir", type=click.Path(path_type=Path), default=None,
                     metavar="DIR", help="Model bundle folder (default: the models shipped in the "
                                         "package)."),
        click.option("--diameter", type=FiniteFloatRange(min=MIN_DIAMETER_PX), default=None,
                     metavar="PX", help="Typical WBC diameter in image pixels (default: estimated "
                                        f"per image; at least {MIN_DIAMETER_PX:g}: a smaller cell "
                                        "holds too few pixels to tell nucleus from cytoplasm)."),
        click.option("--review-threshold", type=Probability(), metavar="P",
                     default=DEFAULT_REVIEW_THRESHOLD, show_default=True,
                     help="Flag cells as needs_review when their top class probability is below P."),
        click.option("--tta-views", type=click.Choice(["1", "4", "8"]),
                     default=str(AnalysisParams.tta_views), show_default=True, metavar="1|4|8",
                     help="Classify each cell in this many views (flips and turns of its crop) "
                          "and average the logits. 1 is off; on val, 4 and 8 views did not help "
                          "(see the model card)."),
        click.option("--box-trim", type=FiniteFloatRange(0, 0.5), default=AnalysisParams.box_trim,
                     show_default=True, metavar="FRAC",
                     help="Report each cell's box around its body: its outline opened by a disc of "
                          "FRAC WBC diameters, so that a tail or a touching red cell's sliver does "
                          "not widen the box. 0: the box of the whole outline, which a grey image "
                          "always gets. Outlines, areas and classes do not change."),
        click.option("--outline-refine", type=FiniteFloatRange(0, 0.25),
                     default=AnalysisParams.outline_refine, show_default=True, metavar="FRAC",
                     help="Refine each cell's outline and its nucleus's at full resolution with a "
                          "colour-guided filter of radius FRAC WBC diameters, so that they follow "
                          "the image's own edges rather than the upsampled network output. 0 is off."),
        click.option("--outline-eps", type=FiniteFloatRange(1e-4, 1),
                     default=AnalysisParams.outline_eps, show_default=True, metavar="EPS",
                     help="Regularisation of --outline-refine (larger: smoother outlines; from "
                          "1e-4, below which the filter's arithmetic fails, to 1, where the "
                          "colours no longer guide it)."),
        click.option("--grey-nucleus-contrast", type=FiniteFloatRange(0, 1),
                     default=AnalysisParams.min_grey_nucleus_contrast, show_default=True, metavar="C",
                     help="In a grey image (a monochrome camera), drop a cell whose nucleus is not "
                          "at least C darker than the glass around it (0: keep every cell). Colour "
                          "images are judged by their nucleus's stain instead."),
        click.option("--nucleus-over-field", type=FiniteFloatRange(0, 10),
                     default=AnalysisParams.min_nucleus_over_field, show_default=True, metavar="K",
                     help="In a colour image, drop a cell whose nucleus is stained less than K "
                          "times as much as the red cells around it: what is taken for a cell "
                          "among the red cells of a field without any WBC (0: no such bar)."),
        click.option("--no-stain-check", is_flag=True,
                     help="Do not flag cells whose stain is unlike every microscope the classifier "
                          "was trained on (unusual_stain, needs_review)."),
        click.option("--no-even-illumination", is_flag=True,
                     help="Analyse fields with strong lamp falloff (dark corners or one dark side) "
                          "as they are, instead of evening out their illumination first."),
        click.option("--fill-margins", is_flag=True,
                     help="Paint flat light bands along the image's edges (white padding, an info "
                          "banner with its text) in the glass colour before the analysis. On val "
                          "fields given such bands it brought back most cells they had cost, but "
                          "under a banner it cost two Dataset 1 crops their right class "
                          "(docs/EXPERIMENTS.md, \"Flat margins and info banners\")."),
        click.option("--fill-white-stop", is_flag=True,
                     help="Paint a round field stop saved white (a transparent stop flattened by a "
                          "viewer, as JPEG) in the glass colour before the analysis, as a black "
                          "stop always is. On BCCD val fields given a white stop it matched 85 of "
                          "87 boxes, as with a black stop, where they matched 54; off by default, "
                          "as it also fires "
                          "on single-cell crops of 400 px or more on neutral white glass and harms "
                          "their outlines (docs/EXPERIMENTS.md, \"A white field stop\")."),
        click.option("--border-arc", is_flag=True,
                     help="Measure a WBC cut by the image border by the circle its outline "
                          "follows when estimating the field's WBC size, not by the part that "
                          "shows (which reads a half cell at 0.71 of its size). Off by default: "
                          "it missed one bar of the rule it was judged by (docs/EXPERIMENTS.md, "
                          "\"A WBC cut by the image border\")."),
        click.option("--red-cell-bar", is_flag=True,
                     help="Take a WBC size estimate under 0.8 of the field's red cells' size, "
                          "as a learned sizer reads it, for red cells, and analyse the field at "
                          "1.82 red cells' size instead: fewer false cells in fields without a "
                          "WBC. Off by default: a sizer that had not seen a microscope lost a "
                          "few of its fields' WBCs (docs/EXPERIMENTS.md, \"A learned red-cell "
                          "size\")."),
        click.option("--stain-normalise", is_flag=True,
                     help="Classify the cells flagged unusual_stain from their crop redrawn in the "
                          "stain the classifier was mostly trained on. It helped on a microscope the "
                          "classifier never saw and harmed some colour casts and pale stains: check "
                          "it on labelled cells of your own first (see the model card)."),
        click.option("--grey-unusual", is_flag=True,
                     help="Classify the cells flagged unusual_stain (every cell of a grey or "
                          "toned image) from their crop in grey, so that a stain the classifier "
                          "never saw misleads it less through colour. "
                          "It helped on a microscope the classifier never saw and harmed a warm "
                          "cast and a pale stain: check it on labelled cells of your own first "
                          "(docs/EXPERIMENTS.md, \"Classifying unusual cells from their grey "
                          "crop\")."),
        click.option("--blend-unusual", is_flag=True,
                     help="Classify the cells flagged unusual_stain from the mean of two answers, "
                          "their crop in colour and in grey, so that a confident reading "
                          "outweighs an unsure one. It helped on a microscope the classifier "
                          "never saw, less than --grey-unusual, and did less harm under a pale "
                          "stain, but some: check it on labelled cells of your own first "
                          "(docs/EXPERIMENTS.md, \"Colour and grey together for unusual "
                          "cells\")."),
        click.option("--save-masks", is_flag=True,
                     help="Also write OUT/masks/<image>.png (0 background, 128 cytoplasm, "
                          "255 nucleus)."),
        click.option("--no-overlays", is_flag=True, help="Do not write OUT/overlays/."),
        click.option("--report", "reports", multiple=True, metavar="NAME",
                     help="Report writer, repeatable (default: csv and xlsx; see `wbc-batch "
                          "plugins`)."),
        click.option("--quiet", "-q", is_flag=True,
                     help="No progress bar and no summary lines; failed images, folders left "
                          "out and a GPU asked for but not used are still said."),
        click.option("--overwrite", is_flag=True,
                     help="Replace the results already in OUT (refused otherwise; `watch` "
                          "resumes a folder of its own ledger over the same inbox without it)."),
    ]):
        f = decorator(f)
    return f


#: --help headings of `run` (commands sharing `model_options` may reuse them; a heading whose
#: options a command lacks is not shown)
RUN_GROUPS = (
    ("Input and output", ("output", "overwrite", "save_masks", "no_overlays", "reports", "quiet")),
    ("Model and analysis", ("model_dir", "diameter", "review_threshold", "tta_views", "box_trim",
                            "outline_refine", "outline_eps", "grey_nucleus_contrast",
                            "nucleus_over_field",
                            "no_stain_check", "stain_normalise", "grey_unusual", "blend_unusual",
                            "no_even_illumination", "fill_margins", "fill_white_stop",
                            "border_arc", "red_cell_bar")),
    ("Hardware", ("backend", "device", "threads")),
    ("Ground truth (accuracy report)", ("truth", "truth_format")),
)


#: what each option of `config.FLAGGED_CELL_SETTINGS` does to the cells the stain check flags
FLAGGED_CELL_OPTIONS = {"stain_normalise": "redraws the cells the stain check flags",
                        "grey_unusual": "classifies the cells the stain check flags in grey",
                        "blend_unusual": "classifies the cells the stain check flags from their "
                                         "colour and grey crops"}


def _check_flagged_cell_options(opts: dict) -> None:
    """Refuse an option of `FLAGGED_CELL_OPTIONS` without the stain check, or two of them."""
    given = [name for name in FLAGGED_CELL_SETTINGS if opts.get(name)]
    for name, what in FLAGGED_CELL_OPTIONS.items():
        if name in given and opts.get("no_stain_check"):
            raise click.BadParameter(f"{what}, so it cannot be used with --no-stain-check",
                                     param_hint=f"'--{name.replace('_', '-')}'")
    if len(given) > 1:
        first, later = (f"--{n.replace('_', '-')}" for n in given[:2])
        raise click.BadParameter(f"and {first} each change how the flagged cells are classified: "
                                 "give one", param_hint=f"'{later}'")


def build_config(input_dir, output, **opts) -> RunConfig:
    """Turn the options of `run` (and commands sharing `model_options`) into a RunConfig.

    :raises click.BadParameter: for a malformed device name, --truth-format without --truth,
        and an option of `FLAGGED_CELL_OPTIONS` without the stain check that picks the cells it
        changes, or two of them together.
    """
    try:  # "" (a script's unset variable) is refused as parse_device refuses it, not "auto"
        device = parse_device("auto" if opts.get("device") is None else opts["device"])
    except DeviceError as exc:
        raise click.BadParameter(str(exc), param_hint="'--device'") from None
    if opts.get("backend") is not None and not str(opts["backend"]).strip():
        raise click.BadParameter("names no backend (torch, onnx, or one `wbc-batch plugins` "
                                 "lists)", param_hint="'--backend'")
    if opts.get("truth_format") and not opts.get("truth"):
        raise click.BadParameter("names how to read --truth, which is not given",
                                 param_hint="'--truth-format'")
    _check_flagged_cell_options(opts)
    analysis = AnalysisParams(diameter_px=opts.get("diameter"),
                              review_threshold=opts.get("review_threshold", DEFAULT_REVIEW_THRESHOLD),
                              tta_views=int(opts.get("tta_views") or AnalysisParams.tta_views),
                              stain_check=not opts.get("no_stain_check", False),
                              stain_normalise=bool(opts.get("stain_normalise", False)),
                              grey_unusual=bool(opts.get("grey_unusual", False)),
                              blend_unusual=bool(opts.get("blend_unusual", False)),
                              box_trim=opts.get("box_trim", AnalysisParams.box_trim),
                              outline_refine=opts.get("outline_refine", AnalysisParams.outline_refine),
                              outline_eps=opts.get("outline_eps", AnalysisParams.outline_eps),
                              min_grey_nucleus_contrast=opts.get(
                                  "grey_nucleus_contrast", AnalysisParams.min_grey_nucleus_contrast),
                              min_nucleus_over_field=opts.get(
                                  "nucleus_over_field", AnalysisParams.min_nucleus_over_field),
                              min_falloff=0.0 if opts.get("no_even_illumination")
                              else AnalysisParams.min_falloff,
                              fill_margins=bool(opts.get("fill_margins", False)),
                              fill_white_stop=bool(opts.get("fill_white_stop", False)),
                              border_arc=bool(opts.get("border_arc", False)),
                              red_cell_bar=bool(opts.get("red_cell_bar", False)))
    return RunConfig(
        input_dir=Path(input_dir),
        output_dir=Path(output),
        backend=opts.get("backend") or "torch",
        device=device,
        model_dir=opts.get("model_dir"),
        analysis=analysis,
        save_overlays=not opts.get("no_overlays", False),
        save_masks=bool(opts.get("save_masks", False)),
        overwrite=bool(opts.get("overwrite", False)),
        writers=tuple(opts.get("reports") or DEFAULT_WRITERS),
        truth=opts.get("truth"),
        truth_format=opts.get("truth_format"),
        threads=int(opts.get("threads") or 0),
        quiet=bool(opts.get("quiet", False)),
    )


def _pm(ctx):
    from .plugins import get_plugin_manager

    ctx.ensure_object(dict)
    if ctx.obj.get("pm") is None:
        ctx.obj["pm"] = get_plugin_manager()
    return ctx.obj["pm"]


# --- run -----------------------------------------------------------------------------------------

@click.command("run", cls=GroupedCommand, option_groups=RUN_GROUPS)
@click.argument("input_dir", metavar="INPUT", type=FolderPath())
@click.option("-o", "--output", type=FolderPath(), required=True, metavar="OUT",
              help="Folder for the results (created; may lie inside INPUT).")
@model_options
@click.option("--truth", type=click.Path(exists=True, path_type=Path), default=None, metavar="PATH",
              help="Ground truth (masks, classes or boxes): adds accuracy.csv and an Accuracy sheet.")
@click.option("--truth-format", default=None, metavar="NAME",
              help="Truth reader to use (default: the first that recognises PATH).")
@click.pass_context
def run_command(ctx, input_dir, output, **opts):
    """Find, segment and classify the white blood cells of every image in INPUT.

    INPUT is searched recursively for .jpg .jpeg .jpe .jfif .png .bmp .tif .tiff files (any case;
    hidden files and OUT are skipped; WebP, HEIC, GIF... are named in a warning, not read). A
    first-level subfolder of INPUT is a sample: summary.csv gives the differential per sample
    and for the whole run. A file byte-identical to one before it (a copy, or a link) is a
    duplicate: counted once, under the first name (not so with --truth).

    Writes OUT/cells.csv, images.csv, summary.csv, report.xlsx, overlays/, run.json (and
    masks/ with --save-masks, accuracy.csv with --truth). Exit code 0: every image ok (or a
    duplicate); 1: some images failed (listed in images.csv and the Errors sheet), a report
    writer failed, a folder of INPUT could not be searched (run.json: left_out), or INPUT held
    images only in formats that are not read (run.json: not_read); 2: usage
    error; 130, 143 or 129: stopped by Ctrl-C, SIGTERM or SIGHUP (a closed terminal), with
    the reports of the images finished so far (a second Ctrl-C, or a SIGTERM after a Ctrl-C
    or a SIGTERM, stops at once, without them).
    """
    from .discovery import IMAGE_SUFFIXES
    from .output_folder import check_output
    from .pipeline import PipelineError, Runner
    from .plugins import PluginError

    config = build_config(input_dir, output, **opts)
    pm = _pm(ctx)
    say = (lambda msg: None) if config.quiet else echo_err
    try:
        check_output(config)
        runner = Runner(config, pm)
        images = runner.discover(say=False)  # the truth masks left out are said by announce()
    except (PipelineError, PluginError) as exc:
        raise SetupError(str(exc)) from None
    except KeyboardInterrupt:  # Ctrl-C while the models load: nothing was written
        echo_err("\nInterrupted before any image was analysed.")
        ctx.exit(130)

    def announce():
        if runner.masks_note:
            logging.getLogger("wbc_batch").warning("%s", runner.masks_note)
        if not images:
            from .discovery import is_results_folder

            results = (": it holds wbc-batch results, whose overlays/ and masks/ are never "
                       "analysed (name the folder of the smears)"
                       if is_results_folder(config.input_dir) else "")
            unread = (f"; {len(runner.not_read)} file(s) in formats that are not read were left "
                      "out (above), so the run fails" if runner.not_read else "")
            say(f"No images found in {config.input_dir} (looked for "
                f"{' '.join(IMAGE_SUFFIXES)}){results}{unread}; writing empty reports.")
        else:
            say(f"wbc-batch {__version__}: {len(images)} image(s) in {config.input_dir}; "
                f"backend {config.backend} on {runner.device}")
        if runner.truth is not None:
            say(f"Truth: {config.truth} read as {runner.truth.reader!r}")

    outcome = execute(ctx, runner, images, announce,
                      stopped=lambda done: summarise(done, config, say, stopped=cut_short(done)))
    summarise(outcome, config, say)
    ctx.exit(outcome.exit_code)


def execute(ctx, runner, images, announce=None, stopped=None):
    """Run `runner` over `images` as every command does: the output folder claimed, then
    `announce()` and the one-line device note (so that a refused OUT is the only line), Ctrl-C,
    SIGTERM or SIGHUP turned into exit code 130, 143 or 129 (reports of finished images are
    written by the runner; `stopped(outcome)` then says what they hold), the session closed in
    all cases. Returns the RunOutcome."""
    from contextlib import ExitStack

    from . import interrupts
    from .devices import fallback_is_news
    from .output_folder import claimed_output
    from .pipeline import PipelineError

    stopped_by = 0  # the signal that stopped the run, whose code the process exits with
    with interrupts.terminate_as_interrupt() as received:
        try:
            with ExitStack() as claim:
                try:  # a refused OUT (held by another run, no room...): exit 2, no usage line
                    claim.enter_context(claimed_output(runner.config))
                except PipelineError as exc:
                    raise SetupError(str(exc)) from None
                if announce is not None:
                    announce()
                config = runner.config
                if runner.fallback_note and (not config.quiet or fallback_is_news(config.device)):
                    echo_err(f"Note: {runner.fallback_note}")
                outcome = runner.run(images)
        except interrupts.StopNow as exc:
            echo_err("\nStopped at once (second signal): " + (
                "the reports had been written." if runner.reports_published else
                "this run's reports were not written, and OUT holds no run.json; run again "
                "with --overwrite."))
            ctx.exit(128 + exc.signum)
        except KeyboardInterrupt:
            signum = received[0] if received else signal.SIGINT
            echo_err(_interrupted(runner, signal.Signals(signum).name))
            finished = getattr(runner, "last_outcome", None)
            if stopped is not None and finished is not None:
                try:
                    stopped(finished)
                    # the last line says it was stopped, after the cells' and failures' lines
                    echo_err(f"Stopped by {signal.Signals(signum).name}: "
                             f"{_finished_of(runner)}exit code {128 + signum}.")
                except (KeyboardInterrupt, interrupts.StopNow):  # a second signal: no more lines
                    pass
            stopped_by = signum
        finally:
            runner.close()
    # finished or stopped: a signal from here to the process's end changes nothing, or, asking
    # twice, ends it at once with its own code
    interrupts.calm_to_the_end(*([stopped_by] if stopped_by else []))
    if stopped_by:
        ctx.exit(128 + stopped_by)
    return outcome


def _interrupted(runner, name: str) -> str:
    """What a run stopped by the signal `name` left, as its run.json says: the reports of the
    images finished so far, or, for a signal that came after the last image (while the reports
    were written: they are finished first), a complete run; or nothing, for a signal while OUT
    was prepared (`output_folder.prepare_output_dir`), before the run began."""
    info = getattr(runner, "last_run_info", None) or {}
    finished = getattr(runner, "last_outcome", None)
    if finished is not None and not getattr(runner, "reports_published", False):
        # the reports failed (a full disk): the reason is logged above
        return (f"\nInterrupted: {len(finished.results)} image(s) finished, but the reports "
                "could not be written (see above); OUT holds no run.json of this run: run "
                "again with --overwrite.")
    if not info:  # stopped while OUT was prepared: the run had not begun
        removed = (" (--overwrite had removed the earlier run's results first)"
                   if getattr(getattr(runner, "config", None), "overwrite", False) else "")
        return (f"\nInterrupted before any image was analysed: no reports were written"
                f"{removed}.")
    if info and not info.get("interrupted") and getattr(runner, "reports_published", False):
        failed = "; a report writer failed (run.json: report_errors)" \
            if info.get("report_errors") else ""
        return (f"\n{name} came after the last image: every image was analysed and the reports "
                f"are written (run.json: \"interrupted\": false){failed}.")
    return (f"\nInterrupted: {_finished_of(runner)}reports written for the images finished so "
            "far, and only those (run.json: \"interrupted\": true). For all of them, run again "
            "with --overwrite, which analyses every image again. To be able to resume a long "
            "batch next time, run it as `wbc-batch watch INPUT -o NEW_OUT --once`: run again "
            "after a stop, it goes on where it stopped.")


def cut_short(outcome) -> bool:
    """Whether the `outcome` of a run a signal stopped lacks images: false only for a signal
    that came after the last image (run.json: "interrupted": false), a complete run."""
    return outcome.run_info.get("interrupted") is not False


def _finished_of(runner) -> str:
    """The "N of M images finished; " of an interrupted run, from its facts ("" without them)."""
    info = getattr(runner, "last_run_info", None) or {}
    done, found = info.get("counts", {}).get("images"), info.get("images_found")
    return f"{done} of {found} images finished; " if done is not None and found else ""


def echo_err(text: str) -> None:
    """A line on stderr that a closed terminal or pipe (`| head`, a dropped SSH session) cannot
    turn into a failure of a run whose reports are written."""
    try:
        click.echo(text, err=True)
    except OSError:  # BrokenPipeError, EIO
        pass


def summarise(outcome, config, say, stopped: bool = False) -> None:
    """The closing lines of a run: counts, cells with an unusual stain, duplicates that copy
    another sample's file, images taken for bare glass, a wide spread of the WBC sizes
    estimated (`scale_spread`), then the first failed images with their reasons and the folders
    left out (said with --quiet too). A run `stopped` by a signal has said its counts
    (`_interrupted`): the other lines follow, for the images it finished."""
    from .reports import printable
    from .results import across_samples_line, bare_glass_line
    from .scale_spread import advice

    n = len(outcome.results)
    errors = [r for r in outcome.results if r.is_error]
    copies = sum(1 for r in outcome.results if r.status == "duplicate")
    also = f", {copies} duplicate(s) counted under their first name" if copies else ""
    if not stopped:
        where = (f"Results in {config.output_dir}" if outcome.reports_written else
                 f"No report of this run could be written to {config.output_dir} (see above)")
        say(f"Done: {n} image(s), {n - len(errors) - copies} ok, {len(errors)} failed{also}, "
            f"{outcome.n_cells} WBC(s) in {outcome.seconds:.1f} s. {where}")
    review = sum(r.needs_review_count for r in outcome.results if r.ok)
    if review:
        say(f"  {review} of {outcome.n_cells} WBC(s) need a human look (needs_review in cells.csv, "
            f"highlighted in report.xlsx's Cells sheet: confidence under "
            f"{config.analysis.review_threshold:g}, or an unusual stain)")
    unusual = sum(r.unusual_stain_count for r in outcome.results if r.ok)
    if unusual:
        say(f"  {unusual} of {outcome.n_cells} WBC(s) have a stain unlike every microscope the "
            "classifier was trained on (unusual_stain in cells.csv): check their classes, and see "
            "the model card on fine-tuning")
    across = across_samples_line(outcome.run_info.get("duplicates_across_samples"))
    if across:
        say(f"  {across}")
    glass = bare_glass_line(outcome.run_info.get("bare_glass"))
    if glass:
        say(f"  {glass}")
    spread = advice(outcome.run_info.get("scale_spread"))
    if spread:
        say(f"  {spread}")
    # what went wrong is said with --quiet too: quiet drops the chatter, not the failures
    for line in failure_lines((r.image, r.error) for r in errors):
        echo_err(line)
    for item in outcome.run_info.get("left_out", [])[:MAX_LISTED_ERRORS]:
        echo_err(f"  left out: {printable(item['path'])}: {printable(item['reason'])} "
                 "(run.json: left_out)")
    unread = outcome.run_info.get("not_read") or []
    if unread and not outcome.results:  # the run fails for it (`RunOutcome`): said with -q too
        echo_err(f"  no image analysed: {len(unread)} file(s) in formats that are not read, such "
                 f"as {printable(unread[0])} (run.json: not_read)")
    if not outcome.reports_written:  # the last line, where a log is read first
        echo_err(f"No report of this run is in {config.output_dir} (why is said above, such as "
                 "a full or read-only disk); once that is mended, run again with --overwrite.")


# --- plugins -------------------------------------------------------------------------------------

@click.command("plugins")
@click.pass_context
def plugins_command(ctx):
    """List installed plugins, backends (and whether each is usable here), report writers,
    truth readers and commands."""
    from .plugins import (DISABLE_AUTOLOAD_ENV, DISABLE_PLUGINS_ENV, PluginError,
                          backend_availability, broken_plugins, describe_plugins, get_backends,
                          get_report_writers, get_truth_readers, third_party_owners)

    def owned(hook_name: str, names) -> list:  # "json (plugin my-reports)" for a third party's
        owners = third_party_owners(pm, hook_name)
        return [f"{n} (plugin {owners[n]})" if n in owners else n for n in sorted(names)]

    pm = _pm(ctx)
    try:  # with `keep_broken` (the command line's), faults are listed below instead
        backends, writers, readers = get_backends(pm), get_report_writers(pm), get_truth_readers(pm)
    except PluginError as exc:  # two plugins offering one name: said as `run` says it
        raise SetupError(str(exc)) from None
    click.echo("Plugins:")
    for name, source in describe_plugins(pm):
        click.echo(f"  {name:<20} {source}")
    if getattr(pm, "autoload_off", False):
        click.echo(f"  (third-party plugins are switched off by {DISABLE_AUTOLOAD_ENV})")
    for name in getattr(pm, "switched_off", ()):
        click.echo(f"  {name:<20} switched off by {DISABLE_PLUGINS_ENV}")
    broken = broken_plugins(pm)
    for name, reason in broken:
        click.echo(f"  {name:<20} BROKEN: {reason}")
    click.echo("Backends:")
    backend_owners = third_party_owners(pm, "wbc_register_backends")
    for name, backend in sorted(backends.items()):
        usable, detail = backend_availability(backend)  # a broken plugin never ends the listing
        owner = f" (plugin {backend_owners[name]})" if name in backend_owners else ""
        click.echo(f"  {name:<20} {'usable' if usable else 'NOT usable':<11} {detail}{owner}")
    click.echo("Report writers: " + (", ".join(owned("wbc_register_report_writers", writers)) or "none"))
    click.echo("Truth readers: " + (", ".join(owned("wbc_register_truth_readers", readers)) or "none"))
    group = ctx.parent.command if ctx.parent is not None else None
    if isinstance(group, click.Group):
        click.echo("Commands: " + ", ".join(sorted(group.list_commands(ctx))))
    if broken:  # listed above; every other command refuses to start
        ctx.exit(EXIT_USAGE)


# --- export-onnx ---------------------------------------------------------------------------------

@click.command("export-onnx")
@click.option("--model", "model_dir", type=click.Path(path_type=Path), default=None, metavar="DIR",
              help="Model bundle with the torch weights (default: the shipped models).")
@click.option("-o", "--output", "out_dir", type=click.Path(path_type=Path), default=None,
              metavar="DIR", help="Where to write the ONNX files (default: the bundle folder; "
              "never the package's own, whose exports are shipped: name a folder with -o).")
def export_onnx_command(model_dir, out_dir):
    """Write segmenter.onnx and classifier.onnx from the torch weights and check parity
    (prints the largest absolute logit difference between the two runtimes)."""
    import importlib.util

    from .bundle import BundleError

    try:
        from .export import export_onnx
    except ImportError as exc:
        raise SetupError(f"ONNX export is not available: {exc}") from None
    if importlib.util.find_spec("onnx") is None:  # torch's exporter needs it; run time does not
        raise SetupError("export-onnx needs the onnx package, which wbc-batch's own "
                         "install leaves out (run time does not need it): pip install "
                         "onnx, or install wbc-batch with its export extra "
                         "(pip install \"wbc-batch[export]\", or -e \".[export]\" "
                         "in a checkout)")
    _check_onnxruntime()  # the parity check needs it: found after the files were written
    from .bundle import DEFAULT_BUNDLE_DIR
    from .train.folders import BundleFolderError, check_out, refuse_package, shown

    target = out_dir or model_dir or DEFAULT_BUNDLE_DIR
    said = None if out_dir else f"{shown(target)} (where export-onnx writes without -o)"
    try:
        refuse_package(target, export=True, said=said)
        if out_dir is not None:  # a results folder, a file, no permission: as `train -o`
            check_out(out_dir)
        elif Path(target).is_dir() and not os.access(target, os.W_OK | os.X_OK):
            raise BundleFolderError(f"{shown(target)} cannot be written (no permission): "
                                    "export into a folder of your own with -o NEW_FOLDER")
        report = export_onnx(model_dir, out_dir)
    except (BundleError, BundleFolderError, ValueError, FileNotFoundError) as exc:
        raise SetupError(str(exc)) from None
    except OSError as exc:  # a bundle file it cannot read; -o a file, no room, no permission
        raise click.ClickException(_export_os_error(exc, target, shown)) from None
    lines = report.lines() if hasattr(report, "lines") else [str(report)]
    files = getattr(report, "files", ())
    if files:  # which folder the bundle now is, with the exports beside its weights
        copied = " and a copy of the bundle's weights" if out_dir is not None else ""
        lines.append(f"Wrote {', '.join(Path(f).name for f in files)}, bundle.json{copied} in "
                     f"{Path(files[0]).parent}")
    for line in lines:
        click.echo(line)


def _check_onnxruntime() -> None:
    """Refuse export-onnx, before it writes anything, where onnxruntime (which checks the
    export's parity) cannot be imported: a traceback came after the files were written."""
    try:
        from wbc_batch_plugins.onnx_backend import _ort

        _ort()
    except ImportError as exc:
        raise SetupError(f"export-onnx checks the export with onnxruntime, which "
                         f"cannot be imported: {exc}") from None


def _export_os_error(exc: OSError, target: Path, shown) -> str:
    """One line for an OSError of export-onnx: the system's reason and the file(s) it names (a
    copy names its source and its destination). Whether reading the bundle or writing `target`
    failed is not guessed: a copy's error can name either file for either cause."""
    files = " -> ".join(str(f) for f in (exc.filename, exc.filename2) if f)
    why = f"{exc.strerror or exc}: {files}" if files else f"{exc.strerror or exc}"
    return f"the ONNX export into {shown(target)} failed ({why})"


# --- the group -----------------------------------------------------------------------------------

class _Group(click.Group):
    """Keeps the command order of registration in --help (core commands first), and ends a
    command stopped by Ctrl-C that does not say so itself (`plugins`, `export-onnx`, a plugin's)
    as `run` does: one line and exit code 130, not click's "Aborted!" and 1."""

    def list_commands(self, ctx):
        return list(self.commands)

    #: the plugin manager the commands came from (`build_cli`)
    plugin_manager = None

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            echo_err("\nInterrupted.")
            raise click.exceptions.Exit(128 + signal.SIGINT) from None

    def resolve_command(self, ctx, args):
        """click's, with a command that is not there said to be perhaps a third party's that
        is switched off (`plugins.autoload_note`)."""
        try:
            return super().resolve_command(ctx, args)
        except click.UsageError as exc:
            from .plugins import autoload_note

            note = autoload_note(self.plugin_manager)
            if note and "No such command" in exc.message:
                exc.message = exc.message.rstrip(".") + note + "."
            raise


#: the commands that still run while an installed plugin cannot be loaded: the one that shows it
DIAGNOSTIC_COMMANDS = ("plugins",)


def build_cli(pm=None) -> click.Group:
    """A fresh `wbc-batch` group: the core commands plus those added by plugins through
    `wbc_register_commands`. `pm` defaults to `get_plugin_manager(keep_broken=True)`: with a
    plugin that cannot be loaded or brings a fault (a name two plugins use, a registration hook
    or `wbc_register_commands` that raises, a command replaced), --help, --version and `plugins`
    still run and show it, and every other command stops with exit code 2 and the reason,
    naming the plugin. With a `pm` that does not keep broken plugins such a fault is a
    PluginError here."""
    from .plugins import broken_plugins

    if pm is None:
        from .plugins import get_plugin_manager

        pm = get_plugin_manager(keep_broken=True)

    @click.group("wbc-batch", cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
    @click.version_option(__version__, prog_name="wbc-batch")
    @click.pass_context
    def cli(ctx):
        """Find, segment and classify white blood cells in blood-smear images, in batches."""
        ctx.ensure_object(dict)
        ctx.obj.setdefault("pm", pm)
        broken = broken_plugins(ctx.obj["pm"])
        if broken and ctx.invoked_subcommand not in DIAGNOSTIC_COMMANDS:
            error = click.ClickException(f"{broken[0][1]} (`wbc-batch plugins` lists every "
                                         "plugin and what is wrong)")
            error.exit_code = EXIT_USAGE
            raise error

    from .plugins import register_commands

    for command in (run_command, plugins_command, export_onnx_command):
        cli.add_command(command)
    register_commands(pm, cli)
    cli.plugin_manager = pm
    return cli


class TerminalFormatter(logging.Formatter):
    """Log lines as a terminal may show them (`reports.printable`): a file name in a warning
    cannot send the terminal an escape sequence, a carriage return or a line break. The
    message's arguments (the names) are escaped whole; its own text keeps its line breaks."""

    def format(self, record) -> str:
        from .reports import printable

        if isinstance(record.args, tuple) and record.args:
            record = copy.copy(record)
            record.args = tuple(printable(a) if isinstance(a, str) else a for a in record.args)
        return printable(super().format(record), keep_lines=True)


def main(argv=None) -> None:
    """Console-script entry point."""
    from .plugins import PluginError

    handler = logging.StreamHandler()
    handler.setFormatter(TerminalFormatter("wbc-batch: %(message)s"))
    logging.basicConfig(level=logging.WARNING, handlers=[handler])  # unless logging is set up
    try:
        cli = build_cli()
    except PluginError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(EXIT_USAGE)
    except KeyboardInterrupt:  # Ctrl-C while the plugins load: no traceback from an import
        click.echo(f"\n{BEFORE_START}", err=True)
        sys.exit(128 + signal.SIGINT)
    cli.main(args=argv, prog_name="wbc-batch")
