"""Outline refinement: the colour-guided filter, and its use on each cell at full resolution."""

import math

import cv2
import numpy as np
import pytest

from wbc_batch.analysis import analyze
from wbc_batch.config import AnalysisParams
from wbc_batch.outline import guided_filter, pad_px

from test_analysis import BUNDLE, RuleSession, field


def _box(x, r):
    return cv2.boxFilter(x, -1, (2 * r + 1, 2 * r + 1), borderType=cv2.BORDER_REFLECT)


def test_a_flat_guide_leaves_a_plain_double_box_filter():
    """With nothing in the guide to follow, each window's fit is its mean: the filter smooths."""
    rng = np.random.default_rng(0)
    src = rng.random((40, 50)).astype(np.float32)
    out = guided_filter(np.full((40, 50, 3), 0.6, np.float32), src, 3, 1e-3)
    assert np.allclose(out, _box(_box(src, 3), 3), atol=1e-5)


def _reference(guide, src, r, eps):
    """The guided filter pixel by pixel in float64, with numpy's own 3x3 solve."""
    mean = lambda x: _box(x.astype(np.float64), r)
    mi, mp = mean(guide), mean(src)
    a = np.empty(guide.shape, np.float64)
    for y, x in np.ndindex(src.shape):
        cov = np.array([[mean(guide[..., i] * guide[..., j])[y, x] - mi[y, x, i] * mi[y, x, j]
                         for j in range(3)] for i in range(3)])
        cp = np.array([mean(guide[..., i] * src)[y, x] - mi[y, x, i] * mp[y, x] for i in range(3)])
        a[y, x] = np.linalg.solve(cov + eps * np.eye(3), cp)
    b = mp - (a * mi).sum(2)
    return (mean(a) * guide).sum(2) + mean(b)


@pytest.mark.parametrize("eps", [1e-3, 0.5, 3.0, 1e20])
def test_the_filter_is_the_ridge_fit_for_any_eps(eps):
    # before: from eps ~1e13 on, the cofactors overflowed float32 and every value was NaN, so
    # --outline-eps 1e20 lost every cell of every image (exit 0)
    rng = np.random.default_rng(1)
    guide = rng.random((12, 14, 3)).astype(np.float32)
    src = rng.random((12, 14)).astype(np.float32)
    out = guided_filter(guide, src, 2, eps)
    assert np.isfinite(out).all()
    assert np.allclose(out, _reference(guide, src, 2, eps), atol=2e-3)
    if eps > 1e6:  # nothing left of the guide: the double box filter
        assert np.allclose(out, _box(_box(src, 2), 2), atol=1e-5)


@pytest.mark.parametrize("eps", [0.0, -1.0, math.nan, math.inf])
def test_eps_must_be_positive_and_finite(eps):
    with pytest.raises(ValueError, match="eps must be a positive finite number"):
        guided_filter(np.zeros((8, 8, 3), np.float32), np.zeros((8, 8), np.float32), 1, eps)


def test_a_soft_edge_moves_onto_the_colour_edge_of_the_guide():
    """The probability crosses 0.5 three pixels beyond the cell's colour edge (as an upsampled,
    too-generous outline does); guided by the colour image, with a window wider than that, it
    crosses at the edge. An edge further out than the window reaches is only partly pulled in."""
    w, edge = 80, 40
    guide = np.empty((10, w, 3), np.float32)
    guide[:, :edge] = (0.59, 0.47, 0.67)   # cytoplasm
    guide[:, edge:] = (0.92, 0.88, 0.90)   # glass
    x = np.arange(w, dtype=np.float32) + 0.5
    crossing = lambda row: int(np.argmax(row < 0.5))  # first pixel counted as outside

    def soft_edge(at):
        return np.tile(1.0 / (1.0 + np.exp((x - at) / 3.0)), (10, 1)).astype(np.float32)

    src = soft_edge(edge + 3)
    assert crossing(src[5]) == edge + 3
    assert crossing(guided_filter(guide, src, 6, 1e-3)[5]) == edge
    far = guided_filter(guide, soft_edge(edge + 8), 6, 1e-3)
    assert edge < crossing(far[5]) <= edge + 8


