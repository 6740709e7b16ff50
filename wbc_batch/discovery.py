"""Finding the images of an input folder.

Rules (also in the README):
- recursive; the extensions in `IMAGE_EXTENSIONS`, in any letter case; files of image formats
  that are not read (`UNREAD_IMAGE_EXTENSIONS`: WebP, HEIC, GIF...) are named in one warning;
- hidden files and folders (name starting with ".") are skipped, which also skips the temporary
  files of atomic writes, and so are the system folders of NAS boxes and operating systems
  (`SYSTEM_FOLDERS`: a Synology's `@eaDir` holds a resized copy of every image, which would be
  counted three times over);
- a link whose target is missing is listed (reading it then fails with that reason), so an
  unmounted share behind a link is reported rather than silently left out; pipes, sockets and
  devices are not listed;
- the output folder is skipped when it lies inside the input folder, and so are the overlays/
  and masks/ of any other folder holding wbc-batch results (`is_results_folder`), so that an
  earlier run's overlays are never analysed as smears and counted twice (smears kept in such a
  folder beside its reports are still found);
- linked folders are followed (a sample folder may be a link to a share), each real folder once;
  a folder that cannot be read, or a link to a folder that is gone, is named in a warning (and
  by `run` in run.json's `left_out`, with exit code 1);
- the order is stable: sorted by relative name (forward slashes), so two runs over the same
  folder process and report the images in the same order on every platform.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

#: the image file extensions read, in the order a truth reader tries them for an annotation
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".tif", ".tiff")
IMAGE_EXTENSIONS = frozenset(IMAGE_SUFFIXES)
#: extensions of image formats that are not read: such files are left out with a warning (a
#: camera set to WebP or HEIC must not lose a sample without a word), other files silently
UNREAD_IMAGE_EXTENSIONS = frozenset({".webp", ".gif", ".heic", ".heif", ".avif", ".jp2", ".j2k",
                                     ".jxl", ".dcm", ".svs", ".ndpi", ".czi", ".raw", ".dng"})

#: folders that NAS boxes and operating systems keep in shared folders, compared ignoring case:
#: thumbnails (Synology's `@eaDir/field.jpg/SYNOPHOTO_THUMB_XL.jpg`, QNAP's `.@__thumb`, hidden
#: anyway), recycle bins and snapshots (deleted or older copies of the images), a zip's
#: `__MACOSX`; never a sample
SYSTEM_FOLDERS = frozenset({"@eadir", "#recycle", "#snapshot", "@recycle", "@recently-snapshot",
                            "@tmp", "$recycle.bin", "recycler", "system volume information",
                            "lost+found", "__macosx"})

log = logging.getLogger("wbc_batch")


def is_skipped_folder(name: str) -> bool:
    """Whether the folder `name` is never searched for images: hidden, or a system folder
    (`SYSTEM_FOLDERS`)."""
    return name.startswith(".") or name.casefold() in SYSTEM_FOLDERS


#: written into OUT before any image is analysed (`output_folder.prepare_output_dir`)
RESULTS_MARKER = ".wbc-batch-results"
#: the folders of drawn images a run writes into OUT (never smears)
RESULT_DIRS = ("overlays", "masks")


def is_results_folder(folder) -> bool:
    """True for a folder that `run` or `watch` wrote results into: it holds the results marker,
    a watch ledger, or run.json beside images.csv (results of versions before the marker)."""
    from .ledger import LEDGER_NAME

    folder = Path(folder)
    return ((folder / RESULTS_MARKER).is_file() or (folder / LEDGER_NAME).is_file()
            or ((folder / "run.json").is_file() and (folder / "images.csv").is_file()))


def is_image_name(path) -> bool:
    """True when the file name has an image extension (any case) and is not hidden."""
    name = Path(path).name
    return not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS


def relative_name(path, input_dir) -> str:
    """The path of `path` relative to `input_dir`, with forward slashes (e.g. "sample1/a.jpg").

    :raises ValueError: when `path` is not inside `input_dir`.
    """
    path, input_dir = Path(path), Path(input_dir)
    try:
        rel = path.relative_to(input_dir)
    except ValueError:
        rel = path.resolve().relative_to(input_dir.resolve())
    return rel.as_posix()


def discover_images(input_dir, exclude: Optional[Path] = None, warn=None,
                    left_out: Optional[list] = None, not_read: Optional[list] = None) -> list:
    """Every image file under `input_dir`, sorted by relative name.

    :param input_dir: the folder to search (recursively).
    :param exclude: a folder to leave out, with everything under it (the output folder).
    :param warn: called with each warning's text (folders left out, broken links); default:
        the "wbc_batch" logger. `watch`, which searches every few seconds, says each once.
    :param left_out: when given, `{"path": ..., "reason": ...}` is appended for each folder the
        search could not enter (unreadable, or a link whose target is gone and that is not named
        like another kind of file, `_folder_like`), so that a run can report the images it may
        have missed (run.json `left_out`, exit code 1).
    :param not_read: when given, the relative name of each file of an image format that is not
        read (`UNREAD_IMAGE_EXTENSIONS`) is appended, so that the reports can count them too.
    :returns: a list of `Path`s (each `input_dir / relative name`).
    """
    warn = warn or log.warning
    root = Path(input_dir)
    skip = _real(exclude) if exclude is not None else None
    found, visited = [], {_real(root): root}

    def lost(path, reason: str, text: str) -> None:
        warn(text)
        if left_out is not None:
            left_out.append({"path": str(path), "reason": reason})

    def unreadable(exc: OSError) -> None:
        if isinstance(exc, FileNotFoundError) and exc.filename is not None \
                and not os.path.lexists(exc.filename):
            return  # removed while the search ran (a finished sample archived): nothing lost
        reason = f"cannot read folder ({exc.strerror or exc})"
        lost(exc.filename, reason, f"cannot read folder {exc.filename} ({exc.strerror or exc}): "
                                   "its images are left out")

    plain = None  # the real folders reached without a link, found when the first link is met
    unread = {}  # extension -> [files] of image formats that are not read
    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable, followlinks=True):
        here = Path(dirpath)
        drawn = RESULT_DIRS if is_results_folder(here) else ()
        keep = []
        for d in sorted(dirnames):
            real = _real(here / d)
            if is_skipped_folder(d) or real == skip or d in drawn:
                continue
            if (here / d).is_symlink() and real not in visited:
                plain = _plain_folders(root, skip) if plain is None else plain
                if real in plain:  # a link to a folder searched under its own name: that name wins
                    visited[real] = plain[real]
            if real in visited and visited[real] != here / d:  # a loop, or two ways to one folder
                warn(f"folder {here / d} leads to {visited[real]}, already searched: its images "
                     "are counted once, under that name")
                continue
            visited[real] = here / d
            keep.append(d)
        dirnames[:] = sorted(keep)
        for name in filenames:
            path = here / name
            if is_image_name(name) and (path.is_file() or _broken_link(path)):
                found.append(path)
            elif is_image_name(name) and os.path.lexists(path):
                # a pipe, socket or device: reading one could wait for ever, so it is not read
                warn(f"{path} is not a regular file (a pipe, socket or device): left out")
            elif Path(name).suffix.lower() in UNREAD_IMAGE_EXTENSIONS and not name.startswith("."):
                unread.setdefault(Path(name).suffix.lower(), []).append(path)
            elif _broken_link(path) and not name.startswith("."):
                target = os.readlink(path)
                text = f"link {path} leads to {target}, which is missing: anything in it is left out"
                if _folder_like(name):  # most likely a sample folder on a share not mounted
                    lost(path, f"link to {target}, which is missing", text)
                else:  # latest.log -> a rotated log: nothing a run could have analysed
                    warn(text)
    if unread:
        warn(_unread_text(unread, root))
        if not_read is not None:
            not_read += sorted(relative_name(p, root) for paths in unread.values() for p in paths)
    found.sort(key=lambda p: relative_name(p, root))
    return found


def _unread_text(unread: dict, root: Path) -> str:
    """The warning for files of image formats that are not read: how many of each, and one."""
    kinds = ", ".join(f"{len(paths)} {ext}" for ext, paths in sorted(unread.items()))
    first = min((p for paths in unread.values() for p in paths),
                key=lambda p: relative_name(p, root))
    return (f"left out, as formats that are not read: {kinds} (e.g. {relative_name(first, root)}); "
            "save them as PNG, TIFF or JPEG to analyse them")


def _plain_folders(root: Path, skip: Optional[Path]) -> dict:
    """`{real path: path}` of the folders under `root` reached without following a link (hidden
    ones, `skip` and drawn results folders left out, as the search leaves them out), so that a
    sample folder is reported under its own name, not under a link to it such as `latest`."""
    out = {}
    for dirpath, dirnames, _ in os.walk(root, onerror=lambda exc: None):
        here = Path(dirpath)
        drawn = RESULT_DIRS if is_results_folder(here) else ()
        keep = []
        for d in dirnames:
            if is_skipped_folder(d) or d in drawn or (here / d).is_symlink():
                continue
            real = _real(here / d)
            if real != skip:
                out[real] = here / d
                keep.append(d)
        dirnames[:] = keep
    return out


#: extensions of files a lab's folders hold besides images; a broken link named so lost a file,
#: not a sample folder
OTHER_FILES = frozenset({"log", "txt", "csv", "tsv", "json", "xml", "yaml", "yml", "ini", "cfg",
                         "md", "html", "pdf", "doc", "docx", "xls", "xlsx", "zip", "gz", "tmp",
                         "bak", "lock", "db", "sqlite", "lnk", "url"})


def _folder_like(name: str) -> bool:
    """Whether a broken link could have been a sample folder (`Smith.Anna`, `run.2024`, `s2`):
    anything but a name ending in one of `OTHER_FILES` (`latest.log`, `notes.txt`)."""
    return Path(name).suffix[1:].lower() not in OTHER_FILES


def _broken_link(path: Path) -> bool:
    return path.is_symlink() and not path.exists()


def _real(path) -> Path:
    try:
        return Path(path).resolve()
    except OSError:
        return Path(os.path.abspath(path))
