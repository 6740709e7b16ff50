"""Accuracy metrics on small arrays whose answers are worked out by hand."""

import math
from dataclasses import replace

import cv2
import numpy as np
import pytest

from wbc_batch.metrics import (NONE, PixelCounts, accuracy_tables, box_iou_matrix, calibration_bins,
                               central_cell, classification_report, confusion_matrix,
                               expected_calibration_error, format_accuracy, match_boxes,
                               pixel_counts, region_counts, score_image, standard_mask,
                               wilson_interval)
from wbc_batch.results import CellResult, ImageAnalysis, ImageResult
from wbc_batch.truth import ImageTruth


def cell(cell_id, cls, conf, x, y, w, h, area=None):
    probs = tuple(conf if c == cls else (1 - conf) / 4 for c in
                  ("neutrophil", "lymphocyte", "monocyte", "eosinophil", "basophil"))
    return CellResult(cell_id=cell_id, cls=cls, confidence=conf, probs=probs, x=x, y=y, width=w,
                      height=h, area_px=area if area is not None else w * h, nucleus_area_px=0,
                      needs_review=conf < 0.8)


def result(image, cells=(), w=10, h=10, status="ok", error=""):
    return ImageResult(image=image, status=status, error=error, width=w, height=h, cells=tuple(cells))


def analysis_of(mask, cells=()):
    return ImageAnalysis(cells=list(cells), cell_labels=np.zeros(mask.shape, np.int32), mask=mask,
                         diameter_px=5.0, scale=1.0)


# --- pixels --------------------------------------------------------------------------------------

def test_pixel_counts_and_ratios():
    pred = np.array([[1, 1, 0], [0, 1, 0]], bool)
    truth = np.array([[1, 0, 0], [1, 1, 0]], bool)
    c = pixel_counts(pred, truth)
    assert (c.tp, c.fp, c.fn, c.tn) == (2, 1, 1, 2)
    assert c.iou == pytest.approx(2 / 4)
    assert c.recall == pytest.approx(2 / 3)
    assert c.precision == pytest.approx(2 / 3)
    assert c.acc == pytest.approx(4 / 6)
    assert c.dice == pytest.approx(4 / 6)


def test_empty_counts_are_nan_not_zero_division():
    c = PixelCounts(0, 0, 0, 9)
    assert math.isnan(c.iou) and math.isnan(c.recall) and c.acc == 1.0


def test_region_counts_wbc_and_nucleus_levels():
    truth = np.array([[0, 128, 255, 255],
                      [0, 128, 128, 0]], np.uint8)
    pred = np.array([[128, 128, 255, 128],
                     [0, 0, 255, 0]], np.uint8)
    counts = region_counts(pred, truth)
    # whole WBC: truth 5 pixels, pred 5; overlap at (0,1),(0,2),(0,3),(1,2) = 4
    assert counts["wbc"] == PixelCounts(tp=4, fp=1, fn=1, tn=2)
    # nucleus: truth (0,2),(0,3); pred (0,2),(1,2)
    assert counts["nucleus"] == PixelCounts(tp=1, fp=1, fn=1, tn=5)


def test_region_counts_ignores_near_zero_antialiasing_and_reads_binary_masks():
    truth = np.array([[0, 7, 128, 255]], np.uint8)  # 7: an anti-aliasing pixel, background
    pred = np.array([[0, 0, 128, 255]], np.uint8)
    assert region_counts(pred, truth)["wbc"] == PixelCounts(2, 0, 0, 2)
    binary = np.array([[0, 1, 1, 0]], np.uint8)
    counts = region_counts(pred, binary)
    assert set(counts) == {"wbc"}
    assert counts["wbc"] == PixelCounts(tp=1, fp=1, fn=1, tn=1)


def test_label_map_and_0_255_masks_are_read_in_their_own_convention():
    # a lab's masks: 0/1/2 label maps scored 0 % before (every value under the 64 threshold),
    # and 0/255 whole-cell masks were scored as all nucleus
    pred = np.array([[0, 128, 255, 255]], np.uint8)
    labels = np.array([[0, 1, 2, 2]], np.uint8)
    assert region_counts(pred, labels) == region_counts(pred, np.array([[0, 128, 255, 255]],
                                                                       np.uint8))
    assert region_counts(pred, labels)["nucleus"] == PixelCounts(tp=2, fp=0, fn=0, tn=2)
    whole = np.array([[0, 255, 255, 255]], np.uint8)
    counts = region_counts(pred, whole)
    assert set(counts) == {"wbc"} and counts["wbc"] == PixelCounts(tp=3, fp=0, fn=0, tn=1)
    # 0/128/255 masks stay as they are; a bright mask with no cytoplasm is a whole-cell one
    assert standard_mask(np.array([[0, 128, 255]], np.uint8))[1] is False
    assert standard_mask(np.array([[0, 2, 255]], np.uint8))[0].tolist() == [[0, 0, 255]]
    assert standard_mask(np.array([[0, 128, 128]], np.uint8))[1] is True


def _cell_masks():
    """A drawn WBC as 0/128/255 (nucleus in cytoplasm) and as a whole-cell 0/255 mask."""
    import cv2

    three = np.zeros((120, 160), np.uint8)
    cv2.circle(three, (80, 60), 40, 128, -1)
    cv2.ellipse(three, (75, 60), (22, 16), 30, 0, 360, 255, -1)
    return three, np.where(three > 0, 255, 0).astype(np.uint8)


