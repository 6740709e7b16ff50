"""Device choice: one pure function, tested by passing device counts (no GPU needed)."""

import pytest

from wbc_batch.devices import (NO_CUDA_NOTE, DeviceError, cuda_driver_device_count, parse_device,
                               resolve_device)


@pytest.mark.parametrize("requested, count, expected", [
    ("auto", 0, ("cpu", NO_CUDA_NOTE)),
    ("auto", 1, ("cuda:0", "")),
    ("auto", 4, ("cuda:0", "")),
    ("cpu", 0, ("cpu", "")),
    ("cpu", 2, ("cpu", "")),
    ("cuda", 1, ("cuda:0", "")),
    ("cuda:1", 2, ("cuda:1", "")),
    ("CUDA:0", 1, ("cuda:0", "")),
    (" auto ", 0, ("cpu", NO_CUDA_NOTE)),
])
def test_resolve(requested, count, expected):
    assert resolve_device(requested, count) == expected


@pytest.mark.parametrize("requested", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_gpu_falls_back_with_one_line_note(requested):
    device, note = resolve_device(requested, 0)
    assert device == "cpu"
    assert "running on the CPU" in note and "\n" not in note
    assert requested in note


@pytest.mark.parametrize("requested", ["auto", "cuda", "cuda:1"])
def test_backend_reason_replaces_no_device_found(requested):
    device, note = resolve_device(requested, 0, why_none="this runtime has no CUDA")
    assert device == "cpu"
    assert note.endswith("this runtime has no CUDA; running on the CPU")
    assert "no CUDA device found" not in note
    assert resolve_device(requested, 2, why_none="unused")[1] == ""


def test_a_backend_reason_reads_as_one_sentence():
    # before: "cuda:0 requested but a GPU is present, but PyTorch cannot use it; ..."
    reason = "a GPU is present, but PyTorch cannot use it (driver too old for this build?)"
    assert resolve_device("cuda:0", 0, why_none=reason)[1] == f"cuda:0 requested: {reason}; running on the CPU"
    assert resolve_device("cuda", 0)[1] == "cuda requested but no CUDA device found; running on the CPU"


def test_pytorchs_cuda_warning_becomes_the_notes_reason(monkeypatch, recwarn):
    # before: PyTorch's own "UserWarning: CUDA initialization: ..." was printed beside the note
    import warnings

    import torch

    from wbc_batch import devices, nets

    def is_available():
        warnings.warn("CUDA initialization: The NVIDIA driver on your system is too old (found "
                      "version 11040). Please update your GPU driver by downloading and "
                      "installing a new version from the URL: http://www.nvidia.com/Download/"
                      "index.aspx Alternatively, go to: https://pytorch.org to install a PyTorch "
                      "version that has been compiled with your version of the CUDA driver. "
                      "(Triggered internally at /pytorch/c10/cuda/CUDAFunctions.cpp:109.)",
                      UserWarning)
        return False

    monkeypatch.setattr(torch.cuda, "is_available", is_available)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(devices, "cuda_driver_device_count", lambda: 1)
    assert nets.torch_cuda_devices() == (0, (
        "a GPU is present, but PyTorch cannot use it (CUDA initialization: The NVIDIA driver on "
        "your system is too old (found version 11040))"))
    assert len(recwarn) == 0
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # no warning: the old guess
    assert nets.torch_cuda_devices()[1].endswith("(driver too old for this build?)")


@pytest.mark.parametrize("text, reason", [
    # an HGX machine whose fabric manager is not running: the error number is the clue
    ("CUDA initialization: Unexpected error from cudaGetDeviceCount(). Did you run some cuda "
     "functions before calling NumCudaDevices() that might have already set an error? Error 802: "
     "system not yet initialized (Triggered internally at /pytorch/c10/cuda/CUDAFunctions.cpp:109.)",
     "CUDA initialization: Unexpected error from cudaGetDeviceCount() (Error 802: system not yet "
     "initialized)"),
    ("CUDA initialization: CUDA unknown error - this may be due to an incorrectly set up "
     "environment, e.g. changing env variable CUDA_VISIBLE_DEVICES after program start. Setting "
     "the available devices to be zero.",
     "CUDA initialization: CUDA unknown error - this may be due to an incorrectly set up "
     "environment, e.g. changing env variable CUDA_VISIBLE_DEVICES after program start"),
])
def test_pytorchs_cuda_warnings_keep_their_clue(text, reason):
    from wbc_batch import nets

    assert nets._cuda_reason(text) == reason


def test_cuda_index_beyond_devices_is_an_error():
    with pytest.raises(DeviceError, match=r"cuda:2 does not exist here \(present: cuda:0, cuda:1\)"):
        resolve_device("cuda:2", 2)


@pytest.mark.parametrize("bad", ["gpu", "cuda:", "cuda:x", "mps", "", "cpu:0"])
def test_malformed_names(bad):
    with pytest.raises(DeviceError, match="use auto, cpu, cuda or cuda:N"):
        parse_device(bad)


def test_driver_count_never_raises():
    assert cuda_driver_device_count() >= 0


class _Driver:
    """A stand-in for the CUDA driver library (`ctypes.CDLL("libcuda.so.1")`)."""

    def __init__(self, init_status=0, count=2, count_status=0):
        self.init_status, self.count, self.count_status = init_status, count, count_status

    def cuInit(self, flags):
        return self.init_status

    def cuDeviceGetCount(self, ref):
        ref._obj.value = self.count
        return self.count_status


@pytest.mark.parametrize("driver, expected", [
    (_Driver(), 2),
    (_Driver(count=1), 1),
    (_Driver(init_status=100), 0),   # CUDA_ERROR_NO_DEVICE from cuInit
    (_Driver(count_status=3), 0),    # cuDeviceGetCount failing
    (None, 0),                       # no driver library at all
])
def test_the_driver_count_is_what_the_driver_says_and_0_on_any_failure(monkeypatch, driver,
                                                                       expected):
    # the ONNX backend and the GPU tests' skip conditions rest on this count: a wrong one
    # would put ONNX on a GPU that is not there, or skip the GPU tests on a machine with one
    import ctypes

    def cdll(name):
        if driver is None:
            raise OSError(f"{name}: cannot open shared object file")
        return driver

    monkeypatch.setattr(ctypes, "CDLL", cdll)
    assert cuda_driver_device_count() == expected
