"""Stain directions, the stain reference, and cells flagged for a stain unlike the training data."""

import json

import numpy as np
import pandas as pd
import pytest
from openpyxl import load_workbook

from wbc_batch.analysis import unusual_stains
from wbc_batch.config import AnalysisParams
from wbc_batch.pipeline import run
from wbc_batch.preprocess import cell_crop
from wbc_batch.stain import StainReference, optical_density, stain_axes, stain_features

from conftest import AZURE, EOSIN, stained_field, two_stain_smear, write_image

#: a stain no Romanowsky smear has: a green and a brown dye
GREEN, BROWN = (0.85, 0.2, 0.5), (0.25, 0.45, 0.85)


def _source(seed, blue, pink, n=40, spread=0.03):
    """Crops of one 'microscope': its two dyes, turned a little from crop to crop."""
    rng = np.random.default_rng(seed)
    return [two_stain_smear(rng, np.add(blue, rng.normal(0, spread, 3)), np.add(pink, rng.normal(0, spread, 3)))[0]
            for _ in range(n)]


def test_stain_axes_finds_the_two_stains_of_a_smear():
    img, stains = two_stain_smear(np.random.default_rng(0))
    axes = stain_axes(optical_density(img))
    found = axes[:2] / np.linalg.norm(axes[:2], axis=1, keepdims=True)
    # each true stain is one of the two axes found (the order is not part of the contract)
    assert (found @ stains.T).max(axis=0).min() > 0.98
    # a field without stained pixels has no stain axes
    assert stain_axes(np.zeros((48, 48, 3))) is None


def test_stain_features_name_no_dye_first():
    img, stains = two_stain_smear(np.random.default_rng(1))
    expected = (np.outer(stains[0], stains[0]) + np.outer(stains[1], stains[1]))[np.triu_indices(3)]
    assert np.abs(stain_features(img) - expected).max() < 0.05
    assert stain_features(np.full((48, 48, 3), 250, np.uint8)) is None


def test_a_stain_unlike_every_training_source_is_flagged():
    lab_a, lab_b = _source(0, AZURE, EOSIN), _source(1, (0.6, 0.7, 0.25), (0.2, 0.85, 0.5))
    ref = StainReference.fit({"a": lab_a, "b": lab_b, "empty": [np.full((48, 48, 3), 250, np.uint8)] * 3})
    assert ref.sources == ("a", "b")  # a source without measurable stains is left out
    new_a, new_b = _source(10, AZURE, EOSIN), _source(11, (0.6, 0.7, 0.25), (0.2, 0.85, 0.5))
    foreign = _source(12, GREEN, BROWN)
    flagged = {name: np.mean(unusual_stains(crops, ref)) for name, crops in
               (("a", new_a), ("b", new_b), ("foreign", foreign))}
    assert flagged["a"] <= 0.1 and flagged["b"] <= 0.1 and flagged["foreign"] == 1.0
    # about 1 % of the training crops themselves lie beyond the threshold
    assert np.mean(unusual_stains(lab_a + lab_b, ref)) <= 0.03
    # stored in bundle.json and read back, it measures the same distances
    back = StainReference.from_meta(json.loads(json.dumps(ref.to_meta())))
    assert back.threshold == ref.threshold
    assert np.allclose([back.distance(c) for c in foreign], [ref.distance(c) for c in foreign])
    # no reference, or a crop without two stains: nothing flagged
    assert unusual_stains(foreign, None) == [False] * len(foreign)
    assert unusual_stains([np.full((48, 48, 3), 250, np.uint8)], ref) == [False]
    assert StainReference.fit({"empty": [np.full((48, 48, 3), 250, np.uint8)] * 3}) is None


def _bundle_with_reference(tmp_path, fake_bundle, rng):
    """The fake bundle plus a stain reference fitted on crops of cells dyed like `stained_field`'s,
    cut as the pipeline cuts them."""
    meta = json.loads((fake_bundle / "bundle.json").read_text())
    crops = [cell_crop(stained_field(rng, [(40, 40, 24)], 80, 80), (16, 16, 48, 48), 1.3,
                       meta["classifier"]["crop_size"]) for _ in range(30)]
    meta["classifier"]["stain_reference"] = StainReference.fit({"lab": crops}).to_meta()
    root = tmp_path / "bundle"
    root.mkdir()
    (root / "bundle.json").write_text(json.dumps(meta))
    return root