def _jpeg(mask, quality=90):
    import cv2

    return cv2.imdecode(cv2.imencode(".jpg", mask, [cv2.IMWRITE_JPEG_QUALITY, quality])[1], 0)


def test_masks_saved_as_jpeg_or_resized_keep_their_convention():
    import cv2

    three, whole = _cell_masks()
    pred = three.copy()
    smooth = cv2.resize(cv2.resize(whole, (80, 60), interpolation=cv2.INTER_AREA), (160, 120))
    for variant in (_jpeg(whole, 95), _jpeg(whole, 50), smooth, _jpeg(whole // 255), _jpeg(whole // 2)):
        counts = region_counts(pred, variant)
        assert set(counts) == {"wbc"}, "a whole-cell mask got nucleus figures"
        assert counts["wbc"].tp / (counts["wbc"].tp + counts["wbc"].fp + counts["wbc"].fn) > 0.95
    labels = np.array([0, 1, 2], np.uint8)[(three // 127).clip(0, 2)]
    for variant in (_jpeg(three, 95), _jpeg(three, 50), _jpeg(labels)):
        counts = region_counts(pred, variant)
        assert set(counts) == {"wbc", "nucleus"}
        nucleus = counts["nucleus"]
        assert nucleus.tp / (nucleus.tp + nucleus.fp + nucleus.fn) > 0.9


def test_a_mask_of_cell_ids_is_refused_and_jpeg_label_maps_are_not(tmp_path):
    # cellpose, CVAT and QuPath write one value per cell (1..N, often 16-bit): read as grey, the
    # ids under half the largest became background and the rest whole cells, unsaid
    import cv2

    from wbc_batch.metrics import read_mask

    for n, dtype in ((6, np.uint8), (40, np.uint16)):
        ids = np.zeros((200, 300), dtype)
        for k in range(1, n + 1):
            cv2.circle(ids, (20 + (k * 37) % 260, 20 + (k * 23) % 160), 9, k, -1)
        path = tmp_path / f"ids{n}.png"
        cv2.imwrite(str(path), ids)
        with pytest.raises(ValueError, match=f"holds {n} values from 1 to {n}, each a region of "
                                             "its own: a mask of cell ids"):
            read_mask(path)
    # JPEG ringing puts values above 2 along a label map's edges, in no region of their own
    # JPEG ringing puts a solid patch of 3s inside a nucleus (2s), away from the cytoplasm:
    # a WBC Image Dataset train mask as a 0/1/2 map at quality 75 was refused as cell ids
    ring = np.zeros((200, 300), np.uint8)
    cv2.circle(ring, (150, 100), 60, 1, -1)
    cv2.circle(ring, (150, 100), 30, 2, -1)
    ring[95:105, 145:155] = 3
    cv2.imwrite(str(tmp_path / "ringing.png"), ring)
    assert read_mask(tmp_path / "ringing.png").max() == 3
    three, _ = _cell_masks()
    labels = np.array([0, 1, 2], np.uint8)[(three // 127).clip(0, 2)]
    for quality in (50, 75, 95):
        path = tmp_path / f"labels{quality}.jpg"
        cv2.imwrite(str(path), labels, [cv2.IMWRITE_JPEG_QUALITY, quality])
        assert read_mask(path).max() >= 2


def test_a_mask_of_two_or_three_cell_ids_is_refused_and_label_maps_are_not(tmp_path):
    # ids 1..3 read as a 0/1/2 label map: cell 1 became all cytoplasm, cells 2 and 3 all nucleus
    import cv2

    from wbc_batch.metrics import read_mask

    for n, dtype in ((2, np.uint8), (3, np.uint16)):
        ids = np.zeros((200, 300), dtype)
        for k in range(1, n + 1):
            cv2.circle(ids, (60 * k, 100), 25, k, -1)
        cv2.imwrite(str(tmp_path / f"ids{n}.png"), ids)
        with pytest.raises(ValueError, match=rf"holds the values 1 to {n}, and no region of "
                                             "2s touches a 1: a mask of cell ids"):
            read_mask(tmp_path / f"ids{n}.png")
    ids = np.zeros((200, 400), np.uint8)  # cells 1 and 2 touch, cell 3 apart
    for x, k in ((60, 1), (135, 2), (300, 3)):
        cv2.circle(ids, (x, 100), 40, k, -1)
    cv2.imwrite(str(tmp_path / "touching.png"), ids)
    with pytest.raises(ValueError, match="no region of 3s touches a 1: a mask of cell ids"):
        read_mask(tmp_path / "touching.png")
    fields = np.zeros((200, 300), np.uint8)  # two cells, each with its nucleus (2, or 3)
    for x, nucleus in ((70, 2), (200, 3)):
        cv2.circle(fields, (x, 100), 40, 1, -1)
        cv2.circle(fields, (x + 10, 100), 18, nucleus, -1)
    cv2.imwrite(str(tmp_path / "labels.png"), fields)
    assert read_mask(tmp_path / "labels.png").max() == 3
    cv2.circle(fields, (270, 40), 25, 2, -1)  # and a cell drawn as nucleus alone
    cv2.imwrite(str(tmp_path / "bare.png"), fields)
    assert read_mask(tmp_path / "bare.png").max() == 3
    three, _ = _cell_masks()
    labels = np.array([0, 1, 2], np.uint8)[(three // 127).clip(0, 2)]
    for quality in (50, 75, 95):
        cv2.imwrite(str(tmp_path / f"labels{quality}.jpg"), labels,
                    [cv2.IMWRITE_JPEG_QUALITY, quality])
        assert read_mask(tmp_path / f"labels{quality}.jpg").max() >= 2


def test_a_0_1_whole_cell_mask_saved_as_jpeg_at_quality_75_is_no_label_map():
    import cv2

    # JPEG ringing at PIL's default quality turns some edge pixels of a 0/1 mask into 2s (2 to
    # 4 % of these cells), which had read it as a 0/1/2 label map with a nucleus of noise
    for radius in (20, 30, 50):
        whole = np.zeros((300, 300), np.uint8)
        cv2.circle(whole, (151, 148), radius, 1, -1)
        noisy = _jpeg(whole, 75)
        assert np.count_nonzero(noisy == 2) > 0
        assert standard_mask(noisy)[1] is True, radius
        counts = region_counts(np.where(whole > 0, 128, 0).astype(np.uint8), noisy)
        assert set(counts) == {"wbc"}


def test_an_empty_truth_mask_counts_a_predicted_nucleus_as_false():
    truth = np.zeros((10, 10), np.uint8)  # a field without a WBC (e.g. --save-masks output)
    pred = np.zeros((10, 10), np.uint8)
    pred[2:6, 2:6] = 128
    pred[3:5, 3:5] = 255
    counts = region_counts(pred, truth)
    assert counts["wbc"] == PixelCounts(tp=0, fp=16, fn=0, tn=84)
    assert counts["nucleus"] == PixelCounts(tp=0, fp=4, fn=0, tn=96)


def test_region_counts_resizes_truth_to_the_prediction():
    truth = np.zeros((4, 4), np.uint8)
    truth[:2, :2] = 255
    pred = np.zeros((2, 2), np.uint8)
    pred[0, 0] = 255
    assert region_counts(pred, truth)["wbc"] == PixelCounts(1, 0, 0, 3)  # the image's 4 pixels
    assert region_counts(None, truth, shape=(2, 2))["wbc"] == PixelCounts(0, 0, 1, 3)
    assert region_counts(None, truth)["wbc"] == PixelCounts(0, 0, 4, 12)


# --- boxes ---------------------------------------------------------------------------------------

def test_box_iou_matrix():
    iou = box_iou_matrix([(0, 0, 10, 10)], [(5, 0, 10, 10), (20, 20, 5, 5), (0, 0, 10, 10)])
    assert iou[0].tolist() == pytest.approx([50 / 150, 0.0, 1.0])


def test_match_boxes_greedy_one_to_one_at_half_iou():
    truth = [(0, 0, 10, 10), (100, 100, 10, 10), (50, 50, 10, 10)]
    pred = [(1, 0, 10, 10), (0, 1, 10, 10), (100, 105, 10, 10)]
    # pred 0 iou 90/110 with truth 0, pred 1 the same: only one can match; truth 1 vs pred 2:
    # 50/150 < 0.5, no match.
    matches = match_boxes(truth, pred)
    assert [(i, j) for i, j, _ in matches] == [(0, 0)]
    assert matches[0][2] == pytest.approx(90 / 110)
    assert match_boxes([], pred) == [] and match_boxes(truth, []) == []


def test_central_cell_prefers_the_cell_over_the_centre_then_the_larger():
    a = cell(1, "neutrophil", 0.9, 0, 0, 3, 3)
    b = cell(2, "monocyte", 0.9, 4, 4, 3, 3)
    c = cell(3, "basophil", 0.9, 3, 3, 5, 5)
    assert central_cell([a, b], 10, 10).cell_id == 2
    assert central_cell([a, b, c], 10, 10).cell_id == 3
    assert central_cell([], 10, 10) is None


# --- classes -------------------------------------------------------------------------------------

def test_classification_report_by_hand():
    true = ["neutrophil", "neutrophil", "lymphocyte", "lymphocyte", "monocyte"]
    pred = ["neutrophil", "lymphocyte", "lymphocyte", None, "monocyte"]
    rep = classification_report(true, pred)
    assert rep["n"] == 5 and rep["accuracy"] == pytest.approx(3 / 5)
    assert rep["error_rate"] == pytest.approx(2 / 5)
    by = {r["class"]: r for r in rep["per_class"]}
    assert list(by) == ["neutrophil", "lymphocyte", "monocyte"]
    assert (by["neutrophil"]["precision"], by["neutrophil"]["recall"]) == (1.0, 0.5)
    assert (by["lymphocyte"]["precision"], by["lymphocyte"]["recall"]) == (0.5, 0.5)
    assert by["neutrophil"]["f1"] == pytest.approx(2 / 3)
    assert by["lymphocyte"]["f1"] == pytest.approx(0.5)
    assert rep["macro_f1"] == pytest.approx((2 / 3 + 0.5 + 1.0) / 3)


def test_confusion_matrix_has_a_none_column():
    rows, cols, counts = confusion_matrix(["neutrophil", "neutrophil", "eosinophil"],
                                          ["neutrophil", None, "neutrophil"])
    assert rows == ["neutrophil", "eosinophil"]
    assert cols == ["neutrophil", "eosinophil", NONE]
    assert counts.tolist() == [[1, 0, 1], [1, 0, 0]]


def test_ece_by_hand():
    conf = [0.95, 0.95, 0.55, 0.55, 1.0, 0.0]
    hit = [1, 0, 1, 1, 1, 0]
    # bins (lo, hi], 0 goes to the first bin: {0.0}: conf 0, acc 0 -> gap 0;
    # (0.533,0.6]: conf .55 acc 1 -> .45 * 2/6; (0.933, 1]: conf (0.95+0.95+1)/3, acc 2/3
    top = abs(2 / 3 - (0.95 + 0.95 + 1.0) / 3)
    assert expected_calibration_error(conf, hit) == pytest.approx(2 / 6 * 0.45 + 3 / 6 * top)
    bins = calibration_bins(conf, hit)
    assert len(bins) == 15 and sum(b[2] for b in bins) == 6
    assert math.isnan(expected_calibration_error([], []))


def test_perfectly_calibrated_is_zero():
    assert expected_calibration_error([1.0, 1.0], [1, 1]) == 0.0


# --- score_image and tables ----------------------------------------------------------------------

def test_score_image_mask_and_single_class(tmp_path):
    truth_mask = np.zeros((10, 10), np.uint8)
    truth_mask[2:8, 2:8] = 128
    truth_mask[4:6, 4:6] = 255
    cv2.imwrite(str(tmp_path / "t.png"), truth_mask)
    pred = np.zeros((10, 10), np.uint8)
    pred[2:8, 2:7] = 128
    pred[4:6, 4:6] = 255
    cells = [cell(1, "lymphocyte", 0.9, 2, 2, 5, 6), cell(2, "neutrophil", 0.6, 8, 8, 2, 2)]
    res = result("a/x.bmp", cells)
    score = score_image(analysis_of(pred, cells), res, ImageTruth(mask_path=tmp_path / "t.png",
                                                                   cls="lymphocyte"))
    assert score.pixels["wbc"] == PixelCounts(30, 0, 6, 64)
    assert score.pixels["nucleus"] == PixelCounts(4, 0, 0, 96)
    assert (score.pred_cls, score.confidence) == ("lymphocyte", 0.9)


def test_failed_image_scores_as_finding_nothing(tmp_path):
    truth_mask = np.zeros((4, 4), np.uint8)
    truth_mask[:2] = 255
    cv2.imwrite(str(tmp_path / "t.png"), truth_mask)
    res = result("bad.png", status="error", error="cannot decode", w=0, h=0)  # never read
    score = score_image(None, res, ImageTruth(mask_path=tmp_path / "t.png", cls="monocyte",
                                              boxes=[(0, 0, 4, 2)]))
    assert score.pixels["wbc"] == PixelCounts(0, 0, 8, 8)
    assert score.pred_cls is None and score.n_truth_boxes == 1 and score.matches == []
    assert "cannot decode" in score.note


def test_ok_image_without_prediction_mask_gets_no_pixel_metrics(tmp_path):
    cv2.imwrite(str(tmp_path / "t.png"), np.zeros((4, 4), np.uint8))
    score = score_image(None, result("x.png", w=4, h=4), ImageTruth(mask_path=tmp_path / "t.png"))
    assert score.pixels == {} and "no predicted mask" in score.note
    given = score_image(None, result("x.png", w=4, h=4), ImageTruth(mask_path=tmp_path / "t.png"),
                        pred_mask=np.zeros((4, 4), np.uint8))
    assert given.pixels["wbc"] == PixelCounts(0, 0, 0, 16)


def test_a_mask_of_another_shape_is_left_out_not_stretched(tmp_path, caplog):
    three, _ = _cell_masks()  # 160x120
    pred = three.copy()
    cv2.imwrite(str(tmp_path / "turned.png"), np.ascontiguousarray(three.T))  # 120x160
    cv2.imwrite(str(tmp_path / "half.png"), cv2.resize(three, (80, 60),
                                                         interpolation=cv2.INTER_NEAREST))
    cv2.imwrite(str(tmp_path / "odd.png"), cv2.resize(three, (81, 60),
                                                        interpolation=cv2.INTER_NEAREST))
    res = result("a/x.png", w=160, h=120)
    with caplog.at_level("WARNING", logger="wbc_batch"):
        turned = score_image(analysis_of(pred, []), res, ImageTruth(mask_path=tmp_path / "turned.png"))
    assert turned.pixels == {} and "120x160 but the image 160x120" in turned.note
    assert "a/x.png" in caplog.text and "left out of the pixel metrics" in caplog.text
    for name in ("half.png", "odd.png"):  # another resolution (one pixel of rounding): scaled
        half = score_image(analysis_of(pred, []), res, ImageTruth(mask_path=tmp_path / name))
        assert set(half.pixels) == {"wbc", "nucleus"} and "resized to the image's 160x120" in half.note
        wbc = half.pixels["wbc"]
        assert wbc.tp / (wbc.tp + wbc.fp + wbc.fn) > 0.9
        # counted at the image's size: each image weighs its own pixels in the summed figures
        assert wbc.tp + wbc.fp + wbc.fn + wbc.tn == 160 * 120
    failed = replace(res, status="error", error="analysis failed", cells=())
    cv2.imwrite(str(tmp_path / "three.png"), three)
    for name in ("half.png", "three.png"):  # not analysed: all truth pixels missed, at its size
        wbc = score_image(None, failed, ImageTruth(mask_path=tmp_path / name)).pixels["wbc"]
        assert wbc.tp + wbc.fp + wbc.fn + wbc.tn == 160 * 120 and wbc.tp == wbc.fp == 0
    cv2.imwrite(str(tmp_path / "square.png"), cv2.resize(three, (100, 100)))
    wbc = score_image(None, failed, ImageTruth(mask_path=tmp_path / "square.png")).pixels["wbc"]
    assert wbc.tp + wbc.fp + wbc.fn + wbc.tn == 100 * 100  # of another shape: at its own size


def test_an_inverted_truth_mask_is_left_out_of_the_pixel_metrics_and_said(tmp_path, caplog):
    # black cell on white: read as drawn, the glass was the WBC, and whole-WBC IoU near 0 %
    three, _ = _cell_masks()  # 160x120, nucleus 255, cytoplasm 128
    cv2.imwrite(str(tmp_path / "inverted.png"), 255 - three)
    cv2.imwrite(str(tmp_path / "upright.png"), three)
    res = result("a/x.png", w=160, h=120)
    with caplog.at_level("WARNING", logger="wbc_batch"):
        score = score_image(analysis_of(three.copy(), []), res,
                            ImageTruth(mask_path=tmp_path / "inverted.png", cls="monocyte"))
    assert score.pixels == {} and "drawn inverted?" in score.note
    assert "a/x.png: its truth mask marks" in caplog.text and "left out of the pixel" in caplog.text
    assert score.true_cls == "monocyte"  # its class is still scored
    upright = score_image(analysis_of(three.copy(), []), res,
                          ImageTruth(mask_path=tmp_path / "upright.png"))
    assert upright.pixels["wbc"].iou == 1.0 and upright.note == ""


def test_unreadable_truth_mask_is_noted_not_raised(tmp_path):
    (tmp_path / "t.png").write_bytes(b"not a png")
    score = score_image(None, result("x.png"), ImageTruth(mask_path=tmp_path / "t.png"))
    assert score.pixels == {} and "cannot read truth mask" in score.note


def test_score_image_boxes_normalised_and_classes():
    cells = [cell(1, "neutrophil", 0.9, 0, 0, 10, 10), cell(2, "eosinophil", 0.7, 50, 50, 10, 10),
             cell(3, "monocyte", 0.8, 80, 0, 10, 10)]
    truth = ImageTruth(boxes=[(0.0, 0.0, 0.1, 0.1), (0.5, 0.5, 0.1, 0.1), (0.3, 0.3, 0.1, 0.1)],
                       box_classes=["neutrophil", "neutrophil", "basophil"], box_units="norm")
    score = score_image(None, result("f.jpg", cells, w=100, h=100), truth)
    assert [(i, cid) for i, cid, _ in score.matches] == [(0, 1), (1, 2)]
    assert score.box_pairs == [("neutrophil", "neutrophil", 0.9), ("neutrophil", "eosinophil", 0.7),
                               ("basophil", None, None)]
    assert (score.n_truth_boxes, score.n_pred_cells) == (3, 3)


def test_boxes_in_fractions_of_the_image_are_left_out_with_a_word(caplog):
    # a CSV of a tool that writes fractions: read as pixels, every box under a pixel matched
    # nothing and cell finding read 0 % without a word
    cells = [cell(1, "neutrophil", 0.9, 10, 10, 20, 20)]
    with caplog.at_level("WARNING", logger="wbc_batch"):
        score = score_image(None, result("f.jpg", cells, w=640, h=480),
                            ImageTruth(boxes=[(0.1, 0.2, 0.15, 0.18), (0.5, 0.5, 0.1, 0.1)]))
    assert not score.has_boxes
    assert "its 2 truth box(es) are all under 2 px across: fractions of the image?" in score.note
    assert "f.jpg" in caplog.text
    one_stray = ImageTruth(boxes=[(10.0, 10.0, 20.0, 20.0), (0.5, 0.5, 1.0, 1.0)])
    kept = score_image(None, result("g.jpg", cells, w=640, h=480), one_stray)
    assert kept.has_boxes and kept.n_truth_boxes == 2  # only all of them so small is fractions


def test_a_run_whose_truth_boxes_match_no_cell_says_how_boxes_are_read(caplog):
    # boxes in percent of the image, or placed by their centre: 0 of 21 matched, without a word
    cells = [cell(i, "neutrophil", 0.9, 100 * i, 100, 40, 40) for i in range(1, 4)]
    percent = ImageTruth(boxes=[(10.0 * i, 20.0, 6.0, 8.0) for i in range(1, 4)])
    scores = {"f.jpg": score_image(None, result("f.jpg", cells, w=640, h=480), percent)}
    warned = set()  # a Runner's, whose reports a watcher builds after each image
    with caplog.at_level("WARNING", logger="wbc_batch"):
        accuracy_tables([result("f.jpg", cells, w=640, h=480)], scores, warned=warned)
        accuracy_tables([result("f.jpg", cells, w=640, h=480)], scores, warned=warned)
    assert caplog.text.count("none of the 3 truth boxes matches one of the 3 cells found") == 1
    assert "with x, y their top-left corner?" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="wbc_batch"):  # another run (a program's): said again
        accuracy_tables([result("f.jpg", cells, w=640, h=480)], scores)
    assert "matches one of" in caplog.text
    caplog.clear()
    right = ImageTruth(boxes=[(100.0 * i, 100.0, 40.0, 40.0) for i in range(1, 4)])
    scores = {"f.jpg": score_image(None, result("f.jpg", cells, w=640, h=480), right)}
    with caplog.at_level("WARNING", logger="wbc_batch"):
        accuracy_tables([result("f.jpg", cells, w=640, h=480)], scores)
    assert "matches one of" not in caplog.text


def test_boxes_drawn_at_another_resolution_are_scaled_or_left_out_never_scored_as_missed(caplog):
    cells = [cell(1, "neutrophil", 0.9, 10, 10, 20, 20)]
    # VOC boxes of a 1280x960 export on the 640x480 image: scaled, and found
    twice = ImageTruth(boxes=[(20.0, 20.0, 40.0, 40.0)], box_size=(1280, 960))
    score = score_image(None, result("f.jpg", cells, w=640, h=480), twice)
    assert score.has_boxes and [i for i, _, _ in score.matches] == [0]
    assert "truth boxes drawn on a 1280x960 image, scaled to the image's 640x480" in score.note
    # another shape: they are another image's boxes, left out with a word, not 0 % found
    with caplog.at_level("WARNING", logger="wbc_batch"):
        other = score_image(None, result("f.jpg", cells, w=640, h=480),
                            ImageTruth(boxes=[(20.0, 20.0, 40.0, 40.0)], box_size=(1000, 1000)))
    assert not other.has_boxes and other.n_truth_boxes == 0
    assert "drawn on a 1000x1000 image (the annotation's size) but the image is 640x480" in other.note
    assert "left out of the cell-finding metrics" in caplog.text
    # boxes mostly outside the image (pixels of another size, no size given): left out
    caplog.clear()
    with caplog.at_level("WARNING", logger="wbc_batch"):
        out = score_image(None, result("g.jpg", cells, w=300, h=300),
                          ImageTruth(boxes=[(10.0, 10.0, 20.0, 20.0), (1000.0, 1000.0, 80.0, 80.0)]))
    assert not out.has_boxes
    assert "1 of its 2 truth box(es) lie mostly outside the 300x300 image" in out.note
    assert "g.jpg" in caplog.text
    # a WBC cut by the edge, annotated to the edge or a little past it, is scored
    edge = score_image(None, result("h.jpg", cells, w=300, h=300),
                       ImageTruth(boxes=[(10.0, 10.0, 20.0, 20.0), (290.0, 100.0, 14.0, 20.0)]))
    assert edge.has_boxes and edge.n_truth_boxes == 2 and edge.note == ""
    # an image not read (size 0) keeps its boxes: it scores as finding nothing
    failed = score_image(None, result("i.jpg", [], w=0, h=0),
                         ImageTruth(boxes=[(1.0, 1.0, 5.0, 5.0)], box_size=(64, 48)))
    assert failed.has_boxes and failed.n_truth_boxes == 1


def test_the_mean_iou_per_image_counts_only_images_that_have_one(tmp_path):
    scores = {}
    for name, t, p in (("a.bmp", [[255, 255], [0, 0]], [[255, 0], [0, 0]]),
                       ("empty.bmp", [[0, 0], [0, 0]], [[0, 0], [0, 0]])):  # no IoU: 0/0
        cv2.imwrite(str(tmp_path / (name + ".png")), np.array(t, np.uint8))
        scores[name] = score_image(analysis_of(np.array(p, np.uint8)), result(name, w=2, h=2),
                                   ImageTruth(mask_path=tmp_path / (name + ".png")))
    tables = accuracy_tables([result(n) for n in scores], scores)
    summary = tables["summary"].set_index(["section", "metric"])
    assert summary.loc[("pixels_wbc", "mean_iou_per_image")].tolist() == [0.5, 1]
    assert summary.loc[("pixels_wbc", "iou"), "n"] == 2  # the summed counts take in both


def test_accuracy_tables_sum_over_images_like_the_paper(tmp_path):
    scores = {}
    masks = {"a.bmp": ([[255, 255], [0, 0]], [[255, 0], [0, 0]]),
             "b.bmp": ([[128, 128], [0, 0]], [[128, 128], [128, 0]])}
    for name, (t, p) in masks.items():
        cv2.imwrite(str(tmp_path / (name + ".png")), np.array(t, np.uint8))
        truth = ImageTruth(mask_path=tmp_path / (name + ".png"), cls="neutrophil")
        cells = [cell(1, "neutrophil" if name == "a.bmp" else "lymphocyte", 0.9, 0, 0, 2, 2)]
        scores[name] = score_image(analysis_of(np.array(p, np.uint8), cells),
                                   result(name, cells, 2, 2), truth)
    results = [result("a.bmp"), result("b.bmp"), result("c.bmp")]
    tables = accuracy_tables(results, scores)
    wbc = tables["pixels"].set_index("region").loc["wbc"]
    # a: tp1 fn1 tn2; b: tp2 fp1 tn1 -> summed tp3 fp1 fn1 tn3
    assert (wbc.tp, wbc.fp, wbc.fn, wbc.tn) == (3, 1, 1, 3)
    assert wbc.iou == pytest.approx(3 / 5) and wbc.recall == pytest.approx(3 / 4)
    assert wbc.acc == pytest.approx(6 / 8)
    assert wbc.mean_iou == pytest.approx((1 / 2 + 2 / 3) / 2)
    summary = tables["summary"].set_index(["section", "metric"])["value"]
    assert summary[("run", "images")] == 3 and summary[("run", "images_with_truth")] == 2
    assert summary[("classes", "accuracy")] == pytest.approx(0.5)
    conf = tables["confusion"].set_index("true \\ predicted")
    assert conf.loc["neutrophil", "lymphocyte"] == 1
    assert set(tables) == {"summary", "pixels", "classes", "confusion", "calibration", "per_image"}
    assert list(tables["per_image"]["image"]) == ["a.bmp", "b.bmp"]
    low, high = wilson_interval(1, 2)
    assert (summary[("classes", "accuracy_ci95_low")], summary[("classes", "accuracy_ci95_high")]) == (low, high)
    text = format_accuracy(tables)
    assert "whole WBC" in text and "60.00%" in text
    assert f"accuracy 50.00% (95% CI {100 * low:.2f}-{100 * high:.2f}%)" in text
    assert ("pixels_wbc", "iou_ci95_low") not in summary  # pixels are not independent draws


def test_accuracy_tables_detection():
    cells = [cell(1, "neutrophil", 0.9, 0, 0, 10, 10), cell(2, "neutrophil", 0.9, 30, 30, 10, 10)]
    truth = ImageTruth(boxes=[(0, 0, 10, 10)], box_classes=["eosinophil"])
    empty = ImageTruth(has_boxes=True)
    scores = {"f1.jpg": score_image(None, result("f1.jpg", cells, 50, 50), truth),
              "f2.jpg": score_image(None, result("f2.jpg", [], 50, 50), empty)}
    tables = accuracy_tables([result("f1.jpg"), result("f2.jpg")], scores)
    det = tables["detection"].iloc[0]
    assert (det.truth_boxes, det.found_cells, det.matched) == (1, 2, 1)
    assert det.recall == 1.0 and det.precision == 0.5
    assert det.class_accuracy_matched == 0.0
    summary = tables["summary"].set_index(["section", "metric"])
    assert summary.loc[("detection", "precision_ci95_low"), "n"] == 2  # over the found cells
    assert summary.loc[("detection", "recall_ci95_high"), "value"] == 1.0
    text = format_accuracy(tables)
    low, high = wilson_interval(1, 2)
    assert "recall 100.00% (95% CI " in text
    assert f"precision 50.00% (95% CI {100 * low:.2f}-{100 * high:.2f}%)" in text


@pytest.mark.parametrize("k,n", [(2, 6), (1, 5), (20, 60), (0, 19), (19, 19), (1033, 1058)])
def test_wilson_interval_ends_lie_z_standard_errors_away(k, n):
    """Each end of the Wilson score interval is a share p0 from which the observed share lies
    exactly z standard errors (taken at p0): (p - p0)^2 = z^2 p0 (1 - p0) / n."""
    low, high = wilson_interval(k, n)
    p = k / n
    for end in (low, high):
        assert (p - end) ** 2 == pytest.approx(1.96 ** 2 * end * (1 - end) / n, rel=1e-3, abs=1e-12)
    assert 0.0 <= low <= p <= high <= 1.0


def test_wilson_interval_known_values():
    assert wilson_interval(2, 6) == pytest.approx((0.0968, 0.7000), abs=5e-5)
    assert wilson_interval(0, 19)[0] == 0.0 and wilson_interval(19, 19)[1] == 1.0
    narrow, wide = wilson_interval(40, 120), wilson_interval(2, 6)
    assert narrow[1] - narrow[0] < (wide[1] - wide[0]) / 2  # more cells, a tighter share
    assert all(math.isnan(v) for v in wilson_interval(0, 0))


def test_no_truth_gives_a_clear_line():
    tables = accuracy_tables([result("x.png")], {})
    assert set(tables) == {"summary"}
    assert "no image of the run matched" in format_accuracy(tables)


def test_a_palette_label_map_is_read_by_its_indices_and_a_colour_mask_is_refused(tmp_path):
    # a 0/1/2 label map saved with a palette (VOC style): OpenCV expands it to colours, and the
    # largest channel made nucleus and cytoplasm one value (the nucleus was lost)
    import struct
    import zlib

    import cv2

    from wbc_batch.metrics import read_mask

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    def palette_png(indices, palette):
        raw = b"".join(b"\0" + row.tobytes() for row in indices)
        return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 4, 2, 8, 3, 0, 0, 0))
                + chunk(b"PLTE", bytes(palette)) + chunk(b"IDAT", zlib.compress(raw))
                + chunk(b"IEND", b""))

    labels = np.array([[0, 1, 2, 2], [0, 1, 1, 0]], np.uint8)
    (tmp_path / "map.png").write_bytes(palette_png(labels, [0, 0, 0, 128, 0, 0, 0, 128, 0]))
    assert read_mask(tmp_path / "map.png").tolist() == labels.tolist()
    pred = np.array([[0, 128, 255, 255], [0, 128, 128, 0]], np.uint8)
    assert region_counts(pred, read_mask(tmp_path / "map.png"))["nucleus"] == PixelCounts(2, 0, 0, 6)
    # a grey mask that a PNG optimiser saved with a palette (white first) keeps its grey values
    grey = palette_png(np.array([[2, 1, 0, 0], [2, 1, 1, 2]], np.uint8),
                       [255, 255, 255, 128, 128, 128, 0, 0, 0])
    (tmp_path / "grey.png").write_bytes(grey)
    assert read_mask(tmp_path / "grey.png").tolist() == [[0, 128, 255, 255], [0, 128, 128, 0]]
    # a whole-cell mask in one colour on black reads as one; two colours would merge classes
    colour = np.zeros((2, 4, 3), np.uint8)
    colour[0, 1] = (0, 0, 255)
    cv2.imwrite(str(tmp_path / "red.png"), colour)
    assert read_mask(tmp_path / "red.png").tolist() == [[0, 255, 0, 0], [0, 0, 0, 0]]
    colour[0, 2] = (0, 255, 0)
    cv2.imwrite(str(tmp_path / "colour.png"), colour)
    with pytest.raises(ValueError, match="is in several colours"):
        read_mask(tmp_path / "colour.png")
    # a VOC palette padded with black to 256 entries reads by the first entry of each colour
    (tmp_path / "padded.png").write_bytes(
        palette_png(labels, [0, 0, 0, 128, 0, 0, 0, 128, 0] + [0, 0, 0] * 253))
    assert read_mask(tmp_path / "padded.png").tolist() == labels.tolist()
    # VOC marks each object's border 255 ('void', cream): read by its values, the border ring
    # alone was the cell (whole-WBC IoU 4.7 % on a lab's field), without a word
    void = np.array([[0, 1, 1, 255], [0, 1, 1, 0]], np.uint8)
    (tmp_path / "void.png").write_bytes(
        palette_png(void, [0, 0, 0, 128, 0, 0] + [0, 0, 0] * 253 + [224, 224, 192]))
    with pytest.raises(ValueError, match=r"void.png is a label map \(1\) with pixels of 255, "
                                         "VOC's 'void'"):
        read_mask(tmp_path / "void.png")
    grey = np.zeros((30, 30), np.uint8)  # the same saved as grey values
    cv2.circle(grey, (15, 15), 10, 255, 2)
    cv2.circle(grey, (15, 15), 9, 1, -1)
    cv2.circle(grey, (15, 15), 4, 2, -1)
    cv2.imwrite(str(tmp_path / "void_grey.png"), grey)
    with pytest.raises(ValueError, match=r"label map \(1, 2\) with pixels of 255"):
        read_mask(tmp_path / "void_grey.png")
    # a small labelled cell in a larger ignore band (labelme2voc's __ignore__) is refused too
    band = np.zeros((60, 60), np.uint8)
    band[:, 30:] = 255
    band[5:15, 5:15] = 1
    cv2.imwrite(str(tmp_path / "band.png"), band)
    with pytest.raises(ValueError, match=r"label map \(1\) with pixels of 255"):
        read_mask(tmp_path / "band.png")
    # a 0/255 whole-cell mask with a few 1s (a touched-up edge) is a whole-cell mask still
    whole = np.where(grey > 0, 255, 0).astype(np.uint8)
    whole[15, 2:5] = 1
    cv2.imwrite(str(tmp_path / "whole.png"), whole)
    assert read_mask(tmp_path / "whole.png").tolist() == whole.tolist()


def test_masks_saved_in_16_bit_rgb_with_transparency_or_as_red_jpeg_read_as_grey(tmp_path):
    import cv2

    from wbc_batch.metrics import read_mask

    grey = np.array([[0, 128, 255, 255]], np.uint8)
    cv2.imwrite(str(tmp_path / "deep.png"), np.dstack([grey.astype(np.uint16) * 257] * 3))
    assert read_mask(tmp_path / "deep.png").tolist() == grey.tolist()
    rgba = np.dstack([np.full_like(grey, 255)] * 3 + [np.where(grey == 0, 0, 255).astype(np.uint8)])
    rgba[..., :3][grey == 128] = 128
    cv2.imwrite(str(tmp_path / "alpha.png"), rgba)  # background: white, fully transparent
    assert read_mask(tmp_path / "alpha.png").tolist() == grey.tolist()
    red = np.zeros((40, 40, 3), np.uint8)
    cv2.circle(red, (20, 20), 12, (0, 0, 255), -1)
    cv2.imwrite(str(tmp_path / "red.jpg"), red, (cv2.IMWRITE_JPEG_QUALITY, 80))
    whole = read_mask(tmp_path / "red.jpg")
    assert whole[20, 20] > 200 and whole[2, 2] < 30


def test_a_wilson_interval_at_all_or_none_ends_exactly_at_1_or_0():
    assert wilson_interval(87, 87)[1] == 1.0 and wilson_interval(0, 87)[0] == 0.0


def test_truth_classes_the_models_do_not_know_get_a_macro_f1_over_the_known_beside_it():
    # three unknown labels dropped macro-F1 from 0.63 to 0.39: an F1 of 0 each, which says
    # nothing of how the five classes are told apart
    labels = [("neutrophil", "neutrophil"), ("lymphocyte", "lymphocyte"), ("monocyte", "lymphocyte"),
              ("blast", "lymphocyte"), ("smudge", "neutrophil")]
    scores = {f"{i}.png": score_image(None, result(f"{i}.png", [cell(1, p, 0.9, 2, 2, 6, 6)]),
                                      ImageTruth(cls=t))
              for i, (t, p) in enumerate(labels)}
    tables = accuracy_tables([result(n) for n in scores], scores)
    summary = tables["summary"].set_index(["section", "metric"])["value"]
    # per class F1: neutrophil 2/3, lymphocyte 0.5, monocyte 0, blast 0, smudge 0
    assert summary[("classes", "macro_f1")] == pytest.approx((2 / 3 + 0.5) / 5)
    assert summary[("classes", "macro_f1_known")] == pytest.approx((2 / 3 + 0.5) / 3)
    assert "macro-F1 0.2333 (0.3889 over the known classes)" in format_accuracy(tables)
    # truth of the five classes alone: no second figure
    known = {n: s for n, s in scores.items() if s.true_cls in ("neutrophil", "lymphocyte", "monocyte")}
    tables = accuracy_tables([result(n) for n in known], known)
    assert ("classes", "macro_f1_known") not in set(tables["summary"].set_index(["section", "metric"]).index)
    assert "over the known classes" not in format_accuracy(tables)
