"""What surrounds a field of view and is not smear: finding it and filling it with glass.

An eyepiece or phone-adapter camera sees the microscope's round field stop: the lit field is a
disc, and the corners (often the sides too) are black. Images padded to a square or to a fixed
size carry black bars the same way. None of this is smear. The segmenter standardises each image
by its global statistics, so a large black area shifts those statistics, and it takes the black
for nucleus: on BCCD fields with black corners it found no WBC at all (docs/EXPERIMENTS.md, "A black
frame around the field").

`unlit_frame` finds the frame: the near-black, colourless pixels (every channel under `DARK` and
under `DARK_OF_GLASS` of the glass's brightness, channels within `MAX_CHROMA` of each other)
connected to the image border, in parts that each run along at least `MIN_BORDER_RUN` of the
border, grown by `GROW_PX` to take in the soft edge of the stop, when they cover at least
`MIN_FRACTION` of the image. Stained smears have no such pixels: the darkest nuclei of the public
datasets stay well above `DARK` in at least one channel, and the nuclei of an under-exposed
smear, dark as they are, keep their stain's colour and touch the border only where a cell is cut
(`scripts/grey_images_check.py` counts the images it finds a frame in).

`flat_margins` finds the other kind: flat bands of one colourless shade, lighter than the frame's
black, along the image's edges, such as white padding to another aspect ratio or an info banner
that camera software burns in (its text and scale bar included). A band runs the full length of
its edge (between the bands found on the edges beside it, `_peel`), is at least
`MARGIN_MIN_DEPTH` of the image deep, and its outermost and innermost lines are at least
`MARGIN_FULL` of the band's colour (every channel within `MARGIN_TOL`), the lines between at
least `MARGIN_PARTIAL` (text); and it ends in an edge across the image: within `MARGIN_EDGE`
lines past it, less than `MARGIN_PARTIAL` of a line has its colour. A band whose colour lies
within `MARGIN_MIN_CONTRAST` of the field's glass is left alone: filling it would change nothing
that matters, and that is what blown-out glass at the edge of a crop looks like.

`light_surround` finds the frame saved white: a viewer or converter that flattens a transparent
round stop (to save it as JPEG) paints it white, far brighter than the field's glass. Its pixels
are near-white and colourless (every channel at least `LIGHT`, channels within `MAX_CHROMA`),
connected to the border as the black frame's are, around one lit part of at least `MIN_LIT` of
an image of at least `MIN_STOP_SIDE` px, and together at least `MARGIN_MIN_CONTRAST` brighter
in some channel than the 90th percentile of the rest (its glass, where it is a field): glass
blown out at the edge of a field as brightly as the glass around it is left alone, but one side
blown out far beyond the rest of the glass is taken for a stop, and painted in that glass. A
single-cell crop of that size on neutral white glass, its cell and the red cells touching it
filling half of it, is taken for one, as nothing here tells its cell from a field; so the
analysis paints a white stop only when asked (`AnalysisParams.fill_white_stop`). Straight bands
are `flat_margins`'.

`fill_frame` paints either in the colour of the field's glass, so that the image is analysed as
the field alone; a cell cut by the stop or a margin keeps its visible part. The analysis always
fills the black frame, and the margins only when asked (`AnalysisParams.fill_margins`): on val images
given such bands, filling them brought back most of the cells the bands had cost, but under a
banner Dataset 1 lost two cells of class accuracy where its rule allowed one
(docs/EXPERIMENTS.md, "Flat margins and info banners").
"""

from __future__ import annotations

from typing import Optional

import cv2
import numpy as np

