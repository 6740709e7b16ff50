"""A set of reports put in OUT whole, or not at all for a writer that fails.

Each report writer writes into its own empty folder inside a staging folder in OUT
(`output_folder.STAGE_PREFIX`); `stage_writers` runs them and claims each one's names, and
`publish` then moves the files of those that succeeded to their places in OUT one after
another, within milliseconds, run.json last. A kill while the (slow) workbook is built leaves
the last set whole, not a new images.csv beside an old report.xlsx.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from .atomic import is_leftover
from .output_folder import kept_name
from .plugins import PLUGIN_FAILURES, reraise_stops
from .results import one_line

log = logging.getLogger("wbc_batch")


def stage_writers(stage: Path, writers: list, tables) -> tuple:
    """Run each of `writers` on its own copy of `tables` (`reports.ReportTables`), each in its own
    new folder under `stage`. Returns (the files to publish, as (staged path, name in OUT); the
    failures, one line each).

    A writer fails, and none of its files is published, when it raises (sys.exit() too), or when
    it wrote a link (to a file or a folder), a name that `kept_name` keeps for wbc-batch, or a
    name that a writer before it (in --report order) wrote (the first to write a name keeps it).
    Files it wrote but did not return are published too; a returned path that is not a file in
    its folder is named in a warning, and so are files that appeared or changed in
    `tables.output_dir` (OUT, given for the overlays' place) while it ran (`_straight_into`): a
    warning, not a failure, as something else may have written them (a scanner's inbox inside
    OUT, a colleague's copy)."""
    files, failed, claimed = [], [], {}
    out = getattr(tables, "output_dir", None)
    for i, writer in enumerate(writers):
        own = stage / str(i)
        before = _beside(out)
        try:
            own.mkdir()  # a full disk fails the writer, as its own write would
            # each writer gets its own copy: one writer's edits stay its own
            returned = _written_paths(writer.write(own, tables.copy()))
        except PLUGIN_FAILURES as exc:  # one writer's failure loses no other
            reraise_stops(exc)
            why = f"{type(exc).__name__}: {one_line(exc)}"
        else:
            mine, why = _claim(own, writer.name, claimed)
            _straight_into(out, before, writer.name)
        if why is not None:
            failed.append(f"report writer {writer.name!r} failed: {why}")
            shutil.rmtree(own, ignore_errors=True)  # half its report: not published
            continue
        _warn_unstaged(own, writer.name, returned)
        files += mine
    return files, failed


def _beside(out) -> dict:
    """OUT's own files, as name -> (modified, size), and its folders, as name -> None, that a
    writer might write straight into: not the names wbc-batch keeps (`kept_name`: run.json,
    overlays/, masks/, the ledger, hidden names such as the staging folder), nor an Office lock
    file (`~$report.xlsx`: the workbook open on a share); {} without an OUT. A folder counts by
    being there only: what happens inside it (an inbox inside OUT) is not a writer's doing."""
    if out is None:
        return {}
    try:
        entries = list(os.scandir(out))
    except OSError:
        return {}
    seen = {}
    for entry in entries:
        if kept_name([entry.name]) is not None or entry.name.startswith("~$"):
            continue
        try:
            if entry.is_dir(follow_symlinks=False):
                seen[entry.name] = None
            elif entry.is_file(follow_symlinks=False):
                st = entry.stat(follow_symlinks=False)
                seen[entry.name] = (st.st_mtime_ns, st.st_size)
        except OSError:
            continue
    return seen


def _straight_into(out, before: dict, writer: str) -> None:
    """Warn of the files and folders that appeared or changed in OUT since `before`
    (`_beside`), while `writer` ran: written there, they are neither written whole nor in
    run.json, and --overwrite keeps them."""
    after = _beside(out)
    touched = sorted(name for name, seen in after.items()
                     if name not in before or before[name] != seen)
    if touched:
        more = f" (and {len(touched) - 1} more)" if len(touched) > 1 else ""
        log.warning("%s%s appeared or changed in the output folder while report writer %r ran: "
                    "a writer must write in the folder it is given (tables.output_dir is where "
                    "the overlays are); a file written straight into OUT is not written whole, "
                    "not listed in run.json, and not removed by --overwrite", touched[0], more,
                    writer)


def _claim(own: Path, writer: str, claimed: dict) -> tuple:
    """The files writer `writer` wrote in its folder `own`, as (path, name in OUT), and None;
    or ([], why they cannot be published): a link, a name `kept_name` keeps, or a name (or a
    folder of that name) that another writer claimed first. `claimed` maps each claimed name,
    and each folder above one, ignoring case, to (writer, name as written, is a file); the
    writer's names are added only when all of them are free."""
    mine, new = [], {}
    written = sorted(own.rglob("*"))
    for path in written:  # a link to a folder too, which is no file
        if path.is_symlink():
            name = path.relative_to(own).as_posix()
            return [], f"it wrote {name} as a link; a report file must be a plain file"
    # the files, without the temporary files of writes that failed
    for path in (p for p in written if p.is_file() and not is_leftover(p.name)):
        name = path.relative_to(own).as_posix()
        parts = name.split("/")
        kept = kept_name(parts)
        if kept:
            return [], f"it wrote {name}, a name wbc-batch keeps ({kept})"
        keys = [("/".join(parts[:k]).casefold(), False) for k in range(1, len(parts))]
        for key, is_file in [*keys, (name.casefold(), True)]:
            other = new.get(key) or claimed.get(key)
            if other is not None and (is_file or other[2]):
                who = "it" if key in new else f"report writer {other[0]!r}"
                return [], f"it wrote {name}, but {who} wrote {other[1]} first"
            new.setdefault(key, (writer, name, is_file))
        mine.append((path, name))
    claimed.update(new)
    return mine, None


def _warn_unstaged(own: Path, writer: str, returned: list) -> None:
    """One warning for each path writer `writer` returned that is not a file in its folder
    `own`: it is not published (only what the writer wrote there is)."""
    root = own.resolve()
    for path in returned:
        # a relative path may be the working folder's (OUT given as a relative path) or its own
        ways = [Path(path)] if Path(path).is_absolute() else [Path(path), own / path]
        if not any(_file_below(way, root) for way in ways):
            log.warning("report writer %r returned %s, which is not a file in the folder it "
                        "was given to write in: not published", writer, path)


def _file_below(path: Path, root: Path) -> bool:
    """Whether `path` is a file inside the (resolved) folder `root`."""
    try:
        path.resolve().relative_to(root)
        return path.is_file()
    except (OSError, ValueError):
        return False


def publish(files: list, out: Path) -> tuple:
    """Move each staged file of `files` ((path, name in OUT), run.json last) to its place in
    `out`, each in one step. Returns (the paths in `out`, the failures)."""
    written, failed = [], []
    for path, name in files:
        target = out / name
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
            written.append(target)
        except OSError as exc:
            failed.append(f"{name} could not be put in place: {exc.strerror or exc}")
    return written, failed


def _written_paths(files) -> list:
    """A report writer's return value: the paths it wrote (a list, None for none)."""
    if files is None:
        return []
    if isinstance(files, (str, bytes, os.PathLike)) or not hasattr(files, "__iter__"):
        raise TypeError(f"returned {files!r}; a report writer returns the list of paths it wrote")
    return [Path(f) for f in files]


__all__ = ["publish", "stage_writers"]
