"""Accuracy against ground truth: pixel, classification, cell-finding and calibration metrics.

Pure numpy (OpenCV only to read a truth mask, pandas only to shape the tables).

Pixels (the seed paper's table). Per image, the predicted and the true masks are compared for
the whole WBC (cytoplasm or nucleus) and for the nucleus: TP, FP, FN, TN pixel counts. Then
IoU = TP/(TP+FP+FN), Recall = TP/(TP+FN), Precision = TP/(TP+FP), ACC = (TP+TN)/all pixels,
computed on counts summed over all images (the paper's way) and per image (their mean, too).
Mask levels are read as the nearest of 0 / 128 / 255 (whole WBC: value >= 64; nucleus: value
>= 192), which equals "> 0" and "== 255" on clean masks and ignores the few near-zero
anti-aliasing pixels some WBC Image Dataset 2 masks have. Masks saved in other conventions are
recognised from their pixels (`standard_mask`), also when saved as JPEG or resized: 0/1/2 as
label maps (1 cytoplasm, 2 nucleus); 0/1, 0/255 and other one-value masks as whole-cell masks,
with no nucleus metrics for them.

Classes. A single-cell image (truth `cls`) is predicted by the cell nearest the image centre (the
one containing it, else the closest box; ties to the larger cell). A labelled truth box is
predicted by the cell matched to it. No cell found counts as a wrong answer, shown as "(none)" in
the confusion matrix; accuracy among found cells is reported beside it. Precision, recall and F1
are 0 where undefined (as scikit-learn's zero_division=0); macro-F1 averages over the classes
that occur in the truth or the predictions.

Cell finding. Truth WBC boxes and the boxes of the found cells are matched greedily by box IoU
(highest first, each box used once, IoU >= 0.5). Recall = matched / truth boxes, precision =
matched / found cells; the class accuracy on matched cells uses the truth boxes that have a class.

Intervals. Class accuracy, cell-finding recall and precision come with a 95 % Wilson score
interval (`wilson_interval`), as `<metric>_ci95_low` / `_ci95_high` rows of the summary: how far
the share could be from what the same models would score on many more images like these, from
the number of cells or boxes alone. Test sets of a few dozen cells leave several points either way.
Pixels are not independent draws, so the pixel metrics have none.

Calibration. Expected calibration error over 15 equal-width confidence bins:
ECE = sum over bins of (cells in bin / cells) * |accuracy in bin - mean confidence in bin|.

A failed image (status "error") is scored as predicting nothing: an empty mask, no class, no
cells. So a crash never improves a score.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from functools import partial
from typing import Optional

import numpy as np

from . import CLASSES

log = logging.getLogger("wbc_batch")

REGIONS = ("wbc", "nucleus")
NONE = "(none)"
IOU_MATCH = 0.5
ECE_BINS = 15
#: z of a two-sided 95 % interval
Z95 = 1.959963984540054


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple:
    """The Wilson score interval (low, high) of the share successes / n, as fractions; (nan,
    nan) when n is 0. It stays within 0..1 and, unlike p +- z * SE, is not a point at 0 or n."""
    if n <= 0:
        return math.nan, math.nan
    p = successes / n
    z2 = z * z / n
    centre = (p + z2 / 2.0) / (1.0 + z2)
    half = z * math.sqrt(p * (1.0 - p) / n + z2 / (4.0 * n)) / (1.0 + z2)
    # exactly 0 or 1 at the ends (floating point gave 0.9999999999999999 for n of n)
    return (0.0 if successes <= 0 else max(0.0, centre - half),
            1.0 if successes >= n else min(1.0, centre + half))


def _with_interval(section: str, metric: str, successes: int, n: int) -> list:
    """Summary rows of a share and its 95 % interval."""
    low, high = wilson_interval(successes, n)
    return [(section, metric, _ratio(successes, n), n),
            (section, f"{metric}_ci95_low", low, n), (section, f"{metric}_ci95_high", high, n)]


# --- pixels ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PixelCounts:
    """Pixel confusion counts of one region; add them to sum over images."""

    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0

    def __add__(self, other: "PixelCounts") -> "PixelCounts":
        return PixelCounts(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn,
                           self.tn + other.tn)

    @property
    def total(self) -> int:
        return self.tp + self.fp + self.fn + self.tn

    @property
    def iou(self) -> float:
        return _ratio(self.tp, self.tp + self.fp + self.fn)

    @property
    def recall(self) -> float:
        return _ratio(self.tp, self.tp + self.fn)

    @property
    def precision(self) -> float:
        return _ratio(self.tp, self.tp + self.fp)

    @property
    def acc(self) -> float:
        return _ratio(self.tp + self.tn, self.total)

    @property
    def dice(self) -> float:
        return _ratio(2 * self.tp, 2 * self.tp + self.fp + self.fn)


def _ratio(num, den) -> float:
    return float(num) / float(den) if den else float("nan")


def pixel_counts(pred: np.ndarray, truth: np.ndarray) -> PixelCounts:
    """TP, FP, FN, TN of two boolean arrays of the same shape."""
    pred = np.asarray(pred, dtype=bool)
    truth = np.asarray(truth, dtype=bool)
    if pred.shape != truth.shape:
        raise ValueError(f"mask shapes differ: {pred.shape} vs {truth.shape}")
    tp = int(np.count_nonzero(pred & truth))
    fp = int(np.count_nonzero(pred)) - tp
    fn = int(np.count_nonzero(truth)) - tp
    return PixelCounts(tp, fp, fn, int(pred.size) - tp - fp - fn)


def mask_regions(mask: np.ndarray, binary: bool = False) -> dict:
    """`{"wbc": bool array, "nucleus": bool array or None}` from a 0/128/255 (or 0/1) mask."""
    mask = np.asarray(mask)
    if binary:
        return {"wbc": mask > 0, "nucleus": None}
    return {"wbc": mask >= 64, "nucleus": mask >= 192}


#: share of a mask's cell pixels that must lie in a solid mid-grey region (one that survives a
#: 3x3 erosion) for it to be read as nucleus + cytoplasm: the ring of mid-grey pixels that
#: anti-aliasing, resizing or JPEG leave around a whole-cell mask is one or two pixels wide and
#: has no such core, while cytoplasm has (in every WBC Image Dataset train and val mask, several
#: times this share; `tests/test_metrics.py` draws both kinds)
MID_CORE_SHARE = 0.02
#: in a 0/1/2 label map, the share of the cell that must be nucleus (value 2) for it to be read
#: as one; fewer 2s are JPEG noise on a 0/1 whole-cell mask (at quality 75, PIL's default, a few
#: per cent of a cell's pixels, along its edge), while a WBC's nucleus is a large part of it
LABEL_NUCLEUS_SHARE = 0.10


def standard_mask(mask: np.ndarray) -> tuple:
    """A mask as labs save it -> (0/128/255 mask, binary), binary meaning a whole-cell mask
    with no nucleus region in it. The convention is read from the pixels, so that masks saved
    as JPEG, resized or anti-aliased are read as they were drawn:

    - at most 3 (a label map: 1 cytoplasm, 2 nucleus, or a 0/1 whole-cell mask): a label map
      when at least `LABEL_NUCLEUS_SHARE` of its cell is 2, scaled to 128/255; else whole-cell;
    - 0 to 255: nucleus + cytoplasm (as it is) when it has pixels of 192 and more and
      cytoplasm: 128s in a mask of exactly 0/128/255, else a solid mid-grey region
      (`MID_CORE_SHARE`); otherwise a whole-cell mask (0/255, or one value such as 128), cut at
      half its maximum. A WBC always shows some cytoplasm, so 0/255 is not read as "all nucleus";
    - all zero (a field without a WBC): as it is, not binary, so both regions are scored.
    """
    mask = np.asarray(mask)
    top = int(mask.max()) if mask.size else 0
    if top == 0:
        return mask, False
    if top <= 3:
        labels = np.minimum(mask, 2)
        cell = int(np.count_nonzero(labels))
        if np.count_nonzero(labels == 2) >= LABEL_NUCLEUS_SHARE * cell:
            return np.array([0, 128, 255], np.uint8)[labels], False
        return np.where(labels > 0, 255, 0).astype(np.uint8), True
    exact = set(np.unique(mask).tolist()) <= {0, 128, 255}
    mid = 128 in mask if exact else _mid_core_share(mask) >= MID_CORE_SHARE
    if mid and (mask >= 192).any():
        return mask, False
    return np.where(mask >= max(top / 2.0, 1.0), 255, 0).astype(np.uint8), True


#: a mask marking more than this share of its image as WBC is left out: drawn inverted (the
#: glass white), most likely; the WBC Image Dataset's crops reach 0.52
MAX_WBC_SHARE = 0.85
#: ... and so is one marking half of it or more as WBC, this share of its edge pixels included:
#: an inverted mask of a crowded field (WBCs over a fifth of it) marks the glass along most of
#: its edges (all but the cells cut by them), while a crop's cell touches its edges at a few
#: places (no WBC Image Dataset mask touches them)
INVERTED_EDGE_SHARE = 0.75


def inverted_share(fg: np.ndarray):
    """The share of the image a mask marks as WBC (`fg`, a bool array) when it looks drawn
    inverted, the glass marked and the cells not (`MAX_WBC_SHARE`, `INVERTED_EDGE_SHARE`), else
    None. Training leaves such a mask out, and so do the pixel metrics."""
    share = float(np.count_nonzero(fg)) / fg.size
    edge = np.concatenate([fg[0], fg[-1], fg[:, 0], fg[:, -1]])
    if share > MAX_WBC_SHARE or (share >= 0.5 and edge.mean() >= INVERTED_EDGE_SHARE):
        return share
    return None


def _mid_core_share(mask: np.ndarray) -> float:
    """The share of the cell pixels (>= 64) in mid-grey (64-191) that a 3x3 erosion of the
    mid-grey region keeps: thick regions (cytoplasm), not one- or two-pixel edges."""
    import cv2

    mid = ((mask >= 64) & (mask < 192)).astype(np.uint8)
    cell = int(np.count_nonzero(mask >= 64))
    if cell == 0:
        return 0.0
    return int(np.count_nonzero(cv2.erode(mid, np.ones((3, 3), np.uint8)))) / cell


def read_mask(path) -> np.ndarray:
    """A truth mask as a 2-D uint8 array:

    - grey values as they are (16-bit scaled to 8; grey saved as RGB, RGBA or with a grey
      palette alike; a fully transparent pixel is background);
    - a palette PNG with a coloured entry in use (a VOC-style label map): its palette indices;
    - a mask in one colour on black (red on black, anti-aliased or from a JPEG too): as grey,
      by its strongest channel.

    :raises ValueError: the file cannot be read as an image, it holds colours of more than
        one hue (a colour-coded mask, whose classes would merge), it is a mask of cell ids
        (`_refuse_cell_ids`), or a label map with VOC's "void" value 255 (`_refuse_void`).
    """
    mask = _read_mask(path)
    _refuse_void(mask, path)
    return mask


def _refuse_void(mask: np.ndarray, path) -> None:
    """Refuse a 0/1/2 label map that marks pixels 255, as PASCAL VOC marks each object's border
    and labelme2voc its `__ignore__` regions: pixels not to be scored. Read by its values, the
    255s alone were the cell (its border ring), and the cell inside was background."""
    import cv2

    values = np.unique(mask)
    labels = values[(values > 0) & (values <= 3)]
    if not (labels.size and values[-1] == 255 and set(values.tolist()) <= {0, 1, 2, 3, 255}):
        return
    region = ((mask > 0) & (mask <= 3)).astype(np.uint8)
    # labelled cells, not a few touched-up pixels along a 0/255 mask's edge: as many labelled
    # pixels as void ones (VOC's borders), or a solid core (a small cell in a large ignore band)
    if (np.count_nonzero(region) >= np.count_nonzero(mask == 255)
            or np.count_nonzero(cv2.erode(region, np.ones((3, 3), np.uint8))) >= CELL_ID_CORE):
        raise ValueError(
            f"truth mask {path} is a label map ({', '.join(map(str, labels.tolist()))}) with "
            "pixels of 255, VOC's 'void' (not to be scored), which wbc-batch cannot leave out: "
            "save it with those pixels set to their region's label (0 background, 1 cytoplasm, "
            "2 nucleus)")


def _read_mask(path) -> np.ndarray:
    """`read_mask` without the void check."""
    import cv2

    data = np.fromfile(str(path), dtype=np.uint8)  # np.fromfile: unicode paths work everywhere
    mask = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if mask is None:
        raise ValueError(f"cannot read truth mask {path}")
    _refuse_cell_ids(mask, path)
    if mask.dtype == np.uint16:
        mask = (mask >> 8).astype(np.uint8) if mask.max() > 255 else mask.astype(np.uint8)
    mask = mask.astype(np.uint8, copy=False)
    if mask.ndim == 3 and mask.shape[2] == 4:
        mask = np.where(mask[..., 3:] == 0, 0, mask)  # transparent: background
    if mask.ndim == 3 and mask.shape[2] >= 3:
        rgb = np.ascontiguousarray(mask[..., :3][..., ::-1])
        colours = _colours(rgb)
        tinted = [c for c in colours if not c[0] == c[1] == c[2]]
        palette = _png_palette(data.tobytes())
        if palette and tinted:  # a label map saved with a palette (VOC style): indices are labels
            return _palette_indices(rgb, palette, colours, path)
        if tinted and not _one_hue(tinted):
            raise ValueError(f"truth mask {path} is in several colours; save it as grey values "
                             "(0 background, 128 cytoplasm, 255 nucleus) or as a 0/1/2 label map")
        return mask[..., :3].max(axis=2)
    if mask.ndim == 3:
        return mask[..., 0]
    return mask


#: a grey mask whose values all lie under this (per dtype) may be one of cell ids (1..N)
CELL_ID_TOP = {np.dtype(np.uint8): 64, np.dtype(np.uint16): 4096}
#: pixels a value's region keeps after a 3x3 erosion to count as a cell's (JPEG noise along
#: the edges of a 0/1/2 label map leaves no such core)
CELL_ID_CORE = 20


def _refuse_cell_ids(mask: np.ndarray, path) -> None:
    """Refuse a grey mask of cell ids (0 background, 1..N one value per cell, as cellpose, CVAT
    and QuPath export them, often 16-bit): read as grey levels, the ids under half the largest
    would become background and the rest whole cells. Taken for one when it has 4 or more
    values, all under `CELL_ID_TOP`, each a solid region (`CELL_ID_CORE`).

    :raises ValueError: naming the file, the values and the layouts that are read."""
    import cv2

    limit = CELL_ID_TOP.get(mask.dtype)
    if mask.ndim != 2 or limit is None:
        return
    top = int(mask.max()) if mask.size else 0
    if top in (2, 3):
        _refuse_few_cell_ids(mask, path)
        return
    if not 4 <= top < limit:
        return
    values = np.unique(mask)
    values = values[values > 0]
    if len(values) < 4:
        return
    kernel = np.ones((3, 3), np.uint8)
    solid = 0
    for v in values:
        if np.count_nonzero(cv2.erode((mask == v).astype(np.uint8), kernel)) >= CELL_ID_CORE:
            solid += 1
            if solid == 4:
                raise ValueError(
                    f"truth mask {path} holds {len(values)} values from {int(values[0])} to "
                    f"{top}, each a region of its own: a mask of cell ids (as cellpose, CVAT or "
                    "QuPath export), not of cell parts; save it as grey values (0 background, "
                    "128 cytoplasm, 255 nucleus), a 0/1/2 label map, or 0/255 whole cells")


def _refuse_few_cell_ids(mask: np.ndarray, path) -> None:
    """Refuse a mask of two or three cell ids (1, 2, 3), which reads like a 0/1/2 label map: its
    cell 1 would become all cytoplasm and the others all nucleus. Told apart by where its 2s and
    3s lie: in a label map nuclei lie in their cell's cytoplasm, so regions of 2 touch a 1; in a
    mask of ids a cell's region touches no other, unless the cells touch. So the mask is refused
    when it has a solid region of 1s and, for the value 2 (or 3), every solid region
    (`CELL_ID_CORE`) of it touches no 1 (nor a 2: a label map saved as JPEG rings to 3 inside
    its nuclei). Not caught: ids of cells that all touch cell 1, or in a chain (3 touching 2
    touching 1), and ids saved as JPEG, whose ringing puts 1s along every region's edge. A
    label map with a cell drawn as nucleus alone, beside cells with cytoplasm, is read as one."""
    import cv2

    kernel = np.ones((3, 3), np.uint8)
    ones = (mask == 1).astype(np.uint8)
    if np.count_nonzero(cv2.erode(ones, kernel)) < CELL_ID_CORE:  # no cell 1 (a JPEG's noise)
        return
    near_one = cv2.dilate(ones, kernel) > 0
    # a 3 beside a 2 is a label map's JPEG ringing inside a nucleus (a 0/1/2 map saved at
    # quality 75 had a solid patch of 3s there); ids 2 and 3 that touch are told by the 2s
    near_two = cv2.dilate((mask == 2).astype(np.uint8), kernel) > 0
    for value in (2, 3):
        n, regions = cv2.connectedComponents((mask == value).astype(np.uint8), connectivity=8)
        solid = [regions == k for k in range(1, n)
                 if np.count_nonzero(cv2.erode((regions == k).astype(np.uint8), kernel))
                 >= CELL_ID_CORE]  # not specks: JPEG noise, anti-aliasing
        near = near_one if value == 2 else near_one | near_two
        if solid and not any(near[region].any() for region in solid):
            raise ValueError(
                f"truth mask {path} holds the values 1 to {int(mask.max())}, and no region of "
                f"{value}s touches a 1: a mask of cell ids (as cellpose, CVAT or QuPath "
                "export), not a 0/1/2 label map (whose nuclei, 2, lie in their cells' "
                "cytoplasm, 1); save it as grey values (0 background, 128 cytoplasm, 255 "
                "nucleus), a 0/1/2 label map, or 0/255 whole cells")


def _one_hue(colours: list, dark: int = 32, margin: int = 16) -> bool:
    """Whether the colours are shades of one colour: every clearly coloured one (not near-black,
    its strongest channel ahead of the next by `margin`) has the same strongest channel. JPEG
    edges of a red mask stay red; red and green classes are two hues."""
    strongest = set()
    for c in colours:
        ordered = sorted(c)
        if ordered[2] >= dark and ordered[2] - ordered[1] >= margin:
            strongest.add(int(np.argmax(c)))
    return len(strongest) <= 1


def _png_palette(data: bytes) -> list:
    """The PLTE colours (RGB tuples) of a palette PNG, in index order; [] for anything else."""
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return []
    pos = 8
    while pos + 8 <= len(data):
        length = int.from_bytes(data[pos:pos + 4], "big")
        kind = data[pos + 4:pos + 8]
        if kind == b"IHDR" and data[pos + 17:pos + 18] != b"\x03":  # colour type 3: palette
            return []
        if kind == b"PLTE":
            body = data[pos + 8:pos + 8 + length]
            return [tuple(body[i:i + 3]) for i in range(0, len(body) - 2, 3)]
        if kind == b"IDAT":
            return []
        pos += 12 + length
    return []


def _codes(rgb: np.ndarray) -> np.ndarray:
    return (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]


def _colours(rgb: np.ndarray) -> list:
    """The distinct (r, g, b) colours of an image."""
    return [((v >> 16) & 255, (v >> 8) & 255, v & 255) for v in np.unique(_codes(rgb)).tolist()]


def _palette_indices(rgb: np.ndarray, palette: list, colours: list, path) -> np.ndarray:
    """Each pixel's palette index, as uint8 (`colours`: the image's distinct colours, sorted as
    np.unique sorts their codes)."""
    lut = []
    for colour in colours:  # a colour listed twice (black padding) is its first entry
        indices = [i for i, entry in enumerate(palette) if entry == colour]
        if not indices:
            raise ValueError(f"truth mask {path}: colour {colour} is not in its palette")
        lut.append(indices[0])
    _, inverse = np.unique(_codes(rgb), return_inverse=True)
    return np.asarray(lut, np.uint8)[inverse].reshape(rgb.shape[:2])


def region_counts(pred_mask: Optional[np.ndarray], truth_mask: np.ndarray,
                  shape: Optional[tuple] = None) -> dict:
    """`{region: PixelCounts}` comparing a predicted and a truth mask (prediction None: empty).

    A truth mask of another size is resized (nearest neighbour) to the prediction's, or, with no
    prediction, to `shape` (the image's height, width) when given: so each image counts in the
    summed figures with its own pixels, whatever resolution its mask was saved at. The truth
    is read by `standard_mask`: a 0/1 or 0/255 mask is a whole-cell mask (no nucleus region);
    an all-zero one (a field without a WBC) has
    both regions, empty, so a predicted nucleus there counts against the nucleus figures too.
    """
    truth_mask, binary = standard_mask(truth_mask)
    if pred_mask is not None:
        shape = pred_mask.shape[:2]
    if shape and tuple(shape) != truth_mask.shape[:2]:
        import cv2

        truth_mask = cv2.resize(truth_mask, (int(shape[1]), int(shape[0])),
                                interpolation=cv2.INTER_NEAREST)
    if pred_mask is None:
        pred_mask = np.zeros(truth_mask.shape[:2], np.uint8)
    truth = mask_regions(truth_mask, binary)
    pred = mask_regions(pred_mask)
    return {r: pixel_counts(pred[r], truth[r]) for r in REGIONS if truth[r] is not None}


# --- boxes -------------------------------------------------------------------------------------

def box_iou_matrix(a, b) -> np.ndarray:
    """IoU of every box of `a` with every box of `b`; boxes are `(x, y, w, h)`."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    ax0, ay0, ax1, ay1 = a[:, 0:1], a[:, 1:2], a[:, 0:1] + a[:, 2:3], a[:, 1:2] + a[:, 3:4]
    bx0, by0, bx1, by1 = b[:, 0], b[:, 1], b[:, 0] + b[:, 2], b[:, 1] + b[:, 3]
    iw = np.clip(np.minimum(ax1, bx1) - np.maximum(ax0, bx0), 0, None)
    ih = np.clip(np.minimum(ay1, by1) - np.maximum(ay0, by0), 0, None)
    inter = iw * ih
    union = (a[:, 2:3] * a[:, 3:4]) + (b[:, 2] * b[:, 3]) - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, inter / union, 0.0)


