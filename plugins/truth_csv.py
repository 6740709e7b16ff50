"""Generic truth reader for a lab's own images: a CSV, one folder per class, and/or a masks folder.

Accepted layouts (`--truth` names the CSV file or the folder):

- A CSV with a column `image` (the image's path relative to the run's input folder, as in
  cells.csv; where there is none, in a CSV `--truth` names itself or one named truth.csv or
  labels.csv, the first of `filename`, `file_name`, `image_name`, `image_file` beside a class,
  box or mask column, as BCCD's own CSV export has it, with a warning naming it; in ImageJ's
  results table, its `Label`, `title:ROI name`, gives the image and, where the ROI is named for
  a cell, the class) and any of:
  `class` (where there is none, the first of `label`, `cell_type`, `celltype`, `category`,
  `type` is taken for it, with a warning naming it); `x, y, width,
  height` or `xmin, ymin, xmax, ymax` (or another spelling of `BOX_FORMS`: `left, top, width,
  height`, `x1, y1, x2, y2`, `x_min ...`, ImageJ's `bx, by, width, height`; columns that place
  a box but make none whole, a centre among them, are refused) (a WBC box in pixels, one row
  per cell, several rows per image; `class` is then the cell's class; where the box columns
  exist, a row with only `image` filled in says the image has no WBC, so each cell found there
  is a false one; a class `WBC` or `leukocyte` is a WBC whose type is not given, rows of red
  cells, platelets and artefacts (`RBC`, `Platelets`, `NRBC`, ...) are left out, with a warning,
  and a row written twice counts once); `mask`
  (a mask file, relative to the CSV's folder, or, where no such file is there, to the run's
  input folder). Other columns (e.g.
  `split`) are ignored, so a split file such as `splits/pbc-wbc.csv` (image,class,split) or
  `splits/wbc-image-dataset.csv` (image,mask,...,class,split; its masks named like its images)
  is itself a truth file. Errors give the file's line, as a text editor counts them. Comma- or
  tab-separated (Excel's "Text (Tab delimited)"), UTF-8 or UTF-16 with its byte-order mark
  (Excel's "Unicode text"), named .csv, or .txt or .tsv as Excel names them; a file separated by
  semicolons is refused with a message. `width` and `height` without `x` and `y` are taken for
  the image's size, not a box.
- A folder with one subfolder per class (`neutrophil/`, `lymphocyte/`, ...; PBC style): every
  image in it is a single-cell image of that class.
- A `masks/` folder beside the CSV or inside the truth folder: `masks/<image>.png` or
  `masks/<image without extension>.png`, in the WBC Image Dataset convention (0, 128 cytoplasm,
  255 nucleus; a 0/1/2 label map is read too, and a 0/1 or 0/255 mask is a whole-cell mask). `wbc-batch run --save-masks` writes exactly this
  layout, so one run's masks can be another's truth.
- A folder holding a CSV named `truth.csv` or `labels.csv` (or its only CSV), with or without masks.
"""

from __future__ import annotations

import csv
import math
import re
from collections import Counter, defaultdict
from pathlib import Path

from wbc_batch import CLASSES
from wbc_batch.hookspecs import hookimpl
from wbc_batch.truth import (IMAGE_EXTENSIONS, ImageTruth, TruthError, image_key, is_doubted_wbc,
                             is_not_wbc, is_other_wbc, iter_files, log, mask_for, mask_index,
                             names_any_wbc, normalise_class, start_table, table_encoding)

