"""The torch and onnx backend plugins on a tiny random-weight bundle: same answers, device
fallback in one line, damaged model files named in the error."""

import json
import shutil
import types
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from safetensors.torch import save_file  # noqa: E402

from wbc_batch.backend import BackendError, ModelSession  # noqa: E402
from wbc_batch.bundle import BundleError, load_bundle, write_meta  # noqa: E402
from wbc_batch.plugins import get_backends, get_plugin_manager  # noqa: E402

TINY = {
    "classes": ["neutrophil", "lymphocyte", "monocyte", "eosinophil", "basophil"],
    "segmenter": {"diameter": 40, "arch": {"widths": [4, 8, 8, 8, 8], "groups": 2}},
    "classifier": {"crop_size": 32, "crop_margin": 1.3, "temperature": 1.0,
                   "arch": {"widths": [4, 8, 8, 8], "blocks": [1, 1, 1, 1], "groups": 2,
                            "num_classes": 5}},
}


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    from wbc_batch.export import export_onnx
    from wbc_batch.nets import build_classifier, build_segmenter

    torch.manual_seed(0)
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("tiny") / "bundle"
    write_meta(root, TINY)
    save_file(build_segmenter(TINY).state_dict(), str(root / "segmenter.safetensors"))
    save_file(build_classifier(TINY).state_dict(), str(root / "classifier.safetensors"))
    export_onnx(root, root)
    return root


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path):
    dst = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, dst)
    return dst


@pytest.fixture(scope="module")
def backends():
    return get_backends(get_plugin_manager(autoload=False))


@pytest.mark.parametrize("name", ["torch", "onnx"])
def test_open_and_run(backends, tiny_bundle, name, capfd):
    session = backends[name].open(load_bundle(tiny_bundle), "cpu", threads=1)
    assert isinstance(session, ModelSession)
    assert session.device == "cpu" and session.fallback_note == ""
    assert session.thread_safe is True  # else `run` on a GPU would analyse one image at a time
    seg = session.segment(np.zeros((2, 3, 64, 96), np.float32))
    clf = session.classify(np.zeros((3, 3, 32, 32), np.float32))
    assert seg.shape == (2, 3, 64, 96) and seg.dtype == np.float32
    assert clf.shape == (3, 5) and clf.dtype == np.float32
    assert capfd.readouterr().err == ""


def test_both_backends_give_the_same_logits(backends, tiny_bundle):
    rng = np.random.default_rng(0)
    bundle = load_bundle(tiny_bundle)
    a = backends["torch"].open(bundle, "cpu", threads=1)
    b = backends["onnx"].open(bundle, "cpu", threads=1)
    x = rng.standard_normal((1, 3, 96, 128)).astype(np.float32)
    c = rng.standard_normal((8, 3, 32, 32)).astype(np.float32)
    assert np.abs(a.segment(x) - b.segment(x)).max() < 1e-3
    la, lb = a.classify(c), b.classify(c)
    assert np.abs(la - lb).max() < 1e-3
    assert (la.argmax(1) == lb.argmax(1)).all()


@pytest.mark.parametrize("name", ["torch", "onnx"])
def test_cuda_without_gpu_falls_back_in_one_line(backends, tiny_bundle, name, no_gpu, capfd):
    session = backends[name].open(load_bundle(tiny_bundle), "cuda", threads=1)
    assert session.device == "cpu"
    assert session.fallback_note == "cuda requested but no CUDA device found; running on the CPU"
    assert capfd.readouterr().err == ""


@pytest.mark.parametrize("requested", ["auto", "cuda"])
@pytest.mark.parametrize("name, runtime", [("torch", "this PyTorch build has no CUDA support"),
                                           ("onnx", "this onnxruntime has no CUDA provider")])
def test_gpu_the_runtime_cannot_use_is_named_in_the_note(backends, tiny_bundle, name, runtime,
                                                        requested, monkeypatch, capfd):
    """A GPU is present but the runtime was built without CUDA (onnxruntime instead of
    onnxruntime-gpu, a CPU-only torch wheel): the note says so, not "no CUDA device found"."""
    import onnxruntime as ort

    import wbc_batch_plugins.onnx_backend as ob
    import wbc_batch.devices as tb  # where the torch side asks the driver

    monkeypatch.setattr(ob, "cuda_driver_device_count", lambda: 1)
    monkeypatch.setattr(tb, "cuda_driver_device_count", lambda: 1)
    monkeypatch.setattr(ort, "get_available_providers", lambda: [ob.CPU_EP])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(torch.version, "cuda", None)
    session = backends[name].open(load_bundle(tiny_bundle), requested, threads=1)
    assert session.device == "cpu"
    assert runtime in session.fallback_note and "no CUDA device found" not in session.fallback_note
    assert session.fallback_note.endswith("; running on the CPU") and "\n" not in session.fallback_note
    assert capfd.readouterr().err == ""


def test_onnx_cuda_provider_failure_is_one_line(backends, tiny_bundle, monkeypatch, capfd):
    """Pretend a GPU is present: where the CUDA provider cannot start (no GPU or libraries
    here), ONNX Runtime's own messages are swallowed and replaced by one line."""
    import onnxruntime as ort

    import wbc_batch_plugins.onnx_backend as ob

    if ob.cuda_driver_device_count() > 0:
        pytest.skip("a real GPU is present; this test simulates its absence")
    if ob.CUDA_EP not in ort.get_available_providers():
        pytest.skip("this onnxruntime has no CUDA provider")
    monkeypatch.setattr(ob, "cuda_driver_device_count", lambda: 1)
    session = backends["onnx"].open(load_bundle(tiny_bundle), "cuda:0", threads=1)
    assert session.device == "cpu"
    # named as asked for, as torch's note and resolve_device's are (before: no prefix)
    assert session.fallback_note.startswith("cuda:0 requested: ONNX Runtime could not start CUDA (")
    assert "\n" not in session.fallback_note
    assert capfd.readouterr().err == ""
    assert session.classify(np.zeros((1, 3, 32, 32), np.float32)).shape == (1, 5)
    auto = backends["onnx"].open(load_bundle(tiny_bundle), "auto", threads=1)
    assert auto.fallback_note.startswith("ONNX Runtime could not start CUDA (")


