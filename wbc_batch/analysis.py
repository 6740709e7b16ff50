"""Per-image analysis: estimate scale, segment the field, split it into cells, classify them.

`analyze(rgb, session, bundle, params)` is a plain function of an image array and configuration
(plus a loaded model session), so it can run in any worker. Everything here is numpy and OpenCV;
the networks are reached through the backend's `ModelSession`.

Frame. A black frame around the lit field (a field stop's dark corners, padding bars) is painted
in the colour of the field's glass first (`frame`), so that it is not taken for nuclei; so is a
field stop saved white (`frame.light_surround`) with `params.fill_white_stop`. So are
flat light margins along its edges (white padding, an info banner with its text) with
`params.fill_margins`; without it they are left, and the result says so (`margins_left`). Then
only the field is analysed: the image is cut to the bounding box of the pixels outside the frame
(padding is not looked at at all), and the standardisation's statistics leave out the frame that
is left in it (a round stop's corners). Flat glass counted in, it lowered the spread that the
input and the segmenter's GroupNorm layers are scaled by, and every cell came out larger, the
more so the larger the frame (docs/EXPERIMENTS.md, "The field alone, without its frame").

Illumination. A field whose glass is markedly darker at one side or in the corners than at its
brightest (lamp falloff of at least `params.min_falloff`) is first divided by its fitted
illumination surface (`illumination.even_out`), and everything below, classification included,
works on the evened image; images lit evenly, and crops filled by one cell, are left as they are.

Scale. The segmenter was trained on fields rescaled so that a WBC is `bundle.diameter` pixels
across (with wide jitter). A first pass at a coarse size finds the WBCs and measures their median
diameter; the image is then rescaled so that this median becomes the canonical diameter and
segmented again (the first pass is reused when the scales differ by under 20 %). `--diameter`
skips the estimate.

Cells. The WBC mask (cytoplasm or nucleus) is split at necks: peaks of the distance transform seed
the cells, two peaks stay one cell unless the mask narrows markedly between them, and each pixel
goes to its nearest seed. Then, relative to the area of a disc of the working diameter:
fragments under `params.min_area_frac` are dropped, and cells touching the image border with less
than `params.border_frac` visible are dropped.

Contrast. The segmenter sees each image standardised by its own contrast, so in an empty, blank
or blown-out field it sees sensor noise and lamp vignetting magnified to the contrast of a smear,
and can take them for cells. A WBC nucleus is stained, so a cell whose nucleus does not differ
from the glass around it in colour, beyond a uniform darkening (`nucleus_contrast`), is dropped
(`params.min_nucleus_contrast`). Before all that, a field of which next to nothing is darker
than its glass (`field_cover` under `MIN_COVER`: bare glass, with camera noise or a few specks
of dust, a blank frame) is taken for glass and holds no WBC, unseen by the segmenter.
"""

from __future__ import annotations

import math
import time
from typing import Optional

import cv2
import numpy as np

from . import CLASSES
from .backend import session_output
from .config import MIN_DIAMETER_PX, AnalysisParams
from .frame import fill_frame, flat_margins, light_surround, unlit_frame
from .illumination import even_out
from .outline import pad_px, refine_maps
from .preprocess import cell_crop, channel_stats, normalize, normalize_crops, pad_to_multiple, resize
from .preprocess import grey as to_grey
from .red_cells import barred_diameter, red_cell_size, sizer_of
from .results import PROB_DECIMALS, CellResult, ImageAnalysis, ImageNotAnalysable


#: how this version analyses an image, apart from its settings and weights: raised by a change
#: that gives other results at the same settings and weights, so that a watch ledger of the
#: results before it is not resumed (`resume.fingerprint`). Ledgers written before the number
#: are of revision 1. Two development commits of 2026-12-06 (f6d2726, bc4b64e), which made
#: `border_arc` the default, wrote 2. Revision 4: a field of which next to nothing is darker than
#: its glass holds no WBC (`field_cover`); 3, a first form of it, was written only by development
#: commits of 2026-12-07 (0c34fa5 to the commit before 4). 5 and 6, two forms of a noise bar
#: for the cover that were withdrawn, were written only by the development commits 1093cc4 and
#: 2fa77d6: the next change to results takes 7
REVISION = 4
#: the revisions whose change is to the scale estimate alone: with the WBC size given
#: (`AnalysisParams.diameter_px`) none is made, and results are those of the revision before
ESTIMATE_REVISIONS = frozenset()

#: first-pass working sizes (shorter image side, px), tried in order until cells are resolved
#: (the longer side kept within 4 x max_side)
FIRST_PASS_SIDES = (256, 512, 1024)
#: more passes for large fields, tried after FIRST_PASS_SIDES, each only where it sees the
#: image at full size or smaller. A field of 6400x4800 or 7800x5900 px (a camera of 30 to 46 MP)
#: shows WBCs of 90 to 110 px at about 19 px at 1024, where they measured at 60 to 75 % of their
#: size, so the field was enlarged too much for the analysis, with false cells (EXPERIMENTS.md,
#: "Large fields of small WBCs"). An image whose shorter side is under 2048 px, as every image of
#: the public sets and an HD camera's, never gets them. A large pass counts only where it
#: resolves the cells it finds; otherwise the estimate is the 1024 pass's, as before.
LARGE_FIELD_SIDES = (2048, 4096)
#: a first pass is trusted when the cells it found are at least this fraction of the canonical size
RESOLVED_FRAC = 0.45
#: reuse the first-pass segmentation when the final scale is within this ratio of it
REUSE_RATIO = 1.2
#: tile size and overlap (working pixels) for fields larger than params.max_side
TILE_OVERLAP = 64
#: two distance peaks are separate cells when the mask between them narrows below this fraction
NECK_RATIO = 0.75
CLASSIFY_BATCH = 64
#: radius (working pixels) of the opening that smooths each cell's outline at full resolution
SMOOTH_RADIUS = 2.0
#: never enlarge an image more than this (a WBC under canonical/4 pixels is not resolvable)
MAX_UPSCALE = 4.0
#: `border_cut_diameter`: a border-cut cell is taken to show at least this share of its area
#: (`AnalysisParams.border_frac`'s default, below which `split_cells` drops a cut cell; fixed
#: here, as the estimate is also made where no analysis parameters are, in training)
BORDER_VISIBLE = 0.3
#: `border_cut_diameter`: an arc of fewer outline pixels than this is not fitted
MIN_ARC_PX = 12
#: `border_cut_diameter`: the fitted circle is taken where its disc, cut by the image edges,
#: overlaps the visible part at least this much (IoU)
ARC_FIT_IOU = 0.75
#: width of the ring around a cell that its nucleus is compared with, in WBC diameters
CONTRAST_RING = 0.25
#: a ring of fewer pixels than this (a cell filling the image) is replaced by the cell's cytoplasm
MIN_RING_PX = 10
#: `field_stain` of fewer pixels outside the cells than this (original pixels) is 0
MIN_FIELD_PX = 4096
#: `is_grey`: an image whose `stain_colour` is under this has no stain colour to go on (toned
#: monochrome images stayed under it and stained smears over it, even at saturation x0.55:
#: docs/EXPERIMENTS.md, "Monochrome images with a tone")
GREY_STAIN_COLOUR = 0.075
#: `field_cover`: pixel noise is smoothed by a Gaussian of this sigma (px) first
COVER_SIGMA = 1.0
#: `field_cover`: a pixel is smear where it is darker than the glass by more than this share of
#: the glass's level in some channel
COVER_DARKER = 0.07
#: a field of which less than this share is smear holds no WBC: bare glass, with camera noise or
#: a few specks of dust or stain precipitate on it, or a blank frame (a blood smear's WBCs lie
#: among red cells, which cover far more: docs/EXPERIMENTS.md, "Glass with dust on it")
MIN_COVER = 0.005