def test_cells_stained_unlike_the_training_data_need_review(pm, make_config, tmp_path, fake_bundle):
    rng = np.random.default_rng(3)
    cells = [(80, 70, 24), (230, 80, 24), (160, 170, 24)]
    write_image(tmp_path / "in" / "ours.png", stained_field(rng, cells))
    write_image(tmp_path / "in" / "theirs.png", stained_field(rng, cells, blue=GREEN, pink=BROWN))
    bundle = _bundle_with_reference(tmp_path, fake_bundle, rng)  # cells dyed like "ours"

    outcome = run(make_config(tmp_path / "in", tmp_path / "out", model_dir=bundle), pm)
    by_image = {r.image: r for r in outcome.results}
    assert len(by_image["ours.png"].cells) == len(by_image["theirs.png"].cells) == 3
    # the fake classifier is confident (p 0.93): only the stain can flag a cell
    assert not any(c.unusual_stain or c.needs_review for c in by_image["ours.png"].cells)
    assert all(c.unusual_stain and c.needs_review for c in by_image["theirs.png"].cells)
    table = pd.read_csv(tmp_path / "out" / "cells.csv")
    assert table.groupby("image")["unusual_stain"].sum().to_dict() == {"ours.png": 0, "theirs.png": 3}
    assert json.loads((tmp_path / "out" / "run.json").read_text())["counts"]["unusual_stain"] == 3

    # switched off, or with a bundle that has no reference: nothing is flagged for its stain
    off = run(make_config(tmp_path / "in", tmp_path / "off", model_dir=bundle,
                          analysis=AnalysisParams(stain_check=False)), pm)
    plain = run(make_config(tmp_path / "in", tmp_path / "plain"), pm)
    for outcome in (off, plain):
        assert not any(c.unusual_stain or c.needs_review for r in outcome.results for c in r.cells)


def test_every_cell_of_a_grey_image_is_flagged(pm, make_config, tmp_path, fake_bundle):
    """A monochrome camera's image has no stain to compare; the classifier loses 12 to 26 points
    on grey images (the model card's "grey" perturbation), so each of its cells needs a look."""
    import cv2

    rng = np.random.default_rng(4)
    grey = cv2.cvtColor(stained_field(rng, [(80, 70, 24), (230, 80, 24)]), cv2.COLOR_RGB2GRAY)
    write_image(tmp_path / "in" / "grey.png", cv2.cvtColor(grey, cv2.COLOR_GRAY2RGB))
    bundle = _bundle_with_reference(tmp_path, fake_bundle, rng)
    outcome = run(make_config(tmp_path / "in", tmp_path / "out", model_dir=bundle), pm)
    cells = outcome.results[0].cells
    assert len(cells) == 2 and all(c.unusual_stain and c.needs_review for c in cells)
    off = run(make_config(tmp_path / "in", tmp_path / "off", model_dir=bundle,
                          analysis=AnalysisParams(stain_check=False)), pm)
    assert not any(c.unusual_stain for c in off.results[0].cells)
    crops = [np.full((48, 48, 3), 120, np.uint8)]
    assert unusual_stains(crops, None, grey=True) == [False]     # no reference: nothing is checked


def test_the_run_says_how_many_cells_have_an_unusual_stain(invoke, tmp_path, fake_bundle, fake_cli_args):
    rng = np.random.default_rng(4)
    write_image(tmp_path / "in" / "theirs.png", stained_field(rng, [(80, 70, 24)], blue=GREEN, pink=BROWN))
    bundle = _bundle_with_reference(tmp_path, fake_bundle, rng)
    args = [a if a != str(fake_bundle) else str(bundle) for a in fake_cli_args]
    res = invoke("run", tmp_path / "in", "-o", tmp_path / "out", *args)
    assert res.exit_code == 0, res.output
    assert "1 of 1 WBC(s) have a stain unlike every microscope" in res.stderr
    # the review count is said too: the stain line read as the whole list to look at
    assert "1 of 1 WBC(s) need a human look (needs_review in cells.csv" in res.stderr
    res = invoke("run", tmp_path / "in", "-o", tmp_path / "off", *args, "--no-stain-check")
    assert res.exit_code == 0 and "stain unlike" not in res.stderr
    review = int(pd.read_csv(tmp_path / "off" / "cells.csv")["needs_review"].sum())
    assert (f"{review} of 1 WBC(s) need a human look" in res.stderr) == (review > 0)
    assert not pd.read_csv(tmp_path / "off" / "cells.csv")["unusual_stain"].any()


