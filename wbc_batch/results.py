"""Plain result records that flow out of the pipeline core.

These hold no arrays that must be persisted: a `CellResult` / `ImageResult` round-trips through
`to_dict()` / `from_dict()` (JSON-safe), which is what reports and the watch ledger store.
Per-image arrays used only for drawing (label maps) live in `ImageAnalysis`, which is transient.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Optional

import numpy as np

from . import CLASSES
from .errors import WbcBatchError

#: decimals of a probability as the reports show it; `needs_review` compares the confidence so
#: rounded with the threshold, so that a cell shown at 0.8 is never flagged under 0.8
PROB_DECIMALS = 4
#: the reports' run fact (`reports.ReportTables.run_info`) for the images found but not analysed
#: when they were written: the rest of a run stopped by a signal, a watch session's pending files
NOT_ANALYSED_FACT = "images not analysed yet"
#: ... and for the samples a stopped run left unfinished: "s1 (5 of 10), s2 (0 of 10)"
NOT_FINISHED_FACT = "samples not finished"


class ImageNotAnalysable(WbcBatchError, ValueError):
    """The image itself cannot be analysed as asked (its WBCs are too small to tell nucleus from
    cytoplasm, or the diameter given is larger than the image). Its message is the whole reason
    the image's error row gives, not a fault of the software."""


def one_line(exc: BaseException) -> str:
    """An error as images.csv and the messages show it: the first line of the exception's text
    (its type when it has none), at most 300 characters."""
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


def shell_arg(value) -> str:
    """`value` (a path) as it is typed in this system's shell, in a command a message suggests:
    quoted for a POSIX shell where it needs it, or, on Windows, in double quotes for cmd.exe
    where it holds a space or a character cmd.exe acts on (`&`, `|`, `^`, ...; single quotes
    would be kept as characters there). A Windows path cannot hold a double quote."""
    import os
    import re

    text = str(value)
    if os.name == "nt":
        if text and not re.search(r'[\s&|<>^%()!,;=]', text):
            return text
        trailing = len(text) - len(text.rstrip("\\"))  # doubled: a \" would be a quote
        return '"' + text + "\\" * trailing + '"'
    import shlex

    return shlex.quote(text)


#: failed images listed by name at the end of a run or a `watch --once` session
MAX_LISTED_ERRORS = 10


def failure_lines(failures) -> list:
    """The closing lines naming failed images, from (image, error) pairs: the first
    `MAX_LISTED_ERRORS`, then how many more images.csv lists. Names and errors are escaped as
    `reports.printable` says: a file name may hold a line feed or an escape sequence."""
    from .reports import printable  # reports builds on this module

    failures = list(failures)
    lines = [f"  failed: {printable(image)}: {printable(error)}"
             for image, error in failures[:MAX_LISTED_ERRORS]]
    if len(failures) > MAX_LISTED_ERRORS:
        lines.append(f"  ... and {len(failures) - MAX_LISTED_ERRORS} more (see images.csv)")
    return lines


def _known_fields(cls, d: dict) -> dict:
    """`d` (a `to_dict` of another version, maybe) without the keys `cls` has no field for."""
    known = {f.name for f in fields(cls)}
    return {k: v for k, v in d.items() if k in known}


@dataclass(frozen=True)
class CellResult:
    """One white blood cell found in an image.

    `x, y, width, height` is the bounding box of the cell's body in original image pixels (see
    `AnalysisParams.box_trim`); `probs` follows `CLASSES`.
    `unusual_stain`: the crop's stain lies beyond the bundle's stain reference (see
    `stain.StainReference`); such cells also need review.
    """

    cell_id: int
    cls: str
    confidence: float
    probs: tuple
    x: int
    y: int
    width: int
    height: int
    area_px: int
    nucleus_area_px: int
    needs_review: bool
    unusual_stain: bool = False

    def to_dict(self) -> dict:
        d = asdict(self)
        d["probs"] = [float(p) for p in self.probs]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "CellResult":
        """As `ImageResult.from_dict`: a field this version does not know is left out."""
        d = _known_fields(cls, d)
        d["probs"] = tuple(d["probs"])
        return cls(**d)


def bare_glass_line(images) -> Optional[str]:
    """The closing line of `run`, `evaluate` and `watch --once` for run.json's `bare_glass` (the
    images taken for bare glass), naming the first, or None when there are none: a blank frame,
    or a smear faded or washed out, is taken for glass too, and read only as "ok, 0 WBCs"."""
    from .reports import printable  # reports builds on this module

    if not images:
        return None
    return (f"{len(images)} image(s) taken for bare glass or a blank frame, with no WBC looked "
            f"for in them, first {printable(images[0])} (bare_glass in run.json): look at them "
            "if they should hold a smear, since one faded or washed out by too much light is "
            "taken for glass too (README, \"Fields of bare glass\")")


def across_samples_line(across) -> Optional[str]:
    """The closing line of `run` and `watch --once` for run.json's `duplicates_across_samples`
    ({"image", "copy_of"} items), or None when there are none."""
    from .reports import printable  # reports builds on this module

    if not across:
        return None
    one = across[0]
    return (f"{len(across)} duplicate(s) copy a file of another sample and are not counted in "
            f"their own (the first: {printable(one['image'])} is {printable(one['copy_of'])}): "
            "check that each sample's folder holds its own images (images.csv; run.json: "
            "duplicates_across_samples)")


