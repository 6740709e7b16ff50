"""Report tables: the run's results as pandas DataFrames with the output contract's exact columns.

`build_tables()` turns a list of `ImageResult` (plus optional accuracy tables and run facts) into
a `ReportTables`; writers (plugins, hook `wbc_register_report_writers`, collected by
`wbc_batch.plugins.get_report_writers`) turn that into files. The tables are built once, so
every writer shows the same numbers, and each writer gets its own copy (`ReportTables.copy`), so
one that edits its tables in place changes no other report.

Column names follow issue #2 section 5 and are the module constants below. Conventions:

- `image` is the path relative to the input folder with forward slashes, as in `ImageResult`.
- `status` is `ok`, `error` (the image failed; `error` says why) or `duplicate` (a
  byte-identical copy of a file counted under another name, which `error` names; not a failure,
  so not in `errors`).
- Rows of images that failed (and of duplicates) have an empty `wbc_count`, class counts,
  `needs_review_count`, and an empty `width`/`height` unless the image could be read before it
  failed: blank means "unknown", never "zero cells".
- `summary` holds the differential of the whole run as sample `ALL` (`SAMPLE_ALL`), then one block
  per sample, a sample being the first-level subfolder of the input folder; images at the top of
  the input folder form the sample `.` (`SAMPLE_TOP`), and a folder named `ALL` the sample `ALL/`
  (`sample_name`). Each block has one row per class, in
  `CLASSES` order, even when the count is 0; `percent` is the share of that sample's WBCs, and
  `ci95_low` / `ci95_high` bound it (`differential_interval`); all three are blank when the
  sample has no WBCs (its images failed or hold none), which is "no differential", not 0 %.
  `needs_review` and `unusual_stain` count the class's flagged cells; `images` and
  `images_failed` (the same on each row of a block) say how many images the sample had and how
  many of them failed, so the differential read alone says what it rests on (a `watch`
  duplicate is not counted: its content is, under its first name). A run with no images has no
  summary rows.
- Every text cell that comes from file names or user data (image names, error messages, sample
  names, the text of accuracy tables) goes through `neutralise()`, so that a file named
  `=cmd|'/C calc'!A0.png` reaches CSV and Excel as text, not as a formula.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Optional, Protocol, runtime_checkable

import pandas as pd

from . import CLASSES
from .metrics import wilson_interval
from .results import PROB_DECIMALS

#: the summary block of the whole run
SAMPLE_ALL = "ALL"
#: the sample name of images that lie at the top of the input folder (not in a subfolder)
SAMPLE_TOP = "."

PROB_COLUMNS = tuple(f"prob_{c}" for c in CLASSES)
CELL_COLUMNS = ("image", "cell_id", "class", "confidence", *PROB_COLUMNS,
                "x", "y", "width", "height", "area_px", "nucleus_area_px", "needs_review",
                "unusual_stain")
IMAGE_COLUMNS = ("image", "status", "error", "wbc_count", *CLASSES, "needs_review_count",
                 "unusual_stain_count", "width", "height", "wbc_diameter_px", "seconds")
SUMMARY_COLUMNS = ("sample", "class", "count", "percent", "ci95_low", "ci95_high", "needs_review",
                   "unusual_stain", "images", "images_failed", "complete")
ERROR_COLUMNS = ("image", "error")
#: the long ("tidy") form of the accuracy tables, one value per row (see `accuracy_long`)
ACCURACY_COLUMNS = ("section", "scope", "metric", "value", "n")

#: decimals kept in the reports (probabilities: `results.PROB_DECIMALS`)
PERCENT_DECIMALS = 2
SECONDS_DECIMALS = 3

#: a text cell starting with one of these is read as a formula by spreadsheet programs
FORMULA_START = ("=", "+", "-", "@", "\t")
_STARTS = "[" + re.escape("".join(FORMULA_START)) + "]"
#: a formula start (after spaces, which an import may trim) right after a semicolon or a line
#: feed: where Excel's list separator is ";" (much of Europe), it opens a comma-separated file
#: split at semicolons, so the text after one starts a cell of its own, and a line feed kept in
#: a file name starts a line; the guard of the text's first character reaches neither (the csv
#: writer puts a single quote right after the break: `plugins/csv_writer.guard_breaks`)
AFTER_BREAK = re.compile("(?<=[;\n])(?= *" + _STARTS + ")")
#: the same place once guarded (`;'=`), for `unneutralised`
_GUARDED_BREAK = re.compile("(?<=[;\n])'(?= *" + _STARTS + ")")
#: control characters that XML 1.0 (an xlsx file) cannot hold (and the non-characters U+FFFE and
#: U+FFFF, legal in a Linux file name), and CR, which it turns into a line feed on reading; tab
#: and line feed it keeps
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\ufffe\uffff]")


def storable(text: str) -> str:
    """`text` as UTF-8 (CSV) and XML 1.0 (xlsx) can store it, visibly escaped where they cannot.

    A file name whose bytes are not UTF-8 (café.png written in Latin-1 on an old Windows share)
    reaches Python with lone surrogates, which no UTF-8 writer accepts: each such byte becomes a
    backslash escape (`caf` + backslash + `xe9.png`). Control characters, legal in Linux file
    names and illegal in xlsx, are escaped the same way. Other text is unchanged.
    """
    try:
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that did not come from a file name's bytes
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return _CONTROL.sub(_escape_char, text)


#: what a terminal would act on besides: tab and line feed (which `storable` keeps), DEL and the
#: C1 controls (U+0080 to U+009F: U+009B starts an escape sequence as ESC [ does)
_TERMINAL_CONTROL = re.compile("[\t\n\x7f-\x9f]")


#: the same, less tab and line feed: for a message whose own line breaks are meant
_TERMINAL_CONTROL_IN_LINES = re.compile("[\x7f-\x9f]")


def printable(text: str, keep_lines: bool = False) -> str:
    """`text` (a file name, an error quoting one) as a terminal may show it: `storable`, and tab,
    line feed, DEL and the C1 controls escaped too, so that a name can neither break a line nor
    send the terminal an escape sequence (ESC, CSI) or a carriage return. The name reads as in
    images.csv, but for those. `keep_lines`: a message of several lines keeps its line feeds and
    tabs (the rest is escaped the same)."""
    pattern = _TERMINAL_CONTROL_IN_LINES if keep_lines else _TERMINAL_CONTROL
    return pattern.sub(_escape_char, storable(text))


def _escape_char(m) -> str:
    code = ord(m.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def neutralise(text) -> str:
    """Guard a text cell against CSV/Excel formula injection, and make it storable.

    Text starting with `=`, `+`, `-`, `@` or a tab, also after spaces (an import that trims them
    would start the cell there), gets a single quote in front (OWASP's advice), so spreadsheets
    show it as text instead of running it (a carriage return, another of OWASP's starts, is
    escaped as `\x0d` by `storable` first). None becomes "".
    Other values are turned into text with `str()`. Bytes and characters that UTF-8 or xlsx cannot
    hold are escaped first (`storable`).
    """
    if text is None:
        return ""
    if not isinstance(text, str):
        if isinstance(text, float) and math.isnan(text):
            return ""
        text = str(text)
    text = storable(text)
    if text.lstrip(" ").startswith(FORMULA_START):
        return "'" + text
    return text


def unneutralised(text: str) -> list:
    """The texts `text` may have been before `neutralise` put a `'` before a leading formula
    start and the csv writer one after a `;` or a line feed (`AFTER_BREAK`): `text` itself, then
    what it was with either guard undone, without repeats. (The guards are not injective: `=S`
    and `'=S` both give `'=S`, so both are candidates.)"""
    inner = _GUARDED_BREAK.sub("", text)
    if text[:1] == "'" and text[1:].lstrip(" ").startswith(FORMULA_START):
        return list(dict.fromkeys([text, text[1:], inner[1:], inner]))
    return list(dict.fromkeys([text, inner]))


@dataclass
class ReportTables:
    """Everything a report writer needs; built by `build_tables()`.

    cells, images, summary, errors: DataFrames with the columns `CELL_COLUMNS`, `IMAGE_COLUMNS`,
        `SUMMARY_COLUMNS`, `ERROR_COLUMNS` (text already neutralised).
    accuracy: `{section name: DataFrame}` from the evaluation (may be empty); text neutralised.
    run_info: facts about the run (version, backend, parameters...), JSON-like; writers may show
        its scalar entries. `run_info.get("save_overlays", True)` false means no overlay files
        exist, so no links to them are made.
    overlay_links: one entry per row of `cells`: the overlay file of the row's image, relative to
        the output folder with forward slashes (`overlays/<image>.png`, made from the raw,
        unneutralised image name).
    image_overlay_links: the same, one entry per row of `images` (None for failed images).
    results: the run's `ImageResult`s, one per row of `images`, with names as they are on disk
        (not neutralised): for writers of formats no spreadsheet opens (JSON, a database).
    output_dir: the run's output folder (set when the run writes its reports), where a writer
        can read the overlays (`overlay_links` are relative to it) and the earlier reports; it
        writes into the `out_dir` it is given (`ReportWriter.write`).
    """

    cells: pd.DataFrame
    images: pd.DataFrame
    summary: pd.DataFrame
    errors: pd.DataFrame
    accuracy: dict = field(default_factory=dict)
    run_info: dict = field(default_factory=dict)
    overlay_links: list = field(default_factory=list)
    image_overlay_links: list = field(default_factory=list)
    results: list = field(default_factory=list)
    output_dir: Optional[Path] = None

    def copy(self) -> ReportTables:
        """A copy sharing nothing that can be changed in place (the `ImageResult`s of `results`
        are frozen, so they are shared): each writer gets its own."""
        return ReportTables(cells=self.cells.copy(deep=True), images=self.images.copy(deep=True),
                            summary=self.summary.copy(deep=True),
                            errors=self.errors.copy(deep=True),
                            accuracy=deepcopy(self.accuracy),
                            run_info=deepcopy(self.run_info),
                            overlay_links=list(self.overlay_links),
                            image_overlay_links=list(self.image_overlay_links),
                            results=list(self.results), output_dir=self.output_dir)


@runtime_checkable
class ReportWriter(Protocol):
    """Writes one kind of report file(s) from `ReportTables`.

    name: unique; chosen on the command line (`csv`, `xlsx` are built in).
    """

    name: str

    def write(self, out_dir: Path, tables: ReportTables) -> list:
        """Write the report into `out_dir`, each file atomically.

        `out_dir` is an empty staging folder of this writer's own inside the output folder
        (`tables.output_dir`, where the overlays are; write only in `out_dir`): once every
        writer is done, the files written there (subfolders too) replace the output folder's at
        the same places, each in one step, one after another within milliseconds, run.json
        last, so a kill while a slow report is built leaves the last set of reports whole.
        Links between files, relative as in OUT, stay right. Every file left in `out_dir` is
        published, returned or not; a returned path that is not a file in `out_dir` is named
        in a warning and not published.

        The writer fails (run.json's `report_errors`, exit code 1), and none of its files is
        published, when it raises, or when it writes a name wbc-batch keeps (run.json, anything
        under overlays/ or masks/, the watch ledger's files, hidden names) or one a writer
        before it in the --report order wrote (compared ignoring case): the first keeps it.

        `tables` is this writer's own copy (`ReportTables.copy`): it may change it in place (a
        column converted, rows dropped) without changing what any other writer gets.

        :returns: the paths written.
        """


#: longest file name (bytes) most file systems allow
NAME_MAX = 255


def artifact_name(kind: str, image: str) -> str:
    """An image's drawn file, relative to the output folder: `<kind>/<image>.png` (kind:
    overlays or masks). The original extension stays in the name, so `a/b.jpg` and `a/b.png`
    never collide. A name that would pass 255 bytes with `.png` (a 252-byte image name) is cut
    to 200 bytes plus a hash of the whole name, so its overlay can still be written."""
    folder, _, name = image.rpartition("/")
    file = f"{name}.png"
    if len(os.fsencode(file)) > NAME_MAX:
        digest = hashlib.sha1(os.fsencode(name)).hexdigest()[:12]
        cut = os.fsencode(name)[:200].decode("utf-8", "ignore")  # never half a character
        file = f"{cut}~{digest}.png"
    return f"{kind}/{folder}/{file}" if folder else f"{kind}/{file}"


def overlay_name(image: str) -> str:
    """The overlay file of an image, relative to the output folder (`artifact_name`)."""
    return artifact_name("overlays", image)


def _round(value, decimals: int) -> float:
    return round(float(value), decimals)


def _cell_rows(results) -> tuple:
    rows, links = [], []
    for res in results:
        if not res.ok:
            continue
        name = neutralise(res.image)
        link = overlay_name(res.image)
        for cell in res.cells:
            probs = [_round(p, PROB_DECIMALS) for p in cell.probs]
            rows.append((name, int(cell.cell_id), neutralise(cell.cls),
                         _round(cell.confidence, PROB_DECIMALS), *probs,
                         int(cell.x), int(cell.y), int(cell.width), int(cell.height),
                         int(cell.area_px), int(cell.nucleus_area_px), bool(cell.needs_review),
                         bool(cell.unusual_stain)))
            links.append(link)
    return rows, links


def _image_rows(results) -> list:
    rows = []
    for res in results:
        size = (int(res.width), int(res.height)) if (res.ok or res.width > 0) else (None, None)
        # the scale the analysis worked at: estimated, or --diameter (none: no WBC-like object)
        diameter = round(float(res.diameter_px), 1) if res.ok and res.diameter_px else None
        if res.ok:
            counts = res.class_counts()
            numbers = (len(res.cells), *(counts.get(c, 0) for c in CLASSES), res.needs_review_count,
                       res.unusual_stain_count)
        else:
            numbers = (None,) * (len(CLASSES) + 3)
        rows.append((neutralise(res.image), res.status, neutralise(res.error), *numbers, *size,
                     diameter, _round(res.seconds, SECONDS_DECIMALS)))
    return rows


def sample_name(image: str) -> str:
    """The sample of an image name: its first-level folder, or `SAMPLE_TOP` at the top.

    A folder named like the whole run's block (`SAMPLE_ALL`) is shown with a trailing slash
    (`ALL/`), which no folder name can have, so that its rows are never taken for the run's."""
    parts = image.split("/")
    if len(parts) == 1:
        return SAMPLE_TOP
    return parts[0] + "/" if parts[0] == SAMPLE_ALL else parts[0]


def differential_interval(count: int, total: int, decimals: int = PERCENT_DECIMALS) -> tuple:
    """The 95 % Wilson score interval (`metrics.wilson_interval`) of a class's share of `total`
    counted cells, in percent (low, high); (nan, nan) when `total` is 0.

    It bounds the counting error alone, as Rümke's table does for a manual differential: with
    few cells a percentage is imprecise however well each cell is classified (2 of 6 cells is
    33 %, interval 9.7 to 70 %; 20 of 60 is 33 %, 22.7 to 45.9 %). Classification errors come on
    top."""
    low, high = wilson_interval(count, total)
    if math.isnan(low):
        return low, high
    return _round(100.0 * low, decimals), _round(100.0 * high, decimals)


def _differential(sample: str, results, complete: bool = True) -> list:
    """The summary rows of one sample (or of the whole run): per class its count, share and
    interval, how many of its cells need review and have an unusual stain, the sample's images
    and failed images, and whether all its images were analysed (`complete`), so that a
    differential read alone says what it rests on."""
    counts = {c: [0, 0, 0] for c in CLASSES}  # cells, needs review, unusual stain
    for res in results:
        if not res.ok:
            continue
        for cell in res.cells:
            n = counts.setdefault(cell.cls, [0, 0, 0])
            n[0] += 1
            n[1] += bool(cell.needs_review)
            n[2] += bool(cell.unusual_stain)
    # a duplicate is counted under its first name, in that file's sample
    images = sum(1 for r in results if r.status != "duplicate")
    failed = sum(1 for r in results if r.is_error)
    total = sum(n[0] for n in counts.values())
    extra = sorted(c for c in counts if c not in CLASSES)
    rows = []
    for cls in [*CLASSES, *extra]:
        n, review, unusual = counts[cls]
        pct = _round(100.0 * n / total, PERCENT_DECIMALS) if total else math.nan
        rows.append((neutralise(sample), neutralise(cls), n, pct, *differential_interval(n, total),
                     review, unusual, images, failed, complete))
    return rows


def _summary_rows(results, unfinished: Optional[Mapping] = None) -> list:
    """The whole run's rows, then each sample's; `unfinished` (run.json's
    `samples_not_finished`: `{sample or ".": [finished, found]}`) marks the samples a stopped
    run or a watch session's pending files left partial, and gives rows to those of which no
    image was finished yet."""
    partial = {sample_name(f"{key}/x") if key != SAMPLE_TOP else SAMPLE_TOP
               for key in (unfinished or {})}
    if not results and not partial:
        return []
    rows = _differential(SAMPLE_ALL, results, complete=not partial)
    by_sample = {sample: [] for sample in partial}
    for res in results:
        by_sample.setdefault(sample_name(res.image), []).append(res)
    for sample in sorted(by_sample):
        rows.extend(_differential(sample, by_sample[sample], complete=sample not in partial))
    return rows


def _frame(rows: list, columns: tuple, ints: Iterable = ()) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=list(columns))
    for col in ints:
        df[col] = df[col].astype("Int64")
    return df