def check_rgb(rgb, who: str = "analyze") -> None:
    """:raises ImageNotAnalysable: (a ValueError) naming what `rgb` is, unless it is a uint8 RGB
        array (H, W, 3): a float or 16-bit array was analysed into shifted boxes, others failed
        deep inside, with numpy's words."""
    if not (isinstance(rgb, np.ndarray) and rgb.dtype == np.uint8 and rgb.ndim == 3
            and rgb.shape[2] == 3):
        what = f"{rgb.dtype} {rgb.shape}" if isinstance(rgb, np.ndarray) else type(rgb).__name__
        raise ImageNotAnalysable(f"{who} needs a uint8 RGB array of shape (height, width, 3) "
                                 f"(imageio.read_image makes one from a file); got {what}")


def analyze(rgb: np.ndarray, session, bundle, params: AnalysisParams = AnalysisParams()) -> ImageAnalysis:
    """Find, segment and classify the WBCs of one uint8 RGB image (H, W, 3); another array is an
    ImageNotAnalysable (`check_rgb`). `Runner.process_array` also refuses what a file would be
    refused as (too small, a label mask, too large)."""
    check_rgb(rgb)
    found = find_cells(rgb, session, bundle, params)
    t = time.perf_counter()
    seen = found.rgb  # the image the cells were found in (evened out, when it was) ...
    del found.rgb, found.not_field  # ... is not kept in the result, nor what is no field
    found.cells = classify_cells(seen, found.cell_labels, found.mask, found.boxes, session, bundle, params,
                                 diameter=found.diameter_px, grey=found.grey)
    found.outlines = {k: found.boxes[c] for k, c in enumerate(reading_order(found.boxes), start=1)}
    found.timings["classify"] = time.perf_counter() - t
    return found


def find_cells(rgb: np.ndarray, session, bundle, params: AnalysisParams = AnalysisParams()) -> ImageAnalysis:
    """Segment and split, without classifying: an ImageAnalysis whose `cells` is empty, whose
    `boxes` attribute maps each cell label to its (x, y, w, h) box in original pixels, and whose
    `rgb` attribute is the image the cells were found in: `rgb` itself, or with its black frame
    (a white stop with `params.fill_white_stop`, flat margins with `params.fill_margins`)
    filled (`frame`) and evened out where its lamp
    falloff reached `params.min_falloff` (`illumination.even_out`); its `not_field` attribute
    (uint8, the image's size) is nonzero where a pixel is no part of the field around the cells
    (`field_stain`): what the segmenter took for WBC, kept or not, and the frame."""
    t0 = time.perf_counter()
    frame, margins_left = _surround(rgb, params.fill_margins, params.fill_white_stop)
    found = None
    if frame is not None:  # a field stop's black corners, padding bars, a banner: not smear
        rgb = fill_frame(rgb, frame)
        box = _field_box(frame)
        if box is not None:  # the field alone is analysed, then put back in place
            y0, y1, x0, x1 = box
            field = np.ascontiguousarray(rgb[y0:y1, x0:x1])
            found = _find_in_field(field, frame[y0:y1, x0:x1], session, bundle, params, t0)
            found = _in_place(found, rgb, field, y0, x0)
    if found is None:
        found = _find_in_field(rgb, frame, session, bundle, params, t0)
    found.margins_left = margins_left
    return found


def _find_in_field(rgb: np.ndarray, frame: Optional[np.ndarray], session, bundle,
                   params: AnalysisParams, t0: float) -> ImageAnalysis:
    """`find_cells` on a field whose `frame` pixels (a bool mask, or None) are already filled
    with glass: they count in neither the standardisation's statistics nor anything else."""
    timings = {}
    h, w = rgb.shape[:2]
    canon = bundle.diameter
    if params.min_falloff:
        rgb, _ = even_out(rgb, params.min_falloff)
    if field_cover(rgb) < MIN_COVER:  # glass: its noise and dust, standardised, are no cells
        timings["estimate"] = time.perf_counter() - t0
        return _empty(rgb, timings, bare_glass=True)
    stats, first = channel_stats(rgb, exclude=frame), None
    if params.diameter_px:
        diameter = float(params.diameter_px)
    else:
        diameter, first = estimate_diameter(rgb, session, canon, stats, params.max_side,
                                            border_arc=params.border_arc)
        if diameter and params.red_cell_bar:
            diameter = barred_diameter(diameter, red_cell_size(rgb, sizer_of(bundle)))
        if diameter and diameter < MIN_DIAMETER_PX:  # as --diameter refuses: not "ok, 7 px cells"
            shown = math.floor(diameter * 10) / 10  # 7.96 shown as 8 read "8, fewer than 8"
            raise ImageNotAnalysable(
                f"the WBCs found are about {shown:.1f} px across, fewer than the "
                f"{MIN_DIAMETER_PX:g} px needed to tell nucleus from cytoplasm: scan at a higher "
                "magnification, or give --diameter if they are larger")
    timings["estimate"] = time.perf_counter() - t0
    if not diameter:
        return _empty(rgb, timings)

    scale = min(canon / diameter, MAX_UPSCALE)
    if first is not None and max(scale / first[0], first[0] / scale) < REUSE_RATIO:
        scale, probs = first
    else:
        probs = segment_probs(resize(rgb, scale), session, stats, params.max_side)
    timings["segment"] = time.perf_counter() - t0 - timings["estimate"]

    t1 = time.perf_counter()
    work_diam = diameter * scale
    labels_work = np.argmax(probs, axis=0).astype(np.uint8)
    cells_work = split_cells(labels_work > 0, work_diam, params, nucleus=labels_work == 2)
    cell_labels, mask, boxes = _to_full_resolution(cells_work, probs, scale, (h, w),
                                                   rgb=rgb, diameter=diameter, params=params)
    grey = is_grey(rgb)
    not_field = _wbc_pixels(labels_work, (h, w))
    if frame is not None:  # painted glass: no part of the field
        not_field[frame] = 1
    drop_faint_cells(rgb, cell_labels, mask, boxes, diameter, params.min_nucleus_contrast,
                     params.min_grey_nucleus_contrast, grey=grey,
                     over_field=params.min_nucleus_over_field, not_field=not_field)
    timings["split"] = time.perf_counter() - t1
    found = ImageAnalysis(cells=[], cell_labels=cell_labels, mask=mask, diameter_px=diameter,
                          scale=scale, timings=timings)
    found.boxes = boxes
    found.rgb = rgb
    found.grey = grey
    found.not_field = not_field
    return found