def test_results_saved_before_the_stain_check_still_load():
    from wbc_batch.results import CellResult

    old = dict(cell_id=1, cls="neutrophil", confidence=0.9, probs=[0.9, 0.025, 0.025, 0.025, 0.025],
               x=1, y=2, width=30, height=30, area_px=700, nucleus_area_px=300, needs_review=False)
    assert CellResult.from_dict(old).unusual_stain is False


def _yellow_smear(rng, blue, pink, size=48):
    """A two-dye smear like `two_stain_smear`'s, seen through a yellowish lamp (white at 255, 245, 170)."""
    img, _ = two_stain_smear(rng, blue, pink, size)
    return np.clip(img * (np.array([255, 245, 170]) / 255.0), 0, 255).astype(np.uint8)


def test_a_crop_is_redrawn_in_the_target_stain_on_a_white_background():
    from wbc_batch.stain import StainTarget, balanced_od, dye_directions

    rng = np.random.default_rng(5)
    target = StainTarget.fit(_source(6, AZURE, EOSIN, n=30))
    blue_first = np.array([AZURE, EOSIN]) / np.linalg.norm([AZURE, EOSIN], axis=1, keepdims=True)
    assert (target.directions * blue_first).sum(axis=1).min() > 0.98   # blue dye first, then eosin

    # the dye absorbing red the most comes first, whichever way the axes were found
    for first, second in ((AZURE, EOSIN), (GREEN, BROWN), (BROWN, GREEN)):
        found = dye_directions(balanced_od(_yellow_smear(rng, first, second)))
        want = np.array([first, second]) / np.linalg.norm([first, second], axis=1, keepdims=True)
        if want[0, 0] - want[0, 1] < want[1, 0] - want[1, 1]:
            want = want[::-1]
        assert (found * want).sum(axis=1).min() > 0.98

    theirs = _yellow_smear(rng, GREEN, BROWN)
    redrawn = target.redraw(theirs)
    assert redrawn.shape == theirs.shape and redrawn.dtype == np.uint8
    found = dye_directions(balanced_od(redrawn))
    assert (found * target.directions).sum(axis=1).min() > 0.98     # now dyed as the target
    glass = theirs.reshape(-1, 3).sum(axis=1) >= np.percentile(theirs.reshape(-1, 3).sum(axis=1), 95)
    assert redrawn.reshape(-1, 3)[glass].min() > 235                  # the yellow glass is white
    # a crop without two stains is left as it is
    blank = np.full((48, 48, 3), 250, np.uint8)
    assert target.redraw(blank) is blank
    assert StainTarget.fit([blank]) is None
    again = StainTarget.from_meta(json.loads(json.dumps(target.to_meta())))
    assert np.array_equal(again.redraw(theirs), redrawn)


def test_a_crop_whose_dyes_cannot_be_told_apart_is_not_redrawn():
    from dataclasses import replace

    from wbc_batch.stain import MIN_ANGLE_PERCENTILE, StainTarget, _measure, dye_angle

    crops = _source(9, AZURE, EOSIN, n=30)
    target = StainTarget.fit(crops)
    angles = [dye_angle(_measure(c)[1]) for c in crops]
    assert target.min_angle == pytest.approx(np.percentile(angles, MIN_ANGLE_PERCENTILE), abs=1e-3)
    # two dyes under 7 degrees apart (a grey or washed-out stain): unmixing them would be guesswork
    close = np.array([AZURE, AZURE]) + np.array([[0, 0, 0], [0.0, 0.15, 0.0]])
    smear, _ = two_stain_smear(np.random.default_rng(10), close[0], close[1])
    assert dye_angle(_measure(smear)[1]) < target.min_angle
    assert target.redraw(smear) is smear
    assert not np.array_equal(replace(target, min_angle=0.0).redraw(smear), smear)
    # a target stored before the guard existed redraws every crop with two stains
    old = {k: v for k, v in target.to_meta().items() if k != "min_angle"}
    assert StainTarget.from_meta(old).min_angle == 0.0


class _Recorder:
    """A classifying session that keeps what it was given."""

    def __init__(self):
        self.batches = []

    def classify(self, batch):
        self.batches.append(batch.copy())
        return np.zeros((len(batch), 5), np.float32)