def _neutralise_frame(df: pd.DataFrame) -> pd.DataFrame:
    """A copy of `df` whose text cells, text index and column names are neutralised."""
    df = df.copy()
    for col in df.columns:
        if df[col].dtype == object or pd.api.types.is_string_dtype(df[col]):
            # kept as objects: a column of counts and rates stays 6 and 0.5, not 6.0 and 0.5
            df[col] = pd.Series([v if not isinstance(v, str) else neutralise(v) for v in df[col]],
                                index=df.index, dtype=object)
    df.columns = [neutralise(c) if isinstance(c, str) else c for c in df.columns]
    if df.index.dtype == object:
        df.index = [neutralise(v) if isinstance(v, str) else v for v in df.index]
    return df


def build_tables(results, accuracy: Optional[Mapping] = None,
                 run_info: Optional[Mapping] = None,
                 unfinished: Optional[Mapping] = None) -> ReportTables:
    """Build the report tables of a run.

    :param results: the run's `ImageResult`s, in the order the reports list them.
    :param accuracy: `{section: DataFrame}` from the evaluation (`metrics.accuracy_tables`), or None.
    :param run_info: facts about the run for the reports (see `ReportTables.run_info`), or None.
    :param unfinished: run.json's `samples_not_finished` (`{sample: [finished, found]}`), for
        the summary's `complete` column; None or {} when every image found was analysed.
    :returns: a `ReportTables`; with no results, every table has its columns and no rows.
    """
    results = list(results)
    cell_rows, links = _cell_rows(results)
    cells = _frame(cell_rows, CELL_COLUMNS)
    for flag in ("needs_review", "unusual_stain"):
        cells[flag] = cells[flag].astype(bool)
    images = _frame(_image_rows(results), IMAGE_COLUMNS,
                    ints=("wbc_count", *CLASSES, "needs_review_count", "unusual_stain_count",
                          "width", "height"))
    summary = _frame(_summary_rows(results, unfinished), SUMMARY_COLUMNS)
    for col in ("count", "needs_review", "unusual_stain", "images", "images_failed"):
        summary[col] = summary[col].astype(int)
    summary["complete"] = summary["complete"].astype(bool)
    for col in ("percent", "ci95_low", "ci95_high"):
        summary[col] = summary[col].astype(float)
    errors = _frame([(neutralise(r.image), neutralise(r.error)) for r in results if r.is_error],
                    ERROR_COLUMNS)
    acc = {neutralise(str(k)): _neutralise_frame(v) for k, v in (accuracy or {}).items()
           if v is not None}
    return ReportTables(cells=cells, images=images, summary=summary, errors=errors, accuracy=acc,
                        run_info=dict(run_info or {}), overlay_links=links,
                        image_overlay_links=[overlay_name(r.image) if r.ok else None
                                             for r in results],
                        results=results)


