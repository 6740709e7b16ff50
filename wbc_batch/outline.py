"""Edge-aware refinement of a cell's outline at full resolution.

The segmenter works at a scale where a WBC is `bundle.diameter` pixels across, so at full
resolution its probabilities are upsampled and their edges are soft: an outline can run a few
pixels past a cell's dark rim into the gap or a touching red cell. A guided filter (He, Sun and
Tang, "Guided image filtering", ECCV 2010) with the colour image as guide moves such an edge onto
the image's own colour edges: within each window of radius r the output is a linear function of
the guide's three channels, fitted to the probability by ridge regression (regularisation eps).
"""

from __future__ import annotations

import cv2
import numpy as np


def _box(x: np.ndarray, r: int) -> np.ndarray:
    """Mean over the (2r+1)^2 window around each pixel (edges reflected)."""
    return cv2.boxFilter(x, -1, (2 * r + 1, 2 * r + 1), normalize=True,
                         borderType=cv2.BORDER_REFLECT)


def guided_filter(guide: np.ndarray, src: np.ndarray, radius: int, eps: float) -> np.ndarray:
    """He et al.'s guided filter with a colour guide.

    :param guide: float32 (H, W, 3) in [0, 1]
    :param src: float32 (H, W), the map to filter (here a foreground probability)
    :param radius: window radius in pixels (>= 1)
    :param eps: ridge regularisation; larger values smooth more and follow the guide less
    :returns: float32 (H, W)

    Each window's 3x3 colour covariance (plus eps on its diagonal, so it is positive definite
    even for a grey guide) is inverted in closed form, by its cofactors, for every pixel at once.
    """
    guide = guide.astype(np.float32)
    src = src.astype(np.float32)
    r, g, b = guide[..., 0], guide[..., 1], guide[..., 2]
    # every first and second moment the fit needs, in one box filter
    m = _box(np.dstack([guide, src, guide * src[..., None], r * r, r * g, r * b, g * g, g * b, b * b]),
             radius)
    mean_i, mean_p = m[..., 0:3], m[..., 3]
    cov = m[..., 4:7] - mean_i * mean_p[..., None]
    mr, mg, mb = mean_i[..., 0], mean_i[..., 1], mean_i[..., 2]
    # the symmetric covariance [[srr, srg, srb], [srg, sgg, sgb], [srb, sgb, sbb]] ...
    srr, srg, srb = m[..., 7] - mr * mr + eps, m[..., 8] - mr * mg, m[..., 9] - mr * mb
    sgg, sgb, sbb = m[..., 10] - mg * mg + eps, m[..., 11] - mg * mb, m[..., 12] - mb * mb + eps
    # ... and its cofactors (the inverse times the determinant)
    c_rr, c_rg, c_rb = sgg * sbb - sgb * sgb, srb * sgb - srg * sbb, srg * sgb - srb * sgg
    c_gg, c_gb, c_bb = srr * sbb - srb * srb, srg * srb - srr * sgb, srr * sgg - srg * srg
    det = srr * c_rr + srg * c_rg + srb * c_rb
    pr, pg, pb = cov[..., 0], cov[..., 1], cov[..., 2]
    ar = (c_rr * pr + c_rg * pg + c_rb * pb) / det
    ag = (c_rg * pr + c_gg * pg + c_gb * pb) / det
    ab = (c_rb * pr + c_gb * pg + c_bb * pb) / det
    offset = mean_p - ar * mr - ag * mg - ab * mb
    q = _box(np.dstack([ar, ag, ab, offset]), radius)
    return q[..., 0] * r + q[..., 1] * g + q[..., 2] * b + q[..., 3]


def refine_foreground(rgb: np.ndarray, foreground: np.ndarray, diameter: float, frac: float,
                      eps: float) -> np.ndarray:
    """A cell window's foreground probability, guided by the uint8 RGB pixels of the same
    window: the filter's radius is `frac` of the WBC `diameter` (in these pixels), at least 1."""
    radius = max(1, int(round(frac * diameter)))
    return guided_filter(rgb.astype(np.float32) / 255.0, foreground, radius, eps)


def pad_px(diameter: float, frac: float) -> int:
    """How far beyond a cell's box the refinement reads pixels (0 when it is off)."""
    return max(1, int(round(frac * diameter))) + 1 if frac > 0 else 0
