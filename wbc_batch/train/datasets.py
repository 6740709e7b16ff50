"""Readers for the training data, in the layouts they are published in, plus simple lab layouts.

Every reader returns plain records; images are read lazily by path. The split files in
`<data>/splits/` fix train/val/test; test rows are never returned for training or selection.
A reader's `splits` names another folder of split files in the same format (`wbc-image-
dataset.csv`, `pbc-wbc.csv`, `bccd.csv`, and optionally `txl-pbc.csv` with columns image,split,
the image relative to TXL-PBC's `images` folder, which otherwise keeps its splits in folders):
`scripts/split_overlap_check.py --write-clean` writes one without the train images that copy a
val or test image.

Lab layouts (for fine-tuning on a lab's own scanner):
- segmentation: a folder of images (in sub-folders too) and a `masks/` folder in it holding, for
  `x.jpg`, the mask `masks/x.png` (or another image extension, any case) or `masks/x.jpg.png`
  (what `run --save-masks` writes), and for `s1/x.jpg` `masks/s1/x.png`: 0 background, 128
  cytoplasm, 255 nucleus, or a 0/1/2 label map; a 0/1 or 0/255 whole-cell mask teaches "cell
  here" without telling nucleus from cytoplasm (`metrics.standard_mask`); a mask of cell ids
  (1..N, one value per cell) is left out, named (`metrics.read_mask`). Read by
  `read_mask_folder`;
- classification: one sub-folder per class (`neutrophil/`, `Lymphocytes/`, `EO/`, `Lymphs/`: any
  name `truth.normalise_class` knows), read by `read_class_folders`, or a CSV with columns image,class
  (paths relative to the CSV; one single-cell image per row; with a `split` column, only rows
  whose split is train or empty are trained on: val and test rows are left out, so that the lab
  can measure the result on cells it never trained on; any other split value is refused), read
  by `read_class_csv`; or the images of a folder with the ground truth `evaluate` reads (boxed
  fields with a class per box, or single cells with a class), read by `read_lab_truth`.
The lab readers say through `log` what they left out and why, and raise TrainingDataError when a
source named for training holds nothing usable, so that a lab never trains on public data alone
believing its own was used. Images are found as `run` finds them: hidden files and folders (a
Mac's `._x.jpg`, a NAS's `.@__thumb/`) are skipped.
"""

from __future__ import annotations

import csv
import glob
import re
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .. import CLASSES
from ..errors import WbcBatchError

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")


class TrainingDataError(WbcBatchError, ValueError):
    """The data named for training leave nothing to train on; the message says what was found."""


@dataclass
class MaskRecord:
    """An image with a 0/128/255 mask (nucleus and cytoplasm)."""

    image: Path
    mask: Path
    cls: str | None = None
    source: str = ""


@dataclass
class BoxRecord:
    """A field image with WBC boxes (x, y, w, h) in pixels, optionally one class per box."""

    image: Path
    boxes: list = field(default_factory=list)
    classes: list = field(default_factory=list)
    source: str = ""
    #: a lab's field (`read_lab_truth`): its `truth.ImageTruth`, whose boxes are fitted to the
    #: image once it is read (`metrics.fitted_boxes`: YOLO's fractions, VOC's `<size>`), in
    #: place of `boxes` and `classes`
    truth: object = None


@dataclass
class ClassRecord:
    """A single-cell image with its class."""

    image: Path
    cls: str
    source: str = ""


#: the split files of the public sets (TXL-PBC keeps its splits in folders; a `txl-pbc.csv` may narrow them)
SPLIT_FILES = ("wbc-image-dataset.csv", "pbc-wbc.csv", "bccd.csv")


def split_file(data: Path, splits: Path | None, name: str) -> Path:
    """The split file `name` in `splits`, by default in `<data>/splits`."""
    return Path(splits if splits is not None else Path(data) / "splits") / name


def _split_rows(path: Path, split: str):
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row["split"] == split:
                yield row


