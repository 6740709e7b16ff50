"""Built-in plugin: `wbc-batch train segmenter|classifier|red-cells` (training and lab
fine-tuning)."""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import click

from wbc_batch.cli import FiniteFloatRange, SetupError, echo_err
from wbc_batch.train.folders import SHIPPED, default_data
from wbc_batch.devices import DeviceError, parse_device
from wbc_batch.hookspecs import hookimpl
from wbc_batch.train.augment import STRONG_COLOUR
from wbc_batch.train.classifier import CROP_MARGIN, CROP_SIZE, PUBLIC_SOURCES, ClsTrainConfig
from wbc_batch.train.datasets import TrainingDataError
from wbc_batch.train.device import PRECISIONS
from wbc_batch.train.red_cells import SizerTrainConfig
from wbc_batch.train.segmenter import SegTrainConfig

DEFAULT_DATA = str(default_data())


def _default(config: type, name: str):
    """The training config's own default for a field, so that the CLI never restates it."""
    return {f.name: f.default for f in dataclasses.fields(config)}[name]


@click.group("train")
def train():
    """Train the models (or fine-tune them on a lab's own images).

    Public data is read in its published layout from --data (the WBC Image Dataset, PBC, BCCD and
    TXL-PBC with the split files in DATA/splits); only train rows are trained on and only val rows
    select the checkpoint. Lab data: --lab-masks FOLDER (images + FOLDER/masks/<image name or
    stem>.png with 0/128/255), --lab-classes FOLDER (one sub-folder per class), --lab-csv FILE (columns
    image,class and optionally split: only rows whose split is train or empty are trained on),
    --lab-truth IMAGES TRUTH (images and their ground truth as `evaluate` takes them: boxed
    fields with a class per box, or single cells with a class).
    """


def _common(f):
    f = click.option("--data", type=click.Path(path_type=Path), default=DEFAULT_DATA, show_default=True,
                     help="Folder holding the public datasets and splits/ (default: "
                          "$WBC_BATCH_DATA where it is set).")(f)
    f = click.option("-o", "--out", "--output", "out", type=click.Path(file_okay=False, path_type=Path),
                     required=True,
                     callback=_out_folder(),
                     help="Model bundle folder to write (the classifier needs its segmenter there): a "
                          "new folder, never the shipped wbc_batch/models (start from it with --init).")(f)
    f = click.option("--seed", type=int, default=_default(SegTrainConfig, "seed"), show_default=True,
                     help="Same seed, same weights: on the CPU with the same --threads and "
                          "--precision (a thread count sums in another order).")(f)
    f = _threads_option(_default(SegTrainConfig, "threads"),
                        "On the CPU, `train classifier` cuts its training crops in this many "
                        "processes of one thread each.")(f)
    f = click.option("--init", type=click.Path(file_okay=False), default=None,
                     callback=_init_bundle, metavar="DIR|shipped",
                     help="Start from this bundle's weights (fine-tuning); `shipped`: the models "
                          "shipped with wbc-batch, wherever it is installed.")(f)
    f = click.option("--no-public", is_flag=True, help="Train on lab data only.")(f)
    f = _splits_option(f)
    f = click.option("--device", default=_default(SegTrainConfig, "device"), show_default=True,
                     metavar="cpu|auto|cuda[:N]", callback=_device,
                     help="Where to train. The CPU by default, so that a rerun of the recipe gives "
                          "the same weights (with the same --threads); auto or cuda uses a GPU "
                          "(falling back to the CPU with a note, as for `run`).")(f)
    f = click.option("--precision", type=click.Choice(PRECISIONS),
                     default=_default(SegTrainConfig, "precision"), show_default=True,
                     help="auto: bfloat16 autocast where the CPU or GPU does bfloat16 in hardware "
                          "(a CPU with AVX512-BF16 or AMX), float32 elsewhere, where emulated "
                          "bfloat16 is more than twice as slow. The two give different weights; "
                          "bundle.json records which was used.")(f)
    return f


def _init_bundle(ctx, param, value):
    """--init's folder: the word `shipped`, as typed, is the package's bundle (its path depends
    on the install; `./shipped` or `shipped/` is a folder of that name); any other value must be
    an existing folder."""
    from wbc_batch.bundle import DEFAULT_BUNDLE_DIR

    if value is None:
        return None
    if isinstance(value, str) and value == SHIPPED:
        return DEFAULT_BUNDLE_DIR
    if not Path(value).is_dir():
        raise click.BadParameter(f"folder {str(value)!r} does not exist (`--init {SHIPPED}` starts "
                                 "from the models shipped with wbc-batch)", ctx, param)
    return Path(value)


