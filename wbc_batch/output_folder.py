"""The output folder (OUT) of `run` and `watch`: what may be written there and what is removed.

It owns the checks before a run, OUT's lock (one writer per folder), the temporary files a kill
left, the names wbc-batch keeps for itself in OUT (`kept_name`), the report files an earlier
run.json lists (`earlier_reports`), and each image's overlay and mask (`artifact_path`).

`run` refuses an output folder that already holds results (run.json, cells.csv,
images.csv, summary.csv, report.xlsx, accuracy.csv, or an overlays/ or masks/ folder) unless
`overwrite` is set. With `overwrite`, those report files, and the files the earlier run.json
lists as its writers' (`earlier_reports`: a plugin writer's too), are removed before the run, as
are the overlay/mask files of the images the earlier images.csv lists (each image analysed is
drawn again; the drawing of an image that fails is removed, also where no images.csv listed it).
Nothing else in the folder is deleted, and an accuracy.csv left by an earlier run is removed when
this run has no ground truth. The output folder may lie inside the input folder (it is left out
of the image search) but may not be the input folder itself.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Optional

from . import __version__
from .atomic import atomic_write_text, is_leftover, remove_leftovers
from .config import RunConfig
from .discovery import (IMAGE_EXTENSIONS, RESULT_DIRS, RESULTS_MARKER, discover_images,
                        relative_name)
from .errors import PipelineError

log = logging.getLogger("wbc_batch")

#: files whose presence means "this folder already holds results"
RESULT_FILES = ("run.json", "cells.csv", "images.csv", "summary.csv", "report.xlsx", "accuracy.csv")
RUN_JSON = "run.json"

#: the name of the folder inside OUT that a set of reports is written to before it replaces
#: OUT's (`Runner.write_reports`; a kill leaves it behind, `remove_output_leftovers` removes it)
STAGE_PREFIX = ".wbc-batch-reports."
#: the images the last run into OUT set out to analyse (a JSON list of their relative names),
#: written before its first image (`record_images`): `--overwrite` finds with it the drawings of
#: a run killed before it wrote images.csv
IMAGES_LIST = ".wbc-batch-images.json"
#: the report files `--overwrite` is removing (a JSON list of their names in OUT), noted before
#: run.json, their only other record, goes (`remove_earlier_results`): a kill meanwhile leaves a
#: plugin writer's files findable by the next `--overwrite`, which removes this list last
REPORTS_LIST = ".wbc-batch-earlier-reports.json"


def resolved(path) -> Path:
    """`path` absolute, with ~ expanded and links followed."""
    return Path(path).expanduser().resolve()


def check_folders(config: RunConfig) -> None:
    """Input must be an existing folder; output must not be a file nor the input folder itself,
    and the input must not lie in the output's overlays/ or masks/.

    :raises PipelineError: with the reason.
    """
    inp = Path(config.input_dir)
    if not inp.exists():
        raise PipelineError(f"input folder not found: {inp}")
    if not inp.is_dir():
        hint = (": put the image in a folder and name that folder"
                if inp.suffix.lower() in IMAGE_EXTENSIONS else "")
        raise PipelineError(f"input is not a folder: {inp}{hint}")
    out = Path(config.output_dir)
    if out.exists() and not out.is_dir():
        raise PipelineError(f"output exists and is not a folder: {out}")
    if resolved(out) == resolved(inp):
        raise PipelineError("the output folder must not be the input folder "
                            "(a folder inside it is fine)")
    drawn = _drawn_folder_holding(inp, out)
    # `--overwrite` empties it before any image is read; `watch` would analyse each overlay it
    # writes there as a new image, and that one's overlay too
    if drawn is not None:
        raise PipelineError(f"the input folder lies in the output folder's {drawn}/, which a run "
                            "fills with its own drawings (and empties with --overwrite): choose "
                            "another output folder")
    earlier = _earlier_drawings(inp)
    if earlier is not None:
        raise PipelineError(f"the input folder lies in {earlier}, the drawings of an earlier "
                            "run (a folder of wbc-batch results): they are never analysed as "
                            "smears; name the folder of the smears")
    smears = _images_in_output(out, inp)
    if smears:
        raise PipelineError(f"the output folder {out} lies inside the input folder and holds "
                            f"{len(smears)} image(s) of its own ({smears[0]}"
                            f"{', ...' if len(smears) > 1 else ''}), which the search leaves out "
                            "with the results: choose an output folder without images")


def _earlier_drawings(inp: Path) -> Optional[Path]:
    """The overlays/ or masks/ folder of a results folder (`discovery.is_results_folder`) that
    `inp` is or lies in, or None: given as INPUT (a wrong pick in a file dialog), its drawings
    had been analysed as smears, into a plausible report of wrong classes."""
    from .discovery import is_results_folder

    for folder in (resolved(inp), *resolved(inp).parents):
        # the drawn folder itself, by identity: `res/Masks` is a lab's own folder where case
        # tells names apart (and is searched as smears), and `res/masks` where it does not
        drawn = [folder.parent / name for name in RESULT_DIRS]
        if (folder.name.casefold() in RESULT_DIRS and is_results_folder(folder.parent)
                and any(d.exists() and os.path.samefile(folder, d) for d in drawn)):
            return folder
    return None


def _drawn_folder_holding(inp: Path, out: Path) -> Optional[str]:
    """The name of OUT's folder of drawn images (overlays, masks) that `inp` lies in, or None.
    Its name is compared ignoring case, as macOS and Windows name folders (`OUT/Overlays` is
    overlays/ there), and OUT by identity, so that `res/overlays` is not in `Res` where case
    tells folders apart; and where one is a link, what it leads to holds `inp` too (a linked
    overlays/ made a watcher draw into its own inbox, overlays of overlays)."""
    if not out.is_dir():
        return None
    for name in RESULT_DIRS:
        if (out / name).exists() and resolved(inp).is_relative_to(resolved(out / name)):
            return name
    for folder in (resolved(inp), *resolved(inp).parents):
        name = folder.name.casefold()
        if name in RESULT_DIRS and folder.parent.is_dir() and os.path.samefile(folder.parent, out):
            return name
    return None


def _images_in_output(out: Path, inp: Path) -> list:
    """The images under an existing output folder inside the input folder, other than the
    overlays and masks a run writes there: smears that `discover_images` would skip with OUT."""
    if not out.is_dir():
        return []
    try:
        resolved(out).relative_to(resolved(inp))
    except ValueError:
        return []
    return [relative_name(p, out) for p in discover_images(out, warn=lambda text: None)
            if relative_name(p, out).split("/")[0] not in RESULT_DIRS]


def holds_results(out_dir) -> list:
    """The result files and folders of an earlier run found in `out_dir` (empty: none)."""
    out = Path(out_dir)
    if not out.is_dir():
        return []
    found = [name for name in RESULT_FILES if (out / name).is_file()]
    found += [name + "/" for name in RESULT_DIRS if (out / name).is_dir()]
    return found


#: held (flock) by the `run` or `watch` writing into an output folder, for as long as it does
OUTPUT_LOCK = ".wbc-batch.lock"


def lock_output(out) -> object:
    """Create OUT and hold OUT/`OUTPUT_LOCK` (an exclusive flock, released when the returned
    handle is closed or the process ends, kill -9 included), so that no two runs or watchers
    write one folder's reports at once. Where there are no advisory locks (Windows), nothing is
    held: one writer per OUT is then on the user.

    :raises PipelineError: another run or watcher holds it, or OUT cannot be created.
    """
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PipelineError(f"cannot write to the output folder {out}: {exc.strerror or exc}") from None
    try:  # read-only: flock needs no more, so a colleague can lock a lock file another user made
        handle = os.fdopen(os.open(out / OUTPUT_LOCK, os.O_RDONLY | os.O_CREAT, 0o666))
    except OSError as exc:
        raise PipelineError(f"cannot open the lock file {out / OUTPUT_LOCK}: "
                            f"{exc.strerror or exc}") from None
    try:
        import fcntl
    except ImportError:
        return handle
    try:
        _flock_now(fcntl, handle.fileno())
    except OSError as exc:
        if exc.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
            # a share without locking (ENOLCK, EOPNOTSUPP): write there all the same
            log.warning("cannot lock the output folder %s (%s): a second run or watch writing "
                        "there at the same time would not be noticed", out, exc.strerror or exc)
            return handle
        handle.close()
        raise OutputBusyError(_busy(out)) from None
    return handle


#: a lock refused once is asked again after this many seconds: `refuse_busy` in another process
#: holds it for microseconds to look
LOCK_RETRY_S = 0.05


def _flock_now(fcntl, fd: int) -> None:
    """An exclusive flock without waiting, tried twice (`LOCK_RETRY_S` apart); OSError as flock.
    `fcntl`: the module (there is none on Windows)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
            raise
        time.sleep(LOCK_RETRY_S)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


