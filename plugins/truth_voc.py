"""Truth reader for Pascal VOC XML annotations (BCCD and any labelImg export).

Boxes named "WBC" (any case) are WBC boxes without a subtype; boxes named after one of the five
classes (e.g. "neutrophil", "NE") are WBC boxes with that class; other names (RBC, Platelets) are
ignored. Box `(x, y, w, h)` is `(xmin, ymin, xmax - xmin, ymax - ymin)`.

BCCD keeps subtypes in a separate `labels.csv` (columns Image, Category; Image n means
`BloodImage_%05d`; Category empty, one class, or several comma-separated). A label is given to a
box only where it is unambiguous: the image has exactly one WBC box and exactly one label. So
classification is scored on BCCD's "images with one labelled WBC".

Images are looked for in `JPEGImages/` beside `Annotations/` (the VOC layout), else beside the
XML; `--truth` may name the dataset folder, the Annotations folder or one XML file.
"""

from __future__ import annotations

import csv
import xml.etree.ElementTree as ET
from pathlib import Path

from wbc_batch import CLASSES
from wbc_batch.hookspecs import hookimpl
from wbc_batch.truth import ImageTruth, TruthError, image_key, iter_files, normalise_class

LABEL_FILES = ("labels.csv",)


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
    for ann in [path / "Annotations", *sorted(path.glob("*/Annotations"))]:
        if ann.is_dir():
            return iter_files(ann, (".xml",))
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


def _image_for(xml_path: Path, filename: str) -> Path:
    name = Path(filename).name if filename else xml_path.stem + ".jpg"
    if not Path(name).suffix:
        name += ".jpg"
    for folder in (xml_path.parent.parent / "JPEGImages", xml_path.parent):
        if (folder / name).is_file():
            return folder / name
    return xml_path.parent.parent / "JPEGImages" / name


def parse_voc(xml_path: Path) -> tuple:
    """`(filename, [(box, class or None), ...])` for the WBC boxes of one VOC XML file."""
    try:
        root = ET.parse(xml_path).getroot()
    except (ET.ParseError, OSError) as exc:
        raise TruthError(f"cannot read VOC annotation {xml_path}: {exc}") from exc
    boxes = []
    for obj in root.iter("object"):
        label = (obj.findtext("name") or "").strip()
        cls = normalise_class(label)
        if label.upper() == "WBC":
            cls = None
        elif cls not in CLASSES:
            continue
        bb = obj.find("bndbox")
        try:
            x0, y0, x1, y1 = (float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
        except (AttributeError, TypeError, ValueError):
            raise TruthError(f"{xml_path.name}: an object {label!r} has no valid bndbox") from None
        boxes.append(((x0, y0, max(0.0, x1 - x0), max(0.0, y1 - y0)), cls))
    return (root.findtext("filename") or "").strip(), boxes


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
        out = {}
        for xml_path in files:
            filename, found = parse_voc(xml_path)
            image = _image_for(xml_path, filename)
            boxes = [b for b, _ in found]
            classes = [c for _, c in found]
            subtypes = labels.get(image.stem, [])
            if len(boxes) == 1 and classes[0] is None and len(subtypes) == 1:
                classes = [subtypes[0]]
            out[image_key(image, input_dir, root)] = ImageTruth(
                boxes=boxes, box_classes=classes, has_boxes=True)
        return out


@hookimpl
def wbc_register_truth_readers():
    return [VOCReader()]