CSV_NAMES = ("truth.csv", "labels.csv")
BOX_COLUMNS = ("x", "y", "width", "height")
#: a box given by its corners (as VOC and the Kaggle BCCD export write it), read as x, y, w, h
CORNER_COLUMNS = ("xmin", "ymin", "xmax", "ymax")
#: every way of writing a box that is read, tried in this order: (columns, whether the last two
#: are the far corner), a space or hyphen in a column's name taken for `_`. ImageJ's results
#: table comes first: its `x, y` are the centroid, its `bx, by` the box's corner
BOX_FORMS = ((("bx", "by", "width", "height"), False), (BOX_COLUMNS, False),
             (("x", "y", "w", "h"), False), (("left", "top", "width", "height"), False),
             (("bbox_x", "bbox_y", "bbox_width", "bbox_height"), False),
             (CORNER_COLUMNS, True), (("x_min", "y_min", "x_max", "y_max"), True),
             (("x1", "y1", "x2", "y2"), True), (("left", "top", "right", "bottom"), True))
#: columns that place a box's centre, which is not read: a file with them and no form above is
#: refused, where its boxes would have been left out without a word
CENTRE_COLUMNS = ("cx", "cy", "xc", "yc", "x_center", "y_center", "center_x", "center_y",
                  "x_centre", "y_centre", "centre_x", "centre_y")
#: other names of the `class` column, taken in this order where there is no `class`
CLASS_COLUMNS = ("label", "cell_type", "celltype", "category", "type")
#: other names of the `image` column (BCCD's own CSV export names it `filename`), taken in this
#: order where there is no `image`, in a CSV that `--truth` names itself or that is named as
#: truth (`CSV_NAMES`), beside a class, box or mask column (another CSV of a folder needs
#: `image`: an inventory of its files is no truth)
IMAGE_COLUMNS = ("filename", "file_name", "image_name", "image_file")
#: ImageJ's results table (Analyze > Measure, with "Display label" and "Bounding rectangle" set)
#: has no image column: its `Label` names the image and the ROI, `title:ROI name` (and `:slice`
#: in a stack), beside the box `BX, BY, Width, Height`
IMAGEJ_COLUMNS = ("label", "bx", "by")
#: the name ImageJ's ROI Manager gives a ROI that was not named: its place, `yyyy-xxxx` (more
#: digits in images of 10,000 px and more), with the slice first in a stack, and `-1`, `-2`
#: after a name it had given already
DEFAULT_ROI_NAME = re.compile(r"\d{4,6}-\d{4,6}(-\d{4,6})?(-\d+)?")
#: a number after a ROI's name, as a lab numbers its cells (`neutrophil-1`, `Lymph 2`) and as
#: ImageJ makes a repeated name unique (`-1`, `-2`)
ROI_NUMBER = re.compile(r"[\s_-]*\(?\d+\)?$")
#: the Labels of the rows Analyze > Summarize adds below the measurements
IMAGEJ_SUMMARY_ROWS = frozenset({"mean", "sd", "min", "max"})


def _csv_header(path: Path) -> list:
    """The lower-cased column names, for recognising a truth CSV. A file that is not UTF-8 is
    still recognised (its header read as Latin-1), so that reading it says what is wrong."""
    for encoding in (table_encoding(path), "latin-1"):
        try:
            with open(path, newline="", encoding=encoding) as fh:
                delimiter, _ = start_table(fh)  # the header is the line after a `sep=;`
                first = fh.readline()
        except UnicodeError:
            continue
        except OSError:
            return []
        try:
            row = next(csv.reader([first], delimiter=delimiter, skipinitialspace=True), [])
        except csv.Error:
            return []
        return [c.strip().lower() for c in row]
    return []


def _is_truth_csv(path: Path, named: bool = False) -> bool:
    """A CSV whose header names the column `image` (comma, tab or semicolon separated), or,
    where `--truth` names the file itself (`named`), another name of it (`_image_column`)."""
    header = _csv_header(path)
    return _image_column(header, named) is not None