class OutputBusyError(PipelineError, RuntimeError):
    """OUT's lock is held by another run, watcher or training (`lock_output`)."""


def _busy(out) -> str:
    return (f"another wbc-batch run, watch or training is writing to {out}; wait for it to "
            "finish, or choose another output folder")


def refuse_busy(out) -> None:
    """Refuse an OUT whose lock (`OUTPUT_LOCK`) another run or watcher holds now, without
    creating anything: checked before what OUT holds, whose advice (--overwrite) would only
    lead to this refusal.

    :raises PipelineError: another run or watcher holds it."""
    try:
        import fcntl
    except ImportError:
        return
    try:
        fd = os.open(Path(out) / OUTPUT_LOCK, os.O_RDONLY)
    except OSError:  # no lock file (a new folder), or none readable: the claim will tell
        return
    try:
        _flock_now(fcntl, fd)  # asked twice: another process's probe holds it for microseconds
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
            raise PipelineError(_busy(out)) from None
    finally:
        os.close(fd)  # closing releases a lock this probe took


@contextlib.contextmanager
def claimed_output(config: RunConfig):
    """Hold OUT's lock (`lock_output`) with OUT prepared (`prepare_output_dir`) for the body of
    a `with`, and release the lock however the body is left. Yields OUT.

    :raises PipelineError: from either, before the body runs (the lock then already released).
    """
    lock = lock_output(config.output_dir)
    try:
        yield prepare_output_dir(config)
    finally:
        lock.close()