def _two_cells():
    """A field of two cells, ours and one in another stain (which the stain check flags), their
    label map, boxes and crops, and a bundle whose stain reference and target are ours."""
    from dataclasses import replace
    from types import SimpleNamespace

    import cv2

    from wbc_batch.stain import StainTarget

    rng = np.random.default_rng(7)
    ours = stained_field(rng, [(40, 40, 24)], 80, 80)
    rgb = np.hstack([ours, stained_field(rng, [(40, 40, 24)], 80, 80, blue=GREEN, pink=BROWN)])
    labels = np.zeros(rgb.shape[:2], np.uint16)
    cv2.circle(labels, (40, 40), 24, 1, -1)
    cv2.circle(labels, (120, 40), 24, 2, -1)
    boxes = {1: (16, 16, 49, 49), 2: (96, 16, 49, 49)}
    training = [cell_crop(stained_field(rng, [(40, 40, 24)], 80, 80), (16, 16, 48, 48), 1.3, 32) for _ in range(30)]
    bundle = SimpleNamespace(crop_margin=1.3, crop_size=32, temperature=1.0,
                             stain_reference=StainReference.fit({"lab": training}),
                             stain_target=replace(StainTarget.fit(training), min_angle=0.0))
    crops = [cell_crop(rgb, boxes[c], 1.3, 32) for c in (1, 2)]
    return rgb, labels, boxes, bundle, crops


