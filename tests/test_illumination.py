"""Lamp falloff: measured from the glass between the cells, evened out only in fields that have it."""

import numpy as np
import pytest

from wbc_batch import illumination
from wbc_batch.illumination import even_out, measure
from wbc_batch.sample import lamp_falloff, make_smear


@pytest.fixture(scope="module")
def field():
    return make_smear(640, 480, cells=4, seed=3).rgb


def glass_level(rgb, y, x, half=40):
    """The 90th percentile brightness of a window: its glass."""
    win = rgb[max(0, y - half):y + half, max(0, x - half):x + half].astype(float).mean(axis=2)
    return np.percentile(win, 90)


def test_an_evenly_lit_field_measures_little_falloff_and_is_left_alone(field):
    found = measure(field)
    assert found is not None and found.falloff < 0.08
    out, falloff = even_out(field, 0.25)
    assert out is field and falloff == pytest.approx(found.falloff)


@pytest.mark.parametrize("centre", [(0.5, 0.5), (0.2, 0.7)])
def test_falloff_is_measured_and_divided_out(field, centre):
    dim = lamp_falloff(field, 0.35, centre)
    found = measure(dim)
    assert 0.28 < found.falloff < 0.42
    out, falloff = even_out(dim, 0.25)
    assert out is not dim and falloff == found.falloff
    corners = [(40, 40), (40, 600), (440, 40), (440, 600)]
    before = [glass_level(dim, y, x) / glass_level(field, y, x) for y, x in corners]
    after = [glass_level(out, y, x) / glass_level(field, y, x) for y, x in corners]
    assert min(before) < 0.75  # the darkest corner was a quarter darker ...
    assert all(0.92 < r < 1.08 for r in after), after  # ... and is now as bright as in the even field


def test_the_threshold_and_zero_turn_it_off(field):
    dim = lamp_falloff(field, 0.35)
    assert even_out(dim, 0.5)[0] is dim
    assert even_out(dim, 0.0)[0] is dim


def test_large_fields_are_evened_strip_by_strip_to_the_same_result(field, monkeypatch):
    dim = lamp_falloff(field, 0.35)
    whole, _ = even_out(dim, 0.25)
    monkeypatch.setattr(illumination, "STRIP_ROWS", 100)
    assert np.array_equal(even_out(dim, 0.25)[0], whole)


def test_a_field_of_alike_blocks_measures_no_falloff():
    striped = np.full((200, 200, 3), 90, np.uint8)
    striped[::2] = 40
    assert measure(striped).falloff < 1e-6


def test_too_few_glass_blocks_leave_the_image_alone(field, monkeypatch):
    monkeypatch.setattr(illumination, "MIN_BLOCKS", 10_000)
    dim = lamp_falloff(field, 0.35)
    assert measure(dim) is None
    out, falloff = even_out(dim, 0.25)
    assert out is dim and falloff == 0.0


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_a_crop_filled_by_one_cell_is_not_taken_for_falloff(monkeypatch, seed):
    """Around a cell filling a crop only the edges show glass: the fitted surface is a bowl, darkest
    where the cell is, and dividing by it would bleach the cell (seen on 0.4x Dataset 1 crops)."""
    crop = make_smear(120, 120, cells=1, diameter=84, seed=seed, rbc_density=0.3).rgb
    assert measure(crop) is None
    out, falloff = even_out(crop, 0.25)
    assert out is crop and falloff == 0.0
    monkeypatch.setattr(illumination, "BOWL_LOG", np.inf)  # without the guard ...
    bowl = measure(crop)
    assert bowl.falloff >= 0.25 and even_out(crop, 0.25)[0] is not crop  # ... it would be evened


def test_a_lamp_off_to_one_side_is_still_measured(field):
    found = measure(lamp_falloff(field, 0.35, centre=(0.0, 0.5)))
    assert found is not None and 0.28 < found.falloff < 0.42


class SeenSession:
    """Records what the segmenter is shown; finds no cell."""

    device, fallback_note = "cpu", ""

    def __init__(self):
        self.shown = []

    def segment(self, batch):
        self.shown.append(batch)
        logits = np.zeros((batch.shape[0], 3) + batch.shape[2:], np.float32)
        logits[:, 0] = 5.0
        return logits


def test_cells_are_found_in_the_evened_field_and_the_result_keeps_no_copy(field):
    from wbc_batch.analysis import analyze, find_cells
    from wbc_batch.bundle import ModelBundle
    from wbc_batch.config import AnalysisParams
    from wbc_batch.preprocess import channel_stats, normalize

    bundle = ModelBundle(root=None, meta={"segmenter": {"diameter": 112}, "classifier": {}})
    dim = lamp_falloff(field, 0.35)
    given = AnalysisParams(diameter_px=112)
    session = SeenSession()
    found = find_cells(dim, session, bundle, given)
    evened = even_out(dim, 0.25)[0]
    assert np.array_equal(found.rgb, evened)
    assert np.allclose(session.shown[0][0, :, :480, :640], normalize(evened, channel_stats(evened)))
    assert find_cells(dim, SeenSession(), bundle, AnalysisParams(diameter_px=112, min_falloff=0)).rgb is dim
    assert find_cells(field, SeenSession(), bundle, given).rgb is field
    assert not hasattr(analyze(dim, SeenSession(), bundle, given), "rgb")


@pytest.mark.parametrize("seed", [0, 5])
def test_the_default_models_find_the_same_cells_under_lamp_falloff(seed):
    """Without evening, dark corners merge into large false cells: the scale estimate then comes
    out too large and real cells are lost (1 of 4 found for seed 5)."""
    from wbc_batch.analysis import analyze
    from wbc_batch.bundle import DEFAULT_BUNDLE_DIR, load_bundle
    from wbc_batch.config import AnalysisParams
    from wbc_batch.nets import TorchSession

    if not (DEFAULT_BUNDLE_DIR / "bundle.json").exists():
        pytest.skip("default weights not trained yet")
    bundle = load_bundle()
    session = TorchSession.from_bundle(bundle)
    smear = make_smear(640, 480, cells=4, seed=seed)
    dim = lamp_falloff(smear.rgb, 0.35)

    def found(rgb, **params):  # outlines are compared by their whole box (box_trim=0): a body
        # box can move more (14 px for one seed-0 cell) when an outline changes a little
        return [(c.cls, (c.x, c.y, c.width, c.height))
                for c in analyze(rgb, session, bundle, AnalysisParams(box_trim=0, **params)).cells]

    even = found(smear.rgb)
    assert len(even) == 4
    assert found(dim, min_falloff=0) != even
    evened = found(dim)
    assert [cls for cls, _ in evened] == [cls for cls, _ in even]
    for (_, a), (_, b) in zip(evened, even):
        assert max(abs(u - v) for u, v in zip(a, b)) <= 6  # the same cells, outlined alike


def test_no_even_illumination_is_a_run_option_recorded_in_run_json(invoke, tmp_path, fake_cli_args, field):
    import json

    from conftest import write_image

    write_image(tmp_path / "in" / "a.png", lamp_falloff(field, 0.35))
    for args, expected in (((), 0.25), (("--no-even-illumination",), 0.0)):
        out = tmp_path / f"out-{expected}"
        res = invoke("run", tmp_path / "in", "-o", out, *fake_cli_args, *args)
        assert res.exit_code == 0, res.output
        assert json.loads((out / "run.json").read_text())["parameters"]["analysis"]["min_falloff"] == expected