def wbc_image_dataset(data: Path, split: str, dataset: str | None = None,
                      splits: Path | None = None) -> list:
    """WBC Image Dataset rows of `split` ("1", "2" or None for both)."""
    root = data / "wbc-image-dataset"
    out = []
    for row in _split_rows(split_file(data, splits, "wbc-image-dataset.csv"), split):
        if dataset and row["dataset"] != dataset:
            continue
        out.append(MaskRecord(root / row["image"], root / row["mask"], row["class"] or None,
                              f"wbc-image-dataset-{row['dataset']}"))
    return out


def pbc(data: Path, split: str, splits: Path | None = None) -> list:
    root = data / "pbc-wbc"
    return [ClassRecord(root / r["image"], r["class"], "pbc")
            for r in _split_rows(split_file(data, splits, "pbc-wbc.csv"), split)]


def read_voc_boxes(xml_path: Path, name: str = "WBC") -> list:
    """The (x, y, w, h) boxes, in whole pixels, of the objects named exactly `name` in a VOC XML:
    for the public BCCD, whose WBCs are named "WBC". A lab's VOC files are read as truth by
    `plugins/truth_voc.py`, which also takes other names for WBCs and subtype names.

    :raises TrainingDataError: the file is missing or is no XML (a data folder copied in part)."""
    try:
        root = ET.parse(xml_path).getroot()
    except (OSError, ET.ParseError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise TrainingDataError(f"cannot read the VOC annotation {xml_path} ({why}): is the data "
                                "folder complete?") from None
    boxes = []
    for obj in root.findall("object"):
        if obj.findtext("name", "").strip() != name:
            continue
        b = obj.find("bndbox")
        x1, y1, x2, y2 = (int(float(b.findtext(k))) for k in ("xmin", "ymin", "xmax", "ymax"))
        if x2 > x1 and y2 > y1:
            boxes.append((x1, y1, x2 - x1, y2 - y1))
    return boxes


def bccd(data: Path, split: str, splits: Path | None = None) -> list:
    """BCCD fields of `split` with WBC boxes; `classes` holds the image's subtype label(s)."""
    root = data / "bccd"
    out = []
    for row in _split_rows(split_file(data, splits, "bccd.csv"), split):
        boxes = read_voc_boxes(root / row["annotation"])
        labels = [s.strip().lower() for s in (row.get("labels") or "").split(",") if s.strip()]
        # the labels are not tied to boxes: only a single subtype for all boxes is unambiguous
        # (evaluation, `truth_voc`, scores a subtype on a lone box only: see there)
        same = len(labels) == len(boxes) and len(set(labels)) == 1
        classes = labels if same else [None] * len(boxes)
        out.append(BoxRecord(root / row["image"], boxes, classes, "bccd"))
    return out


def txl_pbc(data: Path, split: str, splits: Path | None = None) -> list:
    """TXL-PBC images of `split` (its own folders) with WBC boxes (YOLO class 0); where `splits`
    holds a `txl-pbc.csv`, only the images it gives `split` (each stays in its own folder).
    An image that cannot be read is left out here (its size places the YOLO boxes)."""
    root = data / "txl-pbc" / "TXL_PBC"
    chosen = None
    if splits is not None and split_file(data, splits, "txl-pbc.csv").is_file():
        chosen = {r["image"] for r in _split_rows(split_file(data, splits, "txl-pbc.csv"), split)}
    out = []
    for label in sorted((root / "labels" / split).glob("*.txt")):
        cands = [p for p in glob.glob(str(root / "images" / split / (label.stem + ".*")))
                 if p.lower().endswith(IMAGE_EXTS)]
        if not cands:
            continue
        img = Path(cands[0])
        if chosen is not None and f"{split}/{img.name}" not in chosen:
            continue
        try:
            w, h = stored_size(img)
        except TrainingDataError:
            continue
        boxes = []
        for line in label.read_text().split("\n"):
            parts = line.split()
            if len(parts) >= 5 and parts[0] == "0":
                cx, cy, bw, bh = (float(v) for v in parts[1:5])
                boxes.append((int((cx - bw / 2) * w), int((cy - bh / 2) * h), int(bw * w), int(bh * h)))
        out.append(BoxRecord(img, boxes, [None] * len(boxes), "txl-pbc"))
    return out


def stored_size(path: Path) -> tuple:
    """(width, height) of an image as stored (no EXIF turn, as box files draw on it), from its
    header where that says, else by decoding it. A half-size decode had doubled an odd side
    (575 px read as 576, as TXL-PBC has) and scaled their boxes with it.

    :raises TrainingDataError: the file cannot be read or is no image, naming it and why.
    """
    import cv2
    import numpy as np

    from ..imageio import ImageReadError, header_size, read_bytes

    try:
        data = read_bytes(path)
    except ImageReadError as exc:
        raise unreadable_image(path, exc) from None
    size = header_size(data)
    if size is not None:
        return size
    if not data:
        raise unreadable_image(path, "empty file")
    try:
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error:
        img = None
    if img is None:
        raise unreadable_image(path, "not an image OpenCV decodes")
    return img.shape[1], img.shape[0]


def unreadable_image(path: Path, why) -> TrainingDataError:
    """The error for a training image that cannot be read, naming it and `why`."""
    return TrainingDataError(f"cannot read the image {path} ({why}): is the data folder complete?")


def read_lab_truth(images: Path, truth_path: Path, readers, log=None) -> list:
    """A lab's labelled images given as `evaluate` takes them: the images under `images`
    (found as `run` finds them) and the ground truth at `truth_path` in any layout a truth
    reader reads (`readers`: `{name: reader}`; VOC XML, YOLO, a CSV of classes or of boxes and
    classes, one folder per class). -> ClassRecords for single-cell images with a class, and
    BoxRecords (with `truth`) for fields whose boxes have a class. What is left out (images
    without truth, truth without an image, truth with no class: masks, boxes without a subtype)
    is said through `log`.

    :raises TrainingDataError: the truth cannot be read, a CSV of it has a split column (which
        the truth readers do not honour: its val rows would be trained on), or it leaves no
        labelled image.
    """
    from ..truth import TruthError, TruthNotRecognised, load_truth

    images, truth_path = Path(images), Path(truth_path)
    where = f"--lab-truth {images} {truth_path}"
    _refuse_split_column(truth_path, where)
    try:
        truth = load_truth(truth_path, readers, input_dir=images, unknown="left out of training")
    except TruthNotRecognised as exc:  # training has no --truth-format to name
        raise TrainingDataError(f"{where}: {str(exc).replace('; name one with --truth-format', '')}") from None
    except TruthError as exc:
        raise TrainingDataError(f"{where}: {exc}") from None
    if truth.reader == "csv" and truth_path.is_dir():  # any CSV there may be the one read
        for table in sorted(truth_path.glob("*")):
            _refuse_split_column(table, where, folder=True)
    masks = {p.resolve() for p in (t.mask_path for t in truth.values()) if p is not None}
    found, own_masks = {}, 0
    for p in _images_under(images, log):
        if p.resolve() in masks:  # the truth's own masks beside the images: no smears
            own_masks += 1
        else:
            found[p.relative_to(images).as_posix()] = p
    paired, ambiguous = truth.resolve(found)
    out, unlabelled, classless = [], [], Counter()
    for name, key in sorted(paired.items()):
        t = truth[key]
        if t.has_boxes and any(c in CLASSES for c in t.box_classes):
            out.append(BoxRecord(found[name], source="lab", truth=t))
            classless.update("no subtype" if c is None else "a class the models do not know"
                             for c in t.box_classes if c not in CLASSES)
        elif not t.has_boxes and t.cls in CLASSES:
            out.append(ClassRecord(found[name], t.cls, "lab"))
        else:
            unlabelled.append(name)
    several = {name for names in ambiguous.values() for name in names}
    without = sorted(set(found) - set(paired) - several)
    unused = truth.unmatched(paired, ambiguous)
    if log:
        for n, what in ((own_masks, f"files under {images} that are the truth's own masks, not "
                                    "trained on"),
                        (len(unlabelled), f"images whose truth gives no cell a class (a mask, or "
                                          f"boxes without a subtype) left out: {listing(unlabelled)}"),
                        (sum(classless.values()), "boxes in the labelled fields without a class to "
                                                  "train on, left out (" + ", ".join(
                                                      f"{v} {k}" for k, v in sorted(classless.items())) + ")"),
                        (len(without), f"images without truth left out: {listing(without)}"),
                        (len(unused), f"truth entries without an image under {images} left "
                                      f"out: {listing(unused)}"),
                        (len(ambiguous), "truth entries that several images fit, left out: "
                                         + listing(f"{k} ({', '.join(v)})" for k, v in ambiguous.items()))):
            if n:
                log(f"{where}: {n} {what}")
    if not out:
        raise TrainingDataError(
            f"{where}: no image with a labelled cell to train on ({len(found)} images, "
            f"{len(truth)} truth entries, {len(paired)} paired; a class per single-cell image "
            "or per box is needed)")
    return out


def _refuse_split_column(table: Path, where: str, folder: bool = False) -> None:
    """Raise TrainingDataError where `table` is a CSV (or TSV) with a split column: the truth
    readers do not honour one, so its val and test rows would be trained on. `folder`: the
    table lies in a truth folder, whose CSV reader chooses among its tables (it may not be the
    one read: it is refused all the same, and the message says how to go on)."""
    from ..truth import start_table, table_encoding

    if not (table.is_file() and table.suffix.lower() in (".csv", ".tsv", ".txt")):
        return
    try:
        with open(table, newline="", encoding=table_encoding(table)) as f:
            delimiter, _ = start_table(f)
            header = next(csv.reader(f, delimiter=delimiter), [])
    except (OSError, UnicodeError, csv.Error):
        return  # the truth reader says what is wrong with it
    if "split" in (h.strip().lower() for h in header):
        raise TrainingDataError(
            f"{where}: {table.name} has a split column, which --lab-truth does not read (its val "
            "and test rows would be trained on); give its train rows alone, or a CSV of "
            "single-cell images as --lab-csv, which reads it"
            + (f"; if it is not the truth, move it out of {table.parent} or name the truth CSV "
               "itself" if folder else ""))


def _images_under(folder: Path, log=None, exclude: Path | None = None) -> list:
    """Every image under `folder` but `exclude`'s, as `run` finds them
    (`discovery.discover_images`): hidden files and folders (`._x.jpg`, a NAS's `.@__thumb/`)
    are skipped, linked folders followed."""
    from ..discovery import discover_images

    return discover_images(folder, exclude=exclude, warn=log)


def listing(names, limit: int = 5) -> str:
    """The first `limit` of `names`, comma-separated, and how many more there are."""
    names = list(names)
    shown = ", ".join(str(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def image_identity(path) -> str:
    """An image's key for matching a CSV's val and test rows against the images trained on:
    its resolved path in Unicode NFC, without letter case (a CSV written on Windows names
    `CELLS\\Basophil\\cell_04.PNG` for `CELLS/basophil/cell_04.png`, as `evaluate` matches it).
    Two files whose names differ only in case share a key: a val row then holds back both,
    never neither."""
    import unicodedata

    return unicodedata.normalize("NFC", str(Path(path).resolve())).casefold()


def file_identity(path):
    """One file, however its path is spelled: (device, inode), as `os.path.samefile` compares
    files, so that `a.png` and `A.png` are two images on Linux and one on a case-insensitive
    disk (macOS, an SMB share), and a link is its target; the resolved path where it cannot be
    read."""
    import os

    try:
        st = os.stat(path)
    except OSError:
        return Path(path).resolve()
    if not st.st_ino:  # FAT, exFAT and some network drives give none: every file would be one
        return Path(path).resolve()
    return (st.st_dev, st.st_ino)


def on_disk(base: Path, name: str, listings: dict | None = None):
    """The file `name` (relative to `base`, `\\` or `/` between folders) names, found as
    written or, failing that, with each part matched without letter case or Unicode form
    (`cell_04.PNG` for `cell_04.png`, a decomposed `ü`) where exactly one entry matches; None
    when there is no such file. `listings` (a dict the caller keeps across calls) holds each
    folder's entries by folded name, so that a CSV of 20,000 such rows lists each folder once."""
    import unicodedata

    def fold(text: str) -> str:
        return unicodedata.normalize("NFC", text).casefold()

    def entries(folder: Path) -> dict:
        if listings is not None and folder in listings:
            return listings[folder]
        by_name = {}
        for entry in folder.iterdir():
            by_name.setdefault(fold(entry.name), []).append(entry)
        if listings is not None:
            listings[folder] = by_name
        return by_name

    written = Path(name.replace("\\", "/"))
    path = base / written
    if path.is_file():
        return path
    here = Path(path.anchor) if written.is_absolute() else Path(base)
    for part in path.parts[1:] if written.is_absolute() else written.parts:
        if part in (".", ".."):
            here = here / part
            continue
        if (here / part).exists():
            here = here / part
            continue
        try:
            hits = entries(here).get(fold(part), [])
        except OSError:
            return None
        if len(hits) != 1:
            return None
        here = hits[0]
    return here if here.is_file() else None


def _masks_dir(folder: Path) -> Path:
    """`folder/masks`, or the sub-folder named so in another case (`Masks`)."""
    exact = folder / "masks"
    if exact.is_dir() or not folder.is_dir():
        return exact
    return next((d for d in sorted(folder.iterdir()) if d.is_dir() and d.name.lower() == "masks"),
                exact)


def read_mask_folder(folder: Path, log=None) -> list:
    """A lab's segmentation data: the images under `folder`, found as `run` finds them
    (sub-folders too, hidden files and a run's drawn results skipped), each with its mask in
    `folder/masks/` under the same relative name, as `run --save-masks` writes them (module
    docstring).

    :raises TrainingDataError: no image in `folder` has a mask.
    """
    from ..truth import mask_for, mask_index

    folder = Path(folder)
    mask_dir = _masks_dir(folder)
    masks = mask_index(mask_dir) if mask_dir.is_dir() else {}  # as `--truth` finds masks
    out, missing, misplaced = [], [], []
    for p in _images_under(folder, log, exclude=mask_dir):
        name = p.relative_to(folder).as_posix()
        if any(part.lower() == "masks" for part in Path(name).parts[:-1]):
            misplaced.append(name)  # s1/masks/x.png: a mask, not an image
            continue
        m = mask_for(masks, name)
        if m is not None:
            out.append(MaskRecord(p, m, None, "lab"))
        else:
            missing.append(name)
    if misplaced and log:
        log(f"--lab-masks {folder}: {len(misplaced)} files in sub-folders named masks are read as "
            f"neither images nor masks: {listing(misplaced)} (the masks of s1/x.jpg go in "
            f"{mask_dir}/s1/)")
    if not out:
        raise TrainingDataError(
            f"--lab-masks {folder}: no image there has a mask in {mask_dir} "
            f"({len(missing)} images; for x.jpg the mask is masks/x.png or masks/x.jpg.png, for "
            "s1/x.jpg masks/s1/x.png)")
    if missing and log:
        log(f"--lab-masks {folder}: {len(missing)} images without a mask left out: "
            f"{listing(missing)}")
    return out


def read_class_folders(folder: Path, log=None) -> list:
    """A lab's classification data: one sub-folder per class (a name `truth.normalise_class`
    knows: "Neutrophils", "NEU", "Lymphs"), its images found as `run` finds them
    (`_images_under`: hidden files and folders skipped).

    :raises TrainingDataError: no sub-folder names a class or none holds an image.
    """
    from ..discovery import is_skipped_folder
    from ..truth import named_with_guess, normalise_class

    folder = Path(folder)
    out, unknown, read_as = [], [], []
    for d in sorted(p for p in folder.iterdir() if p.is_dir() and not is_skipped_folder(p.name)):
        cls = normalise_class(d.name)
        if cls not in CLASSES:
            unknown.append(named_with_guess(d.name))
            continue
        if len(re.findall(r"[^\W_]+", d.name)) > 1:  # "Atypical_lymphocytes": said, as a lab
            # may not mean it (words split as `normalise_class` splits them)
            read_as.append(f"{d.name} as {cls}")
        out += [ClassRecord(p, cls, "lab") for p in _images_under(d, log)]
    if read_as and log:
        log(f"--lab-classes {folder}: folders named in several words read as one class: "
            f"{listing(read_as)} (a cell of no class, as a blast, belongs in none)")
    if unknown and log:
        log(f"--lab-classes {folder}: folders that name no class left out: {listing(unknown)} "
            f"(classes: {', '.join(CLASSES)})")
    if not out:
        raise TrainingDataError(
            f"--lab-classes {folder}: no images in class folders (one sub-folder per class, named "
            f"{', '.join(CLASSES)}; found {listing(unknown) if unknown else 'none'})"
            + _one_level_down(folder, is_skipped_folder, normalise_class))
    return out


def _one_level_down(folder: Path, is_skipped_folder, normalise_class) -> str:
    """A hint for class folders one level too deep (`cells/batch1/neutrophil/`): the folders
    under `folder` whose own sub-folders name classes, as sentences to add; "" for none."""
    deeper = []
    for d in sorted(p for p in folder.iterdir() if p.is_dir() and not is_skipped_folder(p.name)):
        try:
            if any(c.is_dir() and normalise_class(c.name) in CLASSES for c in d.iterdir()):
                deeper.append(d)
        except OSError:
            continue
    if not deeper:
        return ""
    return (f". The class folders are one level down, in {listing(str(d) for d in deeper)}: "
            f"give {'that folder' if len(deeper) == 1 else 'each of them'} as --lab-classes")


_BOX_COLUMNS = {"x", "y", "width", "height"}
_CORNER_COLUMNS = {"xmin", "ymin", "xmax", "ymax"}  # as the truth CSV reads boxes too
SPLITS = ("", "train", "val", "test")     # the split values of a lab CSV, stripped and lowered


def read_class_csv(path: Path, log=None, held_out: dict | None = None,
                   beside_others: bool = False) -> list:
    """A lab's classification data as a CSV with columns image,class (paths relative to it; any
    case, BOM or extra columns). Only rows whose `split` (if there is that column; any case,
    spaces around) is train or empty are read; val and test rows are left out and counted
    through `log`. `held_out`, when given, gets `{image_identity(image): "val" or "test"}` for
    those rows, so that a caller can keep them out of its other sources too. An image is found
    as written or without letter case (`on_disk`), as `evaluate` finds the same CSV's images.
    `beside_others`: other lab sources are read too, so a CSV of val and test rows alone (which
    of the class folders' cells to keep back) is no error.

    :raises TrainingDataError: the file is not such a CSV, a split is none of train, val, test
        or empty (so that a misspelt split does not leave its rows out unsaid), an image is
        given two classes or listed both to train on and in val or test, or no row is left to
        train on (the message says which rows were left out and why), unless `beside_others`
        and it holds val or test rows.
    """
    path = Path(path)
    from ..truth import start_table, table_encoding

    try:
        with open(path, newline="", encoding=table_encoding(path)) as f:  # as the truth reader
            delimiter, _ = start_table(f)
            rows = list(csv.reader(f, delimiter=delimiter, skipinitialspace=True))
    except UnicodeError:
        raise TrainingDataError(f"--lab-csv {path}: not UTF-8 text; save it as UTF-8 CSV") from None
    except csv.Error as exc:
        raise TrainingDataError(f"--lab-csv {path}: not a readable CSV ({exc})") from None
    header = [h.strip().lower() for h in rows[0]] if rows else []
    if "image" not in header or "class" not in header:
        raise TrainingDataError(f"--lab-csv {path}: needs the columns image and class "
                                f"(separated by commas or semicolons, a header row); found {header or 'nothing'}")
    if _BOX_COLUMNS <= set(header) or _CORNER_COLUMNS <= set(header):
        raise TrainingDataError(
            f"--lab-csv {path}: has box columns ({', '.join(sorted(set(header) & (_BOX_COLUMNS | _CORNER_COLUMNS)))}), so its rows are cells in "
            "fields; --lab-csv takes one single-cell image per row: give a CSV of fields as "
            f"--lab-truth IMAGES {path} (the images' folder and this CSV, as evaluate takes them), "
            "without a split column")
    from ..truth import named_with_guess, normalise_class

    col = {name: header.index(name) for name in ("image", "class", "split") if name in header}
    out, unknown, absent, other_splits, bad_splits = [], {}, [], {}, {}
    classes_of, repeated = {}, 0  # image -> the classes its rows give; rows given twice
    found_at = {}  # image -> its path as found (`on_disk`)
    held = {}  # image -> the val or test split a row gives it

    def cell(row, name):
        i = col.get(name)
        return row[i].strip() if i is not None and i < len(row) else ""

    held_absent = []  # val and test rows whose image is not there
    listings = {}  # `on_disk`'s folder listings, each made once
    for row in rows[1:]:
        if not any(v.strip() for v in row):
            continue
        split = cell(row, "split").lower()
        if split not in SPLITS:
            bad_splits[split] = bad_splits.get(split, 0) + 1
            continue
        if split not in ("", "train"):
            other_splits[split] = other_splits.get(split, 0) + 1
            if cell(row, "image"):
                found = on_disk(path.parent, cell(row, "image"), listings)
                if found is None:
                    held_absent.append(f"{cell(row, 'image')} ({split})")
                    found = path.parent / cell(row, "image").replace("\\", "/")
                held[image_identity(found)] = split
            continue
        cls = normalise_class(cell(row, "class"))
        if cls not in CLASSES:
            label = named_with_guess(cls) if cls else "(empty)"
            unknown[label] = unknown.get(label, 0) + 1
            continue
        image = on_disk(path.parent, cell(row, "image"), listings) if cell(row, "image") else None
        if image is None:
            absent.append(cell(row, "image") or "(empty)")
            continue
        # two files whose names differ in case alone are two images to train on; only a val
        # or test row is matched without case (`image_identity`), to hold back never too little
        key = file_identity(image)
        found_at.setdefault(key, image)
        given = classes_of.setdefault(key, {})
        if cls in given:
            repeated += 1
            continue
        given[cls] = cell(row, "image")
        out.append(ClassRecord(image, cls, "lab"))
    conflicts = [f"{next(iter(named.values()))} ({', '.join(named)})"
                 for named in classes_of.values() if len(named) > 1]
    if conflicts:  # merged annotators' sheets: training on both would teach neither
        raise TrainingDataError(
            f"--lab-csv {path}: {len(conflicts)} image(s) given more than one class: "
            + listing(conflicts) + "; keep one class per image")
    both = [f"{next(iter(classes_of[key].values()))} ({held[image_identity(found)]})"
            for key, found in found_at.items() if image_identity(found) in held]
    if both:  # trained on, a val or test row would measure the cells the model learned
        raise TrainingDataError(
            f"--lab-csv {path}: {len(both)} image(s) listed to train on and in a val or test "
            f"row: {listing(both)}; keep each image in one split")
    if held_out is not None:
        held_out.update(held)
    if bad_splits:
        raise TrainingDataError(
            f"--lab-csv {path}: split values that are none of train, val, test or empty: "
            + listing(f"{k!r} ({v} rows)" for k, v in sorted(bad_splits.items())))
    reasons = []
    if other_splits:
        reasons.append(", ".join(f"{n} rows of the {split} split" for split, n in sorted(other_splits.items()))
                       + " left out (trained on: the rows whose split is train or empty)")
    if unknown:
        reasons.append(f"rows with a class that is none of {', '.join(CLASSES)} left out: "
                       + listing(f"{k} ({v})" for k, v in sorted(unknown.items())))
    if absent:
        reasons.append(f"{len(absent)} rows whose image is not there left out (paths relative "
                       f"to {path.parent}; in another letter case, one file must fit): "
                       f"{listing(absent)}")
    if held_absent:  # a typo in a val row: the cell it meant may be trained on
        reasons.append(f"{len(held_absent)} val or test rows name an image that is not there "
                       f"(paths relative to {path.parent}): {listing(held_absent)}")
    if repeated:
        reasons.append(f"{repeated} rows repeating an image and its class left out (each image "
                       "is trained on once)")
    # the reasons in the message itself: a caller may read without `log`
    if not out and not (beside_others and held):
        raise TrainingDataError(f"--lab-csv {path}: no row to train on"
                                + (": " + "; ".join(reasons) if reasons else " (no rows)"))
    for reason in reasons if log else ():
        log(f"--lab-csv {path}: {reason}")
    return out
