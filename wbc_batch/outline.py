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
    """
    guide = guide.astype(np.float32)
    src = src.astype(np.float32)
    mean_i = _box(guide, radius)
    mean_p = _box(src, radius)
    cov_ip = _box(guide * src[..., None], radius) - mean_i * mean_p[..., None]
    sigma = np.empty(src.shape + (3, 3), np.float32)
    for a in range(3):
        for b in range(a, 3):
            v = _box(guide[..., a] * guide[..., b], radius) - mean_i[..., a] * mean_i[..., b]
            sigma[..., a, b] = sigma[..., b, a] = v
    sigma += eps * np.eye(3, dtype=np.float32)
    coef = np.linalg.solve(sigma, cov_ip[..., None])[..., 0]
    offset = mean_p - np.einsum("hwc,hwc->hw", coef, mean_i)
    return np.einsum("hwc,hwc->hw", _box(coef, radius), guide) + _box(offset, radius)


def refine_foreground(rgb: np.ndarray, foreground: np.ndarray, diameter: float, frac: float,
                      eps: float) -> np.ndarray:
    """A cell window's foreground probability, guided by the uint8 RGB pixels of the same
    window: the filter's radius is `frac` of the WBC `diameter` (in these pixels), at least 1."""
    radius = max(1, int(round(frac * diameter)))
    return guided_filter(rgb.astype(np.float32) / 255.0, foreground, radius, eps)


def pad_px(diameter: float, frac: float) -> int:
    """How far beyond a cell's box the refinement reads pixels (0 when it is off)."""
    return max(1, int(round(frac * diameter))) + 1 if frac > 0 else 0
