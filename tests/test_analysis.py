"""The per-image analysis: scale estimation, neck splitting, filtering, full-resolution maps.

A colour-rule session stands in for the networks: dark pixels are nucleus, mid-dark pixels are
cytoplasm. Images are drawn with OpenCV so that the expected cells are known exactly.
"""

import math

import cv2
import numpy as np
import pytest

from wbc_batch.analysis import (GREY_STAIN_COLOUR, MIN_COVER, _open_by_disc, analyze, body_box,
                                drop_faint_cells, field_cover, field_stain, find_cells, is_grey,
                                median_diameter, nucleus_contrast, split_cells, stain_colour)
from wbc_batch.bundle import ModelBundle
from wbc_batch.config import AnalysisParams

BUNDLE = ModelBundle(root=None, meta={
    "segmenter": {"diameter": 112},
    "classifier": {"crop_size": 32, "crop_margin": 1.3, "temperature": 1.0},
})


class RuleSession:
    """Segments by darkness of the normalised input; classifies by crop darkness."""

    device, fallback_note = "cpu", ""

    def __init__(self):
        self.segment_shapes = []

    def segment(self, batch):
        self.segment_shapes.append(batch.shape)
        lum = batch.mean(axis=1)                      # (N, H, W), standardised
        lo, hi = lum.min(), lum.max()
        if hi - lo < 1.0:                             # a flat tile: background only
            return np.stack([np.ones_like(lum), np.zeros_like(lum), np.zeros_like(lum)], 1).astype(np.float32)
        t = (lum - lo) / (hi - lo)                    # 0 darkest .. 1 brightest
        bg = 8.0 * (t - 0.8)
        cyto = np.zeros_like(lum)
        nuc = -8.0 * (t - 0.3)
        return np.stack([bg, cyto, nuc], axis=1).astype(np.float32)

    def classify(self, batch):
        n = batch.shape[0]
        logits = np.zeros((n, 5), np.float32)
        logits[:, 1] = 3.0                           # always "lymphocyte", confidently
        return logits


def field(h, w, cells, bg=(235, 225, 230)):
    """cells: (cx, cy, r) discs with a darker nucleus of radius r/2."""
    img = np.zeros((h, w, 3), np.uint8) + np.array(bg, np.uint8)
    for cx, cy, r in cells:
        cv2.circle(img, (cx, cy), r, (150, 120, 170), -1)
        cv2.circle(img, (cx, cy), r // 2, (60, 30, 90), -1)
    return img


def test_single_cell_found_with_its_box_and_nucleus():
    img = field(400, 500, [(250, 200, 60)])
    res = analyze(img, RuleSession(), BUNDLE)
    assert len(res.cells) == 1
    c = res.cells[0]
    assert c.cls == "lymphocyte" and c.cell_id == 1
    assert abs(c.x - 190) <= 4 and abs(c.width - 121) <= 8
    assert abs(c.area_px - math.pi * 60 ** 2) / (math.pi * 60 ** 2) < 0.1
    assert abs(c.nucleus_area_px - math.pi * 30 ** 2) / (math.pi * 30 ** 2) < 0.2
    assert res.mask.shape == img.shape[:2]
    assert set(np.unique(res.mask)) <= {0, 128, 255}
    assert (res.cell_labels > 0).sum() == c.area_px
    assert abs(res.diameter_px - 120) < 15


def test_body_box_leaves_out_a_tail_and_a_touching_sliver():
    """A cell (disc of radius 40 at x=80, y=100) whose outline took in a thin tail to the right
    and, through a narrow neck, a blob below (a touching red cell's sliver)."""
    region = np.zeros((220, 200), np.uint8)
    cv2.circle(region, (80, 100), 40, 1, -1)
    cv2.rectangle(region, (115, 98), (195, 102), 1, -1)       # tail, 5 px thick
    cv2.rectangle(region, (78, 135), (82, 160), 1, -1)        # neck, 5 px wide
    cv2.circle(region, (80, 185), 25, 1, -1)                  # blob beyond the neck
    nucleus = np.zeros_like(region)
    cv2.circle(nucleus, (80, 100), 20, 1, -1)
    region, nucleus = region > 0, nucleus > 0
    x, y, w, h = body_box(region, nucleus, diameter=80, frac=0.2)
    assert abs(x - 40) <= 2 and abs(y - 60) <= 2 and abs(w - 81) <= 3 and abs(h - 81) <= 3
    whole = (40, 60, 156, 151)
    assert body_box(region, nucleus, diameter=80, frac=0) == whole
    assert body_box(region, np.zeros_like(nucleus), diameter=80, frac=0.2) == whole  # no nucleus kept
    assert body_box(np.zeros((5, 7), bool), np.zeros((5, 7), bool), diameter=80, frac=0.2) == (0, 0, 7, 5)


def test_body_box_of_a_very_large_cell_is_the_same_cell_scaled():
    """The cell above drawn 8 times as large (a 640 px cell: its disc, radius 128, is wider than
    MAX_OPEN_RADIUS and opened by distance transforms): the tail and the blob are still left
    out, and the opening is that of the elliptic kernel but for a pixel at its edge."""
    k = 8
    region = np.zeros((220 * k, 200 * k), np.uint8)
    cv2.circle(region, (80 * k, 100 * k), 40 * k, 1, -1)
    cv2.rectangle(region, (115 * k, 98 * k), (195 * k, 102 * k), 1, -1)
    cv2.rectangle(region, (78 * k, 135 * k), (82 * k, 160 * k), 1, -1)
    cv2.circle(region, (80 * k, 185 * k), 25 * k, 1, -1)
    nucleus = np.zeros_like(region)
    cv2.circle(nucleus, (80 * k, 100 * k), 20 * k, 1, -1)
    x, y, w, h = body_box(region > 0, nucleus > 0, diameter=80 * k, frac=0.2)
    assert abs(x - 40 * k) <= k and abs(y - 60 * k) <= k
    assert abs(w - 81 * k) <= 3 * k and abs(h - 81 * k) <= 3 * k
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * 128 + 1, 2 * 128 + 1))
    by_kernel = cv2.morphologyEx(region, cv2.MORPH_OPEN, kernel)
    by_distance = _open_by_disc(region, 128)
    assert (by_kernel != by_distance).sum() < 0.001 * by_kernel.sum()
    assert np.array_equal(_open_by_disc(region[::8, ::8], 16),
                          cv2.morphologyEx(region[::8, ::8], cv2.MORPH_OPEN, cv2.getStructuringElement(
                              cv2.MORPH_ELLIPSE, (33, 33))))  # up to MAX_OPEN_RADIUS: the kernel
    # a cell cut by the image's top border, a red cell beside it: the border does not wear it
    field = np.zeros((450, 900), np.uint8)
    cv2.circle(field, (300, 100), 300, 1, -1)
    cv2.circle(field, (700, 60), 160, 1, -1)
    by_kernel = cv2.morphologyEx(field, cv2.MORPH_OPEN, kernel)
    assert (by_kernel != _open_by_disc(field, 128)).sum() < 0.001 * by_kernel.sum()


