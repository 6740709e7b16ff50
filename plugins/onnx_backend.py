"""Built-in plugin: the `onnx` backend (ONNX Runtime on `segmenter.onnx` / `classifier.onnx`).

The CUDA execution provider is used when the resolved device is `cuda:N` and ONNX Runtime offers
it; otherwise the CPU provider. ONNX Runtime reports a provider that cannot start (missing CUDA or
cuDNN libraries, say) with several lines of its own on stderr; those are captured here and
replaced by one line in the session's `fallback_note`, and the run goes on on the CPU.

Before anything is opened, the ONNX files are compared with the hashes `export-onnx` recorded in
bundle.json: an export older than the weights, or an ONNX file changed since, is a `BackendError`
saying which file changed and to run export-onnx again. Then each model is checked once, on a
small zero batch (and the classifier's declared crop size against bundle.json's), so a file of the
wrong model (or a wrong shape) is a clear `BackendError` naming the file instead of a failure
mid-run.
onnxruntime is imported only when the backend is asked about its availability or opened.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from wbc_batch import CLASSES
from wbc_batch.backend import BackendError, onnxruntime_telemetry_off
from wbc_batch.devices import DeviceError, cuda_driver_device_count, parse_device, resolve_device
from wbc_batch.hookspecs import hookimpl
from wbc_batch.results import shell_arg

log = logging.getLogger("wbc_batch")

CUDA_EP = "CUDAExecutionProvider"
CPU_EP = "CPUExecutionProvider"
#: ONNX Runtime log severities: 0 verbose, 1 info, 2 warning, 3 error, 4 fatal
ERROR_SEVERITY = 3


#: puts back the files of onnxruntime-gpu that another package's onnxruntime overwrote or removed
#: (both install into one `onnxruntime` folder)
ORT_REPAIR = "pip install --force-reinstall --no-deps onnxruntime-gpu"


def _ort():
    """The onnxruntime module. Raises ImportError, saying how to repair it, for one without its
    code: `pip uninstall onnxruntime` run where onnxruntime-gpu shares its folder leaves that,
    and `pip check` does not notice."""
    onnxruntime_telemetry_off()  # read when onnxruntime starts: before the import
    try:
        import onnxruntime
    except ModuleNotFoundError as exc:
        if exc.name != "onnxruntime":
            raise
        raise ImportError("onnxruntime is not installed; install it with: pip install "
                          "onnxruntime-gpu (pip install onnxruntime where no GPU build exists, "
                          "as on macOS)") from None

    if not hasattr(onnxruntime, "InferenceSession"):
        raise ImportError("the onnxruntime package is incomplete (the CPU package 'onnxruntime' "
                          "installed or removed beside 'onnxruntime-gpu' takes their shared files "
                          f"with it); repair it with: {ORT_REPAIR}")
    return onnxruntime


def _cpu_package_over_gpu() -> bool:
    """Whether both the CPU package 'onnxruntime' and 'onnxruntime-gpu' are installed: the one
    installed last owns their shared folder, so a GPU machine may silently run on the CPU."""
    from importlib import metadata

    found = 0
    for dist in ("onnxruntime", "onnxruntime-gpu"):
        try:
            metadata.version(dist)
            found += 1
        except metadata.PackageNotFoundError:
            pass
    return found == 2


def _cuda_count(ort) -> int:
    """CUDA devices ONNX Runtime could use: its CUDA provider is built in and a driver sees GPUs."""
    try:
        if CUDA_EP not in ort.get_available_providers():
            return 0
    except Exception:  # noqa: BLE001
        return 0
    return cuda_driver_device_count()


def _why_no_cuda(ort) -> str:
    """Why ONNX Runtime cannot use CUDA, when a GPU is present ("" otherwise: no GPU at all)."""
    try:
        has_provider = CUDA_EP in ort.get_available_providers()
    except Exception:  # noqa: BLE001
        has_provider = False
    if not has_provider and cuda_driver_device_count() > 0:
        if _cpu_package_over_gpu():  # `pip install onnxruntime-gpu` would change nothing
            return ("a GPU is present, but the CPU package 'onnxruntime', installed beside "
                    "'onnxruntime-gpu', took its place: pip uninstall -y onnxruntime && "
                    f"{ORT_REPAIR}")
        return "a GPU is present, but this onnxruntime has no CUDA provider (install onnxruntime-gpu)"
    return ""


class OnnxBackend:
    """Runs the bundle's ONNX exports with ONNX Runtime."""

    name = "onnx"

    def availability(self) -> tuple:
        try:
            ort = _ort()
        except Exception as exc:  # noqa: BLE001 - must not raise
            return False, f"onnxruntime cannot be imported: {exc}"
        count = _cuda_count(ort)
        if count:  # whether the provider starts (its CUDA and cuDNN libraries) shows only in `open`
            return True, (f"CUDA provider built in, {count} GPU(s) seen (not started here; a run "
                          "falls back to the CPU with a note if it cannot) (onnxruntime "
                          f"{ort.__version__})")
        if CUDA_EP in ort.get_available_providers():
            return True, "CPU only (CUDA provider built in, but no CUDA device found)"
        why = _why_no_cuda(ort) or "no CUDA provider in this onnxruntime"
        if _cpu_package_over_gpu() and "took its place" not in why:
            why += (f"; the CPU package 'onnxruntime' is installed beside 'onnxruntime-gpu': "
                    f"pip uninstall -y onnxruntime && {ORT_REPAIR}")
        return True, f"CPU only ({why})"

    def open(self, bundle, device: str = "auto", threads: int = 0):
        """Open both ONNX models on `device`; `threads` > 0 sets the CPU threads per model."""
        from wbc_batch.bundle import FILES, BundleError

        try:
            ort = _ort()
        except Exception as exc:  # noqa: BLE001
            raise BackendError(f"the onnx backend needs onnxruntime, which cannot be imported: {exc}") from exc
        try:  # ONNX Runtime's process-wide logger: errors only (warnings are not for users)
            ort.set_default_logger_severity(ERROR_SEVERITY)
        except Exception:  # noqa: BLE001
            pass
        try:
            resolved, note = resolve_device(device, _cuda_count(ort), _why_no_cuda(ort))
        except DeviceError as exc:
            raise BackendError(str(exc)) from exc
        try:
            seg_path = bundle.path("segmenter_onnx")
            clf_path = bundle.path("classifier_onnx")
        except BundleError as exc:  # missing or empty; the export writes both
            names = [FILES[n] for n in ("segmenter_onnx", "classifier_onnx")]
            folders = [n for n in names if (bundle.root / n).is_dir()]
            if folders:  # export-onnx cannot write over it
                raise BackendError(f"{bundle.root / folders[0]} is a folder, not an ONNX file; "
                                   + _export(bundle.root, "remove it, then write the exports")
                                   ) from exc
            missing = [n for n in names if not (bundle.root / n).is_file()]
            problem = f"{bundle.root} has no {' and '.join(missing)}" if missing else str(exc)
            raise BackendError(f"{problem}; " + _export(bundle.root, "write them")) from exc
        changed = _changed_since_export(bundle)
        if changed:  # before the checks below, whose ORT errors would not say what to do
            raise BackendError(f"the ONNX files in {bundle.root} are not the export of its "
                               f"weights: {changed}; "
                               + _export(bundle.root, "write them again"))
        unchecked = _unchecked_exports(bundle)
        if unchecked:
            log.warning("the ONNX files in %s cannot be checked against its weights: its "
                        "bundle.json, written by an earlier wbc-batch, records no hash of the "
                        "weights or of the export (%s); if the weights were retrained after the "
                        "export, this backend runs the old networks. %s once to check and "
                        "record them", bundle.root, ", ".join(unchecked),
                        _export(bundle.root, "Write them").rstrip("."))
        if resolved.startswith("cuda"):
            _preload_cuda_libraries(ort)
        seg, seg_note = _open_model(ort, seg_path, resolved, threads)
        clf, clf_note = _open_model(ort, clf_path, "cpu" if seg_note else resolved, threads)
        if clf_note and not seg_note:  # keep both models on one device
            seg, _ = _open_model(ort, seg_path, "cpu", threads)
        if seg_note or clf_note:  # prefixed as resolve_device's notes are, where CUDA was asked for
            asked = "" if parse_device(device) == "auto" else f"{parse_device(device)} requested: "
            resolved, note = "cpu", asked + (seg_note or clf_note)
        session = OnnxSession(seg, clf, resolved, note)
        session.check(seg_path, clf_path, bundle.crop_size)
        return session


