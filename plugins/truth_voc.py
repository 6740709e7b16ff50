"""Truth reader for Pascal VOC XML annotations (BCCD and any labelImg export).

Boxes named "WBC" (any case; also "leukocyte", "white blood cell") are WBC boxes without a
subtype; boxes named after one of the five classes (e.g. "neutrophil", "NE", "WBC-neutrophil")
are WBC boxes with that class; red cells and platelets are ignored. Any other name is ignored
with a warning naming it, since it may be a WBC under a name this reader does not know. Box
`(x, y, w, h)` is `(xmin, ymin, xmax - xmin, ymax - ymin)`; a WBC box without area (xmax not
above xmin, say) is refused, naming its file. A `<difficult>` flag is not read: every WBC box is
one to find (BCCD has no such flags), unlike VOC's own scoring, which leaves those boxes out.

BCCD keeps subtypes in a separate `labels.csv` (columns Image, Category; Image n means
`BloodImage_%05d`; Category empty, one class, or several comma-separated). A label is given to a
box only where it is unambiguous: the image has exactly one WBC box and exactly one label. So
classification is scored on BCCD's "images with one labelled WBC".

Images are looked for at the XML's own sub-path first (`Annotations/S1/f1.xml` or `S1/f1.xml`
describes `S1/...` in `JPEGImages/` or the input folder: every sample may hold a `field_01`),
then in `JPEGImages/` beside `Annotations/` (the VOC layout), else beside the XML, by the XML's
`<filename>` (as written with its folders, as CVAT writes it, then its last part, even when
written as a Windows path), else by the XML's own name with any image extension; `--truth` may
name the dataset folder (its `Annotations/` and every `*/Annotations/` one level down, a folder
per clinic or split, are read), the Annotations folder or one XML file. Two XMLs that describe
one image (an XML copied from another keeps its `<filename>`) are refused, naming both: one
would replace the other's boxes.
"""

from __future__ import annotations

import csv
import logging
import xml.etree.ElementTree as ET
from pathlib import Path, PureWindowsPath

from wbc_batch import CLASSES
from wbc_batch.hookspecs import hookimpl
from wbc_batch.truth import (ImageTruth, TruthError, find_image, image_key,
                             is_doubted_wbc, is_not_wbc, is_other_wbc, iter_files,
                             names_any_wbc, normalise_class)

LABEL_FILES = ("labels.csv",)
log = logging.getLogger("wbc_batch")


def _is_voc(xml_path: Path) -> bool:
    try:
        with open(xml_path, "rb") as fh:
            head = fh.read(2048)
    except OSError:
        return False
    return b"<annotation" in head


def _xml_files(path: Path) -> list:
    if path.is_file():
        return [path] if path.suffix.lower() == ".xml" else []
    if not path.is_dir():
        return []
    folders = [a for a in [path / "Annotations", *sorted(path.glob("*/Annotations"))]
               if a.is_dir()]  # every one: a folder per clinic or per split, each read
    if folders:
        return [f for ann in folders for f in iter_files(ann, (".xml",))]
    return iter_files(path, (".xml",))


def read_bccd_labels(csv_path: Path) -> dict:
    """`{image stem: [class, ...]}` from a BCCD-style labels.csv."""
    out = {}
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.DictReader(fh))
    except OSError as exc:
        raise TruthError(f"cannot read {csv_path}: {exc.strerror or exc}") from exc
    if rows and ("Image" not in rows[0] or "Category" not in rows[0]):
        raise TruthError(f"{csv_path} needs columns 'Image' and 'Category'")
    for row in rows:
        image = (row.get("Image") or "").strip()
        if not image:
            continue
        stem = f"BloodImage_{int(image):05d}" if image.isdigit() else Path(image).stem
        labels = [normalise_class(p) for p in (row.get("Category") or "").split(",")]
        out[stem] = [c for c in labels if c]
    return out