def test_analyze_reports_the_body_box_and_keeps_outline_and_area():
    img = field(400, 500, [(250, 200, 60)])
    cv2.rectangle(img, (305, 193), (420, 207), (150, 120, 170), -1)   # a tail of cytoplasm, 15 px thick
    trimmed = analyze(img, RuleSession(), BUNDLE)
    whole = analyze(img, RuleSession(), BUNDLE, AnalysisParams(box_trim=0))
    (t,), (w,) = trimmed.cells, whole.cells
    assert w.x + w.width > 400 and abs(t.x + t.width - 311) <= 3 and abs(t.x - w.x) <= 1
    assert t.area_px == w.area_px and t.nucleus_area_px == w.nucleus_area_px and t.probs == w.probs
    assert (trimmed.cell_labels == whole.cell_labels).all() and (trimmed.mask == whole.mask).all()


def test_a_grey_image_reports_the_whole_outline_box():
    """The body trim lost matched boxes in grey images (model card, "No box trim in grey
    images"), so there the box is the whole outline's, as with box_trim=0; colour is trimmed."""
    img = field(400, 500, [(250, 200, 60)])
    cv2.rectangle(img, (305, 193), (420, 207), (150, 120, 170), -1)
    grey = np.repeat(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)[..., None], 3, axis=2)
    (g,) = analyze(grey, RuleSession(), BUNDLE).cells
    (w,) = analyze(grey, RuleSession(), BUNDLE, AnalysisParams(box_trim=0)).cells
    assert (g.x, g.y, g.width, g.height) == (w.x, w.y, w.width, w.height)
    assert w.x + w.width > 400
    (c,) = analyze(img, RuleSession(), BUNDLE).cells
    assert c.x + c.width < 320


def test_diameter_is_estimated_across_scales():
    small = analyze(field(300, 300, [(150, 150, 25)]), RuleSession(), BUNDLE)
    large = analyze(field(900, 900, [(450, 450, 150)]), RuleSession(), BUNDLE)
    assert abs(small.diameter_px - 50) < 8
    assert abs(large.diameter_px - 300) < 30
    assert len(small.cells) == len(large.cells) == 1


def test_a_large_field_is_estimated_from_a_pass_where_its_wbcs_are_resolved():
    # before: the passes stopped at a shorter side of 1024, where these WBCs (112 px in a
    # 3200x2400 field) are 48 px, under RESOLVED_FRAC of the canonical size; the estimate then
    # came from that pass, which on a 6400x4800 field of real cells measured them at 60 %
    from wbc_batch.analysis import RESOLVED_FRAC, estimate_diameter
    from wbc_batch.preprocess import channel_stats

    cells = [(200 + 400 * i, 200 + 400 * j, 56) for i in range(8) for j in range(6)]
    img = field(2400, 3200, cells)
    diameter, (scale, _) = estimate_diameter(img, RuleSession(), 112, channel_stats(img))
    assert diameter * scale >= RESOLVED_FRAC * 112
    assert abs(diameter - 112) < 10



def test_a_field_without_a_wbc_gets_no_pass_beyond_its_full_size(monkeypatch):
    # the passes for large fields must not enlarge a small field without a WBC 4 times over,
    # where red cells could pass for WBCs (the passes up to 1024 are as they were)
    from wbc_batch import analysis
    from wbc_batch.preprocess import channel_stats

    seen, real = [], analysis.segment_probs
    monkeypatch.setattr(analysis, "segment_probs",
                        lambda rgb, *args: seen.append(rgb.shape[:2]) or real(rgb, *args))
    img = np.full((480, 640, 3), 230, np.uint8)
    assert analysis.estimate_diameter(img, RuleSession(), 112, channel_stats(img)) == (None, None)
    assert seen == [(256, 341), (512, 683), (1024, 1365)]
    # nor an HD camera's field (shorter side under 2048): a first version enlarged it 1.9 times
    seen.clear()
    hd = np.full((1080, 1920, 3), 230, np.uint8)
    assert analysis.estimate_diameter(hd, RuleSession(), 112, channel_stats(hd)) == (None, None)
    assert seen == [(256, 455), (512, 910), (1024, 1820)]


