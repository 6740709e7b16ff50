"""The "xlsx" report writer: report.xlsx, for people.

Sheets:

- Summary: the differential per sample (ALL = the whole run first, then each sample): images,
  failed images, WBCs, cells needing review, percent, count and 95 % interval of each class
  (summary.csv's `ci95_low`-`ci95_high`, as text); a stacked bar chart
  of the percentages; below, the run's facts (version, backend, ...) from `run_info`.
- Images: one row per input file (images.csv's columns) plus a link to its overlay; failed images
  highlighted red, duplicates (a copy of a file counted under another name) grey.
- Cells: one row per WBC (cells.csv's columns) plus a link to its image's overlay; rows that need
  review (low confidence) highlighted amber.
- Errors: the images that failed and why.
- Accuracy (only with ground truth): each accuracy table under its name.

Every table sheet has a frozen header row and image column, and an autofilter; columns are sized
to their content.
Overlay links are relative (`overlays/<image>.png`, URL-quoted), so they work when the output
folder is moved or shared as a whole. The workbook is written atomically.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from urllib.parse import quote

import pandas as pd
from openpyxl import Workbook
from openpyxl.chart import BarChart, Reference
from openpyxl.styles import Alignment, Font, PatternFill
from openpyxl.utils import get_column_letter

from wbc_batch import CLASSES
from wbc_batch.atomic import atomic_write_bytes
from wbc_batch.hookspecs import hookimpl
from wbc_batch.reports import SAMPLE_ALL, ReportTables, differential_interval, neutralise
from wbc_batch.results import NOT_ANALYSED_FACT, NOT_FINISHED_FACT
from wbc_batch.scale_spread import WARNING_FACT

REVIEW_FILL = PatternFill("solid", fgColor="FFE699")   # amber: a cell needs a human look
ERROR_FILL = PatternFill("solid", fgColor="F8CBAD")    # red: the image failed
DUPLICATE_FILL = PatternFill("solid", fgColor="D9D9D9")  # grey: counted under another name
HEADER_FILL = PatternFill("solid", fgColor="D9E1F2")
HEADER_FONT = Font(bold=True)
TITLE_FONT = Font(bold=True, size=14)
WARNING_FONT = Font(bold=True, color="9C0006")
LINK_TEXT = "overlay"
#: the Summary table's "complete" for a sample a stop (or a watch report with files to do) left
#: with images not analysed
PARTIAL = "no: partial"
#: Excel's documented limits per worksheet: rows, and hyperlinks
MAX_ROWS = 1_048_576
MAX_LINKS = 65_530
MIN_WIDTH, MAX_WIDTH = 6, 60
#: the Summary sheet's notes wrap at about this many characters; a line is this many points high
NOTE_WIDTH, LINE_HEIGHT = 110, 15
#: rows looked at when sizing a column (the header always counts)
WIDTH_SAMPLE_ROWS = 500

NUMBER_FORMATS = {"confidence": "0.0000", "seconds": "0.000", "percent": "0.0",
                  "wbc_diameter_px": "0.0",
                  **{f"prob_{c}": "0.0000" for c in CLASSES}}  # as cells.csv has them


def _plain(value):
    """A value openpyxl can store: NA -> None, numpy scalars -> Python, text neutralised."""
    if value is None:
        return None
    try:
        if pd.isna(value):
            return None
    except (TypeError, ValueError):
        pass
    if isinstance(value, str):
        return neutralise(value)
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and math.isinf(value):
        return str(value)
    return value


def link_target(rel: str) -> str:
    """The hyperlink target of a file relative to the output folder (URL-quoted, `/` kept).

    A name's bytes that are not UTF-8 (kept by Python as lone surrogates) are quoted as the bytes
    they are on disk."""
    return quote(rel, safe="/", errors="surrogateescape")


def _header(ws, row: int, names, col: int = 1) -> None:
    for j, name in enumerate(names, start=col):
        cell = ws.cell(row=row, column=j, value=_plain(str(name)))
        cell.font = HEADER_FONT
        cell.fill = HEADER_FILL
        cell.alignment = Alignment(vertical="center")


def _fit_columns(ws, widths: dict) -> None:
    for col, width in widths.items():
        ws.column_dimensions[get_column_letter(col)].width = max(MIN_WIDTH, min(MAX_WIDTH, width + 2))


def _measure(widths: dict, col: int, value) -> None:
    if value is None:
        return
    text = f"{value:.3f}" if isinstance(value, float) else str(value)
    widths[col] = max(widths.get(col, 0), len(text))


def _write_table(ws, df: pd.DataFrame, start_row: int = 1, links=None, fills=None,
                 widths=None, filter_and_freeze=True, float_format=None) -> int:
    """Write `df` with a header at `start_row`; returns the next free row.

    links: per data row, a file relative to the output folder (or None) for an extra "overlay"
    column; fills: per data row, a PatternFill (or None) for the whole row; float_format: the
    number format of floats in columns without one of their own.
    """
    widths = {} if widths is None else widths
    columns = [str(c) for c in df.columns]
    names = columns + ([LINK_TEXT] if links is not None else [])
    _header(ws, start_row, names)
    for j, name in enumerate(names, start=1):
        _measure(widths, j, name)
    formats = [NUMBER_FORMATS.get(c, float_format) for c in columns]
    ncols = len(names)
    for i, values in enumerate(df.itertuples(index=False, name=None)):
        r = start_row + 1 + i
        for j, value in enumerate(values, start=1):
            cell = ws.cell(row=r, column=j, value=_plain(value))
            if formats[j - 1] and isinstance(cell.value, float):
                cell.number_format = formats[j - 1]
            if i < WIDTH_SAMPLE_ROWS:
                _measure(widths, j, cell.value)
        if links is not None and links[i]:
            cell = ws.cell(row=r, column=ncols, value=LINK_TEXT)
            cell.hyperlink = link_target(links[i])
            cell.style = "Hyperlink"
        fill = fills[i] if fills is not None else None
        if fill is not None:
            for j in range(1, ncols + 1):
                ws.cell(row=r, column=j).fill = fill
    end = start_row + len(df)
    if filter_and_freeze:
        # the header and the first column (the image) stay in view while scrolling
        ws.freeze_panes = ws.cell(row=start_row + 1, column=2)
        ws.auto_filter.ref = f"A{start_row}:{get_column_letter(ncols)}{max(end, start_row)}"
    _fit_columns(ws, widths)
    return end + 1


def _sample_blocks(summary: pd.DataFrame):
    """The blocks of summary.csv, the run's, then one per sample, told apart by position (each
    starts with the first class), not by the names shown: two folders such as `=S` and `'=S`
    are both shown as `'=S`, and must not merge."""
    starts = [i for i, c in enumerate(summary["class"]) if c == CLASSES[0]] + [len(summary)]
    return [summary.iloc[a:b] for a, b in zip(starts, starts[1:])]


def _summary_wide(tables: ReportTables) -> pd.DataFrame:
    """One row per sample: images, failed, WBCs, needs review, of them for an unusual stain,
    % and count per class, their intervals, and whether every image found was analysed."""
    rows = []
    for block in _sample_blocks(tables.summary):
        counts = dict(zip(block["class"], block["count"]))
        pcts = dict(zip(block["class"], block["percent"]))
        total = int(sum(counts.values()))
        first = block.iloc[0]
        rows.append([first["sample"], int(first["images"]), int(first["images_failed"]), total,
                     int(block["needs_review"].sum()), int(block["unusual_stain"].sum()),
                     *(float(pcts.get(c, 0.0)) for c in CLASSES),
                     *(int(counts.get(c, 0)) for c in CLASSES),
                     *(_interval_text(int(counts.get(c, 0)), total) for c in CLASSES),
                     "yes" if bool(first.get("complete", True)) else PARTIAL])
    columns = ["sample", "images", "failed", "WBCs", "needs review", "unusual stain",
               *(f"% {c}" for c in CLASSES), *(f"n {c}" for c in CLASSES),
               *(f"95% CI {c}" for c in CLASSES), "complete"]
    return pd.DataFrame(rows, columns=columns)


def _interval_text(count: int, total: int) -> str:
    """'9.7-70.0': the 95 % interval of count / total in percent (summary.csv's ci95_low and
    ci95_high, to one decimal, from the counts, so not rounded twice); empty with no WBCs."""
    if total <= 0:
        return ""
    low, high = differential_interval(count, total, decimals=1)
    return f"{low:.1f}-{high:.1f}"


def _analysed(info: dict):
    """The images a report's counts cover, as the Summary's `images` column counts them: those
    finished, but the duplicates (analysed under their first name, counted there)."""
    images = info.get("images")
    if not isinstance(images, int):
        return "?"
    return images - int(info.get("duplicates (counted under their first name)") or 0)


def _summary_sheet(ws, tables: ReportTables, notes=()) -> None:
    ws.title = "Summary"
    ws["A1"] = "WBC differential"
    ws["A1"].font = TITLE_FONT
    ws["A2"] = (f"{SAMPLE_ALL} = the whole run; other rows are samples (first-level subfolders of "
                "the input folder, '.' = images at its top). % = share of the sample's WBCs, each "
                "rounded on its own, so a row may add up to a little more or less than 100; "
                "95% CI = where that share could lie from counting so few cells alone (Wilson "
                "interval; classification errors come on top). Needing review = a cell whose top "
                "class probability is under the review threshold (Run block), or whose stain is "
                "unusual: look at it (highlighted on the Cells sheet).")
    ws["A2"].font = Font(italic=True)
    info = tables.run_info or {}
    analysed = _analysed(info)
    if info.get("interrupted"):  # a partial differential must not read as a whole one
        found = info.get("images found")
        of = f" of the {found}" if found is not None else ""
        partial = info.get(NOT_FINISHED_FACT)
        ws["A3"] = (f"INTERRUPTED: {analysed}{of} images were analysed; the "
                    "counts and percentages cover those only"
                    + (f". Samples not finished: {partial}." if partial else "."))
        ws["A3"].font = WARNING_FONT
    elif info.get(NOT_ANALYSED_FACT):  # a watch session's report, written with files to go
        partial = info.get(NOT_FINISHED_FACT)
        ws["A3"] = (f"NOT FINISHED: {info[NOT_ANALYSED_FACT]} file(s) found in the inbox were "
                    f"not analysed yet when this report was written; the counts and "
                    f"percentages cover the {analysed} images analysed"
                    + (f". Samples not finished: {partial}." if partial else "."))
        ws["A3"].font = WARNING_FONT
    for i, note in enumerate(notes):  # a wide spread of WBC sizes; what Excel's limits left out
        ws.cell(row=4 + i, column=1, value=note).font = WARNING_FONT
    wide = _summary_wide(tables)
    widths = {}
    top = 4 + (len(notes) + 1 if notes else 0)
    end = _write_table(ws, wide, start_row=top, widths=widths, filter_and_freeze=False)
    first_pct = list(wide.columns).index(f"% {CLASSES[0]}") + 1  # the percentages' first column
    for r in range(top + 1, top + 1 + len(wide)):
        for j in range(first_pct, first_pct + len(CLASSES)):
            ws.cell(row=r, column=j).number_format = "0.0"
        if ws.cell(row=r, column=1).value == SAMPLE_ALL:
            for j in range(1, len(wide.columns) + 1):
                ws.cell(row=r, column=j).font = HEADER_FONT
        if ws.cell(row=r, column=len(wide.columns)).value == PARTIAL:  # a stop left it partial
            for j in (1, len(wide.columns)):
                ws.cell(row=r, column=j).font = WARNING_FONT
    ws.freeze_panes = ws.cell(row=top + 1, column=2)
    next_row = end + 1
    if len(wide):
        chart = BarChart()
        chart.type = "bar"
        chart.grouping = "stacked"
        chart.overlap = 100
        chart.title = "Differential (% of WBCs)"
        chart.y_axis.title = "%"
        chart.y_axis.scaling.min = 0
        chart.y_axis.scaling.max = 100
        chart.x_axis.scaling.orientation = "maxMin"  # ALL on top, as in the table
        chart.x_axis.delete = False  # openpyxl 3.1 hides axes unless told otherwise
        chart.y_axis.delete = False
        data = Reference(ws, min_col=first_pct, max_col=first_pct + len(CLASSES) - 1, min_row=top,
                         max_row=top + len(wide))
        cats = Reference(ws, min_col=1, min_row=top + 1, max_row=top + len(wide))
        chart.add_data(data, titles_from_data=True)
        chart.set_categories(cats)
        chart.width = 22
        chart.height = max(6.0, min(40.0, 2.5 + 0.8 * len(wide)))
        ws.add_chart(chart, f"A{next_row}")
        next_row += int(chart.height * 2) + 2  # ~2 rows per cm
    facts = [(str(k), v) for k, v in tables.run_info.items()  # the warning is on top already
             if (v is None or isinstance(v, (str, int, float, bool))) and k != WARNING_FACT]
    if facts:
        ws.cell(row=next_row, column=1, value="Run").font = HEADER_FONT
        for i, (key, value) in enumerate(facts, start=1):
            ws.cell(row=next_row + i, column=1, value=_plain(key))
            ws.cell(row=next_row + i, column=2, value=_plain(value))
            _measure(widths, 1, key)
        _fit_columns(ws, {1: widths.get(1, 0)})
    for row in range(2, top - 1 if notes else top):  # the legend, the run's state, the notes
        _wrap_note(ws, row, len(wide.columns))


def _wrap_note(ws, row: int, ncols: int) -> None:
    """Show the text in column A of `row` over the table's first columns, wrapped, up to
    `NOTE_WIDTH` characters a line, instead of one line running far past the table's right."""
    text = ws.cell(row=row, column=1).value
    if not text:
        return
    span, width = 1, ws.column_dimensions["A"].width
    while span < ncols and width < NOTE_WIDTH:
        span += 1
        width += ws.column_dimensions[get_column_letter(span)].width
    ws.merge_cells(start_row=row, start_column=1, end_row=row, end_column=span)
    ws.cell(row=row, column=1).alignment = Alignment(wrap_text=True, vertical="top")
    # Excel does not grow a merged cell's row to its wrapped text: give it the lines it needs,
    # judged generously (bold and italic letters run wider than the width's unit)
    lines = math.ceil(len(str(text)) * 1.15 / max(width, 1.0))
    ws.row_dimensions[row].height = LINE_HEIGHT * max(1, lines)


