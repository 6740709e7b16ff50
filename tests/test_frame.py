"""What surrounds a field of view (`wbc_batch.frame`: an unlit frame, flat margins) and what it does
to the analysis."""

import cv2
import numpy as np
from test_analysis import BUNDLE, RuleSession, field

from wbc_batch.analysis import analyze
import wbc_batch.analysis as analysis
from wbc_batch.config import AnalysisParams
from wbc_batch.frame import fill_frame, flat_margins, light_surround, unlit_frame

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


def white_stop(rgb: np.ndarray, radius: float, edge: float = 4.0) -> np.ndarray:
    """White outside a circle around the centre: a transparent stop flattened by a viewer."""
    h, w = rgb.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w]
    gain = np.clip((radius - np.hypot(yy - (h - 1) / 2, xx - (w - 1) / 2)) / edge, 0.0, 1.0)[..., None]
    return np.rint(rgb * gain + 255 * (1 - gain)).astype(np.uint8)


def test_a_field_stop_saved_white_is_found_and_its_cells_as_without_it_when_asked():
    # the white corners are taken for glass far brighter than the field's: cells are lost or
    # merged, each image "ok"; --fill-white-stop paints them, as the black frame is
    img = field(400, 500, CELLS)
    stopped = white_stop(img, 240)
    jpeg = cv2.imdecode(cv2.imencode(".jpg", stopped, [cv2.IMWRITE_JPEG_QUALITY, 90])[1], cv2.IMREAD_COLOR)
    for shown in (stopped, jpeg):
        light = light_surround(shown)
        assert light is not None and light[0, 0] and light[-1, -1] and not light[200, 250]
        assert flat_margins(shown) is None and unlit_frame(shown) is None
    plain = analyze(img, RuleSession(), BUNDLE)
    res = analyze(stopped, RuleSession(), BUNDLE, AnalysisParams(fill_white_stop=True))
    assert len(plain.cells) == len(res.cells) == 3 and not res.margins_left
    for a, b in zip(plain.cells, res.cells):
        assert abs(a.x - b.x) <= 2 and abs(a.area_px - b.area_px) <= 0.05 * a.area_px
    # off by default: the image is analysed as it is
    assert (analysis.find_cells(stopped, RuleSession(), BUNDLE).rgb[0, 0] == 255).all()
    filled = analysis.find_cells(stopped, RuleSession(), BUNDLE, AnalysisParams(fill_white_stop=True))
    assert (filled.rgb[0, 0] < 255).any()


def test_a_white_stop_beside_a_banner_is_painted_only_with_both_options():
    # a review: with --fill-margins the banner was painted and the white corners left white
    img = field(400, 500, CELLS)
    marked = banner(white_stop(img, 240), 40)
    both = AnalysisParams(fill_margins=True, fill_white_stop=True)
    mask, left_in = analysis._surround(marked, both.fill_margins, both.fill_white_stop)
    assert not left_in and mask[0, 0] and mask[-1, 250] and not mask[200, 250]
    mask, left_in = analysis._surround(marked, False, True)  # the banner left in: nothing painted
    assert left_in and (mask is None or not mask[0, 0])


def test_blown_out_crops_and_smears_and_white_bands_are_no_white_surround():
    img = field(400, 500, [(250, 200, 60), (30, 200, 40)])
    assert light_surround(img) is None
    for over in (field(120, 120, [(60, 60, 40)], bg=(255, 255, 255)),  # a crop on white glass
                 field(420, 420, [(210, 210, 130)], bg=(255, 255, 255)),  # a large one
                 field(400, 500, CELLS, bg=(255, 255, 255))):  # cells of a blown-out smear
        assert light_surround(over) is None
    # one side blown out, the rest of the glass dimmer: nothing tells it from a stop, and with
    # the option it is painted in the glass colour (module docstring)
    hot = img.copy()
    hot[:, :80] = np.maximum(hot[:, :80], 250)
    assert light_surround(hot) is not None
    barred = img.copy()
    barred[:, :50] = 255  # a straight white band: a flat margin, which --fill-margins decides on
    assert flat_margins(barred) is not None
    found = analysis.find_cells(barred, RuleSession(), BUNDLE, AnalysisParams(fill_white_stop=True))
    assert (found.rgb[:, :50] == 255).all() and found.margins_left


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


