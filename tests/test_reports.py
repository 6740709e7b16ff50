"""Report tables and the csv writer: exact columns, counts, the summary, formula neutralisation."""

import csv
import re
from pathlib import Path

import pandas as pd
import pluggy
import pytest

from wbc_batch import CLASSES, hookspecs, reports
from wbc_batch.plugins import PluginError, get_report_writers
from wbc_batch.reports import (ACCURACY_COLUMNS, CELL_COLUMNS, ERROR_COLUMNS, IMAGE_COLUMNS,
                               SAMPLE_ALL, SAMPLE_TOP, SUMMARY_COLUMNS, ReportTables, ReportWriter,
                               accuracy_long, build_tables, differential_interval, neutralise,
                               overlay_name)
from wbc_batch.results import CellResult, ImageResult
from wbc_batch_plugins import csv_writer, xlsx_writer
from wbc_batch_plugins.csv_writer import CSVWriter

EVIL = "=cmd|'/C calc'!A0.png"


def cell(cid, cls, conf=0.95, review=False, unusual=False):
    probs = tuple(conf if c == cls else (1 - conf) / 4 for c in CLASSES)
    return CellResult(cell_id=cid, cls=cls, confidence=conf, probs=probs, x=10 * cid, y=5,
                      width=30, height=32, area_px=700, nucleus_area_px=250,
                      needs_review=review or unusual, unusual_stain=unusual)


def results():
    return [
        ImageResult("A/one.jpg", "ok", width=640, height=480, seconds=0.12345, diameter_px=96.04,
                    cells=(cell(1, "neutrophil"), cell(2, "lymphocyte", 0.51234567, True),
                           cell(3, "neutrophil", unusual=True))),
        ImageResult("A/two.png", "ok", width=640, height=480, cells=(cell(1, "monocyte"),)),
        ImageResult("B/three.tif", "ok", width=300, height=300, cells=()),
        ImageResult.failed("B/bad.jpg", "cannot decode: truncated JPEG", seconds=0.01),
        ImageResult("top.png", "ok", width=100, height=80, cells=(cell(1, "basophil"),)),
        ImageResult(EVIL, "ok", width=50, height=40, cells=(cell(1, "eosinophil"),)),
    ]


def read_csv(path: Path) -> list:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.reader(fh))


# --- neutralise ----------------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["=1+2", "+1", "-2", "@SUM(A1)", "\t=x", EVIL,
                                  "=HYPERLINK(\"http://x\")"])
def test_neutralise_prefixes_formula_starts(text):
    assert neutralise(text) == "'" + text


def test_a_carriage_return_is_escaped_visibly_as_xlsx_would_turn_it_into_a_line_feed():
    assert neutralise("\rfoo") == "\\x0dfoo" and neutralise("a\rb.png") == "a\\x0db.png"


@pytest.mark.parametrize("text", ["a=b", "plain.png", "sample_A/x.jpg", "", " x=1", "\uff1d1+2"])
def test_neutralise_leaves_plain_text(text):
    assert neutralise(text) == text


def test_neutralise_guards_a_formula_start_after_leading_spaces():
    # LibreOffice's "trim spaces" import starts the cell at the `=`
    assert neutralise(" =1+2") == "' =1+2" and neutralise("  @x") == "'  @x"


def test_neutralise_is_idempotent_and_handles_non_text():
    assert neutralise(neutralise("=x")) == "'=x"
    assert neutralise(None) == ""
    assert neutralise(float("nan")) == ""
    assert neutralise(-3) == "'-3"
    assert neutralise(12) == "12"


@pytest.mark.parametrize("name", ["=a.png", "+a.png", "-a.png", "@a.png", "\ta.png", "s;=b.png",
                                  "=x;@y;-z.png", "plain.png", "a;b.png", "'=quoted.png",
                                  " =a.png", "s; =b.png", "a\n=1+2.png", "a\n =b;@c.png"])
