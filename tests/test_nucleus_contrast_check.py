"""scripts/nucleus_contrast_check.py: which found cell stands for a WBC, and its printed summary."""

from types import SimpleNamespace

import numpy as np
import pytest

from conftest import load_script


@pytest.fixture(scope="module")
def ncc():
    return load_script("nucleus_contrast_check")


def test_a_box_set_counts_the_cells_that_match_a_truth_box(ncc):
    record = SimpleNamespace(boxes=[(10, 10, 50, 50)])
    cells = [((12, 10, 50, 50), 0.5), ((200, 200, 50, 50), 0.01)]
    assert ncc.is_wbc(record, np.zeros((300, 300, 3), np.uint8), cells) == [True, False]
    assert ncc.is_wbc(SimpleNamespace(boxes=[]), np.zeros((300, 300, 3), np.uint8), cells) == [False, False]


def test_a_single_cell_image_counts_the_cell_nearest_its_centre(ncc):
    record = SimpleNamespace(image="x.jpg")                 # a class record: no boxes
    cells = [((0, 0, 40, 40), 0.3), ((130, 130, 40, 40), 0.5), ((250, 10, 40, 40), 0.2)]
    assert ncc.is_wbc(record, np.zeros((300, 300, 3), np.uint8), cells) == [False, True, False]


def test_the_summary_gives_the_low_tail(ncc):
    assert ncc.summary([]) == "none"
    assert ncc.summary([0.5, 0.25, 0.75]).startswith("n=3 min=0.250 ")
    assert "median=0.500" in ncc.summary([0.5, 0.25, 0.75])


def test_cells_are_scored_with_both_bars_off(ncc):
    """An empty field has no stain colour and counts as grey, so the grey images' bar must be off
    too, or the candidates the rule exists for would not be scored."""
    assert ncc.RULE_OFF.min_nucleus_contrast == 0 and ncc.RULE_OFF.min_grey_nucleus_contrast == 0


def test_wbc_free_strips_are_the_widest_strip_clear_of_every_box(ncc, tmp_path, monkeypatch):
    import cv2

    image = tmp_path / "f.png"
    rgb = np.zeros((48, 64, 3), np.uint8)
    rgb[:, :, 1] = np.arange(64)[None, :]             # green = column, to see where it was cut
    cv2.imwrite(str(image), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    records = [SimpleNamespace(image=str(image), boxes=[(10, 5, 15, 15)]),       # free: 29..64
               SimpleNamespace(image=str(image), boxes=[(20, 5, 10, 10), (40, 0, 4, 4)])]
    monkeypatch.setattr(ncc.ds, "bccd", lambda data, split: records)
    strips = ncc.wbc_free_strips(tmp_path, "val", min_width=20, gap=4)
    assert len(strips) == 1                           # the second field has no 20 px clear
    name, strip = strips[0]
    assert name == "f.png" and strip.shape == (48, 35, 3)
    assert strip[0, 0, 1] == 29 and strip[0, -1, 1] == 63


def test_the_high_tail_is_printed_for_what_should_score_low(ncc):
    assert ncc.summary([0.5, 0.25, 0.75], high=True).startswith("n=3 max=0.750 p99=0.745 ")
    assert ncc.summary([], high=True) == "none"


def test_an_empty_field_is_scored_or_said_to_be_refused(ncc, monkeypatch):
    """Blank glass never reaches the segmenter (`analysis.field_cover`); a field the analysis
    refuses is said, and the script goes on."""
    from wbc_batch import analysis
    from wbc_batch.results import ImageNotAnalysable

    bundle = SimpleNamespace(diameter=112)
    blank = np.full((240, 320, 3), 230, np.uint8)
    assert ncc.empty_field_line(blank, None, bundle) == "0 found, contrast -"

    def refuse(*args, **kwargs):
        raise ImageNotAnalysable("the WBCs found are about 5.0 px across")

    monkeypatch.setattr(ncc, "find_cells", refuse)
    said = ncc.empty_field_line(blank, None, bundle)
    assert said == "refused (the WBCs found are about 5.0 px across)"
    assert analysis.field_cover(blank) == 0.0
