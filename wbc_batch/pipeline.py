"""The batch pipeline: discover -> read -> analyse -> overlays/masks -> reports. No click here.

`Runner` holds what a run needs once (plugin manager, config, model bundle, backend session,
report writers, ground truth) and analyses images one at a time; `watch` reuses it.
`run(config)` processes a whole folder:

- Images are read by a small thread pool a few images ahead of the analysis, and each image's
  overlay and mask files are written in the background while the next image is analysed.
  Batching happens inside the analysis (tiles of a large field, the crops of all its cells).
- The per-image compute is `Runner.process_array(rgb, rel)`, a plain function of an array and
  the configuration (`wbc_batch.analysis.analyze`), so it can run in any worker.
- One bad image never stops the run: it becomes an `ImageResult` with status "error" and the
  reason, and appears in images.csv and the Errors sheet.
- Reports (all selected writers) and run.json are written at the end, each file atomically;
  an interrupted run (Ctrl-C) still writes them for the images finished so far, with
  `"interrupted": true` and `images_found` (how many the run had to do) in run.json.

Output folder: what a run refuses, and what `overwrite` removes before it, is
`wbc_batch.output_folder`'s.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import numpy as np

from . import CLASSES, __version__, interrupts, scale_spread
from .atomic import atomic_write_bytes, atomic_write_text
from .config import AnalysisParams, RunConfig
from .discovery import IMAGE_EXTENSIONS, discover_images, relative_name
from .errors import ConfigError, PipelineError, ReportError, RunnerClosedError
from .imageio import decode_smear, read_bytes, read_failure
from .output_folder import (REPORT_FILES_KEY, RUN_JSON, STAGE_PREFIX, artifact_path,
                            check_output, claimed_output, earlier_reports, record_images,
                            remove_artifacts, remove_report, resolved)
from .plugins import (PLUGIN_FAILURES, Lifecycle, PluginError, autoload_note, reraise_stops,
                      backend_availability, describe_plugins, get_backends, get_plugin_manager,
                      get_report_writers, get_truth_readers)
from .publish import publish, stage_writers
from .red_cells import sizer_of
from .results import (NOT_ANALYSED_FACT, NOT_FINISHED_FACT, ImageAnalysis, ImageNotAnalysable,
                      ImageResult, copy_failure, duplicate_note, one_line, sample_of)

#: the error of an image analysed whose overlay or mask could not be written (OUT's disk full):
#: a failure of OUT, not of the image (`watch` tries it again at its next start)
OUTPUT_FAILED = "cannot write the overlay or mask"
#: the report writer that writes a run's reports when every writer --report chose failed and it
#: was not among them, so that a run whose only writer failed does not lose its cells
SPARE_WRITER = "csv"
#: images read ahead of the analysis, and the threads reading them
PREFETCH = 2
READ_THREADS = 2
#: most images `run` analyses at once on a GPU (one per two CPU cores, up to this): each image's
#: CPU work (scale estimate, softmax, cell splitting, crops) then overlaps the others' and the
#: GPU's. On the CPU the networks already keep every core busy, so images are analysed one at a
#: time there. benchmarks/throughput.py --workers N measures other choices.
GPU_ANALYSIS_WORKERS = 8
#: an image of more pixels than this is analysed alone, after the images before it, so that
#: several analyses at once never hold several very large images in memory
ALONE_PIXELS = 25_000_000
#: PNG settings of overlays and masks: zlib level 1 with the "up" filter and run-length
#: strategy encodes a 640x480 overlay about twice as fast as OpenCV's default, and smaller
PNG_COMPRESSION = 1

log = logging.getLogger("wbc_batch")


@dataclass
class RunOutcome:
    """What `run` returns. exit_code: 0 when every image is ok, 1 when some failed, a report
    writer failed, a folder of the input could not be searched (`run_info["left_out"]`), or no
    image was analysed while files in image formats that are not read were found
    (`run_info["not_read"]`: a scanner set to WebP, whose run had exited 0 with empty reports)."""

    results: list
    exit_code: int
    report_files: list = field(default_factory=list)
    run_info: dict = field(default_factory=dict)
    seconds: float = 0.0
    device: str = ""
    fallback_note: str = ""
    #: whether this run's reports are in OUT (run.json at least); False when none could be
    #: written (a full or read-only disk)
    reports_written: bool = True
    #: with ground truth: the accuracy tables accuracy.csv and the Accuracy sheet hold
    #: (`metrics.accuracy_tables`: {section: DataFrame}); None without
    accuracy: Optional[dict] = None

    @property
    def n_cells(self) -> int:
        return sum(len(r.cells) for r in self.results)


# --- the runner ----------------------------------------------------------------------------------

def _not_usable(backend) -> str:
    """Why `backend.availability()` says it cannot run here, or "" (usable, or a check that
    failed: said in a warning, and `open` then says what is wrong, as it would have)."""
    usable, detail = backend_availability(backend)
    if usable is None:
        log.warning("backend %r: %s; opening it all the same", getattr(backend, "name", "?"), detail)
    return "" if usable is not False else (detail or "its availability check says no")


def takes_threads(backend) -> bool:
    """Whether `backend.open` takes `threads=` (a third party's may not)."""
    try:
        params = inspect.signature(backend.open).parameters
    except (TypeError, ValueError):
        return False
    return "threads" in params or any(p.kind == p.VAR_KEYWORD for p in params.values())


def open_session(backend, bundle, device: str, threads: int = 0):
    """`backend.open(bundle, device)`, passing `threads=` when the backend accepts it."""
    if takes_threads(backend):
        return backend.open(bundle, device, threads=threads)
    return backend.open(bundle, device)


class Runner:
    """Holds the plugin manager, RunConfig, ModelBundle and ModelSession; reusable by `watch`.

    :raises PipelineError: unknown backend / report writer / truth format, a model bundle that
        cannot be used, a device that cannot be had, unreadable ground truth.
    """

    def __init__(self, config: RunConfig, pm=None, session=None, bundle=None):
        from .bundle import BundleError, load_bundle

        self.config = config
        try:
            self.pm = pm if pm is not None else get_plugin_manager()
        except PluginError as exc:  # an installed plugin that cannot be loaded, said as usual
            raise PipelineError(str(exc)) from exc
        self.out = Path(config.output_dir)
        self.input_dir = Path(config.input_dir)
        self.backend = self._backend()
        installed = get_report_writers(self.pm)
        self.writers = self._writers(installed)
        #: the csv writer where --report did not choose it (`SPARE_WRITER`)
        self.spare_writer = (None if SPARE_WRITER in config.writers
                             else installed.get(SPARE_WRITER))
        #: folders of the input the search could not enter (`discover_images`' left_out)
        self.left_out: list = []
        #: files of the input in image formats that are not read (`discover_images`' not_read)
        self.not_read: list = []
        #: whether an image with flat light bands left in (`margins_left`) was said yet
        self._margins_said = False
        self._margins_lock = threading.Lock()  # images may be analysed in several threads
        self.truth = None
        self.truth_pairs = None  # {image name: truth name} of the current run (TruthSet.resolve)
        #: truth names no image of the current run reached (`TruthSet.unmatched`), recorded in
        #: run.json and accuracy.csv where `truth_covers_run` (not when one split is evaluated)
        self.truth_unmatched: list = []
        #: {truth name: [the images it could be]}: truth that several images reach, scored on none
        self.truth_ambiguous: dict = {}
        self.truth_covers_run = True
        self.warn_untruthed = True  # `evaluate` names the images without truth itself
        #: the accuracy tables' run-level warnings given (`metrics.accuracy_tables`): once a
        #: Runner, whose reports `watch` builds again after each image
        self._accuracy_warned: set = set()
        if config.truth is not None:
            self.truth = self._load_truth()
        try:
            self.bundle = bundle if bundle is not None else load_bundle(config.model_dir)
            if config.analysis.red_cell_bar:  # a broken sizer stops the run, not every image
                sizer_of(self.bundle)
        except BundleError as exc:
            raise PipelineError(str(exc)) from exc
        if session is not None and not _is_session(session):  # failed every image, later
            raise PipelineError(f"Runner(session=...) got {session!r}, which has no segment() "
                                "and classify() (wbc_batch.backend.ModelSession)")
        self.session = session if session is not None else self._open_session()
        # a session that does not say where it runs is not taken to run where it was asked
        # to (--device cuda on a machine without a GPU), nor to allow calls from many threads
        self.device = getattr(self.session, "device", None) or "cpu"
        self.fallback_note = getattr(self.session, "fallback_note", None) or ""
        #: images analysed at once by `run` (see `analysis_workers`): several only for a
        #: session that says it may be called from several threads (`thread_safe = True`)
        concurrent = getattr(self.session, "thread_safe", False) is True
        self.analysis_workers = analysis_workers(self.device) if concurrent else 1
        #: one `analyze` at a time for a session that is not `thread_safe`, whoever calls
        #: `process_array` (a program may from several threads)
        self._one_session_call = contextlib.nullcontext() if concurrent else threading.Lock()
        self._hashes = None
        self.masks_note = ""  # set by without_truth_masks
        self.last_run_info: dict = {}
        #: the accuracy tables (`metrics.accuracy_tables`) of the last reports, with --truth
        self.last_accuracy: Optional[dict] = None
        self.reports_published = False  # whether the last write_reports put its set in place
        #: the spare writer's names in OUT from the last set that needed it (`_spare_reports`),
        #: removed by the next set that does not write them (a watcher's next rebuild)
        self._spared: set = set()
        self._spared_now: set = set()
        #: the RunOutcome of the last `run`, also when a signal stopped it (it then raises
        #: KeyboardInterrupt), for the closing lines of the images it finished
        self.last_outcome: Optional[RunOutcome] = None
        self.started = datetime.now(timezone.utc)

    def _backend(self):
        backends = get_backends(self.pm)
        if self.config.backend not in backends:
            raise PipelineError(f"unknown backend {self.config.backend!r} "
                                f"(installed: {', '.join(sorted(backends)) or 'none'})"
                                f"{autoload_note(self.pm)}")
        return backends[self.config.backend]

    def _writers(self, writers: dict) -> list:
        unknown = [w for w in self.config.writers if w not in writers]
        if unknown:
            raise PipelineError(f"unknown report writer {unknown[0]!r} "
                                f"(installed: {', '.join(sorted(writers)) or 'none'})"
                                f"{autoload_note(self.pm)}")
        return [writers[name] for name in dict.fromkeys(self.config.writers)]

    def _open_session(self):
        """The backend's session for the bundle, on the configured device; a backend that fails
        in any way (a third party's sys.exit() too), or opens something that cannot segment and
        classify, is a PipelineError naming it."""
        from .backend import BackendError
        from .bundle import BundleError

        name, config = self.config.backend, self.config
        refused = _not_usable(self.backend)
        if refused:
            raise PipelineError(f"backend {name!r} is not usable here: {refused} "
                                "(wbc-batch plugins lists the backends)")
        if config.threads and not takes_threads(self.backend):
            log.warning("backend %r takes no thread count: --threads %d is not applied (run.json's "
                        "parameters.threads_applied is false)", name, config.threads)
        try:
            session = open_session(self.backend, self.bundle, config.device, config.threads)
        except (BackendError, BundleError) as exc:
            raise PipelineError(f"backend {name!r}: {exc}") from exc
        except PLUGIN_FAILURES as exc:
            reraise_stops(exc)
            raise PipelineError(f"backend {name!r} failed to open: "
                                f"{type(exc).__name__}: {one_line(exc)}") from exc
        if not _is_session(session):
            raise PipelineError(f"backend {name!r} opened {session!r}, which has no "
                                "segment() and classify() (wbc_batch.backend.ModelSession)")
        return session

    def _load_truth(self):
        from .truth import TruthError, TruthNotRecognised, load_truth

        fmt = self.config.truth_format
        readers = get_truth_readers(self.pm)
        try:
            return load_truth(self.config.truth, readers, fmt, self.input_dir)
        except TruthError as exc:
            # a name no reader has, or a truth no reader recognises: it may be a third party's
            note = autoload_note(self.pm) if (fmt not in readers if fmt else
                                              isinstance(exc, TruthNotRecognised)) else ""
            raise PipelineError(f"{exc}{note}") from exc

    # --- one image ---

    def inside_input(self, images) -> list:
        """`images` as Paths, each inside the input folder, whose path there names it in the
        reports and OUT.

        :raises PipelineError: naming the first that is not: two `field_01.jpg` of two folders
            outside it would both be named `field_01.jpg`, one overlay drawn over the other's."""
        # input/sub/../b.png is input/b.png; input/../elsewhere is not inside (its overlay
        # went outside OUT)
        images = [Path(os.path.normpath(p)) for p in images]
        for path in images:
            try:
                inside = ".." not in Path(relative_name(path, self.input_dir)).parts
            except ValueError:
                inside = False
            if not inside:
                relative = "" if path.is_absolute() else (
                    f" (a relative path is taken from the current folder, {Path.cwd()}"
                    + ("" if ".." in path.parts else f"; {self.input_dir / path} names the file "
                       "of that name inside the input folder") + ")")
                raise PipelineError(f"{path} is not inside the input folder {self.input_dir}"
                                    f"{relative}: give an input folder that holds every image "
                                    "(the reports name each by its path in it)")
        return images

    def relative(self, path) -> str:
        """The image's name in the reports: its path relative to the input folder."""
        try:
            return relative_name(path, self.input_dir)
        except ValueError:
            return Path(path).name

    def process_array(self, rgb: np.ndarray, rel: str) -> tuple:
        """Analyse one uint8 RGB image: -> (ImageResult, ImageAnalysis). May raise.

        :raises ImageNotAnalysable: (a ValueError) for an array that is not uint8 (H, W, 3),
            naming what it is (a float or 16-bit array was analysed into shifted boxes, others
            failed deep inside);
        :raises NotASmearError: (a ValueError too) for what a file would be refused as
            (`imageio.check_smear`): too small to hold a WBC, a label mask.
        :raises ConfigError: (a ValueError) for a name `rel` that is not text or a path (a
            Path is taken as its forward-slash form)."""
        from .analysis import analyze, check_rgb
        from .imageio import MAX_PIXELS, check_smear

        t0 = time.perf_counter()
        if isinstance(rel, os.PathLike):  # a Path named the result by an object, not text
            rel = Path(rel).as_posix()
        if not isinstance(rel, str) or not rel:
            raise ConfigError(f"process_array needs the image's name as text (such as "
                              f"'sample1/field.jpg'), not {rel!r}")
        check_rgb(rgb, "process_array")
        if rgb.shape[0] * rgb.shape[1] > MAX_PIXELS:  # as a file of that size is refused
            raise ImageNotAnalysable(f"image too large: {rgb.shape[1]}x{rgb.shape[0]} = "
                                     f"{rgb.shape[0] * rgb.shape[1] / 1e6:.1f} megapixels (the "
                                     f"limit is {MAX_PIXELS / 1e6:g}); split it or downscale it "
                                     "first")
        check_smear(rgb)
        given, (h, w) = self.config.analysis.diameter_px, rgb.shape[:2]
        if given and given > min(h, w):  # a typo (600 for 60) would give "ok, 0 WBCs" throughout
            raise ImageNotAnalysable(f"the WBC diameter given (--diameter {given:g} px) is larger "
                                     f"than the image's shorter side ({w}x{h}): no WBC fits in it")
        with self._one_session_call:
            session = self.session  # once: `close` from another thread may clear it meanwhile
            if session is None:
                raise RunnerClosedError("this Runner is closed: make a new one to analyse more "
                                        "images")
            analysis = analyze(rgb, session, self.bundle, self.config.analysis)
        if analysis.margins_left:
            self._note_margins(rel)
        return analysis.to_result(rel, time.perf_counter() - t0), analysis

    def _note_margins(self, rel: str) -> None:
        """Say the first image analysed with its flat margins left in, by name (run.json's
        `flat_margins` lists them all, from the results' `margins_left`)."""
        with self._margins_lock:
            first, self._margins_said = not self._margins_said, True
        if first:
            log.warning("%s has a flat light band along its edge (white padding or an info "
                        "banner); it is analysed as it is, which can lose cells and add false "
                        "ones (run.json's flat_margins lists every image like it). `run`, "
                        "`evaluate` and `watch` take --fill-margins to paint such bands in the "
                        "glass colour first (docs/EXPERIMENTS.md, \"Flat margins and info "
                        "banners\").", rel)

    def process_path(self, path) -> ImageResult:
        """Read, analyse and write the overlay/mask of one file. Never raises for a bad image:
        the result then has status "error" and the reason."""
        rel = self.relative(path)
        t0 = time.perf_counter()
        rgb, error = _read_or_reason(path)
        if error is not None:
            return ImageResult.failed(rel, error, time.perf_counter() - t0)
        result, analysis = analyse_or_fail(self.process_array, rgb, rel, self.config.backend, t0)
        if analysis is not None:
            try:
                self.save_outputs(rel, rgb, analysis)
            except Exception as exc:  # noqa: BLE001 - a write failure is reported on the image
                result = output_failed(result, exc)
        return replace(result, seconds=round(time.perf_counter() - t0, 6))

    def save_outputs(self, rel: str, rgb: np.ndarray, analysis: ImageAnalysis) -> list:
        """Write OUT/overlays/<rel>.png (unless disabled) and OUT/masks/<rel>.png (--save-masks)."""
        import cv2

        written = []
        if self.config.save_overlays:
            from .overlay import draw_overlay

            drawn = draw_overlay(rgb, analysis)
            written.append(_write_png(artifact_path(self.out, "overlays", rel),
                                      cv2.cvtColor(drawn, cv2.COLOR_RGB2BGR)))
        if self.config.save_masks:
            written.append(_write_png(artifact_path(self.out, "masks", rel), analysis.mask))
        return written

    def truth_key(self, rel: str) -> Optional[str]:
        """The ground truth's name for the image `rel`, or None (no truth for it, or no
        --truth): the run's pairing (`TruthSet.resolve`) where it was made."""
        if self.truth is None:
            return None
        return self.truth.key_for(rel) if self.truth_pairs is None else self.truth_pairs.get(rel)

    def has_truth(self, rel: str) -> bool:
        """Whether the ground truth names the image `rel` (as `score` finds its truth)."""
        return self.truth_key(rel) is not None

    def score(self, rel: str, result: ImageResult, analysis: Optional[ImageAnalysis]):
        """The ground-truth score of one image, or None (no truth for it, or no --truth)."""
        key = self.truth_key(rel)
        if key is None:
            return None
        from .metrics import score_image

        return score_image(analysis, result, self.truth[key])

    def without_truth_masks(self, images: list, say: bool = True) -> list:
        """The images that the ground truth does not name as its masks: truth kept beside the
        images (the WBC Image Dataset's folders) is not analysed as smears. What was left out
        is logged, or with `say=False` kept in `masks_note` for the caller to say (after it has
        claimed OUT)."""
        self.masks_note = ""
        if self.truth is None:
            return images
        masks = {resolved(t.mask_path) for t in self.truth.values() if t.mask_path is not None}
        if not masks:
            return images
        is_mask = [resolved(p) in masks for p in images]
        kept = [p for p, mask in zip(images, is_mask) if not mask]
        dropped = [p for p, mask in zip(images, is_mask) if mask]
        if dropped:
            self.masks_note = (f"{len(dropped)} file(s) of the input are the ground truth's "
                               f"masks ({self.relative(dropped[0])}"
                               f"{', ...' if len(dropped) > 1 else ''}) and are not analysed")
            if say:
                log.warning("%s", self.masks_note)
        return kept

    def discover(self, say: bool = True) -> list:
        """The images of the input folder to analyse (`discover_images`, OUT left out, without
        the truth's own masks: `without_truth_masks`, which `say`s how many it left out). The
        folders it could not search and the files in formats not read are kept for run.json
        (`left_out`, `not_read`)."""
        self.left_out, self.not_read = [], []
        images = discover_images(self.input_dir, exclude=self.out, left_out=self.left_out,
                                 not_read=self.not_read)
        return self.without_truth_masks(images, say=say)

    def pair_truth(self, names: list) -> dict:
        """Pair the run's image names with the truth, one to one (`TruthSet.resolve`); a truth
        name that several images reach is given to none and logged. -> {truth name: images}."""
        self.truth_pairs, ambiguous = self.truth.resolve(names)
        self.truth_ambiguous = {key: list(claimants) for key, claimants in ambiguous.items()}
        for key, claimants in ambiguous.items():
            listed = ", ".join(claimants[:3]) + (" ..." if len(claimants) > 3 else "")
            log.warning("truth %s matches %d images (%s): none of them is scored against it",
                        key, len(claimants), listed)
        if self.warn_untruthed and len(self.truth_pairs) < len(names):
            why = self.truth.several_fit_note([n for n in names if n not in self.truth_pairs])
            log.warning("ground truth found for %d of %d images; the others are analysed and "
                        "reported but not scored (accuracy.csv: images_with_truth)%s",
                        len(self.truth_pairs), len(names), f": {why}" if why else "")
        unused = self.truth.unmatched(self.truth_pairs, ambiguous)
        self.truth_unmatched = unused if self.truth_covers_run else []
        if self.warn_untruthed and unused:
            from .truth import shadowed_text

            twice = self.truth.shadowed(self.truth_pairs, unused)
            if twice:
                log.warning("%s", shadowed_text(twice, self.truth_pairs))
            unused = [k for k in unused if k not in twice]
        if self.warn_untruthed and unused:
            log.warning("%d of %d ground-truth entries match no image of this run and are not "
                        "scored (%s%s)", len(unused), len(self.truth), ", ".join(unused[:3]),
                        " ..." if len(unused) > 3 else "")
        return ambiguous

    # --- reports ---

    def model_hashes(self) -> dict:
        if self._hashes is None:
            self._hashes = self.bundle.file_hashes()
        return self._hashes

    def run_info(self, results: list, timings: Optional[dict] = None, **extra) -> dict:
        """The facts of run.json: version, backend, device, models, parameters, counts, timings.
        The device and its note are the session's now: a backend may have moved to the CPU
        while running (a GPU that failed mid-run)."""
        cfg = self.config
        if self.session is not None:
            self.device = getattr(self.session, "device", None) or self.device
            self.fallback_note = getattr(self.session, "fallback_note", None) or self.fallback_note
        ok = [r for r in results if r.ok]
        counts = {"images": len(results), "ok": len(ok),
                  "error": sum(1 for r in results if r.is_error),
                  "duplicate": sum(1 for r in results if r.status == "duplicate"),
                  "cells": sum(len(r.cells) for r in ok),
                  "needs_review": sum(r.needs_review_count for r in ok),
                  "unusual_stain": sum(r.unusual_stain_count for r in ok)}
        for c in CLASSES:
            counts[c] = sum(r.class_counts()[c] for r in ok)
        info = {
            "version": __version__,
            "analysis_revision": analysis_revision(),
            "backend": cfg.backend,
            "device": self.device,
            "device_requested": cfg.device,
            "fallback_note": self.fallback_note,
            # absolute: an archived report says where its images were, whatever the run's cwd
            "input": os.path.abspath(cfg.input_dir),
            "output": os.path.abspath(cfg.output_dir),
            "models": {"folder": os.path.abspath(self.bundle.root), "files": self.model_hashes()},
            "parameters": {
                "analysis": asdict(cfg.analysis),
                "save_overlays": cfg.save_overlays,
                "save_masks": cfg.save_masks,
                "writers": list(cfg.writers),
                "truth": os.path.abspath(cfg.truth) if cfg.truth is not None else None,
                "truth_format": cfg.truth_format,
                "truth_reader": self.truth.reader if self.truth is not None else None,
                "threads": cfg.threads,
                "threads_applied": not cfg.threads or takes_threads(self.backend),
                "analysis_workers": self.analysis_workers,
            },
            "plugins": dict(describe_plugins(self.pm)),
            "counts": counts,
            "scale_spread": scale_spread.measure(results, cfg.analysis.diameter_px),
            "left_out": list(self.left_out),
            "not_read": list(self.not_read),
            "flat_margins": [r.image for r in results if r.ok and r.margins_left],
            "bare_glass": [r.image for r in results if r.ok and r.bare_glass],
            "truth_unmatched": list(self.truth_unmatched),
            "truth_ambiguous": dict(self.truth_ambiguous),
            "timings": dict(timings or {}),
            "started": self.started.isoformat(timespec="seconds"),
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "python": sys.version.split()[0],
            "platform": platform.platform(),
        }
        info.update(extra)
        return info

    def write_reports(self, results: list, scores: Optional[dict] = None,
                      timings: Optional[dict] = None, **extra) -> list:
        """Write every selected report (atomically) and run.json; returns the paths written.
        A first signal meanwhile waits until they are; a second one that asks twice (SIGINT, or
        SIGTERM after SIGINT or SIGTERM: `interrupts._forces`) raises `interrupts.StopNow` at
        once, and OUT keeps the reports it had (`reports_published` says whether this set was
        put in place).

        :param scores: `{image: ImageScore}` from `score`, for the accuracy tables (with --truth).
        :param timings: run timings for run.json.
        """
        with interrupts.deferred():  # a signal now would leave reports of two runs side by side
            return self._write_reports(results, scores, timings, **extra)

    def _write_reports(self, results, scores, timings, **extra) -> list:
        """Each writer writes into its own empty folder inside a staging folder in OUT, and the
        files of those that succeed then replace OUT's one after another, within milliseconds,
        run.json last: a kill while the (slow) workbook is built leaves the last set whole, not
        a new images.csv beside an old report.xlsx. The files of a writer that fails are not
        published (`publish.stage_writers` says when a writer fails)."""
        t0 = time.perf_counter()
        self.out.mkdir(parents=True, exist_ok=True)
        info = self.run_info(results, timings, **extra)
        accuracy = None
        if self.truth is not None:
            from .metrics import accuracy_tables

            accuracy = accuracy_tables(results, scores or {},
                                       truth_unmatched=len(self.truth_unmatched),
                                       truth_ambiguous=len(self.truth_ambiguous),
                                       not_analysed=not_analysed(info),
                                       warned=self._accuracy_warned)
        self.last_run_info, self.last_accuracy, self.reports_published = info, accuracy, False
        try:
            stage = Path(tempfile.mkdtemp(prefix=STAGE_PREFIX, suffix=".tmp", dir=self.out))
        except OSError as exc:  # a full or read-only disk
            raise ReportError(f"the reports could not be written: {exc.strerror or exc}") from None
        try:
            files, failed = self._stage_reports(stage, results, accuracy, info, t0)
            with interrupts.shielded():  # milliseconds; a stop now would leave half a set
                written, why = publish(files, self.out)
                self.reports_published = True
        finally:  # a second signal may cut this short: the next start removes what is left
            shutil.rmtree(stage, ignore_errors=True)
        failed += why
        listed = {name.casefold() for name in info.get(REPORT_FILES_KEY, ())}
        stale = self.out / "accuracy.csv"
        if (self.truth is None and stale.is_file()  # an earlier run's, not a writer's of this set
                and stale.name.casefold() not in listed):
            stale.unlink()
        self._drop_spared(listed)
        if failed:
            raise ReportError("; ".join(failed))
        return written

    def _stage_reports(self, stage: Path, results, accuracy, info: dict, t0: float) -> tuple:
        """Every writer's files, each writer in its own empty folder under `stage`, and run.json
        at `stage`'s top. Returns (the files to publish, as (staged path, name in OUT), run.json
        last; the failures).

        When a writer fails, none of its files is published (`publish.stage_writers`).
        run.json's timings get `reports_s`: the seconds from `t0` (the start of the reports:
        accuracy, tables, every writer) to run.json, which `total_s` does not include."""
        from .reports import build_tables

        failed, files = [], []
        try:
            tables = build_tables(results, accuracy, run_info=_flat_facts(info),
                                  unfinished=info.get("samples_not_finished"))
        except Exception as exc:  # noqa: BLE001 - run.json is still written, saying why
            tables = None
            failed.append(f"the report tables could not be built: {type(exc).__name__}: "
                          f"{one_line(exc)}")
        if tables is not None:
            tables.output_dir = self.out
            files, why = stage_writers(stage, self.writers, tables)
            failed += why
            self._spared_now = set()
            if self.writers and len(why) == len(self.writers) and self.spare_writer is not None:
                files, spared = self._spare_reports(stage, tables)
                failed += spared
        if failed:
            info["report_errors"] = failed
        info[REPORT_FILES_KEY] = sorted({name for _, name in files} | self._kept_reports(failed))
        info.setdefault("timings", {})["reports_s"] = round(time.perf_counter() - t0, 3)
        try:
            atomic_write_text(stage / RUN_JSON, json.dumps(info, indent=2, default=str) + "\n")
            files.append((stage / RUN_JSON, RUN_JSON))
        except OSError as exc:  # a full or read-only disk: say so in one line, with the rest
            failed.append(f"run.json could not be written: {exc.strerror or exc}")
        return files, failed

    def _what_is_written(self) -> str:
        """After a report failure: which of this run's reports OUT holds."""
        if not self.reports_published:
            return "no report of this run is in OUT"
        if (self.last_run_info or {}).get(REPORT_FILES_KEY):
            return "the other reports are written"
        return "OUT holds only run.json, with the run's counts"

    def _spare_reports(self, stage: Path, tables) -> tuple:
        """The spare writer's files (`SPARE_WRITER`), staged when every writer chosen failed, and
        a line for report_errors saying so: a run whose only writer (a lab's upload to its LIS)
        failed would otherwise keep nothing of its cells but run.json's counts."""
        spare = stage / "spare"
        try:
            spare.mkdir()
        except OSError as exc:  # a full disk: the run's own line says no report is in OUT
            return [], [f"the {SPARE_WRITER!r} writer could not write the reports instead: "
                        f"{exc.strerror or exc}"]
        files, why = stage_writers(spare, [self.spare_writer], tables)
        if why:
            return files, why
        self._spared_now = {name for _, name in files}
        names = ", ".join(sorted(self._spared_now))
        return files, [f"every report writer chosen failed, so the {SPARE_WRITER!r} writer's "
                       f"reports are written instead, that no result is lost: {names}"]

    def _drop_spared(self, listed: set) -> None:
        """Remove the spare writer's files of an earlier set that this set (its report names,
        casefolded: `listed`) does not have: a watcher whose writer failed at one rebuild and
        works again at the next would keep a cells.csv of that rebuild for good."""
        for name in sorted(self._spared):
            if name.casefold() not in listed:
                try:
                    remove_report(self.out / name, self.out)
                except OSError as exc:
                    log.warning("could not remove %s, written when every report writer had "
                                "failed: %s", name, exc.strerror or exc)
        # those this set still lists (kept for a writer that failed again) stay to be removed
        self._spared = self._spared_now | {n for n in self._spared if n.casefold() in listed}

    def _kept_reports(self, failed: list) -> set:
        """Where a writer failed, the earlier report files (by OUT's run.json) still in OUT: a
        failed writer's files of an earlier rebuild (`watch`) stay there, and run.json keeps
        naming them, so that a later session with other writers, or `--overwrite`, removes
        them. Without a failure, only what this set's writers wrote is named."""
        if not failed:
            return set()
        return {p.relative_to(self.out).as_posix() for p in earlier_reports(self.out)} - {RUN_JSON}

    def _record_images(self, images: list) -> None:
        """Note in OUT what this run will draw (`output_folder.record_images`), so that a later
        `--overwrite` finds it even if this run is killed before its images.csv."""
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            record_images(self.out, [self.relative(p) for p in images])
        except OSError as exc:  # the overlays will say it for each image
            log.warning("cannot note the images of this run in %s: %s", self.out,
                        exc.strerror or exc)

    # --- a whole run ---

    def run(self, images: Optional[list] = None) -> RunOutcome:
        """Analyse `images` (default: everything discovered in the input folder), write the
        reports, and return the outcome. Lifecycle hooks are called along the way."""
        if self.session is None:  # every image would be an error row, over OUT's reports
            raise RunnerClosedError("this Runner is closed: make a new one to analyse more images")
        t_run = time.perf_counter()
        self.last_outcome, self.last_run_info = None, {}  # never an earlier run's facts
        if images is None:
            images = self.discover()
        images = self.inside_input(images)
        self._record_images(images)
        if self.truth is not None:
            self.pair_truth([self.relative(p) for p in images])
        hook = Lifecycle(self.pm)
        hook("wbc_run_start", config=self.config, total=len(images))
        batch = _Batch(self, images, hook)
        interrupted = False
        try:
            batch.analyse_all()
        except interrupts.StopNow:  # a second signal while the first one's image was finished
            batch.abandon()
            raise
        except KeyboardInterrupt:
            interrupted = True
        except BaseException:
            batch.abandon()
            raise
        # Every image is finished or dropped. From here to the last report a first signal waits
        # (interrupts.deferred), so that the reports are written whole, from one set of results;
        # a second stops at once (StopNow), leaving no report of this run in OUT.
        report_files, report_error = [], None
        with interrupts.deferred(stopping=interrupted), _abandoned_on_stop(batch):
            batch.close(interrupted)
            seconds = time.perf_counter() - t_run
            results = batch.results()
            try:
                unfinished = ({"samples_not_finished": samples_not_finished(
                    [self.relative(p) for p in images], results)} if interrupted else {})
                report_files = self._write_final(
                    results, batch.scores, batch.timer, seconds, interrupted=interrupted,
                    images_found=len(images), duplicates_across_samples=batch.across_samples(),
                    **unfinished)
            except ReportError as exc:  # a writer failed, or none could write (a full disk)
                report_error = exc
                log.error("%s (%s)", exc, self._what_is_written())
            except Exception as exc:  # noqa: BLE001 - the interrupt is what the user sees
                if not interrupted:
                    raise
                log.warning("could not write the reports of the interrupted run: %s",
                            one_line(exc))
            hook("wbc_run_end", config=self.config, results=results, seconds=seconds)
            exit_code = 0 if (not any(r.is_error for r in results) and report_error is None
                              and not self.left_out and (results or not self.not_read)) else 1
            self.last_outcome = RunOutcome(
                results=results, exit_code=exit_code, report_files=report_files,
                run_info=self.last_run_info, seconds=seconds, device=self.device,
                fallback_note=self.fallback_note, reports_written=self.reports_published,
                accuracy=self.last_accuracy if self.truth is not None else None)
        if interrupted:
            raise KeyboardInterrupt
        return self.last_outcome

    def _write_final(self, results, scores, timer, seconds, **extra) -> list:
        timings = {"total_s": round(seconds, 3), **{k: round(v, 3) for k, v in timer.items()},
                   "images_per_s": round(len(results) / seconds, 3) if seconds > 0 else None}
        return self.write_reports(results, scores, timings, **extra)

    def __enter__(self) -> "Runner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Release the model session (backends may hold GPU memory). A session whose optional
        `close()` fails (sys.exit() too) is named in a warning: the run it served is complete,
        and its reports and exit code stand. It does not wait for `process_array` calls in
        progress in other threads (a second Ctrl-C must stop at once): close once they have
        returned; calls that start later raise RunnerClosedError (a PipelineError and a
        RuntimeError)."""
        session, self.session = self.session, None
        close = getattr(session, "close", None)
        if not callable(close):
            return
        try:
            close()
        except PLUGIN_FAILURES as exc:
            reraise_stops(exc)
            log.warning("backend %r failed to close its session: %s: %s", self.config.backend,
                        type(exc).__name__, one_line(exc))


@contextlib.contextmanager
def _abandoned_on_stop(batch):
    """Drop `batch`'s queued work when a second signal stops the run at once."""
    try:
        yield
    except interrupts.StopNow:
        batch.abandon()
        raise


class _Batch:
    """One `Runner.run`'s images in flight: read a few ahead by a thread pool, analysed one or
    (on a GPU) several at a time, each image's files written in the background while the next
    is analysed, and each finished image reported in input order.

    A file byte-identical to one read earlier in the input order (a copy under another name, or
    a link) is a duplicate, as in `watch`: not analysed, its content counted once, under the
    first name. A copy of a file that could not be read is read on its own (the failure may be
    the first file's read, not its content). With ground truth, every image the truth names is
    analysed, scored and counted, also where it copies an earlier file; an image the truth does
    not name (`run --truth` over a folder with more) that copies an earlier file is a duplicate,
    as without truth.

    `done` maps index -> result and `scores` image -> score; each entry is stored in one step,
    so that an interrupt at any moment neither loses nor doubles an image.
    """

    def __init__(self, runner: "Runner", images: list, hook: Lifecycle):
        self.runner, self.images, self.hook = runner, images, hook
        self.total = len(images)
        self.done: dict = {}
        self.scores: dict = {}
        self.timer = {"read_s": 0.0, "analyse_s": 0.0, "write_s": 0.0}
        self.workers = max(1, int(runner.analysis_workers))
        self.readers = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="wbc-read")
        # overlays and masks: one writer keeps up with one analysis, not with several
        self.writer = ThreadPoolExecutor(max(1, self.workers // 2), thread_name_prefix="wbc-write")
        self.analysers = (ThreadPoolExecutor(self.workers, thread_name_prefix="wbc-analyse")
                          if self.workers > 1 else None)
        self.ahead: deque = deque()  # futures of the images read ahead, in order
        self.inflight: deque = deque()  # (index, rel, rgb or None, read error, read_s, job)
        self.pending = None  # (index, result, future of its output files, score)
        self.firsts: dict = {}  # content sha256 -> (index, name) of the first file holding it
        self.copies: dict = {}  # index of a duplicate -> (index, name) of the file it copies
        # with truth, the files it names are never duplicates (each is scored); they may be
        # the first of their content all the same
        self.named = [runner.truth is not None and runner.has_truth(runner.relative(p))
                      for p in images]

    def analyse_all(self) -> None:
        """Take every image through; a KeyboardInterrupt leaves the finished ones in `done`."""
        for k in range(min(PREFETCH + 1, self.total)):
            self.ahead.append(self.readers.submit(self._read, self.images[k]))
        for i, path in enumerate(self.images):
            self._start(i, path)
        while self.inflight:
            self._complete(self.inflight.popleft())
        if self.pending is not None:
            self._finish(self.pending)

    def _start(self, i: int, path: Path) -> None:
        """Take image `i`'s read, start its analysis, and complete the images it must wait for."""
        rel = self.runner.relative(path)
        self.hook("wbc_image_start", image=rel, index=i, total=self.total)
        rgb, error, read_s, sha = self.ahead.popleft().result()
        if i + PREFETCH + 1 < self.total:
            self.ahead.append(self.readers.submit(self._read, self.images[i + PREFETCH + 1]))
        self.timer["read_s"] += read_s
        # a file that could not be read is no original: a copy of it is read on its own
        counted = rgb is not None and bool(sha)
        first = self.firsts.setdefault(sha, (i, rel)) if counted else (i, rel)
        if self.named[i]:  # scored against its truth, so analysed and counted
            first = (i, rel)
        if first[0] != i:
            self.copies[i] = first
            rgb = None  # counted under its first name: nothing to analyse
        job, alone = None, False
        if rgb is not None:
            alone = rgb.shape[0] * rgb.shape[1] > ALONE_PIXELS
            while alone and self.inflight:
                self._complete(self.inflight.popleft())
            if self.analysers is None or alone:
                # analysed here, at once, so that Ctrl-C interrupts the analysis itself
                job = _done(self._analyse(rgb, rel))
            else:
                job = self.analysers.submit(self._analyse, rgb, rel)
        self.inflight.append((i, rel, rgb, error, read_s, job))
        while self.inflight and (alone or len(self.inflight) >= self.workers):
            self._complete(self.inflight.popleft())

    def _read(self, path) -> tuple:
        """-> (RGB or None, why not, seconds, the sha256 of the file's bytes or None).

        The file is read once: the bytes hashed are the bytes decoded, so a file replaced while
        it is read is never counted as a copy of content it no longer holds."""
        t = time.perf_counter()
        try:
            data = read_bytes(path)
        except Exception as exc:  # noqa: BLE001 - one bad image never stops the run
            return None, read_failure(exc), time.perf_counter() - t, None
        sha = hashlib.sha256(data).hexdigest()
        rgb, error = _decode_or_reason(data)
        return rgb, error, time.perf_counter() - t, sha

    def _analyse(self, rgb, rel) -> tuple:
        t = time.perf_counter()
        result, analysis = analyse_or_fail(self.runner.process_array, rgb, rel,
                                           self.runner.config.backend, t)
        return result, analysis, time.perf_counter() - t

    def _score(self, rel, result, analysis):
        if self.runner.truth is None:
            return None
        try:
            return self.runner.score(rel, result, analysis)
        except Exception as exc:  # noqa: BLE001 - scoring never stops the run
            log.warning("cannot score %s against the truth: %s", rel, one_line(exc))
            return None

    def _complete(self, item) -> None:
        """Take one analysed image (in input order): its score now, while its analysis is at
        hand; its files are written meanwhile and it is reported by `_finish`."""
        index, rel, rgb, error, read_s, job = item
        future = None
        if index in self.copies:  # its note once its first file is done: `_finish`
            result, analysis = ImageResult.duplicate(rel, ""), None
        elif job is None:
            result, analysis = ImageResult.failed(rel, error, read_s), None
        else:
            result, analysis, analyse_s = job.result()
            self.timer["analyse_s"] += analyse_s
            result = replace(result, seconds=round(result.seconds + read_s, 6))
            config = self.runner.config
            if analysis is not None and (config.save_overlays or config.save_masks):
                future = self.writer.submit(self.runner.save_outputs, rel, rgb, analysis)
        score = self._score(rel, result, analysis)
        if self.pending is not None:
            self._finish(self.pending)  # an interrupt in here leaves it pending, for `close`
        self.pending = (index, result, future, score)

    def _finish(self, item) -> None:
        """Wait for the image's files, then report and score it (once, even when called again
        after an interrupt)."""
        index, result, future, score = item
        if index in self.done:
            return
        if index in self.copies:  # its first file is done: a duplicate of it, or its failure
            first, name = self.copies[index]
            earlier = self.done.get(first)
            if earlier is not None and earlier.is_error:  # failed in its own sample too
                result = replace(earlier, image=result.image,  # its size and error, named
                                 error=copy_failure(name, earlier.error), seconds=0.0)
            else:
                result = ImageResult.duplicate(result.image, duplicate_note(name))
        if future is not None:
            t = time.perf_counter()
            try:
                future.result()
            except Exception as exc:  # noqa: BLE001
                result = output_failed(result, exc)
                score = self._score(result.image, result, None)  # scored as failed, as reported
            self.timer["write_s"] += time.perf_counter() - t
        if result.status != "ok":  # an --overwrite run keeps no earlier drawing of this image
            for path, exc in remove_artifacts(self.runner.out, result.image):
                log.warning("cannot remove %s (%s); it shows an earlier run's result of %s",
                            path, exc.strerror or exc, result.image)
        if score is not None:
            self.scores[result.image] = score
        self.done[index] = result
        self.hook("wbc_image_done", result=result, index=index, total=self.total)

    def close(self, interrupted: bool) -> None:
        """Stop the pools; an interrupted run drops the images still read or in analysis, and
        finishes the one whose files were being written."""
        self.readers.shutdown(wait=not interrupted, cancel_futures=True)
        if self.analysers is not None:
            self.analysers.shutdown(wait=not interrupted, cancel_futures=True)
        self.writer.shutdown(wait=True)
        if interrupted and self.pending is not None:
            try:
                self._finish(self.pending)
            except Exception as exc:  # noqa: BLE001 - the interrupt is what the user sees
                log.warning("could not finish %s: %s", self.pending[1].image, one_line(exc))

    def abandon(self) -> None:
        """After an unexpected error: drop what is queued, let the files being written end."""
        self.readers.shutdown(wait=False, cancel_futures=True)
        if self.analysers is not None:
            self.analysers.shutdown(wait=False, cancel_futures=True)
        self.writer.shutdown(wait=True)

    def results(self) -> list:
        """The finished images' results, in input order."""
        return [self.done[i] for i in sorted(self.done)]

    def across_samples(self) -> list:
        """The finished duplicates whose first file lies in another sample (a first-level
        subfolder), so that their cells are counted in that sample (not the copies of a failed
        file: they failed in their own): run.json's
        `duplicates_across_samples`, as {"image": name, "copy_of": first name}."""
        return [{"image": self.done[i].image, "copy_of": name}
                for i, (_, name) in sorted(self.copies.items())
                if i in self.done and self.done[i].status == "duplicate"
                and sample_of(self.done[i].image) != sample_of(name)]


def analysis_workers(device: str, cpu_count: Optional[int] = None) -> int:
    """How many images `Runner.run` analyses at once on `device` ("cpu" or "cuda:N")."""
    if not str(device).startswith("cuda"):
        return 1
    cores = cpu_count if cpu_count is not None else usable_cores()
    return max(1, min(GPU_ANALYSIS_WORKERS, cores // 2))


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity, e.g. a container's cpuset), else
    all the machine's."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def _is_session(session) -> bool:
    """Whether `session` has the calls of a `backend.ModelSession`."""
    return (callable(getattr(session, "segment", None))
            and callable(getattr(session, "classify", None)))


def analyse_or_fail(process, rgb: np.ndarray, rel: str, backend: str, t0: float) -> tuple:
    """`process(rgb, rel)` (`Runner.process_array`), with any failure of the analysis turned into
    an error result, as `run` and `watch` record it: -> (ImageResult, ImageAnalysis or None).
    `t0`: when the image's work began (its read), for the result's seconds."""
    h, w = rgb.shape[:2]
    try:
        return process(rgb, rel)
    except MemoryError:
        error = f"out of memory while analysing a {w}x{h} image"
    except PLUGIN_FAILURES as exc:  # one bad image (or backend call) never stops the run
        reraise_stops(exc)
        error = analysis_failure(exc, backend)
    return ImageResult(image=rel, status="error", error=error, width=int(w), height=int(h),
                       seconds=time.perf_counter() - t0), None


def output_failed(result: ImageResult, exc: BaseException) -> ImageResult:
    """`result` as an error, because its overlay or mask could not be written (`OUTPUT_FAILED`):
    OUT's failure (a full disk), not the image's, so `watch` analyses it again at its next start."""
    return replace(result, status="error", cells=(), error=f"{OUTPUT_FAILED}: {one_line(exc)}")


def analysis_failure(exc: BaseException, backend: str) -> str:
    """The error of an image whose analysis raised `exc`, in one line: the reason alone for an
    `ImageNotAnalysable` image, else the exception, which may be a fault. A BackendError (what the
    session raised, sys.exit() too, or returned, `backend.session_output`) names the backend."""
    if isinstance(exc, ImageNotAnalysable):
        return one_line(exc)
    from .backend import BackendError

    if isinstance(exc, BackendError):  # raised by, or about, the backend's session
        return f"analysis failed in backend {backend!r}: {one_line(exc)}"
    return f"analysis failed: {type(exc).__name__}: {one_line(exc)}"


def _done(value) -> Future:
    """A future that already holds `value`."""
    future: Future = Future()
    future.set_result(value)
    return future


def _read_or_reason(path) -> tuple:
    """read_smear(path) -> (rgb, None), or (None, why it failed): never raises for a bad file."""
    try:
        data = read_bytes(path)
    except Exception as exc:  # noqa: BLE001 - one bad image never stops the run
        return None, read_failure(exc)
    return _decode_or_reason(data)


def _decode_or_reason(data: bytes) -> tuple:
    """decode_smear(data) -> (rgb, None), or (None, why it failed): never raises for a bad file,
    even where a decoder fails in a way `imageio` did not foresee."""
    try:
        return decode_smear(data), None
    except Exception as exc:  # noqa: BLE001 - one bad image never stops the run
        return None, read_failure(exc)


def run(config: RunConfig, pm=None, images: Optional[list] = None) -> RunOutcome:
    """Process a folder (or the given images) as `wbc-batch run` does.

    :raises PipelineError: bad folders, results already in the output folder without
        `overwrite`, unknown backend/writer/truth format, unusable model or device.
    """
    check_output(config)  # before loading models: a usage error should come at once
    runner = Runner(config, pm)
    try:
        if images is not None:  # before OUT is claimed and made
            images = runner.inside_input(images)
        with claimed_output(config):
            return runner.run(images)
    finally:
        runner.close()


# --- helpers -------------------------------------------------------------------------------------

def _write_png(path: Path, image: np.ndarray) -> Path:
    import cv2

    params = [cv2.IMWRITE_PNG_COMPRESSION, PNG_COMPRESSION,
              cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE]
    if hasattr(cv2, "IMWRITE_PNG_FILTER"):
        params += [cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_UP]
    ok, buf = cv2.imencode(".png", image, params)
    if not ok:
        raise OSError(f"PNG encoding failed for {path.name}")
    return atomic_write_bytes(path, buf.tobytes())


def samples_not_finished(found: list, results: list) -> dict:
    """`{sample: [images finished, images found]}` for the samples of a stopped run that lack
    images (in sample order), so that its reports say which differentials are partial."""
    done, total = {}, {}
    for name in found:
        total[sample_of(name)] = total.get(sample_of(name), 0) + 1
    for r in results:
        done[r.sample] = done.get(r.sample, 0) + 1
    return {s or ".": [done.get(s, 0), n] for s, n in sorted(total.items())  # ".": the top
            if done.get(s, 0) < n}


def _not_finished_line(unfinished: dict, limit: int = 10) -> Optional[str]:
    """The Summary sheet's "s1 (5 of 10), s2 (0 of 10)" for `samples_not_finished`."""
    if not unfinished:
        return None
    shown = ", ".join(f"{s} ({d} of {n})" for s, (d, n) in list(unfinished.items())[:limit])
    more = len(unfinished) - limit
    return shown + (f" and {more} more" if more > 0 else "")


def not_analysed(info: dict) -> int:
    """How many images the run's facts say were found but not analysed: the rest of a run
    stopped by a signal (`images_found`), or a watch session's pending files."""
    if info.get("interrupted") and info.get("images_found") is not None:
        return max(0, int(info["images_found"]) - int(info["counts"]["images"]))
    return int(((info.get("watch") or {}).get("counts") or {}).get("pending") or 0)


def analysis_revision() -> int:
    """`analysis.REVISION`, without importing the analysis (and OpenCV) where it is not run."""
    from .analysis import REVISION

    return REVISION


def _changed_settings(analysis: dict) -> str:
    """run.json's analysis parameters that differ from `AnalysisParams`' defaults, as "name
    value, ...", or "none", less the review threshold and diameter the Summary sheet shows
    anyway: a report read alone says that --grey-unusual, say, chose its classes."""
    defaults = {f.name: f.default for f in fields(AnalysisParams)}
    changed = [f"{k} {v}" for k, v in analysis.items()
               if k in defaults and k not in ("review_threshold", "diameter_px") and v != defaults[k]]
    return ", ".join(changed) or "none"


def _flat_facts(info: dict) -> dict:
    """The scalar facts of run.json for the report's Summary sheet."""
    p = info["parameters"]
    c = info["counts"]
    facts = {
        # so that a writer tells a watcher's rebuild (every result so far, again) from a run
        "command": "watch" if info.get("watch") else "run",
        "version": info["version"],
        "analysis revision": info.get("analysis_revision"),
        "backend": info["backend"],
        "device": info["device"],
        "device note": info["fallback_note"] or None,
        "model folder": info["models"]["folder"],
        "input": info["input"],
        "output": info["output"],
        "started": info["started"],
        "images": c["images"],
        "images ok": c["ok"],
        "images with errors": c["error"],
        "duplicates (counted under their first name)": c.get("duplicate") or None,
        "duplicates of another sample's file": len(info.get("duplicates_across_samples") or ())
        or None,
        "folders left out": len(info.get("left_out", ())) or None,
        "files in formats not read": len(info.get("not_read", ())) or None,
        "images with flat margins analysed as they are": len(info.get("flat_margins", ())) or None,
        "images taken for bare glass (no WBC looked for)": len(info.get("bare_glass", ())) or None,
        "cells": c["cells"],
        "review threshold": p["analysis"]["review_threshold"],
        "diameter (px)": p["analysis"]["diameter_px"] or "auto",
        "other analysis settings not at their defaults": _changed_settings(p["analysis"]),
        "WBC sizes estimated, 5th to 95th percentile (px)": scale_spread.span(info.get("scale_spread")),
        scale_spread.WARNING_FACT: scale_spread.advice(info.get("scale_spread")),
        "save_overlays": p["save_overlays"],
        "save_masks": p["save_masks"],
    }
    if info.get("timings", {}).get("total_s") is not None:
        facts["seconds"] = info["timings"]["total_s"]
    if info.get("interrupted"):
        facts["interrupted"] = True
        facts["images found"] = info.get("images_found")
    facts[NOT_FINISHED_FACT] = _not_finished_line(info.get("samples_not_finished"))
    facts[NOT_ANALYSED_FACT] = not_analysed(info) or None
    return {k: v for k, v in facts.items() if v is not None}


__all__ = ["IMAGE_EXTENSIONS", "PipelineError", "ReportError", "RunOutcome", "Runner",
           "open_session", "run"]