def field_cover(rgb: np.ndarray, max_pixels: int = 1 << 20) -> float:
    """The share of a uint8 RGB image, smoothed by a Gaussian of `COVER_SIGMA` px (taken every
    so many pixels when it has over `max_pixels`), that is darker than the glass by more than
    `COVER_DARKER` of the glass's level in some channel: the smear's cells and whatever else
    lies on the glass. The glass's level is each channel's 99th percentile.

    Smoothing takes camera noise down to a fraction of its spread, so bare glass covers next to
    nothing, while red cells cover much of a blood smear, even a pale, dim or shrunk one
    (docs/EXPERIMENTS.md, "Glass with dust on it"). A blank or black image covers nothing."""
    h, w = rgb.shape[:2]
    step = max(1, int(math.sqrt(h * w / max_pixels)))
    smooth = cv2.GaussianBlur(np.ascontiguousarray(rgb[::step, ::step]), (0, 0), COVER_SIGMA)
    n = smooth.shape[0] * smooth.shape[1]
    darker = np.zeros(smooth.shape[:2], bool)
    for c in range(3):
        cum = np.cumsum(cv2.calcHist([smooth], [c], None, [256], [0, 256]).ravel())
        glass = int(np.searchsorted(cum, 0.99 * n))
        darker |= smooth[..., c] < glass * (1.0 - COVER_DARKER)
    return float(darker.mean())


def _wbc_pixels(labels_work: np.ndarray, shape: tuple) -> np.ndarray:
    """Everything the segmenter took for WBC (cells kept or not), at original size `shape`."""
    h, w = shape
    return cv2.resize((labels_work > 0).astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST)


def _field_box(frame: np.ndarray) -> Optional[tuple]:
    """(y0, y1, x0, x1): the bounding box of the pixels that are not `frame`, or None when
    there are none or it is the whole image (a round stop's corners alone: nothing to cut)."""
    rows, cols = np.flatnonzero(~frame.all(axis=1)), np.flatnonzero(~frame.all(axis=0))
    if not rows.size:
        return None
    box = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    return None if box == (0, frame.shape[0], 0, frame.shape[1]) else box


def _in_place(found: ImageAnalysis, rgb: np.ndarray, field: np.ndarray, y0: int,
              x0: int) -> ImageAnalysis:
    """`found`, analysed in `field`, the part of `rgb` (the whole image, its frame filled) at
    (`y0`, `x0`), with its maps, boxes and image put back at that place in the whole image."""
    h, w = field.shape[:2]
    where = (slice(y0, y0 + h), slice(x0, x0 + w))
    cell_labels = np.zeros(rgb.shape[:2], found.cell_labels.dtype)
    mask = np.zeros(rgb.shape[:2], found.mask.dtype)
    cell_labels[where], mask[where] = found.cell_labels, found.mask
    found.cell_labels, found.mask = cell_labels, mask
    not_field = np.ones(rgb.shape[:2], np.uint8)  # around the field: its frame
    not_field[where] = found.not_field
    found.not_field = not_field
    found.boxes = {c: (x + x0, y + y0, bw, bh) for c, (x, y, bw, bh) in found.boxes.items()}
    if found.rgb is not field:  # evened out: so is the field in the whole image
        rgb = rgb.copy()
        rgb[where] = found.rgb
    found.rgb = rgb
    return found


def _surround(rgb: np.ndarray, fill_margins: bool, fill_white_stop: bool = False) -> tuple:
    """(the mask to paint as glass before the analysis, or None for nothing: the unlit frame;
    with `fill_white_stop`, a white stop (`frame.light_surround`) unless flat margins are left
    in; with `fill_margins`, the flat margins; whether flat margins are left in, analysed as
    they are: `ImageAnalysis.margins_left`)."""
    frame, margins = unlit_frame(rgb), flat_margins(rgb)
    left_in = margins is not None and not fill_margins
    parts = [frame, None if left_in else margins]
    if fill_white_stop and not left_in:  # a white band left in is not painted as a stop
        parts.append(light_surround(rgb))
    found = [m for m in parts if m is not None]
    return (np.logical_or.reduce(found) if found else None), left_in


def _empty(rgb: np.ndarray, timings: dict, bare_glass: bool = False) -> ImageAnalysis:
    h, w = rgb.shape[:2]
    found = ImageAnalysis(cells=[], cell_labels=np.zeros((h, w), np.uint16),
                          mask=np.zeros((h, w), np.uint8), diameter_px=0.0, scale=1.0,
                          timings=timings, bare_glass=bare_glass)
    found.boxes = {}
    found.rgb = rgb
    found.grey = None
    found.not_field = np.zeros((h, w), np.uint8)
    return found


# --- segmentation ------------------------------------------------------------------------------

def segment_probs(work_rgb: np.ndarray, session, stats: tuple, max_side: int = 1024) -> np.ndarray:
    """Softmax probabilities (3, h, w) float32 for a working-scale image, tiled when large."""
    h, w = work_rgb.shape[:2]
    if max(h, w) <= max_side:
        return _segment_tile(work_rgb, session, stats)
    probs = np.zeros((3, h, w), np.float16)
    step = max_side - 2 * TILE_OVERLAP
    for y in range(0, h, step):
        for x in range(0, w, step):
            y0, x0 = max(0, y - TILE_OVERLAP), max(0, x - TILE_OVERLAP)
            y1, x1 = min(h, y + step + TILE_OVERLAP), min(w, x + step + TILE_OVERLAP)
            tile = _segment_tile(work_rgb[y0:y1, x0:x1], session, stats)
            ye, xe = min(h, y + step), min(w, x + step)
            probs[:, y:ye, x:xe] = tile[:, y - y0:ye - y0, x - x0:xe - x0]
    return probs.astype(np.float32) if h * w <= 16_000_000 else probs


def _segment_tile(work_rgb: np.ndarray, session, stats: tuple) -> np.ndarray:
    x, (h, w) = pad_to_multiple(normalize(work_rgb, stats), 32)
    logits = session_output(session, "segment", x[None], (1, 3, *x.shape[1:]))
    return _softmax(logits[0, :, :h, :w], axis=0)


def _softmax(z: np.ndarray, axis: int) -> np.ndarray:
    z = z - z.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=axis, keepdims=True)).astype(np.float32)


def estimate_diameter(rgb, session, canon: float, stats: tuple, max_side: int = 1024,
                      border_arc: bool = False):
    """Median WBC diameter (original pixels) from coarse passes, or (None, None) if no WBC;
    `border_arc` as `median_diameter`'s.

    Returns (diameter, (scale, probs)) where (scale, probs) is the last pass, for reuse."""
    h, w = rgb.shape[:2]
    last = fallback = None
    for side in FIRST_PASS_SIDES + LARGE_FIELD_SIDES:
        scale = min(side / min(h, w), MAX_UPSCALE)
        if side in LARGE_FIELD_SIDES and scale > 1.0:
            break  # the large-field passes never enlarge: below 2048 px, as it always was
        if max(h, w) * scale > 4 * max_side:
            scale = 4 * max_side / max(h, w)
        if last is not None and scale <= last[0] * 1.01:
            break
        probs = segment_probs(resize(rgb, scale), session, stats, max_side)
        last = (scale, probs)
        diam = median_diameter(np.argmax(probs, axis=0) > 0, border_arc=border_arc)
        if diam and diam >= RESOLVED_FRAC * canon:
            return diam / scale, last
        if side in LARGE_FIELD_SIDES:
            # counts only where it resolves cells: a field without a WBC would otherwise be
            # estimated from its red cells' fragments and enlarged to hundreds of megapixels
            continue
        if scale >= 1.0 and diam:
            return diam / scale, last
        fallback = (diam, last)
    if fallback is not None and fallback[0]:
        return fallback[0] / fallback[1][0], fallback[1]
    return None, None