def _find_labels(xml_files: list, path: Path) -> dict:
    """labels.csv in the truth folder or up to three folders above the annotations."""
    cands = [(path if path.is_dir() else path.parent) / n for n in LABEL_FILES]
    if xml_files:
        cands += [folder / n for folder in xml_files[0].parents[:3] for n in LABEL_FILES]
    for cand in cands:
        if cand.is_file():
            return read_bccd_labels(cand)
    return {}


def _shown(xml_path: Path, root: Path) -> str:
    """An annotation's name in a message: its path under the truth folder where it lies there."""
    try:
        return xml_path.relative_to(root).as_posix()
    except ValueError:
        return str(xml_path)


def _image_for(xml_path: Path, filename: str, input_dir=None, root=None) -> Path:
    """The image an annotation describes (module docstring); where none is found, the path it
    would have in JPEGImages/, so that the truth is reported as matching no image.

    An XML in a sub-folder (per sample: `Annotations/S1/f1.xml`, or `S1/f1.xml` under the truth
    folder `root`) describes the image at the same sub-path, in JPEGImages/ or in `input_dir`,
    first: every sample may hold a `field_01`. A `<filename>` written with folders (CVAT's
    `S1/f1.png`) is looked for as written, then by its last part."""
    written = PureWindowsPath(filename) if filename else None  # a Windows path or a POSIX one
    name = written.name if written else ""
    ann = next((p for p in xml_path.parents if p.name.lower() == "annotations"
                and (root is None or Path(p).is_relative_to(root)
                     or (p.parent / "JPEGImages").is_dir())), None)  # above --truth: VOC's only
    base = ann if ann is not None else root
    try:
        sub = xml_path.parent.relative_to(base) if base is not None else Path()
    except ValueError:
        sub = Path()
    jpegs = ann.parent / "JPEGImages" if ann is not None else xml_path.parent.parent / "JPEGImages"
    tops = [jpegs] + ([Path(input_dir)] if input_dir is not None else [])
    folders = list(dict.fromkeys([*(t / sub for t in tops), xml_path.parent, *tops]))
    as_written = (Path(*written.parts) if written is not None and len(written.parts) > 1
                  and not written.is_absolute() and not written.drive and ".." not in written.parts
                  else None)
    for cand in [*(t / as_written for t in tops if as_written is not None),
                 *(f / name for f in folders if name)]:
        if cand.is_file():
            return cand
    for folder in folders:
        for stem in dict.fromkeys(s for s in (Path(name).stem if name else "", xml_path.stem) if s):
            found = find_image(folder / stem)
            if found is not None:
                return found
    name = name or xml_path.stem + ".jpg"
    return folders[0] / (name if Path(name).suffix else name + ".jpg")


def _wbc_label(label: str):
    """(is a WBC, class or None) for an object name; (False, None) for anything else."""
    text = label.strip().lower()
    if names_any_wbc(text):  # "WBC", "Leukocyte?": no subtype to score
        return True, None
    for prefix in ("wbc-", "wbc_", "wbc "):
        if text.startswith(prefix):
            text = text[len(prefix):]
    cls = normalise_class(text)
    if cls in CLASSES:
        return True, cls
    if is_other_wbc(text) or is_doubted_wbc(text):  # a blast, "Mono?": a WBC, scored as wrong
        return True, cls
    return False, None