def match_boxes(truth_boxes, pred_boxes, threshold: float = IOU_MATCH) -> list:
    """Greedy one-to-one matching by IoU, highest first: `[(truth index, pred index, iou), ...]`."""
    if len(truth_boxes) == 0 or len(pred_boxes) == 0:
        return []
    iou = box_iou_matrix(truth_boxes, pred_boxes)
    order = np.argsort(-iou, axis=None, kind="stable")
    used_t, used_p, out = set(), set(), []
    for flat in order:
        i, j = divmod(int(flat), iou.shape[1])
        if iou[i, j] < threshold:
            break
        if i in used_t or j in used_p:
            continue
        used_t.add(i)
        used_p.add(j)
        out.append((i, j, float(iou[i, j])))
    return sorted(out)


def central_cell(cells, width: int, height: int):
    """The cell a single-cell image is about: nearest the image centre, ties to the larger one."""
    if not cells:
        return None
    cx, cy = width / 2.0, height / 2.0

    def key(cell):
        dx = max(cell.x - cx, 0.0, cx - (cell.x + cell.width))
        dy = max(cell.y - cy, 0.0, cy - (cell.y + cell.height))
        return (math.hypot(dx, dy), -cell.area_px)

    return min(cells, key=key)


# --- classes and calibration ---------------------------------------------------------------------