def median_diameter(fg: np.ndarray, min_px: int = 12, border_arc: bool = False) -> float:
    """Typical WBC diameter in a mask: the area-weighted median of its connected components'
    diameters, each the equivalent diameter of its area or, with `border_arc`, for one cut by
    the image border, `border_cut_diameter` (`AnalysisParams.border_arc`).

    Weighting by (visible) area makes specks (stain debris, noisy pixels of a coarse pass)
    count for almost nothing, and components under 5 % of the largest are ignored outright; a
    clump of touching cells weighs as much as the cells in it, so it moves the estimate only
    where clumps hold most of the WBC area."""
    n, comp, st, _ = cv2.connectedComponentsWithStats(fg.astype(np.uint8), connectivity=8)
    areas = st[1:, cv2.CC_STAT_AREA].astype(np.float64)
    keep = np.flatnonzero(areas >= min_px)
    if keep.size == 0:
        return 0.0
    keep = keep[areas[keep] >= 0.05 * areas[keep].max()]
    diams = np.sqrt(4.0 * areas[keep] / np.pi)
    if border_arc:  # per component only here: the default stays one array operation
        h, w = fg.shape[:2]
        for j, i in enumerate(keep):
            x, y, bw, bh = st[i + 1, :4]
            if x == 0 or y == 0 or x + bw == w or y + bh == h:
                sub = (comp[y:y + bh, x:x + bw] == i + 1).astype(np.uint8)
                diams[j] = border_cut_diameter(sub, (x, y), (h, w), float(diams[j]))
    order = np.argsort(diams, kind="stable")
    cum = np.cumsum(areas[keep][order])
    k = int(np.searchsorted(cum, cum[-1] / 2.0))
    return float(diams[order[k]])


