"""Frozen configuration records. The CLI turns options into these; the core reads only these."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Optional

from .errors import ConfigError

#: Cells whose top class probability is below this are flagged needs_review (after temperature
#: scaling of the classifier's logits, which is calibrated on the PBC val split).
DEFAULT_REVIEW_THRESHOLD = 0.80
#: the smallest diameter taken: a WBC under 8 px across is a blot, not a nucleus and a cytoplasm
MIN_DIAMETER_PX = 8.0
#: the smallest tile side: tiles overlap by 64 working pixels on each side (`analysis.TILE_OVERLAP`)
MIN_MAX_SIDE = 256
#: the views `tta_views` may name: none, the flips and the half turn, all eight
TTA_VIEWS = (1, 4, 8)

#: AnalysisParams field -> (lowest, highest) accepted value, both included (the command line's
#: options have the same bounds); every value must be a finite number
_RANGES = {
    "review_threshold": (0.0, 1.0),
    "min_area_frac": (0.0, 1.0),
    "small_cell_frac": (0.0, 1.0),
    "small_cell_nucleus_frac": (0.0, 1.0),
    "border_frac": (0.0, 1.0),
    "min_nucleus_frac": (0.0, 1.0),
    "min_nucleus_contrast": (0.0, 1.0),
    "min_grey_nucleus_contrast": (0.0, 1.0),
    "min_nucleus_over_field": (0.0, 10.0),
    "min_falloff": (0.0, 1.0),
    "box_trim": (0.0, 0.5),
    "outline_refine": (0.0, 0.25),
    "outline_eps": (1e-4, 1.0),  # smaller: the filter's float32 determinant cancels (grey: 1e-5)
}


#: the AnalysisParams switches that change how the cells the stain check flags are classified; at
#: most one may be on
FLAGGED_CELL_SETTINGS = ("stain_normalise", "grey_unusual", "blend_unusual")


@dataclass(frozen=True)
class AnalysisParams:
    """How one image is analysed; independent of files, CLI and backends.

    diameter_px: typical WBC diameter in original pixels; None estimates it per image.
    review_threshold: top probability under which a cell is flagged needs_review.
    min_area_frac: connected WBC fragments smaller than this fraction of the area of a disc of
        the working diameter are dropped, but for small cells (below).
    small_cell_frac, small_cell_nucleus_frac: a whole connected component (not a part split off
        a larger one) of at least `small_cell_frac` of that disc, and under `min_area_frac`, is
        kept when at least `small_cell_nucleus_frac` of it is nucleus: a small lymphocyte beside
        larger cells, for the working diameter is an area-weighted median, which sits on the
        larger ones. Platelets and stain debris of that size have less nucleus (chosen on val
        fields: docs/EXPERIMENTS.md, "Small lymphocytes beside larger cells").
    border_frac: a cell touching the image border is dropped when less than this fraction of its
        expected (disc) area is visible.
    min_nucleus_frac: a candidate whose nucleus covers less than this fraction of its area is
        dropped (every WBC has a nucleus; red-cell rims and stain debris mostly do not).
    min_nucleus_contrast: a cell whose nucleus is not stained against the glass around it by at
        least this (`analysis.nucleus_contrast`) is dropped: what the segmenter finds in the
        noise or lamp falloff of an empty or blank field.
    min_grey_nucleus_contrast: the same bar for a grey image (`analysis.is_grey`), where a
        nucleus has no stain colour and its contrast is only how much darker it is than the glass;
        higher, because red cells and platelets on them are dark too (chosen on grey val fields,
        judged on grey train fields: docs/EXPERIMENTS.md, "A darkness bar for nuclei in grey
        images").
    min_nucleus_over_field: in a colour image, a cell's nucleus must also be stained at least
        this many times as much as the field around the cells (`analysis.field_stain`: the red
        cells' stain, in a smear): what the segmenter takes for cells among red cells in a field
        without any WBC is stained as they are; 0 is off.
    min_falloff: a field whose lamp falloff (`illumination`: how much darker the glass is at its
        darkest than at its brightest) is at least this is evened out before it is analysed;
        0 turns this off. A crop filled by one cell is never evened (`illumination.measure`).
    max_side: images whose longer side at working scale exceeds this are processed in tiles.
    tta_views: each cell crop is classified in this many views (1, 4: the flips and the half
        turn, or 8: all rotations and flips of the square) and the logits averaged.
    stain_check: flag cells (unusual_stain, and so needs_review) whose stain lies beyond the
        bundle's stain reference (`stain.StainReference`); bundles without one check nothing.
    stain_normalise: classify the cells flagged unusual_stain from their crop redrawn in the
        stain of the classifier's main training source (`stain.StainTarget`); needs stain_check
        and a bundle with a stain target, and does nothing otherwise.
    grey_unusual: classify the cells flagged unusual_stain from their crop in grey (luminance in
        all three channels, as the classifier's training makes its grey crops), so that a stain
        it never saw does not mislead it through colour; without stain_check no cell is flagged
        and it does nothing; with stain_normalise it is refused (docs/EXPERIMENTS.md,
        "Classifying unusual cells from their grey crop").
    blend_unusual: classify the cells flagged unusual_stain from the mean of two answers' class
        probabilities, their crop as cut and in grey, so that a confident reading outweighs an
        unsure one; without stain_check it does nothing; with grey_unusual or stain_normalise it
        is refused (docs/EXPERIMENTS.md, "Colour and grey together for unusual cells").
    box_trim: the box reported for a cell (CSV, Excel, overlays, box matching) bounds its body:
        the cell's mask opened by a disc of this fraction of the WBC diameter, keeping the parts
        that touch its nucleus, so that a thin tail or a sliver of a touching red cell does not
        widen it (`analysis.body_box`). 0 reports the box of the whole mask, and so does a grey
        image, where the trim lost matched boxes. The mask, the outline and the crop the
        classifier sees are not affected.
    outline_refine: refine each cell's outline, and its nucleus's, at full resolution with a
        colour-guided filter of radius this fraction of the WBC diameter (`outline`); 0 is off.
    outline_eps: the guided filter's regularisation (larger: smoother, follows colour less).
    fill_margins: paint flat light bands along the image's edges (white padding, an info banner
        with its text; `frame.flat_margins`) in the glass colour before the analysis, as the
        black frame always is. Off by default: it missed one bar of the rule it was judged by
        (docs/EXPERIMENTS.md, "Flat margins and info banners").
    fill_white_stop: paint a round field stop saved white (`frame.light_surround`) in the glass
        colour before the analysis, as the black frame always is. Off by default: it also
        fires on single-cell crops of 400 px or more whose glass is neutral white, and harms
        their outlines (docs/EXPERIMENTS.md, "A white field stop").
    border_arc: the scale estimate measures a WBC cut by the image border by the circle its
        outline follows (`analysis.border_cut_diameter`), not by the area that shows. Off by
        default: it missed one bar of the rule it was judged by (docs/EXPERIMENTS.md, "A WBC
        cut by the image border").
    red_cell_bar: a scale estimate under 0.8 of the field's red cells' size, as the learned
        sizer reads it (`red_cells`), is taken for red cells and replaced by 1.82 of their size
        (`red_cells.barred_diameter`): a field without a WBC is then not enlarged until its red
        cells pass for WBCs. Skipped with `diameter_px`.
    """

    diameter_px: Optional[float] = None
    review_threshold: float = DEFAULT_REVIEW_THRESHOLD
    min_area_frac: float = 0.3
    small_cell_frac: float = 0.15
    small_cell_nucleus_frac: float = 0.6
    border_frac: float = 0.3
    min_nucleus_frac: float = 0.1
    min_nucleus_contrast: float = 0.1
    min_grey_nucleus_contrast: float = 0.26
    min_nucleus_over_field: float = 0.0
    min_falloff: float = 0.25
    max_side: int = 1024
    tta_views: int = 1
    stain_check: bool = True
    stain_normalise: bool = False
    grey_unusual: bool = False
    blend_unusual: bool = False
    box_trim: float = 0.2
    outline_refine: float = 0.06
    outline_eps: float = 1e-3
    fill_margins: bool = False
    fill_white_stop: bool = False
    border_arc: bool = False
    red_cell_bar: bool = False

    def __post_init__(self):
        """Refuse, with ValueError naming the field, what the command line refuses (a
        negative or nan diameter, 3 views, a box trim of -1...): such values gave 0 cells, or
        failed every image, without a word."""
        if self.diameter_px is not None:
            _check_number("diameter_px", self.diameter_px)
            if self.diameter_px < MIN_DIAMETER_PX:
                raise ConfigError(f"AnalysisParams.diameter_px must be None (estimated per image) "
                                 f"or at least {MIN_DIAMETER_PX:g} pixels, not {self.diameter_px!r}")
        for name, (low, high) in _RANGES.items():
            value = getattr(self, name)
            _check_number(name, value)
            if not low <= value <= high:
                span = f"from {low:g} to {high:g}"
                raise ConfigError(f"AnalysisParams.{name} must be {span}, not {value!r}")
        if not _is_int(self.max_side) or self.max_side < MIN_MAX_SIDE:
            raise ConfigError(f"AnalysisParams.max_side must be a whole number of at least "
                             f"{MIN_MAX_SIDE} pixels, not {self.max_side!r}")
        if not _is_int(self.tta_views) or self.tta_views not in TTA_VIEWS:
            raise ConfigError(f"AnalysisParams.tta_views must be 1, 4 or 8, not {self.tta_views!r}")
        for f in fields(self):  # NumPy numbers as Python's: run.json wrote them as strings
            value = getattr(self, f.name)
            if isinstance(f.default, bool):  # a switch: "no" would be true
                object.__setattr__(self, f.name, _switch(f"AnalysisParams.{f.name}", value))
            elif value is None or isinstance(value, bool):
                continue
            elif isinstance(value, numbers.Integral):
                object.__setattr__(self, f.name, int(value))
            elif isinstance(value, numbers.Real):
                object.__setattr__(self, f.name, float(value))
        # after the switches are bools: a NumPy True is not `True` before
        crop_options = [n for n in FLAGGED_CELL_SETTINGS if getattr(self, n) is True]
        if len(crop_options) > 1:
            raise ConfigError(f"AnalysisParams.{' and '.join(crop_options)} each change how the "
                              "flagged cells are classified: set one")


def _switch(name: str, value) -> bool:
    """`value` as a bool: True, False or a NumPy boolean; ValueError naming `name` otherwise."""
    if isinstance(value, bool):
        return value
    if getattr(getattr(value, "dtype", None), "kind", "") == "b" and getattr(value, "ndim", 1) == 0:
        return bool(value)
    raise ConfigError(f"{name} must be True or False, not {value!r}")


def _is_int(value) -> bool:
    """An int or a NumPy integer, not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_number(name: str, value) -> None:
    """A finite int, float or NumPy number (not a bool, not a string)."""
    if (isinstance(value, bool) or not isinstance(value, numbers.Real)
            or not math.isfinite(value)):
        raise ConfigError(f"AnalysisParams.{name} must be a finite number, not {value!r}")


#: the most CPU threads `--threads` and `RunConfig.threads` take
MAX_THREADS = 1024


@dataclass(frozen=True)
class RunConfig:
    """Everything one `run` (or `watch`) needs."""

    input_dir: Path
    output_dir: Path
    backend: str = "torch"
    device: str = "auto"
    model_dir: Optional[Path] = None
    analysis: AnalysisParams = field(default_factory=AnalysisParams)
    save_overlays: bool = True
    save_masks: bool = False
    overwrite: bool = False
    writers: tuple = ("csv", "xlsx")
    truth: Optional[Path] = None
    truth_format: Optional[str] = None
    threads: int = 0  # 0: torch/onnx default (all cores)
    quiet: bool = False

    def __post_init__(self):
        """Refuse, with ValueError naming the field, threads and devices the command line
        refuses: 5000 threads ran silently and "2" failed as the backend's fault."""
        if not _is_int(self.threads) or not 0 <= self.threads <= MAX_THREADS:
            raise ConfigError(f"RunConfig.threads must be a whole number from 0 (the runtime's "
                             f"default) to {MAX_THREADS}, not {self.threads!r}")
        object.__setattr__(self, "threads", int(self.threads))  # a NumPy int: "2" in run.json
        from .devices import DeviceError, parse_device

        try:  # "gpu" was refused only when the Runner opened its backend, naming no field
            object.__setattr__(self, "device", parse_device(self.device))
        except DeviceError as exc:
            raise ConfigError(f"RunConfig.device: {exc}") from None
        if not isinstance(self.analysis, AnalysisParams):  # a dict failed every image later
            raise ConfigError(f"RunConfig.analysis must be an AnalysisParams, not "
                             f"{type(self.analysis).__name__}")
        try:  # "csv" was read as c, s, v; a generator was used up by a check
            writers = None if isinstance(self.writers, str) else tuple(self.writers)
        except TypeError:
            writers = None
        if writers is None or not all(isinstance(w, str) for w in writers):
            raise ConfigError(f"RunConfig.writers must be a tuple of report writer names, such as "
                             f"('csv', 'xlsx'), not {self.writers!r}")
        object.__setattr__(self, "writers", writers)
        for name in ("save_overlays", "save_masks", "overwrite", "quiet"):  # "no" would be true
            object.__setattr__(self, name, _switch(f"RunConfig.{name}", getattr(self, name)))