def test_unneutralised_gives_back_the_name_neutralise_and_the_csv_writer_guarded(name):
    # `--overwrite` finds the drawings of an earlier run's images.csv names by undoing both
    # guards: the core had copied the csv writer's semicolon rule, which could drift from it
    shown = csv_writer.guard_breaks(pd.DataFrame({"image": [neutralise(name)]}))["image"][0]
    assert name in reports.unneutralised(shown)
    # no cell a spreadsheet may start, at a break or after the spaces it may trim, is a formula
    for cell in re.split("[;\n]", shown):
        assert not cell.lstrip(" ").startswith(reports.FORMULA_START), shown


@pytest.mark.parametrize("raw, shown", [
    (b"s/caf\xe9.png".decode("utf-8", "surrogateescape"), "s/caf\\xe9.png"),  # Latin-1 bytes
    ("s/bad\x01name\x1f.png", "s/bad\\x01name\\x1f.png"),                    # control characters
    ("\x07=x", "\\x07=x"),
    ("s/血液 é\tok.png", "s/血液 é\tok.png"),                                   # valid text unchanged
])
def test_neutralise_escapes_what_utf8_and_xlsx_cannot_store(raw, shown):
    assert neutralise(raw) == shown
    neutralise(raw).encode("utf-8")  # storable as UTF-8


# --- tables --------------------------------------------------------------------------------------

def test_columns_are_exactly_the_contract():
    t = build_tables(results())
    assert list(t.cells.columns) == ["image", "cell_id", "class", "confidence", "prob_neutrophil",
                                     "prob_lymphocyte", "prob_monocyte", "prob_eosinophil",
                                     "prob_basophil", "x", "y", "width", "height", "area_px",
                                     "nucleus_area_px", "needs_review", "unusual_stain"]
    assert list(t.images.columns) == ["image", "status", "error", "wbc_count", "neutrophil",
                                      "lymphocyte", "monocyte", "eosinophil", "basophil",
                                      "needs_review_count", "unusual_stain_count", "width", "height",
                                      "wbc_diameter_px", "seconds"]
    assert list(t.summary.columns) == ["sample", "class", "count", "percent", "ci95_low", "ci95_high",
                                       "needs_review", "unusual_stain", "images", "images_failed",
                                       "complete"]
    assert list(t.errors.columns) == list(ERROR_COLUMNS)
    assert tuple(t.cells.columns) == CELL_COLUMNS and tuple(t.images.columns) == IMAGE_COLUMNS


def test_cells_and_images_rows():
    t = build_tables(results())
    assert len(t.cells) == 6
    first = t.cells.iloc[1]
    assert first["image"] == "A/one.jpg" and first["cell_id"] == 2 and first["class"] == "lymphocyte"
    assert first["confidence"] == pytest.approx(0.5123) and bool(first["needs_review"]) is True
    assert first["prob_lymphocyte"] == pytest.approx(0.5123)
    assert (first["x"], first["y"], first["width"], first["height"]) == (20, 5, 30, 32)
    assert t.cells["needs_review"].dtype == bool

    img = t.images.set_index("image")
    one = img.loc["A/one.jpg"]
    assert (one["wbc_count"], one["neutrophil"], one["lymphocyte"], one["needs_review_count"]) == (3, 2, 1, 2)
    assert one["unusual_stain_count"] == 1 and t.cells["unusual_stain"].tolist().count(True) == 1
    assert one["seconds"] == pytest.approx(0.123) and one["width"] == 640
    bad = img.loc["B/bad.jpg"]
    assert bad["status"] == "error" and bad["error"] == "cannot decode: truncated JPEG"
    assert pd.isna(bad["wbc_count"]) and pd.isna(bad["neutrophil"]) and pd.isna(bad["width"])
    assert img.loc["B/three.tif"]["wbc_count"] == 0
    assert list(t.errors["image"]) == ["B/bad.jpg"]
    # the scale the analysis worked at, so that a lab can see a wrong estimate (and set
    # --diameter); empty where none was found, and for failed images
    assert one["wbc_diameter_px"] == pytest.approx(96.0)
    assert pd.isna(img.loc["B/three.tif"]["wbc_diameter_px"]) and pd.isna(bad["wbc_diameter_px"])


