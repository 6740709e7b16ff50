"""The bundle folders a training run starts from (`--init`) and writes into (`-o`).

Both are checked before any work, so that a mistake costs seconds, not a training run:
- OUT may not be the bundle shipped in the package, nor any other folder inside the installed
  package: training would replace the default models that every `run` without `--model` uses
  (`refuse_package`). Nor may it be a file, a folder holding the results of `run` or `watch`,
  or lie where no folder can be made (`check_out`); it is made before the training starts
  (`make_out`), and held, as `run` and `watch` hold theirs, for as long as this process trains
  into it (`hold_out`): a second training into one OUT would pair a classifier with a
  segmenter that did not cut its crops.
- INIT's bundle.json must be readable, and the weights the run starts from, or copies into OUT,
  must load into the network they are meant for (`check_init`): a damaged or mismatched file is
  said at once, not after the crops are cut.

bundle.json records where a fine-tuned network came from (`init_stages`) and the run's settings
with their paths made absolute (`config_record`). `describe` says what a bundle folder holds, for
the line printed when a run is stopped or fails on its data.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from ..bundle import (DEFAULT_BUNDLE_DIR, FILES, META_FILE, WEIGHTS_SHA256, BundleError,
                      check_format, sha256_file, weights_differ)
from ..errors import WbcBatchError


class BundleFolderError(WbcBatchError, ValueError):
    """`-o` or `--init` names a folder training cannot use; the message says why and what to do."""


def package_dir() -> Path:
    """The installed `wbc_batch` package's folder, links resolved."""
    return Path(__file__).resolve().parent.parent


#: `--init shipped`: the bundle shipped in the package, wherever wbc-batch is installed (its
#: folder, `wbc_batch/models`, is only that from a checkout's root; a folder named so: `./shipped`)
SHIPPED = "shipped"


def shown(path: Path) -> str:
    """`path` as a user can type it here: relative to the working folder when below it."""
    rel = os.path.relpath(Path(path).resolve(), Path.cwd().resolve())
    return str(path) if rel.startswith("..") else rel


def refuse_package(out: Path, stain_reference: bool = False, export: bool = False,
                   said: str | None = None) -> None:
    """Refuse an OUT that is the shipped bundle (`bundle.DEFAULT_BUNDLE_DIR`) or lies inside the
    installed package, by any spelling or link. `stain_reference`: the hint for `train
    stain-reference`, which fits a bundle it does not make; `export`: the words for
    `export-onnx`, which would replace the shipped exports; `said`: how the message names OUT
    (default `-o OUT`).

    :raises BundleFolderError: with what to do instead.
    """
    real, package = Path(out).resolve(), package_dir()
    if real != package and package not in real.parents:
        return
    shipped = shown(DEFAULT_BUNDLE_DIR)
    if real == DEFAULT_BUNDLE_DIR.resolve():
        what = ("is the model bundle shipped with wbc-batch: "
                + ("export-onnx would replace the exports of the default models, which every "
                   "`run --backend onnx` without --model uses" if export else
                   "training would replace the default models that every `run` without --model "
                   "uses"))
    else:
        what = (f"lies inside the installed wbc_batch package ({shown(package)}): a bundle there "
                "is lost when wbc-batch is installed again, and may overwrite the package's files")
    if export:
        todo = ("export into a folder of your own (-o MY_BUNDLE; the bundle's other files are "
                "copied along)")
    elif stain_reference:
        todo = f"copy the bundle to a folder of your own (cp -r {shipped} MY_BUNDLE) and name that"
    else:
        todo = "name a new folder (-o MY_BUNDLE), with --init shipped to start from the shipped weights"
    raise BundleFolderError(f"{said or f'-o {out}'} {what}. Instead, {todo}")


