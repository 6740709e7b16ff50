"""The "csv" report writer: cells.csv, images.csv, summary.csv and, with ground truth, accuracy.csv.

Files are UTF-8 without a byte-order mark, comma-separated, with a header row even when a table
is empty; each file is written atomically. Booleans are written `True`/`False`, unknown values
(the counts of an image that failed) as empty fields. Text is neutralised against formula
injection (`wbc_batch.reports.neutralise`), and a formula start after a semicolon or a line
feed gets a single quote too, for spreadsheets that split at semicolons and for file names that
hold a line feed (`guard_breaks`). accuracy.csv is the long form of all
accuracy tables (`wbc_batch.reports.accuracy_long`: section, scope, metric, value).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from wbc_batch.atomic import atomic_write_text
from wbc_batch.hookspecs import hookimpl
from wbc_batch.reports import AFTER_BREAK, ReportTables, accuracy_long


def guard_breaks(df: pd.DataFrame) -> pd.DataFrame:
    """`df` with a single quote put after each semicolon or line feed that a formula start
    follows (after spaces), in its text cells (`P1;=1+2` becomes `P1;'=1+2`); numbers are
    untouched."""
    out = df
    for j, col in enumerate(df.columns):
        values = df.iloc[:, j]
        if pd.api.types.is_numeric_dtype(values):  # bool too
            continue
        hit = [i for i, v in enumerate(values)
               if isinstance(v, str) and AFTER_BREAK.search(v)]
        if hit:
            if out is df:
                out = df.copy()
            guarded = values.astype(object).copy()
            for i in hit:
                guarded.iloc[i] = AFTER_BREAK.sub("'", values.iloc[i])
            out[col] = guarded
    return out


def write_csv(path: Path, df: pd.DataFrame) -> Path:
    """Write one table as CSV, atomically; returns the path."""
    return atomic_write_text(path, guard_breaks(df).to_csv(index=False, lineterminator="\n"))


class CSVWriter:
    """cells.csv, images.csv, summary.csv (+ accuracy.csv when the run has ground truth)."""

    name = "csv"

    def write(self, out_dir: Path, tables: ReportTables) -> list:
        out_dir = Path(out_dir)
        written = [write_csv(out_dir / "cells.csv", tables.cells),
                   write_csv(out_dir / "images.csv", tables.images),
                   write_csv(out_dir / "summary.csv", tables.summary)]
        if tables.accuracy:
            written.append(write_csv(out_dir / "accuracy.csv", accuracy_long(tables.accuracy)))
        return written


@hookimpl
def wbc_register_report_writers():
    return [CSVWriter()]