def _accuracy_sheet(ws, accuracy: dict) -> None:
    ws.title = "Accuracy"
    row = 1
    widths = {}
    for section, df in accuracy.items():
        if df is None:
            continue
        df = df if isinstance(df.index, pd.RangeIndex) else df.reset_index()
        ws.cell(row=row, column=1, value=_plain(str(section))).font = TITLE_FONT
        row = _write_table(ws, df, start_row=row + 1, widths=widths, filter_and_freeze=False,
                           float_format="0.0000") + 1
    ws.freeze_panes = None


_STATUS_FILLS = {"error": ERROR_FILL, "duplicate": DUPLICATE_FILL}


def _within_limits(sheet: str, df: pd.DataFrame, links, csv_name: str, notes: list) -> tuple:
    """`df` and its `links` cut to what one Excel sheet holds (`MAX_ROWS` rows with its header,
    `MAX_LINKS` links), and a note in `notes` for each cut: a watch folder's Cells sheet reaches
    Excel's link limit after some 65,000 cells."""
    if len(df) > MAX_ROWS - 1:
        notes.append(f"The {sheet} sheet holds the first {MAX_ROWS - 1:,} of its {len(df):,} rows "
                     f"(Excel's limit); {csv_name} holds them all.")
        df = df.iloc[:MAX_ROWS - 1]
        links = links[:MAX_ROWS - 1] if links is not None else None
    if links is not None and sum(1 for link in links if link) > MAX_LINKS:
        kept, cut = 0, []
        for link in links:
            kept += bool(link)
            cut.append(link if kept <= MAX_LINKS else None)
        notes.append(f"The {sheet} sheet links its first {MAX_LINKS:,} rows to their overlays "
                     "(Excel's limit per sheet); the rest are in the overlays folder.")
        links = cut
    return df, links


