"""Shared fixtures: a FAKE backend plugin (no trained weights needed), a fake model bundle, and
test images drawn by code.

The fake backend is a real `Backend` / `ModelSession`: its `segment()` derives logits from pixel
colour and its `classify()` returns deterministic logits. Test fields are drawn with three
colours: a near-white background, light purple cytoplasm and dark purple nuclei, so the fake
segmenter finds exactly the drawn cells at any scale.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from wbc_batch import CLASSES
from wbc_batch.config import AnalysisParams, RunConfig
from wbc_batch.hookspecs import hookimpl

os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_configure(config):
    """In pytest's own process only: the watch tests' fake plugin imports this module in the
    watchers they start, which must keep the signals their test set to be ignored.

    A CI agent, or `nohup`, may start the tests with SIGHUP ignored, which every child process
    inherits (and keeps, as it should: `interrupts` leaves an ignored signal ignored). The tests
    of what SIGHUP does (a closed terminal) need its default; those of an ignored one set it.
    Likewise SIGINT, which a shell ignores for a job it starts in the background without job
    control (`nohup pytest &` in a script): every Ctrl-C test then failed. Python's own handler
    is what a terminal's pytest has, and a child process starts with the default from it."""
    if hasattr(signal, "SIGHUP") and signal.getsignal(signal.SIGHUP) is signal.SIG_IGN:
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


ROOT = Path(__file__).resolve().parents[1]

BACKGROUND = (240, 238, 236)
CYTOPLASM = (170, 150, 210)
NUCLEUS = (70, 30, 120)


# --- the fake backend ----------------------------------------------------------------------------

class FakeSession:
    """segment(): per image of the batch, the summed standardised channels split the pixels into
    background (brightest), cytoplasm and nucleus (darkest); a batch with no contrast is all
    background. classify(): the class follows a hash of the crop, with a clear margin."""

    thread_safe = True  # as the built-in sessions: `run` may analyse images at once on a GPU

    def __init__(self, device="cpu", fallback_note=""):
        self.device = device
        self.fallback_note = fallback_note
        self.segment_calls = 0
        self.classify_calls = 0

    def segment(self, batch: np.ndarray) -> np.ndarray:
        assert batch.dtype == np.float32 and batch.ndim == 4 and batch.shape[1] == 3
        assert batch.shape[2] % 32 == 0 and batch.shape[3] % 32 == 0
        self.segment_calls += 1
        n, _, h, w = batch.shape
        out = np.zeros((n, 3, h, w), np.float32)
        for i in range(n):
            s = batch[i].sum(axis=0)
            lo, hi = float(s.min()), float(s.max())
            cls = np.zeros((h, w), np.int64)
            if hi - lo > 3.0:
                cls[s < lo + 0.78 * (hi - lo)] = 1
                cls[s < lo + 0.30 * (hi - lo)] = 2
            for c in range(3):
                out[i, c][cls == c] = 10.0
        return out

    def classify(self, batch: np.ndarray) -> np.ndarray:
        assert batch.dtype == np.float32 and batch.ndim == 4 and batch.shape[1] == 3
        self.classify_calls += 1
        logits = np.zeros((len(batch), len(CLASSES)), np.float32)
        for i, crop in enumerate(batch):
            k = int(round(float(np.abs(crop).mean()) * 1000)) % len(CLASSES)
            logits[i, k] = 4.0
        return logits


class FakeBackend:
    name = "fake"

    def __init__(self):
        self.opened = []

    def availability(self):
        return True, "fake: always usable"

    def open(self, bundle, device="auto", threads=0):
        from wbc_batch.devices import resolve_device

        resolved, note = resolve_device(device, 0)
        self.opened.append((device, threads))
        return FakeSession(resolved, note)


class FakeBackendPlugin:
    """Registered in a test's plugin manager like any third-party plugin object."""

    def __init__(self):
        self.backend = FakeBackend()

    @hookimpl
    def wbc_register_backends(self):
        return [self.backend]


# --- fixtures ------------------------------------------------------------------------------------

@pytest.fixture
def no_gpu(monkeypatch):
    """A machine without a GPU, simulated even on one that has one: PyTorch and the CUDA driver
    (as `wbc_batch.devices` and the ONNX backend ask it) both see no device."""
    import torch
    import wbc_batch_plugins.onnx_backend as onnx_backend

    import wbc_batch.devices as devices

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(devices, "cuda_driver_device_count", lambda: 0)
    monkeypatch.setattr(onnx_backend, "cuda_driver_device_count", lambda: 0)