def test_pad_px_is_zero_when_off():
    assert pad_px(112, 0.0) == 0
    assert pad_px(112, 0.06) == 8
    assert pad_px(5, 0.06) == 2  # a radius of at least one pixel, and one more


class GenerousSession(RuleSession):
    """The rule session with one region grown by `grow` working pixels: the whole cell (its
    outline runs past the rim into the glass) or its nucleus (which runs into the cytoplasm)."""

    def __init__(self, grow: int, region: str = "cell"):
        super().__init__()
        self.kernel = np.ones((2 * grow + 1, 2 * grow + 1), np.uint8)
        self.region = region

    def segment(self, batch):
        logits = super().segment(batch)
        for n in range(logits.shape[0]):
            if self.region == "cell":
                logits[n, 0] = cv2.erode(logits[n, 0], self.kernel)  # the background recedes
            else:
                logits[n, 2] = cv2.dilate(logits[n, 2], self.kernel)
        return logits


def _radii(img, session, refine):
    """(nucleus, cell) radii in pixels of the one cell analysed, from their areas."""
    (cell,) = analyze(img, session, BUNDLE, AnalysisParams(outline_refine=refine, outline_eps=1e-3)).cells
    return math.sqrt(cell.nucleus_area_px / math.pi), math.sqrt(cell.area_px / math.pi)


def test_analysis_pulls_a_generous_outline_back_to_the_cell_and_leaves_a_true_one():
    """A disc of radius 60 px (WBC diameter 120, so the filter's radius is 7 px)."""
    img = field(400, 500, [(250, 200, 60)])
    assert _radii(img, GenerousSession(2), 0)[1] > 62.5          # about 3 px into the glass
    assert abs(_radii(img, GenerousSession(2), 0.06)[1] - 60) < 0.5
    assert abs(_radii(img, GenerousSession(0), 0.06)[1] - _radii(img, GenerousSession(0), 0)[1]) < 0.2


def test_a_grey_guide_still_moves_the_edge():
    """A monochrome camera's image has R = G = B, so the guide's colour covariance is singular
    but for the regularisation: the filter must still give finite values and follow the edge."""
    w, edge = 80, 40
    guide = np.empty((10, w, 3), np.float32)
    guide[:, :edge], guide[:, edge:] = 0.5, 0.9
    x = np.arange(w, dtype=np.float32) + 0.5
    src = np.tile(1.0 / (1.0 + np.exp((x - (edge + 3)) / 3.0)), (10, 1)).astype(np.float32)
    out = guided_filter(guide, src, 6, 1e-3)
    assert np.isfinite(out).all()
    assert int(np.argmax(out[5] < 0.5)) == edge


def test_analysis_pulls_a_generous_nucleus_back_to_its_edge():
    """The drawn nucleus has radius 30 px inside a cell of radius 60; the whole outline stays."""
    img = field(400, 500, [(250, 200, 60)])

    nuc_off, cell_off = _radii(img, GenerousSession(1, "nucleus"), 0)
    nuc_on, cell_on = _radii(img, GenerousSession(1, "nucleus"), 0.06)
    assert nuc_off > 31 and abs(nuc_on - 30) < 0.5
    assert abs(cell_on - cell_off) < 0.2
    true_off, true_on = (_radii(img, GenerousSession(0, "nucleus"), r)[0] for r in (0, 0.06))
    assert abs(true_on - true_off) < 0.2


def test_filtering_maps_together_equals_filtering_each():
    rng = np.random.default_rng(1)
    guide = rng.random((30, 40, 3)).astype(np.float32)
    maps = rng.random((30, 40, 2)).astype(np.float32)
    both = guided_filter(guide, maps, 4, 1e-2)
    assert both.shape == maps.shape
    for j in range(2):
        assert np.allclose(both[..., j], guided_filter(guide, maps[..., j], 4, 1e-2), atol=1e-6)