def class_labels(true, pred) -> list:
    """Classes to report: `CLASSES` order first, then any other label, never "(none)"."""
    seen = {c for c in list(true) + list(pred) if c is not None and c != NONE}
    return [c for c in CLASSES if c in seen] + sorted(seen - set(CLASSES))


def classification_report(true, pred) -> dict:
    """Accuracy and per-class precision / recall / F1 of paired labels (pred may be "(none)").

    :returns: dict with `n`, `correct`, `accuracy`, `error_rate`, `macro_f1`, `labels` and
        `per_class` (a list of dicts: class, support, predicted, correct, precision, recall, f1).
    """
    true = list(true)
    pred = [NONE if p is None else p for p in pred]
    n = len(true)
    correct = sum(1 for t, p in zip(true, pred) if t == p)
    labels = class_labels(true, pred)
    per_class = []
    for c in labels:
        support = sum(1 for t in true if t == c)
        predicted = sum(1 for p in pred if p == c)
        hits = sum(1 for t, p in zip(true, pred) if t == c and p == c)
        precision = hits / predicted if predicted else 0.0
        recall = hits / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class.append({"class": c, "support": support, "predicted": predicted, "correct": hits,
                          "precision": precision, "recall": recall, "f1": f1})
    accuracy = correct / n if n else float("nan")
    return {"n": n, "correct": correct, "accuracy": accuracy,
            "error_rate": 1.0 - accuracy if n else float("nan"),
            "macro_f1": float(np.mean([r["f1"] for r in per_class])) if per_class else float("nan"),
            "labels": labels, "per_class": per_class}


