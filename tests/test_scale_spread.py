"""A wide spread of the WBC sizes estimated in one run is said: on the terminal, in run.json and
at the top of report.xlsx's Summary sheet; a narrow one, or a size given, says nothing."""

import json
from dataclasses import replace

import pytest

from conftest import draw_field, write_image
from wbc_batch import scale_spread
from wbc_batch.results import CellResult, ImageResult


def results(*sizes, ok=True, flagged=False):
    """ImageResults of those sizes, each with one cell, flagged `needs_review` or not."""
    return [ImageResult(f"{i}.png", "ok" if ok else "error", diameter_px=float(s),
                        cells=(cell(flagged),)) for i, s in enumerate(sizes)]


def cell(flagged: bool) -> CellResult:
    return CellResult(1, "neutrophil", 0.5 if flagged else 0.95, (0.2,) * 5, 0, 0, 9, 9, 60, 20,
                      needs_review=flagged)


def test_the_spread_is_the_95th_over_the_5th_percentile_of_the_sizes_estimated():
    spread = scale_spread.measure(results(*[100] * 19, 300) + results(0) + results(10, ok=False), None)
    assert spread == {"images": 20, "p5_px": 100.0, "median_px": 100.0, "p95_px": 110.0,
                      "ratio": 1.1, "wide": False, "suggested_px": 100.0}
    assert scale_spread.measure(results(*[100] * 9, 103, *[120] * 10), None)["median_px"] == 111.5
    wide = scale_spread.measure(results(*[40] * 5, *[200] * 5), None)
    assert wide["ratio"] == 5.0 and wide["wide"]
    assert "40 to 200 px" in scale_spread.advice(wide) and "--diameter" in scale_spread.advice(wide)
    assert scale_spread.advice(spread) is None and scale_spread.advice(None) is None


def test_the_size_suggested_is_the_median_of_the_images_with_a_cell_not_flagged():
    # fields without a WBC: their (false) cells flagged, their sizes far too small
    empty = results(30, 35, 40, 45, 50, 55, flagged=True)
    sizes = results(150, 160, 170, 175, 180, 182.6, 190, 200, 220, 240) + empty
    none = [ImageResult("glass.png", "ok", diameter_px=60.0)]         # no cell: says nothing
    failed = results(20, ok=False)
    spread = scale_spread.measure(sizes + none + failed, None)
    assert spread["wide"] and spread["suggested_px"] == 181.0       # rounded to a pixel
    one_flagged = [ImageResult("two.png", "ok", diameter_px=186.0, cells=(cell(True), cell(False)))]
    assert scale_spread.suggest(sizes + one_flagged) == 183.0       # one cell not flagged is enough
    advice = scale_spread.advice(spread)
    assert advice.endswith("If so, try --diameter 181: the median size of the images holding a "
                           "cell not flagged needs_review (cells.csv).")


def test_too_few_images_with_a_cell_not_flagged_suggest_no_size():
    spread = scale_spread.measure(results(*range(160, 250, 10))
                                  + results(*range(30, 90, 10), flagged=True), None)
    assert spread["wide"] and spread["suggested_px"] is None        # 9 < MIN_IMAGES
    advice = scale_spread.advice(spread)
    assert "--diameter" in advice and "try --diameter" not in advice
    assert scale_spread.suggest(results(*range(160, 260, 10))) == 205.0
    assert scale_spread.suggest(results(*range(160, 260, 10), float("inf"))) == 205.0  # left out


def test_no_size_is_suggested_where_the_images_with_a_cell_not_flagged_spread_widely():
    """Fields without a WBC whose false cells were classified with confidence: in a folder of
    such fields, their sizes scatter as the run's do (docs/EXPERIMENTS.md)."""
    scattered = results(30, 40, 52, 60, 80, 100, 130, 170, 200, 216)
    spread = scale_spread.measure(scattered + results(*[45] * 40, flagged=True), None)
    assert spread["wide"] and spread["suggested_px"] is None
    # the same sizes, narrower than the bar among those not flagged, do suggest one
    assert scale_spread.suggest(results(*[100] * 5, *[228] * 5)) == 164.0
    assert scale_spread.suggest(results(*[100] * 5, *[230] * 5)) is None


def test_the_ratio_is_judged_as_run_json_records_it():
    spread = scale_spread.measure(results(*[100] * 10, *[229.96] * 10), None)
    assert spread["ratio"] == 2.3 and spread["wide"]


def test_no_spread_is_judged_for_a_size_given_or_too_few_images():
    assert scale_spread.measure(results(*[40] * 5, *[200] * 5), 120.0) is None
    assert scale_spread.measure(results(*[40] * 4, *[200] * 5), None) is None   # 9 < MIN_IMAGES


def test_the_bar_sits_between_the_spread_of_one_microscope_and_that_of_empty_fields():
    """The bar (docs/EXPERIMENTS.md): sizes a factor of 2 apart pass, a factor of 2.5 not; and
    one field in ten with a far smaller size is caught."""
    assert not scale_spread.measure(results(*[100] * 5, *[200] * 5), None)["wide"]
    assert scale_spread.measure(results(*[80] * 5, *[200] * 5), None)["wide"]
    assert scale_spread.measure(results(*[180] * 18, 50, 60), None)["wide"]