def border_cut_diameter(part: np.ndarray, at: tuple, shape: tuple, eq: float) -> float:
    """The diameter of a cell cut by the image border, from the visible `part` (a 0/1 mask at
    `at` = (x, y) in an image of `shape` (h, w)) whose area's equivalent diameter is `eq`.

    A circle is fitted (Taubin's least squares) to the part's outline away from the image
    edges, where the cell's own edge is; the outline runs through pixel centres, half a pixel
    inside the edge, so half a pixel is added to its radius. Where that circle, cut by the
    image edges, covers the part (IoU >= `ARC_FIT_IOU`; not so for a band along the edge), its
    diameter is taken, kept between `eq` (the cell is no smaller than what shows) and
    `eq / sqrt(BORDER_VISIBLE)` (a cell of which less shows is dropped by `split_cells`
    anyway, and a short arc's fit is loose); a fit past twice that bound is no fit. Otherwise,
    or without enough of an arc to fit, `eq`. Before, the visible part's `eq` was the cell's
    size: a WBC half cut off read as 0.71 of its size, and a sliver set the whole field's scale.

    Two touching cells cut by the same edge follow an arc too, of a larger circle: they read
    up to `eq / sqrt(BORDER_VISIBLE)` where `eq` had read them about right by chance (a whole
    clump of two reads about 1.4 times a cell's size, as before)."""
    contours, _ = cv2.findContours(part, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    if not contours:
        return eq
    pts = np.concatenate(contours)[:, 0, :].astype(np.float64) + np.float64(at)
    h, w = shape
    inner = pts[(pts[:, 0] > 0) & (pts[:, 1] > 0) & (pts[:, 0] < w - 1) & (pts[:, 1] < h - 1)]
    if len(inner) < MIN_ARC_PX:
        return eq
    circle = fit_circle(inner[:, 0], inner[:, 1])
    top = eq / math.sqrt(BORDER_VISIBLE)
    if circle is None or circle[2] + 0.5 > top:
        return eq
    circle = (circle[0], circle[1], circle[2] + 0.5)
    if _disc_iou(part, at, shape, circle) < ARC_FIT_IOU:
        return eq
    return float(min(max(2.0 * circle[2], eq), top))


def fit_circle(x: np.ndarray, y: np.ndarray) -> Optional[tuple]:
    """(cx, cy, r) of the circle through points (x, y) by Taubin's algebraic fit (as in
    Chernov's "Circular and linear regression", 2010: less biased to small circles on a short
    arc than the plain algebraic fit), or None for points on a line or fewer than 3."""
    if len(x) < 3:
        return None
    xm, ym = x.mean(), y.mean()
    u, v = x - xm, y - ym
    z = u * u + v * v
    zm = z.mean()
    if not zm > 0:
        return None
    _, _, vt = np.linalg.svd(np.column_stack([(z - zm) / (2.0 * math.sqrt(zm)), u, v]),
                             full_matrices=False)
    a0 = vt[2, 0] / (2.0 * math.sqrt(zm))
    if abs(a0) < 1e-12:
        return None
    a1, a2, a3 = vt[2, 1], vt[2, 2], -zm * a0
    r2 = a1 * a1 + a2 * a2 - 4.0 * a0 * a3
    if not np.isfinite(r2) or r2 <= 0:
        return None
    return (float(xm - a1 / (2.0 * a0)), float(ym - a2 / (2.0 * a0)),
            float(math.sqrt(r2) / (2.0 * abs(a0))))


def _disc_iou(part: np.ndarray, at: tuple, shape: tuple, circle: tuple) -> float:
    """IoU of a 0/1 `part` at `at` = (x, y) and the disc `circle` = (cx, cy, r), both within an
    image of `shape` (h, w)."""
    cx, cy, r = circle
    ph, pw = part.shape
    x0, y0 = max(0, min(at[0], int(cx - r) - 1)), max(0, min(at[1], int(cy - r) - 1))
    x1 = min(shape[1], max(at[0] + pw, int(cx + r) + 2))
    y1 = min(shape[0], max(at[1] + ph, int(cy + r) + 2))
    yy, xx = np.mgrid[y0:y1, x0:x1]
    disc = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    own = np.zeros(disc.shape, bool)
    own[at[1] - y0:at[1] - y0 + ph, at[0] - x0:at[0] - x0 + pw] = part > 0
    union = int((disc | own).sum())
    return int((disc & own).sum()) / union if union else 0.0


# --- splitting ---------------------------------------------------------------------------------

def _mostly_nucleus(part: np.ndarray, nucleus: Optional[np.ndarray], x: int, y: int,
                    frac: float) -> bool:
    """Whether at least `frac` of `part` (a 0/1 mask at (x, y) of the field) is nucleus; False
    without a nucleus mask."""
    if nucleus is None:
        return False
    h, w = part.shape
    return nucleus[y:y + h, x:x + w][part > 0].sum() >= frac * part.sum()


def split_cells(fg: np.ndarray, diameter: float, params: AnalysisParams,
                nucleus: np.ndarray | None = None) -> np.ndarray:
    """Split a WBC foreground mask (working scale) into cells: uint16 labels 1..n, 0 background.

    Touching cells are separated at necks; small fragments, border-cut cells and (when the
    nucleus mask is given) cells with less than `params.min_nucleus_frac` nucleus are dropped.
    A whole component smaller than `params.min_area_frac` of the disc is kept as a small cell
    (`params.small_cell_frac`) when it is mostly nucleus; without the nucleus mask it is not."""
    fg = fg.astype(np.uint8)
    r = max(1, int(round(diameter * 0.03)))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
    fg = cv2.morphologyEx(fg, cv2.MORPH_OPEN, kernel)
    fg = _fill_holes(fg)
    h, w = fg.shape
    disc = math.pi * diameter * diameter / 4.0
    n, comp, stats, _ = cv2.connectedComponentsWithStats(fg, connectivity=8)
    out = np.zeros((h, w), np.uint16)
    next_id = 1
    smallest = min(params.small_cell_frac, params.min_area_frac) * disc
    for i in range(1, n):
        x, y, bw, bh, area = stats[i]
        if area < smallest:
            continue
        sub = (comp[y:y + bh, x:x + bw] == i).astype(np.uint8)
        parts = _split_component(sub, diameter) if area > 0.6 * disc else [sub]
        for part in parts:
            a = int(part.sum())
            if a < params.min_area_frac * disc and not (
                    len(parts) == 1 and a >= smallest
                    and _mostly_nucleus(part, nucleus, x, y, params.small_cell_nucleus_frac)):
                continue
            ys, xs = np.nonzero(part)
            touches = (ys.min() + y == 0 or xs.min() + x == 0 or ys.max() + y == h - 1
                       or xs.max() + x == w - 1)
            if touches and a < params.border_frac * disc:
                continue
            if nucleus is not None and params.min_nucleus_frac > 0:
                nuc = nucleus[y:y + bh, x:x + bw][part > 0].sum()
                if nuc < params.min_nucleus_frac * a:
                    continue
            view = out[y:y + bh, x:x + bw]
            view[part > 0] = next_id
            next_id += 1
    return out


def _fill_holes(fg: np.ndarray) -> np.ndarray:
    contours, _ = cv2.findContours(fg, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    filled = np.zeros_like(fg)
    cv2.drawContours(filled, contours, -1, 1, thickness=cv2.FILLED)
    return filled


def _split_component(sub: np.ndarray, diameter: float) -> list:
    """Split one connected component at necks; returns a list of masks of the same shape."""
    pad = 1
    padded = cv2.copyMakeBorder(sub, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=0)
    dist = cv2.distanceTransform(padded, cv2.DIST_L2, 5)
    k = max(3, int(diameter * 0.35) | 1)
    dil = cv2.dilate(dist, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k)))
    peaks = ((dist >= dil - 1e-3) & (dist > 0.2 * diameter / 2)).astype(np.uint8)
    n, plabels, _, cents = cv2.connectedComponentsWithStats(peaks, connectivity=8)
    if n <= 2:
        return [sub]
    peak_vals = [float(v) for v in
                 _max_per_label(dist, plabels, n)[1:]]
    seeds = [(cents[i], peak_vals[i - 1]) for i in range(1, n)]
    # at most one seed per quarter of a cell's area, strongest first (bounds the pairwise test
    # on noisy masks, where the distance transform has many tiny peaks)
    limit = max(2, int(sub.sum() / (0.25 * math.pi * diameter * diameter / 4)))
    seeds = sorted(seeds, key=lambda s: -s[1])[:limit]
    groups = _merge_seeds(seeds, dist, diameter)
    if len(set(groups)) <= 1:
        return [sub]
    markers = np.zeros_like(padded, np.uint8)
    for (c, _), g in zip(seeds, groups):
        cv2.circle(markers, (int(round(c[0])), int(round(c[1]))), 1, 1, -1)
    # nearest seed for each pixel (Voronoi over the seeds), restricted to the component
    inv = (1 - markers).astype(np.uint8)
    _, vor = cv2.distanceTransformWithLabels(inv, cv2.DIST_L2, 5, labelType=cv2.DIST_LABEL_PIXEL)
    seed_label = {}
    ys, xs = np.nonzero(markers)
    for yy, xx in zip(ys, xs):
        c = np.array([xx, yy], float)
        j = int(np.argmin([np.hypot(*(c - s[0])) for s in seeds]))
        seed_label[int(vor[yy, xx])] = groups[j]
    lut = np.zeros(int(vor.max()) + 1, np.int32)
    for k_, g in seed_label.items():
        lut[k_] = g + 1
    assign = lut[vor][pad:-pad, pad:-pad]
    parts = []
    for g in sorted(set(groups)):
        part = ((assign == g + 1) & (sub > 0)).astype(np.uint8)
        if part.any():
            parts.append(part)
    return parts


def _max_per_label(values: np.ndarray, labels: np.ndarray, n: int) -> np.ndarray:
    out = np.zeros(n, np.float64)
    np.maximum.at(out, labels.ravel(), values.ravel())
    return out


def _merge_seeds(seeds: list, dist: np.ndarray, diameter: float) -> list:
    """Group seeds that are not separated by a neck (union-find over pairs); seeds more than
    two diameters apart are never merged directly."""
    parent = list(range(len(seeds)))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(len(seeds)):
        for j in range(i + 1, len(seeds)):
            (ci, di), (cj, dj) = seeds[i], seeds[j]
            gap = float(np.hypot(*(ci - cj)))
            if gap > 2 * diameter:
                continue
            n = max(2, int(gap))
            xs = np.linspace(ci[0], cj[0], n).round().astype(int)
            ys = np.linspace(ci[1], cj[1], n).round().astype(int)
            valley = float(dist[ys, xs].min())
            if valley > NECK_RATIO * min(di, dj):
                parent[find(i)] = find(j)
    roots = [find(i) for i in range(len(seeds))]
    remap = {r: k for k, r in enumerate(dict.fromkeys(roots))}
    return [remap[r] for r in roots]


# --- back to the original image ------------------------------------------------------------------

