"""Model bundles: safe loading, clear errors, ONNX export parity. Uses tiny random-weight nets."""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from safetensors.torch import save_file  # noqa: E402

from wbc_batch.bundle import BundleError, load_bundle, write_meta  # noqa: E402
from wbc_batch import red_cells  # noqa: E402
from wbc_batch.nets import TorchSession, build_classifier, build_segmenter, load_weights  # noqa: E402
from wbc_batch.sample import empty_fields  # noqa: E402

TINY = {
    "classes": ["neutrophil", "lymphocyte", "monocyte", "eosinophil", "basophil"],
    "segmenter": {"diameter": 112, "arch": {"widths": [4, 8, 8, 8, 8], "groups": 2}},
    "classifier": {"crop_size": 32, "crop_margin": 1.3, "temperature": 1.5,
                   "arch": {"widths": [4, 8, 8, 8], "blocks": [1, 1, 1, 1], "groups": 2, "num_classes": 5}},
}


@pytest.fixture
def tiny_bundle(tmp_path):
    torch.manual_seed(0)
    root = tmp_path / "bundle"
    write_meta(root, TINY)
    save_file(build_segmenter(TINY).state_dict(), str(root / "segmenter.safetensors"))
    save_file(build_classifier(TINY).state_dict(), str(root / "classifier.safetensors"))
    return root


def test_bundle_loads_and_hashes(tiny_bundle):
    b = load_bundle(tiny_bundle)
    assert b.diameter == 112 and b.crop_size == 32 and b.temperature == 1.5
    hashes = b.file_hashes()
    # and the package's red-cell sizer, which a bundle without its own uses
    assert set(hashes) == {"segmenter", "classifier", "meta", "red_cells"}
    assert Path(hashes["red_cells"]["file"]) == red_cells.SHIPPED
    assert all(len(v["sha256"]) == 64 for v in hashes.values())


def test_session_runs_both_networks(tiny_bundle):
    s = TorchSession.from_bundle(load_bundle(tiny_bundle))
    seg = s.segment(np.zeros((1, 3, 64, 96), np.float32))
    clf = s.classify(np.zeros((3, 3, 32, 32), np.float32))
    assert seg.shape == (1, 3, 64, 96) and clf.shape == (3, 5)


@pytest.mark.parametrize("damage", ["missing", "truncated", "wrong_shape", "empty"])
def test_damaged_model_file_names_the_file(tiny_bundle, damage):
    p = tiny_bundle / "classifier.safetensors"
    if damage == "missing":
        p.unlink()
    elif damage == "truncated":
        p.write_bytes(p.read_bytes()[:200])
    elif damage == "empty":
        p.write_bytes(b"")
    else:
        other = dict(TINY, classifier=dict(TINY["classifier"], arch=dict(TINY["classifier"]["arch"], widths=[8, 8, 8, 8])))
        save_file(build_classifier(other).state_dict(), str(p))
    with pytest.raises((BundleError, ValueError), match="classifier.safetensors"):
        TorchSession.from_bundle(load_bundle(tiny_bundle))


def test_a_bundle_whose_classifier_training_stopped_says_so(tiny_bundle):
    (tiny_bundle / "classifier.safetensors").unlink()
    with pytest.raises(BundleError, match=r"not found: .*classifier.safetensors \(the bundle has a "
                                          r"segmenter but no classifier: did `wbc-batch train "
                                          r"classifier` stop"):
        load_bundle(tiny_bundle).path("classifier")


def test_a_bundle_with_a_segmenter_alone_says_what_to_train(tiny_bundle):
    import json

    meta = json.loads((tiny_bundle / "bundle.json").read_text())
    del meta["classifier"]
    (tiny_bundle / "bundle.json").write_text(json.dumps(meta))
    (tiny_bundle / "classifier.safetensors").unlink()
    with pytest.raises(BundleError, match=r"has no 'classifier' section \(a bundle with a segmenter "
                                          r"alone: train its classifier with `wbc-batch train "
                                          r"classifier -o "):
        load_bundle(tiny_bundle)