def test_onnx_cuda_provider_that_raises_is_one_line_with_its_reason(backends, tiny_bundle,
                                                                     monkeypatch, capfd):
    """A CUDA provider that raises while the session is made (a driver too old for its CUDA):
    ONNX Runtime's own Python fallback prints a four-line "EP Error" block on stdout; that
    block is swallowed and its reason becomes the one line."""
    import onnxruntime as ort

    import wbc_batch_plugins.onnx_backend as ob

    if ob.CUDA_EP not in ort.get_available_providers():
        pytest.skip("this onnxruntime has no CUDA provider")
    real = ort.InferenceSession._create_inference_session

    def create(self, providers, *args, **kwargs):
        if any(ob.CUDA_EP in str(p) for p in providers):
            self._fallback_providers = [ob.CPU_EP]  # as ORT's own sets it before the C++ call
            raise RuntimeError(".../cuda_call.cc:129 CUDA failure 35: CUDA driver version is "
                               "insufficient for CUDA runtime version ; GPU=0 ; hostname=lab ; "
                               "expr=cudaSetDevice(info_.device_id); \n\n")  # as ORT ends it
        return real(self, providers, *args, **kwargs)

    monkeypatch.setattr(ort.InferenceSession, "_create_inference_session", create)
    monkeypatch.setattr(ob, "_cuda_count", lambda ort: 1)
    session = backends["onnx"].open(load_bundle(tiny_bundle), "cuda:0", threads=1)
    assert session.device == "cpu"
    assert session.fallback_note == ("cuda:0 requested: ONNX Runtime could not start CUDA (CUDA failure 35: CUDA "
                                     "driver version is insufficient for CUDA runtime version); "
                                     "running on the CPU")
    printed = capfd.readouterr()
    assert "EP Error" not in printed.out and printed.err == ""


def test_onnx_provider_failing_while_running_moves_both_networks_to_the_cpu_once(caplog,
                                                                                 capfd):
    # before: ORT's own fallback printed "EP Error ..." on stdout and the session (and run.json)
    # kept saying cuda:0
    pytest.importorskip("onnxruntime")
    from onnxruntime.capi.onnxruntime_pybind11_state import EPFail

    import wbc_batch_plugins.onnx_backend as ob

    class Net:
        def __init__(self, fail):
            self.fail, self.providers = fail, [ob.CUDA_EP, ob.CPU_EP]

        def get_inputs(self):
            return [type("I", (), {"name": "input"})()]

        def set_providers(self, providers):
            self.providers = providers

        def run(self, names, feed):
            if self.fail and ob.CUDA_EP in self.providers:
                raise EPFail("CUDA error cudaErrorMemoryAllocation: out of memory\n\n")
            return [np.zeros((1, 5), np.float32)]

    session = ob.OnnxSession(Net(False), Net(True), "cuda:0")
    assert session.classify(np.zeros((1, 3, 32, 32))).shape == (1, 5)
    assert session.device == "cpu" and session.segmenter.providers == [ob.CPU_EP]
    assert session.fallback_note == ("ONNX Runtime's CUDA provider failed while running (CUDA "
                                     "error cudaErrorMemoryAllocation: out of memory); the rest "
                                     "of the run used the CPU")
    assert caplog.text.count("failed while running") == 1
    assert capfd.readouterr().out == ""
    with pytest.raises(ValueError):  # any other error is the image's own
        ob.OnnxSession(type("Bad", (Net,), {"run": lambda *a: (_ for _ in ()).throw(
            ValueError("bad input"))})(False), Net(False), "cuda:0").segment(np.zeros((1, 3, 8, 8)))


@pytest.mark.parametrize("kind, message, moves", [
    ("Fail", "[ONNXRuntimeError] : 1 : FAIL : Non-zero status code returned while running Conv "
             "node. Name:'/enc/conv' Status Message: CUDA failure 2: out of memory ; GPU=0", True),
    ("RuntimeException", "[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero status code "
                         "returned while running Conv node. Status Message: /onnxruntime/core/"
                         "framework/bfc_arena.cc:376 void* onnxruntime::BFCArena::"
                         "AllocateRawInternal(size_t, bool, ...) Failed to allocate memory for "
                         "requested buffer of size 201326592", True),
    ("DeviceReset", "device reset", True),
    ("Fail", "[ONNXRuntimeError] : 1 : FAIL : Non-zero status code returned while running "
             "NhwcConv node. Status Message: CUDNN_FE failure 11: CUDNN_BACKEND_API_FAILED ; "
             "GPU=0 ; hostname=lab ; file=/onnxruntime_src/onnxruntime/core/providers/cuda/nn/"
             "conv.cc", True),
    ("RuntimeException", "[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero status code "
                         "returned while running Reshape node. Status Message: /onnxruntime_src/"
                         "onnxruntime/core/providers/cuda/tensor/reshape.h:47 The input tensor "
                         "cannot be reshaped to the requested shape", False),
    ("InvalidArgument", "[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Got invalid dimensions for "
                        "input: input for the following indices index: 1 Got: 4 Expected: 3",
     False),
])
def test_onnx_cuda_faults_as_the_cuda_provider_raises_them_move_to_the_cpu(kind, message, moves):
    # before, only EPFail moved the run: the CUDA provider raises Fail for a CUDA call that fails
    # and RuntimeException for its memory pool, so every image after an out-of-memory failed
    pytest.importorskip("onnxruntime")
    import onnxruntime.capi.onnxruntime_pybind11_state as ort_errors

    import wbc_batch_plugins.onnx_backend as ob

    error = getattr(ort_errors, kind)(message)

    class Net:
        providers = [ob.CUDA_EP, ob.CPU_EP]

        def get_inputs(self):
            return [type("I", (), {"name": "input"})()]

        def set_providers(self, providers):
            self.providers = providers

        def run(self, names, feed):
            if ob.CUDA_EP in self.providers:
                raise error
            return [np.zeros((1, 5), np.float32)]

    session = ob.OnnxSession(Net(), Net(), "cuda:0")
    if moves:
        assert session.classify(np.zeros((1, 3, 32, 32))).shape == (1, 5)
        assert session.device == "cpu" and "failed while running" in session.fallback_note
    else:
        with pytest.raises(type(error)):
            session.classify(np.zeros((1, 3, 32, 32)))
        assert session.device == "cuda:0" and session.fallback_note == ""


