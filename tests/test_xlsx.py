"""report.xlsx read back with openpyxl: sheets, frozen header, filters, links, highlights, injection."""

from urllib.parse import quote

import pandas as pd
import pytest
from openpyxl import load_workbook

from wbc_batch import CLASSES
from wbc_batch.reports import CELL_COLUMNS, IMAGE_COLUMNS, SAMPLE_ALL, build_tables, differential_interval
from wbc_batch.results import CellResult, ImageResult
from wbc_batch_plugins.xlsx_writer import LINK_TEXT, XLSXWriter

#: a file named `=cmd|'/C calc'!A0.png`; its "/" makes "=cmd|'" a folder, hence a sample, too
EVIL = "=cmd|'/C calc'!A0.png"
EVIL_FILE = "+evil @x.jpg"


def cell(cid, cls, conf=0.95, review=False, unusual=False):
    probs = tuple(conf if c == cls else (1 - conf) / 4 for c in CLASSES)
    return CellResult(cid, cls, conf, probs, 10 * cid, 5, 30, 32, 700, 250, review, unusual)


def results():
    return [
        ImageResult("A/one.jpg", "ok", width=640, height=480, seconds=0.5,
                    cells=(cell(1, "neutrophil"), cell(2, "lymphocyte", 0.41, True))),
        ImageResult("A/with space é.png", "ok", width=64, height=48, cells=(cell(1, "monocyte"),)),
        ImageResult.failed("B/bad.jpg", "cannot decode: truncated JPEG"),
        ImageResult(EVIL, "ok", width=64, height=48, cells=(cell(1, "eosinophil", 0.6, True, True),)),
        ImageResult(EVIL_FILE, "ok", width=64, height=48, cells=(cell(1, "basophil"),)),
    ]


def write(tmp_path, res=None, **kw):
    tables = build_tables(results() if res is None else res, **kw)
    paths = XLSXWriter().write(tmp_path, tables)
    assert paths == [tmp_path / "report.xlsx"]
    return load_workbook(tmp_path / "report.xlsx"), tables


def header(ws, row=1):
    return [c.value for c in ws[row] if c.value is not None]


def test_sheets_and_tables(tmp_path):
    wb, tables = write(tmp_path)
    assert wb.sheetnames == ["Summary", "Images", "Cells", "Errors"]
    assert header(wb["Cells"]) == [*CELL_COLUMNS, LINK_TEXT]
    assert header(wb["Images"]) == [*IMAGE_COLUMNS, LINK_TEXT]
    assert header(wb["Errors"]) == ["image", "error"]
    assert wb["Cells"].max_row == 1 + len(tables.cells) == 6
    assert [c.value for c in wb["Errors"][2]] == ["B/bad.jpg", "cannot decode: truncated JPEG"]
    assert not [p for p in tmp_path.iterdir() if p.name != "report.xlsx"]  # no temp files left


@pytest.mark.parametrize("sheet", ["Images", "Cells", "Errors"])
def test_frozen_header_autofilter_and_widths(tmp_path, sheet):
    wb, _ = write(tmp_path)
    ws = wb[sheet]
    assert ws.freeze_panes == "B2"  # the header row and the image column
    assert ws.auto_filter.ref and ws.auto_filter.ref.startswith("A1:")
    assert ws.auto_filter.ref.endswith(str(ws.max_row))
    width_a = ws.column_dimensions["A"].width
    longest = max(len(str(c.value)) for c in ws["A"] if c.value is not None)
    assert width_a >= min(longest, 60)


def test_cells_rows_needing_review_are_highlighted(tmp_path):
    wb, tables = write(tmp_path)
    ws = wb["Cells"]
    col = CELL_COLUMNS.index("needs_review") + 1
    flagged = 0
    for r in range(2, ws.max_row + 1):
        review = ws.cell(r, col).value
        colours = {ws.cell(r, j).fill.fgColor.rgb for j in (1, 3, col)}
        fill_type = ws.cell(r, 1).fill.fill_type
        if review:
            flagged += 1
            assert fill_type == "solid" and len(colours) == 1 and colours.pop().endswith("FFE699")
        else:
            assert fill_type is None
    assert flagged == int(tables.cells["needs_review"].sum()) == 2