def sample_of(image: str) -> str:
    """The sample of the image named `image` (relative to the input folder, with forward
    slashes): its first-level subfolder, or "" for files at the input's top."""
    parts = image.split("/")
    return parts[0] if len(parts) > 1 else ""


@dataclass(frozen=True)
class ImageResult:
    """The outcome for one input file: status "ok" with its cells, "error" with a reason, or
    "duplicate" (`run` and `watch` count files by content), with `error` naming the file that
    is counted in its place.

    `image` is the path relative to the input folder, with forward slashes.
    `diameter_px` is the WBC diameter (original pixels) the analysis worked at.
    `margins_left`: the image was analysed with flat light bands along its edges left in
    (`ImageAnalysis.margins_left`).
    `bare_glass`: the image was taken for bare glass, and no WBC was looked for in it
    (`ImageAnalysis.bare_glass`). False in results stored by versions before it was kept.
    """

    image: str
    status: str
    error: str = ""
    width: int = 0
    height: int = 0
    seconds: float = 0.0
    diameter_px: float = 0.0
    cells: tuple = field(default_factory=tuple)
    margins_left: bool = False
    bare_glass: bool = False

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def is_error(self) -> bool:
        """The image could not be analysed (a duplicate is neither ok nor failed)."""
        return self.status == "error"

    @property
    def sample(self) -> str:
        """The first-level subfolder of the input folder, or "" for files at its top."""
        return sample_of(self.image)

    def class_counts(self) -> dict:
        counts = {c: 0 for c in CLASSES}
        for cell in self.cells:
            counts[cell.cls] += 1
        return counts

    @property
    def needs_review_count(self) -> int:
        return sum(1 for c in self.cells if c.needs_review)

    @property
    def unusual_stain_count(self) -> int:
        return sum(1 for c in self.cells if c.unusual_stain)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["cells"] = [c.to_dict() for c in self.cells]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ImageResult":
        """The result `to_dict` wrote, by this version or another: a field it does not know (a
        later version's) is left out, one it lacks (an earlier version's) takes its default."""
        d = _known_fields(cls, d)
        d["cells"] = tuple(CellResult.from_dict(c) for c in d.get("cells", ()))
        return cls(**d)

    @classmethod
    def failed(cls, image: str, error: str, seconds: float = 0.0) -> "ImageResult":
        return cls(image=image, status="error", error=error, seconds=seconds)

    @classmethod
    def duplicate(cls, image: str, note: str) -> "ImageResult":
        """A byte-identical copy of a file counted under another name; `note` says which."""
        return cls(image=image, status="duplicate", error=note)


def copy_failure(original: str, error: str) -> str:
    """The `error` of a byte-identical copy of a file that decoded and then failed (`run`: its
    analysis, or its overlay's write): it fails the same way, and is counted as failed in its
    own sample, not as a duplicate counted nowhere."""
    return f"identical to {original}, which failed: {error}"


def duplicate_note(original: str, original_failed: bool = False) -> str:
    """The `error` note of a duplicate's row (`ImageResult.duplicate`). `original_failed`: the
    file it copies is itself recorded as an error, so the content is counted nowhere (a watch
    ledger's duplicates of failed files, from versions that made such copies duplicates)."""
    if original_failed:
        return (f"duplicate of {original} (identical content), which is recorded as an error; "
                "not analysed again")
    return f"duplicate of {original} (identical content); counted once, under that name"


@dataclass
class ImageAnalysis:
    """What analysing one image array produces: the cells plus full-resolution maps for drawing.

    `cell_labels`: uint16 array (H, W), 0 background, k for the pixels of cell_id k.
    `mask`: uint8 array (H, W), 0 background, 128 cytoplasm, 255 nucleus (WBC Image Dataset style),
    restricted to the kept cells.
    `outlines`: cell_id -> (x, y, w, h) bounding each cell's whole outline in `cell_labels` (a
    cell's reported box bounds only its body). `analyze` fills it; where it lacks a cell, the
    overlay finds the outlines in `cell_labels` instead.
    `margins_left`: the image has flat light bands along its edges (white padding, an info
    banner) that were analysed as they are (`AnalysisParams.fill_margins` off), which can lose
    cells and add false ones.
    `bare_glass`: under `analysis.MIN_COVER` of the field is darker than its glass, so it was
    taken for glass and not shown to the segmenter (`analysis.field_cover`).
    """

    cells: list
    cell_labels: np.ndarray
    mask: np.ndarray
    diameter_px: float
    scale: float
    timings: dict = field(default_factory=dict)
    outlines: dict = field(default_factory=dict)
    margins_left: bool = False
    bare_glass: bool = False

    def to_result(self, image: str, seconds: float) -> ImageResult:
        h, w = self.mask.shape[:2]
        return ImageResult(image=image, status="ok", width=int(w), height=int(h),
                           seconds=float(seconds), diameter_px=float(self.diameter_px),
                           cells=tuple(self.cells), margins_left=bool(self.margins_left),
                           bare_glass=bool(self.bare_glass))