#: a pixel is unlit when every channel is under this ...
DARK = 40
#: ... and under this fraction of the glass's brightness (the 99th percentile of the brightest
#: channel), so that the glass of a very dim image is never taken for a frame ...
DARK_OF_GLASS = 0.5
#: ... and its channels differ by less than this: a field stop or a padding bar is black or grey
#: (a camera's raised black level), while the nuclei of an under-exposed smear, dark as they
#: are, keep their stain's colour
MAX_CHROMA = 12
#: a part of the frame must run along the image border for at least this fraction of the border
#: (a field stop's corner, a padding bar): a dark cell cut by the border touches it far less
MIN_BORDER_RUN = 0.02
#: the frame must cover at least this fraction of the image (1-pixel black lines left by resizing
#: at the edge of some TXL-PBC images are not a frame)
MIN_FRACTION = 0.01
#: the frame is grown by this many pixels, over the soft edge of the field stop
GROW_PX = 2
#: the glass colour: this percentile, per channel, of the lit pixels
GLASS_PERCENTILE = 90
#: ... of a subsample of about this many pixels
SAMPLE_PIXELS = 1 << 18
#: a margin pixel has every channel within this of its band's colour (compression ringing) ...
MARGIN_TOL = 6
#: ... and at least this fraction of the outermost and of the innermost line of a band is such
#: pixels: a band ends in a straight edge
MARGIN_FULL = 0.95
#: ... and at least this fraction of every line between (a banner's text and scale bar)
MARGIN_PARTIAL = 0.3
#: ... and within this many lines past its innermost full line, less than `MARGIN_PARTIAL` of a
#: line is of its colour: the band ends in an edge across the image (glass at the edge of a field
#: also starts flat, but its lines go on being mostly glass between the cells)
MARGIN_EDGE = 3
#: a band is at least this fraction of the image deep (a 1-pixel line left by resizing is not one)
MARGIN_MIN_DEPTH = 0.01
#: a band is filled only where its colour differs from the glass by this much in some channel
MARGIN_MIN_CONTRAST = 12
#: a pixel of a white surround has every channel at least this (a flattened transparent stop is
#: 255; JPEG ringing takes a few levels off near its edge)
LIGHT = 245
#: ... and the lit field inside it is one part covering at least this share of the image: a
#: single cell on blown-out glass (a crop) is surrounded by white too, and so are the cells of
#: a blown-out smear, each a part of its own
MIN_LIT = 0.5
#: ... in an image whose shorter side is at least this: a photograph through a field stop is a
#: camera's frame, while single-cell crops on white glass (WBC Image Dataset 1's 120 px, PBC's
#: 360 px) are smaller, and their white is their glass
MIN_STOP_SIDE = 400


def unlit_frame(rgb: np.ndarray) -> Optional[np.ndarray]:
    """A bool mask of the unlit frame of a uint8 RGB image (module docstring), or None."""
    h, w = rgb.shape[:2]
    edge = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]]).max(axis=1)
    if (edge < DARK).sum() < MIN_BORDER_RUN * 2 * (h + w):  # the border alone rules most out
        return None
    bright = rgb.max(axis=2)
    step = _sample_step(h, w)
    glass = float(np.percentile(bright[::step, ::step], 99))
    dark = (bright < min(DARK, DARK_OF_GLASS * glass)) & (bright - rgb.min(axis=2) < MAX_CHROMA)
    frame = _border_parts(dark)
    if frame.sum() < MIN_FRACTION * h * w:
        return None
    return _grown(frame)


def light_surround(rgb: np.ndarray) -> Optional[np.ndarray]:
    """A bool mask of the white surround of a uint8 RGB image (module docstring), or None."""
    h, w = rgb.shape[:2]
    if min(h, w) < MIN_STOP_SIDE:
        return None
    edge = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]]).min(axis=1)
    if (edge >= LIGHT).sum() < MIN_BORDER_RUN * 2 * (h + w):  # the border alone rules most out
        return None
    light = (rgb.min(axis=2) >= LIGHT) & (rgb.max(axis=2) - rgb.min(axis=2) < MAX_CHROMA)
    region = _border_parts(light)
    if region.sum() < MIN_FRACTION * h * w:
        return None
    _, _, stats, _ = cv2.connectedComponentsWithStats((~region).astype(np.uint8), connectivity=8)
    if len(stats) < 2 or stats[1:, cv2.CC_STAT_AREA].max() < MIN_LIT * h * w:
        return None
    glass = _glass(rgb, region)  # of the lit part: its glass, red cells and WBCs
    colour = np.median(rgb[region], axis=0)
    if (colour - glass).max() < MARGIN_MIN_CONTRAST:
        return None
    return _grown(region)


def _border_parts(mask: np.ndarray) -> np.ndarray:
    """The parts of `mask` (8-connected) that each run along at least `MIN_BORDER_RUN` of the
    image border."""
    h, w = mask.shape
    _, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
    run = np.bincount(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]),
                      minlength=int(labels.max()) + 1)
    run[0] = 0
    return np.isin(labels, np.flatnonzero(run >= MIN_BORDER_RUN * 2 * (h + w)))


def _grown(mask: np.ndarray) -> np.ndarray:
    """`mask` grown by `GROW_PX`, over the soft edge of a field stop."""
    if not GROW_PX:
        return mask
    k = 2 * GROW_PX + 1
    return cv2.dilate(mask.astype(np.uint8), np.ones((k, k), np.uint8)) > 0


def flat_margins(rgb: np.ndarray) -> Optional[np.ndarray]:
    """A bool mask of the flat margins of a uint8 RGB image (module docstring), or None."""
    h, w = rgb.shape[:2]
    bands = _peel(rgb)
    if not bands:
        return None
    glass = _glass(rgb, _band_mask(h, w, bands))
    if glass is None:  # nothing but margins: no field to fill them from
        return None
    bands = [b for b in bands if np.abs(b[2] - glass).max() >= MARGIN_MIN_CONTRAST]
    return _band_mask(h, w, bands) if bands else None