def _py(value):
    return value.item() if hasattr(value, "item") else value


def _scope(label_cols, rec, with_names: bool) -> str:
    if with_names:
        return " / ".join(f"{c}={rec[c]}" for c in label_cols)
    return " / ".join(str(rec[c]) for c in label_cols) or "all"


def _counts(values: list) -> pd.Series:
    """Whole numbers as a nullable integer column; anything else kept as it is."""
    try:
        return pd.Series(values, dtype="Int64")
    except (TypeError, ValueError):
        return pd.Series(values, dtype=object)


def accuracy_long(accuracy: Mapping) -> pd.DataFrame:
    """All accuracy tables as one long table with the columns `ACCURACY_COLUMNS`.

    Each value of each table becomes one row: `section` is the table's name, `metric` the column
    the value stood in, `value` the value (a number, or text such as a predicted class), `scope`
    what the row of the table was about, and `n` how many things a value was computed over where
    the table says so (else empty). The scope is:

    - for a table already in long form (columns `metric` and `value`, e.g. metrics' "summary"):
      its other text columns joined with " / ", and its `n` column fills `n`;
    - otherwise the row's label: the index when it is not a plain 0..n-1 range, else the first
      column when it holds text (a region, a class, an image name, the true class of a confusion
      matrix row); a table whose first column is numeric has scope "all" when it has one row,
      else "<first column>=<value>" (e.g. calibration bins "lower=0.8").

    So a confusion matrix row (first column: true class, other columns: predicted class) becomes
    rows `confusion, neutrophil, lymphocyte, 3, ` (scope = true class, metric = predicted class).
    """
    rows = []
    for section, df in accuracy.items():
        if df is None or len(df) == 0:
            continue
        df = df.copy()
        if not isinstance(df.index, pd.RangeIndex) or df.index.start != 0 or df.index.step != 1:
            df.index.names = [n if n is not None else "index" for n in df.index.names]
            df = df.reset_index()
        cols = [str(c) for c in df.columns]
        df.columns = cols
        # column by column: to_dict("records") would turn the ints of a row with floats into floats
        columns = {c: df[c].tolist() for c in cols}
        records = [{c: columns[c][i] for c in cols} for i in range(len(df))]
        if "metric" in cols and "value" in cols:
            labels = [c for c in cols if c not in ("metric", "value", "n")
                      and not pd.api.types.is_numeric_dtype(df[c])]
            for rec in records:
                rows.append((section, _scope(labels, rec, False), str(rec["metric"]),
                             _py(rec["value"]), _py(rec["n"]) if "n" in rec else None))
            continue
        first_is_text = not pd.api.types.is_numeric_dtype(df[cols[0]]) or \
            pd.api.types.is_bool_dtype(df[cols[0]])
        if first_is_text or len(df) > 1:
            labels, values = cols[:1], cols[1:]
        else:
            labels, values = [], cols
        for rec in records:
            scope = _scope(labels, rec, with_names=bool(labels) and not first_is_text)
            for c in values:
                rows.append((section, scope, c, _py(rec[c]), None))
    out = pd.DataFrame({
        "section": [neutralise(r[0]) for r in rows],
        "scope": [neutralise(r[1]) for r in rows],
        "metric": [neutralise(r[2]) for r in rows],
        # object dtype: counts stay integers next to fractional metrics
        "value": pd.Series([neutralise(r[3]) if isinstance(r[3], str) else r[3] for r in rows],
                           dtype=object),
        "n": _counts([r[4] for r in rows]),
    }, columns=list(ACCURACY_COLUMNS))
    return out