def confusion_matrix(true, pred, labels=None) -> tuple:
    """`(rows, columns, counts)`: rows are true labels, columns predicted labels plus "(none)"."""
    pred = [NONE if p is None else p for p in pred]
    rows = list(labels) if labels is not None else class_labels(true, pred)
    cols = rows + [NONE]
    index_r = {c: i for i, c in enumerate(rows)}
    index_c = {c: i for i, c in enumerate(cols)}
    counts = np.zeros((len(rows), len(cols)), dtype=np.int64)
    for t, p in zip(true, pred):
        if t in index_r and p in index_c:
            counts[index_r[t], index_c[p]] += 1
    return rows, cols, counts


def calibration_bins(confidences, correct, bins: int = ECE_BINS) -> list:
    """Per-bin `(lower, upper, count, mean confidence, accuracy)`; bins are (lo, hi], 0 in the first."""
    conf = np.asarray(confidences, dtype=np.float64)
    hit = np.asarray(correct, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, bins - 1)
    out = []
    for b in range(bins):
        sel = which == b
        count = int(sel.sum())
        out.append((float(edges[b]), float(edges[b + 1]), count,
                    float(conf[sel].mean()) if count else float("nan"),
                    float(hit[sel].mean()) if count else float("nan")))
    return out


def expected_calibration_error(confidences, correct, bins: int = ECE_BINS) -> float:
    """ECE over equal-width bins (NaN for no samples)."""
    table = calibration_bins(confidences, correct, bins)
    n = sum(row[2] for row in table)
    if not n:
        return float("nan")
    return float(sum(count / n * abs(acc - conf) for _, _, count, conf, acc in table if count))


