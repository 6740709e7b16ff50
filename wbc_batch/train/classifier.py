"""Train the 5-class ResNet classifier on crops made exactly the way the pipeline makes them.

Crops. Each training image is passed through the trained segmenter and the cell splitter
(`analysis.find_cells`) and the cell's square crop is cut with `preprocess.square_box` /
`crop_square`, as at run time, only with extra context so that augmentation can jitter the box.
PBC images and the WBC Image Dataset's single-cell images (Datasets 1 and 2, two more
microscopes) hold one centred cell (the found cell nearest the centre is taken); BCCD fields hold
labelled WBC boxes (a found cell is used when it overlaps a box whose image has one subtype).
On the CPU, `threads` one-thread processes cut them (`crop_pool`); they are cached with `cache`.
The small sources from other microscopes are oversampled (`repeats`) so that the network does not
learn one lab's stain as part of a class; a lab's own cells, trained with the public sources, are
repeated to `lab_share` of each epoch (`source_repeats`).

Training. GroupNorm ResNet (ResNet-18 layout at half width), cross-entropy with light label
smoothing, AdamW + one-cycle, bf16 autocast where the hardware does bf16 (`train.device`).
Augmentation: rotation, flips, box scale/shift jitter, stain/colour/gamma/contrast jitter, blur,
noise, JPEG. The checkpoint kept is the best by mean val accuracy over the sources; the softmax
temperature is then fitted on val (minimum NLL), so confidences and `needs_review` are
calibrated. Test rows are never read.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from .. import CLASSES
from . import datasets as ds
from .augment import GRAY_P, HUE, SAT, affine, colour_settings, photometric
from .device import autocast, seeded_start, state_on_cpu, training_device
from .folders import releases_out

CONTEXT = 1.5  # stored crops cover CONTEXT times the run-time crop window
CROP_SIZE, CROP_MARGIN = 96, 1.3  # the recipe's crop: side in pixels, and side over the cell's box
PUBLIC_SOURCES = ("pbc", "bccd", "wbc1", "wbc2")


@dataclass(frozen=True)
class ClsTrainConfig:
    data: Path                      # the shared data folder
    out: Path                       # bundle folder (must already hold the trained segmenter)
    lab_folders: tuple = ()         # extra class-folder datasets (datasets.read_class_folders)
    lab_csvs: tuple = ()            # extra CSV datasets (datasets.read_class_csv)
    lab_truths: tuple = ()          # (images folder, truth) pairs, as evaluate takes them
                                    # (datasets.read_lab_truth): single cells and boxed fields
    use_public: bool = True
    epochs: int = 18
    batch: int = 64
    # the classifier's crop (None: the --init bundle's when fine-tuning, else CROP_SIZE and
    # CROP_MARGIN; `with_crop_geometry`)
    crop_size: int | None = None
    crop_margin: float | None = None
    lr: float = 2e-3
    seed: int = 0
    threads: int = 2
    cache: Path | None = None       # folder for extracted crops (reused when present)
    init: Path | None = None
    use_wbc_dataset: bool = True    # WBC Image Dataset 1 and 2 class labels as a source
    # small sources from other microscopes are oversampled: source -> repeats per epoch
    repeats: tuple = (("bccd", 4), ("wbc1", 2), ("wbc2", 4))
    # a lab's cells trained together with other sources are repeated until they make about this
    # share of each epoch (source_repeats); with the lab's data alone it changes nothing
    lab_share: float = 0.3
    # public sources left out of training and checkpoint choice, to measure the classifier on a
    # microscope it never saw (names: PUBLIC_SOURCES)
    leave_out: tuple = ()
    # colour augmentation (train.augment.photometric): chance of a grey crop, hue and saturation range
    gray_p: float = GRAY_P
    hue: int = HUE
    sat: float = SAT
    od_p: float = 0.0               # chance of restaining a crop (augment.od_stain)
    mixstyle: float = 0.0           # chance, per batch and stage, of mixing styles (train.mixstyle)
    # a run takes at least this many optimiser steps: a small (lab) set is passed over several
    # times per epoch; the public sets' epochs are far longer, so it leaves them as they are
    min_steps: int = 300
    widths: tuple = (32, 64, 128, 256)
    blocks: tuple = (2, 2, 2, 2)
    device: str = "cpu"             # "cpu", "auto", "cuda" or "cuda:N" (train.device)
    precision: str = "auto"         # "auto", "bf16" or "fp32" (train.device.resolve_precision)
    splits: Path | None = None      # split files read in place of <data>/splits (datasets.split_file)


# --- crops ---------------------------------------------------------------------------------------

def _rgb(path) -> tuple:
    """(the image as `run` reads it, None) or (None, "PATH (why it cannot be read)"), where
    `run` refuses it too: a label mask or an image too small to hold a WBC
    (`imageio.check_smear`) had been cut as a smear, and said to be one without a cell."""
    from ..imageio import ImageReadError, read_smear

    try:
        return read_smear(path), None
    except ImageReadError as exc:
        return None, f"{path} ({exc})"


def _found(rgb, path, session, bundle) -> tuple:
    """(`find_cells` of one training image at the default settings, None), or (None, "PATH
    (why)") where the analysis refuses it, as `run` does: WBCs too small to tell nucleus from
    cytoplasm (a traceback had stopped the training)."""
    from ..analysis import find_cells
    from ..config import AnalysisParams
    from ..results import ImageNotAnalysable

    try:
        return find_cells(rgb, session, bundle, AnalysisParams()), None
    except ImageNotAnalysable as exc:
        return None, f"{path} ({exc})"


def _context_crop(rgb, box, margin, size):
    from ..preprocess import crop_square, square_box

    x0, y0, side = square_box(*box, margin * CONTEXT)
    return crop_square(rgb, x0, y0, side, int(round(size * CONTEXT)))


def _iou(a, b) -> float:
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    ix = max(0, min(ax + aw, bx + bw) - max(ax, bx))
    iy = max(0, min(ay + ah, by + bh) - max(ay, by))
    inter = ix * iy
    return inter / max(1, aw * ah + bw * bh - inter)


def extract_single_cell_crops(records, session, bundle, size, margin, log=print):
    """One crop per single-cell image (the found cell nearest the centre). -> (crops, labels,
    [PATH of each image without a found cell], ["PATH (why it cannot be read)", ...])."""
    crops, labels, missed, unreadable = [], [], [], []
    t0 = time.time()
    for i, r in enumerate(records):
        rgb, why = _rgb(r.image)
        found = None
        if rgb is not None:
            found, why = _found(rgb, r.image, session, bundle)
        if found is None:
            unreadable.append(why)
            continue
        h, w = rgb.shape[:2]
        if not found.boxes:
            missed.append(str(r.image))
            continue
        box = min(found.boxes.values(),
                  key=lambda b: (b[0] + b[2] / 2 - w / 2) ** 2 + (b[1] + b[3] / 2 - h / 2) ** 2)
        crops.append(_context_crop(found.rgb, box, margin, size))  # evened, as at run time
        labels.append(CLASSES.index(r.cls))
        if (i + 1) % 500 == 0:
            log(f"  crops {i + 1}/{len(records)} ({time.time() - t0:.0f}s, {len(missed)} without a "
                f"cell, {len(unreadable)} unreadable)")
    return crops, labels, missed, unreadable


def extract_field_crops(records, session, bundle, size, margin):
    """Crops of found cells that overlap a labelled WBC box (IoU >= 0.3). -> (crops, labels,
    ["PATH (box N)" of each box without a found cell], ["PATH (why it cannot be read)", ...] of
    the fields). A lab's field (`BoxRecord.truth`) has its boxes fitted to the image read, as
    `evaluate` fits them; boxes that cannot be this image's leave the field out, as unreadable."""
    from ..metrics import fitted_boxes

    crops, labels, missed, unreadable = [], [], [], []
    for r in records:
        if not any(r.truth.box_classes if r.truth is not None else r.classes):
            continue
        rgb, why = _rgb(r.image)
        found = None
        boxes, classes = r.boxes, r.classes
        if rgb is not None and r.truth is not None:
            boxes, why = fitted_boxes(r.truth, rgb.shape[1], rgb.shape[0], [])
            classes = r.truth.box_classes
            why = why and f"{r.image} ({why})"
        if rgb is not None and boxes is not None:
            found, why = _found(rgb, r.image, session, bundle)
        if found is None:
            unreadable.append(why)
            continue
        cell_of = _one_cell_per_box(boxes, list(found.boxes.values()))
        for k, (gt, cls) in enumerate(zip(boxes, classes), 1):
            if cls not in CLASSES:
                continue
            if k - 1 not in cell_of:
                missed.append(f"{r.image} (box {k})")
                continue
            crops.append(_context_crop(found.rgb, cell_of[k - 1], margin, size))
            labels.append(CLASSES.index(cls))
    return crops, labels, missed, unreadable


#: a found cell is a truth box's when their box IoU reaches this
FIELD_IOU = 0.3


def _one_cell_per_box(truth: list, cells: list) -> dict:
    """{truth box index: found cell box}: pairs taken by box IoU, highest first, down to
    FIELD_IOU, each box and each cell once (as `evaluate` pairs them at 0.5), so that a cell
    between two annotated ones is never trained on under both classes."""
    pairs = sorted(((_iou(c, t), k, j) for k, t in enumerate(truth) for j, c in enumerate(cells)),
                   key=lambda p: (-p[0], p[1], p[2]))
    out, used = {}, set()
    for iou, k, j in pairs:
        if iou < FIELD_IOU:
            break
        if k not in out and j not in used:
            out[k] = cells[j]
            used.add(j)
    return out


def extract_lab_crops(records, session, bundle, size, margin, log=print):
    """A lab's records, single-cell images (`ClassRecord`) and boxed fields (`BoxRecord`),
    each cut as their kind is: `extract_single_cell_crops`' result, then `extract_field_crops`'
    appended."""
    cells = [r for r in records if isinstance(r, ds.ClassRecord)]
    fields = [r for r in records if not isinstance(r, ds.ClassRecord)]
    out = extract_single_cell_crops(cells, session, bundle, size, margin, log)
    more = extract_field_crops(fields, session, bundle, size, margin)
    return tuple(a + b for a, b in zip(out, more))


def record_classes(record) -> list:
    """The classes a training record labels: a single cell's one, or a field's boxes' (None
    for a box without a subtype)."""
    if isinstance(record, ds.ClassRecord):
        return [record.cls]
    return list(record.truth.box_classes if record.truth is not None else record.classes)


def _labelled(records) -> list:
    """Mask records with a class label, as single-cell class records."""
    return [ds.ClassRecord(r.image, r.cls, r.source) for r in records if r.cls in CLASSES]


def build_crop_sets(cfg: ClsTrainConfig, split: str, session, bundle, log=print, pool=None,
                    lab: list | None = None) -> dict:
    """source -> (uint8 crops (N, S', S', 3), int labels (N,)), cached in cfg.cache (one file per
    source, split, crop geometry and segmenter weights). The crops are cut with `session` and
    `bundle`, or by `pool` (a `CropPool`, of the same bundle) when one is given. `lab`: the lab's
    records, when the caller has read them already (`lab_records`; else they are read here).
    Images that cannot be read or analysed (`_rgb`, `_found`) are counted apart from those
    without a found cell, and named."""
    from ..atomic import atomic_path
    from .crop_pool import cut

    cfg = with_crop_geometry(cfg)  # settled already when called by the trainers

    def cutting(kind, records):
        if pool is not None:
            return lambda: pool.cut(kind, records(), cfg.crop_size, cfg.crop_margin, log)
        return lambda: cut(kind, records(), session, bundle, cfg.crop_size, cfg.crop_margin, log)

    sets = {}
    jobs = []
    cutter = _segmenter_key(bundle.root if bundle is not None else cfg.out) if cfg.cache else ""
    if split != "train":
        lab = []
    elif lab is None:
        lab = lab_records(cfg, log)
    if lab:  # first: a lab source with no cell found is said before the long public cutting
        # single cells first, then fields: the order chunks of a CropPool keep too
        in_order = sorted(lab, key=lambda r: not isinstance(r, ds.ClassRecord))
        jobs.append(("lab", cutting("lab", lambda: in_order)))
    if cfg.use_public:
        jobs.append(("pbc", cutting("cells", lambda: ds.pbc(cfg.data, split, cfg.splits))))
        jobs.append(("bccd", cutting("fields", lambda: ds.bccd(cfg.data, split, cfg.splits))))
    if cfg.use_public and cfg.use_wbc_dataset:
        for k in ("1", "2"):
            records = lambda k=k: _labelled(ds.wbc_image_dataset(cfg.data, split, k, cfg.splits))  # noqa: E731
            jobs.append((f"wbc{k}", cutting("cells", records)))
    for name, job in jobs:
        if name in cfg.leave_out:
            continue
        cache = None
        if cfg.cache:
            # "-r2": a lab's crops cut since its masks and icons are left out (ab43ca6): a cache
            # of before could hold a crop cut from a mask
            key = f"lab-{records_digest(lab)}-r2" if name == "lab" else name + _splits_key(cfg, name)
            # one file per crop geometry and segmenter (which found the cells)
            cache = Path(cfg.cache) / f"crops-{key}-{split}-{cfg.crop_size}-m{cfg.crop_margin:g}{cutter}.npz"
        unreadable = []
        if cache is not None and cache.exists():
            z = np.load(cache)
            sets[name] = (z["x"], z["y"])
            # what was left out is said again: a rerun had blamed the segmenter for a lab's
            # masks and icons, which it never saw
            unreadable = [str(v) for v in z["unreadable"]] if "unreadable" in z.files else []
            missed = [str(v) for v in z["missed"]] if "missed" in z.files else []
            log(f"{name}/{split}: {len(z['y'])} crops (cached)")
            _say_left_out(name, split, missed, unreadable, log)
        else:
            t0 = time.time()
            crops, labels, missed, unreadable = job()
            side = int(round(cfg.crop_size * CONTEXT))  # as _context_crop cuts them
            x = np.stack(crops) if crops else np.zeros((0, side, side, 3), np.uint8)
            y = np.array(labels, np.int64)
            log(f"{name}/{split}: {len(y)} crops, {len(missed)} images/boxes without a found cell"
                + (f", {len(unreadable)} images that cannot be read or analysed" if unreadable else "")
                + f" ({time.time() - t0:.0f}s)")
            _say_left_out(name, split, missed, unreadable, log)
            if cache is not None:
                with atomic_path(cache) as tmp:  # a stop leaves no half file to be read back
                    np.savez(tmp, x=x, y=y, unreadable=np.array(unreadable, dtype=str),
                             missed=np.array(missed, dtype=str))
            sets[name] = (x, y)
        if name == "lab" and not len(sets[name][1]):
            raise ds.TrainingDataError(f"no training crops from the lab's data ({_lab_sources(cfg)}): "
                                       + _none_found(len(lab), unreadable))
    # in the order the sources have always been concatenated in, so that a seed gives the same run
    return {name: sets[name] for name in sorted(sets, key=lambda n: n == "lab")}


def _say_left_out(name: str, split: str, missed: list, unreadable: list, log) -> None:
    """Name the images of a source that cannot be read or analysed and, for the lab's own, those
    in which the segmenter found no cell, so that a lab can look at them."""
    if unreadable:
        log(f"{name}/{split}: images that cannot be read or analysed left out: "
            f"{_reasons(unreadable)}")
    if missed and name == "lab":
        boxes = any(re.search(r" \(box \d+\)$", m) for m in missed)  # `extract_field_crops`'
        log(f"{name}/{split}: {'images or boxes of fields' if boxes else 'images'} where no cell "
            f"was found left out: {_reasons(missed)}")


def _reasons(unreadable: list, limit: int = 3) -> str:
    """The first few of the reasons images cannot be read, and how many more."""
    shown = "; ".join(unreadable[:limit])
    return shown + (f"; and {len(unreadable) - limit} more" if len(unreadable) > limit else "")


def _none_found(n: int, unreadable: list) -> str:
    """Why none of the lab's `n` images gave a crop: some or all could not be read or analysed,
    the segmenter found no cell in the others."""
    if not unreadable:
        return f"the segmenter found no cell in any of its {n} images"
    if len(unreadable) == n:
        return f"none of its {n} images can be read or analysed: {_reasons(unreadable)}"
    return (f"{len(unreadable)} of its {n} images cannot be read or analysed ({_reasons(unreadable)}), and the "
            f"segmenter found no cell in the other {n - len(unreadable)}")


def _segmenter_key(bundle_dir: Path) -> str:
    """The cache file names' part that tells the segmenter which cut the crops: "-s" and the
    start of its weights' sha256 ("" for a bundle folder without segmenter weights)."""
    from ..bundle import FILES, sha256_file

    path = Path(bundle_dir) / FILES["segmenter"]
    return f"-s{sha256_file(path)[:12]}" if path.is_file() else ""


SOURCE_SPLIT_FILE = {"pbc": "pbc-wbc.csv", "bccd": "bccd.csv", "wbc1": "wbc-image-dataset.csv",
                     "wbc2": "wbc-image-dataset.csv"}  # the split file choosing each public source's rows


def _splits_key(cfg: ClsTrainConfig, source: str) -> str:
    """The cache file names' part that tells other split files (`--splits`) which chose the
    public `source`'s rows: "-p" and the start of that file's sha256 ("" for `<data>/splits`,
    so that the crops cached before the option are still found)."""
    from ..bundle import sha256_file

    if cfg.splits is None:
        return ""
    return f"-p{sha256_file(ds.split_file(cfg.data, cfg.splits, SOURCE_SPLIT_FILE[source]))[:12]}"


def _lab_sources(cfg: ClsTrainConfig) -> str:
    """The lab's sources as named on the command line."""
    return ", ".join([f"--lab-classes {f}" for f in cfg.lab_folders] + [f"--lab-csv {c}" for c in cfg.lab_csvs]
                     + [f"--lab-truth {i} {t}" for i, t in cfg.lab_truths])


def lab_records(cfg: ClsTrainConfig, log=None, readers=None) -> list:
    """Every labelled image of the lab's class folders, CSVs and truths, each once (what is
    left out is said through `log`). `readers`: the truth readers for `lab_truths` (default:
    those of a new plugin manager, as `run` has them).

    :raises TrainingDataError: a source holds none, or two give an image different classes
        (two annotators' sheets). An image a CSV keeps for val or test is left out of every
        source, said.
    """
    sources, held = [], {}
    for f in cfg.lab_folders:
        sources.append((f"--lab-classes {f}", ds.read_class_folders(Path(f), log)))
    # a CSV may only hold cells back
    several = len(cfg.lab_folders) + len(cfg.lab_csvs) + len(cfg.lab_truths) > 1
    for c in cfg.lab_csvs:
        sources.append((f"--lab-csv {c}", ds.read_class_csv(Path(c), log, held_out=held,
                                                            beside_others=several)))
    if cfg.lab_truths and readers is None:
        from ..plugins import get_plugin_manager, get_truth_readers

        readers = get_truth_readers(get_plugin_manager())
    for images, truth in cfg.lab_truths:
        sources.append((f"--lab-truth {images} {truth}",
                        ds.read_lab_truth(Path(images), Path(truth), readers, log)))
    lab = _one_record_per_image(sources, held, log)
    if several and not lab:
        raise ds.TrainingDataError("the lab's sources leave no image to train on: every one is "
                                   "kept for val or test by a CSV")
    if lab and log:
        named = [c for r in lab for c in record_classes(r)]
        counts = {c: named.count(c) for c in CLASSES}
        fields = [r for r in lab if not isinstance(r, ds.ClassRecord)]
        what = (f"{len(lab)} labelled images" if not fields else
                f"{len(lab) - len(fields)} labelled single-cell images and {len(fields)} fields "
                f"with {sum(counts.values()) - len(lab) + len(fields)} labelled boxes")
        log(f"lab: {what} (" + ", ".join(f"{c} {n}" for c, n in counts.items()) + ")")
    return lab


def _one_record_per_image(sources: list, held: dict, log=None) -> list:
    """The records of `[(source name, records), ...]`, an image named by several sources kept
    once (one file, `ds.file_identity`), and one in `held` (a CSV's val or test rows:
    `{ds.image_identity: split}`) left out, each said through `log`: a CSV's split says which
    cells measure the result, whichever source names them (class folders of every cell, and a
    CSV of their splits).

    :raises TrainingDataError: an image is given two classes."""
    first, out, repeated, conflicts, held_back = {}, [], 0, {}, []
    for name, records in sources:
        for r in records:
            identity = ds.image_identity(r.image)  # a val row in another case holds it back
            if identity in held:
                held_back.append(f"{r.image} ({name}; {held[identity]} in a CSV)")
                continue
            key = ds.file_identity(r.image)  # a.png and A.png: two files on Linux, one on a Mac
            label = _label(r)
            if key not in first:
                first[key] = (label, name)
                out.append(r)
            elif first[key][0] == label:
                repeated += 1
            else:
                conflicts.setdefault(key, f"{r.image} ({_said(first[key][0])} in {first[key][1]}, "
                                          f"{_said(label)} in {name})")
    if conflicts:
        fields = any(" boxes in " in text for text in conflicts.values())
        raise ds.TrainingDataError(
            f"{len(conflicts)} lab image(s) given two {'labellings' if fields else 'classes'} by "
            f"the lab's sources: {ds.listing(conflicts.values(), 3)}; keep one "
            f"{'source for each image' if fields else 'class per image'}")
    if held_back and log:
        log(f"lab: {len(held_back)} image(s) that a CSV keeps for val or test left out of "
            f"training: {ds.listing(held_back, 3)}")
    if repeated and log:
        log(f"lab: {repeated} image(s) named by two sources with the same class, trained on once")
    return out


def _label(record):
    """What a lab record says of its image, to tell a repeat from a conflict: a single cell's
    class, or a field's boxes with their classes (in any order)."""
    if isinstance(record, ds.ClassRecord):
        return record.cls
    t = record.truth
    boxes = sorted(zip((tuple(float(v) for v in b) for b in t.boxes), (c or "" for c in t.box_classes)))
    return ("field", tuple(boxes), t.box_units)


def _said(label) -> str:
    """`_label` in words."""
    if isinstance(label, str):
        return label
    return f"a field of {len(label[1])} boxes"


#: fewer of the lab's cells of a class than this are warned about: the model card measured
#: fine-tuning with a few dozen per class
FEW_CELLS = 5


def warn_few_cells(lab_set, records: list, log=print) -> list:
    """Warn about the classes the lab named that give fewer than FEW_CELLS training crops
    (`lab_set`: the lab's (crops, labels), or None): a class learnt from one or two cells is
    learnt by heart. Returns those classes."""
    if lab_set is None:
        return []
    counts = np.bincount(lab_set[1], minlength=len(CLASSES))
    named = {c for r in records for c in record_classes(r)}
    few = [c for i, c in enumerate(CLASSES) if c in named and counts[i] < FEW_CELLS]
    if few:
        log("WARNING: few of the lab's cells to train on for "
            + ", ".join(f"{c} ({counts[CLASSES.index(c)]})" for c in few)
            + f": from fewer than {FEW_CELLS}, a class is learnt by heart rather than learnt; the "
            "model card's fine-tuning used a few dozen cells per class")
    return few


def warn_missing_classes(records: list, log=print) -> list:
    """Say which classes the lab's own records leave out when they are trained on alone
    (`--no-public`): a few epochs on the others teach the classifier never to answer those, so
    the differential will show none of them (basophils are rare in a lab's cells). A warning,
    not an error: a lab may truly have none to give. Returns the missing classes."""
    named = {c for r in records for c in record_classes(r)}
    missing = [c for c in CLASSES if c not in named]
    if records and missing:
        log(f"WARNING: the lab's cells have no {', '.join(missing)}; trained on them alone "
            "(--no-public), the classifier will hardly ever report "
            f"{'that class' if len(missing) == 1 else 'those classes'}. Add some, or train "
            "without --no-public: the public cells keep every class")
    return missing


def crop_counts(sets: dict) -> dict:
    """{source: {class: training crops}} of `build_crop_sets`'s result, for bundle.json: what a
    classifier learned from, in numbers, also after the lab's folders have changed."""
    return {name: {cls: int(np.count_nonzero(np.asarray(y) == k)) for k, cls in enumerate(CLASSES)}
            for name, (_, y) in sorted(sets.items())}


def records_digest(records: list) -> str:
    """A short digest of the records' paths, classes, sizes and modification times: the lab's
    cached crops are reused only for the same images and labels."""
    import hashlib

    h = hashlib.sha1()
    for r in sorted(records, key=lambda r: (str(r.image), repr(_label(r)))):
        try:
            st = Path(r.image).stat()
            stamp = f"{st.st_size}\t{st.st_mtime_ns}"
        except OSError:
            stamp = "missing"  # left out when the crops are cut
        label = r.cls if isinstance(r, ds.ClassRecord) else repr(_label(r) + (r.truth.box_size,))
        line = f"{Path(r.image).resolve()}\t{label}\t{stamp}\n"
        h.update(line.encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:12]


# --- augmentation ----------------------------------------------------------------------------------

def augment_crop(ctx: np.ndarray, rng: np.random.Generator, size: int, train: bool = True,
                 colour: dict | None = None) -> np.ndarray:
    """A stored context crop -> the (size, size) classifier crop, jittered when training."""
    big = ctx.shape[0]
    if not train:
        off = (big - size) // 2 if big >= size else 0
        if big == int(round(size * CONTEXT)):
            return ctx[off:off + size, off:off + size]
        return cv2.resize(ctx, (size, size))
    scale = size * CONTEXT / big * math.exp(rng.normal(0, 0.1))
    c = big / 2 + rng.normal(0, 0.05 * big / CONTEXT, 2)
    m = affine((c[0], c[1]), scale, rng.uniform(0, 360), rng.random() < 0.5, size)
    out = cv2.warpAffine(ctx, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    return photometric(out, rng, **(colour or {}))


# --- training ------------------------------------------------------------------------------------

def selection_score(hits: dict) -> float:
    """Checkpoint score from per-source val hits (source -> bool array): the mean of the PBC
    accuracy (our main microscope) and the pooled accuracy over every other source (other
    microscopes). Pooling keeps a 22-image source from swinging the choice on its own."""
    main = [h for name, h in hits.items() if name == "pbc"]
    other = [h for name, h in hits.items() if name != "pbc"]
    parts = [float(np.concatenate(g).mean()) for g in (main, other) if g]
    return float(np.mean(parts))


def source_repeats(sizes: dict, cfg: ClsTrainConfig) -> dict:
    """source -> how many times its crops appear in each epoch, from `sizes` (source -> crops).
    Public sources take `cfg.repeats` (1 if not named). The lab's cells, when other sources are
    trained with them, are repeated (at least once) until they make about `cfg.lab_share` of the
    epoch; otherwise a lab's few hundred cells are lost among the public ones."""
    reps = {name: dict(cfg.repeats).get(name, 1) for name in sizes}
    others = sum(n * reps[name] for name, n in sizes.items() if name != "lab")
    if sizes.get("lab") and others:
        share = cfg.lab_share / (1.0 - cfg.lab_share)
        reps["lab"] = max(1, round(share * others / sizes["lab"]))
    return reps


def epoch_steps(n: int, cfg: ClsTrainConfig) -> int:
    """Optimiser steps per epoch: one pass over the `n` crops, or more passes when the whole run
    would otherwise take fewer than `cfg.min_steps` steps (a lab's few dozen cells)."""
    return max(1, n // cfg.batch, math.ceil(cfg.min_steps / max(1, cfg.epochs)))


def epoch_order(rng: np.random.Generator, n: int, draws: int) -> np.ndarray:
    """Crop indices for one epoch: shuffled passes over all `n`, as many as `draws` needs. One
    pass is one permutation, so a large set's epochs draw what they always drew."""
    passes = max(1, math.ceil(draws / n))
    return np.concatenate([rng.permutation(n) for _ in range(passes)])


def init_temperature(cfg: ClsTrainConfig) -> float:
    """The temperature a run without a val split keeps: the `--init` bundle's (fine-tuning keeps
    the recipe, and so roughly how over- or under-confident its logits are), else 1."""
    from .segmenter import _read_meta

    if cfg.init is None:
        return 1.0
    return float(_read_meta(Path(cfg.init)).get("classifier", {}).get("temperature", 1.0))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The softmax temperature minimising the NLL on held-out (val) logits."""
    best_t, best_nll = 1.0, float("inf")
    for t in np.exp(np.linspace(np.log(0.3), np.log(5.0), 200)):
        z = logits / t
        z = z - z.max(axis=1, keepdims=True)
        nll = float(-(z[np.arange(len(labels)), labels] - np.log(np.exp(z).sum(axis=1))).mean())
        if nll < best_nll:
            best_t, best_nll = float(t), nll
    return best_t


def _predict(model, x_ctx: np.ndarray, size: int, batch: int = 256, bf16: bool = False) -> np.ndarray:
    """Logits for the un-augmented crops. `bf16` runs under the training autocast: half the time,
    for choosing a checkpoint; the temperature is fitted in float32, as the model runs."""
    import torch
    from ..preprocess import normalize_crops

    out = []
    device = next(model.parameters()).device
    model.eval()
    with torch.inference_mode(), autocast(str(device), enabled=bf16):
        for i in range(0, len(x_ctx), batch):
            crops = [augment_crop(c, None, size, train=False) for c in x_ctx[i:i + batch]]
            x = torch.from_numpy(normalize_crops(crops)).to(device)
            out.append(model(x).float().cpu().numpy())
    model.train()
    return np.concatenate(out) if out else np.zeros((0, len(CLASSES)), np.float32)


#: fewest training crops a stain reference is fitted on: a fine-tune on 5 lab cells flagged every
#: cell of the lab's own microscope as an unusual stain
MIN_STAIN_CROPS = 20
#: below this many, a reference still flags more of its own microscope's cells than the 1 % it
#: aims at, and training says so: `python scripts/stain_reference_size_check.py` printed, for
#: references fitted on n PBC val crops, 16.9 % of other PBC val cells flagged at n 20, 7.5 % at
#: 50, 2.0 % at 100 (and 84.5, 77.0 and 74.7 % of BCCD val's cells, another microscope's). A
#: threshold from crops left out of the fit flagged fewer of its own, but in many fits on 20 or
#: 50 crops none of BCCD's: a stain flag that says nothing is worse than one that says too much
FEW_STAIN_CROPS = 100


def stain_records(train_sets: dict, cfg: ClsTrainConfig, log) -> tuple:
    """bundle.json's `(stain_reference, stain_target)`: fitted on the training crops
    (`fit_stains`), or, from fewer than MIN_STAIN_CROPS, the `--init` bundle's (none without
    one: no cell is then flagged for its stain), said."""
    n = sum(len(y) for _, y in train_sets.values())
    if n >= MIN_STAIN_CROPS:
        warn_few_stain_crops(n, log)
        stains, target = fit_stains(train_sets, cfg.crop_size)
        return (stains.to_meta() if stains else None), (target.to_meta() if target else None)
    from .segmenter import _read_meta

    init = _read_meta(Path(cfg.init)).get("classifier", {}) if cfg.init is not None else {}
    kept = ("the --init bundle's is kept" if init.get("stain_reference")
            else "none is fitted, so no cell will be flagged for an unusual stain")
    log(f"WARNING: {n} training crops are too few to learn which stains are usual (at least "
        f"{MIN_STAIN_CROPS}): {kept}")
    return init.get("stain_reference"), init.get("stain_target")


def warn_few_stain_crops(n: int, log) -> None:
    """Say, for a reference fitted on fewer than FEW_STAIN_CROPS crops, that it will flag more
    of the lab's own cells than it aims at."""
    if n < FEW_STAIN_CROPS:
        log(f"WARNING: the stain reference is fitted on {n} training crops; from fewer than "
            f"{FEW_STAIN_CROPS} it marks more of the microscope's own cells unusual_stain than the "
            "1 % it aims at (fitted on 20 PBC val cells: 16.9 % of the others; 50: 7.5 %; 100: "
            "2.0 %; scripts/stain_reference_size_check.py). Review those cells knowing this, "
            "and add labelled cells to bring it down")


def fit_stains(train_sets: dict, size: int) -> tuple:
    """(`stain.StainReference`, `stain.StainTarget`) of the training sources (name -> (contexts,
    labels)), both fitted on the crops the classifier sees at run time, cut once: the reference
    over every source, the target (the stain `--stain-normalise` redraws unusual cells in) on the
    largest. Either is None when no crop has two stains."""
    from ..stain import StainReference, StainTarget

    crops = {name: [augment_crop(c, None, size, train=False) for c in x]
             for name, (x, _) in train_sets.items() if len(x)}
    if not crops:
        return None, None
    return StainReference.fit(crops), StainTarget.fit(max(crops.values(), key=len))


def with_crop_geometry(cfg: ClsTrainConfig, bundle: Path | None = None) -> ClsTrainConfig:
    """`cfg` with its crop size and margin settled where it leaves them None: taken from
    `bundle`'s classifier (by default the `--init` bundle's, so that fine-tuning sees the crops
    its starting weights were trained on), else the recipe's CROP_SIZE and CROP_MARGIN."""
    import dataclasses

    from .segmenter import _read_meta

    if cfg.crop_size is not None and cfg.crop_margin is not None:
        return cfg
    source = bundle if bundle is not None else cfg.init
    known = _read_meta(Path(source)).get("classifier", {}) if source is not None else {}
    size = cfg.crop_size if cfg.crop_size is not None else int(known.get("crop_size", CROP_SIZE))
    margin = cfg.crop_margin if cfg.crop_margin is not None else float(known.get("crop_margin", CROP_MARGIN))
    return dataclasses.replace(cfg, crop_size=size, crop_margin=margin)


def _crop_cutter(cfg: ClsTrainConfig, device: str, log=print):
    """(bundle, segmenting session) of `cfg.out`, which cut the crops. The bundle must hold the
    segmenter; a provisional classifier section lets find_cells run before one is trained. Says
    which segmenter that is (`_say_segmenter`)."""
    from ..bundle import load_bundle, write_meta
    from .crop_pool import segmenting_session
    from .segmenter import _read_meta

    copied = take_init_segmenter(cfg)
    _say_segmenter(cfg, copied, log)
    meta = _read_meta(Path(cfg.out))
    if "classifier" not in meta:  # a bundle's existing classifier section is left as it is
        meta["classifier"] = {"crop_size": cfg.crop_size, "crop_margin": cfg.crop_margin}
        write_meta(Path(cfg.out), meta)
    bundle = load_bundle(cfg.out, check=("segmenter",))  # the classifier is retrained
    return bundle, segmenting_session(bundle, device)


def _say_segmenter(cfg: ClsTrainConfig, copied: bool, log=print) -> None:
    """Say which segmenter cuts the crops (its path and the start of its sha256), and warn when
    a fine-tuning run cuts them with the segmenter OUT held already, not with --init's: the
    classifier then learns the crops of a segmenter the user did not name."""
    from ..bundle import FILES, sha256_file

    own = Path(cfg.out) / FILES["segmenter"]
    sha = sha256_file(own)
    log(f"crops cut by the segmenter {own} (sha256 {sha[:12]}{', copied from --init' if copied else ''})")
    init = Path(cfg.init) / FILES["segmenter"] if cfg.init is not None else None
    if copied or init is None or not init.is_file():
        return
    theirs = sha256_file(init)
    if theirs != sha:
        log(f"WARNING: {cfg.out} held a segmenter already, not the one of --init {cfg.init} (sha256 "
            f"{theirs[:12]}): that one cuts the crops and stays in the bundle beside the new "
            "classifier. To fine-tune with --init's segmenter, name a new -o folder")


def crop_pool(cfg: ClsTrainConfig, device: str):
    """A context holding the `CropPool` that cuts crops in `cfg.threads` processes of one thread
    each on the CPU, or None (cut in this process) on a GPU or with one thread."""
    from contextlib import nullcontext

    from .crop_pool import CropPool

    if device != "cpu" or cfg.threads < 2:
        return nullcontext(None)
    return CropPool(cfg.out, workers=cfg.threads, threads=1)


#: the ClsTrainConfig fields that choose the crops a stain reference is fitted on
STAIN_FIELDS = ("data", "use_public", "use_wbc_dataset", "splits", "lab_folders", "lab_csvs", "lab_truths",
                "leave_out", "cache", "crop_size", "crop_margin")


def stain_config_record(cfg: ClsTrainConfig) -> dict:
    """What `refit_stain_reference` records of its run: the data and crop geometry it read
    (`folders.config_record`, with the split files' digests), without the training settings it
    does not use."""
    from .folders import config_record

    record = config_record(cfg)
    return {k: v for k, v in record.items() if k in STAIN_FIELDS or k == "splits_sha256"}


@releases_out
def refit_stain_reference(cfg: ClsTrainConfig, log=print):
    """Fit the stain reference of the classifier already in `cfg.out` on the training crops
    that `cfg` names (the public sources and lab data, cut by the bundle's segmenter or read
    from `cfg.cache`), and store it in its bundle.json. For bundles trained before the
    reference existed; `train_classifier` fits it itself. Returns the reference.

    :raises TrainingDataError: no training crop, or none with two measurable stains; bundle.json
        is left as it was (a reference is never replaced by none, which would silently drop
        `run`'s unusual_stain flags).
    :raises folders.BundleFolderError: `cfg.out` is the shipped bundle or inside the package."""
    import torch

    from ..bundle import write_meta
    from .folders import refuse_package
    from .segmenter import _read_meta

    refuse_package(Path(cfg.out), stain_reference=True)
    torch.set_num_threads(cfg.threads)
    if "classifier" not in _read_meta(Path(cfg.out)):
        from ..bundle import BundleError
        raise BundleError(f"{cfg.out} holds no trained classifier to fit a stain reference for")
    cfg = with_crop_geometry(cfg, bundle=Path(cfg.out))  # the crops its classifier was trained on
    device = training_device(cfg.device, log)
    bundle, session = _crop_cutter(cfg, device, log)
    with crop_pool(cfg, device) as pool:
        train_sets = build_crop_sets(cfg, "train", session, bundle, log, pool=pool)
    kept = f"{Path(cfg.out) / 'bundle.json'} is left as it was"
    n = sum(len(y) for _, y in train_sets.values())
    if not n:
        raise ds.TrainingDataError(f"no training crops: the segmenter found no cell in the training "
                                   f"images ({', '.join(train_sets) or 'none'}); {kept}")
    if n < MIN_STAIN_CROPS:
        raise ds.TrainingDataError(f"{n} training crops are too few to learn which stains are usual "
                                   f"(at least {MIN_STAIN_CROPS}); {kept}")
    warn_few_stain_crops(n, log)
    stains, target = fit_stains(train_sets, cfg.crop_size)
    if stains is None:
        raise ds.TrainingDataError(f"no training crop had two measurable stains; {kept}")
    meta = _read_meta(Path(cfg.out))
    meta["classifier"]["stain_reference"] = stains.to_meta()
    meta["classifier"]["stain_target"] = target.to_meta() if target else None
    # the section's "config" is the classifier's training; this says what the refit read
    meta["classifier"]["stain_reference_config"] = stain_config_record(cfg)
    write_meta(Path(cfg.out), meta)
    log(f"stain reference over {', '.join(stains.sources)}: threshold {stains.threshold}")
    return stains


def _check_init(cfg: ClsTrainConfig) -> None:
    """Load, before any work, the `--init` weights the run will use: its classifier, into the
    network this run trains, and its segmenter when OUT has none (it will be copied there and cut
    the crops). BundleFolderError names a damaged or mismatched file."""
    from ..bundle import FILES
    from ..nets import ResNetClassifier, build_segmenter
    from .folders import check_init

    meta = check_init(Path(cfg.init), {"classifier": lambda: ResNetClassifier(widths=cfg.widths,
                                                                             blocks=cfg.blocks)})
    if not (Path(cfg.out) / FILES["segmenter"]).is_file():
        check_init(Path(cfg.init), {"segmenter": lambda: build_segmenter(meta)})


def _scores(best: dict, val_report: dict, has_val: bool) -> dict:
    """bundle.json's record of the kept epoch: its val scores; with no val split, a note saying
    so under "val" and the epoch's training loss under "train" (not a val score)."""
    if has_val:
        return {"val": {**best, **val_report}}
    return {"val": {"epoch": best["epoch"], "note": "no val split: the last epoch is kept"},
            "train": {"epoch": best["epoch"], "loss": best["loss"]}}


@releases_out
def take_init_segmenter(cfg: ClsTrainConfig) -> bool:
    """The crops are cut by the segmenter in `cfg.out`. Fine-tuning into a new bundle takes the
    `cfg.init` bundle's segmenter (weights and bundle.json); BundleError if there is none.
    Returns whether it was taken from `cfg.init` now."""
    from ..atomic import atomic_copy
    from ..bundle import BundleError
    from .folders import hold_out, make_out

    out = Path(cfg.out)
    if out.is_dir():
        hold_out(out)  # before anything in it is read: no other training writes it meanwhile
    if not (out / "segmenter.safetensors").is_file() and cfg.init is not None:
        init = Path(cfg.init)
        if (init / "segmenter.safetensors").is_file():
            if not (init / "bundle.json").is_file():
                raise BundleError(f"--init {init} holds no bundle.json: name a whole model bundle "
                                  "folder (such as `shipped`, the models shipped with "
                                  "wbc-batch)")
            make_out(out)
            for name in ("segmenter.safetensors", "bundle.json"):
                if (init / name).is_file() and not (out / name).exists():
                    atomic_copy(init / name, out / name)
            return True
    if not (out / "segmenter.safetensors").is_file():
        if cfg.init is not None:
            raise BundleError(f"neither {out} nor --init {cfg.init} holds a segmenter.safetensors: "
                              "name a whole model bundle folder (such as `shipped`, the models "
                              "shipped with wbc-batch) as --init, or train the segmenter into "
                              "the output folder first")
        raise BundleError(f"{out} holds no segmenter.safetensors: train the segmenter first, "
                          "or pass --init BUNDLE to fine-tune with that bundle's segmenter")
    return False


def _training_crops(train_sets: dict, cfg: ClsTrainConfig, log) -> tuple:
    """All sources' training crops as one (x, y), each source repeated as `source_repeats` says.

    :raises TrainingDataError: the segmenter found no cell in the training images.
    """
    xs, ys = [], []
    repeats = source_repeats({name: len(y) for name, (_, y) in train_sets.items()}, cfg)
    if repeats.get("lab", 1) > 1:
        log(f"lab cells repeated {repeats['lab']} times per epoch (--lab-share {cfg.lab_share})")
    for name, (x, y) in train_sets.items():
        xs += [x] * repeats[name]
        ys += [y] * repeats[name]
    if not sum(len(y) for y in ys):
        raise ds.TrainingDataError("no training crops: the segmenter found no cell in the training images "
                                   f"({', '.join(train_sets) or 'none given'})")
    x_train, y_train = np.concatenate(xs), np.concatenate(ys)
    log(f"training crops: {len(y_train)} (per class {np.bincount(y_train, minlength=5).tolist()})")
    return x_train, y_train


def _fit(model, x_train, y_train, val_sets: dict, cfg: ClsTrainConfig, rng, device: str,
         bf16: bool, log) -> tuple:
    """The epochs: AdamW with a one-cycle schedule on augmented crops, each epoch scored on
    every val source (`selection_score`). -> (best score or None, the kept weights on the CPU,
    the per-epoch metrics); the kept epoch is the best on val, or the last without val."""
    import torch
    import torch.nn.functional as F

    from ..preprocess import normalize_crops
    from .folders import warn_short_fine_tune
    from .schedule import one_cycle

    steps_per_epoch = epoch_steps(len(y_train), cfg)
    if steps_per_epoch * cfg.batch > len(y_train):
        log(f"small training set: {steps_per_epoch} steps per epoch, so that the run takes at least "
            f"{cfg.min_steps} steps")
    total = steps_per_epoch * cfg.epochs
    warn_short_fine_tune(cfg, total, log)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=5e-4)
    sched = one_cycle(opt, cfg.lr, total, warmup=0.1)
    colour = colour_settings(cfg)
    best, best_state, history = -1.0, None, []
    t_start = time.time()
    for epoch in range(1, cfg.epochs + 1):
        order = epoch_order(rng, len(y_train), steps_per_epoch * cfg.batch)
        run_loss = 0.0
        for s in range(steps_per_epoch):
            idx = order[s * cfg.batch:(s + 1) * cfg.batch]
            crops = [augment_crop(x_train[i], rng, cfg.crop_size, colour=colour) for i in idx]
            x = torch.from_numpy(normalize_crops(crops)).to(device)
            y = torch.from_numpy(y_train[idx]).to(device)
            with autocast(device, bf16):
                logits = model(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step(); sched.step()
            run_loss += loss.item()
        metrics = {"epoch": epoch, "loss": run_loss / steps_per_epoch}
        metrics.update(_val_scores(model, val_sets, cfg, bf16))
        history.append(metrics)
        el = time.time() - t_start
        log(f"epoch {epoch}/{cfg.epochs} " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k != "epoch")
            + f" ({el / epoch:.0f}s/epoch, eta {el / epoch * (cfg.epochs - epoch) / 60:.1f} min)")
        if best_state is None or not val_sets or metrics["score"] > best:  # no val: the last epoch
            best = metrics.get("score")
            best_state = state_on_cpu(model)
    return best, best_state, history


def _val_scores(model, val_sets: dict, cfg: ClsTrainConfig, bf16: bool) -> dict:
    """`{"SOURCE/val_acc": accuracy, ..., "score": selection_score}` of the model on each val
    source; {} without val."""
    metrics, hits = {}, {}
    for name, (x, y) in val_sets.items():
        ok = _predict(model, x, cfg.crop_size, bf16=bf16).argmax(1) == y
        metrics[f"{name}/val_acc"] = float(ok.mean())
        hits[name] = ok
    if val_sets:
        metrics["score"] = selection_score(hits)
    return metrics


def _calibrate(model, val_sets: dict, cfg: ClsTrainConfig) -> tuple:
    """-> (softmax temperature fitted on all val crops, {"accuracy", "n"} there); without val,
    the --init bundle's temperature (or 1) and {}."""
    if not val_sets:
        return init_temperature(cfg), {}
    vx = np.concatenate([x for x, _ in val_sets.values()])
    vy = np.concatenate([y for _, y in val_sets.values()])
    logits = _predict(model, vx, cfg.crop_size)
    temperature = fit_temperature(logits, vy)
    return temperature, {"accuracy": float((logits.argmax(1) == vy).mean()), "n": int(len(vy))}


@releases_out
def train_classifier(cfg: ClsTrainConfig, log=print) -> dict:
    """Train (or fine-tune, from `cfg.init`) the classifier on crops cut by the segmenter in
    `cfg.out`; write its weights and bundle.json section there; return that section.

    Before any work: OUT is checked (`folders.check_out`), the `--init` weights are loaded once
    (`_check_init`), and the lab's data are read, saying what they leave out and why.

    :raises folders.BundleFolderError: OUT or INIT cannot be used.
    :raises TrainingDataError: the data leave nothing to train on.
    :raises wbc_batch.bundle.BundleError: OUT holds no segmenter and INIT none to take.
    """
    from ..bundle import WEIGHTS_SHA256
    from ..nets import ResNetClassifier, load_weights, to_device
    from .folders import config_record, start_checks, warn_below_start
    from .mixstyle import mixing_styles
    from .segmenter import _update_meta, save_weights

    stages = start_checks(cfg, "classifier", _check_init, log)
    lab = lab_records(cfg, log)  # once, so that what it leaves out is said once, before any work
    if not cfg.use_public:
        warn_missing_classes(lab, log)
        if not cfg.init and lab:  # before the crops are cut, which takes minutes
            from .folders import SHIPPED

            log(f"WARNING: --no-public without --init: the classifier starts from random weights "
                f"and learns from the lab's {len(lab)} labelled images alone, far fewer than the "
                f"shipped one was trained on. To fine-tune the shipped classifier instead, add "
                f"--init {SHIPPED}")
    cfg = with_crop_geometry(cfg)
    rng, device, bf16 = seeded_start(cfg, log)
    t0 = time.time()
    bundle, session = _crop_cutter(cfg, device, log)
    with crop_pool(cfg, device) as pool:
        train_sets = build_crop_sets(cfg, "train", session, bundle, log, pool=pool, lab=lab)
        warn_few_cells(train_sets.get("lab"), lab, log)
        val_sets = {name: (x, y) for name, (x, y) in build_crop_sets(cfg, "val", session, bundle, log,
                                                                     pool=pool).items() if len(y)}
    if not val_sets:
        log("no val split (lab data alone): keeping the last epoch")
    x_train, y_train = _training_crops(train_sets, cfg, log)
    model = ResNetClassifier(widths=cfg.widths, blocks=cfg.blocks)
    if cfg.init:
        load_weights(model, Path(cfg.init) / "classifier.safetensors")
    to_device(model, device).train()
    if device != "cpu":
        log(f"training on {device}")
    start = None
    if val_sets and cfg.init and lab:  # a lab's fine-tune: did it make val better?
        start = _val_scores(model, val_sets, cfg, bf16)
        log("val of the --init weights, before any training: "
            + " ".join(f"{k}={v:.4f}" for k, v in start.items()))
    with mixing_styles(model, cfg.blocks, cfg.mixstyle, cfg.seed):
        best, best_state, history = _fit(model, x_train, y_train, val_sets, cfg, rng, device,
                                         bf16, log)
    model.load_state_dict(best_state)
    temperature, val_report = _calibrate(model, val_sets, cfg)
    best_metrics = max(history, key=lambda m: m["score"]) if val_sets else history[-1]
    # everything bundle.json records is settled before anything is written
    stains, target = stain_records(train_sets, cfg, log)
    summary = {
        "arch": {"widths": list(cfg.widths), "blocks": list(cfg.blocks), "groups": 8, "num_classes": 5},
        "crop_size": cfg.crop_size, "crop_margin": cfg.crop_margin, "temperature": round(temperature, 4),
        "trained_on": sorted(train_sets), "train_crops": crop_counts(train_sets),
        "lab_images": ({"images": len(lab), "digest": records_digest(lab)} if lab else None),
        **_scores(best_metrics, val_report, bool(val_sets)),
        "epochs": cfg.epochs, "seed": cfg.seed, "precision": "bf16" if bf16 else "fp32",
        "device": str(device),  # the one used: config.device is the one asked for ("cuda")
        "train_seconds": round(time.time() - t0, 1),
        "config": config_record(cfg),
        "stain_reference": stains,
        "stain_target": target,
    }
    if start is not None:
        summary["val_at_start"] = start
    if cfg.init:  # where it started; trained_on names every source the weights learned from,
        summary["stages"] = stages  # the --init classifier's too (as the segmenter's does)
        summary["trained_on"] = sorted(set(summary["trained_on"])
                                       | set(stages[-1].get("trained_on") or []))
    summary[WEIGHTS_SHA256] = save_weights(best_state, Path(cfg.out) / "classifier.safetensors")
    _update_meta(Path(cfg.out), "classifier", summary)  # straight after the weights it describes
    chosen = f"val score {best:.4f}" if val_sets else "the last; no val split"
    fitted = "fitted on val" if val_sets else ("the --init bundle's" if cfg.init else "none fitted")
    log(f"kept epoch {best_metrics['epoch']} ({chosen}); temperature {temperature:.3f} ({fitted}); "
        f"{summary['train_seconds']:.0f}s in all")
    if val_sets:
        warn_below_start(best, start and start["score"], f"epoch {best_metrics['epoch']}", log)
    return summary