def _splits_option(f):
    return click.option(
        "--splits", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
        metavar="DIR",
        help="Split files to read in place of DATA/splits, in the same format (plus an optional "
             "txl-pbc.csv with columns image,split), such as those `scripts/split_overlap_check.py "
             "--write-clean DIR` writes without the train images that copy a val or test image.")(f)


def _out_folder(stain_reference: bool = False):
    """A callback refusing an -o that is the shipped bundle or lies inside the package, as the
    options are read: before any work (`folders.refuse_package`)."""
    def check(ctx, param, value):
        from wbc_batch.train.folders import BundleFolderError, refuse_package

        try:
            refuse_package(value, stain_reference=stain_reference)
        except BundleFolderError as exc:
            raise click.UsageError(str(exc), ctx) from None
        return value

    return check


def _train(ctx, work, out: Path) -> None:
    """Run `work()`, a trainer, as `run` runs its images: Ctrl-C, SIGTERM or SIGHUP stop it with
    exit code 128 + the signal (130 for Ctrl-C) and one line saying what OUT holds now; the
    errors that say what is wrong with the data or the folders become one-line messages; those
    about the data also say what OUT holds when it exists (a fine-tuning run takes --init's
    segmenter into OUT before it cuts its crops: a failure after that leaves OUT a segmenter
    without a classifier)."""
    from wbc_batch.bundle import BundleError
    from wbc_batch.train.folders import BundleFolderError, describe

    with _stops_as_exit(ctx, lambda: f"{out} now holds {describe(out)}."):
        try:
            work()  # each trainer lets go of OUT's lock as it returns (`folders.releases_out`)
            echo_err(_where_it_is(out))
        except BundleError as exc:  # a missing segmenter, found before any work starts
            raise click.UsageError(str(exc)) from exc
        except TrainingDataError as exc:
            message = str(exc)
            if Path(out).is_dir():
                message = f"{message.rstrip('.')}. {out} holds {describe(out)}."
            raise click.ClickException(message) from exc
        except BundleFolderError as exc:  # found before any work: OUT is as it was; exit 2,
            raise SetupError(str(exc)) from exc  # as export-onnx -o and run say theirs


def _where_it_is(out: Path) -> str:
    """The last line of a training that ended: what OUT holds now, and the next command."""
    from wbc_batch.results import shell_arg
    from wbc_batch.train.folders import describe

    holds = describe(out)
    arg = shell_arg(out)  # the commands can be pasted, whatever the folder's name
    if "no classifier" in holds:
        return (f"Done: {out} holds {holds}. Next: wbc-batch train classifier -o {arg} ... "
                f"(it cuts its training crops with this segmenter; with --no-public, add --init "
                f"{SHIPPED} to fine-tune the shipped classifier rather than start from nothing).")
    export = (f" For --backend onnx, first: wbc-batch export-onnx --model {arg}."
              if _needs_export(out) else "")
    return (f"Done: {out} holds {holds}. Check it on cells it was not trained on "
            f"(wbc-batch evaluate HELD_OUT --truth HELD_OUT --model {arg} -o CHECK), then use it: "
            f"wbc-batch run INPUT -o OUT --model {arg}.{export}")


def _needs_export(out: Path) -> bool:
    """Whether `--backend onnx` needs `export-onnx` first: OUT lacks an ONNX file, or one is
    not the export of the weights now there (`ModelBundle.stale_onnx`); `train stain-reference`,
    which changes no weight, leaves current exports current."""
    from wbc_batch.bundle import BundleError, load_bundle

    try:
        bundle = load_bundle(out)
        hashes = bundle.file_hashes()
        return not all(f"{net}_onnx" in hashes for net in ("segmenter", "classifier")) \
            or bool(bundle.stale_onnx())
    except (BundleError, OSError):
        return True


def _threads_option(default: int, more: str = ""):
    """--threads, as `run`'s: a whole number, 0 for all the cores this process may use."""
    def all_cores(ctx, param, value):
        from wbc_batch.pipeline import usable_cores

        return value or usable_cores()

    return click.option("--threads", type=click.IntRange(min=0), default=default, show_default=True,
                        metavar="N",
                        callback=all_cores, help=f"CPU threads (0: all cores). {more}".rstrip())