def _unchecked_exports(bundle) -> list:
    """The networks of an older bundle whose .onnx file nothing can check (`stale_onnx` checks
    the others): bundle.json records neither the export (`ONNX_SOURCE`) nor the weights' hash
    (`WEIGHTS_SHA256`)."""
    from wbc_batch.bundle import ONNX_SOURCE, WEIGHTS_SHA256

    recorded = bundle.meta.get(ONNX_SOURCE) or {}
    hashes = bundle.file_hashes()
    return [net for net in ("segmenter", "classifier")
            if f"{net}_onnx" in hashes and net not in recorded
            and not (bundle.meta.get(net) or {}).get(WEIGHTS_SHA256)]


def _changed_since_export(bundle) -> str:
    """"" when the bundle's ONNX files are the export of its weights (`ModelBundle.stale_onnx`;
    also for a bundle whose export recorded no hashes); else which files differ from those
    `export-onnx` recorded: a .safetensors (retrained, or copied in from another bundle) or the
    .onnx file itself (edited, damaged, replaced, or bundle.json and weights copied over it)."""
    from wbc_batch.bundle import ONNX_SOURCE

    stale = bundle.stale_onnx()
    if not stale:
        return ""
    recorded = bundle.meta.get(ONNX_SOURCE) or {}
    hashes = bundle.file_hashes()
    said = []
    for net in stale:
        for name, why in ((f"{net}_onnx", "itself is not the file export-onnx wrote (modified "
                                          "or damaged since, or bundle.json copied in from "
                                          "another bundle?)"),
                          (net, "has changed since the export (retrained since, or copied in "
                                "from another bundle?)")):
            now = hashes.get(name)
            if name in recorded and now is not None and now["sha256"] != recorded[name]:
                said.append(f"{now['file']} {why}")
        if net not in recorded:
            said.append(f"{hashes[net + '_onnx']['file']} was not exported from "
                        f"{hashes[net]['file']} (bundle.json records no export of these weights: "
                        "trained or copied in after the .onnx files)")
    return "; ".join(said) or f"the export of {', '.join(stale)} is out of date"


