"""Overlays: the input image with each found cell outlined and labelled, for people to check.

For each cell: the outline of the whole cell (cytoplasm edge) in its class colour, the outline of
its nucleus in a light contrasting colour, and a label "id class confidence" on a filled box in
the class colour. Cells flagged needs_review get a dashed white-and-black frame around their
bounding box and a "?" after the confidence (" stain?" when the flag is for an unusual stain), so
they stand out on any background.

Line widths and text size scale with the image size (a 300x300 crop and a 640x480 field both
read well), but never past their size on a field of `FIELD_DIAMETERS` WBC diameters: a 4000x3000
field of cells as large as on a 640x480 one gets the same lines and labels, not labels larger than
its cells. Labels go above or below their cell where they hide no other label and, where they
can, no cell. Work is done on each cell's bounding box, never per pixel in Python.
"""

from __future__ import annotations

import cv2
import numpy as np

from . import CLASSES
from .analysis import label_extents
from .results import ImageAnalysis

#: outline and label colours (RGB), one per class: Okabe and Ito's palette for colour-blind
#: readers (blue, bluish green, orange, vermillion) and black, which stand apart from pink red
#: cells, purple nuclei and the glass. Simulated protanopia, deuteranopia and tritanopia
#: (Machado et al. 2009) leave every two of them at least 16 CIELAB units apart; the colours
#: used before came to 7 (lymphocyte green and monocyte orange under protanopia)
CLASS_COLOURS = {
    "neutrophil": (0, 114, 178),
    "lymphocyte": (0, 158, 115),
    "monocyte": (230, 159, 0),
    "eosinophil": (213, 94, 0),
    "basophil": (0, 0, 0),
}
OTHER_COLOUR = (120, 120, 120)
NUCLEUS_COLOUR = (255, 255, 80)
FONT = cv2.FONT_HERSHEY_SIMPLEX
#: lines and labels are sized by the image's shorter side, but by no more of it than this many WBC
#: diameters. Ordinary fields span fewer (640x480 fields of 80-120 px WBCs: 4-6, single-cell crops:
#: about 2), so they are sized by the image alone; a larger field of such cells (a bigger sensor,
#: a tiled scan) gets their lines and labels, in proportion to its cells, not to the image
FIELD_DIAMETERS = 6.0


def _scale(h: int, w: int, diameter: float = 0.0) -> tuple:
    """(line thickness, font scale, text thickness) for an image of this size whose WBCs are
    `diameter` pixels across (0: unknown, sized by the image alone)."""
    side = min(h, w)
    if diameter > 0:  # also False for NaN
        side = min(side, FIELD_DIAMETERS * diameter)
    thick = max(1, int(round(side / 400)))
    font = float(np.clip(side / 900.0, 0.35, 4.0))
    text = max(1, int(round(font * 1.6)))
    return thick, font, text


def _luminance(rgb) -> float:
    """Relative luminance (WCAG 2) of an sRGB colour."""
    c = np.asarray(rgb, np.float64) / 255.0
    c = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    return float(0.2126 * c[0] + 0.7152 * c[1] + 0.0722 * c[2])


def _text_colour(bg) -> tuple:
    """Black or white, whichever contrasts more with `bg` (WCAG 2 contrast ratio)."""
    lum = _luminance(bg)
    return (0, 0, 0) if (lum + 0.05) / 0.05 >= 1.05 / (lum + 0.05) else (255, 255, 255)


#: the short class names of a label too wide for its image
SHORT_NAMES = {"neutrophil": "NEU", "lymphocyte": "LYM", "monocyte": "MON", "eosinophil": "EOS",
               "basophil": "BAS"}
#: the smallest font scale a label shrinks to before it is cut at the image's edge
MIN_FONT = 0.25


def label_text(cell, short: bool = False, why: bool = True) -> str:
    """The label drawn for a cell: "id class confidence", with "?" when it needs review, and
    " stain?" when that is for its unusual stain (a confident cell is flagged for it too, and the
    overlay alone did not say why; not when `why` is False); the class's three-letter name
    (`SHORT_NAMES`) when `short`."""
    name = SHORT_NAMES.get(cell.cls, cell.cls) if short else cell.cls
    text = f"{cell.cell_id} {name} {cell.confidence:.2f}"
    if not cell.needs_review:
        return text
    return text + (" stain?" if why and getattr(cell, "unusual_stain", False) else "?")


