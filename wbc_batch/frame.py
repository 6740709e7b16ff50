"""The unlit frame around a field of view: finding it and filling it with glass.

An eyepiece or phone-adapter camera sees the microscope's round field stop: the lit field is a
disc, and the corners (often the sides too) are black. Images padded to a square or to a fixed
size carry black bars the same way. None of this is smear. The segmenter standardises each image
by its global statistics, so a large black area shifts those statistics, and it takes the black
for nucleus: on BCCD fields with black corners it found no WBC at all (model card, "A black
frame around the field").

`unlit_frame` finds the frame: the near-black, colourless pixels (every channel under `DARK` and
under `DARK_OF_GLASS` of the glass's brightness, channels within `MAX_CHROMA` of each other)
connected to the image border, in parts that each run along at least `MIN_BORDER_RUN` of the
border, grown by `GROW_PX` to take in the soft edge of the stop, when they cover at least
`MIN_FRACTION` of the image. Stained smears have no such pixels: the darkest nuclei of the public
datasets stay well above `DARK` in at least one channel, and the nuclei of an under-exposed
smear, dark as they are, keep their stain's colour and touch the border only where a cell is cut
(`scripts/grey_images_check.py` counts the images it finds a frame in). `fill_frame` paints the frame in the colour of the field's glass,
so that the image is analysed as the lit field alone; a cell cut by the stop keeps its visible
part.
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
    _, labels = cv2.connectedComponents(dark.astype(np.uint8), connectivity=8)
    run = np.bincount(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]),
                      minlength=int(labels.max()) + 1)
    run[0] = 0
    frame = np.isin(labels, np.flatnonzero(run >= MIN_BORDER_RUN * 2 * (h + w)))
    if frame.sum() < MIN_FRACTION * h * w:
        return None
    if GROW_PX:
        k = 2 * GROW_PX + 1
        frame = cv2.dilate(frame.astype(np.uint8), np.ones((k, k), np.uint8)) > 0
    return frame


def fill_frame(rgb: np.ndarray, frame: np.ndarray) -> np.ndarray:
    """A copy of `rgb` with the `frame` pixels painted in the glass colour of the rest; `rgb`
    itself when nothing is lit."""
    step = _sample_step(*frame.shape)
    lit = rgb[::step, ::step][~frame[::step, ::step]]
    if lit.size == 0:
        return rgb
    glass = np.percentile(lit.reshape(-1, 3), GLASS_PERCENTILE, axis=0)
    out = rgb.copy()
    out[frame] = np.clip(np.rint(glass), 0, 255).astype(np.uint8)
    return out


def _sample_step(h: int, w: int) -> int:
    """The stride that leaves about `SAMPLE_PIXELS` of an h x w image for a percentile."""
    return max(1, int(np.sqrt(h * w / SAMPLE_PIXELS)))
