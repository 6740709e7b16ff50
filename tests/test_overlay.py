"""Overlays drawn on synthetic smears whose truth stands in for an analysis."""

import dataclasses

import cv2
import numpy as np
import pytest

from wbc_batch import CLASSES
from wbc_batch.overlay import (CLASS_COLOURS, NUCLEUS_COLOUR, _place_label, _scale, draw_overlay,
                               label_text, legend)
from wbc_batch.results import CellResult, ImageAnalysis
from wbc_batch.sample import Smear, make_smear


def analysis_from(smear, review=()):
    """An ImageAnalysis that found exactly the smear's cells; ids in `review` need review."""
    cells = []
    for c in smear.cells:
        region = smear.labels == c.cell_id
        conf = 0.5 if c.cell_id in review else 0.97
        probs = tuple(conf if k == c.cls else (1 - conf) / 4 for k in CLASSES)
        cells.append(CellResult(c.cell_id, c.cls, conf, probs, c.x, c.y, c.width, c.height,
                                int(region.sum()), int((region & (smear.mask == 255)).sum()),
                                c.cell_id in review))
    return ImageAnalysis(cells=cells, cell_labels=smear.labels.copy(), mask=smear.mask.copy(),
                         diameter_px=80.0, scale=1.0)


def near(img, colour, tol=12):
    return np.all(np.abs(img.astype(int) - np.array(colour)) <= tol, axis=-1)


@pytest.fixture(scope="module")
def smear():
    return make_smear(640, 480, n_wbc=5, seed=3)


def test_same_size_new_array_input_untouched(smear):
    before = smear.rgb.copy()
    out = draw_overlay(smear.rgb, analysis_from(smear))
    assert out.shape == smear.rgb.shape and out.dtype == np.uint8
    assert out is not smear.rgb and np.array_equal(smear.rgb, before)
    assert not np.array_equal(out, smear.rgb)


def test_outlines_follow_each_cell_in_its_class_colour(smear):
    out = draw_overlay(smear.rgb, analysis_from(smear))
    for c in smear.cells:
        y0, y1 = max(0, c.y - 3), c.y + c.height + 3
        x0, x1 = max(0, c.x - 3), c.x + c.width + 3
        box = out[y0:y1, x0:x1]
        own = near(box, CLASS_COLOURS[c.cls])
        assert own.sum() > 2 * (c.width + c.height), c.cls  # a closed outline at least
        assert near(box, NUCLEUS_COLOUR).sum() > 20, c.cls
        # outlines, not fills: most of the cytoplasm away from the edges keeps its pixels
        cyto = (smear.labels == c.cell_id) & (smear.mask == 128)
        deep = cv2.erode(cyto.astype(np.uint8), np.ones((7, 7), np.uint8)) > 0
        same = np.all(out == smear.rgb, axis=-1)
        assert same[deep].mean() > 0.8, c.cls