#: words in the message of ORT's `Fail` or `RuntimeException` that make it the GPU's failure (not
#: "cuda" alone: any error raised in a CUDA kernel's source file carries it in its path); a CUDA
#: library's failure is also found by ORT's form for it, `GPU_LIBRARY_FAILURE`
GPU_FAULT_WORDS = ("cuda error", "cudnn_status", "cublas_status", "bfcarena",
                   "failed to allocate memory", "out of memory")
#: how ORT's CudaCall words a CUDA library's failure: "CUDA failure 2: ...", "CUDNN_FE failure
#: 11: ...", "CUFFT failure ...", "NCCL failure ..."
GPU_LIBRARY_FAILURE = re.compile(r"\b(cu\w*|nccl) failure -?\d+", re.IGNORECASE)


def provider_failed(exc: BaseException) -> bool:
    """Whether an exception from a CUDA session's `run` is its provider's failure, not the
    model's or the input's: ORT's `EPFail` or `DeviceReset`, or its `Fail` or `RuntimeException`
    naming CUDA, cuDNN, cuBLAS or its memory pool, as the CUDA provider raises for a CUDA call
    that fails (`CUDA failure 2: out of memory`) and for its memory pool running out (`BFCArena
    ... Failed to allocate memory`)."""
    name = type(exc).__name__
    if name in ("EPFail", "DeviceReset"):
        return True
    text = str(exc)
    return name in ("Fail", "RuntimeException") and (
        any(w in text.lower() for w in GPU_FAULT_WORDS) or GPU_LIBRARY_FAILURE.search(text) is not None)