def register_writers(pm, *writers, name=None) -> None:
    """Register a plugin offering the report `writers`, as a third party's would be."""

    class Plugin:
        @hookimpl
        def wbc_register_report_writers(self):
            return list(writers)

    pm.register(Plugin(), name=name)


@pytest.fixture
def fake_plugin():
    return FakeBackendPlugin()


@pytest.fixture
def pm(fake_plugin):
    """A fresh plugin manager: built-ins (no entry-point autoload) plus the fake backend."""
    from wbc_batch.plugins import get_plugin_manager

    manager = get_plugin_manager(autoload=False)
    manager.register(fake_plugin, name="fake")
    yield manager
    manager.unregister(name="fake")


@pytest.fixture(scope="session")
def fake_bundle(tmp_path_factory) -> Path:
    """A model bundle folder with metadata only (the fake backend reads no weights)."""
    root = tmp_path_factory.mktemp("fake_bundle")
    meta = {"segmenter": {"diameter": 40}, "classifier": {"crop_size": 32, "temperature": 1.0},
            "classes": list(CLASSES)}
    (root / "bundle.json").write_text(json.dumps(meta), encoding="utf-8")
    return root


@pytest.fixture
def make_config(fake_bundle):
    """make_config(input_dir, output_dir, **overrides) -> RunConfig using the fake backend."""

    def make(input_dir, output_dir, **overrides):
        analysis = overrides.pop("analysis", AnalysisParams())
        base = dict(input_dir=Path(input_dir), output_dir=Path(output_dir), backend="fake",
                    device="cpu", model_dir=fake_bundle, analysis=analysis, writers=("csv",),
                    threads=1, quiet=True)
        base.update(overrides)
        return RunConfig(**base)

    return make


@pytest.fixture
def invoke(pm):
    """invoke(*args) -> click Result: `wbc-batch ARGS` in-process, with the fake backend's
    plugin manager; exceptions propagate."""
    from click.testing import CliRunner

    from wbc_batch.cli import build_cli

    return lambda *args: CliRunner().invoke(build_cli(pm), [str(a) for a in args], catch_exceptions=False)


@pytest.fixture
def fake_cli_args(fake_bundle):
    """Arguments that make `wbc-batch run` use the fake backend."""
    return ["--backend", "fake", "--model", str(fake_bundle), "--device", "cpu", "--threads", "1"]


# --- test images ---------------------------------------------------------------------------------

def draw_field(width: int, height: int, cells=(), background=BACKGROUND) -> np.ndarray:
    """A uint8 RGB field with WBCs drawn as discs: [(cx, cy, radius), ...]; nucleus radius is
    half the cell's."""
    import cv2

    rgb = np.empty((height, width, 3), np.uint8)
    rgb[:] = background
    for cx, cy, r in cells:
        cv2.circle(rgb, (int(cx), int(cy)), int(r), CYTOPLASM, -1, lineType=cv2.LINE_AA)
        cv2.circle(rgb, (int(cx), int(cy)), max(1, int(r * 0.5)), NUCLEUS, -1, lineType=cv2.LINE_AA)
    return rgb


#: optical density directions (R, G, B) of a Romanowsky stain's two dyes, roughly
AZURE, EOSIN = (0.75, 0.55, 0.2), (0.1, 0.9, 0.35)


def two_stain_smear(rng, blue=AZURE, pink=EOSIN, size: int = 48) -> tuple:
    """(uint8 RGB field, (2, 3) unit stain vectors): a field dyed by two known stains in random
    amounts, 30 % of it bare glass."""
    stains = np.array([blue, pink], np.float64)
    stains /= np.linalg.norm(stains, axis=1, keepdims=True)
    conc = rng.uniform(0, 1.2, (size, size, 2)) * (rng.random((size, size, 1)) < 0.7)
    od = conc @ stains
    return np.clip(256 * np.exp(-od) - 1, 0, 255).astype(np.uint8), stains