def _device(ctx, param, value):
    try:
        return parse_device(value)
    except DeviceError as exc:
        raise click.BadParameter(str(exc)) from exc


def _strong_colour(what: str, verdict: str):
    return click.option(
        "--strong-colour", is_flag=True,
        help=f"Distrust colour more in augmentation ({STRONG_COLOUR['gray_p'] * 100:.0f} % grey {what}, "
             f"hue +-{2 * STRONG_COLOUR['hue']} degrees, saturation +-{STRONG_COLOUR['sat'] * 100:.0f} %): "
             f"{verdict} (see the model card).")


def _restain(what: str, config: type):
    return click.option(
        "--restain", "od_p", type=FiniteFloatRange(0.0, 1.0), default=_default(config, "od_p"),
        show_default=True, metavar="P",
        help=f"Chance of restaining a training {what}: each of its two stains, estimated per {what}, "
             "gets more or less dye and a slightly different colour (see the model card).")


@train.command("segmenter")
@_common
@click.option("--steps", type=click.IntRange(min=1), default=_default(SegTrainConfig, "steps"), show_default=True,
              help="Training steps (batches of patches).")
@click.option("--batch", type=click.IntRange(min=1), default=_default(SegTrainConfig, "batch"), show_default=True,
              help="Patches per step.")
@click.option("--lab-masks", multiple=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              metavar="FOLDER", help="A lab's images with masks: FOLDER/<image> and FOLDER/masks/<image "
                                     "stem>.png or <image name>.png (0/128/255; 0/1/2 label maps; "
                                     "0/255 or 0/1 whole-cell masks; see the README). Repeatable.")
@click.option("--no-boxes", is_flag=True, help="Do not use the box datasets (BCCD, TXL-PBC).")
@click.option("--lr", type=FiniteFloatRange(min=0, min_open=True), default=_default(SegTrainConfig, "lr"), show_default=True,
              help="Peak learning rate.")
@click.option("--box-frac", type=FiniteFloatRange(0.0, 1.0), default=_default(SegTrainConfig, "box_frac"), show_default=True,
              help="Share of patches cut from box-labelled fields.")
@click.option("--wide-frac", type=FiniteFloatRange(0.0, 1.0), default=_default(SegTrainConfig, "wide_frac"), show_default=True,
              help="Share of patches with wide scale jitter (0.45x to 2.2x).")
@click.option("--box-ring", type=FiniteFloatRange(0.0, 1.0), default=_default(SegTrainConfig, "box_ring"),
              show_default=True,
              help="Unlabelled ring around each WBC box, as a fraction of the box side; beyond it "
                   "the field is background.")
@click.option("--eval-every", type=click.IntRange(min=1), default=_default(SegTrainConfig, "eval_every"),
              show_default=True,
              help="Steps between validations (the best validated step is kept).")
@click.option("--eval-from", type=click.IntRange(min=0), default=_default(SegTrainConfig, "eval_from"),
              show_default=True,
              help="First step that may be validated and kept (the last step always is); skips "
                   "the early, high-learning-rate checkpoints that are never kept, to save time.")
@click.option("--select-on-txl", is_flag=True,
              help="Also choose the checkpoint on half of TXL-PBC val (every second image by name, "
                   "from the first: the half the run-time rules were chosen on); the other half "
                   "stays unseen, to judge the choice.")
@_strong_colour("patches", "measured worse on val: many more false cells, "
                "most of all on pale smears; for experiments")
@_restain("patch", SegTrainConfig)
@click.pass_context
def train_segmenter_cmd(ctx, data, out, seed, threads, init, no_public, splits, device, precision, steps,
                        batch, lab_masks, no_boxes, lr, box_frac, wide_frac, box_ring, eval_every,
                        eval_from, select_on_txl, strong_colour, od_p):
    """Train the nucleus/cytoplasm segmenter."""
    from wbc_batch.train.segmenter import train_segmenter

    _check_data(data, no_public, splits, needs=("wbc-image-dataset.csv", "bccd.csv"))
    if select_on_txl and (no_public or no_boxes):
        raise click.UsageError("--select-on-txl needs the public box datasets (drop --no-public/--no-boxes)")
    _check_lab(no_public, "--lab-masks", lab_masks)
    cfg = SegTrainConfig(data=data, out=out, lab_masks=tuple(lab_masks), use_public=not no_public,
                         use_boxes=not no_boxes, steps=steps, batch=batch, seed=seed, threads=threads,
                         init=init, lr=lr, box_frac=box_frac, wide_frac=wide_frac, box_ring=box_ring,
                         eval_every=eval_every, eval_from=eval_from, select_on_txl=select_on_txl,
                         device=device, precision=precision, od_p=od_p, splits=splits,
                         **(STRONG_COLOUR if strong_colour else {}))
    _train(ctx, lambda: train_segmenter(cfg, log=lambda s: click.echo(s, err=True)), out)