def _image_column(columns: list, named: bool = True):
    """The column holding the image names: `image`, or failing that, in a CSV `--truth` names
    (`named`), the first of `IMAGE_COLUMNS` where a class, box or mask column says the file
    is truth; None when none."""
    if "image" in columns:
        return "image"
    if not named:
        return None
    keyed = _keyed(columns)
    other = [keyed[n] for n in IMAGE_COLUMNS if n in keyed]
    truthy = "class" in keyed or "mask" in keyed or any(n in keyed for n in CLASS_COLUMNS) or any(
        all(n in keyed for n in names) for names, _ in BOX_FORMS)
    if other:
        return other[0] if truthy else None
    return keyed["label"] if _is_imagej(columns) else None


def _is_imagej(columns: list) -> bool:
    """Whether a CSV without an image column is ImageJ's results table (`IMAGEJ_COLUMNS`)."""
    keyed = _keyed(columns)
    return ("image" not in keyed and not any(n in keyed for n in IMAGE_COLUMNS)
            and all(n in keyed for n in IMAGEJ_COLUMNS))


def _names_a_cell(name: str) -> bool:
    """Whether `name` (a ROI's) names a kind of cell that truth scores or leaves out: one of the
    five, a WBC, another white cell, a doubted one, a red cell or a platelet."""
    return bool(name) and (normalise_class(name) in CLASSES or names_any_wbc(name)
                           or is_other_wbc(name) or is_doubted_wbc(name) or is_not_wbc(name))


def _from_imagej(columns: list, rows: list, csv_path: Path) -> tuple:
    """(columns, rows) of ImageJ's results table as a truth CSV's: each row's `image` is its
    Label's title, and, where the file has no class column (`class` or one of `CLASS_COLUMNS`
    but `label`), its `class` the ROI's name, a number after it aside (`ROI_NUMBER`), where
    that names a cell (`_names_a_cell`); said in a warning, and so are ROI names that name
    none (their rows are WBC boxes without a class) and Summarize's rows, left out.

    :raises TruthError: a Label whose title is no image file's name (a class typed in `Label`
        beside ImageJ's box: the images are then not named)."""
    label = _keyed(columns)["label"]
    keyed = _keyed([c for c in columns if c != label])
    own_class = "class" in keyed or any(n in keyed for n in CLASS_COLUMNS)
    other_names = Counter()
    summary = []
    out = []
    for line, row in rows:
        value = (row.get(label) or "").strip()
        if value.lower() in IMAGEJ_SUMMARY_ROWS:
            summary.append((line, value))
            continue
        title, _, rest = value.partition(":")
        if value and Path(title.strip()).suffix.lower() not in IMAGE_EXTENSIONS:
            raise TruthError(
                f"{csv_path.name} line {line}: read as ImageJ's results table (columns Label, BX, "
                f"BY and no 'image'), its Label {value!r} names no image file (ImageJ writes "
                "title:ROI name, the title with its extension); add a column 'image' naming each "
                "row's image")
        roi = rest.split(":", 1)[0].strip()
        row = {**row, "image": title.strip()}
        if not own_class:
            unnamed = DEFAULT_ROI_NAME.fullmatch(roi) is not None  # ImageJ's own name for it
            cell = "" if unnamed else ROI_NUMBER.sub("", roi)
            named = _names_a_cell(cell)
            row["class"] = cell if named else ""
            if roi and not named and not unnamed:
                other_names[roi] += 1
        out.append((line, row))
    log.warning("%s is read as ImageJ's results table: each row's image is its Label before the "
                "first ':'%s", csv_path.name,
                "" if own_class else ", its class the ROI's name after it, where that names a cell")
    if summary:
        log.warning("%s: the rows of Analyze > Summarize (%s; line %s) are no cells and are left "
                    "out", csv_path.name, ", ".join(dict.fromkeys(v for _, v in summary)),
                    _few([str(line) for line, _ in summary]))
    if other_names:
        log.warning("%s: %d ROI name(s) name no cell; their rows are scored as WBC boxes without "
                    "a class (%s)", csv_path.name, sum(other_names.values()),
                    _few([f"{k!r} {v}" for k, v in other_names.most_common()]))
    if not own_class:  # a class column of another name ("Cell class", "Klasse") is not read
        typed = _columns_of_classes(columns, rows, {label, *IMAGEJ_COLUMNS})
        if typed:
            log.warning("%s: its column(s) %s, which hold cell types, are not read: the classes "
                        "come from the ROI names; name the column 'class' to have it read",
                        csv_path.name, ", ".join(map(repr, typed)))
    columns = [c for c in columns if c != label] + ["image"] + ([] if own_class else ["class"])
    return columns, out