# --- one image ---------------------------------------------------------------------------------

@dataclass
class ImageScore:
    """How one image compares with its truth; summed into tables by `accuracy_tables`.

    pixels: `{region: PixelCounts}` for the regions the truth mask defines (empty: no mask truth
        or no prediction to compare).
    true_cls / pred_cls / confidence: the single-cell answer (pred_cls None: no cell found).
    matches: `[(truth box index, cell_id, iou)]`; box_pairs: `(true class, predicted class or
        None, confidence or None)` for each truth box that has a class.
    """

    image: str
    status: str = "ok"
    note: str = ""
    pixels: dict = field(default_factory=dict)
    true_cls: Optional[str] = None
    pred_cls: Optional[str] = None
    confidence: Optional[float] = None
    has_boxes: bool = False
    n_truth_boxes: int = 0
    n_pred_cells: int = 0
    matches: list = field(default_factory=list)
    box_pairs: list = field(default_factory=list)


#: how far a truth mask's width/height ratio may be from its image's for the mask to be scaled
#: to it (a mask saved at another resolution); beyond it the mask belongs to another image
#: or was turned, and scoring it would give numbers that mean nothing
ASPECT_TOLERANCE = 0.01


def _size(array: np.ndarray) -> str:
    return f"{array.shape[1]}x{array.shape[0]}"


def _same_shape(a: tuple, b: tuple) -> bool:
    """Whether arrays of shapes `a` and `b` have the same width/height ratio: the width of each,
    from the other scaled to its height, is within `ASPECT_TOLERANCE` of it, or one pixel."""
    def close(x, y) -> bool:
        width = y[1] * x[0] / y[0]
        return abs(x[1] - width) <= max(1.0, ASPECT_TOLERANCE * x[1])

    return close(a, b) or close(b, a)


def score_image(analysis, result, truth, pred_mask: Optional[np.ndarray] = None) -> ImageScore:
    """Compare one image's analysis with its truth.

    :param analysis: the `ImageAnalysis` (its `.mask` is the prediction), or None.
    :param result: the `ImageResult` (its `.cells` are the found cells).
    :param truth: the `ImageTruth` of this image.
    :param pred_mask: a predicted 0/128/255 mask to use when `analysis` is None (e.g. read back
        from OUT/masks); without either, an ok image gets no pixel metrics (noted).
    """
    ok = result.status == "ok"
    cells = list(result.cells) if ok else []
    score = ImageScore(image=result.image, status=result.status)
    notes = [] if ok else [f"failed: {result.error}"]

    if truth.mask_path is not None:
        try:
            truth_mask = read_mask(truth.mask_path)
        except (ValueError, OSError) as exc:
            notes.append(str(exc))
            log.warning("%s: its truth mask cannot be read (%s); the image is left out of the "
                        "pixel metrics", result.image, exc)
            truth_mask = None
        inverted = None if truth_mask is None else inverted_share(
            mask_regions(*standard_mask(truth_mask))["wbc"])
        if inverted is not None:
            why = (f"its truth mask marks {inverted:.0%} of the image as WBC: drawn inverted? "
                   "WBCs must be the non-zero, light pixels")
            notes.append(why)
            log.warning("%s: %s; the image is left out of the pixel metrics", result.image, why)
            truth_mask = None
        if truth_mask is not None:
            predicted = analysis.mask if (ok and analysis is not None) else pred_mask if ok else None
            if ok and predicted is None:
                notes.append("no predicted mask to compare")
            elif predicted is not None and not _same_shape(predicted.shape, truth_mask.shape):
                why = (f"its truth mask is {_size(truth_mask)} but the image {_size(predicted)}, "
                       "not the same shape (a mask of another image, or turned)")
                notes.append(why)
                log.warning("%s: %s; the image is left out of the pixel metrics", result.image, why)
            else:
                if predicted is not None and predicted.shape[:2] != truth_mask.shape[:2]:
                    notes.append(f"truth mask {_size(truth_mask)} resized to the image's "
                                 f"{_size(predicted)}")
                shape = (result.height, result.width)  # where no prediction: the image's
                if not (result.width and result.height and _same_shape(shape, truth_mask.shape)):
                    shape = None  # not read, or of another shape: counted at the mask's size
                score.pixels = region_counts(predicted, truth_mask, shape)

    if truth.cls is not None:
        score.true_cls = truth.cls
        cell = central_cell(cells, result.width, result.height)
        if cell is not None:
            score.pred_cls, score.confidence = cell.cls, float(cell.confidence)

    boxes = None
    if truth.has_boxes:
        boxes, why = fitted_boxes(truth, result.width, result.height, notes)
        if why is not None:
            log.warning("%s: %s; the image is left out of the cell-finding metrics", result.image, why)
    if boxes is not None:
        score.has_boxes = True
        score.n_truth_boxes = len(boxes)
        score.n_pred_cells = len(cells)
        pred_boxes = [(c.x, c.y, c.width, c.height) for c in cells]
        matched = {i: (j, iou) for i, j, iou in match_boxes(boxes, pred_boxes)}
        score.matches = [(i, cells[j].cell_id, iou) for i, (j, iou) in sorted(matched.items())]
        for i, true_cls in enumerate(truth.box_classes):
            if true_cls is None:
                continue
            if i in matched:
                cell = cells[matched[i][0]]
                score.box_pairs.append((true_cls, cell.cls, float(cell.confidence)))
            else:
                score.box_pairs.append((true_cls, None, None))
    score.note = "; ".join(notes)
    return score