@pytest.mark.parametrize("name", ["torch", "onnx"])
def test_bad_cuda_index_is_an_error(backends, tiny_bundle, name, monkeypatch):
    import wbc_batch_plugins.onnx_backend as ob

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(ob, "_cuda_count", lambda ort: 1)
    with pytest.raises(BackendError, match="cuda:3 does not exist here"):
        backends[name].open(load_bundle(tiny_bundle), "cuda:3")


def _edit_meta(root, edit):
    meta = json.loads((root / "bundle.json").read_text(encoding="utf-8"))
    edit(meta)
    write_meta(root, meta)


@pytest.mark.parametrize("recorded", [True, False])  # False: an export older than its hashes
@pytest.mark.parametrize("damage", ["missing", "truncated", "empty", "wrong_model"])
def test_damaged_onnx_file_is_named(backends, bundle_copy, damage, recorded):
    from wbc_batch.bundle import ONNX_SOURCE

    if not recorded:
        _edit_meta(bundle_copy, lambda meta: meta.pop(ONNX_SOURCE))
    target = bundle_copy / "classifier.onnx"
    if damage == "missing":
        target.unlink()
    elif damage == "truncated":
        target.write_bytes(target.read_bytes()[:300])
    elif damage == "empty":
        target.write_bytes(b"")
    else:
        shutil.copy(bundle_copy / "segmenter.onnx", target)
    with pytest.raises(BackendError, match="classifier.onnx") as info:
        backends["onnx"].open(load_bundle(bundle_copy), "cpu")
    assert "\n" not in str(info.value)
    if damage in ("missing", "empty"):  # the command to run, for this bundle
        assert f"write them with `wbc-batch export-onnx --model {bundle_copy}`" in str(info.value)
    if damage == "missing":
        assert f"{bundle_copy} has no classifier.onnx;" in str(info.value)
    elif recorded and damage != "empty":  # (empty: "model file is empty", from the bundle)
        # before: "retrained since, or files copied from another bundle?" only
        assert "classifier.onnx itself is not the file export-onnx wrote (modified or damaged" \
            in str(info.value)
        assert "export-onnx --model" in str(info.value)
    elif damage != "empty":  # ONNX Runtime's own error, as it loads or runs the file, then what to do
        assert f"write it again with `wbc-batch export-onnx --model {bundle_copy}`" \
            in str(info.value)


def test_an_older_bundle_whose_exports_cannot_be_checked_says_so(backends, tiny_bundle,
                                                                  bundle_copy, caplog):
    # a bundle.json from before the hashes were recorded: a retrained classifier beside its old
    # export ran silently, 2 of 20 sample cells of another class than torch gave
    from wbc_batch.bundle import ONNX_SOURCE, WEIGHTS_SHA256

    backends["onnx"].open(load_bundle(tiny_bundle), "cpu")
    assert "cannot be checked" not in caplog.text  # exports recorded: checked, not warned of

    def older(meta):
        meta.pop(ONNX_SOURCE)
        for net in ("segmenter", "classifier"):
            meta[net].pop(WEIGHTS_SHA256, None)

    _edit_meta(bundle_copy, older)
    backends["onnx"].open(load_bundle(bundle_copy), "cpu")
    assert caplog.text.count("cannot be checked") == 1
    assert (f"the ONNX files in {bundle_copy} cannot be checked against its weights: its "
            "bundle.json, written by an earlier wbc-batch, records no hash of the weights or of "
            "the export (segmenter, classifier)") in " ".join(caplog.text.split())
    assert f"Write them with `wbc-batch export-onnx --model {bundle_copy}` once" in caplog.text


def test_a_bundle_never_exported_names_both_files_and_the_command(backends, bundle_copy):
    # before: only segmenter.onnx named, and `export-onnx` without --model, which is refused
    for name in ("segmenter.onnx", "classifier.onnx"):
        (bundle_copy / name).unlink()
    with pytest.raises(BackendError) as info:
        backends["onnx"].open(load_bundle(bundle_copy), "cpu")
    assert str(info.value) == (f"{bundle_copy} has no segmenter.onnx and classifier.onnx; write "
                               f"them with `wbc-batch export-onnx --model {bundle_copy}`")
    (bundle_copy / "classifier.onnx").mkdir()  # before: "has no classifier.onnx", and the
    with pytest.raises(BackendError) as info:  # export it advised failed on the folder
        backends["onnx"].open(load_bundle(bundle_copy), "cpu")
    assert str(info.value) == (f"{bundle_copy / 'classifier.onnx'} is a folder, not an ONNX file; "
                               f"remove it, then write the exports with `wbc-batch export-onnx "
                               f"--model {bundle_copy}`")


