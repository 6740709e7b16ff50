"""Readers for the training data, in the layouts they are published in, plus simple lab layouts.

Every reader returns plain records; images are read lazily by path. The split files in
`<data>/splits/` fix train/val/test; test rows are never returned for training or selection.

Lab layouts (for fine-tuning on a lab's own scanner):
- segmentation: a folder of images and a `masks/` folder beside them holding PNGs with the same
  stem (0 background, 128 cytoplasm, 255 nucleus), read by `read_mask_folder`;
- classification: one sub-folder per class (`neutrophil/`, `lymphocyte/`, ...), read by
  `read_class_folders`, or a CSV with columns image,class (paths relative to the CSV), read by
  `read_class_csv`.
"""

from __future__ import annotations

import csv
import glob
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

from .. import CLASSES

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")


class TrainingDataError(ValueError):
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


@dataclass
class ClassRecord:
    """A single-cell image with its class."""

    image: Path
    cls: str
    source: str = ""


def _split_rows(path: Path, split: str):
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row["split"] == split:
                yield row


def wbc_image_dataset(data: Path, split: str, dataset: str | None = None) -> list:
    """WBC Image Dataset rows of `split` ("1", "2" or None for both)."""
    root = data / "wbc-image-dataset"
    out = []
    for row in _split_rows(data / "splits" / "wbc-image-dataset.csv", split):
        if dataset and row["dataset"] != dataset:
            continue
        out.append(MaskRecord(root / row["image"], root / row["mask"], row["class"] or None,
                              f"wbc-image-dataset-{row['dataset']}"))
    return out


def pbc(data: Path, split: str) -> list:
    root = data / "pbc-wbc"
    return [ClassRecord(root / r["image"], r["class"], "pbc")
            for r in _split_rows(data / "splits" / "pbc-wbc.csv", split)]


def read_voc_boxes(xml_path: Path, name: str = "WBC") -> list:
    root = ET.parse(xml_path).getroot()
    boxes = []
    for obj in root.findall("object"):
        if obj.findtext("name", "").strip() != name:
            continue
        b = obj.find("bndbox")
        x1, y1, x2, y2 = (int(float(b.findtext(k))) for k in ("xmin", "ymin", "xmax", "ymax"))
        if x2 > x1 and y2 > y1:
            boxes.append((x1, y1, x2 - x1, y2 - y1))
    return boxes


def bccd(data: Path, split: str) -> list:
    """BCCD fields of `split` with WBC boxes; `classes` holds the image's subtype label(s)."""
    root = data / "bccd"
    out = []
    for row in _split_rows(data / "splits" / "bccd.csv", split):
        boxes = read_voc_boxes(root / row["annotation"])
        labels = [s.strip().lower() for s in (row.get("labels") or "").split(",") if s.strip()]
        # the labels are not tied to boxes: only a single subtype for all boxes is unambiguous
        same = len(labels) == len(boxes) and len(set(labels)) == 1
        classes = labels if same else [None] * len(boxes)
        out.append(BoxRecord(root / row["image"], boxes, classes, "bccd"))
    return out


def txl_pbc(data: Path, split: str) -> list:
    """TXL-PBC images of `split` (its own folders) with WBC boxes (YOLO class 0)."""
    import cv2

    root = data / "txl-pbc" / "TXL_PBC"
    out = []
    for label in sorted((root / "labels" / split).glob("*.txt")):
        cands = [p for p in glob.glob(str(root / "images" / split / (label.stem + ".*")))
                 if p.lower().endswith(IMAGE_EXTS)]
        if not cands:
            continue
        img = Path(cands[0])
        im = cv2.imread(str(img), cv2.IMREAD_REDUCED_COLOR_2)
        if im is None:
            continue
        h, w = im.shape[0] * 2, im.shape[1] * 2
        boxes = []
        for line in label.read_text().split("\n"):
            parts = line.split()
            if len(parts) >= 5 and parts[0] == "0":
                cx, cy, bw, bh = (float(v) for v in parts[1:5])
                boxes.append((int((cx - bw / 2) * w), int((cy - bh / 2) * h), int(bw * w), int(bh * h)))
        out.append(BoxRecord(img, boxes, [None] * len(boxes), "txl-pbc"))
    return out


def read_mask_folder(folder: Path) -> list:
    """A lab's segmentation data: images in `folder`, masks in `folder/masks/<stem>.png`."""
    out = []
    for p in sorted(Path(folder).iterdir()):
        if p.suffix.lower() in IMAGE_EXTS:
            m = Path(folder) / "masks" / (p.stem + ".png")
            if m.is_file():
                out.append(MaskRecord(p, m, None, "lab"))
    return out


def read_class_folders(folder: Path) -> list:
    """A lab's classification data: one sub-folder per class name."""
    out = []
    for cls in CLASSES:
        d = Path(folder) / cls
        if d.is_dir():
            out += [ClassRecord(p, cls, "lab") for p in sorted(d.rglob("*"))
                    if p.suffix.lower() in IMAGE_EXTS]
    return out


def read_class_csv(path: Path) -> list:
    """A lab's classification data as a CSV with columns image,class (paths relative to it)."""
    base = Path(path).parent
    with open(path, newline="", encoding="utf-8") as f:
        return [ClassRecord(base / r["image"], r["class"].strip().lower(), "lab")
                for r in csv.DictReader(f) if r["class"].strip().lower() in CLASSES]