@pytest.mark.parametrize("larger_passes_see", ["nothing", "specks"])
def test_a_large_pass_that_resolves_no_cells_keeps_the_estimate_of_the_1024_pass(
        monkeypatch, larger_passes_see):
    # a first version threw the 1024 pass's cells away when the larger passes found none, and
    # took the specks a larger pass resolved no better (a field without a WBC: its red cells'
    # fragments) for WBCs: a 6400x4800 field estimated at 31.5 px was enlarged 3.6 times
    from wbc_batch import analysis

    def blobs_at_1024(rgb, *args):
        probs = np.zeros((3, *rgb.shape[:2]), np.float32)
        probs[0] = 1.0
        if min(rgb.shape[:2]) == 1024:  # 30 px discs at this pass
            for x in range(100, 1300, 200):
                cv2.circle(probs[2], (x, 500), 15, 2.0, -1)
        elif min(rgb.shape[:2]) > 1024 and larger_passes_see == "specks":  # 16 px: unresolved
            for x in range(100, 2000, 100):
                cv2.circle(probs[2], (x, 700), 8, 2.0, -1)
        return probs

    monkeypatch.setattr(analysis, "segment_probs", blobs_at_1024)
    img = np.full((3000, 4000, 3), 230, np.uint8)
    diameter, (scale, _) = analysis.estimate_diameter(img, RuleSession(), 112, ((0,) * 3, (1,) * 3))
    assert scale == pytest.approx(1024 / 3000) and diameter == pytest.approx(31 * 3000 / 1024, rel=0.05)


def test_diameter_override_skips_the_estimate():
    session = RuleSession()
    res = analyze(field(400, 400, [(200, 200, 50)]), session, BUNDLE, AnalysisParams(diameter_px=100))
    assert len(session.segment_shapes) == 1
    assert res.scale == pytest.approx(112 / 100)


def test_analyze_keeps_each_cells_whole_outline_box_under_its_final_id():
    """`outlines` (what the overlay draws from) bounds each renumbered cell's pixels exactly,
    tail included, while the reported box is the trimmed body."""
    from wbc_batch.analysis import label_extents

    img = field(500, 600, [(420, 120, 55), (150, 130, 55), (300, 360, 55)])
    cv2.rectangle(img, (455, 113), (590, 127), (150, 120, 170), -1)   # cell 2's tail
    res = analyze(img, RuleSession(), BUNDLE)
    assert [c.cell_id for c in res.cells] == [1, 2, 3]
    ext = label_extents(res.cell_labels)
    assert res.outlines == {k: (x0, y0, x1 - x0 + 1, y1 - y0 + 1) for k, (y0, y1, x0, x1) in ext.items()}
    tailed = res.cells[1]
    x, _, w, _ = res.outlines[2]
    assert tailed.x < 420 < tailed.x + tailed.width < x + w - 50


def test_touching_cells_are_split_at_the_neck():
    img = field(400, 600, [(230, 200, 60), (340, 200, 60)])
    res = analyze(img, RuleSession(), BUNDLE)
    assert len(res.cells) == 2
    areas = sorted(c.area_px for c in res.cells)
    assert areas[0] / areas[1] > 0.8


def test_one_elongated_cell_is_not_split():
    fg = np.zeros((200, 300), np.uint8)
    cv2.ellipse(fg, (150, 100), (70, 45), 0, 0, 360, 1, -1)
    labels = split_cells(fg > 0, 112, AnalysisParams())
    assert labels.max() == 1


def test_small_fragments_and_border_cut_cells_are_dropped():
    fg = np.zeros((300, 300), np.uint8)
    cv2.circle(fg, (150, 150), 56, 1, -1)       # a whole cell
    cv2.circle(fg, (40, 250), 12, 1, -1)        # a fragment (< 15 % of the disc area)
    cv2.circle(fg, (0, 60), 56, 1, -1)          # half a cell cut by the border: 50 % visible
    cv2.circle(fg, (299, 60), 30, 1, -1)        # a sliver at the border
    labels = split_cells(fg > 0, 112, AnalysisParams(border_frac=0.55))
    assert labels.max() == 1
    keep = split_cells(fg > 0, 112, AnalysisParams(border_frac=0.3))
    assert keep.max() == 2


def test_a_small_cell_that_is_mostly_nucleus_is_kept_beside_larger_ones():
    # a review: fields with neutrophils and small lymphocytes (about 0.27 of the disc of the
    # working diameter, an area-weighted median that sits on the larger cells) lost every such
    # lymphocyte, all images "ok"; a platelet clump of that size has less nucleus
    fg = np.zeros((300, 500), np.uint8)
    nucleus = np.zeros_like(fg)
    cv2.circle(fg, (80, 150), 56, 1, -1)          # a neutrophil: the working diameter, 112
    cv2.circle(nucleus, (80, 150), 30, 1, -1)
    cv2.circle(fg, (230, 150), 29, 1, -1)         # a small lymphocyte: 0.27 of the disc, ...
    cv2.circle(nucleus, (230, 150), 25, 1, -1)    # ... 74 % nucleus
    cv2.circle(fg, (330, 150), 29, 1, -1)         # a platelet clump as large: 30 % "nucleus"
    cv2.circle(nucleus, (330, 150), 16, 1, -1)
    cv2.circle(fg, (430, 150), 18, 1, -1)         # a speck, all nucleus: 0.1 of the disc
    cv2.circle(nucleus, (430, 150), 18, 1, -1)
    labels = split_cells(fg > 0, 112, AnalysisParams(), nucleus=nucleus > 0)
    assert [bool(labels[150, x]) for x in (80, 230, 330, 430)] == [True, True, False, False]
    # without the rule (or without a nucleus mask) the lymphocyte goes too, as before
    assert split_cells(fg > 0, 112, AnalysisParams(small_cell_frac=0.3),
                       nucleus=nucleus > 0).max() == 1
    assert split_cells(fg > 0, 112, AnalysisParams()).max() == 1


def test_no_cells_in_an_empty_field():
    res = analyze(field(240, 320, []), RuleSession(), BUNDLE)
    assert res.cells == [] and res.diameter_px == 0 and not res.mask.any()


def _glass(level=225, sd=5.0, seed=0, shape=(240, 320)):
    rng = np.random.default_rng(seed)
    return np.clip(rng.normal(level, sd, (*shape, 3)), 0, 255).astype(np.uint8)