def _folder_csv(folder: Path):
    for name in CSV_NAMES:  # named for truth: its `filename` column is read as `image` too
        if (folder / name).is_file() and _is_truth_csv(folder / name, named=True):
            return folder / name
    found = [p for p in folder.glob("*.csv") if _is_truth_csv(p)]
    return found[0] if len(found) == 1 else None


def _class_dirs(folder: Path, least: int = 2) -> dict:
    """`{sub-folder: class}` for the sub-folders named after a class; empty when fewer than
    `least` are (recognising a folder asks for two, so that one folder that happens to be
    called `mono` does not make any folder a truth folder; reading takes one)."""
    if not folder.is_dir():
        return {}
    out = {}
    for sub in folder.iterdir():
        cls = normalise_class(sub.name) if sub.is_dir() else None
        if cls in CLASSES:
            out[sub] = cls
    return out if len(out) >= least else {}


def _read_rows(csv_path: Path) -> tuple:
    """`(columns, [(line, row)])` of a truth CSV: the lower-cased column names, and each row with
    the line of the file it ends on (blank lines and line breaks inside quotes counted)."""
    reader = None
    try:
        with open(csv_path, newline="", encoding=table_encoding(csv_path)) as fh:
            delimiter, skipped = start_table(fh)
            # skipinitialspace: `"x.jpg", "NEU"` is read without the quotes, as spreadsheets do
            reader = csv.DictReader(fh, delimiter=delimiter, skipinitialspace=True)
            reader.fieldnames = [c.strip().lower() for c in reader.fieldnames or []]
            return reader.fieldnames, [(reader.line_num + skipped, row) for row in reader]
    except UnicodeError:
        raise TruthError(f"truth CSV {csv_path} is not UTF-8 text (line {_first_non_utf8(csv_path)}"
                         "); save it as UTF-8 CSV") from None
    except csv.Error as exc:
        line = reader.line_num + skipped if reader is not None else 1
        raise TruthError(f"cannot read truth CSV {csv_path}, line {line}: {exc}") from exc
    except OSError as exc:
        raise TruthError(f"cannot read truth CSV {csv_path}: {exc}") from exc


def _first_non_utf8(path: Path) -> int:
    """The number of the first line of `path` that is not UTF-8 (1 when it cannot tell)."""
    try:
        data = path.read_bytes()
    except OSError:
        return 1
    for number, raw in enumerate(data.split(b"\n"), start=1):
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            return number
    return 1


def _class_column(columns: list, csv_path: Path):
    """The column holding the classes: `class`, or failing that the first of `CLASS_COLUMNS`
    (a space or hyphen taken for `_`), said once in a warning; None when there is none."""
    if "class" in columns:
        return "class"
    keyed = _keyed(columns)
    found = [keyed[name] for name in CLASS_COLUMNS if name in keyed]
    if not found:
        return None
    ignored = f"; its column(s) {', '.join(map(repr, found[1:]))} are ignored" if found[1:] else ""
    log.warning("%s has no column 'class': the classes are read from its column %r%s",
                csv_path.name, found[0], ignored)
    return found[0]


def _columns_of_classes(columns: list, rows: list, read: set, sample: int = 200) -> list:
    """The columns not in `read` whose first `sample` values hold a cell type the models know,
    or a white cell's name: a class column under a name that is not read."""
    out = []
    for column in columns:
        if not column or column in read:
            continue
        values = {(row.get(column) or "").strip() for _, row in rows[:sample]} - {""}
        if any(names_any_wbc(v) or normalise_class(v) in CLASSES for v in values):
            out.append(column)
    return out