def test_pickles_are_never_loaded(tiny_bundle):
    torch.save(build_classifier(TINY).state_dict(), tiny_bundle / "classifier.safetensors")
    with pytest.raises(ValueError, match="classifier.safetensors"):
        load_weights(build_classifier(TINY), tiny_bundle / "classifier.safetensors")


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="not found"):
        load_bundle(tmp_path / "nope")
    with pytest.raises(BundleError, match="bundle.json"):
        load_bundle(tmp_path)
    (tmp_path / "bundle.json").write_text("{not json")
    with pytest.raises(BundleError, match="cannot read"):
        load_bundle(tmp_path)
    (tmp_path / "bundle.json").write_text(json.dumps({"segmenter": {}}))
    with pytest.raises(BundleError, match="classifier"):
        load_bundle(tmp_path)


def edited(section, drop=None, **values):
    """TINY's bundle.json with one section's key dropped or values changed."""
    meta = json.loads(json.dumps(TINY))
    if drop:
        meta[section].pop(drop)
    meta[section].update(values)
    return meta


@pytest.mark.parametrize("meta, message", [
    (None, "not a JSON object"),
    ({**TINY, "segmenter": "x"}, "'segmenter' is not a JSON object"),
    (edited("classifier", drop="crop_size"), "'classifier' has no 'crop_size'"),
    (edited("segmenter", drop="diameter"), "'segmenter' has no 'diameter'"),
    (edited("classifier", crop_size=32.5), "classifier.crop_size is 32.5, not a whole"),
    (edited("classifier", temperature=0), "classifier.temperature is 0"),
    (edited("segmenter", diameter="112"), "segmenter.diameter is '112'"),
])
def test_a_bundle_json_that_would_fail_image_by_image_is_refused_at_once(tmp_path, meta, message):
    (tmp_path / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match=message):
        load_bundle(tmp_path)


def test_onnx_export_matches_torch(tiny_bundle, tmp_path):
    pytest.importorskip("onnxruntime")
    from wbc_batch.export import export_onnx

    out = tmp_path / "exported"
    report = export_onnx(tiny_bundle, out)
    assert (out / "segmenter.onnx").stat().st_size > 0 and (out / "classifier.onnx").exists()
    assert (out / "bundle.json").exists()
    assert report.segmenter_max_abs_diff < 1e-3 and report.classifier_max_abs_diff < 1e-3
    assert report.classifier_classes_agree
    assert any("identical" in line for line in report.lines())


def test_an_onnx_export_that_fails_leaves_no_part_file(tiny_bundle, tmp_path, monkeypatch):
    """A disk that fills while the exporter writes: no segmenter.onnx, and no temporary file."""
    import errno

    import torch

    from wbc_batch.export import export_onnx

    def fills_the_disk(model, args, f, **kwargs):
        Path(f).write_bytes(b"half an ONNX file")
        raise OSError(errno.ENOSPC, "No space left on device", f)

    monkeypatch.setattr(torch.onnx, "export", fills_the_disk)
    out = tmp_path / "exported"
    with pytest.raises(OSError, match="No space left"):
        export_onnx(tiny_bundle, out)
    assert not (out / "segmenter.onnx").exists()
    assert not [p.name for p in out.iterdir() if "tmp" in p.name]


def test_onnx_exports_older_than_the_weights_are_refused(tiny_bundle, tmp_path):
    # retraining into a folder that kept its old .onnx files: the onnx backend would have run them
    pytest.importorskip("onnxruntime")
    from wbc_batch.backend import BackendError
    from wbc_batch.export import export_onnx
    from wbc_batch_plugins.onnx_backend import OnnxBackend

    out = tmp_path / "exported"
    export_onnx(tiny_bundle, out)
    assert OnnxBackend().open(load_bundle(out), "cpu").device == "cpu"  # fresh exports open
    torch.manual_seed(1)
    save_file(build_classifier(TINY).state_dict(), str(out / "classifier.safetensors"))
    with pytest.raises(BackendError, match=r"classifier.safetensors has changed since the export.* "
                                           r"export-onnx"):
        OnnxBackend().open(load_bundle(out), "cpu")