class OnnxSession:
    """Both ONNX Runtime sessions on one device; fulfils `wbc_batch.backend.ModelSession`."""

    #: ONNX Runtime's InferenceSession.run may be called from several threads at once
    thread_safe = True

    def __init__(self, segmenter, classifier, device: str, fallback_note: str = ""):
        self.segmenter = segmenter
        self.classifier = classifier
        self.device = device
        self.fallback_note = fallback_note
        self._seg_in = segmenter.get_inputs()[0].name
        self._clf_in = classifier.get_inputs()[0].name
        self._lock = threading.Lock()

    def segment(self, batch: np.ndarray) -> np.ndarray:
        return self._run("segmenter", self._seg_in, batch)

    def classify(self, batch: np.ndarray) -> np.ndarray:
        return self._run("classifier", self._clf_in, batch)

    def _run(self, which: str, name: str, batch: np.ndarray) -> np.ndarray:
        """Run one network. Where its CUDA provider fails while running (`provider_failed`: out
        of GPU memory, a driver fault), both networks move to the CPU once, with one warning and
        the reason in `device` and `fallback_note` (run.json), and the call is made again there;
        ORT's own fallback would have printed to stdout and left `device` saying cuda."""
        x = np.ascontiguousarray(batch, dtype=np.float32)
        try:
            return getattr(self, which).run(None, {name: x})[0]
        except Exception as exc:  # noqa: BLE001 - only a provider failure is handled
            if self.device == "cpu" or not provider_failed(exc):
                raise
            self._to_cpu(exc)
        return getattr(self, which).run(None, {name: x})[0]

    def _to_cpu(self, exc: BaseException) -> None:
        with self._lock:
            if self.device == "cpu":  # another thread moved them
                return
            for session in (self.segmenter, self.classifier):
                session.set_providers([CPU_EP])
            reason = _one_line(str(exc))[:160]
            self.fallback_note = (f"ONNX Runtime's CUDA provider failed while running "
                                  f"({reason}); the rest of the run used the CPU")
            self.device = "cpu"
            log.warning("%s", self.fallback_note)

    def check(self, seg_path, clf_path, crop_size: int) -> None:
        """Run each model once on zeros; BackendError naming the file when it does not fit
        (for a classifier exported for another crop size than bundle.json's, both sizes)."""
        _expect(lambda: self.segment(np.zeros((1, 3, 64, 64), np.float32)), (1, 3, 64, 64),
                seg_path, "(N, 3, H, W) float32 images")
        declared = _declared_size(self.classifier)
        if declared is not None and declared != (crop_size, crop_size):
            raise BackendError(
                f"model file {clf_path} takes {declared[0]}x{declared[1]} crops, but bundle.json "
                f"says crop_size {crop_size}: it was exported for other settings; "
                + _export(Path(clf_path).parent, "write it again"))
        _expect(lambda: self.classify(np.zeros((1, 3, crop_size, crop_size), np.float32)),
                (1, len(CLASSES)), clf_path, f"(N, 3, {crop_size}, {crop_size}) float32 crops")


def _declared_size(session):
    """(height, width) of the session's first input as the ONNX file declares it, or None when
    it is not a 4-d input with fixed height and width."""
    try:
        shape = session.get_inputs()[0].shape
    except Exception:  # noqa: BLE001 - then the zero batch of `check` tells
        return None
    if len(shape) == 4 and all(isinstance(d, int) for d in shape[2:]):
        return int(shape[2]), int(shape[3])
    return None


def _export(root, todo: str) -> str:
    """What to do about the ONNX files of the bundle at `root`: `todo` ("write them again") with
    the export-onnx command, or, for the shipped bundle, which nothing may write, reinstall."""
    from wbc_batch.bundle import repair_hint

    return repair_hint(root, f"{todo} with `wbc-batch export-onnx --model {shell_arg(root)}`")


def _expect(call, shape: tuple, path, what: str) -> None:
    todo = _export(Path(path).parent, "write it again")
    try:
        out = call()
    except Exception as exc:  # noqa: BLE001 - any ORT failure becomes one clear line
        raise BackendError(f"model file {path} does not accept {what}: {_one_line(str(exc))}; "
                           f"{todo}") from exc
    if tuple(out.shape) != shape:
        raise BackendError(f"model file {path} has the wrong shape: output {tuple(out.shape)} "
                           f"where {shape} was expected; {todo}")