class _FakeOrt:
    """The parts of onnxruntime `_open_model` uses, recording the sessions asked for; a session
    asked for CUDA gets it only where `cuda_starts`."""

    class GraphOptimizationLevel:
        ORT_ENABLE_ALL = 99

    class SessionOptions:
        def __init__(self):
            self.entries = {}

        def add_session_config_entry(self, key, value):
            self.entries[key] = value

    def __init__(self, cuda_starts=True):
        self.cuda_starts, self.opened = cuda_starts, []
        ort = self

        class InferenceSession:
            def __init__(self, path, options, providers):
                ort.opened.append((path, options, providers))
                names = [p[0] if isinstance(p, tuple) else p for p in providers]
                self.providers = [n for n in names if n != "CUDAExecutionProvider"
                                  or ort.cuda_starts]

            def get_providers(self):
                return self.providers

        self.InferenceSession = InferenceSession


@pytest.mark.parametrize("device, providers", [
    ("cuda:1", [("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"]),
    ("cuda", [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]),
    ("cpu", ["CPUExecutionProvider"]),
])
def test_onnx_sessions_get_the_gpu_asked_for_and_the_threads(device, providers):
    # without a GPU: that cuda:N reaches ONNX Runtime as its device_id, and --threads as its
    # intra-op threads, was checked by no test
    from wbc_batch_plugins.onnx_backend import _open_model

    ort = _FakeOrt()
    session, note = _open_model(ort, "m.onnx", device, threads=3)
    (_, options, asked), = ort.opened
    assert asked == providers and options.intra_op_num_threads == 3 and note == ""
    _, note = _open_model(_FakeOrt(cuda_starts=False), "m.onnx", device, threads=0)
    assert note.startswith("ONNX Runtime could not start CUDA (") if device != "cpu" else not note


@pytest.mark.parametrize("falls_back", ["segmenter", "classifier"])
def test_onnx_keeps_both_networks_on_one_device_when_one_cannot_use_the_gpu(
        backends, tiny_bundle, monkeypatch, falls_back):
    import wbc_batch_plugins.onnx_backend as ob

    opened, real = [], ob._open_model

    def open_model(ort, path, device, threads):  # a CPU session, said to be where it was asked
        opened.append((Path(path).stem, device))
        note = "no CUDA" if device.startswith("cuda") and Path(path).stem == falls_back else ""
        return real(ort, path, "cpu", threads)[0], note

    monkeypatch.setattr(ob, "_open_model", open_model)
    monkeypatch.setattr(ob, "_cuda_count", lambda ort: 1)
    monkeypatch.setattr(ob, "_preload_cuda_libraries", lambda ort: None)
    session = backends["onnx"].open(load_bundle(tiny_bundle), "cuda:0")
    assert session.device == "cpu" and session.fallback_note == "cuda:0 requested: no CUDA"
    # where each network's last session runs: the CPU when asked, or when CUDA did not start
    last = {name: "cpu" if name == falls_back else device for name, device in opened}
    assert last == {"segmenter": "cpu", "classifier": "cpu"}, opened


def test_torch_backend_takes_the_device_resolved_and_the_threads(backends, tiny_bundle,
                                                                 monkeypatch):
    import torch

    import wbc_batch.nets as nets

    made = []
    monkeypatch.setattr(nets, "torch_cuda_devices", lambda: (2, ""))
    monkeypatch.setattr(nets.TorchSession, "from_bundle",
                        classmethod(lambda cls, bundle, device, note:
                                    made.append(device) or types.SimpleNamespace()))
    before = torch.get_num_threads()
    try:
        backends["torch"].open(load_bundle(tiny_bundle), "cuda:1", threads=1)
        assert made == ["cuda:1"] and torch.get_num_threads() == 1
        backends["torch"].open(load_bundle(tiny_bundle), "auto")
        assert made[-1] == "cuda:0"
    finally:
        torch.set_num_threads(before)


def _crop_size(size):
    """An edit of bundle.json: the classifier's crop size, and its training record's with it."""
    def edit(meta):
        meta["classifier"]["crop_size"] = size
        if isinstance(meta["classifier"].get("config"), dict):
            meta["classifier"]["config"]["crop_size"] = size
    return edit


def test_a_crop_size_unlike_the_one_trained_is_refused(bundle_copy):
    # before: the torch backend classified 64x64 crops with weights trained on 96x96 ones, and
    # cells changed class without any error (the onnx backend refused it)
    meta = json.loads((bundle_copy / "bundle.json").read_text())
    meta["classifier"].setdefault("config", {})["crop_size"] = meta["classifier"]["crop_size"]
    (bundle_copy / "bundle.json").write_text(json.dumps(meta))
    load_bundle(bundle_copy)
    _edit_meta(bundle_copy, lambda meta: meta["classifier"].update(crop_size=48))
    with pytest.raises(BundleError, match=r"classifier.crop_size is 48, but the classifier was "
                                          r"trained with \d+ \(classifier.config.crop_size\)"):
        load_bundle(bundle_copy)


def test_an_export_for_another_crop_size_says_both_sizes(backends, bundle_copy):
    # before: "... does not accept (N, 3, 48, 48) float32 crops: INVALID_ARGUMENT : Got invalid
    # dimensions for input: input for the following indices", the sizes cut off
    _edit_meta(bundle_copy, _crop_size(48))
    with pytest.raises(BackendError) as info:
        backends["onnx"].open(load_bundle(bundle_copy), "cpu")
    message = str(info.value)
    assert "classifier.onnx takes 32x32 crops, but bundle.json says crop_size 48" in message
    assert f"export-onnx --model {bundle_copy}" in message and "\n" not in message


def test_weights_changed_since_the_export_say_export_again_before_any_ort_error(backends,
                                                                               bundle_copy):
    # retrained for another crop size: before, ORT's shape error came first and the stale
    # export was never mentioned
    from wbc_batch.nets import build_classifier

    torch.manual_seed(1)
    save_file(build_classifier(TINY).state_dict(), str(bundle_copy / "classifier.safetensors"))
    _edit_meta(bundle_copy, _crop_size(48))
    with pytest.raises(BackendError) as info:
        backends["onnx"].open(load_bundle(bundle_copy), "cpu")
    message = str(info.value)
    assert message.startswith(f"the ONNX files in {bundle_copy} are not the export of its weights: "
                              "classifier.safetensors has changed since the export")
    assert f"write them again with `wbc-batch export-onnx --model {bundle_copy}`" in message
    assert "INVALID_ARGUMENT" not in message and "segmenter" not in message


def test_ort_errors_keep_the_dimensions_it_names(tiny_bundle):
    import onnxruntime as ort

    from wbc_batch_plugins.onnx_backend import _one_line

    session = ort.InferenceSession(str(tiny_bundle / "classifier.onnx"),
                                   providers=["CPUExecutionProvider"])
    with pytest.raises(Exception) as info:
        session.run(None, {"input": np.zeros((1, 3, 48, 40), np.float32)})
    line = _one_line(str(info.value))
    assert "index: 2 Got: 48 Expected: 32; index: 3 Got: 40 Expected: 32" in line
    assert "\n" not in line and not line.startswith("[ONNXRuntimeError]")


@pytest.mark.parametrize("damage", ["missing", "truncated", "wrong_shape"])
def test_damaged_torch_file_is_named(backends, bundle_copy, damage):
    from wbc_batch.nets import build_segmenter

    target = bundle_copy / "segmenter.safetensors"
    if damage == "missing":
        target.unlink()
    elif damage == "truncated":
        target.write_bytes(target.read_bytes()[:300])
    else:
        other = dict(TINY, segmenter=dict(TINY["segmenter"], arch={"widths": [8, 8, 8, 8, 8],
                                                                   "groups": 2}))
        save_file(build_segmenter(other).state_dict(), str(target))
    with pytest.raises(BackendError, match="segmenter.safetensors"):
        backends["torch"].open(load_bundle(bundle_copy), "cpu")


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_pipeline_with_real_backend(tiny_bundle, tmp_path, backend):
    """The whole run path with real (random-weight) networks: every image ends ok."""
    from wbc_batch.config import RunConfig
    from wbc_batch.pipeline import run

    from conftest import standard_field, write_image

    write_image(tmp_path / "in" / "a.png", standard_field(120, 90))
    out = tmp_path / "out"
    cfg = RunConfig(input_dir=tmp_path / "in", output_dir=out, backend=backend, device="cpu",
                    model_dir=tiny_bundle, writers=("csv",), threads=1, quiet=True)
    outcome = run(cfg, get_plugin_manager(autoload=False))
    assert outcome.exit_code == 0 and outcome.results[0].ok
    info = json.loads((out / "run.json").read_text(encoding="utf-8"))
    names = {v["file"] for v in info["models"]["files"].values()}
    assert {"segmenter.safetensors", "classifier.safetensors", "segmenter.onnx",
            "classifier.onnx", "bundle.json"} <= names


def test_availability_says_when_onnxruntime_cannot_use_a_present_gpu(backends, monkeypatch):
    import onnxruntime as ort

    import wbc_batch_plugins.onnx_backend as ob

    monkeypatch.setattr(ort, "get_available_providers", lambda: [ob.CPU_EP])
    monkeypatch.setattr(ob, "cuda_driver_device_count", lambda: 1)
    usable, detail = backends["onnx"].availability()
    assert usable and detail.startswith("CPU only (a GPU is present") and "onnxruntime-gpu" in detail
    monkeypatch.setattr(ob, "cuda_driver_device_count", lambda: 0)
    assert backends["onnx"].availability()[1] == "CPU only (no CUDA provider in this onnxruntime)"


def test_onnxruntime_half_removed_or_shadowed_by_the_cpu_package_says_how_to_repair(
        backends, tiny_bundle, monkeypatch):
    # a review: `pip install onnxruntime` beside onnxruntime-gpu made a GPU machine run on the CPU
    # silently, and uninstalling it left a module without code: "AttributeError: module
    # 'onnxruntime' has no attribute 'SessionOptions'", while `pip check` saw nothing wrong
    import sys
    import types
    from importlib import metadata

    import onnxruntime as ort

    import wbc_batch_plugins.onnx_backend as ob

    real_version = metadata.version
    monkeypatch.setattr(metadata, "version", lambda d: "1.30.0" if d in (
        "onnxruntime", "onnxruntime-gpu") else real_version(d))
    monkeypatch.setattr(ort, "get_available_providers", lambda: [ob.CPU_EP])
    monkeypatch.setattr(ob, "cuda_driver_device_count", lambda: 0)
    usable, detail = backends["onnx"].availability()
    assert usable and detail.endswith("the CPU package 'onnxruntime' is installed beside "
                                      f"'onnxruntime-gpu': pip uninstall -y onnxruntime && "
                                      f"{ob.ORT_REPAIR})")

    # with a GPU present, the run's note gave "(install onnxruntime-gpu)", which changes nothing
    monkeypatch.setattr(ob, "cuda_driver_device_count", lambda: 1)
    assert ob._why_no_cuda(ort) == ("a GPU is present, but the CPU package 'onnxruntime', "
                                    "installed beside 'onnxruntime-gpu', took its place: pip "
                                    f"uninstall -y onnxruntime && {ob.ORT_REPAIR}")
    assert backends["onnx"].availability()[1] == f"CPU only ({ob._why_no_cuda(ort)})"
    monkeypatch.setattr(ob, "cuda_driver_device_count", lambda: 0)

    monkeypatch.setitem(sys.modules, "onnxruntime", types.ModuleType("onnxruntime"))  # no code
    usable, detail = backends["onnx"].availability()
    assert not usable and detail.endswith(f"repair it with: {ob.ORT_REPAIR}")
    with pytest.raises(BackendError, match="the onnxruntime package is incomplete"):
        backends["onnx"].open(load_bundle(tiny_bundle), "cpu")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # not installed: how to install it
    usable, detail = backends["onnx"].availability()
    assert not usable and detail == ("onnxruntime cannot be imported: onnxruntime is not "
                                     "installed; install it with: pip install onnxruntime-gpu "
                                     "(pip install onnxruntime where no GPU build exists, as on "
                                     "macOS)")


def test_availability_with_a_gpu_seen_does_not_promise_that_cuda_starts(backends, monkeypatch):
    # before: "CUDA: 1 device(s)", though ONNX Runtime may lack the libraries to start CUDA
    import onnxruntime as ort

    import wbc_batch_plugins.onnx_backend as ob

    monkeypatch.setattr(ort, "get_available_providers", lambda: [ob.CUDA_EP, ob.CPU_EP])
    monkeypatch.setattr(ob, "cuda_driver_device_count", lambda: 2)
    usable, detail = backends["onnx"].availability()
    assert usable and detail.startswith("CUDA provider built in, 2 GPU(s) seen (not started here; "
                                        "a run falls back to the CPU with a note if it cannot)")
    assert "\n" not in detail


def test_torch_session_holds_cpu_weights_channels_last_and_returns_plain_arrays(tiny_bundle):
    """On a CPU the torch backend keeps its 3x3 convolution weights in channels-last order
    (`nets.to_device`, faster there); it still returns C-ordered arrays (what OpenCV expects)
    equal, up to float rounding, to those of the network in PyTorch's default order."""
    import copy

    from wbc_batch.nets import TorchSession, build_classifier, build_segmenter, load_weights

    bundle = load_bundle(tiny_bundle)
    seg = load_weights(build_segmenter(bundle.meta), bundle.path("segmenter")).eval()
    clf = load_weights(build_classifier(bundle.meta), bundle.path("classifier")).eval()
    plain_seg, plain_clf = copy.deepcopy(seg), copy.deepcopy(clf)
    session = TorchSession(seg, clf, "cpu")
    for net in (session.segmenter, session.classifier):
        kernels = [m.weight for m in net.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
        assert kernels and all(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
                               for w in kernels)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 64, 96)).astype(np.float32)
    c = rng.standard_normal((4, 3, 32, 32)).astype(np.float32)
    with torch.inference_mode():
        want_seg, want_clf = plain_seg(torch.from_numpy(x)).numpy(), plain_clf(torch.from_numpy(c)).numpy()
    got_seg, got_clf = session.segment(x), session.classify(c)
    assert got_seg.flags.c_contiguous and got_clf.flags.c_contiguous
    assert np.abs(got_seg - want_seg).max() < 1e-4 and np.abs(got_clf - want_clf).max() < 1e-4


