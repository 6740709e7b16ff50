"""Built-in plugin: a progress bar on stderr, driven by the lifecycle hooks.

Shown only for interactive runs: when stderr is a terminal and the run is not `--quiet`. The bar
is honest: the rate and the time left come from the images finished so far, and it is redrawn at
most ten times a second, always on one line of the terminal: the image name is shortened, then
left out, to fit its width (a line that wraps would leave a copy at each redraw). One bar per
run; the state lives in a `ProgressBar` object created at `wbc_run_start`.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
import unicodedata

from wbc_batch.hookspecs import hookimpl
from wbc_batch.reports import printable

WIDTH = 28
MIN_INTERVAL = 0.1


class ProgressBar:
    """A one-line bar: `[#####.....] 12/40  3 errors  1.8 img/s  0:15 left  name.jpg`."""

    def __init__(self, total: int, stream, columns=None):
        self.total = total
        self.stream = stream
        #: the terminal's width, asked at each redraw (a resized window), unless given
        self.columns = columns
        self.done = 0
        self.errors = 0
        self.current = ""
        self.started = time.monotonic()
        self._last = 0.0
        self._width = 0

    def start_image(self, image: str, total: int) -> None:
        self.total = max(self.total, total)
        self.current = printable(image)  # a file name cannot move the cursor or colour the bar
        self.draw()

    def finish_image(self, ok: bool, total: int) -> None:
        self.total = max(self.total, total)
        self.done += 1
        self.errors += 0 if ok else 1
        self.draw(force=self.done >= self.total)

    def line(self, columns: int = 0) -> str:
        """The bar's text, at most `columns - 1` cells wide when `columns` is given."""
        total = max(self.total, 1)
        filled = int(WIDTH * min(self.done, total) / total)
        elapsed = time.monotonic() - self.started
        parts = [f"[{'#' * filled}{'.' * (WIDTH - filled)}] {self.done}/{self.total}"]
        if self.errors:
            parts.append(f"{self.errors} error{'s' if self.errors != 1 else ''}")
        if self.done and elapsed > 0:
            rate = self.done / elapsed
            parts.append(f"{rate:.1f} img/s")
            left = (self.total - self.done) / rate
            if self.done < self.total:
                parts.append(f"{int(left // 60)}:{int(left % 60):02d} left")
        text = "  ".join(parts)
        room = columns - 1 - _cells(text) - 2 if columns else 30
        if self.current and self.done < self.total and room >= 8:
            name = self.current if _cells(self.current) <= min(room, 30) else _tail(self.current, min(room, 30))
            text += "  " + name
        return _head(text, columns - 1) if columns else text

    def draw(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < MIN_INTERVAL:
            return
        self._last = now
        columns = self.columns or _columns(self.stream)
        text = self.line(columns)
        width = _cells(text)
        pad = max(0, min(self._width, columns - 1) - width)
        self._width = width
        try:
            self.stream.write("\r" + text + " " * pad)
            self.stream.flush()
        except (OSError, ValueError):
            pass

    def close(self) -> None:
        self.draw(force=True)
        try:
            self.stream.write("\n")
            self.stream.flush()
        except (OSError, ValueError):
            pass


def _columns(stream) -> int:
    """The width of the terminal `stream` writes to (stdout may be a file meanwhile:
    `wbc-batch run ... > log.txt`), else $COLUMNS or 80."""
    try:
        return os.get_terminal_size(stream.fileno()).columns or 80
    except (AttributeError, OSError, ValueError):
        return shutil.get_terminal_size((80, 24)).columns


def _cells(text: str) -> int:
    """Terminal cells `text` takes: wide (CJK) characters two, combining marks none."""
    return sum(0 if unicodedata.combining(c) else
               2 if unicodedata.east_asian_width(c) in ("W", "F") else 1 for c in text)


def _head(text: str, cells: int) -> str:
    """The start of `text` that fits in `cells`."""
    while _cells(text) > max(cells, 0):
        text = text[:-1]
    return text


def _tail(name: str, cells: int) -> str:
    """The end of `name` after an ellipsis ("..."), `cells` wide at most."""
    end = name
    while end and _cells(end) > cells - 3:
        end = end[1:]
    return "..." + end


_bar = None


def _interactive(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


@hookimpl
def wbc_run_start(config, total):
    global _bar
    stream = sys.stderr
    _bar = ProgressBar(total, stream) if (not config.quiet and _interactive(stream)) else None


@hookimpl
def wbc_image_start(image, index, total):
    if _bar is not None:
        _bar.start_image(image, total)


@hookimpl
def wbc_image_done(result, index, total):
    if _bar is not None:
        _bar.finish_image(not result.is_error, total)  # a duplicate is no error


@hookimpl
def wbc_run_end(config, results, seconds):
    global _bar
    if _bar is not None:
        _bar.close()
        _bar = None