def test_failed_images_are_highlighted(tmp_path):
    wb, _ = write(tmp_path)
    ws = wb["Images"]
    for r in range(2, ws.max_row + 1):
        failed = ws.cell(r, 2).value == "error"
        assert (ws.cell(r, 1).fill.fill_type == "solid") == failed


def test_a_duplicate_is_shown_grey_and_not_counted_as_failed(tmp_path):
    # watch lists a byte-identical copy under its own name, counted once under the other
    res = [*results(), ImageResult.duplicate("B/copy.jpg", "duplicate of A/one.jpg")]
    wb, tables = write(tmp_path, res)
    assert list(tables.errors["image"]) == ["B/bad.jpg"]
    images = {ws_row[0].value: ws_row for ws_row in wb["Images"].iter_rows(min_row=2)}
    copy = images["B/copy.jpg"]
    assert copy[1].value == "duplicate" and copy[2].value == "duplicate of A/one.jpg"
    assert copy[0].fill.fgColor.rgb.endswith("D9D9D9")
    assert images["B/bad.jpg"][0].fill.fgColor.rgb.endswith("F8CBAD")
    assert [r[0].value for r in wb["Errors"].iter_rows(min_row=2)] == ["B/bad.jpg"]
    rows = list(wb["Summary"].iter_rows(values_only=True))
    head_i = next(i for i, r in enumerate(rows) if r and r[0] == "sample")
    body = {r[0]: r for r in rows[head_i + 1:head_i + 6] if r[0]}
    # images, failed, WBCs: the copy adds no cells, and is no image of its sample (its content
    # is counted under A/one.jpg's name, in A); before, B had 2 images for 1 analysed
    assert body[SAMPLE_ALL][1:4] == (5, 1, 5)
    assert body["B"][1:4] == (1, 1, 0)
    summary = tables.summary
    assert set(summary.loc[summary["sample"] == "B", "images"]) == {1}


def test_each_cell_links_to_its_overlay(tmp_path):
    wb, _ = write(tmp_path)
    ws = wb["Cells"]
    link_col = len(CELL_COLUMNS) + 1
    raw = ["A/one.jpg", "A/one.jpg", "A/with space é.png", EVIL, EVIL_FILE]
    for r, name in enumerate(raw, start=2):
        c = ws.cell(r, link_col)
        assert c.value == LINK_TEXT
        assert c.hyperlink is not None
        assert c.hyperlink.target == quote(f"overlays/{name}.png", safe="/")
        assert not c.hyperlink.target.startswith(("/", "file:", "http"))  # relative to the report
    assert ws.cell(4, link_col).hyperlink.target == "overlays/A/with%20space%20%C3%A9.png.png"
    images = wb["Images"]
    ilink = len(IMAGE_COLUMNS) + 1
    by_name = {images.cell(r, 1).value: images.cell(r, ilink) for r in range(2, images.max_row + 1)}
    assert by_name["B/bad.jpg"].hyperlink is None  # a failed image has no overlay
    assert by_name["A/one.jpg"].hyperlink.target == "overlays/A/one.jpg.png"


def test_no_links_when_overlays_were_not_saved(tmp_path):
    wb, _ = write(tmp_path, run_info={"save_overlays": False})
    ws = wb["Cells"]
    assert all(c.hyperlink is None for row in ws.iter_rows() for c in row)
    assert LINK_TEXT not in header(ws)


def test_formula_injection_is_neutralised(tmp_path):
    wb, _ = write(tmp_path)
    for ws in wb.worksheets:
        for row in ws.iter_rows():
            for c in row:
                assert c.data_type != "f", f"{ws.title}!{c.coordinate} is a formula: {c.value!r}"
                if isinstance(c.value, str):
                    assert not c.value.startswith(("=", "+", "-", "@", "\t", "\r")), c.value
    cells = [c.value for c in wb["Cells"]["A"]]
    assert "'" + EVIL in cells and "'" + EVIL_FILE in cells
    summary_samples = [c.value for c in wb["Summary"]["A"]]
    assert "'=cmd|'" in summary_samples


