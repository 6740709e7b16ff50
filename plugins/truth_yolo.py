"""Truth reader for YOLO box folders (TXL-PBC and any YOLO export).

One `name.txt` per image: a line `class cx cy w h` per object, coordinates as fractions of the
image width and height; a segmentation line `class x1 y1 x2 y2 ...` (a polygon) counts as its
bounding box. The WBC class is the one named WBC, leukocyte or white blood cell by a `classes.txt`
or, failing that, the `names` of a `data.yaml` (Ultralytics, Roboflow); classes named after the
five WBC classes ("neutrophil", "Lymphocytes", "EO": an export labelled by cell type) are WBC
boxes of that class, scored for classification as well. The list is looked for beside the
label files and in the folders above them up to the one holding `labels/` (and above that,
the export's top, when it is a split's folder as in Roboflow's `valid/labels/`); without
either it is class 0 (TXL-PBC: 0 WBC, 1 RBC, 2 Platelet). Other classes are ignored. A label file with no WBC line
(an empty one too) means the image has no WBC. A line with 6 numbers (class, box, confidence)
is a model's prediction, not ground truth, and is refused; so is a coordinate outside 0..1 (beyond
1e-4 of rounding), as labels written in pixels, or a tracker's `class cx cy w h confidence id`
(with an id of 0 or 1 too), would otherwise be boxes in the wrong place, and a WBC box without
area, which no cell matches.
Errors name the label file by its path under `--truth` (two samples may both have
`field_01.txt`) and the line. A folder whose first label
files have such a line is not recognised as YOLO truth, and the message saying so names the line.

`--truth` may name a labels folder (e.g. `TXL_PBC/labels/test`) or a dataset folder holding
`labels/`. The image of `labels/.../name.txt` is looked for as `images/.../name.<ext>` (the YOLO
convention) and under the run's input folder; boxes stay normalised and are turned into pixels
with the analysed image's size when scoring.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

from wbc_batch import CLASSES
from wbc_batch.hookspecs import hookimpl
from wbc_batch.truth import (ImageTruth, TruthError, find_image, image_key,
                             is_doubted_wbc, is_not_wbc, is_other_wbc, iter_files, log,
                             names_any_wbc, normalise_class, suggest_class)

WBC_CLASS = 0
#: how far outside 0..1 a coordinate may lie (an export's rounding: 1.00004 is the edge)
TOLERANCE = 1e-4
SKIP = {"classes.txt", "readme.txt"}


def _label_root(path: Path) -> Path:
    if path.is_dir() and (path / "labels").is_dir():
        return path / "labels"
    return path


def _label_files(root: Path) -> list:
    if root.is_file():
        return [root] if root.suffix.lower() == ".txt" else []
    if not root.is_dir():
        return []
    return [p for p in iter_files(root, (".txt",)) if p.name.lower() not in SKIP]


def _rows(txt: Path):
    """The non-empty lines of a label file, split; None when it cannot be read."""
    try:
        text = txt.read_text(encoding="utf-8-sig", errors="replace")
    except OSError:
        return None
    return [ln.split() for ln in text.splitlines() if ln.strip()]


class _BadLine(ValueError):
    """A label line that is no YOLO box or polygon; `number` is its line number."""

    def __init__(self, number: int, reason: str):
        super().__init__(reason)
        self.number = number


def _outside(line: str, values: list) -> str:
    """What is wrong with a line whose coordinates are not all within 0..1, and the likely why."""
    outside = [v for v in values if not -TOLERANCE <= v <= 1 + TOLERANCE]
    bad = max(outside, key=lambda v: v - 1 if v > 1 else -v)  # the farthest: 240 of `1.05 240`
    reason = (f"coordinate {bad:g} is outside 0 to 1 (YOLO coordinates are fractions of the image "
              f"width and height), in {line.strip()!r}")
    if len(values) == 6:
        return reason + ("; 7 numbers may be 'class cx cy w h confidence id', a tracker's output, "
                         "not ground truth")
    if bad > 2:
        return reason + "; these look like pixels: export the labels normalised (YOLO format)"
    if -0.1 <= bad <= 1.1:
        return reason + ("; just past the image's edge (a box drawn past it): set it to "
                         f"{0 if bad < 0 else 1} in the label file")
    return reason


def _parse_line(line: str) -> tuple:
    """`(class, numbers)` of one non-empty label line; ValueError saying what is wrong with it."""
    parts = line.split()
    if len(parts) == 6:
        raise ValueError("6 numbers (class, box, confidence) are a model's prediction, not ground "
                         "truth")
    try:
        if len(parts) < 5 or (len(parts) > 5 and len(parts) % 2 == 0):
            raise ValueError
        number = float(parts[0])
        values = [float(v) for v in parts[1:]]
    except ValueError:
        raise ValueError("expected 'class cx cy w h' or a polygon 'class x1 y1 x2 y2 ...', got "
                         f"{line.strip()!r}") from None
    if not (number >= 0 and number.is_integer()):
        raise ValueError(f"the class must be a whole number (0, 1, 2, ...), got {line.strip()!r}")
    if len(values) == 6 and values[5] in (0.0, 1.0):
        # a track id of 0 or 1 passes the 0..1 check below, and the line read as a triangle
        raise ValueError("7 numbers ending in a whole one read as a tracker's output (class, box, "
                         "confidence, track id), not ground truth (a 3-point polygon with its "
                         f"last corner on the image's edge reads so too), got {line.strip()!r}")
    if not all(-TOLERANCE <= v <= 1 + TOLERANCE for v in values):
        raise ValueError(_outside(line, values))
    return int(number), values


def _labels(text: str, limit: Optional[int] = None) -> list:
    """`[(class, numbers)]` of the non-empty lines of a label file's text (its first `limit`).

    :raises _BadLine: for the first line that is no YOLO box or polygon."""
    out = []
    for number, line in enumerate(text.splitlines(), start=1):
        if limit is not None and len(out) >= limit:
            break
        if not line.strip():
            continue
        try:
            out.append(_parse_line(line))
        except ValueError as exc:
            raise _BadLine(number, str(exc)) from None
    return out


def _read_text(txt: Path) -> str:
    return txt.read_text(encoding="utf-8-sig", errors="replace")


def _looks_yolo(txt: Path) -> bool:
    """Every line (of the first five) is a YOLO box or polygon; an empty file is one too."""
    try:
        _labels(_read_text(txt), limit=5)
    except (OSError, _BadLine):
        return False
    return True


def _shown(txt: Path, root: Path) -> str:
    """A label file's name in a message: its path under the truth folder `root` (two samples may
    both have `field_01.txt`), or its name when `root` is the file itself."""
    try:
        return txt.relative_to(root).as_posix() if root.is_dir() else txt.name
    except ValueError:
        return str(txt)


#: folders a YOLO export keeps one split's `images/` and `labels/` in (Roboflow: `train/`,
#: `valid/`, `test/`, with the export's `data.yaml` beside them)
SPLIT_FOLDERS = {"train", "valid", "val", "test"}


def _name_folders(root: Path) -> list:
    """`root` and the folders above it up to the one holding `labels/`, and the one above that
    too when it is a split's folder (`SPLIT_FOLDERS`); just `root` and its parent when no folder
    on the way is called labels."""
    chain = [root, *list(root.parents)[:3]]
    for k, folder in enumerate(chain[:2]):
        if folder.name.lower() == "labels":
            holder = chain[k + 1]
            return chain[:k + (3 if holder.name.lower() in SPLIT_FOLDERS else 2)]
    return chain[:2]


def _unquote(text: str) -> str:
    return text.split(" #")[0].strip().strip("'\"").strip()


def _numbered(item: str, path: Path) -> tuple:
    """`(number, name)` from one `number: name` entry of a names mapping; TruthError otherwise."""
    key, sep, value = item.partition(":")
    try:
        if sep:
            return int(key.strip().strip("'\"")), _unquote(value)
    except ValueError:
        pass
    raise TruthError(f"{path}: cannot read class {item.strip()!r} of its names")


def _flow_items(text: str, path: Path) -> dict:
    """`{number: name}` from a YAML flow list `[a, b]` or mapping `{0: a, 1: b}`."""
    body = text.strip()[1:-1]
    items = [v for v in body.split(",") if v.strip()]
    if text.strip().startswith("["):
        return dict(enumerate(_unquote(v) for v in items))
    return dict(_numbered(item, path) for item in items)


def _yaml_names(path: Path) -> dict:
    """`{class number: name}` from the `names` of a YOLO data.yaml, read without a YAML library:
    a flow list `[a, b]` or mapping `{0: a, 1: b}` (on one line or several), a block of `- name`
    (indented or, as PyYAML writes it, not), or a block of `0: name`; the key may be quoted. `{}`
    when it has no `names`; TruthError when it has one this cannot read (a JSON-style file, say),
    so that a class number is never guessed."""
    lines = path.read_text(encoding="utf-8-sig", errors="replace").splitlines()
    for i, line in enumerate(lines):
        key, _, rest = line.partition(":")
        if key.strip().strip("'\"") != "names" or line[:1].isspace():
            if not line[:1].isspace() and re.search(r"""["']?\bnames\b["']?\s*:""", line):
                raise TruthError(f"{path}: cannot read its names (line {i + 1}); write them as a "
                                 "YAML list, `names: [RBC, WBC]`")
            continue
        rest = rest.split("#")[0].strip()
        if rest[:1] in "[{" and rest:
            close = "]" if rest[0] == "[" else "}"
            text, j = rest, i + 1
            while close not in text and j < len(lines):
                text += " " + lines[j].split("#")[0].strip()
                j += 1
            if close not in text:
                raise TruthError(f"{path}: its names list is not closed with {close!r}")
            return _flow_items(text[:text.index(close) + 1], path)
        if rest:
            raise TruthError(f"{path}: cannot read its names {rest!r}")
        names = {}
        for item in lines[i + 1:]:
            if not item.strip() or item.lstrip().startswith("#"):
                continue
            text, indented = item.strip(), item[:1].isspace()
            # PyYAML writes the `- ` items of a block list at the column of its key
            if text.startswith("-") and (indented or text == "-" or text.startswith("- ")):
                names[len(names)] = _unquote(text[1:])
                continue
            if not indented:
                break
            names.update([_numbered(text, path)])
        if not names:
            raise TruthError(f"{path}: its names key lists no class")
        return names
    return {}


def _classes_txt(path: Path) -> dict:
    lines = path.read_text(encoding="utf-8-sig", errors="replace").splitlines()
    return dict(enumerate(lines))


def class_list(root: Path) -> tuple:
    """(`{number: class or None}` of the WBC classes (`_wbc_classes`; `{0: None}` without a
    class list), `{number: name}` of the class list found, or None without one)."""
    for folder in _name_folders(root):
        for list_file, read in (("classes.txt", _classes_txt), ("data.yaml", _yaml_names)):
            path = folder / list_file
            if not path.is_file():
                continue
            try:
                names = {number: name.strip() for number, name in read(path).items()}
            except OSError as exc:
                raise TruthError(f"cannot read {path}: {exc.strerror or exc}") from exc
            if not any(names.values()):
                continue
            wbc = _wbc_classes(names)
            if wbc:
                return wbc, names
            raise TruthError(f"{path} names no WBC class (one of: WBC, leukocyte, white blood "
                             f"cell, or the five classes: {', '.join(CLASSES)}); its classes: "
                             f"{', '.join(n for n in names.values() if n)}")
    return {WBC_CLASS: None}, None


def _wbc_classes(names: dict) -> dict:
    """`{number: class or None}` of a class list's WBC classes: those named WBC (leukocyte,
    white blood cell; None: no subtype), those named after one of the five classes
    ("neutrophil", "Lymphocytes", "EO"), as an export labelled by cell type has them, and those
    naming a white cell of another kind ("Blast": `truth.is_other_wbc`), whose class no model
    gives, so that it is scored as wrong."""
    out = {}
    for number, name in sorted(names.items()):
        if names_any_wbc(name):
            out[number] = None
        elif normalise_class(name) in CLASSES or is_other_wbc(name) or is_doubted_wbc(name):
            # a blast, "Mono?": WBCs whose class is scored as wrong
            out[number] = normalise_class(name)
    return out


def parse_yolo(txt: Path, wbc=WBC_CLASS, root: Optional[Path] = None,
               classes: Optional[dict] = None, box_classes: Optional[list] = None) -> list:
    """The normalised `(x, y, w, h)` boxes of the WBC classes in one YOLO label file (a polygon
    line gives its bounding box).

    :param wbc: the WBC class number, or `{number: class or None}` of several (`class_list`).
    :param root: the truth folder, for naming the file in errors (default: the file's folder).
    :param classes: where given, each class number's count of lines is added to it.
    :param box_classes: where given, each box's class (None: a WBC without one) is appended.
    :raises TruthError: naming the file and line, for a line that is no YOLO box or polygon, one
        with a coordinate outside 0..1 (pixels, say), or a model's prediction with confidence.
    """
    root = txt.parent if root is None else Path(root)
    try:
        text = _read_text(txt)
    except OSError as exc:
        raise TruthError(f"cannot read {txt}: {exc.strerror or exc}") from exc
    try:
        lines = _labels(text)
    except _BadLine as exc:
        raise TruthError(f"{_shown(txt, root)} line {exc.number}: {exc}") from None
    if classes is not None:
        for cls, _ in lines:
            classes[cls] = classes.get(cls, 0) + 1
    wanted = wbc if isinstance(wbc, dict) else {wbc: None}
    boxes = []
    for k, (cls, values) in enumerate(lines):
        if cls in wanted:
            boxes.append(_box(values))
            if not (boxes[-1][2] > 0 and boxes[-1][3] > 0):  # matched by no cell: never found
                raise TruthError(f"{_shown(txt, root)} line {_line_number(text, k)}: a WBC box "
                                 f"without area (width or height 0)")
            if box_classes is not None:
                box_classes.append(wanted[cls])
    return boxes


def _line_number(text: str, k: int) -> int:
    """The number, counted from 1, of the `k`-th non-empty line of a label file's `text`."""
    filled = [n for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    return filled[k]


def _box(values: list) -> tuple:
    """`(x, y, w, h)` of a box line's `cx cy w h`, or of a polygon's points."""
    if len(values) == 4:
        cx, cy, w, h = values
        return (cx - w / 2, cy - h / 2, w, h)
    xs, ys = values[0::2], values[1::2]
    return (min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys))


def _image_for(txt: Path, root: Path, input_dir: Path):
    rel = txt.relative_to(root).with_suffix("")
    cands = [input_dir / rel]
    parts = txt.with_suffix("").parts
    if "labels" in parts:
        i = len(parts) - 1 - parts[::-1].index("labels")
        cands.append(Path(*parts[:i], "images", *parts[i + 1:]))
    for base in cands:
        image = find_image(base)
        if image is not None:
            return image
    return None


class YOLOReader:
    """YOLO txt label folders; the WBC boxes are those of the WBC class number (`class_list`:
    from classes.txt or data.yaml, 0 without either)."""

    name = "yolo"
    priority = 5

    def can_read(self, path: Path) -> bool:
        filled = _sampled(_label_root(Path(path)))
        return bool(filled) and all(_looks_yolo(f) for f in filled)

    def why_not(self, path: Path) -> Optional[str]:
        """The first line that kept `can_read` from taking `path` ("file line N: what is wrong"),
        or None where it has no label lines to blame."""
        for txt in _sampled(_label_root(Path(path))):
            try:
                _labels(_read_text(txt), limit=5)
            except OSError:
                continue
            except _BadLine as exc:
                return f"{_shown(txt, Path(path))} line {exc.number}: {exc}"
        return None

    def read(self, path: Path, input_dir: Path) -> dict:
        root = _label_root(Path(path))
        out = {}
        base = root if root.is_dir() else root.parent
        wbc, names = class_list(base)
        classes = {}
        for txt in _label_files(root):
            image = _image_for(txt, base, Path(input_dir))
            if image is not None:
                key = image_key(image, input_dir, base)
            else:
                key = txt.relative_to(base).with_suffix("").as_posix()
            box_classes = []
            boxes = parse_yolo(txt, wbc, Path(path), classes, box_classes)
            out[key] = ImageTruth(boxes=boxes, box_classes=box_classes, has_boxes=True,
                                  box_units="norm")
        _warn_classes(classes, wbc, names)
        return out


def _warn_classes(classes: dict, wbc: dict, names: Optional[dict]) -> None:
    """One warning where the label files' classes say the WBC class may be the wrong one: lines
    of class numbers the class list does not have, or, without a list, no line of class 0 (the
    WBC class taken by default) among lines of others; those images would count no WBC."""
    counts = ", ".join(f"{c} ({n})" for c, n in sorted(classes.items()))
    if names is not None:
        outside = sorted(set(classes) - set(names))
        if outside:
            log.warning("YOLO truth: label lines of class number(s) %s, which its class list "
                        "does not name, are ignored (classes in the files: %s)",
                        ", ".join(map(str, outside)), counts)
        unknown = [f"{names[c]} ({_guessed(names[c])}{classes[c]} line{'s' * (classes[c] != 1)})"
                   for c in sorted(classes)
                   if c in names and c not in wbc and names[c] and not is_not_wbc(names[c])]
        if unknown:  # a misspelt class, or WBCs of no class scored (blasts): boxes left out
            log.warning("YOLO truth: label lines of classes named %s are taken neither for WBCs "
                        "nor for red cells or platelets, and are left out (WBCs: WBC, "
                        "leukocyte, white blood cell, one of %s, or a white cell of another "
                        "kind such as a blast, whose class is scored as wrong)", ", ".join(unknown),
                        ", ".join(CLASSES))
    elif classes and not set(wbc) & set(classes):
        log.warning("YOLO truth: no label line is of class %s, taken for WBCs without a "
                    "classes.txt or data.yaml, so every image counts as without a WBC (classes "
                    "in the files: %s); add a classes.txt naming the WBC class",
                    ", ".join(map(str, sorted(wbc))), counts)


def _guessed(name: str) -> str:
    """"neutrophil?, " for a class name that misspells one (`suggest_class`), else ""."""
    guess = suggest_class(name)
    return f"{guess}?, " if guess else ""


def _sampled(root: Path) -> list:
    """The label files that recognising a folder looks at: the first five with lines among the
    first 50 (empty label files, images without a WBC, say nothing)."""
    return [f for f in _label_files(root)[:50] if _rows(f)][:5]


@hookimpl
def wbc_register_truth_readers():
    return [YOLOReader()]