def _classifier_data(f):
    """The options naming a classifier's training crops, shared by `classifier` and
    `stain-reference` (which must name the same data the classifier was trained on)."""
    for decorator in reversed([
        click.option("--lab-classes", multiple=True, metavar="FOLDER",
                     type=click.Path(exists=True, file_okay=False, path_type=Path),
                     help="A lab's single-cell images, one sub-folder per class (neutrophil/, "
                          "lymphocyte/, ...). Repeatable."),
        click.option("--lab-csv", multiple=True, metavar="FILE",
                     type=click.Path(exists=True, dir_okay=False, path_type=Path),
                     help="A lab's CSV: image,class[,split]; only rows whose split is train or "
                          "empty are trained on. Repeatable."),
        click.option("--lab-truth", "lab_truth", multiple=True, nargs=2, metavar="IMAGES TRUTH",
                     type=click.Path(exists=True, path_type=Path),
                     help="A lab's images (a folder) and their ground truth in any layout "
                          "evaluate --truth reads (VOC XML, YOLO, a CSV of boxes and classes, "
                          "class folders): the found cells that match a labelled box, and single "
                          "cells with a class, are trained on. Repeatable."),
        click.option("--cache", type=click.Path(path_type=Path), default=None,
                     help="Folder to keep the extracted training crops in (reused when present, "
                          "for the same images, crop geometry and segmenter)."),
        click.option("--leave-out", multiple=True, type=click.Choice(PUBLIC_SOURCES),
                     help="Public source to leave out of training and checkpoint choice, to measure "
                          "the classifier on a microscope it never saw (repeatable)."),
    ]):
        f = decorator(f)
    return f


@train.command("classifier")
@_common
@click.option("--epochs", type=click.IntRange(min=1), default=_default(ClsTrainConfig, "epochs"), show_default=True,
              help="Passes over the training crops (each scored on val, where there is one).")
@click.option("--min-steps", type=click.IntRange(min=0), default=_default(ClsTrainConfig, "min_steps"),
              show_default=True,
              help="Train for at least this many steps: a small lab set is passed over several times "
                   "per epoch (the public sets' epochs are longer already).")
@click.option("--lab-share", type=FiniteFloatRange(0.0, 0.9), default=_default(ClsTrainConfig, "lab_share"),
              show_default=True,
              help="Trained with the public data, the lab's cells are repeated until they make about "
                   "this share of each epoch (0: each cell once). No effect with --no-public.")
@click.option("--crop-size", type=click.IntRange(min=16), default=None,
              help=f"Side of the classifier's input crop, in pixels. Default: the --init bundle's, "
                   f"else {CROP_SIZE}.")
@click.option("--crop-margin", type=FiniteFloatRange(1.0, 3.0), default=None,
              help=f"Side of the crop over the side of the cell's box (how much surrounding it "
                   f"shows). Default: the --init bundle's, else {CROP_MARGIN}.")
@_classifier_data
@_strong_colour("crops", "better on a stain unlike any trained on, worse in-domain")
@_restain("crop", ClsTrainConfig)
@click.option("--mixstyle", type=FiniteFloatRange(0.0, 1.0), default=_default(ClsTrainConfig, "mixstyle"),
              show_default=True, metavar="P",
              help="Chance, per batch at each of the network's first two stages, of mixing the "
                   "crops' feature statistics (MixStyle), so that it learns styles between the "
                   "training sources' (an experiment; see docs/EXPERIMENTS.md).")
@click.option("--grey-share", type=FiniteFloatRange(0.0, 1.0), default=None, metavar="P",
              help=f"Share of the training crops turned grey (default {ClsTrainConfig.gray_p:g}; "
                   f"--strong-colour sets its own). 0.3 helped on a microscope left out of "
                   f"training, on two seeds, but cost the shipped recipe 14 of its 1,225 labelled "
                   f"val cells against the same run at 0.1; 0.2 cost 8 for less reach "
                   f"(docs/EXPERIMENTS.md, \"A default classifier trained on 30 % grey crops\", "
                   f"\"A grey share of 0.2\").")