#: truth boxes all smaller than this (px, both sides) are no WBC's: fractions of the image
#: typed as pixels (a CSV from a tool that writes them so), which would match nothing
MIN_BOX_PX = 2

#: a truth box with less of its area inside its image than this was drawn for another image
#: (another resolution, or a crop): a WBC cut by the edge is annotated inside the image
INSIDE_SHARE = 0.5


def fitted_boxes(truth, width: int, height: int, notes: list) -> tuple:
    """(the truth boxes of a `width` x `height` image in its pixels, None), or (None, why) where
    they cannot be those of this image (`why` also in `notes`): drawn on an image of another
    shape (VOC `<size>`), or lying mostly outside it. Boxes drawn at another resolution of the
    same shape are scaled (noted). Scored as they are, such boxes gave 0 % found without a
    word; trained on, they would label the wrong cells."""
    boxes = truth.pixel_boxes(width, height)
    if not (width and height) or truth.box_units == "norm":  # unread image; fractions fit any
        return boxes, None
    why = None
    drawn = tuple(int(v) for v in truth.box_size) if truth.box_size else (width, height)
    if drawn != (width, height):
        if _same_shape((drawn[1], drawn[0]), (height, width)):
            fx, fy = width / drawn[0], height / drawn[1]
            boxes = [(x * fx, y * fy, w * fx, h * fy) for x, y, w, h in boxes]
            notes.append(f"truth boxes drawn on a {drawn[0]}x{drawn[1]} image, scaled to the "
                         f"image's {width}x{height}")
        else:
            why = (f"its truth boxes were drawn on a {drawn[0]}x{drawn[1]} image (the "
                   f"annotation's size) but the image is {width}x{height}, not the same shape")
    outside = [b for b in boxes if _share_inside(b, width, height) < INSIDE_SHARE]
    if why is None and boxes and all(w < MIN_BOX_PX and h < MIN_BOX_PX for _, _, w, h in boxes):
        why = (f"its {len(boxes)} truth box(es) are all under {MIN_BOX_PX} px across: fractions "
               "of the image? (a CSV's boxes are read in pixels)")
    elif why is None and outside:
        x, y, w, h = outside[0]
        why = (f"{len(outside)} of its {len(boxes)} truth box(es) lie mostly outside the "
               f"{width}x{height} image (first: x {x:g}, y {y:g}, {w:g}x{h:g}): drawn for an "
               "image of another size?")
    if why is None:
        return boxes, None
    notes.append(why)
    return None, why


def _share_inside(box, width: int, height: int) -> float:
    """How much of a box `(x, y, w, h)`'s area lies inside a `width` x `height` image."""
    x, y, w, h = box
    if not w * h > 0:  # not judged here: readers refuse such boxes (`truth._settle`)
        return 1.0
    inside_w = max(0.0, min(x + w, width) - max(x, 0.0))
    inside_h = max(0.0, min(y + h, height) - max(y, 0.0))
    return inside_w * inside_h / (w * h)


# --- tables ------------------------------------------------------------------------------------

def _class_samples(scores) -> list:
    out = []
    for s in scores:
        if s.true_cls is not None:
            out.append((s.true_cls, s.pred_cls, s.confidence))
        out.extend(s.box_pairs)
    return out


def accuracy_tables(results, scores: dict, truth_unmatched: int = 0, truth_ambiguous: int = 0,
                    not_analysed: int = 0, warned: Optional[set] = None) -> dict:
    """Sum per-image scores into report tables (pandas DataFrames, fractions 0..1 not percent).

    :param results: the run's `ImageResult`s (for the image counts).
    :param scores: `{image: ImageScore}` for the images that have truth.
    :param truth_unmatched: how many ground-truth entries matched no image of the run (a
        misspelt name): a summary row `truth_entries_unmatched` when any, so that the saved
        reports, not only the terminal, say that the figures leave them out.
    :param truth_ambiguous: how many ground-truth entries several images of the run could be
        (a name without its sample folder), scored against none: `truth_entries_ambiguous`.
    :param not_analysed: images found but not analysed (a run stopped by a signal, a watch
        session's pending files): a summary row `images_not_analysed` when any, so that figures
        over part of the images do not read as a whole evaluation.
    :param warned: the run-level warnings already given (a Runner's, whose reports a watcher
        builds after each image), added to; None: each is given.
    :returns: `{name: DataFrame}`, only for the kinds of truth present: "summary" (section,
        metric, value, n: the headline numbers, n what each was computed over: images, cells or
        boxes) always; "pixels" and "per_image"; "classes",
        "confusion", "calibration"; "detection".
    """
    import pandas as pd

    results = list(results)
    scored = [scores[k] for k in sorted(scores)]
    # images_failed counts the run's images, as images does; of those with truth, the failed
    # ones are scored as finding nothing (images_with_truth_failed)
    summary = [("run", "images", len(results), None),
               ("run", "images_failed", sum(r.is_error for r in results), None),
               ("run", "images_with_truth", len(scored), None),
               ("run", "images_with_truth_failed", sum(s.status != "ok" for s in scored), None)]
    if truth_unmatched:
        summary.append(("run", "truth_entries_unmatched", int(truth_unmatched), None))
    if truth_ambiguous:
        summary.append(("run", "truth_entries_ambiguous", int(truth_ambiguous), None))
    if not_analysed:
        summary.append(("run", "images_not_analysed", int(not_analysed), None))
    tables = {}
    warned = set() if warned is None else warned
    for part in (_pixel_tables, _class_tables, partial(_detection_tables, warned=warned)):
        rows, made = part(scored)
        summary += rows
        tables.update(made)
    summary_df = pd.DataFrame(summary, columns=["section", "metric", "value", "n"])
    # object dtype: counts stay integers beside fractions
    summary_df["value"] = pd.Series([v if isinstance(v, int) else float(v) for _, _, v, _ in summary],
                                    dtype=object)
    summary_df["n"] = summary_df["n"].astype("Int64")
    tables = {"summary": summary_df, **tables}
    if scored:
        tables["per_image"] = _per_image_table(scored, pixels="pixels" in tables,
                                               boxes="detection" in tables)
    return tables


