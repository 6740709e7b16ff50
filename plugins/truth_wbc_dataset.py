"""Truth reader for the WBC Image Dataset layout (Zheng et al. 2018).

Layout: `Dataset k/NNN.bmp` images with `NNN.png` masks beside them (0 background, 128 cytoplasm,
255 nucleus) and, in the folder holding the `Dataset k` folders, `Class Labels of Dataset k.csv`
(columns "image ID", "class" or "class label"; codes 1..5 = neutrophil, lymphocyte, monocyte,
eosinophil, basophil). `--truth` may name the top folder or one `Dataset k` folder.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

from wbc_batch import CLASSES
from wbc_batch.hookspecs import hookimpl
from wbc_batch.truth import ImageTruth, TruthError, image_key

_DATASET = re.compile(r"^dataset\s*(\d+)$", re.IGNORECASE)
_LABELS = re.compile(r"^class labels of dataset\s*(\d+)\.csv$", re.IGNORECASE)


def _dataset_dirs(path: Path) -> list:
    if path.is_dir() and _DATASET.match(path.name):
        return [path]
    if not path.is_dir():
        return []
    return sorted(p for p in path.iterdir() if p.is_dir() and _DATASET.match(p.name))


def _mask_of(image: Path):
    """The mask beside an image (`001.bmp` -> `001.png`, `.PNG` or `.Png`), or None."""
    for suffix in (".png", ".PNG", ".Png"):
        mask = image.with_suffix(suffix)
        if mask.is_file():
            return mask
    return None


def _images(folder: Path) -> list:
    return sorted(p for p in folder.iterdir()
                  if p.suffix.lower() == ".bmp" and not p.name.startswith("."))


def _has_pairs(folder: Path) -> bool:
    return any(_mask_of(p) is not None for p in _images(folder))


def read_class_labels(csv_path: Path) -> dict:
    """`{image id (int): class name}` from a `Class Labels of Dataset k.csv`."""
    out = {}
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.reader(fh))
    except OSError as exc:
        raise TruthError(f"cannot read {csv_path}: {exc.strerror or exc}") from exc
    for line, row in enumerate(rows[1:], start=2):
        if len(row) < 2 or not row[0].strip():
            continue
        try:
            image_id, code = int(row[0]), int(row[1])
        except ValueError:
            raise TruthError(f"{csv_path.name} line {line}: expected two integers, got {row!r}") from None
        if not 1 <= code <= len(CLASSES):
            raise TruthError(f"{csv_path.name} line {line}: class code {code} is not 1..{len(CLASSES)}")
        out[image_id] = CLASSES[code - 1]
    return out


class WBCDatasetReader:
    """The WBC Image Dataset: masks beside the images, class codes in one CSV per dataset."""

    name = "wbc_dataset"
    priority = 10

    def can_read(self, path: Path) -> bool:
        path = Path(path)
        return any(_has_pairs(d) for d in _dataset_dirs(path))

    def read(self, path: Path, input_dir: Path) -> dict:
        path = Path(path)
        out = {}
        for folder in _dataset_dirs(path):
            number = int(_DATASET.match(folder.name).group(1))
            labels = {}
            for cand in folder.parent.iterdir():
                m = _LABELS.match(cand.name)
                if m and int(m.group(1)) == number:
                    labels = read_class_labels(cand)
            for image in _images(folder):
                try:
                    image_id = int(image.stem)
                except ValueError:
                    image_id = None
                truth = ImageTruth(mask_path=_mask_of(image), cls=labels.get(image_id))
                if truth.mask_path is None and truth.cls is None:
                    continue
                out[image_key(image, input_dir, folder.parent)] = truth
        return out


@hookimpl
def wbc_register_truth_readers():
    return [WBCDatasetReader()]
