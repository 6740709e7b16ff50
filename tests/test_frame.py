"""The unlit frame around a field of view (`wbc_batch.frame`) and what it does to the analysis."""

import cv2
import numpy as np
from test_analysis import BUNDLE, RuleSession, field

from wbc_batch.analysis import analyze
from wbc_batch.frame import fill_frame, unlit_frame

CELLS = [(170, 150, 40), (330, 160, 40), (250, 300, 40)]


def field_stop(rgb: np.ndarray, radius: float, edge: float = 4.0) -> np.ndarray:
    """Black outside a circle around the centre, with a soft edge (an eyepiece camera)."""
    h, w = rgb.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w]
    dist = np.hypot(yy - (h - 1) / 2, xx - (w - 1) / 2)
    gain = np.clip((radius - dist) / edge, 0.0, 1.0)
    return np.rint(rgb * gain[..., None]).astype(np.uint8)


def test_a_round_field_stop_is_found_and_filled_with_the_glass():
    img = field(400, 500, CELLS)
    stopped = field_stop(img, 240)
    frame = unlit_frame(stopped)
    assert frame is not None and frame[0, 0] and frame[-1, -1] and not frame[200, 250]
    assert not frame[np.hypot(*np.mgrid[0:400, 0:500] - np.array([[[199.5]], [[249.5]]])) < 230].any()
    filled = fill_frame(stopped, frame)
    assert (filled[0, 0] == img[0, 0]).all()  # the glass colour
    assert (filled[200, 250] == img[200, 250]).all() and filled is not stopped


def test_cells_inside_a_field_stop_are_found_as_without_it():
    # black corners are darker than any nucleus: left in, they were the image's "nuclei"
    img = field(400, 500, CELLS)
    plain = analyze(img, RuleSession(), BUNDLE)
    stopped = analyze(field_stop(img, 240), RuleSession(), BUNDLE)
    assert len(plain.cells) == len(stopped.cells) == 3
    for a, b in zip(plain.cells, stopped.cells):
        assert abs(a.x - b.x) <= 2 and abs(a.area_px - b.area_px) <= 0.05 * a.area_px
    assert not stopped.cell_labels[:40, :40].any()


def test_padding_bars_are_a_frame_and_thin_lines_or_dark_cells_are_not():
    img = field(400, 500, [(250, 200, 60), (30, 200, 40)])  # one cell cut by the left border
    assert unlit_frame(img) is None
    lined = img.copy()
    lined[0] = 0  # a one-pixel black line left by resizing: under 1 % of the image
    assert unlit_frame(lined) is None
    barred = img.copy()
    barred[:30] = 3  # a letterbox bar
    frame = unlit_frame(barred)
    assert frame is not None and frame[:30].all() and not frame[40:].any()
    dark = img.copy()
    cv2.circle(dark, (250, 200), 30, (20, 10, 35), -1)  # a very dark nucleus, not at the border
    assert unlit_frame(dark) is None


def test_an_under_exposed_smear_keeps_its_nuclei_cut_by_the_border():
    # dim glass (~70) makes nuclei darker than 40; with cells cut by the left border they summed
    # to 1 % of the image and were painted over as a "frame"
    img = field(300, 400, [(0, 60, 50), (0, 200, 50), (200, 150, 40)])
    dim = np.clip(img * 0.3 + 0.5, 0, 255).astype(np.uint8)
    assert dim[200, 1].max() < 40 and (dim[:, 0].max(axis=1) < 40).sum() > 0.01 * 300 * 400 / 50
    assert unlit_frame(dim) is None
    assert unlit_frame(field_stop(dim, 200)) is not None  # a real stop is still found there
    black = np.zeros((100, 120, 3), np.uint8)
    assert unlit_frame(black) is None  # no lit field: nothing to fill


def test_a_grey_stop_in_a_dim_image_and_small_corners_are_frames_too():
    # a camera's raised black level (28) in an image at 0.6 of the usual brightness; the corners
    # left by a stop just inside the diagonal (each along ~4 % of the border, 1.4 % in all)
    img = field(480, 640, [(320, 240, 50)])
    dim = np.clip(img * 0.6, 0, 255).astype(np.uint8)
    yy, xx = np.mgrid[0:480, 0:640]
    outside = np.hypot(yy - 239.5, xx - 319.5) > 300
    grey_stop = dim.copy()
    grey_stop[outside] = 28 + np.random.default_rng(0).integers(-2, 3, (int(outside.sum()), 1))
    frame = unlit_frame(grey_stop)
    assert frame is not None and frame[outside].all()
    corners = img.copy()
    corners[np.hypot(yy - 239.5, xx - 319.5) > 368] = 0
    assert unlit_frame(corners) is not None


def test_fill_frame_leaves_an_unlit_image_as_it_is():
    black = np.zeros((100, 120, 3), np.uint8)
    assert fill_frame(black, np.ones((100, 120), bool)) is black