def white_bars(rgb: np.ndarray, width: int, level: int = 255) -> np.ndarray:
    """Bars of one grey level down both sides (a field padded to a wider frame)."""
    out = rgb.copy()
    out[:, :width] = level
    out[:, -width:] = level
    return out


def banner(rgb: np.ndarray, depth: int, level: int = 240) -> np.ndarray:
    """An info banner across the bottom with black text and a scale bar."""
    out = rgb.copy()
    h, w = rgb.shape[:2]
    out[h - depth:] = level
    cv2.putText(out, "40x 2026-12-04", (10, h - depth // 4), cv2.FONT_HERSHEY_SIMPLEX,
                depth / 40, (0, 0, 0), 2, cv2.LINE_AA)
    cv2.rectangle(out, (w - 120, h - depth // 2 - 2), (w - 20, h - depth // 2 + 2), (0, 0, 0), -1)
    return out


def test_white_side_bars_and_a_banner_with_text_are_margins():
    img = field(400, 500, CELLS, bg=(205, 200, 210))
    barred = white_bars(img, 50)
    margins = flat_margins(barred)
    assert margins is not None and margins[:, :50].all() and margins[:, -50:].all()
    assert not margins[:, 53:-53].any()  # grown by 2 px only
    bannered = banner(img, 40)
    margins = flat_margins(bannered)
    assert margins is not None and margins[-40:].all() and not margins[:-43].any()  # text too
    filled = fill_frame(bannered, margins)
    assert (filled[-40:] == filled[-1, 0]).all() and abs(int(filled[-1, 0, 0]) - 205) <= 2


def test_a_field_on_a_wide_white_canvas_is_found_on_all_four_sides():
    # side bars of 30 % of the width and more kept the top and bottom strips from ending in an
    # edge; left unfound, they made the "glass" white and the side bars were dropped too
    img = field(400, 500, CELLS, bg=(205, 200, 210))
    canvas = np.full((480, 1280, 3), 255, np.uint8)
    canvas[40:440, 390:890] = img
    margins = flat_margins(canvas)
    assert margins is not None and margins[:40].all() and margins[440:].all()
    assert margins[:, :390].all() and margins[:, 890:].all() and not margins[43:437, 393:887].any()


def test_glass_coloured_edges_thin_lines_coloured_and_partial_bands_are_not_margins():
    img = field(400, 500, [(250, 200, 60), (30, 200, 40)], bg=(205, 200, 210))
    assert flat_margins(img) is None  # flat glass at the edges is the glass: nothing to fill
    lined = img.copy()
    lined[:2] = 255  # a line under 1 % of the image deep
    assert flat_margins(lined) is None
    pink = img.copy()
    pink[:40] = (240, 200, 220)  # a coloured band: stain, not a margin
    assert flat_margins(pink) is None
    box = img.copy()
    box[-40:, -150:] = 255  # a label box in one corner does not run the whole edge
    assert flat_margins(box) is None
    over = field(120, 120, [(60, 60, 40)], bg=(255, 255, 255))  # a crop with blown-out glass
    assert flat_margins(over) is None
    black = img.copy()
    black[:, :40] = 0  # a black bar is the unlit frame's, filled whatever the setting
    assert flat_margins(black) is None and unlit_frame(black) is not None


def test_cells_in_a_margined_field_are_found_as_without_the_margins_when_asked():
    img = field(400, 500, CELLS, bg=(205, 200, 210))
    plain = analyze(img, RuleSession(), BUNDLE)
    filling = AnalysisParams(fill_margins=True)
    for marked in (white_bars(img, 50), banner(img, 40)):
        res = analyze(marked, RuleSession(), BUNDLE, filling)
        assert len(plain.cells) == len(res.cells) == 3
        for a, b in zip(plain.cells, res.cells):
            assert abs(a.x - b.x) <= 2 and abs(a.area_px - b.area_px) <= 0.05 * a.area_px
    assert not analyze(img, RuleSession(), BUNDLE).margins_left  # no margin
    found = analysis.find_cells(white_bars(img, 50), RuleSession(), BUNDLE)
    assert (found.rgb[:, :50] == 255).all() and found.margins_left  # off by default: as it is
    assert analyze(banner(img, 40), RuleSession(), BUNDLE).margins_left
    assert not analyze(banner(img, 40), RuleSession(), BUNDLE, filling).margins_left


class SeeingSession(RuleSession):
    """RuleSession that keeps every batch the segmenter was shown."""

    def __init__(self):
        super().__init__()
        self.shown = []

    def segment(self, batch):
        self.shown.append(batch.copy())
        return super().segment(batch)


def test_padding_is_left_out_of_what_the_segmenter_sees():
    # the segmenter's GroupNorm layers and the standardisation took the filled padding as part
    # of the field: flat glass lowered their spread, and every cell came out larger (a TXL-PBC
    # field padded by 60 px: area x2.5, diameter estimate x1.6)
    from wbc_batch.frame import GROW_PX

    img = field(400, 500, CELLS)
    padded = cv2.copyMakeBorder(img, 60, 40, 30, 70, cv2.BORDER_CONSTANT, value=(0, 0, 0))
    plain_view, padded_view = SeeingSession(), SeeingSession()
    g = GROW_PX  # the frame is grown over the field's edge by this much
    plain = analyze(np.ascontiguousarray(img[g:-g, g:-g]), plain_view, BUNDLE)
    res = analyze(padded, padded_view, BUNDLE)
    assert len(plain_view.shown) == len(padded_view.shown) >= 1
    for a, b in zip(plain_view.shown, padded_view.shown):
        assert a.shape == b.shape and np.allclose(a, b, atol=1e-5)
    assert res.diameter_px == plain.diameter_px and len(res.cells) == len(plain.cells) == 3
    for a, b in zip(plain.cells, res.cells):
        assert (b.x - a.x, b.y - a.y) == (30 + g, 60 + g)
        assert (a.width, a.height, a.area_px) == (b.width, b.height, b.area_px)
    assert res.cell_labels.shape == res.mask.shape == padded.shape[:2]
    assert (res.cell_labels > 0).sum() == sum(c.area_px for c in res.cells)
    assert not res.cell_labels[:60].any() and not res.cell_labels[:, :30].any()


def test_a_field_stop_counts_in_no_statistics_of_the_standardisation():
    img = field(400, 500, CELLS)
    stopped = field_stop(img, 240)
    frame = unlit_frame(stopped)
    seen = SeeingSession()
    analyze(stopped, seen, BUNDLE, AnalysisParams(diameter_px=BUNDLE.diameter))  # at scale 1
    cols = np.flatnonzero(~frame.all(axis=0))  # the disc's width: the rest is not looked at
    frame = frame[:, cols[0]:cols[-1] + 1]
    view = seen.shown[0][0]  # (3, h, w), padded to multiples of 32 by reflection
    lit = view[:, :frame.shape[0], :frame.shape[1]][:, ~frame]
    assert np.allclose(lit.mean(axis=1), 0, atol=0.02)
    assert np.allclose(lit.std(axis=1), 1, atol=0.05)


def test_transparent_margins_are_a_frame_and_their_field_is_found_as_without_them(tmp_path):
    from wbc_batch.imageio import read_image

    img = field(400, 500, CELLS)
    bgra = np.zeros((520, 620, 4), np.uint8)
    bgra[60:460, 60:560, :3] = img[..., ::-1]
    bgra[60:460, 60:560, 3] = 255
    cv2.imwrite(str(tmp_path / "margins.png"), bgra)
    rgb = read_image(tmp_path / "margins.png")
    frame = unlit_frame(rgb)
    assert frame is not None and frame[:60].all() and not frame[62:458, 62:558].any()
    plain, res = analyze(img, RuleSession(), BUNDLE), analyze(rgb, RuleSession(), BUNDLE)
    assert len(plain.cells) == len(res.cells) == 3
    for a, b in zip(plain.cells, res.cells):
        assert abs(b.x - 60 - a.x) <= 2 and abs(a.area_px - b.area_px) <= 0.05 * a.area_px