def _open_model(ort, path, device: str, threads: int):
    """-> (InferenceSession, note); note is one line when CUDA was asked for but could not start."""
    so = ort.SessionOptions()
    so.log_severity_level = ERROR_SEVERITY
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.inter_op_num_threads = 1
    # idle worker threads sleep instead of spinning: the pipeline's reader and writer threads
    # share the same cores, and on 2 cores spinning measurably slows the whole run
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads and threads > 0:
        so.intra_op_num_threads = int(threads)
    if device.startswith("cuda"):
        index = int(device.split(":")[1]) if ":" in device else 0
        providers = [(CUDA_EP, {"device_id": index}), CPU_EP]
    else:
        providers = [CPU_EP]
    printed = io.StringIO()  # ORT's Python-level fallback prints its "EP Error" block here
    with _native_stderr_captured() as captured, contextlib.redirect_stdout(printed):
        try:
            session = ort.InferenceSession(str(path), so, providers=providers)
        except Exception as exc:  # noqa: BLE001
            session, error = None, exc
    if session is None:
        raise BackendError(f"cannot load model file {path}: {_one_line(str(error))}; if it is "
                           "damaged, " + _export(Path(path).parent, "write it again")
                           + "; if it needs a newer onnxruntime (an unsupported IR version or "
                           "opset), upgrade onnxruntime")
    if hasattr(session, "disable_fallback"):
        session.disable_fallback()  # a provider failing later: OnnxSession._run says so, once
    note = ""
    if device.startswith("cuda") and CUDA_EP not in session.get_providers():
        reason = _cuda_failure_reason(printed.getvalue() + captured.text())
        note = f"ONNX Runtime could not start CUDA ({reason}); running on the CPU"
    return session, note


def _preload_cuda_libraries(ort) -> None:
    """Let ONNX Runtime find CUDA/cuDNN installed as Python packages (e.g. alongside torch)."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return
    with _native_stderr_captured():
        try:
            preload()
        except Exception:  # noqa: BLE001 - the provider check reports what is missing
            pass


def _cuda_failure_reason(text: str) -> str:
    """The reason, in one line, in what ONNX Runtime said while CUDA failed to start: its C++
    log (a library that would not load) or its Python fallback's block ("EP Error ... when
    using [...]", from a provider that raised, such as a driver too old for its CUDA)."""
    m = re.search(r"EP Error:? (.+?)\s+(?:when )?using \[", text, re.S)
    if m:
        failure = re.search(r"CUDA failure \d+: [^;\n]+", m.group(1))
        return (failure.group(0).strip() if failure else _one_line(m.group(1)))[:160]
    m = re.search(r"with error: ([^\n\x1b]+)", text)
    if m:
        return m.group(1).strip()[:160]
    if "Require cuDNN" in text:
        m = re.search(r"(Require cuDNN[^.]*\.[^.]*\.)", text)
        return (m.group(1) if m else "CUDA or cuDNN libraries missing")[:160]
    return "CUDA or cuDNN libraries missing, or the GPU is not supported"


def _one_line(text: str) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    if not lines:
        return "unknown error"
    line = lines[0]
    line = re.sub(r"^\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*", "", line)
    # ORT names the wrong dimensions on lines of their own ("index: 2 Got: 48 Expected: 32")
    dims = [ln for ln in lines[1:] if re.match(r"index: \d+ Got: \d+ Expected: \d+$", ln)]
    if dims:
        line = f"{line.rstrip(': ')}: {'; '.join(dims)}"
    return line[:300]


class _Captured:
    def __init__(self):
        self._text = ""

    def text(self) -> str:
        return self._text


@contextmanager
def _native_stderr_captured():
    """Redirect file descriptor 2 (where ONNX Runtime's C++ logger writes) into a temporary file
    for the duration of the block; the text is available afterwards. Python-level writes to
    sys.stderr made in the block are captured too. Falls back to silencing ORT's logger when the
    descriptor cannot be redirected."""
    captured = _Captured()
    try:
        saved = os.dup(2)
    except OSError:
        saved = None
    if saved is None:
        try:
            _ort().set_default_logger_severity(4)
            yield captured
        finally:
            _ort().set_default_logger_severity(ERROR_SEVERITY)
        return
    with tempfile.TemporaryFile() as tmp:
        try:
            import sys

            sys.stderr.flush()
        except Exception:  # noqa: BLE001
            pass
        os.dup2(tmp.fileno(), 2)
        try:
            yield captured
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            captured._text = tmp.read().decode("utf-8", "replace")


@hookimpl
def wbc_register_backends():
    return [OnnxBackend()]