def test_summary_whole_run_then_each_sample():
    t = build_tables(results())
    s = t.summary
    assert list(dict.fromkeys(s["sample"])) == [SAMPLE_ALL, SAMPLE_TOP, "'=cmd|'", "A", "B"]
    for sample, block in s.groupby("sample", sort=False):
        assert list(block["class"]) == list(CLASSES)
        if block["count"].sum():
            assert block["percent"].sum() == pytest.approx(100.0, abs=0.02)
    every = s[s["sample"] == SAMPLE_ALL].set_index("class")
    assert every.loc["neutrophil", "count"] == 2 and every.loc["neutrophil", "percent"] == pytest.approx(100 * 2 / 6, abs=0.01)
    a = s[s["sample"] == "A"].set_index("class")
    assert a.loc["neutrophil", "percent"] == 50.0 and a.loc["monocyte", "count"] == 1
    b = s[s["sample"] == "B"]
    assert b["count"].sum() == 0 and b["percent"].isna().all()  # no WBCs: no share, not 0 %
    # every share lies in its interval; a sample without WBCs has none
    counted = s[s["sample"] != "B"]
    assert (counted["ci95_low"] <= counted["percent"]).all()
    assert (counted["percent"] <= counted["ci95_high"]).all()
    assert b["ci95_low"].isna().all() and b["ci95_high"].isna().all()
    assert (every.loc["neutrophil", "ci95_low"], every.loc["neutrophil", "ci95_high"]) == (9.68, 70.0)
    assert a.loc["eosinophil", "ci95_low"] == 0.0 and a.loc["eosinophil", "ci95_high"] < 100.0


def test_summary_says_what_each_differential_rests_on():
    s = build_tables(results()).summary
    every = s[s["sample"] == SAMPLE_ALL].set_index("class")
    # A/one.jpg: a lymphocyte needs review, a neutrophil has an unusual stain (so needs review too)
    assert every["needs_review"].to_dict() == {"neutrophil": 1, "lymphocyte": 1, "monocyte": 0,
                                               "eosinophil": 0, "basophil": 0}
    assert every["unusual_stain"].to_dict()["neutrophil"] == 1 and every["unusual_stain"].sum() == 1
    assert set(every["images"]) == {6} and set(every["images_failed"]) == {1}
    b = s[s["sample"] == "B"]  # one image without WBCs, one failed: no differential, and why
    assert set(b["images"]) == {2} and set(b["images_failed"]) == {1}
    a = s[s["sample"] == "A"]
    assert set(a["images"]) == {2} and set(a["images_failed"]) == {0}
    assert a["needs_review"].sum() == 2


def test_differential_interval_in_percent():
    assert differential_interval(2, 6) == (9.68, 70.0)  # 2 of 6 cells: 33 %, from 9.7 to 70 %
    assert differential_interval(1, 5, decimals=1) == (3.6, 62.4)
    assert differential_interval(0, 19)[0] == 0.0 and differential_interval(19, 19)[1] == 100.0
    assert all(v != v for v in differential_interval(0, 0))  # no cells: no interval (nan)


def test_text_from_names_and_errors_is_neutralised():
    res = [ImageResult(EVIL, "ok", width=5, height=5, cells=(cell(1, "basophil"),)),
           ImageResult.failed("@bad.png", "-oops =x")]
    t = build_tables(res)
    assert t.cells["image"][0] == "'" + EVIL
    assert list(t.images["image"]) == ["'" + EVIL, "'@bad.png"]
    assert t.errors["error"][0] == "'-oops =x"
    assert "'=cmd|'" in set(t.summary["sample"])
    # links keep the raw name: they name a file, they are not a cell's text
    assert t.overlay_links == [overlay_name(EVIL)] and t.image_overlay_links == [overlay_name(EVIL), None]


def test_empty_run_has_headers_only(tmp_path):
    t = build_tables([])
    for df in (t.cells, t.images, t.summary, t.errors):
        assert len(df) == 0
    written = CSVWriter().write(tmp_path, t)
    assert sorted(p.name for p in written) == ["cells.csv", "images.csv", "summary.csv"]
    assert read_csv(tmp_path / "cells.csv") == [list(CELL_COLUMNS)]
    assert read_csv(tmp_path / "images.csv") == [list(IMAGE_COLUMNS)]
    assert read_csv(tmp_path / "summary.csv") == [list(SUMMARY_COLUMNS)]