def check_out(out: Path) -> None:
    """Refuse, before any work, an OUT that training could not write into at its end: inside the
    package (`refuse_package`), a file, or below a file or a folder without write permission;
    and one that holds the results of `run` or `watch` (`discovery.is_results_folder`), which a
    bundle's files would be mixed into (an -o given the folder of the run before).

    :raises BundleFolderError: naming the path at fault.
    """
    from ..discovery import is_results_folder

    out = Path(out)
    refuse_package(out)
    if out.exists() and not out.is_dir():
        raise BundleFolderError(f"-o {out} is a file: name a folder for the model bundle")
    if out.is_dir() and is_results_folder(out):
        raise BundleFolderError(f"-o {out} holds the results of a wbc-batch run or watch: name a "
                                "folder of its own for the model bundle")
    if out.is_dir():
        read_meta(out, option="-o")  # a damaged or newer bundle.json, found after the training
    existing = next(p for p in (out, *out.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise BundleFolderError(f"-o {out}: {existing} is a file, so no folder can be made there")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise BundleFolderError(f"-o {out}: no permission to write in {existing}")


def make_out(out: Path) -> None:
    """Make the OUT folder (and its parents) before the training starts, and hold it
    (`hold_out`).

    :raises BundleFolderError: it cannot be made, with the reason.
    """
    try:
        Path(out).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BundleFolderError(f"-o {out}: cannot make the folder ({exc.strerror or exc})") from None
    hold_out(out)


#: {resolved OUT: its lock} of the folders this process trains into (`hold_out`)
_HELD: dict = {}


def hold_out(out: Path) -> None:
    """Hold OUT's lock (`output_folder.lock_output`, the one `run` and `watch` take), made when
    OUT is, until the trainer returns (`releases_out`); again for a folder already held.

    :raises BundleFolderError: another training, run or watcher holds it."""
    from ..output_folder import lock_output
    from ..pipeline import PipelineError

    key = Path(out).resolve()
    if key in _HELD:
        return
    try:
        _HELD[key] = lock_output(out)
    except PipelineError as exc:
        raise BundleFolderError(f"-o {out}: {exc}") from None


#: how many `releases_out` calls are running (a trainer calling a decorated step of its own)
_DEPTH = [0]


def releases_out(trainer):
    """Decorate a trainer `trainer(cfg, ...)`, or a step of one callable alone, so that the
    holds taken while it runs (`hold_out`) are let go of when the outermost such call returns
    or raises: called from Python (a notebook), OUT stayed locked against every other command
    until the interpreter ended. A hold taken before that call is kept."""
    import functools

    @functools.wraps(trainer)
    def wrapper(*args, **kwargs):
        before = set(_HELD)
        _DEPTH[0] += 1
        try:
            return trainer(*args, **kwargs)
        finally:
            _DEPTH[0] -= 1
            if not _DEPTH[0]:  # the outermost call: the training is over
                for key in set(_HELD) - before:
                    _HELD.pop(key).close()

    return wrapper


def read_meta(folder: Path, option: str = "--init") -> dict:
    """A bundle folder's bundle.json ({} when it has none).

    :raises BundleFolderError: it is there but cannot be read as a JSON object.
    """
    path = Path(folder) / META_FILE
    if not path.exists():
        return {}
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BundleFolderError(f"{option} {folder}: cannot read {path} ({exc})") from None
    if not isinstance(meta, dict):
        raise BundleFolderError(f"{option} {folder}: {path} is not a JSON object")
    try:
        check_format(meta, path)
    except BundleError as exc:
        raise BundleFolderError(f"{option} {folder}: {exc}") from None
    return meta


def check_weights(path: Path, build, option: str = "--init") -> None:
    """Load the weights in `path` into the network `build()` makes, as the run will.

    The network is built with PyTorch's random generator saved and restored, so that this check
    leaves the run's seeded draws as they were.

    :raises BundleFolderError: the file cannot be read, holds non-finite numbers or does not fit.
    """
    import torch

    from ..nets import load_weights

    with torch.random.fork_rng(devices=[]):
        model = build()
    try:
        load_weights(model, path)
    except ValueError as exc:
        raise BundleFolderError(f"{option}: {exc}") from None


def check_init(init: Path, networks: dict) -> dict:
    """Check, before any work, the `--init` bundle a run starts from: its bundle.json and, for each
    `name -> build` of `networks` whose weights are there, that they load into `build()`'s
    network. Returns its bundle.json (`read_meta`).

    :raises BundleFolderError: naming the file at fault.
    """
    meta = read_meta(init)
    for name, build in networks.items():
        path = Path(init) / FILES[name]
        if not path.is_file():
            continue
        check_weights(path, build)
        if weights_differ(Path(init), meta, name):  # `run --model INIT` refuses it too
            raise BundleFolderError(
                f"--init {init}: {path} is not the {name} {Path(init) / META_FILE} describes "
                "(its sha256 differs: a training run stopped between writing the two, or the "
                "file was copied from another bundle); its temperature, crop size and lineage "
                "would be taken for other weights")
    return meta


#: the parts of a network's bundle.json section kept in the `stages` of networks fine-tuned from it
STAGE_KEYS = ("steps", "epochs", "train_seconds", "trained_on", "val", "train", "seed", "precision",
              "config", WEIGHTS_SHA256)


def start_checks(cfg, network: str, check_init, log=None) -> list:
    """A trainer's checks before any work: OUT can be written (`check_out`) and, when
    fine-tuning, `--init` holds the `network`'s weights and they load (`check_init(cfg)`, the
    trainer's own). Returns the lineage (`init_stages`; [] without `--init`), read before OUT is
    written, which may be INIT. Weights of `network` already in OUT are said to be replaced
    (to `log`), so that a trained model is never overwritten without a word.

    :raises BundleFolderError: OUT or INIT cannot be used (INIT holding no weights of
        `network` too).
    """
    out = Path(cfg.out)
    check_out(out)
    if log is not None and (out / FILES[network]).is_file():
        if cfg.init and Path(cfg.init).resolve() == out.resolve():
            log(f"fine-tuning the {network} of {out} in place: its weights are replaced when the "
                "training ends")
        else:
            log(f"{out} holds a {network} already: this run's replaces it when the training "
                "ends (copy the folder first to keep it)")
    if not cfg.init:
        return []
    init, name = Path(cfg.init), FILES[network]
    if not (init / name).is_file():  # found before any work, as check_init's refusals
        raise BundleFolderError(f"--init {init} holds no {name}: name a model bundle folder "
                                "(such as `shipped`, the models shipped with wbc-batch)")
    check_init(cfg)
    return init_stages(init, network)


def init_stages(init: Path, network: str) -> list:
    """The lineage of a `network` ("segmenter" or "classifier") fine-tuned from bundle `init`:
    the stages `init`'s own network came from, then that network itself (its summary, the sha256
    of its weights and the folder it was in). Read before OUT is written, which may be `init`."""
    init = Path(init)
    prev = read_meta(init).get(network, {})
    stage = {k: prev[k] for k in STAGE_KEYS if k in prev}
    weights = init / FILES[network]
    if WEIGHTS_SHA256 not in stage and weights.is_file():
        stage[WEIGHTS_SHA256] = sha256_file(weights)
    stage["bundle"] = str(init.resolve())
    return list(prev.get("stages", [])) + [stage]


def config_record(cfg) -> dict:
    """A training config as bundle.json records it: every path absolute (resolved from the
    folder the run was started in, which bundle.json cannot know), tuples as lists. `data` is
    None when the public data were not used (`--no-public`): its default folder was not read,
    and may not exist; `use_wbc_dataset` is then false. With `splits`, `splits_sha256` records
    its split files' digests."""
    def plain(value):
        if isinstance(value, Path):
            return str(value.resolve())
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        return value

    record = {f.name: plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if getattr(cfg, "use_public", True) is False:  # no public set was read, Datasets 1 and 2
        if "data" in record:                          # included
            record["data"] = None
        if "use_wbc_dataset" in record:
            record["use_wbc_dataset"] = False
    if getattr(cfg, "splits", None) is not None:  # a folder written for one run may be gone later
        record["splits_sha256"] = split_digests(Path(cfg.splits))
    return record


def split_digests(folder: Path) -> dict:
    """{file name: sha256} of the split files in `folder` (`--splits`), so that bundle.json says
    which rows were trained on after the folder is gone."""
    from .datasets import SPLIT_FILES

    names = SPLIT_FILES + ("txl-pbc.csv",)
    return {n: sha256_file(folder / n) for n in names if (folder / n).is_file()}


def describe(out: Path) -> str:
    """What the bundle folder `out` holds, in words ("a segmenter and no classifier"), for the
    line said when training stops; a network whose bundle.json section records other weights
    (a stop between writing the two) is named as such."""
    out = Path(out)
    if not out.is_dir():
        return "nothing (it was not made)"
    try:
        meta = read_meta(out, "-o")
    except BundleFolderError:
        meta = {}
    parts = []
    for name in ("segmenter", "classifier"):
        path = out / FILES[name]
        if not path.is_file():
            parts.append(f"no {name}")
            continue
        section = meta.get(name)
        recorded = section.get(WEIGHTS_SHA256) if isinstance(section, dict) else None
        if not isinstance(section, dict):
            parts.append(f"a {name} that bundle.json does not describe")
        elif recorded and sha256_file(path) != recorded:
            parts.append(f"a {name} that is not the one bundle.json describes (train it again)")
        else:
            parts.append(f"a {name}")
    return " and ".join(parts)


#: fewer training steps than this from --init are warned about: the one-cycle schedule then
#: reaches its full learning rate within a few steps and leaves no time to settle (in a review,
#: a lab's classifier fine-tuned for 3 and for 20 steps ended well below where it started on
#: its held-out cells; 60 steps and the default 300 did not)
SHORT_FINE_TUNE = 50


def warn_short_fine_tune(cfg, steps: int, log) -> None:
    """Warn when a fine-tune from --init takes fewer than SHORT_FINE_TUNE steps."""
    if cfg.init and steps < SHORT_FINE_TUNE:
        log(f"WARNING: {steps} training steps from --init: a fine-tune this short can end worse "
            f"than it started (the learning rate reaches its peak within a few steps); take at "
            f"least {SHORT_FINE_TUNE}, and check the result on held-out cells")


def warn_below_start(kept: float, start, when: str, log) -> None:
    """Warn when the checkpoint a fine-tune keeps scores below its `--init` weights on val
    (`start`: their val score before any training, or None without `--init` or val): nothing
    else would say that the fine-tune made the val figures worse."""
    if start is not None and kept < start:
        log(f"WARNING: the kept {when} scores {kept:.4f} on val, below the --init weights' "
            f"{start:.4f} before any training: this fine-tune made the val figures worse. Keep "
            "using the --init bundle, or try a lower --lr, more steps or more of the lab's data")


def default_data(repo: Path = None) -> Path:
    """Where the public datasets are by default: $WBC_BATCH_DATA, else `shared/data` beside the
    repository `repo` (the scripts' own), else `../shared/data` from the current folder (the
    `train` command's default, shown in its --help)."""
    env = os.environ.get("WBC_BATCH_DATA")
    if env:
        return Path(env)
    return Path(repo).parent / "shared" / "data" if repo is not None else Path("../shared/data")


def add_data_option(parser, repo: Path) -> None:
    """The repository scripts' `--data` option (argparse): the public datasets, by default
    `default_data(repo)`."""
    parser.add_argument("--data", type=Path, default=default_data(repo),
                        help="the public datasets (default: $WBC_BATCH_DATA, else ../shared/data "
                             "beside the repository)")
