"""scripts/red_cell_scale_check.py: the truth red-cell size, and the correlation length it is
compared with."""

import math

import cv2
import numpy as np
import pytest

from conftest import load_script


@pytest.fixture(scope="module")
def rcs():
    return load_script("red_cell_scale_check")


def discs(size: tuple, radius: int, n: int, seed: int = 0) -> np.ndarray:
    """A light field (RGB) with `n` pink discs of `radius` at random places."""
    rng = np.random.default_rng(seed)
    rgb = np.full((*size, 3), (225, 220, 215), np.uint8)
    for _ in range(n):
        centre = (int(rng.integers(0, size[1])), int(rng.integers(0, size[0])))
        cv2.circle(rgb, centre, radius, (200, 120, 130), -1)
    return rgb


def test_the_red_cell_size_leaves_out_boxes_cut_by_the_border(rcs):
    boxes = [(10, 10, 20, 20), (50, 50, 30, 30), (0, 40, 5, 20), (90, 5, 12, 12)]
    assert rcs.rbc_size(boxes, 100, 100) == pytest.approx(25.0)   # median of 20 and 30
    assert math.isnan(rcs.rbc_size([(0, 0, 10, 10)], 100, 100))


def test_yolo_boxes_keep_one_class_in_pixels(rcs, tmp_path):
    label = tmp_path / "a.txt"
    label.write_text("0 0.5 0.5 0.2 0.2\n1 0.25 0.5 0.1 0.2\n1 0.75 0.25 0.2 0.1\n")
    assert rcs.yolo_boxes(label, 200, 100, "1") == [
        pytest.approx((40.0, 40.0, 20.0, 20.0)), pytest.approx((130.0, 20.0, 40.0, 10.0))]


def test_the_correlation_length_follows_the_discs_size(rcs):
    small = rcs.correlation_length(discs((480, 640), 15, 250))
    large = rcs.correlation_length(discs((480, 640), 30, 60))
    assert 1.6 < large / small < 2.4


def test_the_correlation_length_is_in_original_pixels(rcs):
    """The same field at twice the magnification gives twice the length."""
    rgb = discs((480, 640), 20, 120, seed=1)
    once = rcs.correlation_length(rgb)
    twice = rcs.correlation_length(cv2.resize(rgb, (1280, 960), interpolation=cv2.INTER_LINEAR))
    assert twice / once == pytest.approx(2.0, rel=0.1)


def test_painted_makes_the_right_share_of_the_width_glass(rcs):
    rgb = discs((100, 200), 8, 40)
    assert rcs.painted(rgb, 0.0, np.random.default_rng(0)) is rgb
    out = rcs.painted(rgb, 0.25, np.random.default_rng(0))
    assert np.array_equal(out[:, :150], rgb[:, :150])
    level = np.percentile(rgb.reshape(-1, 3), 99, axis=0)
    assert np.abs(out[:, 150:].reshape(-1, 3).mean(axis=0) - level).max() < 0.5
    assert 1.0 < out[:, 150:].astype(float).std(axis=(0, 1)).min() < 3.0  # camera noise


def test_generated_rows_give_the_drawn_red_cells_over_the_sizers_reading(rcs, monkeypatch):
    class Fixed:  # reads every window as red cells 24 px across
        def log_sizes(self, batch):
            return np.full(len(batch), math.log(24.0))

    monkeypatch.setattr(rcs, "DENSITIES", (0.45,))
    monkeypatch.setattr(rcs, "GENERATED_WBC_PX", (60.0, 90.0))
    monkeypatch.setattr(rcs, "GENERATED_SEEDS", range(1))
    rows = rcs.generated_rows(Fixed())
    from wbc_batch.sample import RBC_SIZE

    assert list(rows) == [0.45] and len(rows[0.45]) == 2
    # 24 px of a 128 px window 480 px across (the first pass) is 90 px of the field, and the
    # second pass's windows, 480 px too, read the same
    assert rows[0.45] == pytest.approx([d * RBC_SIZE / 90.0 for d in (60.0, 90.0)])


@pytest.mark.parametrize("share", ["1", "-0.1"])
def test_glass_outside_a_share_of_the_width_is_refused(rcs, share, capsys):
    with pytest.raises(SystemExit) as stop:
        rcs.main(["--glass", share])
    assert stop.value.code == 2 and "--glass" in capsys.readouterr().err


@pytest.mark.parametrize("args", [["--generated", "--glass", "0.5"],
                                  ["--generated", "--split", "train"],
                                  ["--wbc-over-rbc", "--split", "train"]])
def test_painting_or_a_split_with_a_measurement_that_reads_neither_is_refused(rcs, args, capsys):
    with pytest.raises(SystemExit) as stop:
        rcs.main(args)
    assert stop.value.code == 2 and "not with --generated" in capsys.readouterr().err
