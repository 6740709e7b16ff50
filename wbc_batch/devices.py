"""Choosing the device: one pure function, used by every backend.

`resolve_device(requested, cuda_count)` decides; backends only tell it how many CUDA devices their
runtime can use. The rules (also in the README):

- `auto`: the first CUDA device when there is one, else the CPU with the one-line note
  "no CUDA device found; running on the CPU". Where a GPU is present but the backend's runtime
  cannot use it (a CPU-only onnxruntime or PyTorch build), the backend passes that reason, and
  the note names it instead: "this onnxruntime has no CUDA provider (...); running on the CPU".
- `cpu`: the CPU.
- `cuda` / `cuda:N` on a machine without a usable CUDA device: the CPU, with a one-line note
  saying so ("cuda requested but no CUDA device found; running on the CPU", or with the
  backend's reason: "cuda:0 requested: a GPU is present, but ...; running on the CPU"). A run
  written for a GPU workstation then still completes on a laptop; the note is printed and
  recorded in run.json.
- `cuda:N` where CUDA devices exist but N is not one of them: an error (a typo, most likely),
  naming the devices present.
"""

from __future__ import annotations

import re

from .errors import WbcBatchError

NO_CUDA = "no CUDA device found"
NO_CUDA_NOTE = f"{NO_CUDA}; running on the CPU"

_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


class DeviceError(WbcBatchError, ValueError):
    """A device name that is malformed, or a CUDA index that does not exist here."""


def parse_device(text: str) -> str:
    """Normalise a device name ("auto", "cpu", "cuda" or "cuda:N", any case, spaces stripped).

    :raises DeviceError: for anything else.
    """
    name = str(text).strip().lower()
    if not _DEVICE_RE.match(name):
        raise DeviceError(f"invalid device {text!r}: use auto, cpu, cuda or cuda:N")
    return name


def fallback_is_news(requested: str) -> bool:
    """Whether the note that a run fell back to the CPU is said under `--quiet` too: yes for a
    device the user asked for (`cuda`, `cuda:N`), no for `auto`, where the CPU is no news."""
    return requested != "auto"


def resolve_device(requested: str, cuda_count: int, why_none: str = "") -> tuple:
    """The device to use and a note for the user.

    :param requested: "auto", "cpu", "cuda" or "cuda:N".
    :param cuda_count: CUDA devices usable by the backend's runtime (0 when none).
    :param why_none: why `cuda_count` is 0, when the backend knows better than "no CUDA device
        found" (e.g. a GPU is present but the runtime was built without CUDA).
    :returns: (device, note): device is "cpu" or "cuda:N"; note is "" or one line explaining
        why the CPU is used although CUDA was asked for or could have been.
    :raises DeviceError: malformed name, or "cuda:N" beyond the devices present.
    """
    name = parse_device(requested)
    if name == "cpu":
        return "cpu", ""
    fallback = f"{why_none or NO_CUDA}; running on the CPU"
    if name == "auto":
        return ("cuda:0", "") if cuda_count > 0 else ("cpu", fallback)
    index = int(name.split(":")[1]) if ":" in name else 0
    if cuda_count <= 0:  # a backend's reason says "a GPU is present, but ...": no second "but"
        joint = ":" if why_none else " but"
        return "cpu", f"{name} requested{joint} {fallback}"
    if index >= cuda_count:
        present = ", ".join(f"cuda:{i}" for i in range(cuda_count))
        raise DeviceError(f"device {name} does not exist here (present: {present})")
    return f"cuda:{index}", ""


def cuda_driver_device_count() -> int:
    """How many CUDA devices the NVIDIA driver reports, without importing torch; 0 when there is
    no driver or no device. Never raises."""
    import ctypes
    import ctypes.util

    names = ["libcuda.so.1", "libcuda.so", "nvcuda.dll"]
    found = ctypes.util.find_library("cuda")
    if found:
        names.insert(0, found)
    for lib_name in names:
        try:
            lib = ctypes.CDLL(lib_name)
        except OSError:
            continue
        try:
            if lib.cuInit(0) != 0:
                return 0
            count = ctypes.c_int(0)
            if lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
                return 0
            return int(count.value)
        except (AttributeError, OSError):
            return 0
    return 0