def _to_full_resolution(cells_work: np.ndarray, probs: np.ndarray, scale: float, shape: tuple,
                        rgb: np.ndarray | None = None, diameter: float = 0.0,
                        params: AnalysisParams = AnalysisParams()):
    """Per cell, upsample the class probabilities of its box to original pixels; with
    `params.outline_refine` (and the image `rgb` and its WBC `diameter` given), the cytoplasm and
    nucleus probabilities are refined by a colour-guided filter before they are cut (`outline`).

    Returns (cell_labels uint16, mask uint8 0/128/255, boxes {id: (x, y, w, h)})."""
    h, w = shape
    cell_labels = np.zeros((h, w), np.uint16)
    mask = np.zeros((h, w), np.uint8)
    boxes = {}
    n_cells = int(cells_work.max())
    if n_cells == 0:
        return cell_labels, mask, boxes
    hw, ww = cells_work.shape
    # the working grid's own scale per axis: its size was rounded to whole pixels, and mapping
    # back with the nominal `scale` would shift cells toward the top-left by up to half a working
    # pixel at the far edge
    sy, sx = hw / h, ww / w
    refine = params.outline_refine if rgb is not None and diameter > 0 else 0.0
    pad = pad_px(diameter, refine)
    # grow each cell by a working pixel so that upsampled borders are not clipped
    grown = cv2.dilate(cells_work, np.ones((3, 3), np.uint8))
    grown[cells_work > 0] = cells_work[cells_work > 0]
    for cid, (ys_min, ys_max, xs_min, xs_max) in label_extents(grown).items():
        wy0, wy1 = max(0, ys_min - 1), min(hw, ys_max + 2)
        wx0, wx1 = max(0, xs_min - 1), min(ww, xs_max + 2)
        fy0, fy1 = int(math.floor(wy0 / sy)), min(h, int(math.ceil(wy1 / sy)))
        fx0, fx1 = int(math.floor(wx0 / sx)), min(w, int(math.ceil(wx1 / sx)))
        if pad:  # the filter reads pixels around the box: take them from the image, not mirrored
            fy0, fy1, fx0, fx1 = max(0, fy0 - pad), min(h, fy1 + pad), max(0, fx0 - pad), min(w, fx1 + pad)
            wy0, wy1 = max(0, int(math.floor(fy0 * sy)) - 1), min(hw, int(math.ceil(fy1 * sy)) + 1)
            wx0, wx1 = max(0, int(math.floor(fx0 * sx)) - 1), min(ww, int(math.ceil(fx1 * sx)) + 1)
        if fy1 <= fy0 or fx1 <= fx0:
            continue
        p = probs[:, wy0:wy1, wx0:wx1].astype(np.float32)
        # sample the working grid at the centres of the original pixels of this box
        mx = ((np.arange(fx0, fx1) + 0.5) * sx - 0.5 - wx0).astype(np.float32)
        my = ((np.arange(fy0, fy1) + 0.5) * sy - 0.5 - wy0).astype(np.float32)
        map_x, map_y = np.meshgrid(mx, my)
        up = [cv2.remap(np.ascontiguousarray(p[c]), map_x, map_y, cv2.INTER_LINEAR,
                        borderMode=cv2.BORDER_REPLICATE) for c in range(3)]
        own = cv2.remap((grown[wy0:wy1, wx0:wx1] == cid).astype(np.uint8), map_x, map_y,
                        cv2.INTER_NEAREST)
        background, cytoplasm, nucleus = up
        if refine:  # the guided filter is linear and keeps constants: the three still sum to 1
            refined = refine_maps(rgb[fy0:fy1, fx0:fx1], np.dstack([cytoplasm, nucleus]), diameter,
                                  refine, params.outline_eps)
            cytoplasm, nucleus = refined[..., 0], refined[..., 1]
            background = 1.0 - cytoplasm - nucleus
        sel = _smooth_cell(((own > 0) & (background < 0.5)).astype(np.uint8), scale)
        sel &= cell_labels[fy0:fy1, fx0:fx1] == 0
        if not sel.any():
            continue
        nucleus = nucleus > cytoplasm
        cell_labels[fy0:fy1, fx0:fx1][sel] = cid
        mask[fy0:fy1, fx0:fx1][sel & ~nucleus] = 128
        mask[fy0:fy1, fx0:fx1][sel & nucleus] = 255
        yy, xx = np.nonzero(sel)
        boxes[cid] = (fx0 + int(xx.min()), fy0 + int(yy.min()),
                      int(xx.max() - xx.min() + 1), int(yy.max() - yy.min() + 1))
    return cell_labels, mask, boxes


def nucleus_contrast(rgb: np.ndarray, cell_labels: np.ndarray, mask: np.ndarray, cid: int,
                     box: tuple, ring_px: int, colour: bool = True) -> float:
    """How much a cell's nucleus is stained against the glass around it: with, per channel,
    c = 1 - (median of the nucleus + 1) / (90th percentile of a ring `ring_px` wide around the
    cell, other cells left out, + 1), the spread max(c) - min(c) over R, G and B; in a grey image
    (`colour` False), which has no stain colour, how much darker it is: max(c).

    The 90th percentile of the ring is the glass or plasma between red cells. A stained nucleus
    takes far more light from one channel than another (Romanowsky nuclei absorb green most),
    whereas lamp falloff, a dimmer lamp, sensor noise and blank glass darken or lighten all three
    alike, so they score near 0. The WBCs found in the public val sets score 0.25 and up (median
    0.4 to 0.5), empty fields 0.004 at most (`scripts/nucleus_contrast_check.py`). Where the cell
    leaves too little room for a ring (it fills the image), its cytoplasm stands in; with no
    nucleus, or nothing to compare it with, it is 0."""
    x, y, w, h = box
    H, W = rgb.shape[:2]
    x0, y0 = max(0, x - ring_px), max(0, y - ring_px)
    x1, y1 = min(W, x + w + ring_px), min(H, y + h + ring_px)
    labels, px = cell_labels[y0:y1, x0:x1], rgb[y0:y1, x0:x1].astype(np.float32)
    cell = labels == cid
    nuc = cell & (mask[y0:y1, x0:x1] == 255)
    if not nuc.any():
        return 0.0
    dist = cv2.distanceTransform((~cell).astype(np.uint8), cv2.DIST_L2, 3)
    ring = (dist <= ring_px) & (labels == 0)
    around = px[ring] if ring.sum() >= MIN_RING_PX else px[cell & ~nuc]
    if around.size == 0:
        return 0.0
    c = darkening(np.median(px[nuc], axis=0), np.percentile(around, 90, axis=0))
    return float(c.max() - c.min()) if colour else float(c.max())


def field_stain(rgb: np.ndarray, not_field: np.ndarray, max_pixels: int = 1 << 16) -> float:
    """How stained the field around the WBCs is: over the pixels where `not_field` (any array
    the image's size) is 0 (a subsample of about `max_pixels`), the 90th percentile of their stain
    spread, as `nucleus_contrast` measures a nucleus (`darkening` against the glass, here each
    channel's 90th percentile of those pixels; max over R, G and B minus min). In a stained
    smear that is the red cells' stain; where the field is mostly glass, less. 0 with under
    `MIN_FIELD_PX` such pixels (a crop filled by its cell).

    `not_field` should hold all the segmenter took for WBC, kept or not (a neighbour cut by the
    border of a tight crop is dropped as a cell, but its nucleus is no red cell), and a frame
    painted as glass (`frame`), which would pass for empty glass. The 90th percentile,
    not the 99th, so that the nucleus of a WBC the segmenter missed, a few hundredths of a
    field, does not set it."""
    h, w = rgb.shape[:2]
    step = max(1, int(math.sqrt(h * w / max_pixels)))
    px = rgb[::step, ::step][not_field[::step, ::step] == 0].astype(np.float32)
    if len(px) < MIN_FIELD_PX // (step * step):
        return 0.0
    return float(np.percentile(_stain_spread(px, glass_percentile=90), 90))