def test_the_whole_outline_is_drawn_when_the_reported_box_is_trimmed(smear):
    """A cell's reported box may bound only its body (`--box-trim`); its outline is still drawn
    all round, from the label map, and the frame of a cell needing review encloses it."""
    import dataclasses

    full = analysis_from(smear, review=(1,))
    c = full.cells[0]
    trimmed = dataclasses.replace(c, width=c.width // 2)             # the left half only
    cut = ImageAnalysis(cells=[trimmed] + full.cells[1:], cell_labels=full.cell_labels,
                        mask=full.mask, diameter_px=80.0, scale=1.0)
    assert np.array_equal(draw_overlay(smear.rgb, cut), draw_overlay(smear.rgb, full))


def test_labels_are_drawn_near_each_cell(smear):
    plain = draw_overlay(smear.rgb, analysis_from(smear))
    for c in smear.cells:
        y0, y1 = max(0, c.y - 40), min(480, c.y + c.height + 40)
        x0, x1 = max(0, c.x - 10), min(640, c.x + c.width + 120)
        # the filled label box: many pixels of the class colour outside the cell itself
        outside = smear.labels[y0:y1, x0:x1] != c.cell_id
        assert (near(plain[y0:y1, x0:x1], CLASS_COLOURS[c.cls]) & outside).sum() > 150


def test_cells_needing_review_are_marked(smear):
    ids = [c.cell_id for c in smear.cells]
    flagged = ids[0]
    plain = draw_overlay(smear.rgb, analysis_from(smear))
    marked = draw_overlay(smear.rgb, analysis_from(smear, review={flagged}))
    diff = np.any(plain != marked, axis=-1)
    c = smear.cells[0]
    pad = 12
    around = np.zeros_like(diff)
    around[max(0, c.y - pad - 40):c.y + c.height + pad, max(0, c.x - pad):c.x + c.width + pad + 150] = True
    assert diff[around].sum() > 100
    # the dashed frame: white and black pixels on a ring just outside the box
    ring = marked[max(0, c.y - 6):c.y + c.height + 6, max(0, c.x - 6):c.x + c.width + 6]
    assert near(ring, (255, 255, 255), 5).sum() > 20 and near(ring, (0, 0, 0), 5).sum() > 20
    for other in smear.cells[1:]:  # other cells are drawn as before (labels may shift, not boxes)
        inner = diff[other.y:other.y + other.height, other.x:other.x + other.width]
        assert inner.sum() == 0


def test_label_text():
    c = CellResult(3, "neutrophil", 0.9712, (0.9712, 0.01, 0.01, 0.005, 0.0038), 0, 0, 5, 5, 20, 5, False)
    assert label_text(c) == "3 neutrophil 0.97"
    r = CellResult(4, "monocyte", 0.5, (0.2, 0.1, 0.5, 0.1, 0.1), 0, 0, 5, 5, 20, 5, True)
    assert label_text(r) == "4 monocyte 0.50?"
    # flagged for its stain, at any confidence: the overlay says so
    stained = dataclasses.replace(c, needs_review=True, unusual_stain=True)
    assert label_text(stained) == "3 neutrophil 0.97 stain?"
    assert label_text(stained, short=True) == "3 NEU 0.97 stain?"


def test_text_and_lines_scale_with_the_image():
    small, large = _scale(300, 300), _scale(3000, 4000)
    assert large[0] > small[0] and large[1] > 3 * small[1] and large[2] > small[2]
    assert _scale(1, 1)[1] > 0


def test_lines_and_text_stop_growing_at_the_size_of_the_cells():
    """A field many WBC diameters across is drawn as an ordinary field of such cells; ordinary
    fields (640x480 with 80-120 px WBCs) and single-cell crops are sized by the image alone."""
    assert _scale(3000, 4000, diameter=80) == _scale(480, 640)
    assert _scale(2880, 3840, diameter=174) == _scale(1044, 1044)
    for h, w, d in ((480, 640, 80), (480, 640, 120), (363, 360, 200), (768, 1024, 147.5)):
        assert _scale(h, w, diameter=d) == _scale(h, w), (h, w, d)
    assert _scale(3000, 4000, diameter=0) == _scale(3000, 4000)  # unknown: by the image


def tiled(smear, n):
    """`smear` repeated n x n times, as one field: each copy's cells get their own ids."""
    H, W = smear.labels.shape
    k = len(smear.cells)
    labels = np.zeros((n * H, n * W), np.uint16)
    cells = []
    for i in range(n):
        for j in range(n):
            off = (i * n + j) * k
            labels[i * H:(i + 1) * H, j * W:(j + 1) * W] = np.where(smear.labels > 0, smear.labels + off, 0)
            cells += [dataclasses.replace(c, cell_id=c.cell_id + off, x=c.x + j * W, y=c.y + i * H)
                      for c in smear.cells]
    return Smear(np.tile(smear.rgb, (n, n, 1)), np.tile(smear.mask, (n, n)), labels, cells)


def drawn_labels(monkeypatch, smear):
    """Draw `smear`'s overlay: -> (label box heights, outline widths, fraction of each cell's
    pixels under a label box)."""
    from wbc_batch import overlay

    rects, widths = [], []
    place, outline = overlay._place_label, overlay._outline
    monkeypatch.setattr(overlay, "_place_label", lambda *a: rects.append(place(*a)) or rects[-1])
    monkeypatch.setattr(overlay, "_outline", lambda *a: widths.append(a[-1]) or outline(*a))
    draw_overlay(smear.rgb, analysis_from(smear))
    under = np.zeros(smear.labels.shape, bool)
    for x0, y0, x1, y1 in rects:
        under[y0:y1, x0:x1] = True
    return ({y1 - y0 for _, y0, _, y1 in rects}, set(widths),
            np.array([under[smear.labels == c.cell_id].mean() for c in smear.cells]))


def test_a_large_field_of_ordinary_cells_is_drawn_like_an_ordinary_field(monkeypatch):
    """4x4 copies of a 640x480 field of 80 px WBCs, as one 2560x1920 field: its labels and lines
    are as large as on the single field, not 3.5 times larger, and hide no more of its cells
    (they used to hide more than a third of all cell pixels)."""
    one = make_smear(640, 480, n_wbc=5, diameter=80, seed=3)
    heights, widths, cover = drawn_labels(monkeypatch, one)
    big_heights, big_widths, big_cover = drawn_labels(monkeypatch, tiled(one, 4))
    assert len(heights) == 1 and max(big_heights) <= min(heights) + 1, (heights, big_heights)
    assert big_widths == widths
    assert big_cover.mean() <= cover.mean() + 0.01 and big_cover.max() <= cover.max() + 0.01


def test_labels_keep_off_the_cells_where_they_can():
    """A label goes above its cell unless that hides a cell: its own, when the cell touches the
    top of the image, or a neighbour just above; then below it. They used to take the first place
    free of other labels, whatever cell was under it."""
    size, base, shape = (150, 14), 6, (480, 640)          # a label box 154 x 24
    top = (100, 0, 80, 80)                                # a cell touching the top
    cells = [(100, 0, 180, 80)]
    assert _place_label(top, size, base, shape, [], cells) == (100, 81, 254, 105)
    cell, above = (100, 200, 80, 80), (100, 160, 260, 195)  # a neighbour's box just above it
    cells = [(100, 200, 180, 280), above]
    assert _place_label(cell, size, base, shape, [], cells) == (100, 281, 254, 305)
    # no place is free of cells: the one free of labels that hides least of them (above: 154 x
    # 20 px of the neighbour; below: 70 x 20 px of another; in the corners: 80 x 24 of its own)
    below = (90, 285, 170, 365)
    assert _place_label(cell, size, base, shape, [], cells + [below]) == (100, 281, 254, 305)
    # and where every place overlaps a label, still the one that hides least
    labels = [(0, 0, 640, 480)]
    assert _place_label(cell, size, base, shape, labels, cells + [below]) == (100, 281, 254, 305)


def test_no_cells_gives_an_unchanged_copy():
    rgb = np.full((50, 60, 3), 200, np.uint8)
    empty = ImageAnalysis(cells=[], cell_labels=np.zeros((50, 60), np.uint16),
                          mask=np.zeros((50, 60), np.uint8), diameter_px=0.0, scale=1.0)
    out = draw_overlay(rgb, empty)
    assert np.array_equal(out, rgb) and out is not rgb


def test_gray_input_and_tiny_images():
    smear = make_smear(120, 120, cells=[("lymphocyte", 70)], seed=1, rbc_density=0)
    gray = smear.rgb[:, :, 0]
    out = draw_overlay(gray, analysis_from(smear))
    assert out.shape == (120, 120, 3)
    one = make_smear(1, 1, seed=0)
    assert draw_overlay(one.rgb, analysis_from(one)).shape == (1, 1, 3)


def test_maps_of_the_wrong_size_are_refused(smear):
    a = analysis_from(smear)
    with pytest.raises(ValueError, match="do not match"):
        draw_overlay(smear.rgb[:100], a)


def test_a_large_field_scans_its_label_map_once(monkeypatch):
    """Speed without a timer (timed asserts are flaky on shared CI): the full-size label map is
    scanned once for all cells, and each cell is then drawn within its own box, so a field of
    2048x1536 with 12 cells costs one pass over the image, not one per cell. Its speed is
    measured by benchmarks/throughput.py (the rows with overlays)."""
    from wbc_batch import overlay

    smear = make_smear(2048, 1536, n_wbc=12, seed=5, rbc_density=0.1)
    scans, real = [], overlay.label_extents
    monkeypatch.setattr(overlay, "label_extents", lambda labels: scans.append(labels.shape) or real(labels))
    out = draw_overlay(smear.rgb, analysis_from(smear, review={1, 2}))
    assert scans == [(1536, 2048)]
    for c in smear.cells:
        assert near(out[c.y:c.y + c.height, c.x:c.x + c.width], CLASS_COLOURS[c.cls]).any(), c.cell_id


def test_an_analysis_that_knows_its_outline_boxes_draws_without_a_scan(monkeypatch, smear):
    """`analyze` hands over each cell's whole-outline box (`ImageAnalysis.outlines`), so the
    overlay need not scan the label map; the drawing is the same as with the scan."""
    from wbc_batch import overlay

    scanned = draw_overlay(smear.rgb, analysis_from(smear, review={2}))
    known = analysis_from(smear, review={2})
    known.outlines = overlay.outline_boxes(known.cell_labels, known.cells)
    monkeypatch.setattr(overlay, "label_extents", lambda labels: pytest.fail("label map scanned"))
    assert (draw_overlay(smear.rgb, known) == scanned).all()


def test_legend_covers_every_class():
    assert list(legend()) == list(CLASSES)
    assert len(set(legend().values())) == len(CLASSES)


def _simulated(rgb, matrix) -> np.ndarray:
    """`rgb` as a colour-blind reader sees it (a Machado et al. 2009 matrix on linear RGB), in
    CIELAB."""
    c = np.asarray(rgb, np.float64) / 255.0
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    seen = np.clip(np.asarray(matrix) @ lin, 0, 1)
    srgb = np.where(seen <= 0.0031308, 12.92 * seen, 1.055 * seen ** (1 / 2.4) - 0.055)
    return cv2.cvtColor(srgb.astype(np.float32).reshape(1, 1, 3), cv2.COLOR_RGB2Lab)[0, 0]


@pytest.mark.parametrize("matrix", [
    np.eye(3),
    [[0.152286, 1.052583, -0.204868], [0.114503, 0.786281, 0.099216], [-0.003882, -0.048116, 1.051998]],
    [[0.367322, 0.860646, -0.227968], [0.280085, 0.672501, 0.047413], [-0.011820, 0.042940, 0.968881]],
    [[1.255528, -0.076749, -0.178779], [-0.078411, 0.930809, 0.147602], [0.004733, 0.691367, 0.303900]],
], ids=["normal", "protanopia", "deuteranopia", "tritanopia"])
def test_class_colours_stay_apart_for_colour_blind_readers(matrix):
    # lymphocyte green and monocyte orange looked alike under protanopia (7 CIELAB units apart)
    seen = {c: _simulated(CLASS_COLOURS[c], matrix) for c in CLASSES}
    gaps = {(a, b): float(np.linalg.norm(seen[a] - seen[b]))
            for i, a in enumerate(CLASSES) for b in CLASSES[i + 1:]}
    assert min(gaps.values()) >= 15, min(gaps.items(), key=lambda kv: kv[1])


def test_label_text_is_the_colour_that_contrasts_more():
    from wbc_batch.overlay import _text_colour

    # white on this green (2.5:1) and this blue (3.1:1) was faint; black gives 8.4:1 and 6.8:1
    assert _text_colour((0, 190, 60)) == (0, 0, 0)
    assert _text_colour((0, 150, 255)) == (0, 0, 0)
    assert _text_colour((0, 0, 0)) == (255, 255, 255)
    assert _text_colour((255, 255, 255)) == (0, 0, 0)
    for colour in CLASS_COLOURS.values():  # every label reads at 4.5:1 or better (WCAG AA)
        text = _text_colour(colour)
        lum = [float(np.dot([0.2126, 0.7152, 0.0722],
                            np.where(np.asarray(c) / 255 <= 0.04045, np.asarray(c) / 255 / 12.92,
                                     ((np.asarray(c) / 255 + 0.055) / 1.055) ** 2.4)))
               for c in (colour, text)]
        assert (max(lum) + 0.05) / (min(lum) + 0.05) >= 4.5, colour


@pytest.mark.parametrize("side, expected", [(40, "1 LYM 0.50?"), (60, "1 LYM 0.50?"),
                                            (90, "1 LYM 0.50?"), (140, "1 lymphocyte 0.50?")])
def test_a_label_in_a_small_crop_keeps_its_confidence_and_review_mark(side, expected):
    # in a 60x60 crop "1 lymphocyte 0.99?" was cut after "lymphocyte" at the image's edge
    from wbc_batch.overlay import MIN_FONT, _fitting_label

    smear = make_smear(side, side, cells=[("lymphocyte", side * 0.6)], seed=2, rbc_density=0)
    analysis = analysis_from(smear, review={1})
    _, font, text_thick = _scale(side, side, 0.0)
    text, size, (tw, th), base = _fitting_label(analysis.cells[0], font, text_thick, side)
    assert text == expected
    assert tw + 4 <= side or size == MIN_FONT
    assert (size < font) == (side == 40)  # the short name alone was too wide only there
    assert draw_overlay(smear.rgb, analysis).shape == smear.rgb.shape
    # a cell flagged for its stain gives up the reason before its "?"
    stained = dataclasses.replace(analysis.cells[0], unusual_stain=True)
    text, size, (tw, th), base = _fitting_label(stained, font, text_thick, side)
    assert text == {40: "1 LYM 0.50?", 60: "1 LYM 0.50?", 90: "1 LYM 0.50 stain?",
                    140: "1 lymphocyte 0.50 stain?"}[side]
    assert tw + 4 <= side or size == MIN_FONT