def stained_field(rng, cells, width: int = 320, height: int = 240, blue=AZURE, pink=EOSIN) -> np.ndarray:
    """A field like `draw_field`'s (pale background, discs [(cx, cy, r)] with a darker nucleus),
    but dyed by two stains: eosin-heavy cytoplasm, azure-heavy nucleus, with texture."""
    import cv2

    stains = np.array([blue, pink], np.float64)
    stains /= np.linalg.norm(stains, axis=1, keepdims=True)
    conc = np.zeros((height, width, 2))
    conc[..., 1] = 0.05
    cyto = np.zeros((height, width), np.uint8)
    nuc = np.zeros((height, width), np.uint8)
    for cx, cy, r in cells:
        cv2.circle(cyto, (int(cx), int(cy)), int(r), 1, -1)
        cv2.circle(nuc, (int(cx), int(cy)), max(1, int(r * 0.5)), 1, -1)
    noise = rng.uniform(0.7, 1.3, (height, width, 2))
    conc[cyto > 0] = (0.25, 0.45)
    conc[nuc > 0] = (1.1, 0.35)
    od = conc * noise @ stains
    return np.clip(256 * np.exp(-od) - 1, 0, 255).astype(np.uint8)


def standard_field(width: int = 320, height: int = 240, variant: int = 0) -> np.ndarray:
    """Three well separated cells of radius ~ height/10. Each `variant` changes the corner
    pixel, so that several images of this field are not byte-identical copies (which `run`
    and `watch` count once)."""
    r = max(6, height // 10)
    rgb = draw_field(width, height, [(width * 0.25, height * 0.3, r),
                                     (width * 0.7, height * 0.35, r), (width * 0.5, height * 0.72, r)])
    rgb[0, 0, 0] = (int(rgb[0, 0, 0]) + variant) % 256
    return rgb


def encode(rgb: np.ndarray, ext: str = ".png", params=()) -> bytes:
    """Encode an RGB (or gray/BGRA/16-bit, passed through unchanged when not 3-channel uint8)
    array with OpenCV."""
    import cv2

    arr = rgb
    if rgb.ndim == 3 and rgb.shape[2] == 3:
        arr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(ext, arr, list(params))
    assert ok
    return buf.tobytes()


def fail_decoding(monkeypatch, module, path: Path, exc: Exception) -> None:
    """Make `module.decode_smear` raise `exc` for the bytes of the file `path`: a decoder failing
    in a way nobody foresaw."""
    real, bad = module.decode_smear, Path(path).read_bytes()

    def flaky(data, *args, **kwargs):
        if data == bad:
            raise exc
        return real(data, *args, **kwargs)

    monkeypatch.setattr(module, "decode_smear", flaky)


def opened_only_by_read_bytes(monkeypatch, folder: Path) -> None:
    """`open` fails the test for a file in `folder`: its files must be read by
    `imageio.read_file` alone (which goes by os.open), once, so that one read is hashed and
    decoded."""
    import builtins

    real = builtins.open

    def guarded(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and Path(file).parent == folder:
            raise AssertionError(f"{file} opened outside Path.read_bytes")
        return real(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded)


def route_reads(monkeypatch, read) -> object:
    """Every read of an image file's bytes, by `run` (`imageio.read_bytes`) and `watch` alike,
    goes through `read(path)` (`imageio.read_file`'s place); returns the real `read_file`."""
    from wbc_batch import imageio, watch

    real = imageio.read_file
    monkeypatch.setattr(imageio, "read_file", read)
    monkeypatch.setattr(watch, "read_file", read)
    return real


class Tries(list):
    """The times reading a file was refused (`refuse_reading`); `allow()` stops refusing."""

    refusing = True

    def allow(self) -> None:
        self.refusing = False


def refuse_reading(monkeypatch, name: str, exc: Exception = None) -> Tries:
    """Reading the bytes of the file called `name` fails with `exc` (default EACCES: tests run as
    root, which reads a mode-000 file), in `run`, `watch` and their read-ahead threads alike;
    returns the list of those tries, one time.time() each."""
    tries = Tries()

    def read_file(path):
        if Path(path).name == name and tries.refusing:
            tries.append(time.time())
            raise exc or PermissionError(13, "Permission denied", str(path))
        return real(path)

    real = route_reads(monkeypatch, read_file)
    return tries


def write_image(path: Path, rgb: np.ndarray, params=()) -> Path:
    """Write an image (format from the suffix); works with any characters in the name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode(rgb, path.suffix.lower(), params))
    return path


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """INPUT with two samples: s1/a.png, s1/b.jpg, s2/c.png, and top.png at the top."""
    root = tmp_path / "input"
    write_image(root / "s1" / "a.png", standard_field())
    write_image(root / "s1" / "b.jpg", standard_field(), params=(1, 95))  # IMWRITE_JPEG_QUALITY
    write_image(root / "s2" / "c.png", draw_field(300, 200, [(150, 100, 22)]))
    write_image(root / "top.png", draw_field(200, 200, []))
    return root


def load_script(name: str):
    """scripts/<name>.py, imported as a module."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
