"""scripts/flat_field_check.py: what the analysis makes of the fields the script draws and of the
public sets' images under its changes."""

import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import load_script

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="module")
def ffc():
    return load_script("flat_field_check")


def test_the_drawn_glass_is_glass_and_the_dark_frames_as_black_as_they_are(ffc):
    assert {ffc.verdict(rgb)[1] for _, rgb in ffc.glass_fields(7)} == {"glass"}
    dark = {name: ffc.verdict(rgb) for name, rgb in ffc.dark_frames(7)}
    assert dark["dark 0 sd 0"] == (0.0, "glass")          # a black image covers nothing
    assert dark["dark 8 sd 5"][1] == "analysed"            # noise on black: analysed as before
    noisy = ffc.noisy_glass(7)                             # strong noise, raw or softened
    assert len(noisy) == 48 and len({name for name, _ in noisy}) == 48


def test_the_specks_on_the_glass_are_seen_and_most_such_fields_taken_for_glass(ffc):
    glass, dusty = ffc.glass_fields(7), ffc.dusty_glass(7)
    assert len(dusty) == len(glass)
    assert all((a != b).any() for (_, a), (_, b) in zip(glass, dusty))
    verdicts = [ffc.verdict(rgb) for _, rgb in dusty]
    assert all(0 < cover for cover, _ in verdicts)
    taken = [v for v in verdicts if v[1] == "glass"]
    assert len(taken) > len(dusty) / 2                      # larger specks are analysed


def test_the_changes_are_perturbation_checks_and_shorter_exposures_defocus_and_fading(ffc):
    names = ffc.changes()
    assert {"none", "pale", "tiny", "exposure x0.25", "defocus 8 px", "faded x0.25"} <= set(names)
    rgb = np.full((4, 4, 3), 201, np.uint8)
    assert int(names["exposure x0.5"](rgb)[0, 0, 0]) == 101
    assert names["none"](rgb) is rgb
    field = np.full((10, 10, 3), 200, np.uint8)
    field[:5] = 100                                         # half cells 100 levels darker
    assert ffc.faded(field, 0.25)[0, 0, 0] == 175 and ffc.faded(field, 0.25)[9, 9, 0] == 200


@pytest.mark.parametrize("frame", ["none", "bars", "round stop", "falloff"])
def test_the_cover_is_measured_on_the_field_the_analysis_measures(ffc, monkeypatch, frame):
    """The analysis fills a black frame, cuts the field out and evens out lamp falloff before
    it measures the cover: the script measures the same image (a first version measured the
    image as it came, black corners and all)."""
    from conftest import draw_field
    from wbc_batch import analysis
    from wbc_batch.sample import lamp_falloff

    rgb = draw_field(320, 240, [(160, 120, 40)])
    if frame == "bars":
        rgb[:, :40] = rgb[:, -40:] = 0
    elif frame == "round stop":
        yy, xx = np.mgrid[:240, :320]
        rgb[(yy - 120) ** 2 + (xx - 160) ** 2 > 130 ** 2] = 0
    elif frame == "falloff":
        rgb = lamp_falloff(rgb, 0.35)
    seen = []
    monkeypatch.setattr(analysis, "field_cover", lambda img: seen.append(img.copy()) or 0.0)
    analysis.find_cells(rgb, None, SimpleNamespace(diameter=112))
    assert len(seen) == 1 and np.array_equal(seen[0], ffc.as_analysed(rgb))
    assert (frame == "none") == (seen[0].shape == rgb.shape and np.array_equal(seen[0], rgb))


def test_a_line_counts_each_outcome(ffc):
    rows = [(0.0, "glass"), (0.4, "analysed"), (0.001, "glass")]
    assert ffc.line("kind", rows) == "kind: 3 fields; cover 0.00 to 40.00 %; glass 2, analysed 1"


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data not present")
def test_dataset_2_val_is_analysed_under_every_change(ffc, capsys):
    assert ffc.main(["--data", str(SHARED), "--sets", "wbc2", "--seeds", "7"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].endswith("glass 48, analysed 0")
    glass = int(re.search(r"glass (\d+)", lines[2]).group(1))
    assert lines[2].startswith("glass with specks (seed 7): 48 fields") and glass > 24
    rows = [x for x in lines if x.startswith("wbc2 val, ")]
    assert len(rows) == len(ffc.changes())
    assert all(x.endswith("glass 0, analysed 22") for x in rows if "x0.15" not in x)