def _mask_path(cell: str, csv_path: Path, input_dir) -> Path:
    """A `mask` cell as a path: relative to the CSV's folder, or, where no such file is there, to
    the run's input folder (a split file's masks are named like its images)."""
    mask = Path(cell.strip().replace("\\", "/"))
    if mask.is_absolute():
        return mask
    beside = csv_path.parent / mask
    if beside.exists() or input_dir is None:
        return beside
    under_input = Path(input_dir) / mask
    return under_input if under_input.exists() else beside


def read_truth_csv(csv_path: Path, input_dir=None, named: bool = True) -> dict:
    """`{image: ImageTruth}` from a truth CSV (see the module docstring).

    :param input_dir: the run's input folder, where a `mask` not found beside the CSV is looked for.
    :param named: `--truth` names the file itself, so `filename` may stand for `image`.
    :raises TruthError: naming the file and line of what cannot be read.
    """
    columns, rows = _read_rows(csv_path)
    if named and _is_imagej(columns):
        columns, rows = _from_imagej(columns, rows, csv_path)
    image_column = _image_column(columns, named)
    if image_column is None:
        others = " or ".join(map(repr, IMAGE_COLUMNS))
        raise TruthError(f"truth CSV {csv_path} needs a column 'image' in its first line (or, "
                         f"beside a class, box or mask column, {others}, in a CSV --truth "
                         f"names or one named {' or '.join(CSV_NAMES)}; has: {', '.join(columns)})")
    if image_column != "image":
        log.warning("%s has no column 'image': the images are named by its column %r",
                    csv_path.name, image_column)
    class_column = _class_column(columns, csv_path)
    box_columns, corners = _box_columns(columns, csv_path)
    has_box_cols = bool(box_columns)
    if class_column is None:  # a class column of another name ("cell class", "Zelltyp")
        typed = _columns_of_classes(columns, rows, {image_column, "mask", *box_columns})
        if typed:
            log.warning("%s has no column 'class' (nor %s): no cell type is scored; its "
                        "column(s) %s, which hold cell types, are not read", csv_path.name,
                        ", ".join(map(repr, CLASS_COLUMNS)), ", ".join(map(repr, typed)))
    classes = {}
    class_lines = {}  # image -> line of its first class row without a box
    boxes = defaultdict(list)
    box_classes = defaultdict(list)
    masks = {}
    no_cells = set()  # rows with only `image` (box columns present): the image has no WBC
    order = {}  # images in the order of their first row (a dict: a list's `in` is slow at 100k rows)
    seen = {}  # (image, box) -> (first line, class): a row written twice counts once
    repeated = []
    class_repeats = []  # lines of a class row without a box for an image that has one
    not_wbc = defaultdict(int)  # red cells and platelets of a file that annotates every object
    for line, row in rows:
        image = _image_name(row.get(image_column))
        if not image:
            continue
        order.setdefault(image, None)
        label = (row.get(class_column) or "").strip() if class_column else ""
        if is_not_wbc(label):
            not_wbc[label] += 1
            if has_box_cols:  # the image is annotated: its WBCs are its other rows, or none
                no_cells.add(image)
            continue
        # "WBC", "leukocyte": a white cell whose type is not given, as in VOC and YOLO truth
        cls = None if names_any_wbc(label) else normalise_class(label)
        if row.get("mask"):
            masks[image] = _mask_path(row["mask"], csv_path, input_dir)
        values = [(row.get(c) or "").strip() for c in box_columns]
        if any(values):
            box = _box(values, box_columns, corners, csv_path.name, line)
            first, first_cls = seen.setdefault((image, box), (line, cls))
            if first != line:
                if first_cls != cls:
                    raise TruthError(f"{csv_path.name} line {line}: image {image!r} has the box of "
                                     f"line {first} with another class ({cls}, {first_cls})")
                repeated.append(line)
                continue
            boxes[image].append(box)
            box_classes[image].append(cls)
        elif cls is None and not names_any_wbc(label) and has_box_cols and not row.get("mask"):
            no_cells.add(image)
        elif cls is not None:
            if image in classes and classes[image] == cls:
                class_repeats.append(line)  # two cells meant? without boxes, one is scored
            if classes.get(image, cls) != cls:
                raise TruthError(f"{csv_path.name} line {line}: image {image!r} has two classes "
                                 f"({classes[image]} on line {class_lines[image]}, {cls}) and no "
                                 "boxes to tell its cells apart")
            classes[image] = cls
            class_lines.setdefault(image, line)
    if not_wbc:
        log.warning("%s: rows of red cells, platelets and artefacts are not WBCs and are left "
                    "out (%s)",
                    csv_path.name, ", ".join(f"{k!r} {v}" for k, v in sorted(not_wbc.items())))
    if repeated:
        log.warning("%s: %d row(s) repeat an earlier row's image, box and class and are counted "
                    "once (line %s)", csv_path.name, len(repeated),
                    ", ".join(map(str, repeated[:10])) + (", ..." if len(repeated) > 10 else ""))
    if class_repeats:
        log.warning("%s: %d row(s) give an image without boxes the class an earlier row gave it "
                    "(line %s); each such image is one cell, scored once: give each cell of a "
                    "field a box to score them all", csv_path.name, len(class_repeats),
                    ", ".join(map(str, class_repeats[:10]))
                    + (", ..." if len(class_repeats) > 10 else ""))
    both = sorted(set(classes) & set(boxes), key=class_lines.get)
    if both:  # its cells would be scored twice: as the single cell and as the boxed ones
        raise TruthError(f"{csv_path.name} line {class_lines[both[0]]}: image {both[0]!r} has a "
                         "row with a class and no box beside rows with boxes; give each of its "
                         "cells a box, or drop that row")
    out = {}
    for image in order:
        out[image] = ImageTruth(mask_path=masks.get(image), cls=classes.get(image),
                                boxes=boxes.get(image, []), box_classes=box_classes.get(image, []),
                                has_boxes=image in boxes or image in no_cells)
    return out