def test_all_failed_run_has_zero_differential():
    t = build_tables([ImageResult.failed("x/a.png", "zero-byte file")])
    assert set(t.summary["sample"]) == {SAMPLE_ALL, "x"}
    assert t.summary["count"].sum() == 0


# --- csv writer ----------------------------------------------------------------------------------

def test_csv_writer_round_trip(tmp_path):
    t = build_tables(results(), run_info={"version": "0.1.0"})
    written = CSVWriter().write(tmp_path, t)
    assert [p.name for p in written] == ["cells.csv", "images.csv", "summary.csv"]
    cells = pd.read_csv(tmp_path / "cells.csv")
    assert list(cells.columns) == list(CELL_COLUMNS) and len(cells) == 6
    assert cells["needs_review"].tolist().count(True) == 2 and cells["unusual_stain"].tolist().count(True) == 1
    rows = read_csv(tmp_path / "images.csv")
    bad = next(r for r in rows if r[0] == "B/bad.jpg")
    assert bad[1:4] == ["error", "cannot decode: truncated JPEG", ""]  # unknown, not zero
    assert any(r[0] == "'" + EVIL for r in rows)
    assert not any(r[0].startswith(("=", "+", "-", "@")) for r in rows)
    summary = pd.read_csv(tmp_path / "summary.csv", keep_default_na=False)
    assert summary["sample"].iloc[0] == SAMPLE_ALL and len(summary) == 5 * 5
    assert not (tmp_path / "accuracy.csv").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cells.csv", "images.csv", "summary.csv"]


def test_csv_cells_split_at_semicolons_start_no_formula(tmp_path):
    # where Excel's list separator is ";", a comma-separated file is split at semicolons
    res = [ImageResult("P1;=1+2/f;-3+4.jpg", "ok", width=64, height=48, seconds=0.5,
                       cells=(cell(1, "neutrophil"),)),
           ImageResult.failed("P1;=1+2/g.jpg", "cannot read ;@SUM(A1)")]
    CSVWriter().write(tmp_path, build_tables(res))
    for name in ("cells.csv", "images.csv", "summary.csv"):
        text = (tmp_path / name).read_text(encoding="utf-8")
        for line in text.splitlines():
            for field in csv.reader([line], delimiter=";"):
                assert not any(f.startswith(("=", "+", "-", "@")) for f in field[1:]), (name, field)
    rows = read_csv(tmp_path / "images.csv")
    assert [r[0] for r in rows[1:]] == ["P1;'=1+2/f;'-3+4.jpg", "P1;'=1+2/g.jpg"]
    assert rows[2][2] == "cannot read ;'@SUM(A1)"
    assert read_csv(tmp_path / "cells.csv")[1][1:3] == ["1", "neutrophil"]  # numbers untouched


def test_csv_writer_replaces_old_files_whole(tmp_path):
    (tmp_path / "cells.csv").write_text("old,stuff\n" * 1000)
    CSVWriter().write(tmp_path, build_tables([]))
    assert (tmp_path / "cells.csv").read_text().strip() == ",".join(CELL_COLUMNS)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def accuracy_example():
    return {
        "summary": pd.DataFrame({"section": ["pixels_whole", "classes", "run"],
                                 "metric": ["iou", "accuracy", "images"],
                                 "value": pd.Series([0.965, 0.9, 6], dtype=object),  # as metrics builds it
                                 "n": [22, 10, None]}),
        "pixels": pd.DataFrame({"region": ["whole", "nucleus"], "tp": [100, 40], "iou": [0.96, 0.93]}),
        "confusion": pd.DataFrame({"true \\ predicted": ["neutrophil", "=evil"],
                                   "neutrophil": [3, 0], "lymphocyte": [1, 2]}),
        "calibration": pd.DataFrame({"lower": [0.0, 0.5], "upper": [0.5, 1.0], "cells": [1, 4]}),
        "detection": pd.DataFrame([{"images": 2, "recall": 0.97, "precision": 0.95}]),
    }


