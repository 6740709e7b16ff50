"""The contract every inference backend plugin fulfils (torch, onnx, or a third party's).

The core never imports torch or onnxruntime: it hands float32 numpy batches to a `ModelSession`
and gets float32 logits back. Pre- and post-processing live in the core, so every backend sees
the same numbers.
"""

from __future__ import annotations

import os
from typing import Protocol, runtime_checkable

import numpy as np

from .errors import WbcBatchError
from .plugins import PLUGIN_FAILURES, reraise_stops


#: set before onnxruntime is imported, unless the user set them: ONNX Runtime on Linux and macOS
#: (1.31 here) otherwise writes a device id and a queue of telemetry events (OS, CPU, Python's
#: path, model file names) under ~/.cache/Microsoft for upload, and prints a warning where there
#: is no writable home (a lab's service account), --quiet or not. The first is its documented
#: opt-out; the second, the name later versions read.
ORT_TELEMETRY_OFF = {"ORT_DISABLE_TELEMETRY": "1", "ORT_TELEMETRY_DISABLED": "1"}


def onnxruntime_telemetry_off() -> None:
    """Turn ONNX Runtime's telemetry off for this process (`ORT_TELEMETRY_OFF`); call it before
    the first `import onnxruntime`, which reads them."""
    for name, value in ORT_TELEMETRY_OFF.items():
        os.environ.setdefault(name, value)


class BackendError(WbcBatchError, RuntimeError):
    """A backend could not load a model or run it; the message names the file or the device."""


def session_output(session, what: str, batch: np.ndarray, shape: tuple) -> np.ndarray:
    """`session.<what>(batch)` (what: "segment" or "classify"), checked (`checked_output`).

    :raises BackendError: for any exception the session raises (a third party's RuntimeError
        named no backend in the image's error row), or that turning its output into an array
        raises (a CUDA tensor, a tensor that requires grad), naming the call; MemoryError,
        BackendError and stops (`plugins.reraise_stops`) pass as they are."""
    try:
        out = getattr(session, what)(batch)
    except (BackendError, MemoryError):
        raise
    except PLUGIN_FAILURES as exc:  # the backend's own code: say it was there
        reraise_stops(exc)
        raise BackendError(f"the backend's {what} raised {_named(exc)}") from exc
    try:
        out = np.asarray(out)
    except (BackendError, MemoryError):
        raise
    except PLUGIN_FAILURES as exc:  # its output's own __array__: the backend's too
        reraise_stops(exc)
        raise BackendError(f"the backend's {what} returned a {type(out).__name__} that is not "
                           f"an array of numbers ({_named(exc)})") from exc
    return checked_output(what, out, shape)


def _named(exc: BaseException) -> str:
    """'RuntimeError: its message', in one line of at most 300 characters of message."""
    text = " ".join(str(exc).split())[:300]
    return type(exc).__name__ + (f": {text}" if text else "")


def checked_output(what: str, out, shape: tuple) -> np.ndarray:
    """A session's `segment` or `classify` output as the contract says: `shape`, finite numbers.

    A backend's fault must never be read as a result: NaN logits made every cell a neutrophil
    with exit code 0, and 3 classes instead of 5 crashed the reports after the whole batch.

    :raises BackendError: naming the call and what was wrong (the image then fails with it).
    """
    arr = np.asarray(out)
    if arr.shape != tuple(shape):
        raise BackendError(f"the backend's {what} returned shape {arr.shape}, not {tuple(shape)}")
    if not np.issubdtype(arr.dtype, np.number) or not np.isfinite(arr).all():
        raise BackendError(f"the backend's {what} returned values that are not finite numbers")
    return arr


@runtime_checkable
class ModelSession(Protocol):
    """Loaded models on one device.

    Only `segment` and `classify` are required. Optional attributes:

    - `device`: the device actually used (e.g. "cpu", "cuda:0"), reported and recorded in
      run.json; without it the session is taken to run on "cpu", whatever was requested.
    - `fallback_note`: a one-line explanation when the requested device could not be used
      ("" or absent otherwise); shown as a note and recorded in run.json.
    - `thread_safe`: True lets `run` on a CUDA device analyse several images at once, calling
      `segment` and `classify` from several threads at the same time (torch modules in
      inference mode and ONNX Runtime sessions allow that; both built-in sessions say so).
      Without it, or False, the session gets one call at a time.

    An optional `close()` releases what the session holds (GPU memory); it is called once, when
    the run or watcher is done with it. If it raises, a warning names the backend, and the run's
    reports and exit code stand.
    """

    device: str
    fallback_note: str

    def segment(self, batch: np.ndarray) -> np.ndarray:
        """float32 (N, 3, H, W), H and W multiples of 32 -> float32 logits (N, 3, H, W):
        channel 0 background, 1 cytoplasm, 2 nucleus."""

    def classify(self, batch: np.ndarray) -> np.ndarray:
        """float32 (N, 3, S, S) crops -> float32 logits (N, 5) in `wbc_batch.CLASSES` order,
        before temperature scaling."""


@runtime_checkable
class Backend(Protocol):
    """A named way of running the models. Registered through `wbc_register_backends`."""

    name: str

    def availability(self) -> tuple:
        """-> (usable: bool, detail: str), e.g. (True, "CUDA: NVIDIA H100") or
        (True, "CPU only (no CUDA device)"). Must not raise. `wbc-batch plugins` lists it, and
        a run refuses a backend that answers (False, detail), with the detail, before `open`."""

    def open(self, bundle, device: str) -> ModelSession:
        """Load `bundle` (a `wbc_batch.bundle.ModelBundle`) on `device` ("auto", "cpu", "cuda",
        "cuda:N") and return a session. Raises `BackendError` with a clear message.

        A backend may also accept a keyword `threads: int` (CPU threads for inference, 0 = its
        library's default); the pipeline passes it only to backends whose `open` has that
        parameter (or **kwargs), so the two-argument form stays valid. Device choice should go
        through `wbc_batch.devices.resolve_device`, so every backend follows the same rules."""