def remove_output_leftovers(out) -> None:
    """Remove the temporary files that writes a kill interrupted left among OUT's own files: the
    reports at its top, a staging folder of reports (`STAGE_PREFIX`) and the overlays/ and
    masks/ folders (`atomic.remove_leftovers`), and nothing else (an inbox may lie inside OUT,
    and a hidden `.*.tmp` file there is a scanner's upload in progress). Only while holding
    `lock_output`."""
    out = Path(out)
    try:
        with os.scandir(out) as entries:
            for entry in entries:
                if not is_leftover(entry.name):
                    continue
                if entry.is_file(follow_symlinks=False):
                    try:
                        os.remove(entry.path)
                    except OSError:
                        pass
                elif entry.name.startswith(STAGE_PREFIX) and entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)  # a set of reports a kill cut
    except OSError:
        return
    for name in RESULT_DIRS:
        if (out / name).is_dir():
            remove_leftovers(out / name)


def check_output(config: RunConfig, held: bool = False) -> None:
    """`check_folders`, then refuse an output folder another run or watcher is writing to
    (`refuse_busy`; not where this process holds its lock: `held`), a watcher's output folder,
    and one holding results unless `overwrite`.

    :raises PipelineError: with the reason.
    """
    from .ledger import LEDGER_NAME

    check_folders(config)
    out = Path(config.output_dir)
    if (out / LEDGER_NAME).is_file():  # its watcher would rebuild the reports over a run's
        raise PipelineError(f"output folder {out} belongs to `wbc-batch watch` (it holds its "
                            f"{LEDGER_NAME}); choose another folder for `run`")
    if not held:  # before what OUT holds: --overwrite would only meet the lock
        refuse_busy(out)
    existing = holds_results(out)
    if existing and not config.overwrite:
        more = f" and {len(existing) - 4} more" if len(existing) > 4 else ""
        raise PipelineError(f"output folder {out} already holds results "
                            f"({', '.join(existing[:4])}{more}); choose another folder or pass "
                            "--overwrite to replace them")


#: run.json's list of the report files its run's writers wrote (relative to OUT), so that a later
#: `--overwrite` (or `watch` with other writers) removes a plugin writer's files too
REPORT_FILES_KEY = "report_files"


def earlier_reports(out_dir) -> list:
    """The report files that the run.json in `out_dir` says its writers wrote (and those an
    `--overwrite` cut short noted, `REPORTS_LIST`) and that are still
    there, plugin writers' files included: the ones a later run with other writers must remove,
    or they would stand beside its own reports, never updated. Only plain files inside
    `out_dir` are returned: not hidden ones, not overlays/ or masks/, not the watch ledger, so
    that a damaged or hand-edited run.json can remove nothing else."""
    out = Path(out_dir)
    found = []
    for name in [*_run_json_reports(out), *_noted_reports(out)]:
        path = _report_file(out, name)
        if path is not None and path not in found:
            found.append(path)
    return found


