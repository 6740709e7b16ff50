"""Truth reader for YOLO box folders (TXL-PBC and any YOLO export).

One `name.txt` per image: a line `class cx cy w h` per object, coordinates as fractions of the
image width and height. Class 0 is WBC (TXL-PBC: 0 WBC, 1 RBC, 2 Platelet); other classes are
ignored. A label file with no class-0 line means the image has no WBC. `classes.txt` is skipped.

`--truth` may name a labels folder (e.g. `TXL_PBC/labels/test`) or a dataset folder holding
`labels/`. The image of `labels/.../name.txt` is looked for as `images/.../name.<ext>` (the YOLO
convention) and under the run's input folder; boxes stay normalised and are turned into pixels
with the analysed image's size when scoring.
"""

from __future__ import annotations

from pathlib import Path

from wbc_batch.hookspecs import hookimpl
from wbc_batch.truth import ImageTruth, TruthError, find_image, image_key, iter_files

WBC_CLASS = 0
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


def _looks_yolo(txt: Path) -> bool:
    try:
        lines = txt.read_text(encoding="utf-8-sig", errors="replace").split("\n")[:5]
    except OSError:
        return False
    rows = [ln.split() for ln in lines if ln.strip()]
    if not rows:
        return False
    try:
        return all(len(r) == 5 and int(r[0]) >= 0 and all(0.0 <= float(v) <= 1.0001 for v in r[1:])
                   for r in rows)
    except ValueError:
        return False


def parse_yolo(txt: Path) -> list:
    """The normalised `(x, y, w, h)` boxes of class 0 in one YOLO label file."""
    boxes = []
    try:
        text = txt.read_text(encoding="utf-8-sig", errors="replace")
    except OSError as exc:
        raise TruthError(f"cannot read {txt}: {exc.strerror or exc}") from exc
    for number, line in enumerate(text.splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        try:
            if len(parts) < 5:
                raise ValueError
            cls = int(float(parts[0]))
            cx, cy, w, h = (float(v) for v in parts[1:5])
        except ValueError:
            raise TruthError(f"{txt.name} line {number}: expected 'class cx cy w h', got {line!r}") from None
        if cls == WBC_CLASS:
            boxes.append((cx - w / 2, cy - h / 2, w, h))
    return boxes


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
    """YOLO txt label folders; class 0 boxes are WBCs."""

    name = "yolo"
    priority = 5

    def can_read(self, path: Path) -> bool:
        files = _label_files(_label_root(Path(path)))
        return bool(files) and all(_looks_yolo(f) for f in files[:5])

    def read(self, path: Path, input_dir: Path) -> dict:
        root = _label_root(Path(path))
        out = {}
        base = root if root.is_dir() else root.parent
        for txt in _label_files(root):
            image = _image_for(txt, base, Path(input_dir))
            if image is not None:
                key = image_key(image, input_dir, base)
            else:
                key = txt.relative_to(base).with_suffix("").as_posix()
            out[key] = ImageTruth(boxes=parse_yolo(txt), has_boxes=True, box_units="norm")
        return out


@hookimpl
def wbc_register_truth_readers():
    return [YOLOReader()]
