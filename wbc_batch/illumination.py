"""Uneven illumination (lamp falloff, vignetting): measuring it and evening it out.

Many microscopes light the field unevenly: the corners are darker than the centre, or one side
is darker than the other when the lamp is off-centre. The segmenter standardises each image by
its global statistics, so a dark corner of glass looks to it like cytoplasm, and cells are found
where there are none.

The glass between the cells is the brightest part of a smear, and it should be equally bright
everywhere. `measure` samples it on a grid of blocks (a high percentile of each block's
brightness), fits a quadratic surface to the logarithm of those samples, leaving out blocks that
lie well below the surface (blocks filled by cells), and reports the surface as a gain relative
to its brightest point. `even_out` divides the image by that gain when the darkest point of the
field is at least `min_falloff` below the brightest, and leaves the image untouched otherwise, so
evenly lit images are analysed exactly as before.

A lamp's light falls off towards the edges of the field, so the darkest point of a real falloff
surface lies on the image border. A surface that is darkest inside the image (a bowl) was fitted
around something dark in the middle, most often a cell filling a crop, whose glass shows only
at the edges: evening it out would bleach the cell. Such a surface is refused (`measure` returns
None), and the image is left as it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

#: blocks along the shorter side of the image
GRID = 8
#: the brightness percentile of a block taken as its glass
GLASS_PERCENTILE = 90
#: a block more than this far below the fitted surface (in log brightness) is taken for cells
OUTLIER_LOG = 0.06
#: fewer blocks than this left after dropping outliers: no estimate
MIN_BLOCKS = 12
#: the working size of the shorter side for sampling
SAMPLE_SIDE = 128
#: rows corrected at a time (bounds the memory of a large field)
STRIP_ROWS = 1024
#: a surface darker inside the image than anywhere on its border by more than this (in log
#: brightness) is a bowl around cells, not lamp falloff
BOWL_LOG = 0.02
#: points per side of the grid the surface is evaluated on
SURFACE_GRID = 65


@dataclass
class Illumination:
    """A fitted illumination surface: log gain = c . (1, x, y, x^2, y^2, xy), with x and y in
    -1..1 across the image, shifted so that its brightest point in the image is 0."""

    coef: np.ndarray
    falloff: float  # 1 - darkest / brightest over the image

    def gain(self, h: int, w: int, y0: int = 0, y1: int | None = None) -> np.ndarray:
        """The gain (0..1] at rows y0..y1 of an h x w image, float32 (rows, w)."""
        y1 = h if y1 is None else y1
        xs = _axis(w)
        ys = _axis(h)[y0:y1]
        return np.exp(_surface(self.coef, xs[None, :], ys[:, None])).astype(np.float32)


def _axis(n: int) -> np.ndarray:
    return np.linspace(-1.0, 1.0, n, dtype=np.float64) if n > 1 else np.zeros(1)


def _terms(x, y):
    x, y = np.broadcast_arrays(x, y)
    return np.stack([np.ones_like(x), x, y, x * x, y * y, x * y], axis=-1)


def _surface(coef, x, y):
    return _terms(x, y) @ coef


def block_samples(rgb: np.ndarray) -> tuple:
    """(x, y, log brightness) of the glass of each block; x, y are block centres in -1..1."""
    h, w = rgb.shape[:2]
    scale = min(1.0, SAMPLE_SIDE / min(h, w))
    small = cv2.resize(rgb, (max(1, round(w * scale)), max(1, round(h * scale))),
                       interpolation=cv2.INTER_AREA) if scale < 1 else rgb
    lum = small.astype(np.float32).mean(axis=2)
    sh, sw = lum.shape
    ny = GRID if sh <= sw else max(GRID, round(GRID * sh / sw))
    nx = GRID if sw <= sh else max(GRID, round(GRID * sw / sh))
    ys = np.linspace(0, sh, ny + 1).round().astype(int)
    xs = np.linspace(0, sw, nx + 1).round().astype(int)
    hs, ws = np.diff(ys), np.diff(xs)
    glass = np.full((ny, nx), np.nan, np.float32)
    for bh in np.unique(hs[hs > 0]):  # blocks come in at most two heights and two widths:
        rows = np.flatnonzero(hs == bh)  # one percentile call per size, not per block
        for bw in np.unique(ws[ws > 0]):
            cols = np.flatnonzero(ws == bw)
            blocks = np.stack([lum[ys[i]:ys[i] + bh, xs[j]:xs[j] + bw].ravel() for i in rows for j in cols])
            glass[np.ix_(rows, cols)] = np.percentile(blocks, GLASS_PERCENTILE, axis=1).reshape(rows.size, cols.size)
    iy, jx = np.nonzero(~np.isnan(glass))
    px = (xs[jx] + xs[jx + 1] - 1) / 2.0
    py = (ys[iy] + ys[iy + 1] - 1) / 2.0
    pv = np.log(glass[iy, jx] + 1.0)
    to_unit = lambda v, n: 2.0 * np.asarray(v) / max(1, n - 1) - 1.0  # noqa: E731
    return to_unit(px, sw), to_unit(py, sh), np.asarray(pv)


def measure(rgb: np.ndarray) -> Illumination | None:
    """The illumination surface of a uint8 RGB image, or None when too few blocks show glass or
    the surface is darkest inside the image rather than at its border (see the module's doc)."""
    x, y, v = block_samples(rgb)
    keep = np.ones(v.shape, bool)
    coef = None
    for _ in range(3):
        if keep.sum() < MIN_BLOCKS:
            return None
        coef, *_ = np.linalg.lstsq(_terms(x[keep], y[keep]), v[keep], rcond=None)
        resid = v - _surface(coef, x, y)
        new_keep = resid > -OUTLIER_LOG
        if np.array_equal(new_keep, keep):
            break
        keep = new_keep
    grid = _surface(coef, _axis(SURFACE_GRID)[None, :], _axis(SURFACE_GRID)[:, None])
    top, low = float(grid.max()), float(grid.min())
    border = min(grid[0].min(), grid[-1].min(), grid[:, 0].min(), grid[:, -1].min())
    if border - low > BOWL_LOG:
        return None
    coef = coef.copy()
    coef[0] -= top
    return Illumination(coef=coef, falloff=float(1.0 - np.exp(low - top)))


def even_out(rgb: np.ndarray, min_falloff: float) -> tuple:
    """(image, falloff): the image divided by its illumination gain when the measured falloff is
    at least `min_falloff` (> 0), else the image itself. The falloff is 0.0 when none could be
    measured. The input is never modified."""
    found = measure(rgb)
    if found is None:
        return rgb, 0.0
    if not min_falloff or found.falloff < min_falloff:
        return rgb, found.falloff
    h, w = rgb.shape[:2]
    out = np.empty_like(rgb)
    for y0 in range(0, h, STRIP_ROWS):
        y1 = min(h, y0 + STRIP_ROWS)
        gain = found.gain(h, w, y0, y1)[..., None]
        out[y0:y1] = np.clip(rgb[y0:y1].astype(np.float32) / gain + 0.5, 0, 255).astype(np.uint8)
    return out, found.falloff