def _without_nothing_to_score(out: dict, source: str) -> dict:
    """`out` without the images left with no class, box or mask (counted among the images with
    truth, they were scored on nothing), said once; and a warning, now rather than image by
    image after the analysis, naming the masks that are not there (their images are left out
    of the pixel metrics then, each noted in accuracy.csv's per-image rows)."""
    missing = sorted(name for name, truth in out.items()
                     if truth.mask_path is not None and not Path(truth.mask_path).exists())
    if missing:
        log.warning("%s: %d mask file(s) it names are not there (%s); those images are left out "
                    "of the pixel metrics", source, len(missing),
                    _few([f"{name}: {out[name].mask_path}" for name in missing]))
    empty = [name for name, truth in out.items() if not truth.kinds]
    if empty:
        log.warning("%s: %d image(s) have nothing to score them on (no cell type, box or mask), "
                    "and are left out (%s)", source, len(empty), _few(empty))
    return {name: truth for name, truth in out.items() if truth.kinds}


def _few(names: list, shown: int = 3) -> str:
    """The first `shown` of `names`, and "..." where there are more."""
    return ", ".join(names[:shown]) + (", ..." if len(names) > shown else "")


def _box_columns(columns: list, csv_path: Path) -> tuple:
    """The columns of a WBC box, as `(columns, corners)`: the first of `BOX_FORMS` the file has
    whole, a form without `width` and `height` before one with them (beside another form they
    are the image's size) (`corners`: its last two are the far corner), else `((), False)`
    (`width` and `height` alone are the image's size, as some exports give it).

    :raises TruthError: columns that place a box but make no form whole (a corner without the
        rest, a centre), whose boxes would otherwise have been left out without a word, and each
        row's class scored against the middle cell of its image."""
    keyed = _keyed(columns)
    whole = [(names, corners) for names, corners in BOX_FORMS if all(n in keyed for n in names)]
    if whole:  # `width` and `height` beside another whole form are the image's size, not the box's
        names, corners = min(whole, key=lambda form: "width" in form[0] or "height" in form[0])
        return tuple(keyed[n] for n in names), corners
    pairs = [names[:2] for names, _ in BOX_FORMS] + [CENTRE_COLUMNS[i:i + 2]
                                                      for i in range(0, len(CENTRE_COLUMNS), 2)]
    placed = [pair for pair in pairs if all(n in keyed for n in pair)]  # a position, or centre
    # `x` or `xmin` alone too; another single word (`top`, `h`) may mean anything else
    named = [n for n in (*BOX_COLUMNS[:2], *CORNER_COLUMNS) if n in keyed]
    if placed or named:
        some = list(dict.fromkeys(keyed[n] for pair in placed for n in pair)) or [
            keyed[n] for n in named]
        centre = any(pair[0] in CENTRE_COLUMNS for pair in placed)
        raise TruthError(
            f"{csv_path.name}: box columns {', '.join(some)} that make no whole box"
            + ("; a box's centre is not read" if centre else "") + f"; a box is "
            f"{', '.join(BOX_COLUMNS)} (its top-left corner and size) or "
            f"{', '.join(CORNER_COLUMNS)} (its corners), in pixels, or another spelling of "
            "them (the README's truth section lists them)")
    return (), False


