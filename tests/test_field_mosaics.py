"""scripts/field_mosaics.py: mosaic size, where each truth box lands, and --shrink."""

import csv

import cv2
import numpy as np
import pytest

from conftest import load_script


@pytest.fixture(scope="module")
def fm():
    return load_script("field_mosaics")


def _fields(tmp_path, k: int) -> list:
    """k 80x60 fields, each with one box at (8, 6)-(40, 30)."""
    fields = []
    for i in range(k):
        path = tmp_path / f"f{i}.png"
        cv2.imwrite(str(path), np.full((60, 80, 3), 25 * i, np.uint8))
        fields.append((path, f"class{i}", (8.0, 6.0, 40.0, 30.0)))
    return fields


def _truth(path) -> list:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_a_mosaic_is_one_field_in_size_by_default(fm, tmp_path):
    assert fm.build(_fields(tmp_path, 9), 2, tmp_path / "out") == 2  # the ninth field is left
    mosaic = cv2.imread(str(tmp_path / "out" / "n2" / "mosaic_001.png"))
    assert mosaic.shape[:2] == (60, 80)
    rows = _truth(tmp_path / "out" / "n2.csv")
    assert len(rows) == 8 and rows[5]["class"] == "class5"
    # the second tile of the second mosaic sits right of the first: (8, 6, 40, 30) / 2 + (40, 0)
    assert [rows[5][k] for k in ("xmin", "ymin", "xmax", "ymax")] == ["44", "3", "60", "15"]


def test_shrink_sets_the_tile_size_apart_from_n(fm, tmp_path):
    assert fm.build(_fields(tmp_path, 4), 2, tmp_path / "out", shrink=0.5) == 1
    mosaic = cv2.imread(str(tmp_path / "out" / "n2-s0.5" / "mosaic_000.png"))
    assert mosaic.shape[:2] == (240, 320)
    assert mosaic[180, 240].tolist() == [75, 75, 75]  # the fourth field, bottom right
    rows = _truth(tmp_path / "out" / "n2-s0.5.csv")
    assert [rows[3][k] for k in ("xmin", "ymin", "xmax", "ymax")] == ["176", "132", "240", "180"]


def test_the_shrink_option_names_its_folders(fm, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(fm, "one_wbc_fields", lambda data, split: _fields(tmp_path, 9))
    assert fm.main(["-n", "3", "--shrink", "3", "-o", str(tmp_path / "out")]) == 0
    assert "1 mosaics of 3x3 fields in " + str(tmp_path / "out" / "n3-s3") in capsys.readouterr().out
    assert (tmp_path / "out" / "n3-s3.csv").exists()


def test_shrink_must_be_positive(fm, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        fm.main(["--shrink", "0", "-o", str(tmp_path / "out")])
    assert stop.value.code == 2 and "--shrink must be a positive number, not 0" in capsys.readouterr().err


def test_repeat_lays_a_mosaic_side_by_side_with_its_truth_moved(fm, tmp_path):
    assert fm.build(_fields(tmp_path, 4), 2, tmp_path / "out", shrink=1, repeat=2) == 1
    mosaic = cv2.imread(str(tmp_path / "out" / "n2-s1-r2" / "mosaic_000.png"))
    assert mosaic.shape[:2] == (240, 320)
    assert np.array_equal(mosaic[120:, 160:], mosaic[:120, :160])
    rows = _truth(tmp_path / "out" / "n2-s1-r2.csv")
    assert len(rows) == 16 and rows[4]["class"] == rows[0]["class"] == "class0"
    # the first field's box in the copy to the right, then in the one below
    assert [rows[4][k] for k in ("xmin", "ymin", "xmax", "ymax")] == ["168", "6", "200", "30"]
    assert [rows[8][k] for k in ("xmin", "ymin", "xmax", "ymax")] == ["8", "126", "40", "150"]


def test_repeat_must_be_at_least_one(fm, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        fm.main(["--repeat", "0", "-o", str(tmp_path / "out")])
    assert stop.value.code == 2 and "--repeat must be 1 or more, not 0" in capsys.readouterr().err