def build_workbook(tables: ReportTables) -> Workbook:
    """The report as an openpyxl Workbook (not yet saved)."""
    wb = Workbook()
    summary = wb.active
    show_links = bool(tables.run_info.get("save_overlays", True))
    notes = [tables.run_info[WARNING_FACT]] if tables.run_info.get(WARNING_FACT) else []

    images = tables.images
    image_links = None
    if show_links and len(tables.image_overlay_links) == len(images):
        image_links = list(tables.image_overlay_links)
    images, image_links = _within_limits("Images", images, image_links, "images.csv", notes)
    cells = tables.cells
    links = list(tables.overlay_links) if show_links and len(tables.overlay_links) == len(cells) else None
    cells, links = _within_limits("Cells", cells, links, "cells.csv", notes)

    _summary_sheet(summary, tables, notes)
    _write_table(wb.create_sheet("Images"), images, links=image_links,
                 fills=[_STATUS_FILLS.get(s) for s in images["status"]])
    _write_table(wb.create_sheet("Cells"), cells, links=links,
                 fills=[REVIEW_FILL if bool(v) else None for v in cells["needs_review"]])

    _write_table(wb.create_sheet("Errors"), tables.errors,
                 fills=[ERROR_FILL] * len(tables.errors))
    if tables.accuracy:
        _accuracy_sheet(wb.create_sheet("Accuracy"), tables.accuracy)
    return wb


class XLSXWriter:
    """report.xlsx: Summary (table + chart), Images, Cells, Errors, and Accuracy with truth."""

    name = "xlsx"

    def write(self, out_dir: Path, tables: ReportTables) -> list:
        buf = io.BytesIO()
        build_workbook(tables).save(buf)
        return [atomic_write_bytes(Path(out_dir) / "report.xlsx", buf.getvalue())]


@hookimpl
def wbc_register_report_writers():
    return [XLSXWriter()]