def test_torch_session_out_of_gpu_memory_retries_alone_then_serialises():
    """A GPU too small for several analyses at once: the pass that ran out of memory is retried
    alone, and from then on passes wait their turn (slower, but no image fails)."""
    import threading
    import time

    from wbc_batch.nets import TorchSession

    class Tight(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.calls, self.active, self.most = 0, 0, 0
            self.lock = threading.Lock()

        def forward(self, x):
            with self.lock:
                self.calls += 1
                first = self.calls == 1
                self.active += 1
                self.most = max(self.most, self.active)
            try:
                if first:
                    raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
                time.sleep(0.01)
                return torch.zeros((x.shape[0], 3, x.shape[2], x.shape[3]))
            finally:
                with self.lock:
                    self.active -= 1

    seg = Tight()
    session = TorchSession(seg, torch.nn.Identity())
    x = np.zeros((1, 3, 32, 32), np.float32)
    assert session.segment(x).shape == (1, 3, 32, 32) and session.serialised and seg.calls == 2
    seg.most = 0
    threads = [threading.Thread(target=session.segment, args=(x,)) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seg.calls == 8 and seg.most == 1


def test_torch_session_other_errors_are_not_retried():
    from wbc_batch.nets import TorchSession

    class Broken(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError("shape mismatch")

    session = TorchSession(Broken(), torch.nn.Identity())
    with pytest.raises(RuntimeError, match="shape mismatch"):
        session.segment(np.zeros((1, 3, 32, 32), np.float32))
    assert not session.serialised


# --- on a real GPU (skipped where there is none, as on CI) ---------------------------------------

def _onnx_can_use_cuda() -> bool:
    import onnxruntime as ort

    import wbc_batch_plugins.onnx_backend as ob

    return ob.CUDA_EP in ort.get_available_providers() and ob.cuda_driver_device_count() > 0


needs_torch_gpu = pytest.mark.skipif(not torch.cuda.is_available(),
                                     reason="needs a CUDA GPU that PyTorch can use")
needs_onnx_gpu = pytest.mark.skipif(not _onnx_can_use_cuda(),
                                    reason="needs a CUDA GPU and onnxruntime-gpu")


def _parity(gpu, cpu, seg_tol: float, clf_tol: float) -> None:
    """Same inputs on both sessions: float32 numpy out, logits close, same classes."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 96, 128)).astype(np.float32)
    c = rng.standard_normal((8, 3, 32, 32)).astype(np.float32)
    sg, sc = gpu.segment(x), cpu.segment(x)
    lg, lc = gpu.classify(c), cpu.classify(c)
    assert isinstance(sg, np.ndarray) and sg.dtype == np.float32 and sg.shape == sc.shape
    assert np.abs(sg - sc).max() < seg_tol
    assert np.abs(lg - lc).max() < clf_tol and (lg.argmax(1) == lc.argmax(1)).all()


@needs_torch_gpu
@pytest.mark.parametrize("requested", ["auto", "cuda", "cuda:0"])
def test_torch_runs_on_a_real_gpu_like_on_the_cpu(backends, tiny_bundle, requested, capfd):
    bundle = load_bundle(tiny_bundle)
    gpu = backends["torch"].open(bundle, requested, threads=1)
    assert gpu.device == "cuda:0" and gpu.fallback_note == ""
    assert next(gpu.segmenter.parameters()).is_cuda and next(gpu.classifier.parameters()).is_cuda
    # cuDNN may use TF32 for convolutions: close, not equal
    _parity(gpu, backends["torch"].open(bundle, "cpu", threads=1), 1e-2, 1e-2)
    assert capfd.readouterr().err == ""


@needs_onnx_gpu
def test_onnx_runs_on_a_real_gpu_like_on_the_cpu(backends, tiny_bundle, capfd):
    bundle = load_bundle(tiny_bundle)
    gpu = backends["onnx"].open(bundle, "cuda", threads=1)
    assert gpu.device == "cuda:0" and gpu.fallback_note == ""
    assert gpu.segmenter.get_providers()[0] == "CUDAExecutionProvider"
    assert gpu.classifier.get_providers()[0] == "CUDAExecutionProvider"
    _parity(gpu, backends["onnx"].open(bundle, "cpu", threads=1), 1e-2, 1e-2)
    assert capfd.readouterr().err == ""


@needs_torch_gpu
def test_default_models_on_a_real_gpu_find_what_the_cpu_finds(tmp_path):
    """The shipped models through the whole pipeline, `--device auto` on a GPU machine against
    `--device cpu`: same cells, same classes, boxes and probabilities within rounding."""
    import cv2
    import pandas as pd

    from wbc_batch.config import RunConfig
    from wbc_batch.pipeline import run
    from wbc_batch.sample import make_smear

    images = tmp_path / "in"
    images.mkdir()
    for seed, n in ((3, 3), (4, 5)):
        smear = make_smear(640, 480, n_wbc=n, seed=seed)
        cv2.imwrite(str(images / f"field_{seed}.png"), cv2.cvtColor(smear.rgb, cv2.COLOR_RGB2BGR))
    cells = {}
    for device in ("auto", "cpu"):
        cfg = RunConfig(input_dir=images, output_dir=tmp_path / device, device=device,
                        writers=("csv",), save_overlays=False, quiet=True)
        outcome = run(cfg, get_plugin_manager(autoload=False))
        assert outcome.exit_code == 0 and outcome.fallback_note == ""
        assert outcome.device == ("cuda:0" if device == "auto" else "cpu")
        cells[device] = pd.read_csv(tmp_path / device / "cells.csv")
    gpu, cpu = cells["auto"], cells["cpu"]
    assert len(gpu) == len(cpu) >= 6
    assert list(gpu["image"]) == list(cpu["image"]) and list(gpu["class"]) == list(cpu["class"])
    boxes = ["x", "y", "width", "height"]
    assert (gpu[boxes] - cpu[boxes]).abs().to_numpy().max() <= 2
    probs = [c for c in gpu.columns if c.startswith("prob_")]
    assert (gpu[probs] - cpu[probs]).abs().to_numpy().max() < 0.01


class OnTheGpu:
    """What a torch wrapper returns when it forgets `.cpu()`: numpy cannot convert it."""

    def __array__(self, *args, **kwargs):
        raise RuntimeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu()")


@pytest.mark.parametrize("call, bad, message", [
    ("classify", lambda out: np.full_like(out, np.nan), "returned values that are not finite"),
    ("classify", lambda out: out[:, :3], "returned shape"),
    ("segment", lambda out: out[:, :2], "returned shape"),
    # before: "analysis failed: RuntimeError: can't convert cuda:0 ...", naming no backend
    ("classify", lambda out: OnTheGpu(), "returned a OnTheGpu that is not an array of numbers "
                                         "(RuntimeError: can't convert cuda:0 device type tensor"),
    ("segment", lambda out: [out[0], out[0, :1]], "returned a list that is not an array of "
                                                  "numbers (ValueError: setting an array element"),
])
def test_a_backend_that_returns_the_wrong_thing_fails_the_image_with_a_reason(
        pm, make_config, fake_plugin, image_folder, tmp_path, monkeypatch, call, bad, message):
    # before: NaN logits made every cell a neutrophil (exit 0); 3 classes crashed the reports
    # after the whole batch; 2 segmentation channels gave 0 cells, exit 0
    from conftest import FakeSession

    from wbc_batch.pipeline import run

    real = getattr(FakeSession, call)
    monkeypatch.setattr(FakeSession, call, lambda self, batch: bad(real(self, batch)))
    outcome = run(make_config(image_folder, tmp_path / "out"), pm)
    assert outcome.exit_code == 1
    failed = [r for r in outcome.results if r.status == "error"]
    assert failed and all(r.error.startswith("analysis failed in backend 'fake': the backend's "
                                             f"{call} {message}") for r in failed)
    assert (tmp_path / "out" / "images.csv").is_file()


@pytest.mark.parametrize("call", ["segment", "classify"])
def test_an_exception_in_a_backends_session_names_the_backend(pm, make_config, fake_plugin,
                                                             image_folder, tmp_path, monkeypatch,
                                                             call):
    # a third party's segment() raising gave "analysis failed: RuntimeError: ...", no backend
    from conftest import FakeSession

    from wbc_batch.pipeline import run

    def exploded(self, batch):
        raise RuntimeError("revplug exploded\nsecond line")

    monkeypatch.setattr(FakeSession, call, exploded)
    outcome = run(make_config(image_folder, tmp_path / "out"), pm)
    failed = [r for r in outcome.results if r.status == "error"]
    assert failed and {r.error for r in failed} == {
        f"analysis failed in backend 'fake': the backend's {call} raised RuntimeError: revplug "
        "exploded second line"}


def test_a_damaged_shipped_bundle_says_to_reinstall_not_to_export_or_train(
        backends, bundle_copy, monkeypatch):
    # before: "write them with `wbc-batch export-onnx --model .../wbc_batch/models`" and "train it
    # again", both of which refuse the shipped bundle
    import wbc_batch.bundle as bundle_module

    monkeypatch.setattr(bundle_module, "DEFAULT_BUNDLE_DIR", bundle_copy)
    (bundle_copy / "segmenter.onnx").unlink()
    with pytest.raises(BackendError, match=r"has no segmenter.onnx; the installed wbc-batch is "
                                           r"damaged: reinstall it \(pip install --force-reinstall"):
        backends["onnx"].open(load_bundle(bundle_copy), "cpu")
    weights = bundle_copy / "classifier.safetensors"
    _edit_meta(bundle_copy, lambda meta: meta["classifier"].update(
        weights_sha256=bundle_module.sha256_file(weights)))
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a copy cut short
    with pytest.raises(BundleError, match=r"the file is damaged or was copied only in part.*; the "
                                          r"installed wbc-batch is damaged: reinstall it"):
        load_bundle(bundle_copy)
    # in a checkout (pip install -e .) a reinstall leaves the file as it is: git restores it
    checkout = bundle_copy.parent / "checkout"
    (checkout / ".git").mkdir(parents=True)
    (checkout / "wbc_batch").mkdir()
    shutil.copytree(bundle_copy, checkout / "wbc_batch" / "models")
    monkeypatch.setattr(bundle_module, "DEFAULT_BUNDLE_DIR", checkout / "wbc_batch" / "models")
    with pytest.raises(BundleError, match=r"; the checkout's models folder is damaged: restore it "
                                          r"with `git checkout -- wbc_batch/models` in "):
        load_bundle(checkout / "wbc_batch" / "models")
    monkeypatch.undo()
    with pytest.raises(BundleError, match=r"damaged or was copied only in part.*; restore both "
                                          r"files, or train it again$"):
        load_bundle(bundle_copy)


def test_the_torch_backend_gives_back_the_thread_count_it_set(backends, tiny_bundle, monkeypatch):
    # torch's thread count is the process's: a host program's later work (and a later run with
    # threads=0, "all cores") stayed on the one thread a run had asked for
    import wbc_batch.nets as nets

    monkeypatch.setitem(nets._THREADS, "sessions", 0)  # sessions other tests left open
    before = torch.get_num_threads()
    torch.set_num_threads(3)  # the host program's own
    try:
        a = backends["torch"].open(load_bundle(tiny_bundle), "cpu", threads=1)
        b = backends["torch"].open(load_bundle(tiny_bundle), "cpu", threads=2)
        assert torch.get_num_threads() == 2
        a.close()
        assert torch.get_num_threads() == 2  # b still runs, on its threads
        a.close()  # twice: given back once
        b.close()
        assert torch.get_num_threads() == 3  # the host's, whatever order they closed in
        left = backends["torch"].open(load_bundle(tiny_bundle), "cpu", threads=0)  # never closed
        c = backends["torch"].open(load_bundle(tiny_bundle), "cpu", threads=1)
        c.close()
        assert torch.get_num_threads() == 3 and not left.threads_claimed  # 0 leaves it alone
    finally:
        torch.set_num_threads(before)


def test_the_onnx_backend_keeps_onnx_runtime_from_writing_telemetry(tmp_path):
    """ONNX Runtime wrote a device id and a telemetry queue (OS, CPU, model names) under
    ~/.cache for upload, and warned on a service account without a writable home."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("ORT_")}
    env["HOME"] = str(tmp_path)
    model = Path(__file__).resolve().parents[1] / "wbc_batch" / "models" / "classifier.onnx"
    code = ("from wbc_batch_plugins.onnx_backend import _ort\n"
            f"_ort().InferenceSession({str(model)!r}, providers=['CPUExecutionProvider'])\n")
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120)
    assert not list(tmp_path.rglob("*")), "onnxruntime wrote under HOME"
    # a user's own choice stands
    env["ORT_DISABLE_TELEMETRY"] = "0"
    code += "import os; assert os.environ['ORT_DISABLE_TELEMETRY'] == '0'\n"
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120)