def test_default_bundle_ships_in_the_package():
    from wbc_batch.bundle import DEFAULT_BUNDLE_DIR

    if not (DEFAULT_BUNDLE_DIR / "bundle.json").exists():
        pytest.skip("default weights not trained yet")
    b = load_bundle()
    weights = sum(b.path(k).stat().st_size for k in ("segmenter", "classifier"))
    assert weights <= 25 * 10 ** 6  # the safetensors weights; the ONNX exports come on top
    assert {"segmenter", "classifier", "segmenter_onnx", "classifier_onnx"} <= set(b.files)
    TorchSession.from_bundle(b)
    # its classifier knows the stains of every microscope it was trained on
    reference = b.stain_reference
    assert set(reference.sources) == set(b.meta["classifier"]["trained_on"]) and reference.threshold > 0


@pytest.mark.parametrize("name", list(empty_fields()))
def test_the_default_models_find_no_cell_in_an_empty_field(name):
    """The segmenter standardises each image by its own contrast, so it sees the noise of an empty
    field as strongly as a smear and finds "cells" there (a blank field was once a monocyte at 0.98).
    A field of which next to nothing is darker than its glass is not shown to it
    (`analysis.field_cover`); in a field left uneven, the nucleus contrast rule drops them."""
    from wbc_batch.analysis import analyze, find_cells
    from wbc_batch.bundle import DEFAULT_BUNDLE_DIR
    from wbc_batch.config import AnalysisParams

    if not (DEFAULT_BUNDLE_DIR / "bundle.json").exists():
        pytest.skip("default weights not trained yet")
    b = load_bundle()
    session = TorchSession.from_bundle(b)
    rgb = empty_fields()[name]
    found = analyze(rgb, session, b)
    assert found.cells == [] and found.diameter_px == 0
    if name == "lamp falloff":  # the case the contrast rule exists for, not one the segmenter
        # gets right: with the falloff left in (evened out, the field is glass); an empty
        # field has no stain colour, so it counts as grey: both bars off
        uneven = AnalysisParams(min_falloff=0)
        assert analyze(rgb, session, b, uneven).cells == []
        off = AnalysisParams(min_falloff=0, min_nucleus_contrast=0, min_grey_nucleus_contrast=0)
        assert find_cells(rgb, session, b, off).boxes


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update(classes=None), "classes None differ"),
    (lambda m: m["segmenter"].update(arch=None), "segmenter.arch is not a JSON object"),
    (lambda m: m["segmenter"].setdefault("arch", {}).update(widths="abc"), "segmenter.arch.widths"),
    (lambda m: m["classifier"].setdefault("arch", {}).update(num_classes=6), "has 6 classes"),
    # before: a typo built the default network, which the weights' shapes may still fit
    (lambda m: m["segmenter"]["arch"].update(width=[8, 16]),
     "segmenter.arch has 'width', which no segmenter reads (it reads widths, groups)"),
    (lambda m: m["classifier"]["arch"].update(depth=3), "classifier.arch has 'depth'"),
    (lambda m: m.update(onnx_exported_from="x"), "onnx_exported_from is not an object"),
    (lambda m: m["classifier"].update(temperature=1e-38), "temperature is 1e-38"),
    (lambda m: m["classifier"].update(stain_reference={"sources": ["a"]}), "stain_reference"),
    (lambda m: m["classifier"].update(stain_target={"directions": [1], "amounts": [1, 2]}),
     "stain_target needs directions (2, 3)"),
    # a newer wbc-batch's bundle: its new fields would be read as this version reads its own
    (lambda m: m.update(format=2, wbc_batch_version="9.0"),
     "bundle format 2 (written by wbc-batch 9.0) is newer than this wbc-batch reads (up to 1)"),
    (lambda m: m.update(format="1"), "format '1' is not a bundle format"),
])
def test_a_malformed_bundle_json_is_refused_at_once_naming_the_field(tmp_path, edit, message):
    # before: tracebacks (exit 1) or every image failing, or NaN probabilities with exit 0
    from wbc_batch.bundle import DEFAULT_BUNDLE_DIR

    bundle = tmp_path / "b"
    shutil.copytree(DEFAULT_BUNDLE_DIR, bundle)
    meta = json.loads((bundle / "bundle.json").read_text())
    edit(meta)
    (bundle / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match=re.escape(message)):
        load_bundle(bundle)