def test_names_xlsx_and_utf8_cannot_hold_are_written_escaped(tmp_path):
    # Linux allows control characters and non-UTF-8 bytes in file names; neither may stop the
    # report: they are escaped in the text, and the overlay link keeps the name's bytes
    latin1 = b"B/caf\xe9.png".decode("utf-8", "surrogateescape")
    res = [ImageResult("A/bad\x01name\ufffe\uffff.png", "ok", width=64, height=48,
                       cells=(cell(1, "monocyte"),)),
           ImageResult(latin1, "ok", width=64, height=48, cells=(cell(1, "basophil"),)),
           ImageResult.failed("A/x\x0b.jpg", "not an image file (\x00)")]
    wb, _ = write(tmp_path, res)
    assert [c.value for c in wb["Cells"]["A"]][1:] == ["A/bad\\x01name\\ufffe\\uffff.png",
                                                       "B/caf\\xe9.png"]
    assert wb["Errors"]["A2"].value == "A/x\\x0b.jpg" and wb["Errors"]["B2"].value == "not an image file (\\x00)"
    assert wb["Cells"].cell(3, len(CELL_COLUMNS) + 1).hyperlink.target == "overlays/B/caf%E9.png.png"


def test_a_sample_folder_named_all_keeps_its_own_row(tmp_path):
    res = [ImageResult("ALL/a.jpg", "ok", width=64, height=48, cells=(cell(1, "lymphocyte"),)),
           ImageResult("other/b.jpg", "ok", width=64, height=48,
                       cells=tuple(cell(i, "neutrophil") for i in range(1, 5)))]
    wb, tables = write(tmp_path, res)
    assert list(dict.fromkeys(tables.summary["sample"])) == [SAMPLE_ALL, "ALL/", "other"]
    rows = {r[0]: r[1:4] for r in wb["Summary"].iter_rows(values_only=True)
            if r[0] in (SAMPLE_ALL, "ALL/", "other")}
    assert rows == {SAMPLE_ALL: (2, 0, 5), "ALL/": (1, 0, 1), "other": (1, 0, 4)}  # images, failed, WBCs


def test_two_folders_shown_alike_keep_their_own_summary_rows(tmp_path):
    # `=S` is shown as `'=S`, as is a folder really named `'=S`: their numbers must not merge
    res = [ImageResult("=S/a.jpg", "ok", width=64, height=48, cells=(cell(1, "lymphocyte"),)),
           ImageResult("'=S/b.jpg", "ok", width=64, height=48,
                       cells=(cell(1, "neutrophil"), cell(2, "neutrophil"))),
           ImageResult("'=S/c.jpg", "ok", width=64, height=48, cells=())]
    wb, _ = write(tmp_path, res)
    rows = [r[:4] + (r[6], r[7]) for r in wb["Summary"].iter_rows(values_only=True)
            if r[0] in (SAMPLE_ALL, "'=S")]
    # sample, images, failed, WBCs, % neutrophil, % lymphocyte; raw "'=S" sorts before "=S"
    assert rows == [(SAMPLE_ALL, 3, 0, 3, pytest.approx(66.67), pytest.approx(33.33)),
                    ("'=S", 2, 0, 2, 100.0, 0.0), ("'=S", 1, 0, 1, 0.0, 100.0)]


def test_summary_sheet_table_and_chart(tmp_path):
    wb, tables = write(tmp_path, run_info={"version": "0.1.0", "backend": "onnx",
                                           "params": {"nested": "skipped"}})
    ws = wb["Summary"]
    rows = list(ws.iter_rows(values_only=True))
    head_i = next(i for i, r in enumerate(rows) if r and r[0] == "sample")
    head = [v for v in rows[head_i] if v is not None]
    assert head[:6] == ["sample", "images", "failed", "WBCs", "needs review", "unusual stain"]
    assert "Needing review = a cell whose top class probability is under" in ws["A2"].value
    assert head[6:11] == [f"% {c}" for c in CLASSES]
    body = {r[0]: r for r in rows[head_i + 1:head_i + 6] if r[0]}
    every = body[SAMPLE_ALL]
    assert every[1:6] == (5, 1, 5, 2, 1)  # images, failed, WBCs, needs review, unusual stain
    assert every[6] == pytest.approx(20.0)  # % neutrophil: 1 of 5
    a = body["A"]
    assert a[1:4] == (2, 0, 3) and a[11] == 1  # n neutrophil
    assert body["B"][1:4] == (1, 1, 0) and body["B"][6:11] == (None,) * 5  # no WBCs: no share
    assert sum(a[6:11]) == pytest.approx(100.0, abs=0.05)
    assert head[16:21] == [f"95% CI {c}" for c in CLASSES]
    assert every[16] == "3.6-62.4"  # 1 of 5 neutrophils: 20 %, and where that could lie
    assert every[16:21] == tuple(f"{lo:.1f}-{hi:.1f}" for lo, hi in
                                 (differential_interval(int(n), 5, decimals=1) for n in every[11:16]))
    assert len(ws._charts) == 1
    # the chart plots the five percentage columns, whatever columns come before them
    titles = [s.tx.strRef.f.split("!")[1].replace("$", "") for s in ws._charts[0].series]
    assert [ws[ref].value for ref in titles] == [f"% {c}" for c in CLASSES]
    facts = {r[0]: r[1] for r in rows if r and r[0] in ("version", "backend", "params")}
    assert facts == {"version": "0.1.0", "backend": "onnx"}