def test_only_unusual_cells_are_classified_from_their_redrawn_crop_and_only_when_asked():
    from types import SimpleNamespace

    import cv2

    from wbc_batch.analysis import classify_cells
    from wbc_batch.preprocess import normalize_crops

    rgb, labels, boxes, bundle, crops = _two_cells()

    def sent(params, bundle=bundle):
        session = _Recorder()
        cells = classify_cells(rgb, labels.copy(), np.zeros_like(labels), boxes, session, bundle, params)
        assert [c.unusual_stain for c in cells] == [False, params.stain_check]
        return session.batches[0]

    asked = AnalysisParams(stain_normalise=True)
    assert np.array_equal(sent(asked), normalize_crops([crops[0], bundle.stain_target.redraw(crops[1])]))
    assert not np.array_equal(sent(asked), normalize_crops(crops))
    # not asked, no stain check, or a bundle without a target: every crop as cut
    no_target = SimpleNamespace(**{**vars(bundle), "stain_target": None})
    for params, b in ((AnalysisParams(), bundle), (AnalysisParams(stain_check=False, stain_normalise=True), bundle),
                      (asked, no_target), (AnalysisParams(stain_check=False, grey_unusual=True), bundle)):
        assert np.array_equal(sent(params, b), normalize_crops(crops))
    # --grey-unusual: the flagged cell's crop in grey, as training makes grey crops; the other
    # as cut; with or without a stain target
    luminance = cv2.cvtColor(cv2.cvtColor(crops[1], cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
    for b in (bundle, no_target):
        grey = sent(AnalysisParams(grey_unusual=True), b)
        assert np.array_equal(grey, normalize_crops([crops[0], luminance]))
        assert not np.array_equal(grey, normalize_crops(crops))


class _Answers:
    """A classifying session that keeps what it was given and answers each call with the next
    of `logits`."""

    def __init__(self, *logits):
        self.batches, self.logits = [], list(logits)

    def classify(self, batch):
        self.batches.append(batch.copy())
        return np.asarray(self.logits.pop(0), np.float32)


def test_blend_unusual_averages_a_flagged_cells_colour_and_grey_answers_and_leaves_the_others():
    from wbc_batch.analysis import _softmax, classify_cells
    from wbc_batch.preprocess import grey, normalize_crops

    rgb, labels, boxes, bundle, crops = _two_cells()
    colour = [[3.0, 0, 0, 0, 0], [2.0, 1.0, 0, 0, 0]]  # the flagged cell's colour: unsure
    grey_answer = [[0, 0, 4.0, 0, 0]]  # its grey crop: sure of another class

    def cells(params, *answers):
        session = _Answers(*answers)
        found = classify_cells(rgb, labels.copy(), np.zeros_like(labels), boxes, session, bundle, params)
        return found, session.batches

    plain, sent = cells(AnalysisParams(), colour)
    blended, sent_blend = cells(AnalysisParams(blend_unusual=True), colour, grey_answer)
    # the colour crops as without the option, then the flagged one alone, in grey
    assert len(sent) == 1 and np.array_equal(sent_blend[0], sent[0])
    assert np.array_equal(sent_blend[1], normalize_crops([grey(crops[1])]))
    assert blended[0] == plain[0]  # not flagged: untouched
    mean = (_softmax(np.array([colour[1]]), 1) + _softmax(np.array(grey_answer), 1)) / 2
    assert blended[1].probs == tuple(round(float(v), 6) for v in mean[0])
    assert (plain[1].cls, blended[1].cls) == ("neutrophil", "monocyte")  # the surer answer won
    assert blended[1].unusual_stain and blended[1].needs_review
    # without the stain check nothing is flagged, and no grey crop is classified
    unchecked, sent_unchecked = cells(AnalysisParams(stain_check=False, blend_unusual=True), colour)
    assert len(sent_unchecked) == 1 and not any(c.unusual_stain for c in unchecked)


def test_blend_unusual_classifies_a_monochrome_cameras_cells_once():
    from wbc_batch.analysis import classify_cells
    from wbc_batch.preprocess import grey

    rgb, labels, boxes, bundle, _ = _two_cells()
    mono = grey(rgb)  # R = G = B: every cell is flagged, and its grey crop is itself
    colour = [[3.0, 0, 0, 0, 0], [2.0, 1.0, 0, 0, 0]]
    found = {}
    for blend in (False, True):
        session = _Answers(colour)
        found[blend] = classify_cells(mono, labels.copy(), np.zeros_like(labels), boxes, session, bundle,
                                      AnalysisParams(blend_unusual=blend))
        assert len(session.batches) == 1 and session.logits == []
    assert found[True] == found[False] and all(c.unusual_stain for c in found[True])


@pytest.mark.parametrize("pair", [("grey_unusual", "stain_normalise"), ("blend_unusual", "stain_normalise"),
                                  ("blend_unusual", "grey_unusual")])
def test_the_python_api_refuses_two_changes_of_the_flagged_cells_at_once(pair):
    from wbc_batch.cli import FLAGGED_CELL_OPTIONS
    from wbc_batch.config import FLAGGED_CELL_SETTINGS, AnalysisParams, ConfigError

    assert list(FLAGGED_CELL_OPTIONS) == list(FLAGGED_CELL_SETTINGS)  # the command line refuses what the API does

    for on in (True, np.True_):  # NumPy's, as a script may pass, is refused too
        with pytest.raises(ConfigError, match="each change how the flagged cells are classified"):
            AnalysisParams(**dict.fromkeys(pair, on))
    AnalysisParams(**{pair[0]: True}, stain_check=False)  # flags nothing, so changes nothing


@pytest.mark.parametrize("option, refused", [
    ("--stain-normalise", (("--no-stain-check", "cannot be used with --no-stain-check"),)),
    ("--grey-unusual", (("--no-stain-check", "cannot be used with --no-stain-check"),
                        ("--stain-normalise", "each change how the flagged cells are classified: give one"))),
    ("--blend-unusual", (("--no-stain-check", "cannot be used with --no-stain-check"),
                         ("--stain-normalise", "each change how the flagged cells are classified: give one"),
                         ("--grey-unusual", "each change how the flagged cells are classified: give one")))])
def test_the_flagged_cells_options_are_run_options_recorded_in_run_json(invoke, tmp_path, fake_cli_args,
                                                                         option, refused):
    field = option[2:].replace("-", "_")
    write_image(tmp_path / "in" / "a.png", stained_field(np.random.default_rng(8), [(80, 70, 24)]))
    for args, expected in (((), False), ((option,), True)):
        out = tmp_path / f"out-{expected}"
        res = invoke("run", tmp_path / "in", "-o", out, *fake_cli_args, *args)
        assert res.exit_code == 0, res.output
        assert json.loads((out / "run.json").read_text())["parameters"]["analysis"][field] is expected
        # and report.xlsx's Summary sheet says so, for a report read without run.json
        sheet = load_workbook(out / "report.xlsx")["Summary"]
        facts = {row[0]: row[1] for row in sheet.iter_rows(min_col=1, max_col=2, values_only=True)}
        assert facts["other analysis settings not at their defaults"] == (
            f"{field} True" if expected else "none")
    for other, said in refused:
        res = invoke("run", tmp_path / "in", "-o", tmp_path / "both", *fake_cli_args, option, other)
        assert res.exit_code == 2 and said in res.output and option in res.output, res.output
        assert not (tmp_path / "both").exists()