@click.pass_context
def train_classifier_cmd(ctx, data, out, seed, threads, init, no_public, splits, device, precision, epochs,
                         min_steps, lab_share, crop_size, crop_margin, lab_classes, lab_csv, lab_truth,
                         cache, leave_out, strong_colour, od_p, mixstyle, grey_share):
    """Train the 5-class classifier on crops cut by the bundle's segmenter."""
    from wbc_batch.train.classifier import train_classifier

    if strong_colour and grey_share is not None:
        raise click.BadParameter("--strong-colour sets the share of grey crops itself: give one",
                                 param_hint="'--grey-share'")
    colour = dict(STRONG_COLOUR) if strong_colour else {}
    if grey_share is not None:
        colour["gray_p"] = grey_share
    _check_data(data, no_public, splits)
    _check_lab(no_public, LAB_CLASS_OPTIONS, lab_classes + lab_csv + lab_truth)
    _check_lab_truth(lab_truth)
    cfg = ClsTrainConfig(data=data, out=out, lab_folders=tuple(lab_classes), lab_csvs=tuple(lab_csv),
                         lab_truths=tuple(lab_truth),
                         use_public=not no_public, splits=splits, epochs=epochs, min_steps=min_steps, lab_share=lab_share,
                         seed=seed, threads=threads, cache=cache, init=init, leave_out=tuple(leave_out),
                         device=device, precision=precision, od_p=od_p, mixstyle=mixstyle,
                         crop_size=crop_size, crop_margin=crop_margin, **colour)
    _train(ctx, lambda: train_classifier(cfg, log=lambda s: click.echo(s, err=True)), out)


@train.command("stain-reference")
@click.option("--data", type=click.Path(path_type=Path), default=DEFAULT_DATA, show_default=True,
              help="Folder holding the public datasets and splits/.")
@click.option("-o", "--out", "--output", "out", type=click.Path(exists=True, file_okay=False, path_type=Path),
              required=True,
              callback=_out_folder(stain_reference=True),
              help="Model bundle folder whose classifier gets the reference (not the shipped one: "
                   "fit it in a copy).")
@click.option("--no-public", is_flag=True, help="Lab data only.")
@_splits_option
@_classifier_data
@_threads_option(_default(ClsTrainConfig, "threads"))
@click.pass_context
def stain_reference_cmd(ctx, data, out, lab_classes, lab_csv, lab_truth, no_public, splits, cache,
                        leave_out, threads):
    """Fit the stain reference of an already trained classifier on its training crops.

    `run` flags a cell as unusual_stain (and needs_review) when its stain lies beyond this
    reference: unlike every microscope the classifier was trained on. `train classifier` fits it
    itself; this is for bundles trained before it did. Name the same data it was trained on.
    """
    from wbc_batch.train.classifier import refit_stain_reference

    _check_data(data, no_public, splits)
    _check_lab(no_public, LAB_CLASS_OPTIONS, lab_classes + lab_csv + lab_truth)
    _check_lab_truth(lab_truth)
    cfg = ClsTrainConfig(data=data, out=out, lab_folders=tuple(lab_classes), lab_csvs=tuple(lab_csv),
                         lab_truths=tuple(lab_truth),
                         use_public=not no_public, splits=splits, cache=cache, leave_out=tuple(leave_out), threads=threads)
    _train(ctx, lambda: refit_stain_reference(cfg, log=lambda s: click.echo(s, err=True)), out)


@train.command("red-cells")
@click.option("--data", type=click.Path(path_type=Path), default=DEFAULT_DATA, show_default=True,
              help="Folder holding the public datasets and splits/.")
@click.option("-o", "--out", "--output", "out", type=click.Path(file_okay=False, path_type=Path),
              required=True, callback=_out_folder(),
              help="Folder to write red_cells.safetensors into: a model bundle's, whose runs then "
                   "use it (bundles without one use the shipped sizer).")
@_splits_option
@click.option("--steps", type=click.IntRange(min=1), default=_default(SizerTrainConfig, "steps"),
              show_default=True, help="Training steps.")
@click.option("--seed", type=int, default=_default(SizerTrainConfig, "seed"), show_default=True,
              help="Random seed.")
@click.option("--leave-out-bccd", is_flag=True,
              help="Train on no BCCD field (nor TXL-PBC's images of BCCD's size, which hold its "
                   "copies of BCCD fields): a fold to judge the sizer on BCCD fields by.")