def _keyed(columns: list) -> dict:
    """{column name with a space or hyphen taken for `_`: the column as written}."""
    keyed = {}
    for column in columns:
        keyed.setdefault(column.replace(" ", "_").replace("-", "_"), column)
    return keyed


def _box(values: list, columns: tuple, corners: bool, name: str, line: int) -> tuple:
    """A row's box as (x, y, width, height) in pixels, from `values` of `columns`.

    :raises TruthError: a value that is not a finite number, or a box without area (width and
        height typed as xmax and ymax give one that reaches far past the image, so a negative
        or zero size is what a mix-up shows)."""
    try:
        a, b, c, d = (float(v) for v in values)
    except ValueError:
        comma = ("; a decimal comma? write the box with a decimal point (or in whole pixels)"
                 if any("," in v for v in values) else "")
        raise TruthError(f"{name} line {line}: box {values} is not numeric{comma}") from None
    if not all(math.isfinite(v) for v in (a, b, c, d)):
        raise TruthError(f"{name} line {line}: box {values} is not a finite number")
    box = (a, b, c - a, d - b) if corners else (a, b, c, d)
    if box[2] <= 0 or box[3] <= 0:
        need = "xmax and ymax above xmin and ymin" if corners else "width and height above 0"
        raise TruthError(f"{name} line {line}: box {values} has no area (columns "
                         f"{', '.join(columns)}: {need})")
    return box


def _image_name(cell) -> str:
    """An image name as written in a truth CSV, in the run's form: forward slashes, no `./`."""
    name = (cell or "").strip().replace("\\", "/")
    while name.startswith("./"):
        name = name[2:]
    return name