def test_the_field_cover_leaves_out_camera_noise_and_keeps_cells_and_red_cells():
    glass = _glass(sd=5.0)
    assert field_cover(glass) == 0.0                  # this noise, smoothed, is never 7 % darker
    assert field_cover(_glass(sd=9.0)) < MIN_COVER    # stronger noise, a little: under the bar
    glass[100, 100] = glass[30, 200] = 0              # dead pixels: next to nothing
    assert 0 < field_cover(glass) < 0.001
    assert field_cover(np.full((50, 60, 3), 128, np.uint8)) == 0.0
    assert field_cover(np.zeros((50, 60, 3), np.uint8)) == 0.0   # black covers nothing either
    one = field(240, 320, [(160, 120, 40)])           # a WBC of 80 px: 6.5 % of the field
    assert field_cover(one) == pytest.approx(np.pi * 40 ** 2 / (240 * 320), rel=0.05)
    dim = (one * 0.25).astype(np.uint8)               # exposed a quarter as long: the same share
    assert field_cover(dim) == pytest.approx(field_cover(one), rel=0.05)
    big = field(900, 1440, [(700, 450, 30)])          # a 60 px WBC alone on 1440 x 900 of glass
    assert field_cover(big) < MIN_COVER
    huge = field(3000, 4000, [(x, y, 150) for x in (800, 2000, 3200) for y in (700, 2200)])
    whole = field_cover(huge, max_pixels=huge.shape[0] * huge.shape[1])
    assert field_cover(huge) == pytest.approx(whole, rel=0.05)      # read every 3rd pixel
    assert whole == pytest.approx(6 * np.pi * 150 ** 2 / (3000 * 4000), rel=0.05)


class _NoSegmenter(RuleSession):
    def segment(self, batch):
        raise AssertionError("the segmenter was asked about a field of glass")


def _specks(rgb, n=6, seed=1):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        at = (int(rng.integers(10, rgb.shape[1] - 10)), int(rng.integers(10, rgb.shape[0] - 10)))
        cv2.circle(rgb, at, 3, (60, 60, 60), -1)
    return rgb


@pytest.mark.parametrize("params", [AnalysisParams(), AnalysisParams(diameter_px=80)])
@pytest.mark.parametrize("image", ["noisy glass", "plain grey", "black", "dim glass", "dust",
                                   "framed glass"])
def test_a_field_of_glass_holds_no_wbc_and_no_wbc_size(params, image):
    """Standardised, camera noise and dust are stretched to a smear's contrast, and the
    segmenter took them for WBCs (a glass field was refused as "WBCs too small", specks of dust
    were reported as WBCs) or a plain image for one WBC the size of the image. Such a field is
    not shown to the segmenter at all."""
    rgb = {"noisy glass": _glass(sd=9.0), "plain grey": np.full((240, 320, 3), 128, np.uint8),
           "black": np.zeros((240, 320, 3), np.uint8), "dim glass": _glass(level=90, sd=3.0),
           "dust": _specks(_glass(sd=5.0)),
           "framed glass": cv2.copyMakeBorder(_glass(sd=5.0), 40, 40, 60, 60, cv2.BORDER_CONSTANT)
           }[image]
    res = analyze(rgb, _NoSegmenter(), BUNDLE, params)
    assert res.cells == [] and res.diameter_px == 0 and not res.mask.any()
    assert res.bare_glass and res.to_result("g.png", 0.1).bare_glass   # said so (run.json)


def test_a_dim_smear_is_analysed():
    """A smear exposed a quarter as long covers as much of its glass: its cells are found."""
    dim = (field(240, 320, [(160, 120, 40)]) * 0.25).astype(np.uint8)
    found = analyze(dim, RuleSession(), BUNDLE, AnalysisParams(diameter_px=80))
    assert len(found.cells) == 1 and not found.bare_glass


def test_a_cell_whose_nucleus_is_not_stained_is_dropped():
    """The rule session, like the real segmenter on a standardised empty field, takes a smudge
    for a cell: a patch of the glass 10 and 20 % darker in every channel, as lamp falloff makes.
    Darker, but not stained, so it is dropped, from the cells and from the maps."""
    glass = np.array([235, 225, 230], np.float32)
    img = field(240, 320, [], bg=tuple(int(v) for v in glass))
    cv2.circle(img, (160, 120), 40, tuple(int(v) for v in glass * 0.9), -1)
    cv2.circle(img, (160, 120), 20, tuple(int(v) for v in glass * 0.8), -1)
    found = analyze(img, RuleSession(), BUNDLE,
                    AnalysisParams(diameter_px=80, min_nucleus_contrast=0, min_grey_nucleus_contrast=0))
    assert len(found.cells) == 1
    res = analyze(img, RuleSession(), BUNDLE, AnalysisParams(diameter_px=80))
    assert res.cells == [] and not res.cell_labels.any() and not res.mask.any()
    stained = analyze(field(240, 320, [(160, 120, 40)]), RuleSession(), BUNDLE, AnalysisParams(diameter_px=80))
    assert len(stained.cells) == 1