def darkening(values: np.ndarray, glass: np.ndarray) -> np.ndarray:
    """Per channel (last axis), how much of the glass's light `values` take away:
    c = 1 - (value + 1) / (glass + 1). A stain makes c differ between channels; a plain
    darkening does not."""
    return 1.0 - (values + 1.0) / (glass + 1.0)


def is_grey(rgb: np.ndarray) -> bool:
    """True for an image without stain colour, as a monochrome camera gives: R = G = B
    everywhere, or R, G and B in proportion (a toned white balance, a sepia preset), which
    `stain_colour` finds under `GREY_STAIN_COLOUR`."""
    if all(_channels_equal(px) for px in (rgb[::16, ::16], rgb)):
        return True
    return stain_colour(rgb) < GREY_STAIN_COLOUR


def stain_colour(rgb: np.ndarray, reduce: int = 4, clip: int = 250) -> float:
    """How much stain colour an image shows: on a copy reduced `reduce` times by area, without
    the pixels that reach `clip` in any channel (clipping breaks the channels' proportion), the
    99th percentile over pixels of the spread over R, G and B of c = 1 - pixel / glass, the glass
    being each channel's 95th percentile: the per-pixel form of `nucleus_contrast`. 0 when R, G
    and B are in proportion; a stained smear's nuclei and red cells make it far larger, even
    where they cover only a few hundredths of the field."""
    step = -(-max(rgb.shape[:2]) // 2048)   # a large field is first thinned to about 2048 px
    rgb = rgb[::step, ::step] if step > 1 else rgb
    h, w = rgb.shape[:2]
    size = (max(1, w // reduce), max(1, h // reduce))
    small = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA).astype(np.float32)
    unclipped = cv2.inRange(np.ascontiguousarray(rgb), (0, 0, 0), (clip - 1,) * 3)  # 255: all under
    clipped = cv2.resize(unclipped, size, interpolation=cv2.INTER_AREA) < 255
    px = small[~clipped]
    if len(px) < 20:
        return 0.0
    return float(np.percentile(_stain_spread(px, glass_percentile=95), 99))


def _stain_spread(px: np.ndarray, glass_percentile: float) -> np.ndarray:
    """Per pixel of `px` (N, 3), the spread over R, G and B of its `darkening` (clipped to 0..1)
    against the glass, each channel's `glass_percentile` over `px`: what `stain_colour` and
    `field_stain` take their percentiles of."""
    c = np.clip(darkening(px, np.percentile(px, glass_percentile, axis=0)), 0.0, 1.0)
    return c.max(axis=1) - c.min(axis=1)


def contrast_ring(diameter: float) -> int:
    """Width in pixels of the ring a cell's nucleus is compared with (`nucleus_contrast`)."""
    return max(2, int(round(CONTRAST_RING * diameter)))


def drop_faint_cells(rgb, cell_labels, mask, boxes: dict, diameter: float, min_contrast: float,
                     min_grey_contrast: float | None = None, grey: bool | None = None,
                     over_field: float = 0.0, not_field: np.ndarray | None = None) -> None:
    """Remove, in place from all three, the cells whose `nucleus_contrast` is under
    `min_contrast` (0 keeps every cell), or, in a colour image, under `over_field` times the
    `field_stain` outside `not_field` (default: outside the cells; 0: no such bar). A grey image
    (`grey`, else `is_grey`) has no stain colour to measure, so there a nucleus has to be
    `min_grey_contrast` (default: `min_contrast`) darker than the glass."""
    colour = not (is_grey(rgb) if grey is None else grey)
    if not colour and min_grey_contrast is not None:
        min_contrast = min_grey_contrast
    if colour and over_field > 0 and boxes:
        field = field_stain(rgb, cell_labels if not_field is None else not_field)
        min_contrast = max(min_contrast, over_field * field)
    if min_contrast <= 0 or not boxes:
        return
    ring_px = contrast_ring(diameter)
    for cid, (x, y, w, h) in list(boxes.items()):
        if nucleus_contrast(rgb, cell_labels, mask, cid, (x, y, w, h), ring_px, colour) >= min_contrast:
            continue
        sel = cell_labels[y:y + h, x:x + w] == cid
        cell_labels[y:y + h, x:x + w][sel] = 0
        mask[y:y + h, x:x + w][sel] = 0
        del boxes[cid]


def _smooth_cell(sel: np.ndarray, scale: float) -> np.ndarray:
    """A cell's full-resolution mask without holes or hair-thin spurs (WBCs are solid, with
    smooth outlines): opening by SMOOTH_RADIUS working pixels, then hole filling."""
    r = int(round(SMOOTH_RADIUS / scale))
    if r >= 1:
        k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
        opened = cv2.morphologyEx(sel, cv2.MORPH_OPEN, k)
        if opened.any():
            sel = opened
    return _fill_holes(sel) > 0


def label_extents(labels: np.ndarray) -> dict:
    """id -> (y_min, y_max, x_min, x_max) (inclusive) for every non-zero label, in one pass."""
    ys, xs = np.nonzero(labels)
    if ys.size == 0:
        return {}
    ids = labels[ys, xs].astype(np.int64)
    n = int(ids.max()) + 1
    big = np.iinfo(np.int64).max
    y0 = np.full(n, big); y1 = np.full(n, -1); x0 = np.full(n, big); x1 = np.full(n, -1)
    np.minimum.at(y0, ids, ys); np.maximum.at(y1, ids, ys)
    np.minimum.at(x0, ids, xs); np.maximum.at(x1, ids, xs)
    return {int(i): (int(y0[i]), int(y1[i]), int(x0[i]), int(x1[i])) for i in np.unique(ids)}


# --- classification ----------------------------------------------------------------------------

#: the views of a square crop for test-time augmentation, in order: identity, flips, half turn,
#: then the same four of the transposed crop (8 in all: every rotation and flip of the square)
TTA_VIEWS = (1, 4, 8)


def crop_views(x: np.ndarray, n: int) -> list:
    """The first `n` views (1, 4 or 8) of a batch of crops (N, 3, S, S)."""
    if n not in TTA_VIEWS:
        raise ValueError(f"tta_views must be one of {TTA_VIEWS}, not {n}")
    views = []
    for base in (x, x.transpose(0, 1, 3, 2))[: 1 if n == 1 else n // 4]:
        views += [base, base[:, :, :, ::-1], base[:, :, ::-1, :], base[:, :, ::-1, ::-1]]
    return [np.ascontiguousarray(v) for v in views[:n]]


def classify_logits(x: np.ndarray, session, views: int = 1) -> np.ndarray:
    """Logits (N, 5) for normalised crops (N, 3, S, S), averaged over `views` views; sent to
    the session in batches of at most CLASSIFY_BATCH crops."""
    batch = np.concatenate(crop_views(x, views)) if views > 1 else x
    out = np.concatenate([
        session_output(session, "classify", part, (len(part), len(CLASSES)))
        for part in (batch[i:i + CLASSIFY_BATCH] for i in range(0, len(batch), CLASSIFY_BATCH))])
    return out.reshape(views, len(x), -1).mean(axis=0) if views > 1 else out


def unusual_stains(crops: list, reference, grey: bool = False) -> list:
    """For each uint8 crop: True when its stain lies beyond `reference`'s threshold (a
    `stain.StainReference`, or None to check nothing). A crop without two measurable stains is
    not flagged, unless the crops come from a grey image (`grey`): no stain at all, on which the
    classifier loses 10 to 36 points of accuracy (the model card's "grey" perturbation)."""
    if reference is None:
        return [False] * len(crops)
    if grey:
        return [True] * len(crops)
    dists = (reference.distance(c) for c in crops)
    return [d is not None and d > reference.threshold for d in dists]


#: `body_box` opens a cell with a disc wider than this radius (px) by two distance transforms,
#: whose cost does not grow with the disc, rather than by OpenCV's opening with an elliptic
#: kernel, whose cost grows with the disc's area times the cell's (a 1400 px cell: 7 to 10 s).
#: The two differ by a pixel at the edge, so cells of up to 500 px keep the kernel's boxes.
MAX_OPEN_RADIUS = 100


def body_box(region: np.ndarray, nucleus: np.ndarray, diameter: float, frac: float) -> tuple:
    """(x, y, w, h) within `region` (one cell's bool mask, cut to its box) of the cell's body:
    the region opened by a disc of `frac` x `diameter` pixels, keeping the parts that touch
    `nucleus` (bool, same shape). Opening removes what is thinner than the disc: a tail, or the
    sliver of a touching red cell that the outline took in. The region's own box when `frac` or
    `diameter` is not positive, or when no part touching the nucleus survives; the whole cut
    when `region` is empty."""
    if not region.any():
        return 0, 0, region.shape[1], region.shape[0]
    whole = _bbox(region)
    r = int(round(frac * diameter)) if frac > 0 and diameter else 0
    if r < 1:
        return whole
    opened = _open_by_disc(region.astype(np.uint8), r)
    _, parts = cv2.connectedComponents(opened)
    keep = np.isin(parts, np.unique(parts[(opened > 0) & nucleus])) & (parts > 0)
    return _bbox(keep) if keep.any() else whole


def _open_by_disc(mask: np.ndarray, r: int) -> np.ndarray:
    """`mask` (uint8 0/1) opened by a disc of radius `r`: by the elliptic kernel up to
    `MAX_OPEN_RADIUS`, beyond it as what lies within `r` of the points farther than `r` from
    the background (Euclidean distance transforms). As OpenCV's erosion does, what lies beyond
    the array's edge counts as the cell (padded with ones), so a cell cut by the image's
    border is not worn away from it."""
    if r <= MAX_OPEN_RADIUS:
        k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
        return cv2.morphologyEx(mask, cv2.MORPH_OPEN, k)
    padded = np.pad(mask, 1, constant_values=1)
    inner = cv2.distanceTransform(padded, cv2.DIST_L2, cv2.DIST_MASK_PRECISE) > r
    near = cv2.distanceTransform((~inner).astype(np.uint8), cv2.DIST_L2,
                                 cv2.DIST_MASK_PRECISE) <= r
    return near[1:-1, 1:-1].astype(np.uint8)


def _bbox(mask: np.ndarray) -> tuple:
    """(x, y, w, h) of the non-zero pixels of a non-empty 2-D mask."""
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)


def class_probs(crops: list, unusual: list, session, bundle, params) -> np.ndarray:
    """The crops' class probabilities (N, 5), after the bundle's temperature. The crops flagged
    in `unusual` are classified as `params` asks: in grey (grey_unusual), redrawn in the
    training stain (stain_normalise), or as the mean of their colour and grey answers
    (blend_unusual; the grey crops go in a call of their own, so that the other cells' answers
    are computed exactly as without it, and a crop grey already, R = G = B as a monochrome camera
    gives, keeps its one answer: its grey crop is itself)."""
    def probs_of(batch):
        return _softmax(classify_logits(normalize_crops(batch), session, params.tta_views)
                        / bundle.temperature, axis=1)

    if params.grey_unusual:
        crops = [to_grey(c) if odd else c for c, odd in zip(crops, unusual)]
    elif params.stain_normalise and bundle.stain_target is not None:
        crops = [bundle.stain_target.redraw(c) if odd else c for c, odd in zip(crops, unusual)]
    probs = probs_of(crops)
    flagged = [i for i in np.flatnonzero(unusual) if not _channels_equal(crops[i])] \
        if params.blend_unusual else []
    if flagged:
        probs[flagged] = (probs[flagged] + probs_of([to_grey(crops[i]) for i in flagged])) / 2
    return probs


def _channels_equal(rgb: np.ndarray) -> bool:
    """True when R = G = B at every pixel."""
    return np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2])