def _run_json_reports(out: Path) -> list:
    """The report names run.json lists ([] without a readable one)."""
    try:
        info = json.loads((out / RUN_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    names = info.get(REPORT_FILES_KEY) if isinstance(info, dict) else None
    return names if isinstance(names, list) else []


def _noted_reports(out: Path) -> list:
    """The report names an `--overwrite` cut short noted (`REPORTS_LIST`; [] without one)."""
    try:
        names = json.loads((out / REPORTS_LIST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    return names if isinstance(names, list) else []


def remove_report(path: Path, out: Path) -> None:
    """Remove an earlier run's report file, and the folders under `out` it leaves empty (a
    plugin writer's own folder). Raises OSError where the file cannot be removed."""
    path.unlink(missing_ok=True)
    folder = path.parent
    while folder != out and out in folder.parents:
        try:
            folder.rmdir()  # only if empty
        except OSError:
            break
        folder = folder.parent


def _report_file(out: Path, name) -> Optional[Path]:
    """OUT/name when `name` is a report file that `earlier_reports` may return, else None."""
    if not isinstance(name, str) or not name or not _inside(name) or kept_name(name.split("/")):
        return None
    path = out.joinpath(*name.split("/"))
    try:
        path.parent.resolve().relative_to(out.resolve())
    except (OSError, ValueError):
        return None
    return path if path.is_file() and not path.is_symlink() else None


def kept_name(parts) -> Optional[str]:
    """What wbc-batch keeps the name `parts` (a path relative to OUT, split in its parts) for,
    or None when a report writer may use it: run.json, anything under overlays/ or masks/, the
    watch ledger and its -wal/-shm files, and hidden names (the lock, the results marker, the
    staging folders, temporary files). Compared ignoring case, as Windows and macOS do."""
    from .ledger import LEDGER_NAME

    folded = [p.casefold() for p in parts]
    if any(p.startswith(".") for p in folded):
        return "its hidden files: lock, marker, temporary files"
    if any("\\" in p for p in folded):
        return "none: a backslash separates folders on Windows"
    if folded[0] in RESULT_DIRS:
        return f"its drawn images, in {folded[0]}/"
    if folded == [RUN_JSON]:
        return "its record of the run"
    if folded[-1].startswith(LEDGER_NAME):
        return "the watch ledger"
    return None


def prepare_output_dir(config: RunConfig) -> Path:
    """`check_output`, then, before any image is analysed (the caller holding `lock_output`):
    create the output folder, remove the temporary files a killed run left, mark it as one
    (`discovery.RESULTS_MARKER`, so that a run killed before its reports still leaves a folder no
    later run takes for smears) and, with `overwrite`, remove the earlier run's reports, so that
    a run killed or run with fewer writers never leaves them beside its own, and the overlays and
    masks of the images its images.csv lists (this run draws again those it analyses, so one
    stopped early, or run without --save-masks, leaves no drawing of the earlier run's cells);
    returns it.

    :raises PipelineError: as `check_output`, or the folder cannot be created or written.
    """
    from . import interrupts

    check_output(config, held=True)
    out = Path(config.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        remove_output_leftovers(out)  # of a run killed mid-write; the caller holds the lock
        atomic_write_text(out / RESULTS_MARKER, f"wbc-batch {__version__} results\n")
        if config.overwrite:
            # a Ctrl-C waits: the earlier results go as a whole
            with interrupts.deferred(doing="the earlier results are removed (--overwrite)"):
                remove_earlier_results(out)
    except OSError as exc:
        raise PipelineError(f"cannot write to the output folder {out}: "
                            f"{exc.strerror or exc}") from None
    return out


def remove_earlier_results(out: Path) -> None:
    """What `--overwrite` removes: the earlier run's reports, run.json first (so that a kill
    meanwhile never leaves a run.json of a complete run whose drawings are gone), then the
    overlays and masks of the images it reported or set out to analyse (`_earlier_images`).
    Raises OSError where a report cannot be removed; a drawing that cannot be is logged."""
    names = _earlier_images(out)
    if names:  # kept until a new run notes its own: a kill below leaves them findable
        record_images(out, names)
    earlier = earlier_reports(out)
    if earlier:  # run.json goes first: a kill below leaves the others findable
        atomic_write_text(out / REPORTS_LIST, json.dumps(
            [p.relative_to(out).as_posix() for p in earlier]) + "\n")
    reports = [out / RUN_JSON, *earlier, *(out / name for name in RESULT_FILES)]
    for path in dict.fromkeys(reports):
        remove_report(path, out)
    (out / REPORTS_LIST).unlink(missing_ok=True)
    folders = set()
    for name in filter(_inside, names):  # drawings no report may count
        for path, exc in remove_artifacts(out, name):
            log.warning("cannot remove %s (%s), the earlier run's drawing of %s",
                        path, exc.strerror or exc, name)
        if "/" in name:
            folders |= {artifact_path(out, kind, name).parent for kind in RESULT_DIRS}
    _remove_emptied(folders, out)


def record_images(out: Path, names: list) -> None:
    """Note in OUT the images a run sets out to analyse (`IMAGES_LIST`), before its first: a run
    killed before its images.csv leaves drawings that a later `--overwrite` must find."""
    atomic_write_text(out / IMAGES_LIST, json.dumps(list(names)) + "\n")


def _recorded_images(out: Path) -> list:
    """The names `record_images` noted in OUT ([] without a readable list)."""
    try:
        names = json.loads((out / IMAGES_LIST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    return [n for n in names if isinstance(n, str)] if isinstance(names, list) else []


def _remove_emptied(folders: set, out: Path) -> None:
    """Remove each of `folders` (subfolders of OUT/overlays or OUT/masks whose drawings were
    removed) and the folders above it, up to overlays/ or masks/, where they are now empty."""
    stops = {out / kind for kind in RESULT_DIRS}
    for folder in sorted(folders, key=lambda f: len(f.parts), reverse=True):
        while folder not in stops and any(stop in folder.parents for stop in stops):
            try:
                folder.rmdir()  # only if empty
            except OSError:
                break
            folder = folder.parent


def _earlier_images(out: Path) -> list:
    """The images the earlier run in `out` reported (its images.csv) or set out to analyse
    (`record_images`; a run killed before its reports): the only names whose overlays and masks
    `--overwrite` may remove, so that a lab's own files in OUT/masks or OUT/overlays are never
    touched. A name images.csv shows guarded against spreadsheet formulas (`'=a.png`,
    `s;'=b.png`) is given as shown and as it was on disk."""
    import csv

    from .reports import unneutralised

    try:
        with open(out / "images.csv", newline="", encoding="utf-8") as fh:
            shown = [row["image"] for row in csv.DictReader(fh) if row.get("image")]
    except (OSError, UnicodeError, csv.Error, KeyError):
        shown = []
    names = []
    for name in shown:
        guarded = unneutralised(name)
        names += [*guarded, *(_unescaped(n) for n in guarded)]
    return list(dict.fromkeys([*names, *_recorded_images(out)]))


def _unescaped(name: str) -> str:
    """`name` with the escapes `reports.storable` wrote undone: `\\xNN` back to the byte of a name
    that is not UTF-8 (as Python holds it: a lone surrogate) or to a control character, and
    `\\uNNNN` to its character."""
    def char(m) -> str:
        if m.group(1):
            code = int(m.group(1), 16)
            return chr(code) if code < 0x80 else chr(0xDC00 + code)
        return chr(int(m.group(2), 16))

    return re.sub(r"\\x([0-9a-f]{2})|\\u([0-9a-f]{4})", char, name)


def _inside(name: str) -> bool:
    """Whether `name`, from an earlier images.csv, is a relative path below its folder: no
    `..`, no root, no backslash, and on Windows no colon, which names a drive there (a
    hand-edited file must not reach outside OUT); elsewhere a colon is part of a name (a
    camera's time stamp, `10:30:00.png`)."""
    parts = name.split("/")
    return not (name.startswith("/") or "\\" in name or (os.name == "nt" and ":" in name)
                or any(p in ("", ".", "..") for p in parts))


def artifact_path(out_dir, kind: str, rel: str) -> Path:
    """OUT/<kind>/<rel>.png (`reports.artifact_name`: the original extension stays, so a.jpg
    and a.png never collide; a name too long for the file system is shortened)."""
    from .reports import artifact_name

    return Path(out_dir) / artifact_name(kind, rel)


def remove_artifacts(out_dir, rel: str) -> list:
    """Remove the overlay and mask of `rel` (`artifact_path`) where they exist: an image whose
    result is now an error must not keep an earlier run's drawing of cells no report counts.
    -> [(path, OSError)] of those that could not be removed."""
    failed = []
    for kind in RESULT_DIRS:
        path = artifact_path(out_dir, kind, rel)
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            failed.append((path, exc))
    return failed


__all__ = ["OUTPUT_LOCK", "REPORT_FILES_KEY", "RESULT_FILES", "RUN_JSON", "STAGE_PREFIX",
           "artifact_path", "check_folders", "check_output", "claimed_output", "earlier_reports",
           "holds_results", "kept_name", "lock_output", "prepare_output_dir", "remove_artifacts",
           "remove_output_leftovers", "remove_report"]