def _peel(rgb: np.ndarray) -> list:
    """The bands ((edge, depth, colour); edges top, bottom, left, right; depth from the image's
    edge) found edge by edge, looking again inside what was found until nothing more is: wide
    side bars keep the top and bottom padding from ending in an edge until they are cut off."""
    top, bottom, left, right = 0, rgb.shape[0], 0, rgb.shape[1]
    found = {}
    while True:
        inner = rgb[top:bottom, left:right]
        views = (inner, inner[::-1], inner.transpose(1, 0, 2), inner.transpose(1, 0, 2)[::-1])
        # never empty: a band is under half of what it was looked for in
        new = {edge: _band(lines) for edge, lines in enumerate(views) if edge not in found}
        new = {edge: band for edge, band in new.items() if band[0]}
        if not new:
            break
        for edge, (depth, colour) in new.items():
            offset = (top, rgb.shape[0] - bottom, left, rgb.shape[1] - right)[edge]
            found[edge] = (offset + depth, colour)
        top, bottom = found.get(0, (0,))[0], rgb.shape[0] - found.get(1, (0,))[0]
        left, right = found.get(2, (0,))[0], rgb.shape[1] - found.get(3, (0,))[0]
    return [(edge, depth, colour) for edge, (depth, colour) in sorted(found.items())]


def _band(lines: np.ndarray) -> tuple:
    """(depth, colour) of the flat band at the start of `lines` (an image seen from one edge:
    line 0 is the edge), or (0, None)."""
    colour = np.median(lines[0], axis=0)
    if colour.max() < DARK or colour.max() - colour.min() >= MAX_CHROMA:  # black: `unlit_frame`'s
        return 0, None
    if _share(lines[:1], colour)[0] < MARGIN_FULL:
        return 0, None
    share = _share(lines[:lines.shape[0] // 2], colour)
    inside = np.flatnonzero(share < MARGIN_PARTIAL)
    if not inside.size:  # its colour fills half the image or more: the field, not a margin
        return 0, None
    end = inside[0]  # lines 0..end-1 may belong to the band
    full = np.flatnonzero(share[:end] >= MARGIN_FULL)
    depth = int(full[-1]) + 1  # it ends at its innermost full line ...
    if end - depth > MARGIN_EDGE:  # ... in an edge, not fading into glass between cells
        return 0, None
    if depth < max(2, MARGIN_MIN_DEPTH * lines.shape[0]):
        return 0, None
    return depth, colour


def _share(lines: np.ndarray, colour: np.ndarray) -> np.ndarray:
    """For each line, the fraction of its pixels within `MARGIN_TOL` of `colour`."""
    near = np.abs(lines.astype(np.int16) - colour.astype(np.int16)) <= MARGIN_TOL
    return near.all(axis=2).mean(axis=1)


def _band_mask(h: int, w: int, bands: list) -> np.ndarray:
    """The bool mask of `bands` ((edge, depth, colour); edges top, bottom, left, right), each grown
    by `GROW_PX` into the field."""
    mask = np.zeros((h, w), bool)
    for edge, depth, _ in bands:
        d = depth + GROW_PX
        if edge == 0:
            mask[:d] = True
        elif edge == 1:
            mask[h - d:] = True
        elif edge == 2:
            mask[:, :d] = True
        else:
            mask[:, w - d:] = True
    return mask


def fill_frame(rgb: np.ndarray, frame: np.ndarray) -> np.ndarray:
    """A copy of `rgb` with the `frame` pixels painted in the glass colour of the rest; `rgb`
    itself when nothing is lit."""
    glass = _glass(rgb, frame)
    if glass is None:
        return rgb
    out = rgb.copy()
    out[frame] = np.clip(np.rint(glass), 0, 255).astype(np.uint8)
    return out


def _glass(rgb: np.ndarray, outside: np.ndarray) -> Optional[np.ndarray]:
    """The glass colour (`GLASS_PERCENTILE` per channel) of the pixels not `outside`, or None."""
    step = _sample_step(*outside.shape)
    lit = rgb[::step, ::step][~outside[::step, ::step]]
    if lit.size == 0:
        return None
    return np.percentile(lit.reshape(-1, 3), GLASS_PERCENTILE, axis=0)


def _sample_step(h: int, w: int) -> int:
    """The stride that leaves about `SAMPLE_PIXELS` of an h x w image for a percentile."""
    return max(1, int(np.sqrt(h * w / SAMPLE_PIXELS)))