@click.option("--glass", type=FiniteFloatRange(0.0, 1.0),
              default=_default(SizerTrainConfig, "glass"), show_default=True,
              help="Share of training windows with a part beyond a straight edge painted as "
                   "bare glass (0: none; 0.5 was measured and not adopted: docs/EXPERIMENTS.md, "
                   "\"Glass in the red-cell sizer's windows\").")
@_threads_option(_default(SizerTrainConfig, "threads"))
@click.pass_context
def train_red_cells_cmd(ctx, data, out, splits, steps, seed, leave_out_bccd, glass, threads):
    """Train the red-cell sizer on the RBC boxes of BCCD and TXL-PBC train fields.

    It reads a field's red cells' size, which `run --red-cell-bar` compares with the WBC size
    estimate (docs/EXPERIMENTS.md, "A learned red-cell size"). About 9 minutes on 2 CPU cores.
    """
    from wbc_batch.red_cells import WEIGHTS_FILE
    from wbc_batch.train.red_cells import train_sizer

    _check_data(data, False, splits, needs=("bccd.csv",))
    cfg = SizerTrainConfig(data=data, out=out, splits=splits, steps=steps, seed=seed,
                           leave_out_bccd=leave_out_bccd, glass=glass, threads=threads)

    def work():
        summary = train_sizer(cfg, log=lambda s: click.echo(s, err=True))
        click.echo(f"Done: {Path(out) / WEIGHTS_FILE} ({summary['steps']} steps in "
                   f"{summary['seconds']:.0f} s; mean L1 of the log size over the last 100: "
                   f"{summary['l1_last_100']}).", err=True)

    _train_sizer(ctx, work)


def _train_sizer(ctx, work) -> None:
    """`work()` with Ctrl-C, SIGTERM or SIGHUP stopping it as `_train` does; nothing is written
    before the last step, so OUT is as it was."""
    with _stops_as_exit(ctx, lambda: "nothing was written."):
        try:
            work()
        except TrainingDataError as exc:
            raise click.ClickException(str(exc)) from exc


@contextlib.contextmanager
def _stops_as_exit(ctx, holds):
    """Ctrl-C, SIGTERM or SIGHUP inside the block end the command with exit code 128 + the
    signal (130 for Ctrl-C), after "Interrupted: " and `holds()` (what OUT holds now)."""
    import signal

    from wbc_batch import interrupts

    with interrupts.terminate_as_interrupt() as received:
        try:
            yield
        except KeyboardInterrupt:
            echo_err(f"\nInterrupted: {holds()}")
            ctx.exit(128 + (received[0] if received else signal.SIGINT))


def _check_data(data: Path, no_public: bool, splits: Path | None = None, needs=None) -> None:
    """The public data folder, and the split files of `--splits` the command reads (`needs`:
    all of `datasets.SPLIT_FILES` by default; the segmenter reads no PBC rows)."""
    from wbc_batch.train.datasets import SPLIT_FILES

    if no_public:
        if splits is not None:
            raise click.UsageError("--splits chooses rows of the public data: drop it or --no-public")
        return
    if not (data / "splits").is_dir():
        raise click.UsageError(f"no public data at {data} (expected {data}/splits); "
                               "pass --data or --no-public")
    missing = [f for f in (needs or SPLIT_FILES)
               if splits is not None and not (splits / f).is_file()]
    if missing:
        raise click.UsageError(f"--splits {splits}: no {', '.join(missing)} there (it names a "
                               "folder of split files, as DATA/splits)")


LAB_CLASS_OPTIONS = "--lab-classes, --lab-csv or --lab-truth"


def _check_lab_truth(pairs: tuple) -> None:
    """--lab-truth's first value is the images' folder (the second, the truth, may be a file
    or a folder)."""
    for images, truth in pairs:
        if not images.is_dir():
            raise click.BadParameter(f"{images} is not a folder (the images' folder comes first: "
                                     "--lab-truth IMAGES TRUTH)", param_hint="'--lab-truth'")


def _check_lab(no_public: bool, options: str, named: tuple) -> None:
    """--no-public leaves only the lab's data: some must be named."""
    if no_public and not named:
        raise click.UsageError(f"--no-public needs {options}: without the public data, the "
                               "lab's are all there is to use")


@hookimpl
def wbc_register_commands(cli):
    cli.add_command(train)
