"""scripts/flat_field_check.py: what the analysis makes of the fields the script draws and of the
public sets' images under its changes."""

import re
from pathlib import Path

import numpy as np
import pytest

from conftest import load_script

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="module")
def ffc():
    return load_script("flat_field_check")


def test_the_drawn_glass_is_glass_and_the_dark_frames_black(ffc):
    assert {ffc.verdict(rgb)[3] for _, rgb in ffc.glass_fields(7)} == {"glass"}
    assert {ffc.verdict(rgb)[3] for _, rgb in ffc.dark_frames(7)} == {"black"}


def test_the_specks_on_the_glass_are_seen_and_the_glass_taken_for_sparse(ffc):
    glass, dusty = ffc.glass_fields(7), ffc.dusty_glass(7)
    assert len(dusty) == len(glass)
    assert all((a != b).any() for (_, a), (_, b) in zip(glass, dusty))
    verdicts = [ffc.verdict(rgb) for _, rgb in dusty]
    assert all(0 < cover for _, _, cover, _ in verdicts)
    taken = [v[3] for v in verdicts if v[3] in ("glass", "sparse")]
    assert "sparse" in taken and len(taken) > len(dusty) / 2   # larger specks are analysed
    assert all(v[2] >= ffc.MIN_COVER for v in verdicts if v[3] == "analysed")


def test_the_changes_are_perturbation_checks_and_shorter_exposures_and_defocus(ffc):
    names = ffc.changes()
    assert {"none", "pale", "tiny", "exposure x0.25", "defocus 8 px"} <= set(names)
    rgb = np.full((4, 4, 3), 201, np.uint8)
    assert int(names["exposure x0.5"](rgb)[0, 0, 0]) == 101
    assert names["none"](rgb) is rgb


def test_a_line_counts_each_outcome(ffc):
    rows = [(10.0, 0.05, 0.0, "glass"), (20.0, 1.0, 0.0, "black"),
            (150.0, 0.6, 0.4, "analysed"), (60.0, 0.25, 0.001, "sparse")]
    assert ffc.line("kind", rows) == ("kind: 4 fields; span 10 to 150 levels, 5.0 to 100.0 % of "
                                      "the brightest; cover 0.00 to 40.00 %; glass 1, sparse 1, "
                                      "black 1, analysed 1")


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data not present")
def test_dataset_2_val_is_analysed_under_every_change_but_the_shorter_exposures(ffc, capsys):
    assert ffc.main(["--data", str(SHARED), "--sets", "wbc2", "--seeds", "7"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "glass 48, sparse 0, black 0, analysed 0" in lines[1]
    sparse = int(re.search(r"sparse (\d+)", lines[2]).group(1))
    assert lines[2].startswith("glass with specks (seed 7): 48 fields") and sparse > 24
    assert "black 16" in lines[3]
    rows = [x for x in lines if x.startswith("wbc2 val, ")]
    assert len(rows) == len(ffc.changes())
    assert all(x.endswith("glass 0, sparse 0, black 0, analysed 22") for x in rows)