def _fitting_label(cell, font: float, text_thick: int, width: int) -> tuple:
    """(text, font scale, (text width, height), baseline) of the cell's label, fitted to an
    image `width` pixels wide: the full label, else the short class name, else without the
    reason for review (its "?" stays), else a smaller font (down to `MIN_FONT`), so that the
    confidence and the review "?" are not cut off in a small crop."""
    for short, why in ((False, True), (True, True), (True, False)):
        text = label_text(cell, short, why)
        size, base = cv2.getTextSize(text, FONT, font, text_thick)
        if size[0] + 4 <= width:
            return text, font, size, base
    while font > MIN_FONT:
        font = max(MIN_FONT, font * 0.85)
        size, base = cv2.getTextSize(text, FONT, font, text_thick)
        if size[0] + 4 <= width:
            break
    return text, font, size, base


def _outline(out: np.ndarray, region: np.ndarray, x0: int, y0: int, colour, thick: int) -> None:
    if not region.any():
        return
    contours, _ = cv2.findContours(region.astype(np.uint8), cv2.RETR_EXTERNAL,
                                   cv2.CHAIN_APPROX_SIMPLE, offset=(x0, y0))
    # anti-aliasing smears a 1-px line into the background: keep thin lines crisp
    cv2.drawContours(out, contours, -1, colour, thick,
                     lineType=cv2.LINE_AA if thick >= 2 else cv2.LINE_8)