def test_weights_that_are_not_finite_numbers_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    from wbc_batch.bundle import DEFAULT_BUNDLE_DIR
    from wbc_batch.nets import CLASSIFIER_DEFAULTS, ResNetClassifier

    state = load_file(str(DEFAULT_BUNDLE_DIR / "classifier.safetensors"))
    state["fc.bias"] = state["fc.bias"] * float("nan")
    save_file(state, str(tmp_path / "classifier.safetensors"))
    with pytest.raises(ValueError, match="not finite numbers .in fc.bias"):
        load_weights(ResNetClassifier(**CLASSIFIER_DEFAULTS), tmp_path / "classifier.safetensors")


@pytest.mark.parametrize("dtype", [torch.int8, torch.int32])
def test_weights_converted_to_integers_are_refused(tmp_path, dtype):
    # before: load_state_dict cast them without a word: 0 WBCs found in every field, exit 0
    from safetensors.torch import load_file, save_file

    from wbc_batch.bundle import DEFAULT_BUNDLE_DIR
    from wbc_batch.nets import SEGMENTER_DEFAULTS, UNet

    state = load_file(str(DEFAULT_BUNDLE_DIR / "segmenter.safetensors"))
    state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state.items()}
    save_file(state, str(tmp_path / "segmenter.safetensors"))
    name = str(dtype).replace("torch.", "")
    with pytest.raises(ValueError, match=rf"holds {name} tensors where float weights are expected"):
        load_weights(UNet(widths=SEGMENTER_DEFAULTS["widths"], groups=SEGMENTER_DEFAULTS["groups"]),
                     tmp_path / "segmenter.safetensors")


def test_weights_of_another_float_precision_are_used(tmp_path):
    from safetensors.torch import load_file, save_file

    from wbc_batch.bundle import DEFAULT_BUNDLE_DIR, load_bundle

    state = load_file(str(DEFAULT_BUNDLE_DIR / "classifier.safetensors"))
    save_file({k: v.half() for k, v in state.items()}, str(tmp_path / "classifier.safetensors"))
    model = load_weights(build_classifier(load_bundle(DEFAULT_BUNDLE_DIR).meta),
                         tmp_path / "classifier.safetensors")
    assert model.fc.weight.dtype == torch.float32


def test_an_architecture_that_cannot_be_built_names_bundle_json(tmp_path):
    # before: "num_channels (32) must be divisible by num_groups (3)", naming no file or field
    meta = {"classifier": {"arch": {"groups": 5}}}  # widths 24, 48...: not divisible by 5
    with pytest.raises(ValueError, match=r"the classifier bundle.json describes \(classifier.arch\) "
                                         r"cannot be built: ValueError: num_channels"):
        build_classifier(meta)


def test_a_bundle_file_that_cannot_be_read_is_recorded_not_fatal(tmp_path):
    # run.json hashes the bundle after every image is analysed: a folder where an unused ONNX
    # file should be lost the whole run (IsADirectoryError)
    from wbc_batch.bundle import DEFAULT_BUNDLE_DIR

    bundle = tmp_path / "b"
    shutil.copytree(DEFAULT_BUNDLE_DIR, bundle)
    (bundle / "classifier.onnx").unlink()
    (bundle / "classifier.onnx").mkdir()
    hashes = load_bundle(bundle).file_hashes()
    assert hashes["classifier_onnx"]["sha256"] is None and "cannot read" in hashes["classifier_onnx"]["error"]
    assert len(hashes["classifier"]["sha256"]) == 64


