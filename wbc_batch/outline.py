"""Edge-aware refinement of a cell's outline, and its nucleus's, at full resolution.

The segmenter works at a scale where a WBC is `bundle.diameter` pixels across, so at full
resolution its probabilities are upsampled and their edges are soft: an outline can run a few
pixels past a cell's dark rim into the gap or a touching red cell. A guided filter (He, Sun and
Tang, "Guided image filtering", ECCV 2010) with the colour image as guide moves such an edge onto
the image's own colour edges: within each window of radius r the output is a linear function of
the guide's three channels, fitted to the probability by ridge regression (regularisation eps).
The nucleus and cytoplasm probabilities are filtered together, with one guide, and compared as
before; the filter is linear and keeps constants, so the three classes still sum to one.
"""

from __future__ import annotations

import math

import cv2
import numpy as np


def _box(x: np.ndarray, r: int) -> np.ndarray:
    """Mean over the (2r+1)^2 window around each pixel (edges reflected)."""
    return cv2.boxFilter(x, -1, (2 * r + 1, 2 * r + 1), normalize=True,
                         borderType=cv2.BORDER_REFLECT)


def guided_filter(guide: np.ndarray, src: np.ndarray, radius: int, eps: float) -> np.ndarray:
    """He et al.'s guided filter with a colour guide.

    :param guide: float32 (H, W, 3) in [0, 1]
    :param src: float32 (H, W), the map to filter (here a foreground probability), or
        (H, W, K): K maps filtered with the same guide, its statistics computed once
    :param radius: window radius in pixels (>= 1)
    :param eps: ridge regularisation, finite and > 0; larger values smooth more and follow the
        guide less (a huge eps leaves the double box filter of `src`)
    :returns: float32, the shape of `src`
    :raises ValueError: eps not a positive finite number

    Each window's 3x3 colour covariance (plus eps on its diagonal, so it is positive definite
    even for a grey guide) is inverted in closed form, by its cofactors, for every pixel at once.
    For eps > 1 the system is divided by eps first (the same solution): otherwise the cofactors,
    products of three eps-sized terms, overflow float32 from eps ~1e13 on and every
    coefficient becomes inf/inf = NaN. For eps <= 1 nothing is divided (the same numbers as ever).
    """
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"the guided filter's eps must be a positive finite number, not {eps!r}")
    scale = max(float(eps), 1.0)
    inv, eps = 1.0 / scale, eps / scale
    guide = guide.astype(np.float32)
    single = src.ndim == 2
    src = src.astype(np.float32).reshape(src.shape[:2] + (-1,))
    k = src.shape[2]
    r, g, b = guide[..., 0], guide[..., 1], guide[..., 2]
    # every first and second moment the fit needs, in one box filter
    m = _box(np.dstack([guide, r * r, r * g, r * b, g * g, g * b, b * b, src,
                        *(guide * src[..., j:j + 1] for j in range(k))]), radius)
    mean_i, mean_p = m[..., 0:3], m[..., 9:9 + k]
    mr, mg, mb = mean_i[..., 0], mean_i[..., 1], mean_i[..., 2]
    # the symmetric covariance [[srr, srg, srb], [srg, sgg, sgb], [srb, sgb, sbb]] ...
    srr, srg, srb = ((m[..., 3] - mr * mr) * inv + eps, (m[..., 4] - mr * mg) * inv,
                     (m[..., 5] - mr * mb) * inv)
    sgg, sgb, sbb = ((m[..., 6] - mg * mg) * inv + eps, (m[..., 7] - mg * mb) * inv,
                     (m[..., 8] - mb * mb) * inv + eps)
    # ... and its cofactors (the inverse times the determinant)
    c_rr, c_rg, c_rb = sgg * sbb - sgb * sgb, srb * sgb - srg * sbb, srg * sgb - srb * sgg
    c_gg, c_gb, c_bb = srr * sbb - srb * srb, srg * srb - srr * sgb, srr * sgg - srg * srg
    det = srr * c_rr + srg * c_rg + srb * c_rb
    coefs = []
    for j in range(k):  # per map: its covariance with the guide, solved for the linear fit
        mp = mean_p[..., j]
        pr, pg, pb = ((m[..., 9 + k + 3 * j + c] - mean_i[..., c] * mp) * inv for c in range(3))
        ar = (c_rr * pr + c_rg * pg + c_rb * pb) / det
        ag = (c_rg * pr + c_gg * pg + c_gb * pb) / det
        ab = (c_rb * pr + c_gb * pg + c_bb * pb) / det
        coefs += [ar, ag, ab, mp - ar * mr - ag * mg - ab * mb]
    q = _box(np.dstack(coefs), radius)
    out = np.dstack([q[..., 4 * j] * r + q[..., 4 * j + 1] * g + q[..., 4 * j + 2] * b + q[..., 4 * j + 3]
                     for j in range(k)])
    return out[..., 0] if single else out


def radius_px(diameter: float, frac: float) -> int:
    """The filter's window radius: `frac` of the WBC `diameter` (in the same pixels), at least 1."""
    return max(1, int(round(frac * diameter)))


def refine_maps(rgb: np.ndarray, maps: np.ndarray, diameter: float, frac: float,
                eps: float) -> np.ndarray:
    """A cell window's probability maps (H, W) or (H, W, K), guided by the uint8 RGB pixels of the
    same window, with a window of `radius_px(diameter, frac)`."""
    return guided_filter(rgb.astype(np.float32) / 255.0, maps, radius_px(diameter, frac), eps)


def pad_px(diameter: float, frac: float) -> int:
    """How far beyond a cell's box the refinement reads pixels (0 when it is off)."""
    return radius_px(diameter, frac) + 1 if frac > 0 else 0