def _dashed_rect(out: np.ndarray, x0: int, y0: int, x1: int, y1: int, thick: int) -> None:
    """A black-and-white dashed rectangle: visible on light and dark backgrounds."""
    dash = max(4, 4 * thick)
    cv2.rectangle(out, (x0, y0), (x1, y1), (0, 0, 0), thick, lineType=cv2.LINE_8)
    for (ax, ay), (bx, by) in (((x0, y0), (x1, y0)), ((x1, y0), (x1, y1)),
                               ((x1, y1), (x0, y1)), ((x0, y1), (x0, y0))):
        length = max(abs(bx - ax), abs(by - ay))
        for s in range(0, length, 2 * dash):
            e = min(s + dash, length)
            p = (ax + (bx - ax) * s // max(length, 1), ay + (by - ay) * s // max(length, 1))
            q = (ax + (bx - ax) * e // max(length, 1), ay + (by - ay) * e // max(length, 1))
            cv2.line(out, p, q, (255, 255, 255), thick, lineType=cv2.LINE_8)


def _overlaps(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _covered(rect, boxes: np.ndarray) -> int:
    """Pixels of the boxes (n, 4: x0, y0, x1, y1) that the rectangle `rect` covers."""
    w = np.minimum(rect[2], boxes[:, 2]) - np.maximum(rect[0], boxes[:, 0])
    h = np.minimum(rect[3], boxes[:, 3]) - np.maximum(rect[1], boxes[:, 1])
    return int((np.clip(w, 0, None) * np.clip(h, 0, None)).sum())


def _place_label(box, size, baseline, shape, placed, cells=()) -> tuple:
    """The label box (x0, y0, x1, y1) of a label of `size` for the cell `box` (x, y, w, h):
    above the cell, else below it, else inside its top-left or bottom-right corner, the first of
    these that overlaps none of the `placed` labels and covers none of the cells' boxes `cells`
    (x0, y0, x1, y1; its own box included). Where none is free, the one that overlaps no label and
    covers least of the cells' boxes; where every one overlaps a label, the one covering least."""
    x, y, w, h = box
    cells = np.asarray(cells, np.int64).reshape(-1, 4)
    tw, th = size
    bh = th + baseline + 4
    bw = tw + 4
    H, W = shape
    candidates = [(x, y - bh - 1), (x, y + h + 1), (x, y), (x + w - bw, y + h - bh)]
    best, best_cost = None, None
    for cx, cy in candidates:
        cx = int(np.clip(cx, 0, max(0, W - bw)))
        cy = int(np.clip(cy, 0, max(0, H - bh)))
        rect = (cx, cy, cx + bw, cy + bh)
        on_labels = any(_overlaps(rect, p) for p in placed)
        cost = (on_labels, _covered(rect, cells))
        if cost == (False, 0):
            return rect
        if best is None or cost < best_cost:
            best, best_cost = rect, cost
    return best


def outline_boxes(labels: np.ndarray, cells) -> dict:
    """cell_id -> (x, y, w, h) of the cell's whole outline in the label map. A cell's reported
    box bounds only its body (`AnalysisParams.box_trim`), so outlines, frames and labels are
    placed by this one; a cell missing from the map falls back to its reported box."""
    ext = label_extents(labels)
    out = {}
    for c in cells:
        if c.cell_id in ext:
            y0, y1, x0, x1 = ext[c.cell_id]
            out[c.cell_id] = (x0, y0, x1 - x0 + 1, y1 - y0 + 1)
        else:
            out[c.cell_id] = (int(c.x), int(c.y), int(c.width), int(c.height))
    return out


def draw_overlay(rgb: np.ndarray, analysis: ImageAnalysis) -> np.ndarray:
    """Draw the cells of `analysis` on a copy of `rgb`.

    :param rgb: the analysed image, uint8 (H, W, 3) RGB (a gray (H, W) image is accepted).
    :param analysis: its `ImageAnalysis`; `cell_labels` and `mask` have the image's size.
    :returns: a new uint8 (H, W, 3) RGB image.
    """
    img = np.asarray(rgb)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    out = np.ascontiguousarray(img[:, :, :3], dtype=np.uint8).copy()
    H, W = out.shape[:2]
    if not analysis.cells:
        return out
    labels, mask = analysis.cell_labels, analysis.mask
    if labels.shape[:2] != (H, W) or mask.shape[:2] != (H, W):
        raise ValueError(f"analysis maps {labels.shape[:2]} do not match the image {(H, W)}")
    thick, font, text_thick = _scale(H, W, float(analysis.diameter_px or 0.0))
    cells = sorted(analysis.cells, key=lambda c: c.cell_id)
    known = analysis.outlines
    extents = known if all(c.cell_id in known for c in cells) else outline_boxes(labels, cells)
    boxes = np.array([(bx, by, bx + bw, by + bh) for bx, by, bw, bh in (extents[c.cell_id] for c in cells)],
                     np.int64).reshape(-1, 4)

    # outlines first, labels on top of all outlines
    for cell in cells:
        colour = CLASS_COLOURS.get(cell.cls, OTHER_COLOUR)
        bx, by, bw, bh = extents[cell.cell_id]
        x0, y0 = max(0, bx - 1), max(0, by - 1)
        x1, y1 = min(W, bx + bw + 1), min(H, by + bh + 1)
        own = labels[y0:y1, x0:x1] == cell.cell_id
        _outline(out, own, x0, y0, colour, thick + 1)
        _outline(out, own & (mask[y0:y1, x0:x1] == 255), x0, y0, NUCLEUS_COLOUR, thick)
        if cell.needs_review:
            pad = 2 * thick + 2
            _dashed_rect(out, max(0, x0 - pad), max(0, y0 - pad), min(W - 1, x1 + pad),
                         min(H - 1, y1 + pad), thick)

    placed = []
    for cell in cells:
        colour = CLASS_COLOURS.get(cell.cls, OTHER_COLOUR)
        text, size, (tw, th), base = _fitting_label(cell, font, text_thick, W)
        rect = _place_label(extents[cell.cell_id], (tw, th), base, (H, W), placed, boxes)
        placed.append(rect)
        rx0, ry0, rx1, ry1 = rect
        cv2.rectangle(out, (rx0, ry0), (rx1 - 1, ry1 - 1), colour, cv2.FILLED)
        if cell.needs_review:
            cv2.rectangle(out, (rx0, ry0), (rx1 - 1, ry1 - 1), (255, 255, 255), max(1, thick))
        cv2.putText(out, text, (rx0 + 2, ry1 - base - 2), FONT, size, _text_colour(colour),
                    text_thick, lineType=cv2.LINE_AA)
    return out


def legend() -> dict:
    """`{class: RGB colour}` of the outlines, in `CLASSES` order: for a plugin or script that
    draws a key to the overlays."""
    return {c: CLASS_COLOURS[c] for c in CLASSES}