def test_weights_copied_over_another_bundles_onnx_exports_are_caught(tmp_path):
    # NEW's weights and bundle.json copied into OLD, whose ONNX files stay the old exports:
    # only the recorded hash of each .onnx file can tell
    from wbc_batch.bundle import DEFAULT_BUNDLE_DIR

    assert load_bundle(DEFAULT_BUNDLE_DIR).stale_onnx() == []  # the shipped exports match
    old = tmp_path / "old"
    shutil.copytree(DEFAULT_BUNDLE_DIR, old)
    with open(old / "classifier.onnx", "ab") as fh:
        fh.write(b"\0")  # stands in for an export of other weights
    assert load_bundle(old).stale_onnx() == ["classifier"]


def test_exports_copied_beside_weights_never_exported_are_caught(tmp_path):
    # a trained bundle records its weights' sha256 but, until export-onnx, no export: .onnx files
    # copied in beside it (here the shipped ones) ran silently before, while run.json named the
    # new weights
    pytest.importorskip("onnxruntime")
    from wbc_batch.backend import BackendError
    from wbc_batch.bundle import DEFAULT_BUNDLE_DIR, ONNX_SOURCE, meta_text
    from wbc_batch_plugins.onnx_backend import OnnxBackend

    trained = tmp_path / "trained"
    shutil.copytree(DEFAULT_BUNDLE_DIR, trained)
    meta = json.loads((trained / "bundle.json").read_text())
    assert meta["segmenter"]["weights_sha256"] and meta["classifier"]["weights_sha256"]
    del meta[ONNX_SOURCE]
    (trained / "bundle.json").write_text(meta_text(meta))
    assert load_bundle(trained).stale_onnx() == ["classifier", "segmenter"]
    with pytest.raises(BackendError, match=r"segmenter.onnx was not exported from "
                                           r"segmenter.safetensors .* export-onnx"):
        OnnxBackend().open(load_bundle(trained), "cpu")
    for section in ("segmenter", "classifier"):  # a bundle older than both records: not checked
        del meta[section]["weights_sha256"]
    (trained / "bundle.json").write_text(meta_text(meta))
    assert load_bundle(trained).stale_onnx() == []


def test_the_shipped_bundle_refuses_damaged_weights(tmp_path):
    # its bundle.json records the weights' sha256, so the torch backend never runs a flipped bit
    from wbc_batch.bundle import DEFAULT_BUNDLE_DIR

    copy = tmp_path / "models"
    shutil.copytree(DEFAULT_BUNDLE_DIR, copy)
    data = bytearray((copy / "classifier.safetensors").read_bytes())
    data[-5] ^= 0x40
    (copy / "classifier.safetensors").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="classifier.safetensors is not the classifier"):
        load_bundle(copy)


def test_a_session_keeps_the_gpu_it_was_given(monkeypatch):
    # a mutation that dropped the index (torch.device("cuda") for "cuda:1") passed every test:
    # on a machine of several GPUs, both networks would have gone to the first one
    import wbc_batch.nets as nets

    moved = []
    monkeypatch.setattr(nets, "to_device", lambda model, device: moved.append(device) or model)
    session = TorchSession(build_segmenter(TINY), build_classifier(TINY), "cuda:1")
    assert session._dev == torch.device("cuda", 1) and moved == [torch.device("cuda", 1)] * 2


def test_weights_missing_a_tensor_are_refused(tiny_bundle):
    # strict loading: a mutation to strict=False passed every test
    from safetensors.torch import load_file, save_file

    state = load_file(str(tiny_bundle / "classifier.safetensors"))
    state.pop(sorted(state)[0])
    save_file(state, str(tiny_bundle / "classifier.safetensors"))
    with pytest.raises(ValueError, match="does not fit the architecture in bundle.json: .*Missing key"):
        load_weights(build_classifier(TINY), tiny_bundle / "classifier.safetensors")


def test_the_arch_fields_a_bundle_may_set_are_those_the_networks_read():
    from wbc_batch.bundle import ARCH_FIELDS
    from wbc_batch.nets import CLASSIFIER_DEFAULTS, SEGMENTER_DEFAULTS

    assert set(ARCH_FIELDS["segmenter"]) == set(SEGMENTER_DEFAULTS)
    assert set(ARCH_FIELDS["classifier"]) == set(CLASSIFIER_DEFAULTS)