def _pixel_tables(scored) -> tuple:
    """-> (summary rows, {"pixels": DataFrame}) over the images with masks: counts summed over
    the images (the paper's way) beside per-image means."""
    import pandas as pd

    pix = [s for s in scored if s.pixels]
    if not pix:
        return [], {}
    rows, summary = [], []
    for region in REGIONS:
        per = [s.pixels[region] for s in pix if region in s.pixels]
        if not per:
            continue
        total = sum(per, PixelCounts())
        means = {m: float(np.nanmean([getattr(p, m) for p in per]))
                 if any(not math.isnan(getattr(p, m)) for p in per) else float("nan")
                 for m in ("iou", "recall", "acc")}
        rows.append({"region": region, "images": len(per), "tp": total.tp, "fp": total.fp,
                     "fn": total.fn, "tn": total.tn, "iou": total.iou, "recall": total.recall,
                     "precision": total.precision, "acc": total.acc, "dice": total.dice,
                     "mean_iou": means["iou"], "mean_recall": means["recall"],
                     "mean_acc": means["acc"]})
        for metric in ("iou", "recall", "precision", "acc"):
            summary.append((f"pixels_{region}", metric, getattr(total, metric), len(per)))
        # an image with neither a truth nor a predicted cell has no IoU: the mean leaves it out
        defined = sum(not math.isnan(p.iou) for p in per)
        summary.append((f"pixels_{region}", "mean_iou_per_image", means["iou"], defined))
    return summary, {"pixels": pd.DataFrame(rows)}


def _known_macro_f1(rep: dict) -> list:
    """Where the truth has classes the models do not know (blasts, a lab's own), a summary row of
    the macro-F1 over the classes of the five they know that the truth or the answers hold,
    `macro_f1_known`: each unknown class adds an F1
    of 0 to `macro_f1` (0.39 against 0.63 with three such labels), which says nothing of how
    the five are told apart. [] otherwise."""
    known = [r for r in rep["per_class"] if r["class"] in CLASSES]
    if len(known) == len(rep["per_class"]) or not known:
        return []
    return [("classes", "macro_f1_known", float(np.mean([r["f1"] for r in known])),
             sum(r["support"] for r in known))]


def _class_tables(scored) -> tuple:
    """-> (summary rows, {"classes", "confusion", "calibration": DataFrame}) over the labelled
    cells: single-cell images and labelled boxes; a cell not found counts as wrong."""
    import pandas as pd

    samples = _class_samples(scored)
    if not samples:
        return [], {}
    true = [t for t, _, _ in samples]
    pred = [NONE if p is None else p for _, p, _ in samples]
    rep = classification_report(true, pred)
    found = [(t, p, c) for t, p, c in samples if p is not None]
    acc_found = (sum(t == p for t, p, _ in found) / len(found)) if found else float("nan")
    with_conf = [(t == p, c) for t, p, c in found if c is not None]
    ece = expected_calibration_error([c for _, c in with_conf], [h for h, _ in with_conf])
    summary = [*_with_interval("classes", "accuracy", rep["correct"], rep["n"]),
               ("classes", "error_rate", rep["error_rate"], rep["n"]),
               ("classes", "macro_f1", rep["macro_f1"], rep["n"]),
               *_known_macro_f1(rep),
               ("classes", "not_found", rep["n"] - len(found), rep["n"]),
               ("classes", "accuracy_found", acc_found, len(found)),
               ("classes", "ece", ece, len(with_conf))]
    classes = pd.DataFrame(rep["per_class"], columns=["class", "support", "predicted", "correct",
                                                      "precision", "recall", "f1"])
    rows, cols, counts = confusion_matrix(true, pred, rep["labels"] or None)
    confusion = pd.DataFrame(counts, columns=cols)
    confusion.insert(0, "true \\ predicted", rows)
    bins = calibration_bins([c for _, c in with_conf], [h for h, _ in with_conf])
    calibration = pd.DataFrame(
        [{"bin": f"{lo:.3f}-{hi:.3f}", "lower": lo, "upper": hi, "cells": n, "confidence": conf,
          "accuracy": acc, "gap": abs(acc - conf) if n else float("nan")}
         for lo, hi, n, conf, acc in bins])
    return summary, {"classes": classes, "confusion": confusion, "calibration": calibration}


#: truth boxes and found cells each at least this many, none matched: the boxes are read wrong
NO_MATCH_AT = 3


def _detection_tables(scored, warned: set) -> tuple:
    """-> (summary rows, {"detection": DataFrame}) over the images with boxes: found cells
    matched to truth boxes at IoU >= IOU_MATCH, and the classes of the matched cells."""
    import pandas as pd

    det = [s for s in scored if s.has_boxes]
    if not det:
        return [], {}
    n_truth = sum(s.n_truth_boxes for s in det)
    n_pred = sum(s.n_pred_cells for s in det)
    n_match = sum(len(s.matches) for s in det)
    if not n_match and min(n_truth, n_pred) >= NO_MATCH_AT and "no match" not in warned:
        warned.add("no match")
        log.warning("none of the %d truth boxes matches one of the %d cells found (box IoU >= "
                    "%g): are the boxes in pixels, with x, y their top-left corner? Boxes in "
                    "percent of the image, or placed by their centre, match nothing", n_truth,
                    n_pred, IOU_MATCH)
    recall, precision = _ratio(n_match, n_truth), _ratio(n_match, n_pred)
    f1 = _ratio(2 * n_match, n_truth + n_pred)
    pairs = [p for s in det for p in s.box_pairs]
    matched_pairs = [(t, p) for t, p, _ in pairs if p is not None]
    cls_matched = _ratio(sum(t == p for t, p in matched_pairs), len(matched_pairs))
    cls_all = _ratio(sum(t == p for t, p, _ in pairs), len(pairs))
    ious = [iou for s in det for _, _, iou in s.matches]
    detection = pd.DataFrame([{
        "images": len(det), "iou_threshold": IOU_MATCH, "truth_boxes": n_truth,
        "found_cells": n_pred, "matched": n_match, "recall": recall, "precision": precision,
        "f1": f1, "mean_match_iou": float(np.mean(ious)) if ious else float("nan"),
        "labelled_boxes": len(pairs), "labelled_matched": len(matched_pairs),
        "class_accuracy_matched": cls_matched, "class_accuracy_all": cls_all}])
    summary = [("detection", "truth_boxes", n_truth, len(det)),
               ("detection", "found_cells", n_pred, len(det)),
               ("detection", "matched", n_match, len(det)),
               *_with_interval("detection", "recall", n_match, n_truth),
               *_with_interval("detection", "precision", n_match, n_pred),
               ("detection", "f1", f1, n_truth + n_pred),
               ("detection", "class_accuracy_matched", cls_matched, len(matched_pairs)),
               ("detection", "class_accuracy_all", cls_all, len(pairs))]
    return summary, {"detection": detection}