def test_a_grey_image_keeps_its_cells_by_darkness_alone(monkeypatch):
    """A monochrome camera's cells have no stain colour; their nuclei are darker than the glass."""
    from wbc_batch import analysis
    grey = cv2.cvtColor(cv2.cvtColor(field(240, 320, [(160, 120, 40)]), cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
    assert len(analyze(grey, RuleSession(), BUNDLE, AnalysisParams(diameter_px=80)).cells) == 1
    blank = np.full((240, 320, 3), 200, np.uint8)
    cv2.circle(blank, (160, 120), 40, (196, 196, 196), -1)
    cv2.circle(blank, (160, 120), 20, (190, 190, 190), -1)     # 5 % darker: lamp falloff, dropped
    assert field_cover(blank) < analysis.MIN_COVER  # glass with next to nothing on it
    assert analyze(blank, RuleSession(), BUNDLE, AnalysisParams(diameter_px=80)).cells == []
    monkeypatch.setattr(analysis, "MIN_COVER", 0.0)  # without that rule, the contrast bar drops it
    assert analyze(blank, RuleSession(), BUNDLE, AnalysisParams(diameter_px=80)).cells == []
    assert len(analyze(blank, RuleSession(), BUNDLE,
                       AnalysisParams(diameter_px=80, min_grey_nucleus_contrast=0)).cells) == 1
    # a nucleus 22 % darker than the glass, as a red cell with a platelet on it in a grey BCCD
    # field: under the grey bar (0.26), though over the colour images' 0.1
    pale = np.full((240, 320, 3), 200, np.uint8)
    cv2.circle(pale, (160, 120), 40, (175, 175, 175), -1)
    cv2.circle(pale, (160, 120), 20, (156, 156, 156), -1)
    assert AnalysisParams().min_grey_nucleus_contrast > 0.22 > AnalysisParams().min_nucleus_contrast
    assert analyze(pale, RuleSession(), BUNDLE, AnalysisParams(diameter_px=80)).cells == []
    kept = analyze(pale, RuleSession(), BUNDLE, AnalysisParams(diameter_px=80, min_grey_nucleus_contrast=0.1))
    assert len(kept.cells) == 1


def test_a_toned_monochrome_image_counts_as_grey_and_keeps_its_cells():
    """A monochrome camera whose output is toned (R, G, B in proportion, not equal) has no stain
    colour either; taken for colour, the nucleus stain rule had dropped every cell."""
    grey = cv2.cvtColor(cv2.cvtColor(field(240, 320, [(160, 120, 40)]), cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
    sepia = np.clip(np.rint(grey * np.array([1.0, 0.92, 0.8])), 0, 255).astype(np.uint8)
    ok, jpg = cv2.imencode(".jpg", sepia, [cv2.IMWRITE_JPEG_QUALITY, 90])
    sepia = cv2.imdecode(jpg, cv2.IMREAD_COLOR)
    assert not np.array_equal(sepia[..., 0], sepia[..., 2])
    assert stain_colour(sepia) < GREY_STAIN_COLOUR and is_grey(sepia)
    res = analyze(sepia, RuleSession(), BUNDLE, AnalysisParams(diameter_px=80))
    assert len(res.cells) == 1 and res.grey
    # a stained field, even washed out to a third of its saturation, still has colour
    stained = field(240, 320, [(160, 120, 40), (60, 60, 30)])
    hsv = cv2.cvtColor(stained, cv2.COLOR_RGB2HSV)
    hsv[..., 1] = (hsv[..., 1] * 0.3).astype(np.uint8)
    washed = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    assert stain_colour(washed) > GREY_STAIN_COLOUR and not is_grey(washed) and not is_grey(stained)
    assert stain_colour(np.full((50, 60, 3), 255, np.uint8)) == 0.0     # all clipped: no colour seen


def test_nucleus_contrast_is_the_stain_colour_against_the_glass_or_else_the_cytoplasm():
    img = field(200, 200, [(100, 100, 40)])       # glass (235, 225, 230), nucleus (60, 30, 90)
    labels = np.zeros((200, 200), np.uint16)
    cv2.circle(labels, (100, 100), 40, 1, -1)
    mask = np.where(labels > 0, 128, 0).astype(np.uint8)
    cv2.circle(mask, (100, 100), 20, 255, -1)
    box = (60, 60, 81, 81)
    # per channel 1 - nucleus / glass: the spread runs from blue (91/231 left) to green (31/226 left)
    assert nucleus_contrast(img, labels, mask, 1, box, 10) == pytest.approx(91 / 231 - 31 / 226, abs=1e-3)
    assert nucleus_contrast(img, labels, mask, 1, box, 10, colour=False) == pytest.approx(1 - 31 / 226, abs=1e-3)
    full = np.zeros_like(img) + np.array([150, 120, 170], np.uint8)   # a cell that fills the image
    cv2.circle(full, (100, 100), 20, (60, 30, 90), -1)
    whole = np.ones((200, 200), np.uint16)         # no ring: its cytoplasm (150, 120, 170) stands in
    assert nucleus_contrast(full, whole, mask, 1, (0, 0, 200, 200), 10) == pytest.approx(
        91 / 171 - 31 / 121, abs=1e-3)
    assert nucleus_contrast(np.full_like(img, 200), labels, mask, 1, box, 10) == 0.0
    assert nucleus_contrast(img, labels, np.where(labels > 0, 128, 0).astype(np.uint8), 1, box, 10) == 0.0


def _red_cell_field():
    """A 300x400 field of glass (235, 225, 230) and 48 red cells (205, 165, 180), with two
    candidates: cell 1, a red cell the segmenter took for a WBC, its middle as nucleus; cell 2,
    a WBC whose nucleus is stained (60, 30, 90)."""
    img = field(300, 400, [])
    for k in range(48):
        cv2.circle(img, (20 + 45 * (k % 8), 20 + 50 * (k // 8)), 15, (205, 165, 180), -1)
    labels = np.zeros((300, 400), np.uint16)
    mask = np.zeros((300, 400), np.uint8)
    for cid, (cx, cy) in ((1, (65, 70)), (2, (300, 200))):
        cv2.circle(labels, (cx, cy), 15 if cid == 1 else 40, cid, -1)
        cv2.circle(mask, (cx, cy), 15 if cid == 1 else 40, 128, -1)
        cv2.circle(mask, (cx, cy), 8 if cid == 1 else 20, 255, -1)
    cv2.circle(img, (300, 200), 40, (150, 120, 170), -1)
    cv2.circle(img, (300, 200), 20, (60, 30, 90), -1)
    boxes = {1: (50, 55, 31, 31), 2: (260, 160, 81, 81)}
    return img, labels, mask, boxes


def test_field_stain_is_the_red_cells_stain_around_the_cells():
    img, labels, _, _ = _red_cell_field()
    red = 1 - (np.array([205, 165, 180]) + 1) / (np.array([235, 225, 230]) + 1)
    assert field_stain(img, labels) == pytest.approx(red.max() - red.min(), abs=2e-3)
    assert field_stain(field(300, 400, []), labels) == 0.0            # glass alone
    assert field_stain(img, np.ones_like(labels)) == 0.0              # nothing outside the cells


def test_a_nucleus_stained_no_more_than_the_red_cells_is_dropped():
    """What the segmenter takes for a WBC among the red cells of a field without any WBC has the
    red cells' stain: it passes the glass bar (0.1), not `over_field` times the field's stain."""
    img, labels, mask, boxes = _red_cell_field()
    ring = 10
    assert nucleus_contrast(img, labels, mask, 1, boxes[1], ring) > 0.1
    kept = dict(boxes)
    drop_faint_cells(img, labels.copy(), mask.copy(), kept, 80, 0.1, over_field=0.0)
    assert set(kept) == {1, 2}
    drop_faint_cells(img, labels, mask, boxes, 80, 0.1, over_field=1.5)
    assert set(boxes) == {2} and not (labels == 1).any() and mask[70, 65] == 0
    grey = cv2.cvtColor(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
    img, labels, mask, boxes = _red_cell_field()
    drop_faint_cells(grey, labels, mask, boxes, 80, 0.1, min_grey_contrast=0.0, over_field=1.5)
    assert set(boxes) == {1, 2}                  # a grey image has no stain to compare


def test_large_images_are_tiled():
    img = field(1500, 2600, [(300, 300, 56), (2300, 1200, 56)])
    session = RuleSession()
    res = analyze(img, session, BUNDLE, AnalysisParams(diameter_px=112, max_side=512))
    assert len(res.cells) == 2
    assert all(max(s[2], s[3]) <= 512 for s in session.segment_shapes)


def test_review_threshold_flags_low_confidence():
    img = field(300, 300, [(150, 150, 50)])
    strict = analyze(img, RuleSession(), BUNDLE, AnalysisParams(review_threshold=0.99))
    lax = analyze(img, RuleSession(), BUNDLE, AnalysisParams(review_threshold=0.5))
    assert strict.cells[0].needs_review and not lax.cells[0].needs_review
    assert sum(strict.cells[0].probs) == pytest.approx(1, abs=1e-4)


def test_needs_review_agrees_with_the_confidence_the_reports_show():
    from wbc_batch.results import PROB_DECIMALS

    img = field(300, 300, [(150, 150, 50)])
    conf = analyze(img, RuleSession(), BUNDLE, AnalysisParams(review_threshold=0.5)).cells[0].confidence
    shown = round(conf, PROB_DECIMALS)
    assert shown != conf  # the test needs a confidence that rounding moves
    for threshold in (shown, (shown + conf) / 2, shown + 10 ** -PROB_DECIMALS):
        cell = analyze(img, RuleSession(), BUNDLE, AnalysisParams(review_threshold=threshold)).cells[0]
        assert cell.needs_review == (shown < threshold), threshold


def test_find_cells_gives_boxes_without_classifying():
    found = find_cells(field(300, 300, [(150, 150, 50)]), RuleSession(), BUNDLE)
    assert found.cells == [] and len(found.boxes) == 1


def test_cells_far_from_the_origin_keep_their_place_when_the_working_size_is_rounded():
    # 4005 px at scale 0.1 is 400.5 working px, rounded to 400: mapped back with the nominal
    # scale, the far cell came out 5 px up and to the left of where it is
    bundle = ModelBundle(root=None, meta={**BUNDLE.meta, "segmenter": {"diameter": 40}})
    img = field(3005, 4005, [(300, 300, 200), (3700, 2700, 200)])
    found = find_cells(img, RuleSession(), bundle, AnalysisParams(diameter_px=400, outline_refine=0))
    boxes = sorted(found.boxes.values())
    assert len(boxes) == 2
    for (x, y, w, h), (cx, cy) in zip(boxes, [(300, 300), (3700, 2700)]):
        assert abs(x - (cx - 200)) <= 1 and abs(y - (cy - 200)) <= 1
        assert abs(w - 401) <= 2 and abs(h - 401) <= 2


def test_cells_estimated_smaller_than_the_least_diameter_are_an_error_not_tiny_cells():
    # before: 32 "cells" of 7x7 px, though --diameter refuses anything under 8 px
    img = field(300, 400, [(50 + 40 * i, 60 + 50 * j, 3) for i in range(8) for j in range(4)])
    from wbc_batch.pipeline import analysis_failure
    from wbc_batch.results import ImageNotAnalysable

    with pytest.raises(ImageNotAnalysable, match=r"about 6.2 px across, fewer than the 8 px needed") as err:
        find_cells(img, RuleSession(), BUNDLE)
    # the image's error row gives the reason alone, not "analysis failed: ValueError: ..."
    assert analysis_failure(err.value, "torch").startswith("the WBCs found are about 6.2 px across")
    assert len(find_cells(img, RuleSession(), BUNDLE, AnalysisParams(diameter_px=8)).boxes) == 32


def test_median_diameter_ignores_specks_and_a_clump():
    fg = np.zeros((400, 400), np.uint8)
    for cx in (50, 150, 250):
        cv2.circle(fg, (cx, 60), 20, 1, -1)
    cv2.circle(fg, (200, 300), 20, 1, -1)       # two touching cells, one component
    cv2.circle(fg, (230, 300), 20, 1, -1)
    for x in range(10, 390, 12):                # many specks of noise
        cv2.circle(fg, (x, 380), 2, 1, -1)
    assert abs(median_diameter(fg) - 40) < 3


def _disc(shape, cx, cy, r):
    fg = np.zeros(shape, np.uint8)
    cv2.circle(fg, (cx, cy), r, 1, -1)
    return fg


@pytest.mark.parametrize("shown", [0.9, 0.7, 0.5, 0.35])
@pytest.mark.parametrize("side", ["left", "right", "top", "bottom"])
def test_a_cell_cut_by_the_border_is_measured_by_its_arc(side, shown):
    """A WBC cut by the image edge, alone in its field, sets the scale: with `border_arc` its
    size is the circle its outline away from the edge follows, not the visible part's area (a
    half cell reads as 0.71 of its size, enlarging the field 1.4 times)."""
    fg = _disc((300, 300), 150, 150, 50)
    cut = int(round(100 + (1 - shown) * 100))      # the disc spans 100..200
    part = {"left": fg[:, cut:], "right": fg[:, :300 - cut], "top": fg[cut:], "bottom": fg[:300 - cut]}[side]
    assert median_diameter(part, border_arc=True) == pytest.approx(100, rel=0.03)
    assert median_diameter(fg, border_arc=True) == pytest.approx(100, rel=0.01)  # a whole cell as before
    # off (the default): the visible part's area, a half cell at 0.71 of its size
    eq = math.sqrt(4 * part.sum() / math.pi)
    assert median_diameter(part) == median_diameter(part, border_arc=False) == pytest.approx(eq)


def test_a_sliver_at_the_border_reads_no_larger_than_a_cell_showing_30_percent():
    """A short arc is fitted loosely, and a cell showing less than 30 % of its disc is dropped
    by `split_cells` anyway: the fit is bounded by the visible area over 0.3, and a fit past
    twice that bound is no fit (the area's diameter, as before)."""
    disc = _disc((300, 300), 150, 150, 50)
    part = disc[:, 180:]                                       # a fifth of the width shows
    eq = math.sqrt(4 * part.sum() / math.pi)
    assert median_diameter(part, border_arc=True) == pytest.approx(eq / math.sqrt(0.3), rel=1e-6)
    assert median_diameter(part, border_arc=True) < 75
    part = disc[:, 190:]                                       # a tenth
    eq = math.sqrt(4 * part.sum() / math.pi)
    assert median_diameter(part, border_arc=True) == pytest.approx(eq, rel=1e-6)


def test_the_circle_fit_holds_on_a_short_noisy_arc():
    """Taubin's fit: the plain algebraic fit comes out small on a short noisy arc (a review
    measured real border-cut outlines at 0.8 of their size); points on a line fit no circle."""
    from wbc_batch.analysis import fit_circle

    t = np.linspace(0.0, 0.8, 30)                     # 46 degrees of a circle of radius 50
    rng = np.random.default_rng(0)
    x, y = 50 * np.cos(t) + rng.normal(0, 1.5, t.size), 50 * np.sin(t) + rng.normal(0, 1.5, t.size)
    cx, cy, r = fit_circle(x + 7, y - 3)
    assert r == pytest.approx(50, abs=5)              # the plain algebraic fit: 29.8
    assert (cx, cy) == pytest.approx((7, -3), abs=5)
    assert fit_circle(np.arange(10.0), 2 * np.arange(10.0) + 1) is None
    assert fit_circle(np.ones(5), np.ones(5)) is None


@pytest.mark.parametrize("apart", [40, 50, 55, 90])
def test_two_cut_cells_in_one_outline_read_no_larger_than_the_bound(apart):
    """Two touching cells cut by the same edge follow the arc of a larger circle: a known
    limit, bounded by the visible area over 0.3 (found by a review: up to twice the size)."""
    fg = np.zeros((300, 400), np.uint8)
    cv2.circle(fg, (150, 0), 50, 1, -1)
    cv2.circle(fg, (150 + apart, 0), 50, 1, -1)
    eq = math.sqrt(4 * fg.sum() / math.pi)
    assert eq <= median_diameter(fg, border_arc=True) <= eq / math.sqrt(0.3) + 1e-6


def test_a_border_cut_outline_weighs_by_what_shows():
    """Three whole cells of 40 px and a large one cut by the border: the whole cells set the
    scale, as they did, while a cut cell of their size no longer pulls it down."""
    fg = np.zeros((300, 400), np.uint8)
    for cx in (100, 200, 300):
        cv2.circle(fg, (cx, 150), 20, 1, -1)
    cv2.circle(fg, (0, 40), 20, 1, -1)               # half of a 40 px cell at the left edge
    assert median_diameter(fg, border_arc=True) == pytest.approx(40, rel=0.03)
    only = np.zeros_like(fg)
    cv2.circle(only, (0, 40), 20, 1, -1)
    assert median_diameter(only, border_arc=True) == pytest.approx(40, rel=0.05)


def test_a_border_cut_outline_without_an_arc_keeps_its_area_diameter():
    """A bar along the edge (no arc of 12 outline pixels away from it) and a cell filling the
    image (no outline away from the edges) are measured by their area, as before."""
    bar = np.zeros((200, 200), np.uint8)
    bar[:3, 20:25] = 1
    bar[:2, 60:180] = 1
    eq = math.sqrt(4 * 240 / math.pi)
    assert median_diameter(bar, border_arc=True) == pytest.approx(eq, rel=1e-6)
    full = np.ones((50, 50), np.uint8)
    assert median_diameter(full, border_arc=True) == pytest.approx(math.sqrt(4 * 2500 / math.pi))


def test_a_field_cut_through_its_wbc_keeps_its_scale():
    """With `border_arc`, the analysis of a field cropped through its only WBC finds it at the
    whole field's scale, so that the part that shows is judged against the cell's own disc."""
    img = field(300, 400, [(200, 150, 50)])
    arc = AnalysisParams(border_arc=True)
    whole = find_cells(img, RuleSession(), BUNDLE, arc)
    assert whole.diameter_px == pytest.approx(100, rel=0.05)
    half = find_cells(np.ascontiguousarray(img[:, 200:]), RuleSession(), BUNDLE, arc)
    assert half.diameter_px == pytest.approx(whole.diameter_px, rel=0.05)
    assert len(half.boxes) == 1
    default = find_cells(np.ascontiguousarray(img[:, 200:]), RuleSession(), BUNDLE)
    assert default.diameter_px == pytest.approx(0.71 * whole.diameter_px, rel=0.05)  # as before
    sliver = find_cells(np.ascontiguousarray(img[:, 235:]), RuleSession(), BUNDLE, arc)
    assert sliver.boxes == {}                        # 10 % of the disc shows: dropped on purpose


# --- test-time augmentation of the classifier ----------------------------------------------------

def test_crop_views_are_the_flips_and_turns_of_the_square():
    from wbc_batch.analysis import crop_views

    x = np.random.default_rng(0).standard_normal((2, 3, 5, 5)).astype(np.float32)
    turns = [np.rot90(x, k, axes=(2, 3)) for k in range(4)]
    square = {np.ascontiguousarray(v).tobytes() for t in turns for v in (t, t[:, :, :, ::-1])}
    eight = crop_views(x, 8)
    assert len({v.tobytes() for v in eight}) == 8 and {v.tobytes() for v in eight} == square
    four = crop_views(x, 4)
    assert [v.tobytes() for v in four] == [v.tobytes() for v in eight[:4]]
    assert np.array_equal(four[3], np.rot90(x, 2, axes=(2, 3)))  # the half turn
    assert len(crop_views(x, 1)) == 1 and np.array_equal(crop_views(x, 1)[0], x)
    with pytest.raises(ValueError, match="tta_views"):
        crop_views(x, 3)


class LeftRightSession:
    """Logits that see orientation: class 0 follows the left half's mean, class 1 the top half's."""

    device, fallback_note = "cpu", ""

    def __init__(self):
        self.batches = []

    def classify(self, batch):
        self.batches.append(len(batch))
        s = batch.shape[-1] // 2
        out = np.zeros((len(batch), 5), np.float32)
        out[:, 0] = batch[:, :, :, :s].mean(axis=(1, 2, 3))
        out[:, 1] = batch[:, :, :s, :].mean(axis=(1, 2, 3))
        return out


def test_classify_logits_averages_the_views_in_batches():
    from wbc_batch.analysis import CLASSIFY_BATCH, classify_logits, crop_views

    x = np.random.default_rng(1).standard_normal((20, 3, 8, 8)).astype(np.float32)
    session = LeftRightSession()
    plain = classify_logits(x, session, 1)
    assert session.batches == [20] and np.allclose(plain, LeftRightSession().classify(x))
    session.batches.clear()
    avg = classify_logits(x, session, 8)
    expected = np.mean([LeftRightSession().classify(v) for v in crop_views(x, 8)], axis=0)
    assert np.allclose(avg, expected, atol=1e-6) and not np.allclose(avg, plain)
    assert sum(session.batches) == 160 and max(session.batches) <= CLASSIFY_BATCH


def test_tta_views_reach_the_classifier_through_analyze():
    session = RuleSession()
    calls = []
    session.classify = lambda batch: (calls.append(len(batch)), RuleSession.classify(session, batch))[1]
    img = field(300, 300, [(150, 150, 45)])
    plain = analyze(img, session, BUNDLE, AnalysisParams(diameter_px=90))
    n_plain = sum(calls)
    calls.clear()
    tta = analyze(img, session, BUNDLE, AnalysisParams(diameter_px=90, tta_views=4))
    assert n_plain == len(plain.cells) == 1 and sum(calls) == 4
    assert [c.cls for c in tta.cells] == ["lymphocyte"]


def test_the_field_leaves_out_wbc_pixels_that_are_no_cell():
    """A neighbour's nucleus cut by a tight crop's border is dropped as a cell, but it is no red
    cell: counted as field, it made a real WBC's nucleus look no more stained than its field."""
    img, labels, mask, boxes = _red_cell_field()
    img[:, 350:] = (60, 30, 90)                                   # a neighbour's nucleus, cut
    wbc = (labels > 0).astype(np.uint8)
    wbc[:, 350:] = 1
    assert field_stain(img, labels) > 1.5 * field_stain(img, wbc)
    kept = dict(boxes)
    drop_faint_cells(img, labels.copy(), mask.copy(), kept, 80, 0.1, over_field=1.5)
    assert 2 not in kept                                          # measured against the neighbour
    drop_faint_cells(img, labels, mask, boxes, 80, 0.1, over_field=1.5, not_field=wbc)
    assert set(boxes) == {2}


def test_the_over_field_bar_reaches_the_rule_with_what_is_no_field(monkeypatch):
    # the option was only checked to land in the config: an analysis passing 0 went unseen
    import wbc_batch.analysis as analysis

    seen = []
    real = analysis.drop_faint_cells
    monkeypatch.setattr(analysis, "drop_faint_cells",
                        lambda *a, **k: seen.append(k) or real(*a, **k))
    img = field(240, 320, [(160, 120, 40)])
    img[:, :24] = img[:, -24:] = 0                   # black bars: a frame, painted as glass
    found = find_cells(img, RuleSession(), BUNDLE,
                       AnalysisParams(diameter_px=80, min_nucleus_over_field=1.5))
    assert seen[-1]["over_field"] == 1.5 and len(found.boxes) == 1
    assert found.not_field.shape == img.shape[:2]
    assert found.not_field[:, :24].all() and found.not_field[:, -24:].all()   # the frame
    assert found.not_field[120, 160] and not found.not_field[10, 40]          # a cell; glass


@pytest.mark.parametrize("red_cells, expected", [(None, 50.0), (55.0, 50.0), (100.0, 182.0)])
def test_the_red_cell_bar_replaces_an_estimate_under_0_8_red_cells(monkeypatch, red_cells,
                                                                    expected):
    """A WBC of 50 px beside red cells of 55 px (0.91 of them) keeps its estimate; beside red
    cells of 100 px, under 0.8 of them, it is taken for what red cells hold, and the field is
    analysed at 1.82 red cells' size. Off, and with a given diameter, no sizer is run."""
    from wbc_batch import analysis

    asked = []

    def sized(rgb, sizer):
        asked.append(rgb.shape)
        return red_cells

    monkeypatch.setattr(analysis, "red_cell_size", sized)
    rgb = field(300, 300, [(150, 150, 25)])
    res = analyze(rgb, RuleSession(), BUNDLE, AnalysisParams(red_cell_bar=True))
    assert res.diameter_px == pytest.approx(expected, abs=8 if expected == 50 else 0.01)
    assert asked == [rgb.shape]
    analyze(rgb, RuleSession(), BUNDLE)
    analyze(rgb, RuleSession(), BUNDLE, AnalysisParams(red_cell_bar=True, diameter_px=60))
    assert len(asked) == 1
