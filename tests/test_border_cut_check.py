"""scripts/border_cut_check.py: the crop that cuts a WBC box at its nearest side, and the box
arithmetic its counts rest on."""

import pytest

from conftest import load_script


@pytest.fixture(scope="module")
def bcc():
    return load_script("border_cut_check")


@pytest.mark.parametrize("box, crop", [
    ((20, 200, 100, 100), (95, 0, 640, 480)),      # nearest the left edge: 25 px of 100 stay
    ((500, 200, 100, 100), (0, 0, 525, 480)),      # the right
    ((300, 10, 100, 100), (0, 85, 640, 480)),      # the top
    ((300, 360, 100, 100), (0, 0, 640, 385)),      # the bottom
])
def test_the_crop_keeps_the_share_of_the_box_at_its_nearest_side(bcc, box, crop):
    assert bcc.cut((480, 640, 3), box, 0.25) == crop
    part = bcc.in_crop(box, crop)
    assert part[2] * part[3] == pytest.approx(0.25 * box[2] * box[3], abs=100)


def test_the_part_of_the_box_is_in_the_crops_pixels(bcc):
    assert bcc.in_crop((20, 200, 100, 100), (95, 0, 640, 480)) == (0, 200, 25, 100)
    assert bcc.in_crop((300, 360, 100, 100), (0, 0, 640, 385)) == (300, 360, 100, 25)


def test_box_overlaps(bcc):
    assert bcc.iou((0, 0, 10, 10), (5, 0, 10, 10)) == pytest.approx(50 / 150)
    assert bcc.iou((0, 0, 10, 10), (10, 0, 10, 10)) == 0.0
    assert bcc.overlap_of((0, 0, 10, 10), (5, 0, 100, 100)) == pytest.approx(0.5)
    assert bcc.overlap_of((0, 0, 10, 10), (20, 20, 5, 5)) == 0.0