def parse_voc(xml_path: Path, unknown: dict = None) -> tuple:
    """`(filename, [(box, class or None), ...], size)` for the WBC boxes of one VOC XML file;
    `size` is the `(width, height)` of its `<size>`, or None where it gives none (0, as some
    exporters write, or missing). Object names that are neither WBCs nor red cells or platelets
    are counted in `unknown`.

    A box is `(xmin, ymin, xmax - xmin, ymax - ymin)`: the corners as given, as labelImg (whose
    XML layout BCCD's files have) writes them, not PASCAL VOC's 1-based inclusive pixel
    indices, which would make it one pixel larger and shifted by one."""
    try:
        root = ET.parse(xml_path).getroot()
    except (ET.ParseError, OSError) as exc:
        raise TruthError(f"cannot read VOC annotation {xml_path}: {exc}") from exc
    boxes = []
    for obj in root.iter("object"):
        label = (obj.findtext("name") or "").strip()
        is_wbc, cls = _wbc_label(label)
        if not is_wbc:
            if unknown is not None and not is_not_wbc(label):
                unknown[label] = unknown.get(label, 0) + 1
            continue
        bb = obj.find("bndbox")
        try:
            x0, y0, x1, y1 = (float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
        except (AttributeError, TypeError, ValueError):
            raise TruthError(f"{xml_path.name}: an object {label!r} has no valid bndbox") from None
        if not (x1 > x0 and y1 > y0):  # also NaN: a box without area matches no cell
            raise TruthError(f"{xml_path.name}: an object {label!r} has a bndbox without area "
                             f"(xmin {x0:g}, ymin {y0:g}, xmax {x1:g}, ymax {y1:g}): xmax and "
                             "ymax must exceed xmin and ymin")
        boxes.append(((x0, y0, x1 - x0, y1 - y0), cls))
    return (root.findtext("filename") or "").strip(), boxes, _size(root)


def _size(root) -> "tuple | None":
    """The `(width, height)` of an annotation's `<size>`, or None where it has none to go by."""
    try:
        size = tuple(int(float(root.findtext(f"size/{k}"))) for k in ("width", "height"))
    except (TypeError, ValueError, OverflowError):
        return None
    return size if min(size) > 0 else None


class VOCReader:
    """VOC XML WBC boxes, with BCCD's labels.csv subtypes where present."""

    name = "voc"
    priority = 5

    def can_read(self, path: Path) -> bool:
        return any(_is_voc(f) for f in _xml_files(Path(path))[:5])

    def read(self, path: Path, input_dir: Path) -> dict:
        path = Path(path)
        files = [f for f in _xml_files(path) if _is_voc(f)]
        labels = _find_labels(files, path)
        root = path if path.is_dir() else path.parent
        out, unknown, source = {}, {}, {}
        contradicted = []  # labels.csv names a subtype where the XML has no WBC box
        for xml_path in files:
            filename, found, size = parse_voc(xml_path, unknown)
            image = _image_for(xml_path, filename, input_dir, root)
            key = image_key(image, input_dir, root)
            if key in source:  # one would replace the other's boxes, unsaid
                raise TruthError(
                    f"{_shown(source[key], root)} and {_shown(xml_path, root)} both describe "
                    f"{key} (by their <filename>, or their own name): an XML copied from another "
                    "keeps its <filename>; correct the one that describes another image")
            source[key] = xml_path
            boxes = [b for b, _ in found]
            classes = [c for _, c in found]
            subtypes = labels.get(image.stem, [])
            # A subtype is scored on a lone WBC box only: the measure issue #3 and the model card
            # define ("one labelled WBC, found and classified"). Training (`train.datasets.bccd`)
            # also takes several boxes sharing one subtype, as crops to learn from.
            # an object written twice is one box (`truth._settle` drops the copy, saying so)
            if len(set(found)) == 1 and classes[0] is None and len(subtypes) == 1:
                classes = [subtypes[0]] * len(boxes)
            elif not boxes and subtypes:
                contradicted.append(f"{image.stem}: {', '.join(subtypes)}")
            out[key] = ImageTruth(boxes=boxes, box_classes=classes, has_boxes=True, box_size=size)
        if contradicted:
            log.warning("VOC truth: labels.csv names a WBC in %d image(s) whose XML has no WBC "
                        "box (%s%s); they are scored as fields without a WBC",
                        len(contradicted), "; ".join(contradicted[:3]),
                        " ..." if len(contradicted) > 3 else "")
        if unknown:
            log.warning("VOC truth: objects named %s are not taken for WBCs (names read as WBCs: "
                        "WBC, leukocyte, a class such as neutrophil, or a white cell of another "
                        "kind such as a blast, whose class is scored as wrong)",
                        ", ".join(f"{k!r} ({v})" for k, v in sorted(unknown.items())))
        return out


@hookimpl
def wbc_register_truth_readers():
    return [VOCReader()]