def test_accuracy_long_form():
    long = accuracy_long(build_tables([], accuracy=accuracy_example()).accuracy)
    assert list(long.columns) == list(ACCURACY_COLUMNS)

    def value(section, scope, metric):
        sel = long[(long.section == section) & (long.scope == scope) & (long.metric == metric)]
        assert len(sel) == 1, (section, scope, metric)
        return sel.iloc[0]

    row = value("summary", "pixels_whole", "iou")
    assert row["value"] == 0.965 and row["n"] == 22
    assert value("pixels", "nucleus", "iou")["value"] == 0.93
    assert value("confusion", "neutrophil", "lymphocyte")["value"] == 1
    assert value("confusion", "'=evil", "lymphocyte")["value"] == 2
    assert value("calibration", "lower=0.5", "cells")["value"] == 4
    assert value("detection", "all", "recall")["value"] == 0.97
    assert pd.isna(value("pixels", "whole", "tp")["n"])


def test_csv_writer_adds_accuracy_csv(tmp_path):
    t = build_tables(results(), accuracy=accuracy_example())
    written = CSVWriter().write(tmp_path, t)
    assert written[-1].name == "accuracy.csv"
    rows = read_csv(tmp_path / "accuracy.csv")
    assert rows[0] == list(ACCURACY_COLUMNS)
    assert ["confusion", "neutrophil", "neutrophil", "3", ""] in rows
    assert ["summary", "run", "images", "6", ""] in rows  # a count stays a whole number
    assert not any(c.startswith("=") for r in rows for c in r)


# --- plugin registration -------------------------------------------------------------------------

def test_writers_register_through_the_hook():
    pm = pluggy.PluginManager("wbc_batch")
    pm.add_hookspecs(hookspecs)
    pm.register(csv_writer, "csv")
    pm.register(xlsx_writer, "xlsx")
    pm.check_pending()
    writers = get_report_writers(pm)
    assert sorted(writers) == ["csv", "xlsx"]
    assert all(isinstance(w, ReportWriter) for w in writers.values())


def test_duplicate_writer_names_are_refused():
    class Twin:
        @hookspecs.hookimpl
        def wbc_register_report_writers(self):
            return [CSVWriter()]

    pm = pluggy.PluginManager("wbc_batch")
    pm.add_hookspecs(hookspecs)
    pm.register(csv_writer, "csv")
    pm.register(Twin())
    with pytest.raises(PluginError, match="csv"):
        get_report_writers(pm)


def test_report_tables_is_plain_data():
    t = build_tables(results(), run_info={"backend": "torch"})
    assert isinstance(t, ReportTables) and t.run_info == {"backend": "torch"} and t.accuracy == {}
    assert len(t.overlay_links) == len(t.cells) and len(t.image_overlay_links) == len(t.images)
    assert t.overlay_links[0] == "overlays/A/one.jpg.png"


def test_failed_image_lines_escape_what_a_terminal_would_act_on():
    """A file name may hold a carriage return, a line feed or an escape sequence: on the
    terminal they overwrote the name, split the line or coloured it. They are escaped as the
    reports escape them (a byte not UTF-8 as `\\xe9`, as in images.csv)."""
    from wbc_batch.results import failure_lines

    lines = failure_lines([("=S/bad\rname\x1b[31mRED.jpg", "empty file"),
                           ("caf\udce9\n\tb.png", "not an image (\x9b2J)")])
    assert lines == ["  failed: =S/bad\\x0dname\\x1b[31mRED.jpg: empty file",
                     "  failed: caf\\xe9\\x0a\\x09b.png: not an image (\\x9b2J)"]
    assert failure_lines([("a.png", "x")] * 12)[-1] == "  ... and 2 more (see images.csv)"


def test_the_report_size_benchmark_times_every_writer_on_the_results_it_makes(capsys):
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "report_size.py"
    spec = importlib.util.spec_from_file_location("report_size", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    results = bench.synthetic_results(4, 3)
    assert [len(r.cells) for r in results] == [3] * 4 and len({r.image for r in results}) == 4
    assert bench.main(["--images", "4", "--cells", "3"]) == 0
    line = capsys.readouterr().out.strip()
    assert re.fullmatch(r"4 images, 12 cells: csv [\d.]+ s  xlsx [\d.]+ s  \(report\.xlsx [\d.]+ MiB\)",
                        line), line