def _per_image_table(scored, pixels: bool, boxes: bool):
    """One row per image with truth: its status and note, and the columns of each kind of
    truth present in the run (`pixels`, single-cell classes, `boxes`)."""
    import pandas as pd

    rows = []
    single = any(s.true_cls is not None for s in scored)
    for s in scored:
        row = {"image": s.image, "status": s.status, "note": s.note}
        for region in REGIONS:
            p = s.pixels.get(region)
            if pixels:
                row.update({f"{region}_iou": p.iou if p else float("nan"),
                            f"{region}_recall": p.recall if p else float("nan"),
                            f"{region}_acc": p.acc if p else float("nan"),
                            f"{region}_tp": p.tp if p else None, f"{region}_fp": p.fp if p else None,
                            f"{region}_fn": p.fn if p else None, f"{region}_tn": p.tn if p else None})
        if single:
            row.update({"true_class": s.true_cls,
                        "predicted_class": (s.pred_cls or NONE) if s.true_cls else None,
                        "confidence": s.confidence,
                        "correct": (s.pred_cls == s.true_cls) if s.true_cls else None})
        if boxes:
            row.update({"truth_boxes": s.n_truth_boxes if s.has_boxes else None,
                        "found_cells": s.n_pred_cells if s.has_boxes else None,
                        "matched": len(s.matches) if s.has_boxes else None,
                        "labelled_correct": sum(t == p for t, p, _ in s.box_pairs)
                        if s.box_pairs else None})
        rows.append(row)
    table = pd.DataFrame(rows)
    counts = [c for c in table.columns if c.endswith(("_tp", "_fp", "_fn", "_tn")) or c in
              ("truth_boxes", "found_cells", "matched", "labelled_correct")]
    table[counts] = table[counts].astype("Int64")
    if not table["note"].astype(bool).any():
        table = table.drop(columns="note")
    return table


# --- terminal ----------------------------------------------------------------------------------

def _pct(v) -> str:
    return "  n/a " if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:6.2f}%"


def _interval(get: dict, section: str, metric: str) -> str:
    """'(95% CI 96.54-98.39%)' from the summary's interval rows; empty where there are none."""
    low, high = get.get((section, f"{metric}_ci95_low")), get.get((section, f"{metric}_ci95_high"))
    if low is None or high is None or math.isnan(low) or math.isnan(high):
        return ""
    return f"(95% CI {100 * low:.2f}-{100 * high:.2f}%)"


def format_accuracy(tables: dict) -> str:
    """The headline numbers of `accuracy_tables` as plain text for a terminal."""
    summary = tables.get("summary")
    if summary is None or summary.empty:
        return "No accuracy: no image had ground truth."
    get = {(r.section, r.metric): r.value for r in summary.itertuples()}
    count = {(r.section, r.metric): r.n for r in summary.itertuples()}
    n_truth = int(get.get(("run", "images_with_truth"), 0))
    n_failed = int(get.get(("run", "images_with_truth_failed"), 0))
    lines = [f"Accuracy on {n_truth} image(s) with ground truth"
             + (f" ({n_failed} failed, scored as finding nothing)" if n_failed else "")]
    if n_truth == 0:
        lines.append("  no image of the run matched the ground truth")
    pixels = tables.get("pixels")
    if pixels is not None and not pixels.empty:
        lines.append("Pixels, summed over images      IoU     Recall  Precision  ACC     "
                     "(mean IoU per image)")
        for r in pixels.itertuples():
            name = "whole WBC" if r.region == "wbc" else r.region
            lines.append(f"  {name:<10} ({r.images:>4} images)  {_pct(r.iou)} {_pct(r.recall)} "
                         f"{_pct(r.precision)}  {_pct(r.acc)}  ({_pct(r.mean_iou).strip()})")
    classes = tables.get("classes")
    if classes is not None and not classes.empty:
        n = int(count[("classes", "accuracy")])
        not_found = int(get[("classes", "not_found")])
        ece, n_ece = get[("classes", "ece")], int(count[("classes", "ece")])
        lines.append(f"Classes ({n} cells; {not_found} not found, counted wrong)")
        lines.append(f"  accuracy {_pct(get[('classes', 'accuracy')]).strip()} "
                     f"{_interval(get, 'classes', 'accuracy')}   "
                     f"error rate {_pct(get[('classes', 'error_rate')]).strip()}   "
                     f"macro-F1 {get[('classes', 'macro_f1')]:.4f}"
                     + (f" ({get[('classes', 'macro_f1_known')]:.4f} over the known classes)"
                        if ("classes", "macro_f1_known") in get else "") + "   "
                     f"accuracy on found {_pct(get[('classes', 'accuracy_found')]).strip()}   "
                     + (f"ECE {ece:.4f} ({n_ece} cells, {ECE_BINS} bins)"
                        if not math.isnan(ece) else "ECE n/a"))
        lines.append(f"  {'class':<12}{'precision':>10}{'recall':>9}{'F1':>8}{'support':>9}")
        for r in classes.to_dict("records"):
            lines.append(f"  {r['class']:<12}{_pct(r['precision']):>10}{_pct(r['recall']):>9}"
                         f"{r['f1']:>8.4f}{r['support']:>9}")
    det = tables.get("detection")
    if det is not None and not det.empty:
        r = det.iloc[0]
        lines.append(f"Cell finding (box IoU >= {r.iou_threshold:g}, {int(r.images)} images): "
                     f"{int(r.truth_boxes)} truth WBCs, {int(r.found_cells)} found, "
                     f"{int(r.matched)} matched")
        lines.append(f"  recall {_pct(r.recall).strip()} {_interval(get, 'detection', 'recall')}   "
                     f"precision {_pct(r.precision).strip()} {_interval(get, 'detection', 'precision')}   "
                     f"F1 {_pct(r.f1).strip()}")
        if r.labelled_boxes:
            lines.append(f"  class accuracy on matched cells {_pct(r.class_accuracy_matched).strip()} "
                         f"({int(r.labelled_matched)} cells); on all {int(r.labelled_boxes)} "
                         f"labelled WBCs {_pct(r.class_accuracy_all).strip()}")
    return "\n".join(lines)