def test_accuracy_sheet_when_truth_given(tmp_path):
    acc = {"pixels": pd.DataFrame({"region": ["whole", "nucleus"], "iou": [0.97, 0.94]}),
           "confusion": pd.DataFrame({"true \\ predicted": ["neutrophil", "=x"], "neutrophil": [3, 1]})}
    wb, _ = write(tmp_path, accuracy=acc)
    assert wb.sheetnames[-1] == "Accuracy"
    values = [v for row in wb["Accuracy"].iter_rows(values_only=True) for v in row if v is not None]
    assert "pixels" in values and "confusion" in values and 0.97 in values and "'=x" in values


def test_empty_run_has_headers_only(tmp_path):
    wb, _ = write(tmp_path, res=[])
    assert wb.sheetnames == ["Summary", "Images", "Cells", "Errors"]
    assert header(wb["Cells"]) == [*CELL_COLUMNS, LINK_TEXT] and wb["Cells"].max_row == 1
    assert header(wb["Images"]) == [*IMAGE_COLUMNS, LINK_TEXT] and wb["Images"].max_row == 1
    assert wb["Errors"].max_row == 1
    assert len(wb["Summary"]._charts) == 0


def test_sheets_stay_within_excels_limits_and_the_summary_says_what_was_left_out(tmp_path, monkeypatch):
    # Excel's documented limits are 1,048,576 rows and 65,530 hyperlinks a sheet:
    # a watch folder's Cells sheet passes the link limit after some 65,000 cells
    import wbc_batch_plugins.xlsx_writer as xw

    monkeypatch.setattr(xw, "MAX_ROWS", 4)     # a header and 3 rows
    monkeypatch.setattr(xw, "MAX_LINKS", 2)
    wb, tables = write(tmp_path)
    assert len(tables.cells) == 5 and len(tables.images) == 5
    cells, images = wb["Cells"], wb["Images"]
    assert cells.max_row == 4 and images.max_row == 4
    link_col = len(CELL_COLUMNS) + 1
    assert [cells.cell(r, link_col).hyperlink is not None for r in (2, 3, 4)] == [True, True, False]
    notes = [wb["Summary"].cell(r, 1).value for r in (4, 5, 6)]
    assert notes == [
        "The Images sheet holds the first 3 of its 5 rows (Excel's limit); images.csv holds them all.",
        "The Cells sheet holds the first 3 of its 5 rows (Excel's limit); cells.csv holds them all.",
        "The Cells sheet links its first 2 rows to their overlays (Excel's limit per sheet); the "
        "rest are in the overlays folder."]
    assert header(wb["Summary"], 8)[0] == "sample"   # the table moves down below the notes
    # the legend and each note wrap over the table's first columns, not one line past its right
    merged = {str(r) for r in wb["Summary"].merged_cells.ranges}
    assert {r.split(":")[0] for r in merged} == {"A2", "A4", "A5", "A6"}
    for row in (2, 4, 5, 6):
        assert wb["Summary"].cell(row, 1).alignment.wrap_text
    assert wb["Summary"].row_dimensions[2].height > wb["Summary"].row_dimensions[4].height