@pytest.fixture
def mixed_sizes(tmp_path):
    """Twelve fields, six with WBCs 24 px across and six with WBCs 96 px across (each at its own
    place: `watch` counts byte-identical copies once)."""
    folder = tmp_path / "in"
    for i in range(6):
        write_image(folder / f"small_{i}.png", draw_field(160, 160, [(70 + 4 * i, 80, 12)]))
        write_image(folder / f"large_{i}.png", draw_field(160, 160, [(70 + 4 * i, 80, 48)]))
    return folder


def test_a_run_whose_sizes_spread_widely_says_so_everywhere(invoke, mixed_sizes, tmp_path, fake_cli_args):
    from openpyxl import load_workbook

    out = tmp_path / "out"
    res = invoke("run", mixed_sizes, "-o", out, *fake_cli_args)
    assert res.exit_code == 0, res.output
    assert "The WBC sizes estimated per image spread widely" in res.stderr
    spread = json.loads((out / "run.json").read_text(encoding="utf-8"))["scale_spread"]
    assert spread["images"] == 12 and spread["wide"] and spread["ratio"] >= 3
    # the fake backend flags no cell, so the images a size would rest on spread as widely
    assert spread["suggested_px"] is None and "try --diameter" not in res.stderr
    summary = load_workbook(out / "report.xlsx")["Summary"]
    assert summary["A4"].value.startswith("The WBC sizes estimated per image spread widely")
    facts = [summary.cell(row=r, column=1).value for r in range(1, summary.max_row + 1)]
    assert scale_spread.WARNING_FACT not in facts      # on top, not again among the run's facts
    assert "WBC sizes estimated, 5th to 95th percentile (px)" in facts


def test_a_size_given_or_sizes_that_agree_say_nothing(invoke, mixed_sizes, tmp_path, fake_cli_args):
    from openpyxl import load_workbook

    res = invoke("run", mixed_sizes, "-o", tmp_path / "given", "--diameter", "40", *fake_cli_args)
    assert res.exit_code == 0 and "spread widely" not in res.stderr
    assert json.loads((tmp_path / "given" / "run.json").read_text(encoding="utf-8"))["scale_spread"] is None
    for f in mixed_sizes.glob("small_*"):
        f.unlink()
    for i in range(6):
        write_image(mixed_sizes / f"more_{i}.png", draw_field(160, 160, [(70 + 4 * i, 80, 44)]))
    res = invoke("run", mixed_sizes, "-o", tmp_path / "agree", *fake_cli_args)
    assert res.exit_code == 0 and "spread widely" not in res.stderr
    spread = json.loads((tmp_path / "agree" / "run.json").read_text(encoding="utf-8"))["scale_spread"]
    assert spread["images"] == 12 and not spread["wide"]
    summary = load_workbook(tmp_path / "agree" / "report.xlsx")["Summary"]
    assert summary["A4"].value == "sample"                # the table right under the title lines
    assert not any("spread widely" in str(c.value) for c in summary["A"])


def test_a_run_names_the_size_its_images_with_a_cell_not_flagged_agree_on(
        invoke, mixed_sizes, tmp_path, fake_cli_args, monkeypatch):
    """Through the whole run: the cells of the small fields flagged, as the false cells of
    fields without a WBC mostly are; the large fields' size is named in every place."""
    from openpyxl import load_workbook

    from wbc_batch import analysis

    analyze = analysis.analyze

    def flagging_small(rgb, *args, **kwargs):
        found = analyze(rgb, *args, **kwargs)
        if found.diameter_px < 50:
            found.cells = [replace(c, needs_review=True) for c in found.cells]
        return found

    monkeypatch.setattr(analysis, "analyze", flagging_small)  # as the pipeline calls it
    for i in range(6, 12):
        write_image(mixed_sizes / f"large_{i}.png", draw_field(160, 160, [(60 + 4 * i, 80, 48)]))
    out = tmp_path / "out"
    res = invoke("run", mixed_sizes, "-o", out, *fake_cli_args)
    assert res.exit_code == 0, res.output
    spread = json.loads((out / "run.json").read_text(encoding="utf-8"))["scale_spread"]
    size = spread["suggested_px"]
    assert spread["wide"] and spread["images"] == 18 and 80 < size < 110
    line = f"If so, try --diameter {size:.0f}: the median size"
    assert line in res.stderr
    assert line in load_workbook(out / "report.xlsx")["Summary"]["A4"].value


def test_watch_once_says_it_too(invoke, mixed_sizes, tmp_path, fake_cli_args):
    """A scanner that saves every field is often emptied by `watch --once` from cron."""
    res = invoke("watch", mixed_sizes, "-o", tmp_path / "watched", "--once", *fake_cli_args)
    assert res.exit_code == 0, res.output
    # once, in the closing lines (a continuous watch says it as the reports are rebuilt)
    assert res.stderr.count("The WBC sizes estimated per image spread widely") == 1