def reading_order(boxes: dict) -> list:
    """The labels of `boxes` (label -> (x, y, w, h)) in reading order: bands of 32 rows, top to
    bottom, then left to right. Cell k of the results is the k-th of them."""
    return sorted(boxes, key=lambda c: (boxes[c][1] // 32, boxes[c][0]))


def classify_cells(rgb, cell_labels, mask, boxes: dict, session, bundle, params,
                   diameter: float | None = None, grey: bool | None = None) -> list:
    """Classify every cell from its square crop (cut around `boxes`, the whole mask's box);
    returns CellResults numbered 1.. in reading order. Their boxes are the cells' bodies
    (`body_box`, `params.box_trim`) when the image's WBC `diameter` is given and the image has
    colour, else the boxes: in a grey image the trim lost matched boxes (docs/EXPERIMENTS.md, "No box
    trim in grey images"). `grey` is `is_grey(rgb)`, measured here when not given."""
    order = reading_order(boxes)
    if not order:
        return []
    grey = is_grey(rgb) if grey is None else grey
    trim = 0.0 if grey else params.box_trim
    crops = [cell_crop(rgb, boxes[c], bundle.crop_margin, bundle.crop_size) for c in order]
    unusual = unusual_stains(crops, bundle.stain_reference if params.stain_check else None, grey)
    probs = class_probs(crops, unusual, session, bundle, params)
    # renumber label maps so ids follow reading order
    remap = np.zeros(int(cell_labels.max()) + 1, np.uint16)
    cells = []
    for new_id, (cid, p, odd) in enumerate(zip(order, probs, unusual), start=1):
        remap[cid] = new_id
        x, y, bw, bh = boxes[cid]
        region = cell_labels[y:y + bh, x:x + bw] == cid
        nucleus = region & (mask[y:y + bh, x:x + bw] == 255)
        bx, by, bbw, bbh = body_box(region, nucleus, diameter or 0.0, trim)
        k = int(np.argmax(p))
        conf = round(float(p[k]), 6)  # as stored; the reports round it again, to PROB_DECIMALS
        cells.append(CellResult(
            cell_id=new_id, cls=CLASSES[k], confidence=conf,
            probs=tuple(round(float(v), 6) for v in p), x=x + bx, y=y + by, width=bbw, height=bbh,
            area_px=int(region.sum()), nucleus_area_px=int(nucleus.sum()),
            needs_review=round(conf, PROB_DECIMALS) < params.review_threshold or odd,
            unusual_stain=odd))
    cell_labels[...] = remap[cell_labels]
    return cells
