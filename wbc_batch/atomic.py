"""Atomic file writes: write a temporary file in the target's folder, then `os.replace` it.

A reader (a person opening report.xlsx, the watch mode rebuilding reports, a crash at any moment)
sees either the old file or the new one, never half of one. The temporary file lives in the same
folder (so the rename never crosses file systems), its name starts with a dot (so image discovery
skips it when the output folder lies inside the input folder), and it keeps the target's suffix
(so libraries that choose a format by extension, such as OpenCV or openpyxl, still work).
"""

from __future__ import annotations

import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

def _proc_umask() -> Optional[int]:
    """The process's umask as Linux's /proc gives it (reading it changes nothing), or None."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _import_umask() -> int:
    """The umask at import, where /proc does not give it: read by setting it and putting it
    back, once (done again in several writer threads, two could leave 022 for good)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK_AT_IMPORT = _import_umask() if _proc_umask() is None else None


def _umask() -> int:
    """The process's umask now (a host program may set its own after importing wbc-batch), or
    at import where the system does not say it without changing it."""
    mask = _proc_umask()
    if mask is not None:
        return mask
    return _UMASK_AT_IMPORT if _UMASK_AT_IMPORT is not None else 0o022  # /proc gone since


def file_mode() -> int:
    """The mode a file made with open() would have now: mkstemp makes its files readable by
    their owner alone, and a result file takes the usual permissions instead."""
    return 0o666 & ~_umask()


#: the mode at import, for tests that compare against it
_FILE_MODE = file_mode()


#: a temporary name holds the target's name only up to this many bytes, so that it stays under
#: the 255 bytes file systems allow (the random part and suffixes add about 20)
_NAMED_UP_TO = 200


def _temp_in(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    named = len(os.fsencode(path.name)) <= _NAMED_UP_TO
    fd, name = tempfile.mkstemp(prefix=f".{path.name}." if named else ".wbc-",
                                suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    try:
        os.chmod(name, file_mode())
    except OSError:
        pass
    return Path(name)


#: `_temp_in`'s names (and a staging folder's): mkstemp's 8 random letters, digits or
#: underscores, between the target's name and `.tmp` and its suffix; not 8 digits alone, a date
#: in a lab's own `.backup.20240101.tmp` (1 in 30,000 of ours, then left in place, harmless)
_LEFTOVER = re.compile(r"\.(?:.+\.|wbc-)(?![0-9]{8}\.)[a-z0-9_]{8}\.tmp(?:\.[^.]+)?", re.DOTALL)


def is_leftover(name: str) -> bool:
    """True for the name of a temporary file `_temp_in` makes (`.<target>.<random>.tmp<ext>`,
    or `.wbc-<random>.tmp<ext>` for a long target name), not for a lab's own hidden file with
    `.tmp` in its name (`.notes.tmp.txt`)."""
    return _LEFTOVER.fullmatch(name) is not None


def remove_leftovers(folder: Path) -> int:
    """Delete the temporary files that writes killed between writing and renaming left under
    `folder` (their targets are whole: the rename never happened). Only for a folder nobody else
    is writing to (the watcher holds its lock). Returns how many were removed."""
    removed = 0
    for dirpath, _, filenames in os.walk(folder):
        for name in filenames:
            if is_leftover(name):
                try:
                    os.remove(os.path.join(dirpath, name))
                    removed += 1
                except OSError:
                    pass
    return removed


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path`, on error it is removed.

    For libraries that want a file name rather than a file object::

        with atomic_path(out / "report.xlsx") as tmp:
            workbook.save(tmp)
    """
    path = Path(path)
    tmp = _temp_in(path)
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_writer(path, mode: str = "w", encoding: str | None = "utf-8", newline: str | None = None):
    """Open a temporary file for writing; it replaces `path` when the block ends without error.

    :param mode: "w" (text) or "wb" (binary).
    :param encoding: text encoding (ignored in binary mode).
    :param newline: as for `open` (pass "" for the csv module).
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_writer mode must be 'w' or 'wb', not {mode!r}")
    with atomic_path(path) as tmp:
        if mode == "wb":
            with open(tmp, "wb") as fh:
                yield fh
        else:
            with open(tmp, "w", encoding=encoding, newline=newline) as fh:
                yield fh


def atomic_write_bytes(path, data: bytes) -> Path:
    """Write `data` to `path` atomically; returns the path."""
    with atomic_writer(path, "wb") as fh:
        fh.write(data)
    return Path(path)


def atomic_write_text(path, text: str, encoding: str = "utf-8") -> Path:
    """Write `text` to `path` atomically; returns the path."""
    with atomic_writer(path, "w", encoding=encoding, newline="") as fh:
        fh.write(text)
    return Path(path)


def atomic_copy(src, dst) -> Path:
    """Copy file `src` to `dst` atomically, readable as the files written here are (mode 0666
    less the umask), not with `src`'s mode (a bundle's weights may be 0600); returns `dst`."""
    import shutil

    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)
    return Path(dst)