class CSVReader:
    """A lab's own truth: a CSV (image,class[,x,y,width,height][,mask]), class folders, masks."""

    name = "csv"
    priority = -10

    def can_read(self, path: Path) -> bool:
        path = Path(path)
        if path.is_file():  # Excel saves tab-separated and "Unicode text" files as .txt
            return path.suffix.lower() in (".csv", ".txt", ".tsv") and _is_truth_csv(path, True)
        if not path.is_dir():
            return False
        return (_folder_csv(path) is not None or bool(_class_dirs(path))
                or (path / "masks").is_dir())

    def why_not(self, path: Path):
        """For a CSV `--truth` names that `can_read` passed over: what reading it finds wrong (a
        column `image` under another name, a title line above the header...); else None."""
        path = Path(path)
        if not (path.is_file() and path.suffix.lower() in (".csv", ".txt", ".tsv")):
            return None
        try:
            read_truth_csv(path, None, named=True)
        except TruthError as exc:
            return str(exc)
        return None

    def read(self, path: Path, input_dir: Path) -> dict:
        path = Path(path)
        out = {}
        if path.is_file():
            csv_path, folder = path, path.parent
        else:
            csv_path, folder = _folder_csv(path), path
        if csv_path is not None:
            out.update(read_truth_csv(csv_path, input_dir,
                                      named=path.is_file() or csv_path.name in CSV_NAMES))
        classes = _class_dirs(folder, least=1) if path.is_dir() else {}
        for sub, cls in sorted(classes.items()):
            for image in iter_files(sub, IMAGE_EXTENSIONS):
                key = image_key(image, input_dir, folder)
                truth = out.setdefault(key, ImageTruth())
                truth.cls = truth.cls or cls
        if classes:
            _warn_other_folders(folder, classes, out, input_dir)
        masks_dir = folder / "masks"
        if masks_dir.is_dir():
            index = mask_index(masks_dir)
            for key, truth in out.items():
                if truth.mask_path is None:
                    truth.mask_path = mask_for(index, key)
            used = {truth.mask_path for truth in out.values()}
            unused = sorted({m for m in index.values() if m not in used})
            maskless = any(truth.mask_path is None for truth in out.values())
            if out and unused and maskless:  # named otherwise (a/b_mask.png): left out unsaid
                log.warning("%s: %d mask(s) match no image of the truth (%s); a mask is named as "
                            "its image is, with any image extension (masks/a/b.png for a/b.jpg)",
                            masks_dir, len(unused),
                            _few([m.relative_to(masks_dir).as_posix() for m in unused]))
            if not out:  # masks only: one entry per mask, named like the image without extension
                used = set()
                for name, mask in sorted(index.items(), key=lambda kv: -len(kv[0])):
                    if mask not in used:
                        used.add(mask)
                        out[name] = ImageTruth(mask_path=mask)
        return _without_nothing_to_score(out, csv_path.name if csv_path is not None else str(path))


def _warn_other_folders(folder: Path, classes: dict, truth: dict, input_dir: Path) -> None:
    """One warning naming the sub-folders beside the class folders that hold images but name no
    class ("Basophills"): their images get no truth, so a class would leave the figures without
    a word (`train --lab-classes` says the same of them). `masks/`, hidden folders, folders of
    wbc-batch results and folders with an image the truth CSV names are not such folders."""
    from wbc_batch.discovery import is_skipped_folder
    from wbc_batch.output_folder import holds_results
    from wbc_batch.truth import named_with_guess

    other = [sub for sub in sorted(folder.iterdir())
             if sub.is_dir() and sub not in classes and sub.name != "masks"
             and not is_skipped_folder(sub.name) and not holds_results(sub)
             and _untruthed(iter_files(sub, IMAGE_EXTENSIONS), truth, input_dir, folder)]
    if other:
        shown = ", ".join(named_with_guess(sub.name) for sub in other[:5])
        more = f" and {len(other) - 5} more" if len(other) > 5 else ""
        log.warning("%s: folders that name no class, whose images get no truth: %s%s "
                    "(classes: %s)", folder, shown, more, ", ".join(CLASSES))


def _untruthed(images: list, truth: dict, input_dir: Path, folder: Path) -> bool:
    """Whether `images` are some, and none of them has truth yet."""
    return bool(images) and not any(image_key(p, input_dir, folder) in truth for p in images)


@hookimpl
def wbc_register_truth_readers():
    return [CSVReader()]
