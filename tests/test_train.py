"""Training runs end to end on a lab's own layouts (tiny, a few steps) and on the public readers."""

import json
import os
import re
import shlex
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

pytest.importorskip("torch")

from wbc_batch import CLASSES  # noqa: E402
from wbc_batch.train import datasets as ds  # noqa: E402
from wbc_batch.truth import normalise_class  # noqa: E402

from conftest import two_stain_smear  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
MODELS = Path(__file__).resolve().parents[1] / "wbc_batch" / "models"


def _cell_image(rng, size=160):
    img = np.full((size, size, 3), (230, 220, 225), np.uint8)
    mask = np.zeros((size, size), np.uint8)
    c, r = (size // 2 + int(rng.integers(-10, 10)), size // 2), int(rng.integers(35, 50))
    cv2.circle(img, c, r, (160, 130, 180), -1)
    cv2.circle(mask, c, r, 128, -1)
    cv2.circle(img, c, r // 2, (70, 40, 100), -1)
    cv2.circle(mask, c, r // 2, 255, -1)
    return img, mask


def _lab_folders(root: Path, rng):
    seg = root / "seg"
    (seg / "masks").mkdir(parents=True)
    for i in range(3):
        img, mask = _cell_image(rng)
        cv2.imwrite(str(seg / f"img {i}.png"), img)
        cv2.imwrite(str(seg / "masks" / f"img {i}.png"), mask)
    cls = root / "cls"
    for k in CLASSES:
        (cls / k).mkdir(parents=True)
        for i in range(2):
            cv2.imwrite(str(cls / k / f"{i}.jpg"), _cell_image(rng, 128)[0])
    return seg, cls


def test_lab_layout_readers(tmp_path):
    seg, cls = _lab_folders(tmp_path, np.random.default_rng(0))
    assert len(ds.read_mask_folder(seg)) == 3
    recs = ds.read_class_folders(cls)
    assert len(recs) == 10 and {r.cls for r in recs} == set(CLASSES)
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("image,class\ncls/neutrophil/0.jpg,Neutrophil\ncls/basophil/1.jpg,basophil\nx.jpg,platelet\n")
    assert [r.cls for r in ds.read_class_csv(csv_path)] == ["neutrophil", "basophil"]
    # as the truth reader reads it: Excel's "Unicode text" (UTF-16, tabs) serves both
    csv_path.write_bytes("image\tclass\r\ncls/neutrophil/0.jpg\tNeutrophil\r\n".encode("utf-16"))
    assert [r.cls for r in ds.read_class_csv(csv_path)] == ["neutrophil"]


def _take_shipped_segmenter(out: Path) -> None:
    """Put the shipped segmenter's weights into bundle `out`, and their sha256 into its
    bundle.json (which `load_bundle` checks the weights against)."""
    import json

    from wbc_batch.bundle import WEIGHTS_SHA256, sha256_file

    shutil.copy2(MODELS / "segmenter.safetensors", out / "segmenter.safetensors")
    meta = json.loads((out / "bundle.json").read_text())
    meta["segmenter"][WEIGHTS_SHA256] = sha256_file(out / "segmenter.safetensors")
    (out / "bundle.json").write_text(json.dumps(meta))


def _train_tiny_bundle(tmp_path, device: str = "cpu") -> tuple:
    """Both trainers for a few steps on the lab layouts; -> (bundle, log lines)."""
    import torch
    torch.set_num_threads(1)
    from wbc_batch.bundle import load_bundle
    from wbc_batch.train.classifier import ClsTrainConfig, train_classifier
    from wbc_batch.train.segmenter import SegTrainConfig, train_segmenter

    seg, cls = _lab_folders(tmp_path, np.random.default_rng(1))
    out = tmp_path / "bundle"
    logs = []
    train_segmenter(SegTrainConfig(data=tmp_path, out=out, lab_masks=(seg,), use_public=False,
                                   steps=2, batch=2, patch=64, eval_every=2, threads=1,
                                   device=device), log=logs.append)
    # two steps teach the segmenter nothing, so the classifier would get no crops (that error has
    # its own test); the shipped weights, of the same architecture, find the drawn cells
    _take_shipped_segmenter(out)
    train_classifier(ClsTrainConfig(data=tmp_path, out=out, lab_folders=(cls,), use_public=False,
                                    epochs=1, batch=4, crop_size=32, threads=1,
                                    widths=(8, 8, 8, 8), blocks=(1, 1, 1, 1), device=device),
                     log=logs.append)
    return load_bundle(out), logs


def _assert_usable(bundle) -> None:
    from wbc_batch.analysis import analyze
    from wbc_batch.nets import TorchSession

    assert bundle.meta["segmenter"]["trained_on"] == ["lab"]
    assert bundle.crop_size == 32 and bundle.temperature > 0
    img, _ = _cell_image(np.random.default_rng(2), 200)
    res = analyze(img, TorchSession.from_bundle(bundle), bundle)
    assert res.mask.shape == (200, 200)


def _no_public(tmp_path, command: str) -> list:
    """`--no-public` and a lab source of `command`'s kind (an empty folder), for the CLI tests
    that replace the trainer."""
    lab = tmp_path / "lab"
    lab.mkdir(exist_ok=True)
    return ["--no-public", "--lab-masks" if command == "segmenter" else "--lab-classes", str(lab)]


def test_no_public_data_and_no_lab_data_is_refused_before_any_work(tmp_path):
    from click.testing import CliRunner

    from wbc_batch.cli import build_cli

    for command, options in (("segmenter", "--lab-masks"), ("classifier", "--lab-classes, --lab-csv or --lab-truth")):
        result = CliRunner().invoke(build_cli(), ["train", command, "--no-public", "--init", str(MODELS),
                                                  "-o", str(tmp_path / "b")])
        assert result.exit_code == 2 and f"--no-public needs {options}" in result.output
        assert not (tmp_path / "b").exists()  # no half bundle


def test_init_shipped_names_the_packages_bundle_wherever_it_is_installed(tmp_path, monkeypatch):
    # the README's `--init wbc_batch/models` only worked from a checkout's root
    from click.testing import CliRunner

    from wbc_batch_plugins.train_command import _init_bundle
    from wbc_batch.bundle import DEFAULT_BUNDLE_DIR
    from wbc_batch.cli import build_cli

    monkeypatch.chdir(tmp_path)
    assert _init_bundle(None, None, "shipped") == DEFAULT_BUNDLE_DIR
    (tmp_path / "mine").mkdir()
    assert _init_bundle(None, None, "mine") == Path("mine")
    (tmp_path / "shipped").mkdir()  # a lab's own bundle folder of that name, as the README says
    for spelled in ("./shipped", "shipped/"):
        assert _init_bundle(None, None, spelled) == Path(spelled)
    assert _init_bundle(None, None, "shipped") == DEFAULT_BUNDLE_DIR
    (tmp_path / "lab" / "neutrophil").mkdir(parents=True)  # a class folder, with no cells

    def train(init):
        return CliRunner().invoke(build_cli(), ["train", "classifier", "--no-public", "--init",
                                                init, "--lab-classes", str(tmp_path / "lab"),
                                                "-o", str(tmp_path / "b")])

    res = train("./shipped")  # the typed (empty) folder, not the package's bundle
    assert res.exit_code == 2 and "holds no classifier.safetensors" in res.output, res.output
    res = train("shipped")  # the package's bundle: on to the lab's (empty) data
    assert res.exit_code != 0 and "holds no classifier.safetensors" not in res.output, res.output
    result = CliRunner().invoke(build_cli(), ["train", "classifier", "--no-public", "--init",
                                              "wbc_batch/models", "-o", str(tmp_path / "b")])
    assert result.exit_code == 2
    assert ("folder 'wbc_batch/models' does not exist (`--init shipped` starts from the models "
            "shipped with wbc-batch)") in result.output
    result = CliRunner().invoke(build_cli(), ["train", "classifier", "--no-public", "--init",
                                              "shipped", "-o", str(tmp_path / "b")])
    assert result.exit_code == 2 and "--no-public needs --lab-classes, --lab-csv or --lab-truth" in result.output


def test_training_on_lab_data_makes_a_usable_bundle(tmp_path):
    bundle, logs = _train_tiny_bundle(tmp_path)
    _assert_usable(bundle)
    assert any("kept" in line for line in logs)
    assert not any("training on" in line or "Note:" in line for line in logs)
    assert bundle.meta["classifier"]["config"]["device"] == "cpu"


def test_classifier_training_with_no_cell_found_in_any_image_says_so(tmp_path):
    from click.testing import CliRunner

    from wbc_batch.cli import build_cli
    from wbc_batch.train.segmenter import SegTrainConfig, train_segmenter

    seg, cls = _lab_folders(tmp_path, np.random.default_rng(1))
    out = tmp_path / "bundle"
    train_segmenter(SegTrainConfig(data=tmp_path, out=out, lab_masks=(seg,), use_public=False, steps=2,
                                   batch=2, patch=64, eval_every=2, threads=1), log=lambda _: None)
    result = CliRunner().invoke(build_cli(), ["train", "classifier", "--no-public", "--lab-classes", str(cls),
                                              "-o", str(out), "--epochs", "1", "--threads", "1"])
    assert result.exit_code == 1 and result.exception.__class__ is SystemExit
    assert (f"no training crops from the lab's data (--lab-classes {cls}): the segmenter found no cell in "
            "any of its 10 images") in result.output
    assert not (out / "classifier.safetensors").exists()


def test_a_fine_tuning_that_fails_on_its_data_says_what_out_holds(tmp_path):
    """--init's segmenter is taken into a new OUT before the data are read; when they then give
    no crop, the error says OUT holds a segmenter and no classifier (a half bundle `run` refuses)."""
    from click.testing import CliRunner

    from conftest import draw_field, write_image
    from wbc_batch.cli import build_cli

    blank = tmp_path / "blank"
    write_image(blank / "neutrophil" / "0.png", draw_field(120, 120))
    out = tmp_path / "new"
    result = CliRunner().invoke(build_cli(), ["train", "classifier", "--no-public", "--lab-classes", str(blank),
                                              "--init", str(MODELS), "-o", str(out), "--threads", "1"])
    assert result.exit_code == 1 and result.exception.__class__ is SystemExit
    assert result.output.strip().splitlines()[-1] == (
        f"Error: no training crops from the lab's data (--lab-classes {blank}): the segmenter found "
        f"no cell in any of its 1 images. {out} holds a segmenter and no classifier.")
    assert (out / "segmenter.safetensors").is_file() and not (out / "classifier.safetensors").exists()


def _retrain_classifier_in_place(out: Path, cls: Path, init: bool = True) -> dict:
    """A few more steps of the tiny classifier in `out` (from scratch without `init`), written
    back into `out`."""
    from wbc_batch.train.classifier import ClsTrainConfig, train_classifier

    return train_classifier(ClsTrainConfig(data=out, out=out, init=out if init else None,
                                           crop_size=None if init else 32,
                                           lab_folders=(cls,), use_public=False,
                                           epochs=1, min_steps=2, batch=4, threads=1, widths=(8, 8, 8, 8),
                                           blocks=(1, 1, 1, 1)), log=lambda _: None)


def test_a_damaged_or_newer_bundle_json_in_out_or_init_is_refused_before_any_work(tmp_path):
    # a damaged one in OUT ended the training with a traceback, its weights lost; a newer one
    # was read as this version's own
    from click.testing import CliRunner

    from wbc_batch.cli import build_cli

    seg, _ = _lab_folders(tmp_path, np.random.default_rng(8))
    out = tmp_path / "out"
    out.mkdir()
    (out / "bundle.json").write_text("{bad")
    train = ["train", "segmenter", "--no-public", "--lab-masks", str(seg), "--steps", "1",
             "--batch", "2", "--threads", "1"]
    res = CliRunner().invoke(build_cli(), [*train, "-o", str(out)])
    assert res.exit_code == 2 and f"-o {out}: cannot read {out / 'bundle.json'}" in res.output
    assert res.exception.__class__ is SystemExit and "step 1" not in res.output
    newer = tmp_path / "newer"
    shutil.copytree(MODELS, newer, ignore=shutil.ignore_patterns("*.onnx"))
    meta = json.loads((newer / "bundle.json").read_text())
    (newer / "bundle.json").write_text(json.dumps({**meta, "format": 2}))
    res = CliRunner().invoke(build_cli(), [*train, "--init", str(newer), "-o", str(tmp_path / "n")])
    assert res.exit_code == 2 and "is newer than this wbc-batch reads (up to 1)" in res.output


def _stop(*args, **kwargs):
    raise KeyboardInterrupt("a simulated Ctrl-C")


def test_a_stop_before_the_classifier_is_written_leaves_weights_and_bundle_json_as_they_were(tmp_path,
                                                                                          monkeypatch):
    """The stain reference (about 90 s on the public data) is fitted before anything is written."""
    import wbc_batch.train.classifier as classifier

    out = _train_tiny_bundle(tmp_path)[0].root
    before = {name: (out / name).read_bytes() for name in ("classifier.safetensors", "bundle.json")}
    monkeypatch.setattr(classifier, "stain_records", _stop)
    with pytest.raises(KeyboardInterrupt):
        _retrain_classifier_in_place(out, tmp_path / "cls")
    assert {name: (out / name).read_bytes() for name in before} == before
    # no temporary file is left; the lock every run, watch and training holds stays
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == [".wbc-batch.lock"]


def test_lab_cells_alone_without_a_class_are_warned_about_before_training(tmp_path, monkeypatch):
    """Trained on the lab's cells alone, a class they lack is never answered again: the
    differential would show no basophils without a word."""
    import shutil

    import wbc_batch.train.classifier as classifier

    _, cls = _lab_folders(tmp_path, np.random.default_rng(2))
    shutil.rmtree(cls / "basophil")
    monkeypatch.setattr(classifier, "_crop_cutter", _stop)  # the warning comes before any work
    said = []
    with pytest.raises(KeyboardInterrupt):
        classifier.train_classifier(classifier.ClsTrainConfig(
            data=tmp_path, out=tmp_path / "b", lab_folders=(cls,), use_public=False), log=said.append)
    assert any(line.startswith("WARNING: the lab's cells have no basophil; trained on them alone")
               for line in said), said
    full = ds.read_class_folders(_lab_folders(tmp_path / "all", np.random.default_rng(3))[1])
    assert classifier.warn_missing_classes(full, said.append) == []


def test_weights_not_those_bundle_json_describes_are_refused_and_retraining_mends_them(tmp_path, monkeypatch):
    """A stop between writing the weights and bundle.json leaves a pair `load_bundle` refuses
    (not weights run silently with another crop size and temperature); the classifier can still
    be trained again into the folder, whose segmenter is sound."""
    import wbc_batch.train.segmenter as segmenter
    from wbc_batch.atomic import _FILE_MODE
    from wbc_batch.bundle import BundleError, load_bundle

    out = _train_tiny_bundle(tmp_path)[0].root
    # weights are readable as the tool's other results are, not 0600 as safetensors writes them
    assert (out / "classifier.safetensors").stat().st_mode & 0o777 == _FILE_MODE
    monkeypatch.setattr(segmenter, "_update_meta", _stop)
    with pytest.raises(KeyboardInterrupt):
        _retrain_classifier_in_place(out, tmp_path / "cls")
    with pytest.raises(BundleError, match="classifier.safetensors is not the classifier .*bundle.json describes"):
        load_bundle(out)
    assert load_bundle(out, check=("segmenter",)).crop_size == 32
    monkeypatch.undo()
    # not fine-tuned from: its temperature and lineage would be taken for other weights
    from wbc_batch.train.folders import BundleFolderError
    with pytest.raises(BundleFolderError, match="--init .*classifier.safetensors is not the "
                                                "classifier .*bundle.json describes"):
        _retrain_classifier_in_place(out, tmp_path / "cls")
    _retrain_classifier_in_place(out, tmp_path / "cls", init=False)
    _assert_usable(load_bundle(out))
    assert load_bundle(MODELS).crop_size > 0  # the shipped bundle records no hashes: not checked


def test_copies_of_a_bundles_files_are_readable_whatever_the_source_files_mode(tmp_path):
    """Fine-tuning into a new bundle and `export-onnx -o` copy weights; those of a bundle trained
    before weights were written readable are 0600, and the copies must not keep that mode."""
    pytest.importorskip("onnxruntime")
    from wbc_batch.atomic import _FILE_MODE
    from wbc_batch.export import export_onnx
    from wbc_batch.train.classifier import ClsTrainConfig, take_init_segmenter

    old = _train_tiny_bundle(tmp_path)[0].root
    for p in old.iterdir():
        p.chmod(0o600)
    take_init_segmenter(ClsTrainConfig(data=tmp_path, out=tmp_path / "fine", init=old))
    export_onnx(old, tmp_path / "exported")
    copies = [tmp_path / "fine" / "segmenter.safetensors", tmp_path / "fine" / "bundle.json"]
    copies += [tmp_path / "exported" / name for name in ("segmenter.safetensors", "classifier.safetensors")]
    modes = {str(p.relative_to(tmp_path)): oct(p.stat().st_mode & 0o777) for p in copies}
    assert modes == dict.fromkeys(modes, oct(_FILE_MODE))


def test_training_asked_for_a_gpu_without_one_says_so_and_uses_the_cpu(tmp_path, no_gpu):
    bundle, logs = _train_tiny_bundle(tmp_path, device="cuda")
    _assert_usable(bundle)
    notes = [line for line in logs if line.startswith("Note:")]
    assert notes == ["Note: cuda requested but no CUDA device found; running on the CPU"] * 2


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")
def test_training_on_a_real_gpu_makes_a_usable_bundle(tmp_path):
    bundle, logs = _train_tiny_bundle(tmp_path, device="auto")
    assert [line for line in logs if line.startswith("training on")] == ["training on cuda:0"] * 2
    assert not any(line.startswith("Note:") for line in logs)
    _assert_usable(bundle)  # weights saved from the GPU load into a CPU session


def test_precision_is_bf16_only_where_the_hardware_does_it():
    from wbc_batch.train.device import resolve_precision

    assert resolve_precision("auto", "cpu", True) == ("bf16", "")
    precision, note = resolve_precision("auto", "cpu", False)
    assert precision == "fp32" and note.startswith("no native bfloat16 on this CPU")
    assert resolve_precision("auto", "cuda:0", False)[1].startswith("no native bfloat16 on this GPU")
    assert resolve_precision("fp32", "cpu", True) == ("fp32", "")
    assert resolve_precision("bf16", "cpu", True) == ("bf16", "")
    precision, note = resolve_precision("bf16", "cpu", False)  # asked for: taken, with a warning
    assert precision == "bf16" and "--precision fp32" in note
    with pytest.raises(ValueError, match="invalid precision 'half'"):
        resolve_precision("half", "cpu", True)


def test_the_bf16_probe_answers_no_when_torch_cannot_say(monkeypatch):
    import torch

    from wbc_batch.train.device import native_bf16

    assert isinstance(native_bf16("cpu"), bool)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    assert native_bf16("cpu") is True
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    assert native_bf16("cpu") is False

    def broken():
        raise RuntimeError("no cpuinfo")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", broken, raising=False)
    assert native_bf16("cpu") is False


@pytest.mark.parametrize("native", [True, False])
def test_both_trainers_autocast_only_in_the_precision_they_resolved_and_record_it(tmp_path, monkeypatch,
                                                                                  native):
    from wbc_batch.train import classifier, device, segmenter

    monkeypatch.setattr(device, "native_bf16", lambda dev: native)
    seen = {}
    for module in (classifier, segmenter):
        def spy(dev, enabled=True, _real=module.autocast, _name=module.__name__):
            seen.setdefault(_name, set()).add(enabled)
            return _real(dev, enabled)
        monkeypatch.setattr(module, "autocast", spy)
    bundle, logs = _train_tiny_bundle(tmp_path)
    want = "bf16" if native else "fp32"
    assert seen == {classifier.__name__: {native}, segmenter.__name__: {native}}
    assert bundle.meta["classifier"]["precision"] == bundle.meta["segmenter"]["precision"] == want
    assert bundle.meta["classifier"]["config"]["precision"] == "auto"
    # the device used is recorded beside the one asked for ("auto", or "cuda" on a CPU machine)
    assert bundle.meta["classifier"]["device"] == bundle.meta["segmenter"]["device"] == "cpu"
    note = "" if native else " (no native bfloat16 on this CPU, where float32 is faster than emulated bfloat16)"
    assert [line for line in logs if line.startswith("precision:")] == [f"precision: {want}{note}"] * 2
    _assert_usable(bundle)


def test_both_trainers_place_their_network_as_the_torch_backend_does(tmp_path, monkeypatch):
    """`nets.to_device` (channels-last weights on a CPU, a quarter faster for the segmenter's
    steps) is how both trainers place their network; the weights they save still load."""
    from wbc_batch import nets

    placed, real = [], nets.to_device
    monkeypatch.setattr(nets, "to_device", lambda m, dev: placed.append(type(m).__name__) or real(m, dev))
    bundle, _ = _train_tiny_bundle(tmp_path)
    assert {"UNet", "ResNetClassifier"} <= set(placed)
    _assert_usable(bundle)


@pytest.mark.parametrize("command", ["segmenter", "classifier"])
def test_the_cli_passes_the_precision_and_refuses_an_unknown_one(tmp_path, monkeypatch, command):
    from click.testing import CliRunner

    from wbc_batch.cli import build_cli
    from wbc_batch.train import classifier, segmenter

    module = {"segmenter": segmenter, "classifier": classifier}[command]
    seen = []
    monkeypatch.setattr(module, f"train_{command}", lambda cfg, log=print: seen.append(cfg))
    args = ["train", command, *_no_public(tmp_path, command), "-o", str(tmp_path / "b"), "--precision"]
    assert CliRunner().invoke(build_cli(), args + ["fp32"]).exit_code == 0
    assert [cfg.precision for cfg in seen] == ["fp32"]
    result = CliRunner().invoke(build_cli(), args + ["half"])
    assert result.exit_code == 2 and "'half' is not one of 'auto', 'bf16', 'fp32'" in result.output


@pytest.mark.parametrize("command, option, value", [
    ("segmenter", "--steps", "0"), ("segmenter", "--batch", "0"), ("segmenter", "--eval-every", "0"),
    ("segmenter", "--threads", "-1"), ("classifier", "--epochs", "0"), ("classifier", "--epochs", "-1"),
    ("classifier", "--threads", "-2"), ("stain-reference", "--threads", "-1")])
def test_numbers_a_training_run_cannot_use_are_refused_before_any_work(tmp_path, monkeypatch, command,
                                                                       option, value):
    from click.testing import CliRunner

    from wbc_batch.cli import build_cli
    from wbc_batch.train import classifier, segmenter

    seen = []
    for module, name in ((segmenter, "train_segmenter"), (classifier, "train_classifier"),
                         (classifier, "refit_stain_reference")):
        monkeypatch.setattr(module, name, lambda cfg, log=print: seen.append(cfg))
    args = ["train", command, *_no_public(tmp_path, "segmenter" if command == "segmenter" else "classifier"),
            "-o", str(tmp_path)]
    result = CliRunner().invoke(build_cli(), args + [option, value])
    assert result.exit_code == 2 and f"Invalid value for '{option}': {value} is not in the range" in result.output
    assert not seen
    # --threads 0 is all cores, as for `run`
    assert CliRunner().invoke(build_cli(), args + ["--threads", "0"]).exit_code == 0
    assert seen[0].threads == len(os.sched_getaffinity(0)) >= 1


@pytest.mark.parametrize("command", ["segmenter", "classifier"])
def test_train_rejects_a_malformed_device(command, tmp_path):
    from click.testing import CliRunner

    from wbc_batch.cli import build_cli
    from wbc_batch.plugins import get_plugin_manager

    result = CliRunner().invoke(build_cli(get_plugin_manager(autoload=False)),
                                ["train", command, "--no-public", "-o", str(tmp_path / "b"),
                                 "--device", "gpu"])
    assert result.exit_code == 2 and "invalid device 'gpu'" in result.output


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data not present")
def test_public_readers_see_the_published_layouts():
    assert len(ds.wbc_image_dataset(SHARED, "train", "2")) == 56
    val = ds.bccd(SHARED, "val")
    assert len(val) == 87 and sum(bool(r.boxes) for r in val) >= 85
    assert {r.cls for r in ds.pbc(SHARED, "val")} == set(CLASSES)
    # no reader ever hands out a test row for training
    train = {str(r.image) for r in ds.pbc(SHARED, "train")}
    assert not train & {str(r.image) for r in ds.pbc(SHARED, "test")}


def test_checkpoint_score_pools_the_other_microscopes():
    from wbc_batch.train.classifier import selection_score

    pbc = np.array([True] * 9 + [False])
    # a 2-crop source that is all wrong must not weigh as much as an 18-crop source that is right
    hits = {"pbc": pbc, "bccd": np.ones(18, bool), "wbc2": np.zeros(2, bool)}
    assert selection_score(hits) == pytest.approx((0.9 + 18 / 20) / 2)
    assert selection_score({"pbc": pbc}) == pytest.approx(0.9)
    assert selection_score({"lab": np.array([True, False])}) == pytest.approx(0.5)


def test_wbc_dataset_class_labels_become_single_cell_records(tmp_path):
    from wbc_batch.train.classifier import _labelled

    recs = [ds.MaskRecord(tmp_path / "1.bmp", tmp_path / "1.png", "monocyte", "d1"),
            ds.MaskRecord(tmp_path / "2.bmp", tmp_path / "2.png", None, "d1")]
    out = _labelled(recs)
    assert [(r.image.name, r.cls, r.source) for r in out] == [("1.bmp", "monocyte", "d1")]


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data not present")
def test_wbc_dataset_labels_cover_train_and_val_but_not_test():
    from wbc_batch.train.classifier import _labelled

    train = _labelled(ds.wbc_image_dataset(SHARED, "train", "1"))
    val = _labelled(ds.wbc_image_dataset(SHARED, "val", "1"))
    test = _labelled(ds.wbc_image_dataset(SHARED, "test", "1"))
    assert len(train) == 176 and len(val) == 61
    assert not {r.image for r in train + val} & {r.image for r in test}


def test_a_left_out_source_is_neither_trained_on_nor_used_to_choose(tmp_path):
    from wbc_batch.train.classifier import PUBLIC_SOURCES, ClsTrainConfig, build_crop_sets

    cache = tmp_path / "crops"
    cache.mkdir()
    for name in PUBLIC_SOURCES:
        for split in ("train", "val"):
            np.savez(cache / f"crops-{name}-{split}-96-m1.3.npz", x=np.zeros((2, 144, 144, 3), np.uint8),
                     y=np.array([0, 1]))
    cfg = ClsTrainConfig(data=tmp_path / "no-data", out=tmp_path, cache=cache, leave_out=("wbc1",))
    for split in ("train", "val"):
        sets = build_crop_sets(cfg, split, session=None, bundle=None, log=lambda s: None)
        assert sorted(sets) == ["bccd", "pbc", "wbc2"]


def test_colour_augmentation_strength_is_a_setting():
    from wbc_batch.train.augment import hue_saturation, photometric

    rng = np.random.default_rng(0)
    img = np.zeros((32, 32, 3), np.uint8)
    img[..., 0], img[..., 1], img[..., 2] = 200, 90, 60
    grey = photometric(img, rng, gray_p=1.0)
    # grey, then blur/noise/JPEG: channels stay (nearly) equal
    assert np.abs(grey[..., 0].astype(int) - grey[..., 2]).mean() < 3
    same = hue_saturation(img, rng, hue=0, sat=0.0)
    assert np.abs(same.astype(int) - img).max() <= 2
    hues = {int(cv2.cvtColor(hue_saturation(img, np.random.default_rng(s), hue=40, sat=0.0),
                             cv2.COLOR_RGB2HSV)[0, 0, 0]) for s in range(20)}
    assert len(hues) > 5


def test_restaining_changes_the_dye_not_the_picture():
    from wbc_batch.train.augment import od_stain

    rng = np.random.default_rng(1)
    img, _ = two_stain_smear(rng)
    # no change asked for: the decomposition round-trips (up to rounding)
    same = od_stain(img, rng, amount=0.0, shift=0.0, turn=0.0)
    assert np.abs(same.astype(int) - img).max() <= 2
    restained = [od_stain(img, np.random.default_rng(s)) for s in range(6)]
    assert all(r.shape == img.shape and r.dtype == np.uint8 for r in restained)
    changes = [np.abs(r.astype(int) - img).mean() for r in restained]
    assert min(changes) > 1 and len({round(c, 3) for c in changes}) == 6
    # unstained glass and the stain-free parts of a field stay where they were: no dye, no change
    empty = img.copy()
    empty[:] = 255
    assert np.array_equal(od_stain(empty, rng), empty)
    # where the dye was, it still is: the darkest pixels of the input stay the darkest
    grey, r = img.sum(axis=2), restained[0].astype(int).sum(axis=2)
    assert np.corrcoef(grey.ravel(), r.ravel())[0, 1] > 0.8


def test_restaining_is_drawn_only_when_asked_for(monkeypatch):
    """Recipes without restaining (od_p 0) draw no extra random number, so they train as before."""
    from wbc_batch.train import augment
    from wbc_batch.train.classifier import ClsTrainConfig
    from wbc_batch.train.segmenter import SegTrainConfig

    img, _ = two_stain_smear(np.random.default_rng(2))
    calls = []
    real = augment.od_stain
    monkeypatch.setattr(augment, "od_stain", lambda rgb, rng: calls.append(1) or real(rgb, rng))
    a, b = np.random.default_rng(5), np.random.default_rng(5)
    augment.photometric(img, a)
    augment.photometric(img, b, od_p=0.0)
    assert not calls and a.bit_generator.state == b.bit_generator.state
    augment.photometric(img, np.random.default_rng(5), od_p=1.0)
    assert calls == [1]
    # both training configs carry it to their crops and patches; off unless asked for
    for config in (ClsTrainConfig, SegTrainConfig):
        assert augment.colour_settings(config(data=Path("."), out=Path(".")))["od_p"] == 0.0
        assert augment.colour_settings(config(data=Path("."), out=Path("."), od_p=0.5))["od_p"] == 0.5


def test_fine_tuning_into_a_new_bundle_takes_the_init_segmenter_and_strong_colour(tmp_path, monkeypatch):
    import json

    from click.testing import CliRunner

    import wbc_batch.train.classifier as classifier
    import wbc_batch.train.mixstyle as mixstyle
    from wbc_batch.cli import build_cli

    monkeypatch.setattr(classifier, "MIN_STAIN_CROPS", 1)  # the tiny lab folder's crops fit one
    mixed, real_mix = [], mixstyle.mix_styles  # --mixstyle reaches the training's batches
    monkeypatch.setattr(mixstyle, "mix_styles", lambda x, rng, p: mixed.append(p) or real_mix(x, rng, p))
    out = tmp_path / "new bundle"
    _, cls = _lab_folders(tmp_path, np.random.default_rng(3))
    result = CliRunner().invoke(build_cli(), ["train", "classifier", "--no-public", "--lab-classes", str(cls),
                                              "--init", str(MODELS), "-o", str(out), "--epochs", "1",
                                              "--min-steps", "1", "--threads", "1", "--strong-colour",
                                              "--restain", "0.5", "--mixstyle", "0.5"])
    assert result.exit_code == 0, result.output
    # lab data alone leave no val split: the last epoch is kept, with the init's temperature
    init_temperature = json.loads((MODELS / "bundle.json").read_text())["classifier"]["temperature"]
    assert (f"kept epoch 1 (the last; no val split); temperature {init_temperature:.3f} (the --init bundle's)"
            in result.output)
    assert (out / "segmenter.safetensors").read_bytes() == (MODELS / "segmenter.safetensors").read_bytes()
    meta = json.loads((out / "bundle.json").read_text())["classifier"]
    # what the weights learned from: the lab's cells and, through --init, the shipped sources
    assert meta["trained_on"] == ["bccd", "lab", "pbc", "wbc1", "wbc2"]
    assert meta["stages"][-1]["trained_on"] == ["bccd", "pbc", "wbc1", "wbc2"]
    # and in numbers: the crops of each class, and which lab images (kept after they change)
    assert list(meta["train_crops"]) == ["lab"] and sum(meta["train_crops"]["lab"].values()) > 0
    assert set(meta["train_crops"]["lab"]) == set(CLASSES)
    assert meta["lab_images"]["images"] >= sum(meta["train_crops"]["lab"].values())
    assert len(meta["lab_images"]["digest"]) == 12
    assert f"Done: {out} holds a segmenter and a classifier." in result.output
    assert f"wbc-batch run INPUT -o OUT --model {shlex.quote(str(out))}" in result.output
    assert f"wbc-batch export-onnx --model {shlex.quote(str(out))}" in result.output
    assert "holds a classifier already" not in result.output
    assert "training steps from --init: a fine-tune this short can end worse" in result.output
    assert meta["temperature"] == init_temperature
    assert (meta["config"]["gray_p"], meta["config"]["hue"], meta["config"]["sat"]) == (0.3, 20, 0.5)
    assert meta["config"]["od_p"] == 0.5 and meta["config"]["mixstyle"] == 0.5
    assert mixed and set(mixed) == {0.5}
    # the stain reference is fitted on the crops it was trained on, and can be fitted again
    reference = meta["stain_reference"]
    assert reference["sources"] == ["lab"] and reference["threshold"] > 0
    result = CliRunner().invoke(build_cli(), ["train", "stain-reference", "--no-public", "--lab-classes", str(cls),
                                              "-o", str(out), "--threads", "1"])
    assert result.exit_code == 0, result.output
    refit = json.loads((out / "bundle.json").read_text())["classifier"]
    assert refit["stain_reference"] == reference
    # bundle.json says what the refit read, apart from how the classifier was trained
    assert refit["stain_reference_config"]["lab_folders"] == [str(cls.resolve())]
    assert refit["stain_reference_config"]["data"] is None
    assert refit["stain_reference_config"]["use_wbc_dataset"] is False  # --no-public: not read
    assert refit["stain_reference_config"]["crop_size"] == meta["crop_size"]
    assert "epochs" not in refit["stain_reference_config"] and refit["config"] == meta["config"]
    # so is the stain unusual cells are redrawn in: the lab's, its only source
    target = meta["stain_target"]
    assert np.shape(target["directions"]) == (2, 3) and min(target["amounts"]) > 0
    assert json.loads((out / "bundle.json").read_text())["classifier"]["stain_target"] == target
    # trained again into the same folder: the classifier it holds is said to be replaced
    again = CliRunner().invoke(build_cli(), ["train", "classifier", "--no-public", "--lab-classes",
                                             str(cls), "--init", str(MODELS), "-o", str(out),
                                             "--epochs", "1", "--min-steps", "1", "--threads", "1"])
    assert again.exit_code == 0, again.output
    assert (f"{out} holds a classifier already: this run's replaces it when the training ends"
            in again.output)
    # the shipped bundle is read, never written
    assert json.loads((MODELS / "bundle.json").read_text())["classifier"]["trained_on"] != ["lab"]


def test_a_stain_reference_is_never_replaced_by_none(tmp_path, monkeypatch):
    """No data named, lab data with no found cell, crops with no two measurable stains: each is
    said, and bundle.json keeps its reference (and so `run` its unusual_stain flags)."""
    from click.testing import CliRunner

    from conftest import draw_field, write_image
    import wbc_batch.train.classifier as classifier
    from wbc_batch.cli import build_cli

    out = tmp_path / "bundle"
    out.mkdir()
    for name in ("bundle.json", "segmenter.safetensors", "classifier.safetensors"):
        shutil.copyfile(MODELS / name, out / name)
    before = (out / "bundle.json").read_bytes()
    blank = tmp_path / "blank"
    write_image(blank / "neutrophil" / "0.png", draw_field(120, 120))
    _, cells = _lab_folders(tmp_path, np.random.default_rng(4))
    refit = lambda *lab: CliRunner().invoke(build_cli(), ["train", "stain-reference", "--no-public", *lab,
                                                          "-o", str(out), "--threads", "1"])
    result = refit()
    assert result.exit_code == 2 and "--no-public needs --lab-classes, --lab-csv or --lab-truth" in result.output
    result = refit("--lab-classes", str(blank))
    assert result.exit_code == 1 and result.exception.__class__ is SystemExit
    assert "the segmenter found no cell in any of its 1 images" in result.output
    # too few crops: a threshold fitted on them flagged every cell of the lab's own microscope
    result = refit("--lab-classes", str(cells))
    assert result.exit_code == 1 and result.exception.__class__ is SystemExit
    assert re.search(rf"\d+ training crops are too few to learn which stains are usual \(at least 20\); "
                     rf"{re.escape(str(out / 'bundle.json'))} is left as it was", result.output), result.output
    monkeypatch.setattr(classifier, "MIN_STAIN_CROPS", 1)  # the tiny folder's crops are enough now
    monkeypatch.setattr(classifier, "fit_stains", lambda sets, size: (None, None))
    result = refit("--lab-classes", str(cells))
    assert result.exit_code == 1 and result.exception.__class__ is SystemExit
    assert f"no training crop had two measurable stains; {out / 'bundle.json'} is left as it was" in result.output
    assert (out / "bundle.json").read_bytes() == before


def test_too_few_crops_keep_the_init_bundles_stain_reference(tmp_path):
    """A reference fitted on 5 of a lab's cells flagged every cell of its microscope as an
    unusual stain: below MIN_STAIN_CROPS (20) the --init bundle's is kept, or none without one."""
    from wbc_batch.train.classifier import ClsTrainConfig, stain_records

    shipped = json.loads((MODELS / "bundle.json").read_text())["classifier"]
    crops = np.random.default_rng(0).integers(0, 255, (5, 48, 48, 3), dtype=np.uint8)
    sets = {"lab": (crops, np.arange(5) % 5)}
    said = []
    kept = stain_records(sets, ClsTrainConfig(data=tmp_path, out=tmp_path, init=MODELS, crop_size=32),
                         said.append)
    assert kept == (shipped["stain_reference"], shipped["stain_target"])
    assert said == ["WARNING: 5 training crops are too few to learn which stains are usual (at least "
                    "20): the --init bundle's is kept"]
    said.clear()
    assert stain_records(sets, ClsTrainConfig(data=tmp_path, out=tmp_path, crop_size=32),
                         said.append) == (None, None)
    assert said[0].endswith("none is fitted, so no cell will be flagged for an unusual stain")


def test_a_reference_fitted_on_a_few_dozen_crops_says_it_flags_more_of_the_labs_own_cells():
    from wbc_batch.train.classifier import FEW_STAIN_CROPS, warn_few_stain_crops

    said = []
    warn_few_stain_crops(40, said.append)
    assert said and said[0].startswith("WARNING: the stain reference is fitted on 40 training crops; "
                                       "from fewer than 100 it marks more")
    said.clear()
    warn_few_stain_crops(FEW_STAIN_CROPS, said.append)
    assert said == []


def test_classifier_training_without_a_segmenter_says_what_to_do(tmp_path):
    from click.testing import CliRunner

    from wbc_batch.cli import build_cli

    _, cls = _lab_folders(tmp_path, np.random.default_rng(11))
    lab = ["--no-public", "--lab-classes", str(cls)]
    result = CliRunner().invoke(build_cli(), ["train", "classifier", *lab, "-o", str(tmp_path / "b")])
    assert result.exit_code == 2 and "--init" in result.output
    (tmp_path / "b").mkdir()
    result = CliRunner().invoke(build_cli(), ["train", "stain-reference", *lab, "-o", str(tmp_path / "b")])
    assert result.exit_code == 2 and "no trained classifier" in result.output


def test_box_ring_sets_how_far_around_a_box_is_left_unlabelled():
    from wbc_batch.train.segmenter import FG_ANY, IGNORE, box_labels

    box = [(40, 40, 50, 50)]
    wide, tight = box_labels((160, 160), box, ring=0.12), box_labels((160, 160), box, ring=0.04)
    assert wide[65, 65] == FG_ANY == tight[65, 65]
    # 8 px outside the box: unlabelled with the default ring, background with a tight one
    assert wide[65, 40 + 50 + 7] == IGNORE and tight[65, 40 + 50 + 7] == 0
    assert (wide == IGNORE).sum() > (tight == IGNORE).sum() > 0
    assert wide[0, 0] == 0 == tight[0, 0]


@pytest.mark.parametrize("command", ["segmenter", "classifier"])
def test_the_cli_trains_with_the_configs_own_defaults(tmp_path, monkeypatch, command):
    """With no option given, `train` builds exactly the config's defaults (the CLI restates none)."""
    from click.testing import CliRunner

    from wbc_batch.cli import build_cli
    from wbc_batch.train import classifier, segmenter

    module, config = {"segmenter": (segmenter, segmenter.SegTrainConfig),
                      "classifier": (classifier, classifier.ClsTrainConfig)}[command]
    seen = []
    monkeypatch.setattr(module, f"train_{command}", lambda cfg, log=print: seen.append(cfg))
    out = tmp_path / "b"
    result = CliRunner().invoke(build_cli(), ["train", command, *_no_public(tmp_path, command), "-o", str(out)])
    assert result.exit_code == 0, result.output
    lab = {"segmenter": "lab_masks", "classifier": "lab_folders"}[command]
    assert seen == [config(data=seen[0].data, out=out, use_public=False, **{lab: (tmp_path / "lab",)})]


def test_txl_val_halves_are_fixed_disjoint_and_only_txl():
    from wbc_batch.train.datasets import BoxRecord
    from wbc_batch.train.segmenter import SegTrainConfig, _val_box_records, txl_val_halves

    txl = [BoxRecord(Path(f"val/{n}.jpg"), [(0, 0, 9, 9)], [None], "txl-pbc") for n in "dbeac"]
    bccd = [BoxRecord(Path("x.jpg"), [(0, 0, 9, 9)], [None], "bccd")]
    select, judge = txl_val_halves(bccd + txl)
    # select = the half the run-time rules were chosen on (first, third, ...); judge = never seen
    assert [r.image.stem for r in select] == ["a", "c", "e"] and [r.image.stem for r in judge] == ["b", "d"]
    assert txl_val_halves(list(reversed(bccd + txl))) == (select, judge)
    # by default only BCCD scores checkpoints; --select-on-txl adds the select half, never the judge half
    cfg = SegTrainConfig(data=Path("."), out=Path("."))
    assert _val_box_records(cfg, bccd + txl) == bccd
    chosen = _val_box_records(SegTrainConfig(data=Path("."), out=Path("."), select_on_txl=True), bccd + txl)
    assert chosen == bccd + select and not set(map(id, chosen)) & set(map(id, judge))


def test_select_on_txl_reaches_the_training_config(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from wbc_batch.cli import build_cli
    from wbc_batch.train import segmenter

    seen = []
    monkeypatch.setattr(segmenter, "train_segmenter", lambda cfg, log=print: seen.append(cfg))
    result = CliRunner().invoke(build_cli(), ["train", "segmenter", "--no-public", "-o", str(tmp_path),
                                              "--select-on-txl"])
    assert result.exit_code == 2 and "--select-on-txl" in result.output and not seen
    data = tmp_path / "data"
    (data / "splits").mkdir(parents=True)
    result = CliRunner().invoke(build_cli(), ["train", "segmenter", "--data", str(data), "-o", str(tmp_path),
                                              "--select-on-txl", "--eval-from", "750"])
    assert result.exit_code == 0, result.output
    assert seen[0].select_on_txl is True and seen[0].eval_from == 750


def test_eval_from_skips_early_checkpoints_but_always_validates_the_last_step():
    from wbc_batch.train.segmenter import SegTrainConfig, is_eval_step

    def validated(**kw):
        cfg = SegTrainConfig(data=Path("."), out=Path("."), **kw)
        return [s for s in range(1, cfg.steps + 1) if is_eval_step(cfg, s)]

    assert validated(steps=1500, eval_every=150) == list(range(150, 1501, 150))
    assert validated(steps=1500, eval_every=150, eval_from=750) == [750, 900, 1050, 1200, 1350, 1500]
    assert validated(steps=1000, eval_every=300, eval_from=400) == [600, 900, 1000]
    assert validated(steps=100, eval_every=30, eval_from=500) == [100]


def _segmenter_scored(tmp_path, monkeypatch, scores: list, **settings) -> tuple:
    """(summary, log lines) of a tiny segmenter run on a lab folder whose every val score
    (`validate`, called in turn) is the next of `scores`."""
    import torch
    torch.set_num_threads(1)
    from wbc_batch.train import segmenter

    seg, _ = _lab_folders(tmp_path, np.random.default_rng(3))
    scores = iter(scores)
    monkeypatch.setattr(segmenter, "validate", lambda *a, **k: {"score": next(scores)})
    # the lab images also stand in for a val split, so that there is something to validate on
    monkeypatch.setattr(segmenter, "_gather", lambda cfg, split: (ds.read_mask_folder(seg) if split == "val"
                                                                  else [], []))
    logs = []
    summary = segmenter.train_segmenter(
        segmenter.SegTrainConfig(data=tmp_path, out=tmp_path / "b", lab_masks=(seg,), use_public=False,
                                 batch=2, patch=64, eval_every=1, threads=1, **settings),
        log=logs.append)
    return summary, logs


def test_training_keeps_only_a_validated_step(tmp_path, monkeypatch):
    """The steps before --eval-from are neither validated nor kept, however well they would score."""
    # 5.0 would pick the first validated step
    summary, logs = _segmenter_scored(tmp_path, monkeypatch, [5.0, 1.0, 2.0], steps=4, eval_from=2)
    assert [line.split("step=")[1] for line in logs if line.startswith("val ")] == ["2", "3", "4"]
    assert summary["val"]["step"] == 2 and summary["config"]["eval_from"] == 2


@pytest.mark.parametrize("start, warned", [(9.0, True), (0.5, False)])
def test_a_fine_tune_that_ends_below_its_init_weights_on_val_says_so(tmp_path, monkeypatch, start, warned):
    """The --init weights are scored on val before any training: a fine-tune whose kept step
    scores below them made val worse, and nothing else said so."""
    summary, logs = _segmenter_scored(tmp_path, monkeypatch, [start, 1.0, 2.0], init=MODELS, steps=2)
    assert f"val of the --init weights, before any training: score={start:.4f}" in logs
    assert "scoring the --init weights on val first (3 masked and 0 box images; minutes on a CPU)" in logs
    # OUT had no classifier: the --init bundle's is copied there, and that is said (before: only
    # "Done: OUT holds a segmenter and a classifier")
    assert (tmp_path / "b" / "classifier.safetensors").read_bytes() == (MODELS / "classifier.safetensors").read_bytes()
    assert ("b: the --init bundle's classifier is copied there unchanged; it learned from crops cut "
            "by an earlier segmenter, so where this one outlines cells differently, train the "
            "classifier again (wbc-batch train classifier -o OUT ...)") in [line.split(os.sep)[-1] for line in logs]
    assert summary["val_at_start"] == {"score": start} and summary["val"]["step"] == 2
    below = [line for line in logs if "below the --init weights" in line]
    assert below == ([f"WARNING: the kept step 2 scores 2.0000 on val, below the --init weights' "
                      f"{start:.4f} before any training: this fine-tune made the val figures worse. "
                      "Keep using the --init bundle, or try a lower --lr, more steps or more of the "
                      "lab's data"] if warned else [])


def test_a_classifier_fine_tune_is_scored_against_its_init_weights_on_val(tmp_path, monkeypatch):
    from wbc_batch.train import classifier

    crops = lambda n: (np.random.default_rng(n).integers(0, 255, (n, 48, 48, 3), dtype=np.uint8),  # noqa: E731
                       np.arange(n) % 5)
    monkeypatch.setattr(classifier, "_crop_cutter", lambda cfg, device, log=print: (None, None))
    monkeypatch.setattr(classifier, "build_crop_sets", lambda cfg, split, session, bundle, log, pool=None, lab=None: (
        {"pbc": crops(20)} if split == "train" else {"pbc": crops(10)}))
    tiny = dict(data=tmp_path, epochs=1, min_steps=0, batch=8, crop_size=32, widths=(8, 8, 8, 8),
                blocks=(1, 1, 1, 1), threads=1)
    classifier.train_classifier(classifier.ClsTrainConfig(out=tmp_path / "a", **tiny), log=print)
    # the recipe's own runs from --init (no lab data) are not scored at the start: their time
    # is the model card's
    logs = []
    summary = classifier.train_classifier(
        classifier.ClsTrainConfig(out=tmp_path / "c", init=tmp_path / "a", **tiny), log=logs.append)
    assert "val_at_start" not in summary and not any("--init weights" in line for line in logs)
    scores = iter([{"pbc/val_acc": 0.9, "score": 0.9}, {"pbc/val_acc": 0.4, "score": 0.4}])
    monkeypatch.setattr(classifier, "_val_scores", lambda *a, **k: next(scores))
    _, cls = _lab_folders(tmp_path, np.random.default_rng(5))
    logs = []
    summary = classifier.train_classifier(
        classifier.ClsTrainConfig(out=tmp_path / "b", init=tmp_path / "a", lab_folders=(cls,), **tiny),
        log=logs.append)
    assert "val of the --init weights, before any training: pbc/val_acc=0.9000 score=0.9000" in logs
    assert summary["val_at_start"] == {"pbc/val_acc": 0.9, "score": 0.9}
    assert any(line.startswith("WARNING: the kept epoch 1 scores 0.4000 on val, below the --init "
                               "weights' 0.9000") for line in logs), logs


def test_checkpoint_choice_runs_in_bf16_but_the_temperature_fit_sees_the_float32_model():
    """`_predict(bf16=True)` (choosing epochs) is the training autocast, close to float32; without it,
    `_predict` is exactly the float32 model that run time uses (the temperature is fitted on it)."""
    import torch
    torch.set_num_threads(1)
    from wbc_batch.nets import ResNetClassifier
    from wbc_batch.preprocess import normalize_crops
    from wbc_batch.train.classifier import _predict, augment_crop

    torch.manual_seed(0)
    model = ResNetClassifier(widths=(8, 8, 8, 8), blocks=(1, 1, 1, 1)).eval()
    ctx = np.random.default_rng(0).integers(0, 256, (6, 48, 48, 3), dtype=np.uint8)
    with torch.no_grad():
        plain = model(torch.from_numpy(normalize_crops([augment_crop(c, None, 32, train=False) for c in ctx])))
    fp32, bf16 = _predict(model, ctx, 32), _predict(model, ctx, 32, bf16=True)
    assert np.array_equal(fp32, plain.numpy())
    assert bf16.dtype == np.float32 and not np.array_equal(bf16, fp32)
    assert np.abs(bf16 - fp32).max() < 0.05 * np.abs(fp32).max()


def test_segmenter_colour_augmentation_is_a_setting_and_reaches_every_patch(tmp_path, monkeypatch):
    import torch
    torch.set_num_threads(1)
    from click.testing import CliRunner

    from wbc_batch.cli import build_cli
    from wbc_batch.train import segmenter
    from wbc_batch.train.augment import STRONG_COLOUR, photometric

    seen = []
    monkeypatch.setattr(segmenter, "train_segmenter", lambda cfg, log=print: seen.append(cfg))
    result = CliRunner().invoke(build_cli(), ["train", "segmenter", *_no_public(tmp_path, "segmenter"), "-o",
                                              str(tmp_path / "b"), "--strong-colour", "--restain", "0.25"])
    assert result.exit_code == 0, result.output
    assert (seen[0].gray_p, seen[0].hue, seen[0].sat) == tuple(STRONG_COLOUR[k] for k in ("gray_p", "hue", "sat"))
    assert seen[0].od_p == 0.25
    monkeypatch.undo()

    calls = []
    monkeypatch.setattr(segmenter, "photometric", lambda rgb, rng, **kw: calls.append(kw) or photometric(rgb, rng, **kw))
    seg, _ = _lab_folders(tmp_path, np.random.default_rng(4))
    segmenter.train_segmenter(
        segmenter.SegTrainConfig(data=tmp_path, out=tmp_path / "s", lab_masks=(seg,), use_public=False,
                                 steps=1, batch=2, patch=64, threads=1, od_p=0.25, **STRONG_COLOUR),
        log=lambda s: None)
    assert calls == [{**STRONG_COLOUR, "od_p": 0.25}] * 2


def test_the_classifiers_grey_share_is_a_setting_refused_with_strong_colour(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from wbc_batch.cli import build_cli
    from wbc_batch.train import classifier
    from wbc_batch.train.augment import GRAY_P, HUE, SAT

    seen = []
    monkeypatch.setattr(classifier, "train_classifier", lambda cfg, log=print: seen.append(cfg))
    args = ["train", "classifier", *_no_public(tmp_path, "classifier"), "-o", str(tmp_path / "b")]
    for extra, grey in (([], GRAY_P), (["--grey-share", "0.3"], 0.3), (["--grey-share", "0"], 0.0)):
        result = CliRunner().invoke(build_cli(), args + extra)
        assert result.exit_code == 0, result.output
        assert (seen[-1].gray_p, seen[-1].hue, seen[-1].sat) == (grey, HUE, SAT)  # the hue and saturation kept
    result = CliRunner().invoke(build_cli(), args + ["--grey-share", "0.3", "--strong-colour"])
    assert result.exit_code == 2 and "sets the share of grey crops itself" in result.output
    assert "--grey-share" in result.output and len(seen) == 3


def test_lab_only_segmenter_training_keeps_the_last_step(tmp_path):
    """With no val data there is nothing to choose a checkpoint on: the last step is kept (not
    the first validated one, which every later step would tie with)."""
    import json

    import torch
    torch.set_num_threads(1)
    from wbc_batch.atomic import _FILE_MODE
    from wbc_batch.train.segmenter import SegTrainConfig, train_segmenter

    seg, _ = _lab_folders(tmp_path, np.random.default_rng(3))
    logs = []
    train_segmenter(SegTrainConfig(data=tmp_path, out=tmp_path / "b", lab_masks=(seg,), use_public=False,
                                   steps=4, batch=2, patch=64, eval_every=2, threads=1), log=logs.append)
    val = json.loads((tmp_path / "b" / "bundle.json").read_text())["segmenter"]["val"]
    assert val["step"] == 4 and "score" not in val
    assert (tmp_path / "b" / "segmenter.safetensors").stat().st_mode & 0o777 == _FILE_MODE  # not 0600
    assert logs[-1].startswith("kept the last step, 4 (no val data")
    # a run shorter than log_every says how fast it goes from its first step (it had said nothing)
    assert [line.split(" loss")[0] for line in logs if line.startswith("step ")] == ["step 1/4"]
    logs.clear()  # and at least every log_seconds (0 here: every step)
    train_segmenter(SegTrainConfig(data=tmp_path, out=tmp_path / "c", lab_masks=(seg,), use_public=False,
                                   steps=3, batch=2, patch=64, threads=1, log_seconds=0.0),
                    log=logs.append)
    assert [line.split(" loss")[0] for line in logs if line.startswith("step ")] == [
        "step 1/3", "step 2/3", "step 3/3"]


def test_a_small_training_set_gets_at_least_min_steps_and_a_large_one_its_usual_epochs():
    from wbc_batch.train.classifier import ClsTrainConfig, epoch_order, epoch_steps

    cfg = ClsTrainConfig(data=Path("."), out=Path("."))      # the defaults: 18 epochs of 64, 300 steps
    assert epoch_steps(6305, cfg) == 6305 // 64               # the public recipe's crops: one pass, as before
    assert epoch_steps(25, cfg) == 17                         # 25 lab cells: 17 x 18 >= 300 steps
    assert epoch_steps(25, ClsTrainConfig(data=Path("."), out=Path("."), min_steps=0)) == 1
    # one pass draws exactly the permutation an epoch always drew; more passes repeat every crop
    assert np.array_equal(epoch_order(np.random.default_rng(5), 100, 64), np.random.default_rng(5).permutation(100))
    order = epoch_order(np.random.default_rng(5), 25, 17 * 64)
    assert len(order) >= 17 * 64 and np.bincount(order).min() == np.bincount(order).max() == len(order) // 25


def _lab_records(counts: dict, root: Path) -> list:
    out = []
    for cls, n in counts.items():
        for i in range(n):
            path = root / cls / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"x")
            out.append(ds.ClassRecord(path, cls, "lab"))
    return out


def test_cached_lab_crops_are_keyed_by_the_images_and_their_labels(tmp_path):
    from wbc_batch.train.classifier import records_digest

    records = _lab_records({"neutrophil": 3, "monocyte": 2}, tmp_path)
    key = records_digest(records)
    assert records_digest(list(reversed(records))) == key
    relabelled = [ds.ClassRecord(r.image, "basophil" if i == 0 else r.cls, r.source) for i, r in enumerate(records)]
    assert records_digest(relabelled) != key
    records[1].image.write_bytes(b"a new picture")
    assert records_digest(records) != key and records_digest(records[1:]) != key


def test_a_changed_lab_folder_is_cut_again_not_read_from_the_cache(tmp_path, fake_bundle):
    """The cache holds one crop file per distinct set of lab images and labels."""
    from conftest import FakeSession, draw_field, write_image
    from wbc_batch.bundle import load_bundle
    from wbc_batch.train.classifier import ClsTrainConfig, build_crop_sets

    lab, cache = tmp_path / "lab", tmp_path / "cache"
    for i, cls in enumerate(["neutrophil", "neutrophil", "monocyte"]):
        write_image(lab / cls / f"{i}.png", draw_field(120, 120, cells=[(60, 60, 22)]))
    cfg = ClsTrainConfig(data=tmp_path, out=fake_bundle, lab_folders=(lab,), use_public=False, cache=cache,
                         crop_size=32, crop_margin=1.3)
    cut = lambda: build_crop_sets(cfg, "train", FakeSession(), load_bundle(fake_bundle), log=lambda _: None)
    assert sorted(cut()["lab"][1].tolist()) == [0, 0, 2]
    (lab / "lymphocyte").mkdir()
    (lab / "neutrophil" / "1.png").rename(lab / "lymphocyte" / "1.png")   # relabelled by the lab
    assert sorted(cut()["lab"][1].tolist()) == [0, 1, 2]
    assert len(list(cache.glob("crops-lab-*-train-32-m1.3.npz"))) == 2


def test_cached_crops_are_those_of_the_segmenter_that_cuts_them_now(tmp_path, fake_bundle):
    """Crops cut by another segmenter (retrained, or fine-tuned into the folder) are cut again."""
    from conftest import FakeSession, draw_field, write_image
    from wbc_batch.bundle import load_bundle
    from wbc_batch.train.classifier import ClsTrainConfig, build_crop_sets

    bundle, lab, cache = tmp_path / "bundle", tmp_path / "lab", tmp_path / "cache"
    shutil.copytree(fake_bundle, bundle)
    write_image(lab / "neutrophil" / "0.png", draw_field(120, 120, cells=[(60, 60, 22)]))
    cfg = ClsTrainConfig(data=tmp_path, out=bundle, lab_folders=(lab,), use_public=False, cache=cache,
                         crop_size=32, crop_margin=1.3)

    def cut(weights: bytes) -> list:
        (bundle / "segmenter.safetensors").write_bytes(weights)  # FakeSession cuts; its name is what counts
        logs = []
        build_crop_sets(cfg, "train", FakeSession(), load_bundle(bundle), log=logs.append)
        return [line for line in logs if line.startswith("lab/train")]

    assert "(cached)" not in cut(b"first")[0]
    assert "(cached)" in cut(b"first")[0]
    assert "(cached)" not in cut(b"second")[0]
    assert len(list(cache.glob("crops-lab-*-train-32-m1.3-s*.npz"))) == 2
    assert not list(cache.glob(".*"))  # written through a temporary file, renamed


def _tiny_public_data(root: Path) -> Path:
    """A public data folder in the published layout: two PBC cells per split, no BCCD field."""
    from conftest import draw_field, write_image

    rows = ["image,class,split"]
    for split in ("train", "val"):
        for i, cls in enumerate(["neutrophil", "monocyte"]):
            write_image(root / "pbc-wbc" / split / f"{i}.png", draw_field(120, 120, cells=[(60, 60, 22)]))
            rows.append(f"{split}/{i}.png,{cls},{split}")
    (root / "splits").mkdir(parents=True)
    (root / "splits" / "pbc-wbc.csv").write_text("\n".join(rows) + "\n")
    (root / "splits" / "bccd.csv").write_text("image,annotation,labels,split\n")
    return root


def test_a_lab_source_without_a_found_cell_is_refused_before_the_public_crops_are_cut(tmp_path, fake_bundle):
    """Named lab data that give no crop are refused (not trained without, nor a crash after
    the public sources were cut); a public source with no crop is empty, of the crops' shape."""
    from conftest import FakeSession, draw_field, write_image
    from wbc_batch.bundle import load_bundle
    from wbc_batch.train.classifier import ClsTrainConfig, build_crop_sets

    data, lab = _tiny_public_data(tmp_path / "data"), tmp_path / "lab"
    write_image(lab / "neutrophil" / "blank.png", draw_field(120, 120))
    cfg = ClsTrainConfig(data=data, out=fake_bundle, lab_folders=(lab,), use_wbc_dataset=False,
                         crop_size=32, crop_margin=1.3)
    logs = []
    with pytest.raises(ds.TrainingDataError, match=f"no training crops from the lab's data \\(--lab-classes "
                                                   f"{lab}\\): the segmenter found no cell in any of its 1 images"):
        build_crop_sets(cfg, "train", FakeSession(), load_bundle(fake_bundle), log=logs.append)
    assert not any(line.startswith("pbc/") for line in logs)
    write_image(lab / "neutrophil" / "cell.png", draw_field(120, 120, cells=[(60, 60, 22)]))
    sets = build_crop_sets(cfg, "train", FakeSession(), load_bundle(fake_bundle), log=logs.append)
    assert list(sets) == ["pbc", "bccd", "lab"]   # concatenated in the order they always were
    assert [len(y) for _, y in sets.values()] == [2, 0, 1]
    assert sets["bccd"][0].shape == (0, 48, 48, 3) == (0, *sets["pbc"][0].shape[1:])
    assert np.concatenate([x for x, _ in sets.values()]).shape == (3, 48, 48, 3)


def test_a_labs_cells_are_repeated_to_their_share_only_beside_other_sources():
    from wbc_batch.train.classifier import ClsTrainConfig, source_repeats

    public = {"pbc": 4937, "bccd": 198, "wbc2": 56}
    cfg = ClsTrainConfig(data=Path("."), out=Path("."))
    # the public recipe has no lab: its repeats are the config's, as always
    assert source_repeats({**public, "wbc1": 176}, cfg) == {"pbc": 1, "bccd": 4, "wbc2": 4, "wbc1": 2}
    no_share = ClsTrainConfig(data=Path("."), out=Path("."), lab_share=0.0)
    assert source_repeats({**public, "lab": 176}, no_share)["lab"] == 1     # share 0: each cell once
    assert source_repeats({**public, "lab": 176}, cfg)["lab"] == 14         # the default, 0.3
    for share in (0.1, 0.3):
        reps = source_repeats({**public, "lab": 176}, ClsTrainConfig(data=Path("."), out=Path("."), lab_share=share))
        total = sum(n * reps[name] for name, n in {**public, "lab": 176}.items())
        assert abs(176 * reps["lab"] / total - share) < 0.02
    # a lab's data alone is not repeated (its epochs are set by min_steps instead)
    assert source_repeats({"lab": 176}, ClsTrainConfig(data=Path("."), out=Path("."), lab_share=0.3)) == {"lab": 1}


def test_training_takes_the_labs_repeats_and_the_cli_passes_the_share(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from wbc_batch.cli import build_cli
    from wbc_batch.train import classifier

    crops = lambda n: (np.random.default_rng(n).integers(0, 255, (n, 48, 48, 3), dtype=np.uint8),  # noqa: E731
                       np.arange(n) % 5)
    monkeypatch.setattr(classifier, "_crop_cutter", lambda cfg, device, log=print: (None, None))
    monkeypatch.setattr(classifier, "build_crop_sets", lambda cfg, split, session, bundle, log, pool=None, lab=None: (
        {"pbc": crops(40), "lab": crops(5)} if split == "train" else {}))
    logs = []
    cfg = classifier.ClsTrainConfig(data=tmp_path, out=tmp_path, lab_share=0.5, epochs=2, min_steps=0, batch=8,
                                    crop_size=32, widths=(8, 8, 8, 8), blocks=(1, 1, 1, 1), threads=1)
    classifier.train_classifier(cfg, log=logs.append)
    assert "lab cells repeated 8 times per epoch (--lab-share 0.5)" in logs
    assert any(line.startswith("training crops: 80 ") for line in logs)       # 40 public + 8 x 5 lab

    seen = []
    monkeypatch.setattr(classifier, "train_classifier", lambda cfg, log=print: seen.append(cfg))
    args = ["train", "classifier", *_no_public(tmp_path, "classifier"), "-o", str(tmp_path / "b"), "--lab-share"]
    assert CliRunner().invoke(build_cli(), args + ["0.25"]).exit_code == 0 and seen[0].lab_share == 0.25
    result = CliRunner().invoke(build_cli(), args + ["0.95"])
    assert result.exit_code == 2 and "0.95" in result.output


def test_the_crop_geometry_is_the_init_bundles_unless_given_and_the_cli_passes_it(tmp_path, monkeypatch):
    """Fine-tuning keeps the crops its starting weights were trained on; a new run takes the
    recipe's; either can be set, and `stain-reference` cuts what the bundle's classifier saw."""
    import json

    from click.testing import CliRunner

    from wbc_batch.cli import build_cli
    from wbc_batch.train import classifier
    from wbc_batch.train.classifier import CROP_MARGIN, CROP_SIZE, ClsTrainConfig, with_crop_geometry

    init = tmp_path / "init"
    init.mkdir()
    (init / "bundle.json").write_text(json.dumps({"classifier": {"crop_size": 112, "crop_margin": 1.5}}))
    def geometry(cfg, **kw):
        settled = with_crop_geometry(cfg, **kw)
        return settled.crop_size, settled.crop_margin

    assert geometry(ClsTrainConfig(data=tmp_path, out=tmp_path)) == (CROP_SIZE, CROP_MARGIN)
    assert geometry(ClsTrainConfig(data=tmp_path, out=tmp_path, init=init)) == (112, 1.5)
    assert geometry(ClsTrainConfig(data=tmp_path, out=tmp_path, init=init, crop_size=64)) == (64, 1.5)
    assert geometry(ClsTrainConfig(data=tmp_path, out=tmp_path), bundle=init) == (112, 1.5)
    assert geometry(ClsTrainConfig(data=tmp_path, out=tmp_path, crop_margin=1.2), bundle=tmp_path) == (CROP_SIZE, 1.2)

    seen = []
    monkeypatch.setattr(classifier, "train_classifier", lambda cfg, log=print: seen.append(cfg))
    args = ["train", "classifier", *_no_public(tmp_path, "classifier"), "-o", str(tmp_path / "b")]
    assert CliRunner().invoke(build_cli(), args + ["--crop-size", "80", "--crop-margin", "1.6"]).exit_code == 0
    assert (seen[0].crop_size, seen[0].crop_margin) == (80, 1.6)
    result = CliRunner().invoke(build_cli(), args + ["--crop-margin", "0.5"])
    assert result.exit_code == 2 and "0.5" in result.output


def _single_cell_records(root: Path, n: int) -> list:
    """n synthetic single-cell images (the sample generator's), as class records."""
    from conftest import write_image
    from wbc_batch.sample import make_smear

    out = []
    for i in range(n):
        cls = CLASSES[i % len(CLASSES)]
        smear = make_smear(120, 120, cells=[cls], diameter=84, seed=i, rbc_density=0.3)
        out.append(ds.ClassRecord(write_image(root / f"{i}.png", smear.rgb), cls, "lab"))
    return out


def test_crops_cut_in_two_processes_are_those_cut_in_one_in_the_same_order(tmp_path, monkeypatch):
    """The shipped segmenter cuts the same crops, in the records' order, in a pool of two
    one-thread processes as in this process with one thread; progress is logged as chunks end."""
    import torch

    from wbc_batch.bundle import load_bundle
    from wbc_batch.nets import TorchSession, build_segmenter, load_weights
    from wbc_batch.train import crop_pool
    from wbc_batch.train.crop_pool import CropPool, cut

    records = _single_cell_records(tmp_path, 10)
    records.insert(3, ds.ClassRecord(tmp_path / "gone.png", "monocyte", "lab"))   # unreadable: named apart
    bundle = load_bundle()
    session = TorchSession(load_weights(build_segmenter(bundle.meta), bundle.path("segmenter")),
                           torch.nn.Identity(), "cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        crops, labels, missed, unreadable = cut("cells", records, session, bundle, 32, 1.3, log=lambda _: None)
    finally:
        torch.set_num_threads(threads)
    assert len(crops) == 10 and missed == [] and len(unreadable) == 1 and "gone.png" in unreadable[0]
    monkeypatch.setattr(crop_pool, "LOG_EVERY", 4)
    logs = []
    with CropPool(bundle.root, workers=2) as pool:
        p_crops, p_labels, p_missed, p_unreadable = pool.cut("cells", records, 32, 1.3, log=logs.append)
    assert p_labels == labels and p_missed == [] and p_unreadable == unreadable
    assert all(np.array_equal(a, b) for a, b in zip(crops, p_crops)) and len(p_crops) == 10
    assert logs[0] == "cutting crops in 2 processes of 1 thread each"
    assert [line.split()[1] for line in logs[1:]] == ["4/11", "8/11"]   # chunks of 2, 6 of them


def test_crops_are_cut_in_processes_only_on_the_cpu_with_more_than_one_thread(tmp_path):
    from wbc_batch.train.classifier import ClsTrainConfig, crop_pool
    from wbc_batch.train.crop_pool import CropPool

    cfg = lambda threads: ClsTrainConfig(data=tmp_path, out=tmp_path, threads=threads)  # noqa: E731
    with crop_pool(cfg(2), "cpu") as pool:
        assert isinstance(pool, CropPool) and (pool.workers, pool.threads) == (2, 1)
        assert pool.cut("cells", [], 32, 1.3) == ([], [], [], [])
        assert pool._pool is None                # no process starts before a crop is cut
    for threads, device in ((1, "cpu"), (2, "cuda:0")):
        with crop_pool(cfg(threads), device) as pool:
            assert pool is None


def test_a_crop_cutting_process_that_dies_is_reported_with_the_way_round_it(tmp_path):
    from wbc_batch.train.crop_pool import CropPool

    records = [ds.ClassRecord(tmp_path / "x.png", "monocyte", "lab")]
    with CropPool(tmp_path / "no-bundle", workers=2) as pool:    # its workers cannot start
        with pytest.raises(RuntimeError, match="--threads 1"):
            pool.cut("cells", records, 32, 1.3, log=lambda _: None)


def test_stopped_crop_workers_are_terminated_by_the_executors_own_call_where_it_has_one():
    from wbc_batch.train.crop_pool import _terminate_workers

    calls = []

    class Process:
        def terminate(self):
            calls.append("process")

    class Old:  # Python before 3.14: only the process table
        _processes = {1: Process(), 2: Process()}

    class New(Old):
        def terminate_workers(self):
            calls.append("executor")

    _terminate_workers(Old())
    assert calls == ["process", "process"]
    calls.clear()
    _terminate_workers(New())
    assert calls == ["executor"]


# --- a lab's own data, as labs name and save it ------------------------------------------------

def test_lab_class_folders_take_the_names_labs_use_and_say_what_they_leave_out(tmp_path):
    rng = np.random.default_rng(5)
    for name in ("Neutrophils", "EO", "platelets", "Lymphozyten", "Éosinophile", "Basophills",
                 "Atypical lymphocytes", "Neutrophil_band"):
        (tmp_path / name).mkdir()
        cv2.imwrite(str(tmp_path / name / "a.PNG"), _cell_image(rng, 64)[0])
    logs = []
    recs = ds.read_class_folders(tmp_path, logs.append)
    assert sorted(r.cls for r in recs) == ["eosinophil", "eosinophil", "lymphocyte", "lymphocyte",
                                           "neutrophil", "neutrophil"]
    # a folder of several words is trained on as a class: said, with the class
    assert f"--lab-classes {tmp_path}: folders named in several words read as one class: " \
        "Atypical lymphocytes as lymphocyte, Neutrophil_band as neutrophil (a cell of no class, " \
        "as a blast, belongs in none)" in logs
    assert any("platelets" in line for line in logs)
    # a misspelling is named with the class it most likely means
    assert any("left out: Basophills (basophil?), platelets" in line for line in logs), logs
    (tmp_path / "empty").mkdir()
    with pytest.raises(ds.TrainingDataError, match="no images in class folders") as err:
        ds.read_class_folders(tmp_path / "empty")
    assert "one level down" not in str(err.value)
    # class folders one level too deep: the folder to give is named (before: "found batch1")
    deep = tmp_path / "cells"
    (deep / "batch1").mkdir(parents=True)
    shutil.copytree(tmp_path / "Neutrophils", deep / "batch1" / "Neutrophils")
    with pytest.raises(ds.TrainingDataError) as err:
        ds.read_class_folders(deep)
    assert str(err.value).endswith(f"found batch1). The class folders are one level down, in "
                                   f"{deep / 'batch1'}: give that folder as --lab-classes")


def _three_cells_and_a_csv_path(folder: Path) -> Path:
    """a.jpg, b.jpg and c.jpg (single cells) in `folder`, and the path of a labels.csv there."""
    rng = np.random.default_rng(6)
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        cv2.imwrite(str(folder / name), _cell_image(rng, 64)[0])
    return folder / "labels.csv"


def test_a_lab_csv_is_read_as_labs_save_it_and_refused_when_it_is_not_one(tmp_path):
    path = _three_cells_and_a_csv_path(tmp_path)
    path.write_bytes("\ufeffImage,Class,Split\r\na.jpg,Neutrophils,train\r\nb.jpg,LY,\r\n"
                     "c.jpg,monocyte,test\r\nd.jpg,eosinophil,train\r\nshort\r\na.jpg,platelet,train\r\n"
                     "c.jpg,basophil,Val\r\ne.jpg,basophil,val\r\n".encode("utf-8"))
    logs = []
    recs = ds.read_class_csv(path, logs.append)
    # only train rows and rows with no split are trained on: a lab's val cells stay unseen
    assert [(r.image.name, r.cls) for r in recs] == [("a.jpg", "neutrophil"), ("b.jpg", "lymphocyte")]
    text = "\n".join(logs)
    assert ("1 rows of the test split, 2 rows of the val split left out (trained on: the rows whose split "
            "is train or empty)") in text
    assert "d.jpg" in text and "platelet (1)" in text

    def refused(content: bytes, match: str):
        path.write_bytes(content)
        with pytest.raises(ds.TrainingDataError, match=match):
            ds.read_class_csv(path)

    refused("image,class\na.jpg,neutr\u00f3phil\n".encode("latin-1"), "not UTF-8")
    refused(b"image;class\nd.jpg;neutrophil\n", "no row to train on: 1 rows whose image is not there")
    refused(b"image|class\na.jpg|neutrophil\n", "needs the columns image and class")
    path.write_bytes(b"image;class;split\r\nb.jpg;LY;\r\n")  # Excel's CSV in much of Europe
    assert [(r.image.name, r.cls) for r in ds.read_class_csv(path)] == [("b.jpg", "lymphocyte")]
    path.write_bytes(b"sep=;\r\nimage;class\r\nb.jpg;LY\r\n")  # with Excel's separator line
    assert [(r.image.name, r.cls) for r in ds.read_class_csv(path)] == [("b.jpg", "lymphocyte")]
    refused(b"image,x,y,width,height,class\na.jpg,1,2,30,30,neutrophil\n", "box columns")
    refused(b"image,class\nd.jpg,neutrophil\n", "no row to train on: 1 rows whose image is not there")


def test_a_lab_csv_gives_each_image_one_class_once(tmp_path):
    # merged annotators' sheets: one image was trained on under every class its rows gave
    path = _three_cells_and_a_csv_path(tmp_path)
    path.write_text("image,class\na.jpg,neutrophil\n./a.jpg,lymphocyte\nb.jpg,LY\n"
                    "c.jpg,basophil\nc.jpg,monocyte\n")
    with pytest.raises(ds.TrainingDataError) as err:
        ds.read_class_csv(path)
    assert str(err.value) == (f"--lab-csv {path}: 2 image(s) given more than one class: "
                              "a.jpg (neutrophil, lymphocyte), c.jpg (basophil, monocyte); keep "
                              "one class per image")
    # the same row twice is one image, said
    path.write_text("image,class\na.jpg,neutrophil\na.jpg,NE\nb.jpg,lymphocyte\n")
    logs = []
    assert [r.image.name for r in ds.read_class_csv(path, logs.append)] == ["a.jpg", "b.jpg"]
    assert "1 rows repeating an image and its class left out" in "\n".join(logs)


def test_an_image_in_a_val_or_test_row_is_not_trained_on_from_any_source(tmp_path):
    # a val row of an image another row gives to train: trained on, while the log said the val
    # row was left out; and two CSVs, or a CSV and class folders, each gave their images
    from wbc_batch.train.classifier import ClsTrainConfig, lab_records

    path = _three_cells_and_a_csv_path(tmp_path)
    path.write_text("image,class,split\na.jpg,neutrophil,train\nb.jpg,lymphocyte,\n"
                    "a.jpg,neutrophil,val\nc.jpg,monocyte,test\n")
    with pytest.raises(ds.TrainingDataError) as err:
        ds.read_class_csv(path)
    assert str(err.value) == (f"--lab-csv {path}: 1 image(s) listed to train on and in a val or "
                              "test row: a.jpg (val); keep each image in one split")

    def records(*csvs, folders=()):
        cfg = ClsTrainConfig(data=tmp_path, out=tmp_path / "out", use_public=False,
                             lab_csvs=tuple(csvs), lab_folders=tuple(folders))
        logs = []
        return [(r.image.name, r.cls) for r in lab_records(cfg, logs.append)], "\n".join(logs)

    first, second, held = (tmp_path / f"{n}.csv" for n in ("first", "second", "held"))
    first.write_text("image,class\na.jpg,neutrophil\nb.jpg,lymphocyte\n")
    second.write_text("image,class\nb.jpg,lymphocyte\nc.jpg,monocyte\n")
    got, logs = records(first, second)
    assert got == [("a.jpg", "neutrophil"), ("b.jpg", "lymphocyte"), ("c.jpg", "monocyte")]
    assert "1 image(s) named by two sources with the same class, trained on once" in logs
    second.write_text("image,class\nb.jpg,monocyte\n")
    with pytest.raises(ds.TrainingDataError, match=r"1 lab image\(s\) given two classes by the "
                       r"lab's sources: .*b\.jpg \(lymphocyte in --lab-csv .*first\.csv, monocyte "
                       r"in --lab-csv .*second\.csv\); keep one class per image"):
        records(first, second)
    second.write_text("image,class\nc.jpg,monocyte\n")
    held.write_text("image,class,split\na.jpg,neutrophil,train\nc.jpg,monocyte,test\n")
    got, logs = records(second, held)
    assert got == [("a.jpg", "neutrophil")]
    assert re.search(r"lab: 1 image\(s\) that a CSV keeps for val or test left out of training: "
                     r"\S*c\.jpg \(--lab-csv \S*second\.csv; test in a CSV\)", logs)
    folder = tmp_path / "classes" / "monocyte"
    folder.mkdir(parents=True)
    shutil.copy(tmp_path / "c.jpg", folder / "c.jpg")
    (tmp_path / "classes" / "held.csv").write_text(
        "image,class,split\nmonocyte/c.jpg,monocyte,val\n../a.jpg,neutrophil,train\n")
    got, logs = records(tmp_path / "classes" / "held.csv", folders=[tmp_path / "classes"])
    assert got == [("a.jpg", "neutrophil")]  # class folders of every cell, a CSV of the splits
    assert "monocyte/c.jpg (--lab-classes" in logs and "; val in a CSV)" in logs
    # a CSV of the held-out cells alone: no error of its own, the folders give the rest
    shutil.copy(tmp_path / "b.jpg", tmp_path / "classes" / "monocyte" / "b.jpg")
    (tmp_path / "classes" / "held.csv").write_text("image,class,split\nmonocyte/c.jpg,monocyte,val\n")
    got, logs = records(tmp_path / "classes" / "held.csv", folders=[tmp_path / "classes"])
    assert got == [("b.jpg", "monocyte")] and "; val in a CSV)" in logs
    with pytest.raises(ds.TrainingDataError, match="no row to train on"):  # alone, it is an error
        records(tmp_path / "classes" / "held.csv")
    (tmp_path / "classes" / "monocyte" / "b.jpg").unlink()
    with pytest.raises(ds.TrainingDataError, match="the lab's sources leave no image to train on: "
                                                   "every one is kept for val or test by a CSV"):
        records(tmp_path / "classes" / "held.csv", folders=[tmp_path / "classes"])


def test_a_val_row_written_on_windows_holds_its_cell_back_and_a_typo_in_one_is_named(tmp_path):
    # `CELLS\Monocyte\c.JPG` for classes/monocyte/c.jpg: "1 rows of the val split left out"
    # was logged, and the cell was trained on; a val row naming no file was not named
    import unicodedata

    from wbc_batch.train.classifier import ClsTrainConfig, lab_records

    _three_cells_and_a_csv_path(tmp_path)
    folder = tmp_path / "classes" / "monocyte"
    folder.mkdir(parents=True)
    shutil.copy(tmp_path / "c.jpg", folder / "c.jpg")
    shutil.copy(tmp_path / "b.jpg", folder / "b.jpg")
    nfc = unicodedata.normalize("NFC", "m\u00fcller.jpg")
    shutil.copy(tmp_path / "a.jpg", folder / nfc)
    held = tmp_path / "classes" / "held.csv"
    held.write_text("image,class,split\r\nMonocyte\\C.JPG,monocyte,val\r\n"
                    "monocyte\\c_typo.jpg,monocyte,test\r\n"
                    + unicodedata.normalize("NFD", "monocyte/M\u00fcller.jpg") + ",monocyte,val\r\n",
                    encoding="utf-8")
    cfg = ClsTrainConfig(data=tmp_path, out=tmp_path / "out", use_public=False,
                         lab_csvs=(held,), lab_folders=(tmp_path / "classes",))
    logs = []
    got = [r.image.name for r in lab_records(cfg, logs.append)]
    assert got == ["b.jpg"]
    logs = "\n".join(logs)
    assert "lab: 2 image(s) that a CSV keeps for val or test left out of training" in logs
    assert ("1 val or test rows name an image that is not there (paths relative to "
            f"{held.parent}): monocyte\\c_typo.jpg (test)") in logs
    # train rows are found the same way, as `evaluate` finds the same CSV's images
    (tmp_path / "train.csv").write_text("image,class\nA.JPG,neutrophil\nclasses/MONOCYTE/b.jpg,"
                                        "monocyte\n")
    assert sorted(r.image.name for r in ds.read_class_csv(tmp_path / "train.csv")) == [
        "a.jpg", "b.jpg"]


def test_a_lab_csv_split_is_read_in_any_case_and_a_split_it_does_not_know_is_refused(tmp_path):
    path = _three_cells_and_a_csv_path(tmp_path)
    path.write_text("image,class,split\na.jpg,neutrophil,Train \nb.jpg,lymphocyte, TRAIN\n"
                    "c.jpg,monocyte, Test\n")
    logs = []
    assert [r.image.name for r in ds.read_class_csv(path, logs.append)] == ["a.jpg", "b.jpg"]
    assert "1 rows of the test split" in "\n".join(logs)
    # a split the reader does not know is named, not left out with the blame on the images
    path.write_text("image,class,split\na.jpg,neutrophil,training\nb.jpg,lymphocyte,Training\n"
                    "c.jpg,monocyte,validation\n")
    with pytest.raises(ds.TrainingDataError) as err:
        ds.read_class_csv(path)
    assert str(err.value) == (f"--lab-csv {path}: split values that are none of train, val, test or "
                              "empty: 'training' (2 rows), 'validation' (1 rows)")


def test_lab_masks_are_found_by_the_names_labs_give_them_in_every_convention(tmp_path):
    from wbc_batch.train.segmenter import FG_ANY, _mask_labels, load_mask_items

    rng = np.random.default_rng(7)
    (tmp_path / "masks").mkdir()
    img, mask = _cell_image(rng)
    labels = np.select([mask == 255, mask == 128], [2, 1], 0).astype(np.uint8)
    saved = {"std.png": ("std.png", mask), "map.jpg": ("map.PNG", labels),
             "whole.png": ("whole.png.png", np.where(mask > 0, 255, 0).astype(np.uint8)),
             "small.png": ("small.tif", mask[:100, :100]), "none.png": (None, None)}
    for name, (mask_name, m) in saved.items():
        cv2.imwrite(str(tmp_path / name), img)
        if mask_name:
            cv2.imwrite(str(tmp_path / "masks" / mask_name), m)
    logs = []
    recs = ds.read_mask_folder(tmp_path, logs.append)
    assert sorted(r.image.name for r in recs) == ["map.jpg", "small.png", "std.png", "whole.png"]
    assert any("none.png" in line for line in logs)
    by = {r.image.name: r for r in recs}
    assert np.array_equal(_mask_labels(by["map.jpg"].mask), _mask_labels(by["std.png"].mask))
    assert set(np.unique(_mask_labels(by["whole.png"].mask)).tolist()) == {0, FG_ANY}
    items = load_mask_items(recs, logs.append)
    assert len(items) == 3 and any("small.png (mask 100x100, image 160x160)" in line for line in logs)
    (tmp_path / "masks" / "std.png").unlink()
    with pytest.raises(ds.TrainingDataError, match="no image there has a mask"):
        ds.read_mask_folder(tmp_path / "masks")


def test_a_lab_field_of_several_cells_is_sampled_around_each_cell_at_its_size(tmp_path):
    # a field's cells were taken as one: a diameter of all their pixels together (six cells of
    # 150 px trained at a third of their size) and one centre, on the glass between them
    from wbc_batch.analysis import median_diameter
    from wbc_batch.sample import make_smear
    from wbc_batch.train.segmenter import load_mask_items

    smear = make_smear(640, 480, n_wbc=5, seed=3)
    (tmp_path / "masks").mkdir()
    cv2.imwrite(str(tmp_path / "field.png"), smear.rgb[..., ::-1])
    cv2.imwrite(str(tmp_path / "masks" / "field.png"), smear.mask)
    inverted = np.where(smear.mask > 0, 0, 255).astype(np.uint8)  # the glass drawn white
    cv2.imwrite(str(tmp_path / "inverted.png"), smear.rgb[..., ::-1])
    cv2.imwrite(str(tmp_path / "masks" / "inverted.png"), inverted)
    logs = []
    [item] = load_mask_items(ds.read_mask_folder(tmp_path), logs.append)
    sizes = [max(c.width, c.height) for c in smear.cells]
    assert len(smear.cells) >= 4 and len(item.centers) == len(smear.cells)
    assert item.diameter == pytest.approx(median_diameter(smear.mask > 0))
    assert min(sizes) * 0.8 <= item.diameter <= max(sizes) * 1.05
    for cx, cy in item.centers:  # each centre on a cell
        assert smear.labels[int(round(cy)), int(round(cx))] > 0
    assert len(logs) == 1 and "inverted.png (the mask marks" in logs[0] and "inverted?" in logs[0]
    # a crowded field's inverted mask marks less of it, but all of its edges
    crowded = make_smear(640, 480, n_wbc=6, diameter=110, seed=3, gap=10)
    assert 0.5 <= (crowded.mask == 0).mean() <= 0.85
    cv2.imwrite(str(tmp_path / "masks" / "inverted.png"),
                np.where(crowded.mask > 0, 0, 255).astype(np.uint8))
    cv2.imwrite(str(tmp_path / "inverted.png"), crowded.rgb[..., ::-1])
    logs.clear()
    assert len(load_mask_items(ds.read_mask_folder(tmp_path), logs.append)) == 1
    assert "inverted.png (the mask marks" in logs[0]


def test_a_mask_value_is_cytoplasm_to_the_trainer_when_it_is_to_evaluate(tmp_path):
    # 64 was a WBC pixel to `evaluate` (metrics.mask_regions) and background to the trainer
    from wbc_batch.metrics import mask_regions, read_mask, standard_mask
    from wbc_batch.train.segmenter import _mask_labels

    mask = np.zeros((80, 80), np.uint8)
    cv2.circle(mask, (40, 40), 30, 64, -1)
    cv2.circle(mask, (40, 40), 12, 255, -1)
    cv2.imwrite(str(tmp_path / "m.png"), mask)
    labels = _mask_labels(tmp_path / "m.png")
    regions = mask_regions(*standard_mask(read_mask(tmp_path / "m.png")))
    assert np.array_equal(labels > 0, regions["wbc"])
    assert np.array_equal(labels == 2, regions["nucleus"])


def test_one_cell_of_a_mask_is_sampled_as_before():
    # every WBC Image Dataset mask holds one cell (and specks): its item must not change, so
    # that the shipped recipe reproduces
    from wbc_batch.train.segmenter import _cells_of

    fg = np.zeros((120, 120), bool)
    cv2.circle(fg.view(np.uint8), (60, 50), 30, 1, -1)
    fg[5:8, 5:8] = True  # a speck, under 5 % of the cell
    diameter, centres = _cells_of(fg)
    ys, xs = np.nonzero(fg)
    assert diameter == pytest.approx(np.sqrt(4 * fg.sum() / np.pi))
    assert centres == [(xs.mean(), ys.mean())]


def test_lab_masks_in_sample_folders_as_run_save_masks_writes_them(tmp_path):
    # images in per-sample folders, masks as `run --save-masks` writes them, were refused as
    # "0 images"; and a folder named Masks was not looked in
    rng = np.random.default_rng(5)
    lab = tmp_path / "lab"
    for rel in ("s1/a.jpg", "s1/b.png", "s2/a.jpg", "top.png"):
        img, mask = _cell_image(rng)
        (lab / rel).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(lab / rel), img)
        if rel != "s1/b.png":
            (lab / "Masks" / rel).parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(lab / "Masks" / f"{rel}.png"), mask)
    (lab / "s2" / "masks").mkdir()  # masks kept beside a sample's images: named, not images
    cv2.imwrite(str(lab / "s2" / "masks" / "a.png"), mask)
    logs = []
    records = ds.read_mask_folder(lab, logs.append)
    assert sorted((r.image.relative_to(lab).as_posix(), r.mask.relative_to(lab).as_posix())
                  for r in records) == [("s1/a.jpg", "Masks/s1/a.jpg.png"),
                                        ("s2/a.jpg", "Masks/s2/a.jpg.png"),
                                        ("top.png", "Masks/top.png.png")]
    assert logs == [f"--lab-masks {lab}: 1 files in sub-folders named masks are read as neither "
                    f"images nor masks: s2/masks/a.png (the masks of s1/x.jpg go in "
                    f"{lab / 'Masks'}/s1/)",
                    f"--lab-masks {lab}: 1 images without a mask left out: s1/b.png"]


def test_a_lab_mask_or_an_icon_among_a_labs_images_is_not_trained_on(tmp_path):
    # `run` refuses a label mask and an icon (`imageio.check_smear`); the segmenter trainer had
    # trained on them as smears, when a lab's folder gave them masks of their own
    from wbc_batch.train.segmenter import load_mask_items

    rng = np.random.default_rng(12)
    lab = tmp_path / "lab"
    (lab / "masks").mkdir(parents=True)
    img, mask = _cell_image(rng)
    for name, picture in (("cell.jpg", img), ("drawn.png", mask), ("icon.png", img[60:80, 60:80])):
        cv2.imwrite(str(lab / name), picture)
        cv2.imwrite(str(lab / "masks" / f"{Path(name).stem}.png"), mask[:picture.shape[0], :picture.shape[1]])
    logs = []
    items = load_mask_items(ds.read_mask_folder(lab, logs.append), logs.append)
    assert [it.rgb.shape for it in items] == [img.shape]
    assert np.array_equal(items[0].rgb, cv2.imread(str(lab / "cell.jpg"))[:, :, ::-1])
    assert len(logs) == 1 and logs[0].startswith("2 masked images left out: "), logs
    assert "drawn.png (not a smear: looks like a label mask" in logs[0]
    assert "icon.png (not a smear: too small to hold a WBC (20x20 px" in logs[0]


def test_lab_masks_in_a_linked_sample_folder_are_found_as_its_images_are(tmp_path):
    # the images' search followed a linked sample folder, the masks' search did not
    rng = np.random.default_rng(6)
    store, lab = tmp_path / "store", tmp_path / "lab"
    (store / "s1").mkdir(parents=True)
    (store / "masks" / "s1").mkdir(parents=True)
    img, mask = _cell_image(rng)
    cv2.imwrite(str(store / "s1" / "f1.jpg"), img)
    cv2.imwrite(str(store / "masks" / "s1" / "f1.png"), mask)
    (lab / "masks").mkdir(parents=True)
    (lab / "s1").symlink_to(store / "s1", target_is_directory=True)
    (lab / "masks" / "s1").symlink_to(store / "masks" / "s1", target_is_directory=True)
    (lab / "masks" / "s1" / "loop").symlink_to(lab / "masks", target_is_directory=True)
    [record] = ds.read_mask_folder(lab)
    assert record.mask == lab / "masks" / "s1" / "f1.png"
    # a convenience link to a sample's masks folder that sorts first does not take its masks
    (lab / "masks" / "s1").unlink()
    shutil.copytree(store / "masks" / "s1", lab / "masks" / "s1", symlinks=True)
    (lab / "masks" / "latest").symlink_to(lab / "masks" / "s1", target_is_directory=True)
    [record] = ds.read_mask_folder(lab)
    assert record.mask == lab / "masks" / "s1" / "f1.png"
    # a link to a hidden folder (current -> .snapshots/...) is followed, as for the images
    for top in (lab, lab / "masks"):
        (top / ".snapshots").mkdir()
        (top / "current").symlink_to(".snapshots", target_is_directory=True)
    cv2.imwrite(str(lab / ".snapshots" / "f2.jpg"), img)
    cv2.imwrite(str(lab / "masks" / ".snapshots" / "f2.png"), mask)
    assert sorted(r.image.relative_to(lab).as_posix() for r in ds.read_mask_folder(lab)) == \
        ["current/f2.jpg", "s1/f1.jpg"]
    # a link above the masks folder does not list its files a second time
    (lab / "masks" / "s1" / "up").symlink_to(tmp_path, target_is_directory=True)
    cv2.imwrite(str(lab / "masks" / "top.png"), mask)
    from wbc_batch.truth import iter_files

    listed = [p.relative_to(lab / "masks").as_posix() for p in iter_files(lab / "masks", (".png",))]
    assert [p for p in listed if p.endswith("top.png")] == ["top.png"], listed


def test_training_reads_16_bit_and_transparent_images_as_run_does(tmp_path):
    from wbc_batch.imageio import read_image
    from wbc_batch.train.segmenter import _read_rgb

    img, _ = _cell_image(np.random.default_rng(8), 64)
    deep = tmp_path / "deep.png"
    cv2.imwrite(str(deep), img.astype(np.uint16) * 16)  # a 12-bit camera in a 16-bit PNG
    rgba = tmp_path / "rgba.png"
    cv2.imwrite(str(rgba), np.dstack([img, np.where(np.arange(64) < 32, 0, 255)[None, :].repeat(64, 0)])
                .astype(np.uint8))
    for path in (deep, rgba):
        assert np.array_equal(_read_rgb(path), read_image(path))
    assert _read_rgb(deep).mean() > 150  # not the near-black the 8-bit reader made of it
    with pytest.raises(ValueError, match="cannot read image"):
        _read_rgb(tmp_path / "missing.png")


@pytest.mark.parametrize("command", ["segmenter", "classifier"])
def test_an_init_folder_without_weights_is_refused_before_any_work(tmp_path, command):
    from click.testing import CliRunner

    from wbc_batch.cli import build_cli

    seg, cls = _lab_folders(tmp_path, np.random.default_rng(9))
    (tmp_path / "empty").mkdir()
    lab = ["--lab-masks", str(seg)] if command == "segmenter" else ["--lab-classes", str(cls)]
    result = CliRunner().invoke(build_cli(), ["train", command, "--no-public", *lab, "--init",
                                              str(tmp_path / "empty"), "-o", str(tmp_path / "b")])
    assert result.exit_code == 2 and "Usage:" not in result.output
    assert f"holds no {command}.safetensors" in result.output
    assert not (tmp_path / "b").exists()


def test_a_segmenter_fine_tuned_into_a_new_bundle_keeps_the_init_classifier(tmp_path):
    import json

    from click.testing import CliRunner

    from wbc_batch.bundle import load_bundle
    from wbc_batch.cli import build_cli

    seg, _ = _lab_folders(tmp_path, np.random.default_rng(10))
    out = tmp_path / "fine"
    result = CliRunner().invoke(build_cli(), ["train", "segmenter", "--no-public", "--lab-masks", str(seg),
                                              "--init", str(MODELS), "-o", str(out), "--steps", "1",
                                              "--batch", "2", "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert (out / "classifier.safetensors").read_bytes() == (MODELS / "classifier.safetensors").read_bytes()
    shipped = json.loads((MODELS / "bundle.json").read_text())["classifier"]
    assert json.loads((out / "bundle.json").read_text())["classifier"] == shipped
    bundle = load_bundle(out)  # a whole bundle: `run --model OUT` works
    assert bundle.temperature == shipped["temperature"]
    assert "lab: 3 masked images of 3 with a mask" in result.output


# --- the bundle folders training writes (-o) and starts from (--init) ----------------------------

def _no_training(monkeypatch):
    """Trainers that fail the test if they are ever reached (so that a refusal that does not come
    can never write into the shipped bundle)."""
    from wbc_batch.train import classifier, segmenter

    def reached(*args, **kwargs):
        raise AssertionError("the trainer was reached")

    for module, name in ((segmenter, "train_segmenter"), (classifier, "train_classifier"),
                         (classifier, "refit_stain_reference")):
        monkeypatch.setattr(module, name, reached)


@pytest.mark.parametrize("command", ["segmenter", "classifier", "stain-reference"])
def test_the_shipped_bundle_is_never_trained_into_and_the_message_says_what_to_do(tmp_path, monkeypatch,
                                                                                   command):
    from click.testing import CliRunner

    from wbc_batch.cli import build_cli

    _no_training(monkeypatch)
    lab = _no_public(tmp_path, "segmenter" if command == "segmenter" else "classifier")
    for out in (MODELS, MODELS / ".." / "models"):
        result = CliRunner().invoke(build_cli(), ["train", command, *lab, "-o", str(out)])
        assert result.exit_code == 2, result.output
        assert f"-o {out} is the model bundle shipped with wbc-batch" in result.output
        todo = "cp -r" if command == "stain-reference" else "--init"
        assert "Instead, " in result.output and todo in result.output
    if command != "stain-reference":  # a new folder inside the package is refused too, and not made
        result = CliRunner().invoke(build_cli(), ["train", command, *lab, "-o", str(MODELS / "mine")])
        assert result.exit_code == 2 and "lies inside the installed wbc_batch package" in result.output
        assert not (MODELS / "mine").exists()


def test_the_trainers_themselves_refuse_the_shipped_bundle_before_any_work(tmp_path, monkeypatch):
    from wbc_batch.bundle import DEFAULT_BUNDLE_DIR
    from wbc_batch.train import classifier, segmenter
    from wbc_batch.train.folders import BundleFolderError

    for module, name in ((segmenter, "_gather"), (classifier, "lab_records"), (classifier, "_crop_cutter")):
        monkeypatch.setattr(module, name, _stop)   # any work would stop the test, not the trainer
    with pytest.raises(BundleFolderError, match="is the model bundle shipped"):
        segmenter.train_segmenter(segmenter.SegTrainConfig(data=tmp_path, out=DEFAULT_BUNDLE_DIR, use_public=False))
    cfg = classifier.ClsTrainConfig(data=tmp_path, out=DEFAULT_BUNDLE_DIR, init=DEFAULT_BUNDLE_DIR, use_public=False)
    for trainer in (classifier.train_classifier, classifier.refit_stain_reference):
        with pytest.raises(BundleFolderError, match="is the model bundle shipped"):
            trainer(cfg)


@pytest.mark.parametrize("command", ["segmenter", "classifier"])
def test_an_out_that_is_a_file_is_refused_before_any_work(tmp_path, monkeypatch, command):
    from click.testing import CliRunner

    from wbc_batch.cli import build_cli
    from wbc_batch.train import classifier, segmenter
    from wbc_batch.train.folders import BundleFolderError

    afile = tmp_path / "AFILE"
    afile.write_text("not a bundle")
    _no_training(monkeypatch)
    result = CliRunner().invoke(build_cli(), ["train", command, *_no_public(tmp_path, command), "-o", str(afile)])
    assert result.exit_code == 2 and "is a file" in result.output
    monkeypatch.undo()
    monkeypatch.setattr(segmenter, "_gather", _stop)
    monkeypatch.setattr(classifier, "lab_records", _stop)
    for out in (afile, afile / "bundle"):
        with pytest.raises(BundleFolderError, match="is a file"):
            if command == "segmenter":
                segmenter.train_segmenter(segmenter.SegTrainConfig(data=tmp_path, out=out, use_public=False))
            else:
                classifier.train_classifier(classifier.ClsTrainConfig(data=tmp_path, out=out, use_public=False))


@pytest.mark.parametrize("command", ["segmenter", "classifier"])
def test_an_out_holding_run_results_is_refused_before_any_work(tmp_path, command):
    """-o given the results folder of a real `wbc-batch run` (as the run's -o was): the bundle's
    files would be mixed into its reports."""
    from click.testing import CliRunner

    from conftest import draw_field, write_image
    from wbc_batch.cli import build_cli

    smears, results = tmp_path / "smears", tmp_path / "results"
    write_image(smears / "a.png", draw_field(96, 96))
    ran = CliRunner().invoke(build_cli(), ["run", str(smears), "-o", str(results), "--no-overlays"])
    assert ran.exit_code == 0, ran.output
    before = sorted(p.name for p in results.iterdir())
    result = CliRunner().invoke(build_cli(), ["train", command, *_no_public(tmp_path, command), "-o", str(results)])
    assert result.exit_code == 2 and result.exception.__class__ is SystemExit
    assert f"-o {results} holds the results of a wbc-batch run or watch" in result.output
    assert sorted(p.name for p in results.iterdir()) == before


def test_the_segmenter_makes_out_before_it_trains(tmp_path, monkeypatch):
    """Not after the training, which a folder that cannot be made would lose."""
    import wbc_batch.nets as nets
    import wbc_batch.train.segmenter as segmenter

    seg, _ = _lab_folders(tmp_path, np.random.default_rng(12))
    out = tmp_path / "new" / "bundle"
    monkeypatch.setattr(nets, "UNet", _stop)   # the network is built when the training starts
    with pytest.raises(KeyboardInterrupt):
        segmenter.train_segmenter(segmenter.SegTrainConfig(data=tmp_path, out=out, lab_masks=(seg,),
                                                           use_public=False, threads=1), log=lambda _: None)
    assert out.is_dir()


def _damaged_copy(dest: Path, name: str) -> Path:
    """A copy of the shipped bundle whose `name` file is cut short, as a broken copy leaves it."""
    dest.mkdir()
    for f in ("bundle.json", "segmenter.safetensors", "classifier.safetensors"):
        shutil.copyfile(MODELS / f, dest / f)
    whole = (MODELS / name).read_bytes()
    (dest / name).write_bytes(whole[:len(whole) // 2])
    return dest


@pytest.mark.parametrize("command, damaged", [("segmenter", "segmenter.safetensors"),
                                              ("classifier", "classifier.safetensors"),
                                              ("classifier", "segmenter.safetensors"),
                                              ("classifier", "bundle.json")])
def test_a_damaged_init_bundle_is_one_line_before_any_work(tmp_path, command, damaged):
    from click.testing import CliRunner

    from wbc_batch.cli import build_cli

    seg, cls = _lab_folders(tmp_path, np.random.default_rng(13))
    init = _damaged_copy(tmp_path / "init", damaged)
    lab = ["--lab-masks", str(seg)] if command == "segmenter" else ["--lab-classes", str(cls)]
    tiny = ["--steps", "1", "--batch", "2"] if command == "segmenter" else ["--epochs", "1", "--min-steps", "1"]
    result = CliRunner().invoke(build_cli(), ["train", command, "--no-public", *lab, "--init", str(init),
                                              "-o", str(tmp_path / "b"), "--threads", "1", *tiny])
    assert result.exit_code == 2 and result.exception.__class__ is SystemExit, result.output
    said = result.output.strip().splitlines()
    assert said[-1].startswith("Error: --init") and str(init / damaged) in said[-1], said
    assert not any(line.startswith(("lab/", "train:", "precision")) for line in said), said
    assert not (tmp_path / "b").exists()


def test_a_stopped_training_exits_130_saying_what_out_holds(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from wbc_batch.cli import build_cli
    from wbc_batch.train import classifier, segmenter
    from wbc_batch.train.folders import describe

    out = tmp_path / "b"

    def stopped(cfg, log=print):
        out.mkdir(exist_ok=True)
        for name in ("bundle.json", "segmenter.safetensors"):
            shutil.copyfile(MODELS / name, out / name)
        raise KeyboardInterrupt

    monkeypatch.setattr(classifier, "train_classifier", stopped)
    monkeypatch.setattr(segmenter, "train_segmenter", stopped)
    for command in ("segmenter", "classifier"):
        result = CliRunner().invoke(build_cli(), ["train", command, *_no_public(tmp_path, command), "-o", str(out)])
        assert result.exit_code == 130, result.output
        assert result.output.strip().splitlines()[-1] == f"Interrupted: {out} now holds a segmenter and no classifier."
    assert describe(tmp_path / "none") == "nothing (it was not made)"
    _take_shipped_segmenter(out)   # bundle.json records the sha256 of other weights than those there
    shutil.copyfile(MODELS / "classifier.safetensors", out / "segmenter.safetensors")
    assert describe(out).startswith("a segmenter that is not the one bundle.json describes")


def test_hidden_files_and_folders_in_lab_folders_are_skipped_as_run_skips_them(tmp_path):
    """A class folder copied from a Mac holds `._x.jpg` (AppleDouble, not an image); one on a NAS
    a `.@__thumb/` of small copies. Neither is a cell to train on; `run` skips both."""
    from wbc_batch.discovery import discover_images

    seg, cls = _lab_folders(tmp_path, np.random.default_rng(17))
    for d in [cls / c for c in CLASSES]:
        for p in list(d.iterdir()):
            (d / f"._{p.name}").write_bytes(b"\x00\x05\x16\x07AppleDouble")
            (d / ".@__thumb").mkdir(exist_ok=True)
            cv2.imwrite(str(d / ".@__thumb" / p.name), cv2.resize(cv2.imread(str(p)), (32, 32)))
    (cls / ".@__thumb").mkdir()
    cv2.imwrite(str(cls / ".@__thumb" / "x.jpg"), _cell_image(np.random.default_rng(1), 64)[0])
    logs = []
    recs = ds.read_class_folders(cls, logs.append)
    assert len(recs) == 10 == len(discover_images(cls))
    assert not any(part.startswith(".") for r in recs for part in r.image.parts[-2:])
    assert not logs  # a hidden folder is no class folder that names no class
    shutil.copyfile(seg / "img 0.png", seg / "._img 0.png")
    shutil.copyfile(seg / "masks" / "img 0.png", seg / "masks" / "._img 0.png")
    assert sorted(r.image.name for r in ds.read_mask_folder(seg)) == ["img 0.png", "img 1.png", "img 2.png"]


def test_a_lab_csv_with_nothing_to_train_on_says_why(tmp_path, monkeypatch):
    from click.testing import CliRunner

    import wbc_batch.train.classifier as classifier
    from wbc_batch.cli import build_cli

    path = _three_cells_and_a_csv_path(tmp_path)
    path.write_text("image,class,split\na.jpg,eosinophil,val\nb.jpg,eosinophil,test\n")
    result = CliRunner().invoke(build_cli(), ["train", "classifier", "--no-public", "--lab-csv", str(path),
                                              "--init", str(MODELS), "-o", str(tmp_path / "b")])
    assert result.exit_code == 1 and result.exception.__class__ is SystemExit
    assert (f"Error: --lab-csv {path}: no row to train on: 1 rows of the test split, 1 rows of the val split "
            "left out (trained on: the rows whose split is train or empty)") in result.output
    for content, why in (("image,class\nnope/a.jpg,neutrophil\n", "1 rows whose image is not there left out "
                                                                  f"(paths relative to {path.parent}; in "
                                                                  "another letter case, one file must "
                                                                  "fit): nope/a.jpg"),
                         ("image,class\na.jpg,blast\n", "rows with a class that is none of neutrophil, lymphocyte, "
                                                        "monocyte, eosinophil, basophil left out: blast (1)")):
        path.write_text(content)
        with pytest.raises(ds.TrainingDataError, match=re.escape(f"no row to train on: {why}")):
            ds.read_class_csv(path)
    # rows left out of a CSV that leaves some to train on are said once, before any work
    path.write_text("image,class,split\na.jpg,eosinophil,val\nb.jpg,eosinophil,train\n")
    monkeypatch.setattr(classifier, "_crop_cutter", _stop)
    logs = []
    with pytest.raises(KeyboardInterrupt):
        classifier.train_classifier(classifier.ClsTrainConfig(data=tmp_path, out=tmp_path / "b",
                                                              lab_csvs=(path,), use_public=False), log=logs.append)
    assert sum("1 rows of the val split left out" in line for line in logs) == 1, logs


def test_lab_class_folders_and_csvs_take_plural_short_names(tmp_path):
    rng = np.random.default_rng(18)
    names = {"Lymphs": "lymphocyte", "Monos": "monocyte", "Neuts": "neutrophil", "Eos": "eosinophil",
             "Basos": "basophil", "Lymphocytes": "lymphocyte"}
    for name in names:
        (tmp_path / name).mkdir()
        cv2.imwrite(str(tmp_path / name / "a.png"), _cell_image(rng, 64)[0])
    got = {r.image.parent.name: r.cls for r in ds.read_class_folders(tmp_path)}
    assert got == names
    assert normalise_class("Plts") == "plts" and normalise_class("cells") == "cells"
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("image,class\nLymphs/a.png,Lymphs\nNeuts/a.png,NEUTS\n")
    assert [r.cls for r in ds.read_class_csv(csv_path)] == ["lymphocyte", "neutrophil"]


def test_unreadable_lab_images_are_counted_and_named_apart_from_those_without_a_cell(tmp_path, fake_bundle):
    from conftest import FakeSession, draw_field, write_image
    from wbc_batch.bundle import load_bundle
    from wbc_batch.train.classifier import ClsTrainConfig, build_crop_sets

    lab = tmp_path / "lab"
    write_image(lab / "neutrophil" / "cell.png", draw_field(120, 120, cells=[(60, 60, 22)]))
    write_image(lab / "neutrophil" / "blank.png", draw_field(120, 120))
    (lab / "neutrophil" / "broken.jpg").write_bytes(b"garbage")
    (lab / "monocyte").mkdir()
    (lab / "monocyte" / "empty.png").write_bytes(b"")
    jpeg = write_image(tmp_path / "whole.jpg", draw_field(120, 120, cells=[(60, 60, 22)]))
    (lab / "lymphocyte").mkdir()
    (lab / "lymphocyte" / "cut.jpg").write_bytes(jpeg.read_bytes()[:600])
    cfg = ClsTrainConfig(data=tmp_path, out=fake_bundle, lab_folders=(lab,), use_public=False, crop_size=32,
                         crop_margin=1.3)
    logs = []
    sets = build_crop_sets(cfg, "train", FakeSession(), load_bundle(fake_bundle), log=logs.append)
    assert len(sets["lab"][1]) == 1
    assert any(line.startswith("lab/train: 1 crops, 1 images/boxes without a found cell, 3 images that cannot "
                               "be read or analysed") for line in logs), logs
    named = [line for line in logs
             if line.startswith("lab/train: images that cannot be read or analysed left out")]
    assert len(named) == 1 and all(name in named[0] for name in ("broken.jpg", "empty.png (empty file",
                                                                 "cut.jpg (truncated JPEG"))
    # a lab's cells the segmenter missed are named too, so that it can look at them
    assert f"lab/train: images where no cell was found left out: {lab / 'neutrophil' / 'blank.png'}" in logs
    for p in ((lab / "neutrophil" / "cell.png"), (lab / "neutrophil" / "blank.png")):
        p.unlink()
    with pytest.raises(ds.TrainingDataError, match="none of its 3 images can be read or analysed: .*empty.png"):
        build_crop_sets(cfg, "train", FakeSession(), load_bundle(fake_bundle), log=lambda _: None)


def test_a_label_mask_a_thumbnail_and_tiny_wbcs_in_a_class_folder_are_named_with_runs_reason(
        tmp_path, fake_bundle, monkeypatch):
    # a lab's class folder holding a mask beside its cell, or an icon: cut as smears and said
    # to be images "where no cell was found"; an image whose WBCs are under 8 px stopped the
    # training with a traceback. Each is now left out with the reason `run` gives
    from conftest import FakeSession, draw_field, write_image
    from wbc_batch import analysis
    from wbc_batch.bundle import load_bundle
    from wbc_batch.results import ImageNotAnalysable
    from wbc_batch.train.classifier import ClsTrainConfig, build_crop_sets

    lab = tmp_path / "lab"
    write_image(lab / "neutrophil" / "cell.png", draw_field(120, 120, cells=[(60, 60, 22)]))
    mask = np.zeros((120, 120, 3), np.uint8)
    mask[30:90, 30:90] = 128
    mask[50:70, 50:70] = 255
    write_image(lab / "neutrophil" / "cell_mask.png", mask)
    write_image(lab / "monocyte" / "icon.png", draw_field(24, 24))
    write_image(lab / "lymphocyte" / "far.png", draw_field(300, 300, cells=[(150, 150, 20)]))
    real = analysis.find_cells

    def tiny_in_far(rgb, *args, **kw):
        if rgb.shape[:2] == (300, 300):
            raise ImageNotAnalysable("the WBCs found are about 6.0 px across, fewer than the 8 px "
                                     "needed to tell nucleus from cytoplasm")
        return real(rgb, *args, **kw)

    monkeypatch.setattr(analysis, "find_cells", tiny_in_far)
    cfg = ClsTrainConfig(data=tmp_path, out=fake_bundle, lab_folders=(lab,), use_public=False,
                         crop_size=32, crop_margin=1.3)
    logs = []
    sets = build_crop_sets(cfg, "train", FakeSession(), load_bundle(fake_bundle), log=logs.append)
    assert len(sets["lab"][1]) == 1
    assert any("0 images/boxes without a found cell, 3 images that cannot be read or analysed" in line
               for line in logs), logs
    named = next(line for line in logs if "cannot be read or analysed left out" in line)
    for said in ("cell_mask.png (looks like a label mask", "icon.png (too small to hold a WBC",
                 "far.png (the WBCs found are about 6.0 px across"):
        assert said in named, named
    assert not any("no cell was found" in line for line in logs)


def test_a_cached_lab_crop_set_says_again_what_it_left_out(tmp_path, fake_bundle):
    # with --cache, a second training said only "(cached)", and where no crop was left blamed
    # the segmenter for a folder of masks and icons it never saw (a review)
    from conftest import FakeSession, draw_field, write_image
    from wbc_batch.bundle import load_bundle
    from wbc_batch.train.classifier import ClsTrainConfig, build_crop_sets

    lab = tmp_path / "lab"
    mask = np.zeros((120, 120, 3), np.uint8)
    mask[30:90, 30:90] = 128
    write_image(lab / "neutrophil" / "cell_mask.png", mask)
    write_image(lab / "monocyte" / "icon.png", draw_field(24, 24))
    cfg = ClsTrainConfig(data=tmp_path, out=fake_bundle, lab_folders=(lab,), use_public=False,
                         crop_size=32, crop_margin=1.3, cache=tmp_path / "cache")
    for attempt in range(2):
        logs = []
        with pytest.raises(ds.TrainingDataError, match="none of its 2 images can be read or analysed: "):
            build_crop_sets(cfg, "train", FakeSession(), load_bundle(fake_bundle), log=logs.append)
        named = next(line for line in logs if "cannot be read or analysed left out" in line)
        assert "icon.png (too small" in named and "cell_mask.png (looks like a label mask" in named
    assert any(line.endswith("0 crops (cached)") for line in logs)  # the second time: the cache
    # a cache of before this change (a crop could be cut from a mask) is not read: a new name
    assert all("-r2-train-" in p.name for p in (tmp_path / "cache").glob("crops-lab-*"))
    assert len(list((tmp_path / "cache").glob("crops-lab-*"))) == 1


def test_a_fine_tuned_segmenter_keeps_every_earlier_stage_and_records_absolute_paths(tmp_path, monkeypatch):
    import json

    from click.testing import CliRunner

    from wbc_batch.bundle import sha256_file
    from wbc_batch.cli import build_cli

    _lab_folders(tmp_path, np.random.default_rng(14))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(build_cli(), ["train", "segmenter", "--no-public", "--lab-masks", "seg", "--init",
                                              str(MODELS), "-o", "fine", "--steps", "1", "--batch", "2",
                                              "--threads", "1"])
    assert result.exit_code == 0, result.output
    shipped = json.loads((MODELS / "bundle.json").read_text())["segmenter"]
    meta = json.loads((tmp_path / "fine" / "bundle.json").read_text())["segmenter"]
    # the shipped segmenter's own stage 1, then the shipped (stage 2) segmenter itself
    assert meta["stages"][:-1] == shipped["stages"]
    last = meta["stages"][-1]
    assert (last["steps"], last["val"], last["config"]) == (shipped["steps"], shipped["val"], shipped["config"])
    assert last["weights_sha256"] == sha256_file(MODELS / "segmenter.safetensors")
    assert last["bundle"] == str(MODELS.resolve())
    assert meta["config"]["lab_masks"] == [str(tmp_path / "seg")] and meta["config"]["init"] == str(MODELS.resolve())
    assert meta["config"]["out"] == str(tmp_path / "fine")


def test_a_fine_tuned_classifier_records_where_it_started_and_no_val_score_it_has_not(tmp_path, monkeypatch):
    import json

    from click.testing import CliRunner

    from wbc_batch.bundle import sha256_file
    from wbc_batch.cli import build_cli

    _lab_folders(tmp_path, np.random.default_rng(15))
    (tmp_path / "cells.csv").write_text("image,class,split\n" + "".join(
        f"cls/{c}/{i}.jpg,{c},{'val' if i else 'train'}\n" for c in CLASSES for i in range(2)))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(build_cli(), ["train", "classifier", "--no-public", "--lab-csv", "cells.csv",
                                              "--lab-classes", "cls", "--init", str(MODELS), "-o", "fine",
                                              "--epochs", "1", "--min-steps", "1", "--threads", "1"])
    assert result.exit_code == 0, result.output
    shipped = json.loads((MODELS / "bundle.json").read_text())["classifier"]
    meta = json.loads((tmp_path / "fine" / "bundle.json").read_text())["classifier"]
    # every source its weights learned from, as the segmenter's: this run's and the lineage's
    assert meta["trained_on"] == sorted({"lab", *shipped["trained_on"]})
    assert meta["stages"][:-1] == shipped.get("stages", [])
    last = meta["stages"][-1]
    assert last["trained_on"] == shipped["trained_on"] and last["val"] == shipped["val"]
    assert last["weights_sha256"] == sha256_file(MODELS / "classifier.safetensors")
    config = meta["config"]
    assert config["init"] == str(MODELS.resolve())
    assert config["data"] is None  # --no-public: the default data folder was never read
    assert config["lab_csvs"] == [str(tmp_path / "cells.csv")] and config["lab_folders"] == [str(tmp_path / "cls")]
    # no val split: no loss recorded as a val score, and a note saying why
    assert meta["val"] == {"epoch": 1, "note": "no val split: the last epoch is kept"}
    assert set(meta["train"]) == {"epoch", "loss"}


def test_which_segmenter_cuts_the_crops_is_said_and_one_that_is_not_inits_is_warned_about(tmp_path, monkeypatch):
    from wbc_batch.bundle import sha256_file
    from wbc_batch.train import classifier
    from wbc_batch.train.segmenter import SegTrainConfig, train_segmenter

    seg, cls = _lab_folders(tmp_path, np.random.default_rng(16))
    out = tmp_path / "scratch"
    logs = []
    train_segmenter(SegTrainConfig(data=tmp_path, out=out, lab_masks=(seg,), use_public=False, steps=1, batch=2,
                                   patch=64, threads=1), log=logs.append)
    assert any(line.startswith("WARNING: --no-public without --init: the segmenter starts from random weights")
               and line.endswith("add --init shipped") for line in logs), logs
    assert not any("classifier" in line for line in logs)  # none in OUT: nothing to say of one
    monkeypatch.setattr(classifier, "build_crop_sets", _stop)
    for bundle in (out, tmp_path / "new"):
        logs = []
        with pytest.raises(KeyboardInterrupt):
            classifier.train_classifier(classifier.ClsTrainConfig(
                data=tmp_path, out=bundle, init=MODELS, lab_folders=(cls,), use_public=False, threads=1),
                log=logs.append)
        sha = sha256_file(bundle / "segmenter.safetensors")[:12]
        said = [line for line in logs if line.startswith("crops cut by the segmenter")]
        warned = [line for line in logs if line.startswith(f"WARNING: {bundle} held a segmenter already")]
        if bundle == out:
            assert said == [f"crops cut by the segmenter {out / 'segmenter.safetensors'} (sha256 {sha})"]
            assert len(warned) == 1 and sha256_file(MODELS / "segmenter.safetensors")[:12] in warned[0]
        else:
            assert said == [f"crops cut by the segmenter {bundle / 'segmenter.safetensors'} (sha256 {sha}, "
                            "copied from --init)"] and not warned
    # the classifier of a lab without --init starts from nothing too: said, as for the segmenter,
    # before the crops are cut (before: nothing said, and "Done: ... use it")
    logs = []
    with pytest.raises(KeyboardInterrupt):
        classifier.train_classifier(classifier.ClsTrainConfig(
            data=tmp_path, out=out, lab_folders=(cls,), use_public=False, threads=1), log=logs.append)
    # without lab images, nothing to learn from: the error says so, not this warning first
    nothing = []
    with pytest.raises(BaseException):
        classifier.train_classifier(classifier.ClsTrainConfig(
            data=tmp_path, out=out, use_public=False, threads=1), log=nothing.append)
    assert not any("random weights" in line for line in nothing)
    assert [line for line in logs if "random weights" in line] == [
        "WARNING: --no-public without --init: the classifier starts from random weights and learns "
        f"from the lab's {len(ds.read_class_folders(cls))} labelled images alone, far fewer than the "
        "shipped one was trained on. To fine-tune the shipped classifier instead, add --init shipped"]


def test_classes_with_few_lab_cells_are_warned_about(tmp_path, monkeypatch):
    from wbc_batch.train import classifier

    records = [ds.ClassRecord(tmp_path / f"{c}{i}.png", c, "lab")
               for c, n in (("neutrophil", 6), ("lymphocyte", 2), ("monocyte", 1)) for i in range(n)]
    crops = np.zeros((8, 48, 48, 3), np.uint8), np.array([0] * 6 + [1] * 2)  # the monocyte had no cell found
    monkeypatch.setattr(classifier, "lab_records", lambda cfg, log=None: records)
    monkeypatch.setattr(classifier, "_crop_cutter", lambda cfg, device, log=print: (None, None))
    monkeypatch.setattr(classifier, "build_crop_sets", lambda cfg, split, session, bundle, log, pool=None, lab=None: (
        {"lab": crops} if split == "train" else {}))
    monkeypatch.setattr(classifier, "epoch_steps", _stop)   # the warning comes before the training
    logs = []
    with pytest.raises(KeyboardInterrupt):
        classifier.train_classifier(classifier.ClsTrainConfig(data=tmp_path, out=tmp_path / "b", crop_size=32,
                                                              threads=1), log=logs.append)
    warned = [line for line in logs if line.startswith("WARNING: few of the lab's cells")]
    assert len(warned) == 1 and "lymphocyte (2), monocyte (0):" in warned[0] and "neutrophil" not in warned[0]


@pytest.mark.parametrize("total, warmup", [(20, 0.05), (10, 0.1), (1, 0.05), (1500, 0.05)])
def test_every_run_length_gets_a_schedule_even_where_the_warm_up_is_one_step(total, warmup):
    # --steps 20 (segmenter) and 10 classifier steps made PyTorch's OneCycleLR divide by zero
    import torch

    from wbc_batch.train.schedule import one_cycle

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = one_cycle(opt, 1e-3, total, warmup)
    lrs = []
    for _ in range(total):
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert len(lrs) == total and all(lr >= 0 for lr in lrs)
    if total == 1500:  # the shipped recipe's schedule is PyTorch's own, unchanged
        ref = torch.optim.lr_scheduler.OneCycleLR(
            torch.optim.AdamW(torch.nn.Linear(2, 2).parameters(), lr=1e-3), max_lr=1e-3,
            total_steps=total, pct_start=warmup)
        assert sched.state_dict()["_schedule_phases"] == ref.state_dict()["_schedule_phases"]


def test_a_crop_worker_ignores_ctrl_c_for_its_whole_life(monkeypatch):
    # Ctrl-C reaches the whole process group: a worker importing torch had printed two
    # tracebacks over the "Interrupted:" line (a real run stopped at 9 and 10 s showed them),
    # and one waiting for work a third; the parent stops the workers instead (CropPool.close)
    import signal

    import wbc_batch.bundle
    from wbc_batch.train import crop_pool

    seen = []
    monkeypatch.setattr(wbc_batch.bundle, "load_bundle",
                        lambda *a, **k: seen.append(signal.getsignal(signal.SIGINT)) or "bundle")
    monkeypatch.setattr(crop_pool, "segmenting_session", lambda bundle, device: "session")
    monkeypatch.setattr(crop_pool, "_CUTTER", None)
    import cv2
    import torch

    before = signal.getsignal(signal.SIGINT)
    threads = torch.get_num_threads(), cv2.getNumThreads()
    try:
        crop_pool._start_worker("unused", 1)
        after = signal.getsignal(signal.SIGINT)
    finally:  # the worker sets this process's thread counts, and its SIGINT
        torch.set_num_threads(threads[0])
        cv2.setNumThreads(threads[1])
        signal.signal(signal.SIGINT, before)
    assert seen == [signal.SIG_IGN] and after == signal.SIG_IGN
    assert crop_pool._CUTTER == ("bundle", "session")
    with crop_pool._sigint_ignored():  # what the workers are spawned under
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    assert signal.getsignal(signal.SIGINT) is before


def test_an_interrupted_crop_pool_terminates_its_workers():
    # they ignore Ctrl-C: without this the parent waited for every chunk being cut
    import multiprocessing
    import signal
    import time
    from concurrent.futures import ProcessPoolExecutor

    from wbc_batch.train import crop_pool

    pool = crop_pool.CropPool(Path("unused"), workers=1)
    with pytest.raises(KeyboardInterrupt):
        with pool:
            with crop_pool._sigint_ignored():  # a worker as `cut` spawns it, busy for a minute
                pool._pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
                busy = pool._pool.submit(time.sleep, 60)
            processes = list(pool._pool._processes.values())
            raise KeyboardInterrupt
    assert pool._pool is None and len(processes) == 1
    assert processes[0].exitcode == -signal.SIGTERM and busy.done()


def _txl_layout(root: Path, names: list) -> None:
    """TXL-PBC's own folders with one WBC box per train image."""
    from conftest import draw_field, write_image

    for name in names:
        write_image(root / "txl-pbc" / "TXL_PBC" / "images" / "train" / f"{name}.png",
                    draw_field(64, 64, cells=[(32, 32, 10)]))
        label = root / "txl-pbc" / "TXL_PBC" / "labels" / "train" / f"{name}.txt"
        label.parent.mkdir(parents=True, exist_ok=True)
        label.write_text("0 0.5 0.5 0.4 0.4\n")


def test_other_split_files_choose_the_rows_every_public_reader_returns(tmp_path):
    """`splits` (`train --splits`) replaces DATA/splits for every reader; TXL-PBC, which keeps its
    splits in folders, is narrowed by a txl-pbc.csv where the folder has one."""
    from wbc_batch.train import datasets as ds

    data = _tiny_public_data(tmp_path / "data")
    _txl_layout(data, ["a", "b"])
    other = tmp_path / "other"
    other.mkdir()
    (other / "pbc-wbc.csv").write_text("image,class,split\ntrain/1.png,monocyte,train\n"
                                       "val/0.png,neutrophil,val\n")
    assert [r.cls for r in ds.pbc(data, "train")] == ["neutrophil", "monocyte"]
    assert [(r.image.name, r.cls) for r in ds.pbc(data, "train", other)] == [("1.png", "monocyte")]
    assert len(ds.pbc(data, "val", other)) == 1
    assert len(ds.txl_pbc(data, "train", other)) == 2     # no txl-pbc.csv: its folders
    (other / "txl-pbc.csv").write_text("image,split\ntrain/b.png,train\n")
    assert [r.image.name for r in ds.txl_pbc(data, "train", other)] == ["b.png"]
    assert ds.split_file(data, None, "bccd.csv") == data / "splits" / "bccd.csv"


def test_txl_pbc_boxes_are_placed_on_an_odd_sized_image_at_its_own_size(tmp_path):
    """575 x 363 px, odd-sized as TXL-PBC images can be: a half-size decode had read 576 x 364
    and scaled every box with it."""
    root = tmp_path / "txl-pbc" / "TXL_PBC"
    (root / "images" / "train").mkdir(parents=True)
    (root / "labels" / "train").mkdir(parents=True)
    cv2.imwrite(str(root / "images" / "train" / "a.jpg"), np.full((363, 575, 3), 200, np.uint8))
    (root / "labels" / "train" / "a.txt").write_text("0 1.0 1.0 0.4 0.4\n")
    (record,) = ds.txl_pbc(tmp_path, "train")
    assert record.boxes == [(int(575 * 0.8), int(363 * 0.8), int(575 * 0.4), int(363 * 0.4))]


@pytest.mark.parametrize("name", ["f.jpg", "f.png", "f.bmp", "f.tif"])
def test_an_images_stored_size_comes_from_its_header_as_opencv_reads_it(tmp_path, name):
    cv2.imwrite(str(tmp_path / name), np.zeros((301, 503, 3), np.uint8))
    assert ds.stored_size(tmp_path / name) == (503, 301)


@pytest.mark.parametrize("content, why", [(b"", "empty file"),
                                         (b"not a jpeg", "not an image OpenCV decodes")])
def test_an_image_without_a_size_is_named_with_why(tmp_path, content, why):
    (tmp_path / "f.jpg").write_bytes(content)
    with pytest.raises(ds.TrainingDataError, match=rf"f\.jpg \({why}\)"):
        ds.stored_size(tmp_path / "f.jpg")
    (tmp_path / "txl-pbc" / "TXL_PBC" / "images" / "train").mkdir(parents=True)
    (tmp_path / "txl-pbc" / "TXL_PBC" / "labels" / "train").mkdir(parents=True)
    (tmp_path / "f.jpg").rename(tmp_path / "txl-pbc" / "TXL_PBC" / "images" / "train" / "f.jpg")
    (tmp_path / "txl-pbc" / "TXL_PBC" / "labels" / "train" / "f.txt").write_text("0 .5 .5 .2 .2\n")
    assert ds.txl_pbc(tmp_path, "train") == []  # left out, as before


@pytest.mark.parametrize("command", ["segmenter", "classifier"])
def test_splits_reach_the_training_config_and_a_folder_without_split_files_is_refused(tmp_path, monkeypatch,
                                                                                      command):
    from click.testing import CliRunner

    from wbc_batch.cli import build_cli
    from wbc_batch.train import classifier, segmenter

    module = {"segmenter": segmenter, "classifier": classifier}[command]
    seen = []
    monkeypatch.setattr(module, f"train_{command}", lambda cfg, log=print: seen.append(cfg))
    data, other = tmp_path / "data", tmp_path / "other"
    (data / "splits").mkdir(parents=True)
    other.mkdir()
    (other / "pbc-wbc.csv").write_text("image,class,split\n")

    def train(*args):
        return CliRunner().invoke(build_cli(), ["train", command, "--data", str(data),
                                                "-o", str(tmp_path / "b"), *args])

    result = train("--splits", str(other))
    assert result.exit_code == 2 and "no wbc-image-dataset.csv, bccd.csv there" in result.output
    result = train("--splits", str(other), "--no-public", *_no_public(tmp_path, command)[1:])
    assert result.exit_code == 2 and "--splits chooses rows of the public data" in result.output
    assert not seen
    for name in ("wbc-image-dataset.csv", "bccd.csv"):
        (other / name).write_text("image,split\n")
    result = train("--splits", str(other))
    assert result.exit_code == 0, result.output
    assert seen[0].splits == other and seen[0].data == data
    (other / "pbc-wbc.csv").unlink()  # the segmenter reads no PBC rows; the classifier does
    result = train("--splits", str(other))
    if command == "segmenter":
        assert result.exit_code == 0, result.output
    else:
        assert result.exit_code == 2 and "no pbc-wbc.csv there" in result.output


def test_crops_cached_for_other_split_files_are_kept_apart(tmp_path):
    from wbc_batch.train.classifier import ClsTrainConfig, _splits_key

    data, a, b = tmp_path / "data", tmp_path / "a", tmp_path / "b"
    for folder, rows in ((a, "x.png,neutrophil,train\n"), (b, "y.png,neutrophil,train\n")):
        folder.mkdir()
        (folder / "pbc-wbc.csv").write_text("image,class,split\n" + rows)

    def key(splits):
        return _splits_key(ClsTrainConfig(data=data, out=tmp_path, splits=splits), "pbc")

    assert key(None) == ""   # DATA/splits: the names crops were cached under before --splits
    assert key(a).startswith("-p") and key(a) != key(b)


def test_bundle_json_records_the_split_files_a_run_read_by_their_digests(tmp_path):
    """A --splits folder is often written for one run and removed: bundle.json keeps the
    digests of its files (and nothing of the kind without --splits)."""
    from wbc_batch.bundle import sha256_file
    from wbc_batch.train.classifier import ClsTrainConfig
    from wbc_batch.train.folders import config_record

    other = tmp_path / "other"
    other.mkdir()
    for name in ("pbc-wbc.csv", "bccd.csv", "wbc-image-dataset.csv", "txl-pbc.csv"):
        (other / name).write_text(f"image,split\n{name}.png,train\n")
    record = config_record(ClsTrainConfig(data=tmp_path, out=tmp_path, splits=other))
    assert record["splits"] == str(other.resolve())
    assert record["splits_sha256"] == {n: sha256_file(other / n) for n in
                                       ("wbc-image-dataset.csv", "pbc-wbc.csv", "bccd.csv", "txl-pbc.csv")}
    assert "splits_sha256" not in config_record(ClsTrainConfig(data=tmp_path, out=tmp_path))


def test_a_missing_segmenter_names_the_init_folder_when_one_was_given(tmp_path):
    # "OUT holds no segmenter.safetensors: ... or pass --init BUNDLE" when --init was passed
    from wbc_batch.bundle import BundleError
    from wbc_batch.train.classifier import ClsTrainConfig, take_init_segmenter

    only_classifier = tmp_path / "onlycls"
    only_classifier.mkdir()
    shutil.copy(MODELS / "bundle.json", only_classifier / "bundle.json")
    cfg = ClsTrainConfig(data=tmp_path, out=tmp_path / "out", init=only_classifier)
    with pytest.raises(BundleError) as err:
        take_init_segmenter(cfg)
    assert str(err.value) == (f"neither {tmp_path / 'out'} nor --init {only_classifier} holds a "
                              "segmenter.safetensors: name a whole model bundle folder (such as "
                              "`shipped`, the models shipped with wbc-batch) as --init, or train "
                              "the segmenter into the output folder first")
    with pytest.raises(BundleError, match="holds no segmenter.safetensors: train the segmenter "
                                          "first, or pass --init BUNDLE"):
        take_init_segmenter(ClsTrainConfig(data=tmp_path, out=tmp_path / "out"))


def test_the_commands_a_training_suggests_can_be_pasted_whatever_the_folder_name(tmp_path):
    # "wbc-batch run INPUT --model new bundle é" broke when pasted into a shell
    from wbc_batch_plugins.train_command import _where_it_is

    out = tmp_path / "new bundle é"
    out.mkdir()
    shutil.copy(MODELS / "segmenter.safetensors", out)
    shutil.copy(MODELS / "bundle.json", out)
    line = _where_it_is(out)
    assert f"Next: wbc-batch train classifier -o {shlex.quote(str(out))} ..." in line
    assert "'" in shlex.quote(str(out))


def test_export_onnx_is_suggested_only_where_the_exports_are_missing_or_stale(tmp_path):
    # before: `train stain-reference`, which changes no weight, said to export again
    from wbc_batch_plugins.train_command import _where_it_is

    out = tmp_path / "bundle"
    shutil.copytree(MODELS, out)
    assert "Done: " in _where_it_is(out) and "export-onnx" not in _where_it_is(out)
    (out / "classifier.onnx").unlink()
    assert _where_it_is(out).endswith(f"For --backend onnx, first: wbc-batch export-onnx --model {out}.")


def test_a_path_in_a_suggested_command_is_quoted_for_the_systems_shell(monkeypatch):
    # single quotes around a Windows path are kept as characters by cmd.exe
    import os

    from wbc_batch.results import shell_arg

    assert shell_arg("/data/new bundle") == "'/data/new bundle'"
    assert shell_arg("/data/bundle") == "/data/bundle"

    def on_windows(path):  # os.name back at once: pathlib cannot make paths while it is "nt"
        monkeypatch.setattr(os, "name", "nt")
        try:
            return shell_arg(path)
        finally:
            monkeypatch.undo()

    assert on_windows(r"C:\Users\lab\model_v2") == r"C:\Users\lab\model_v2"
    assert on_windows(r"C:\Users\lab\new bundle") == r'"C:\Users\lab\new bundle"'
    assert on_windows(r"C:\lab\R&D\model") == r'"C:\lab\R&D\model"'  # cmd.exe's & ends a command
    assert on_windows("\\\\nas\\WBC models\\") == '"\\\\nas\\WBC models\\\\"'  # \" is a quote


def test_an_inverted_mask_is_told_with_cells_cut_by_the_image_edge():
    # the glass of a crowded field drawn white, some cells cut by the edge: 85 % of the edge
    from wbc_batch.metrics import inverted_share as _inverted_share

    cells = np.zeros((480, 640), np.uint8)
    for centre in [(160, 160), (330, 150), (480, 300), (250, 330), (450, 120), (0, 240),
                   (640, 380), (300, 480)]:
        cv2.circle(cells, centre, 55, 255, -1)
    assert _inverted_share(cells == 0) == pytest.approx(0.8, abs=0.01)
    assert _inverted_share(cells > 0) is None
    crop = np.zeros((120, 120), bool)  # a crop's cell touching its four edges is no glass
    cv2.circle(crop.view(np.uint8), (60, 60), 60, 1, -1)
    assert crop.mean() > 0.75 and _inverted_share(crop) is None


def test_a_public_data_folder_copied_in_part_stops_in_one_line_or_leaves_an_image_out(tmp_path):
    # a missing BCCD annotation gave a FileNotFoundError traceback; an unreadable field image
    # a ValueError traceback, where a masked image that cannot be read is left out, said
    from wbc_batch.train.segmenter import load_box_items

    data = _tiny_public_data(tmp_path / "data")
    (data / "splits" / "bccd.csv").write_text(
        "image,annotation,labels,split\nJPEGImages/B_0.jpg,Annotations/B_0.xml,,train\n")
    with pytest.raises(ds.TrainingDataError, match=r"cannot read the VOC annotation .*B_0\.xml "
                                                   r"\(No such file or directory\): is the data "
                                                   "folder complete\\?"):
        ds.bccd(data, "train")
    (data / "bccd" / "Annotations").mkdir(parents=True)
    (data / "bccd" / "Annotations" / "B_0.xml").write_text("<annotation><object>")
    with pytest.raises(ds.TrainingDataError, match="cannot read the VOC annotation"):
        ds.bccd(data, "train")
    (data / "bccd" / "Annotations" / "B_0.xml").write_text(
        "<annotation><object><name>WBC</name><bndbox><xmin>2</xmin><ymin>2</ymin><xmax>30</xmax>"
        "<ymax>30</ymax></bndbox></object></annotation>")
    records = ds.bccd(data, "train")
    logs = []
    assert load_box_items(records, log=logs.append) == []  # the image itself is missing
    assert logs and logs[0].startswith("1 box images left out: B_0.jpg (")


def test_two_lab_images_whose_names_differ_in_case_alone_are_two_images(tmp_path):
    # matching a CSV's val rows without letter case had merged a.png and A.png, two files on
    # Linux, for training too: one was dropped as a repeat, or two classes stopped the run
    for name in ("a.png", "A.png"):
        shutil.copy(_three_cells_and_a_csv_path(tmp_path).parent / "a.jpg", tmp_path / name)
    csv_path = tmp_path / "two.csv"
    csv_path.write_text("image,class\na.png,neutrophil\nA.png,lymphocyte\n")
    assert sorted((r.image.name, r.cls) for r in ds.read_class_csv(csv_path)) == [
        ("A.png", "lymphocyte"), ("a.png", "neutrophil")]
    # a val row in either case holds back both: never too few
    csv_path.write_text("image,class,split\na.png,neutrophil,\nA.png,lymphocyte,\n"
                        "b.jpg,monocyte,\nA.PNG,lymphocyte,val\n")
    with pytest.raises(ds.TrainingDataError, match="2 image\\(s\\) listed to train on and in a "
                                                   "val or test row"):
        ds.read_class_csv(csv_path)


def test_files_on_a_disk_without_inode_numbers_are_told_apart_by_path(tmp_path, monkeypatch):
    # FAT, exFAT and some network drives give st_ino 0: every image would have been one
    import os
    import types

    _three_cells_and_a_csv_path(tmp_path)
    monkeypatch.setattr(os, "stat", lambda path, *a, **k: types.SimpleNamespace(st_dev=7,
                                                                                 st_ino=0))
    assert ds.file_identity(tmp_path / "a.jpg") != ds.file_identity(tmp_path / "b.jpg")


def test_one_file_under_two_names_is_one_image_to_train_on(tmp_path):
    # on a case-insensitive disk (a Mac, an SMB share) a.png and A.PNG are one file: with the
    # paths compared as written, it was trained as two classes without a word. A hard link is
    # such a second name on any disk.
    import os

    _three_cells_and_a_csv_path(tmp_path)
    os.link(tmp_path / "a.jpg", tmp_path / "a_again.jpg")
    csv_path = tmp_path / "two.csv"
    csv_path.write_text("image,class\na.jpg,neutrophil\na_again.jpg,lymphocyte\n")
    with pytest.raises(ds.TrainingDataError, match="1 image\\(s\\) given more than one class"):
        ds.read_class_csv(csv_path)
    csv_path.write_text("image,class\na.jpg,neutrophil\na_again.jpg,neutrophil\nb.jpg,monocyte\n")
    assert sorted(r.image.name for r in ds.read_class_csv(csv_path)) == ["a.jpg", "b.jpg"]


def test_a_second_training_into_an_out_being_trained_into_is_refused(tmp_path):
    # nothing held a training's OUT: a classifier started there while a segmenter trained
    # cut its crops with a segmenter the other run then replaced, pairing the two silently
    import torch

    from wbc_batch.output_folder import lock_output
    from wbc_batch.train import folders
    from wbc_batch.train.classifier import ClsTrainConfig, train_classifier
    from wbc_batch.train.segmenter import SegTrainConfig, train_segmenter

    torch.set_num_threads(1)
    seg, cls = _lab_folders(tmp_path, np.random.default_rng(1))
    out = tmp_path / "bundle"
    held = lock_output(out)  # another process's training (a second open file: its own lock)
    try:
        with pytest.raises(folders.BundleFolderError, match=r"-o .*bundle: another wbc-batch run, "
                                                            "watch or training is writing to"):
            train_segmenter(SegTrainConfig(data=tmp_path, out=out, lab_masks=(seg,),
                                           use_public=False, steps=2, batch=2, patch=64,
                                           eval_every=2, threads=1), log=lambda line: None)
        for name in ("segmenter.safetensors", "bundle.json"):  # a segmenter being trained
            shutil.copy2(MODELS / name, out / name)
        with pytest.raises(folders.BundleFolderError, match="another wbc-batch run, watch or "):
            train_classifier(ClsTrainConfig(data=tmp_path, out=out, lab_folders=(cls,),
                                            use_public=False, epochs=1, batch=4, crop_size=32,
                                            threads=1, widths=(8, 8, 8, 8), blocks=(1, 1, 1, 1)),
                             log=lambda line: None)
    finally:
        held.close()
    # let go of, the folder is this process's to train into, and free again once the trainer
    # returns (called from Python, it had stayed locked until the interpreter ended)
    train_segmenter(SegTrainConfig(data=tmp_path, out=out, lab_masks=(seg,), use_public=False,
                                   steps=2, batch=2, patch=64, eval_every=2, threads=1),
                    log=lambda line: None)
    assert not folders._HELD
    lock_output(out).close()


def _lab_fields(tmp_path) -> tuple:
    """(images folder, truth CSV) of the sample generator's six fields (21 boxed WBCs)."""
    from wbc_batch.sample import write_sample_set

    made = write_sample_set(tmp_path / "fields")
    return tmp_path / "fields" / "smears", Path(made["truth_csv"])


def test_a_labs_boxed_fields_are_trained_on_as_evaluate_reads_them(tmp_path):
    # a lab that annotated whole fields (labelImg, CVAT, a CSV of boxes) had to cut its cells
    # out first: --lab-csv refused box columns, and no option read the truth evaluate reads
    from click.testing import CliRunner

    from wbc_batch.cli import build_cli

    images, truth = _lab_fields(tmp_path)
    out = tmp_path / "bundle"
    result = CliRunner().invoke(build_cli(), [
        "train", "classifier", "--no-public", "--lab-truth", str(images), str(truth), "--init",
        str(MODELS), "-o", str(out), "--epochs", "1", "--min-steps", "2", "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert ("lab: 0 labelled single-cell images and 6 fields with 21 labelled boxes (neutrophil 6, "
            "lymphocyte 4, monocyte 4, eosinophil 4, basophil 3)") in result.output
    meta = json.loads((out / "bundle.json").read_text())["classifier"]
    crops = meta["train_crops"]["lab"]
    assert sum(crops.values()) >= 19 and all(crops.values()), crops  # a crop per found box
    if sum(crops.values()) < 21:  # the boxes the segmenter missed are named as boxes
        assert "lab/train: images or boxes of fields where no cell was found left out: " in result.output
    assert meta["config"]["lab_truths"] == [[str(images.resolve()), str(truth.resolve())]]
    # the same folder given where the truth belongs is named
    result = CliRunner().invoke(build_cli(), [
        "train", "classifier", "--no-public", "--lab-truth", str(truth), str(images), "--init",
        str(MODELS), "-o", str(tmp_path / "b2")])
    assert result.exit_code == 2 and "is not a folder (the images' folder comes first" in result.output


def test_lab_truth_reads_single_cells_and_fields_and_says_what_it_leaves_out(tmp_path):
    from wbc_batch.plugins import get_plugin_manager, get_truth_readers

    readers = get_truth_readers(get_plugin_manager(autoload=False))
    images, truth = _lab_fields(tmp_path)
    (images / "extra.png").write_bytes((images / "sample_A" / "field_02.png").read_bytes())
    rows = truth.read_text().splitlines()
    truth.write_text("\n".join(rows[:1] + [r for r in rows[1:] if not r.startswith("sample_B/field_03")]
                               + ["gone.jpg,1,1,40,40,neutrophil", "sample_B/field_03.jpg,1,1,40,40,WBC"]) + "\n")
    logs = []
    recs = recs_all = ds.read_lab_truth(images, truth, readers, logs.append)
    assert [(r.image.relative_to(images).as_posix(), type(r).__name__) for r in recs] == [
        (f"sample_{s}/field_0{k}.{'png' if k == 2 else 'jpg'}", "BoxRecord") for s in "AB" for k in (1, 2, 3)
    ][:5]
    boxes = [r.split(",")[0] for r in rows[1:]]
    assert [len(r.truth.boxes) for r in recs] == [boxes.count(r.image.relative_to(images).as_posix())
                                                  for r in recs]
    text = "\n".join(logs)
    where = f"--lab-truth {images} {truth}"
    assert (f"{where}: 1 images whose truth gives no cell a class (a mask, or boxes without a "
            "subtype) left out: sample_B/field_03.jpg") in text
    assert f"{where}: 1 images without truth left out: extra.png" in text
    assert f"{where}: 1 truth entries without an image under {images} left out: gone.jpg" in text
    assert "boxes in the labelled fields" not in text  # every box of a labelled field has a class


    single = tmp_path / "cells.csv"  # a CSV of single-cell images and their classes
    single.write_text("image,class\nsample_A/field_03.jpg,monocyte\n")
    (recs,) = ds.read_lab_truth(images, single, readers)
    assert (type(recs).__name__, recs.cls) == ("ClassRecord", "monocyte")

    split = tmp_path / "split.csv"
    split.write_text("image,x,y,width,height,class,split\nsample_A/field_03.jpg,1,1,40,40,monocyte,val\n")
    with pytest.raises(ds.TrainingDataError, match="has a split column, which --lab-truth does not read"):
        ds.read_lab_truth(images, split, readers)
    other = tmp_path / "other"
    other.mkdir()
    (other / "extra.png").write_bytes((images / "extra.png").read_bytes())
    with pytest.raises(ds.TrainingDataError, match=r"no image with a labelled cell to train on \(1 images"):
        ds.read_lab_truth(other, truth, readers)
    with pytest.raises(ds.TrainingDataError, match="--lab-truth IMAGES"):
        ds.read_class_csv(truth)  # a CSV of fields given as --lab-csv: the message says where it goes

    # a --lab-csv of val rows holds fields back from --lab-truth, as it does class folders' cells
    from wbc_batch.train.classifier import ClsTrainConfig, lab_records

    held = images / "held.csv"
    held.write_text("image,class,split\nsample_A/field_01.jpg,neutrophil,val\n")
    logs = []
    lab = lab_records(ClsTrainConfig(data=tmp_path, out=tmp_path, lab_csvs=(held,),
                                     lab_truths=((images, truth),), use_public=False),
                      logs.append, readers)
    assert [r.image.relative_to(images).as_posix() for r in lab] == [
        r.image.relative_to(images).as_posix() for r in recs_all[1:]]
    assert any("1 image(s) that a CSV keeps for val or test left out of training: "
               f"{images / 'sample_A' / 'field_01.jpg'} (--lab-truth" in line for line in logs), logs


def test_lab_truth_says_which_boxes_of_labelled_fields_it_cannot_train_on(tmp_path, caplog):
    # before: a field's boxes named "WBC" were left out without a word, and a "Blast" box was
    # said to be "scored as wrong", evaluate's words, though training leaves it out
    from wbc_batch.plugins import get_plugin_manager, get_truth_readers

    readers = get_truth_readers(get_plugin_manager(autoload=False))
    images, truth = _lab_fields(tmp_path)
    rows = truth.read_text().splitlines()
    first = rows[1].split(",")[0]
    truth.write_text("\n".join(rows + [f"{first},1,1,30,30,WBC", f"{first},50,1,30,30,Blast",
                                       f"{first},1,60,30,30,blast", f"{first},60,60,30,30,"]) + "\n")
    logs = []
    with caplog.at_level("WARNING", logger="wbc_batch"):
        recs = ds.read_lab_truth(images, truth, readers, logs.append)
    assert len(recs) == 6
    assert (f"--lab-truth {images} {truth}: 4 boxes in the labelled fields without a class to train "
            "on, left out (2 a class the models do not know, 2 no subtype)") in logs
    assert "classes the models do not know, left out of training: 'blast' (2" in caplog.text
    assert "scored as wrong" not in caplog.text



def test_lab_truth_refuses_a_split_column_in_a_truth_folder_and_skips_the_truths_own_masks(tmp_path):
    # a review: a truth folder holding truth.csv with a split column trained on its val rows;
    # the truth's masks beside the images were counted as images without truth
    from wbc_batch.plugins import get_plugin_manager, get_truth_readers
    from wbc_batch.sample import write_sample_set

    readers = get_truth_readers(get_plugin_manager(autoload=False))
    made = write_sample_set(tmp_path / "lab", images_subdir="", truth_subdir="")  # all in one folder
    lab = tmp_path / "lab"
    logs = []
    recs = ds.read_lab_truth(lab, lab, readers, logs.append)
    assert len(recs) == 6 and all(r.truth.mask_path is not None for r in recs)
    assert logs == [f"--lab-truth {lab} {lab}: 6 files under {lab} that are the truth's own masks, "
                    "not trained on"], logs
    table = Path(made["truth_csv"])
    rows = table.read_text().splitlines()
    table.write_text("\n".join([rows[0] + ",split"] + [r + ",val" for r in rows[1:]]) + "\n")
    with pytest.raises(ds.TrainingDataError, match="truth.csv has a split column"):
        ds.read_lab_truth(lab, lab, readers)
    (lab / "blank").mkdir()
    with pytest.raises(ds.TrainingDataError) as err:  # no reader knows it: training has no --truth-format
        ds.read_lab_truth(lab, lab / "blank", readers)
    assert "no truth reader recognises" in str(err.value) and "--truth-format" not in str(err.value)


def test_a_found_cell_between_two_boxes_is_trained_on_under_one_class():
    # a review: each box took its best found cell, so a cell overlapping a second box went in
    # twice, under both classes
    from wbc_batch.train.classifier import _one_cell_per_box

    cells = [(100, 100, 50, 50), (300, 100, 50, 50)]
    truth = [(102, 100, 50, 50), (120, 100, 50, 50), (500, 500, 40, 40)]
    assert _one_cell_per_box(truth, cells) == {0: cells[0]}  # box 2's best is box 1's cell
    assert _one_cell_per_box(truth[1:], cells) == {0: cells[0]}  # alone, it takes it (IoU 0.3+)
    assert _one_cell_per_box([], cells) == {} and _one_cell_per_box(truth, []) == {}


def test_one_field_given_by_two_sources_in_another_order_is_trained_on_once(tmp_path):
    from wbc_batch.plugins import get_plugin_manager, get_truth_readers
    from wbc_batch.train.classifier import ClsTrainConfig, lab_records

    readers = get_truth_readers(get_plugin_manager(autoload=False))
    images, truth = _lab_fields(tmp_path)
    rows = truth.read_text().splitlines()
    again = tmp_path / "again.csv"
    again.write_text("\n".join([rows[0]] + rows[:0:-1]) + "\n")  # the rows in reverse order
    logs = []
    lab = lab_records(ClsTrainConfig(data=tmp_path, out=tmp_path, use_public=False,
                                     lab_truths=((images, truth), (images, again))), logs.append, readers)
    assert len(lab) == 6
    assert any("6 image(s) named by two sources with the same class, trained on once" in line
               for line in logs), logs
    other = tmp_path / "other.csv"
    other.write_text("\n".join(rows[:-1] + [rows[-1].rsplit(",", 1)[0] + ",basophil"]) + "\n")
    with pytest.raises(ds.TrainingDataError, match="1 lab image.s. given two labellings by the lab's "
                                                   "sources: .*a field of 3 boxes in .*keep one source"):
        lab_records(ClsTrainConfig(data=tmp_path, out=tmp_path, use_public=False,
                                   lab_truths=((images, truth), (images, other))), None, readers)


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data not present")
def test_lab_truth_reads_bccd_fields_as_the_public_recipe_reads_them(tmp_path):
    # the same BCCD train fields given as a lab's VOC truth: each field with one labelled box
    # gets the box and class the recipe's reader gives it (the VOC reader, as evaluate reads
    # BCCD, labels a field only where it has one WBC box and one label)
    import csv

    from wbc_batch.plugins import get_plugin_manager, get_truth_readers

    rows = [r for r in csv.DictReader(open(SHARED / "splits" / "bccd.csv")) if r["split"] == "train"][:40]
    for r in rows:
        for key, folder in (("image", "JPEGImages"), ("annotation", "Annotations")):
            link = tmp_path / "BCCD" / folder / Path(r[key]).name
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(SHARED / "bccd" / r[key])
    (tmp_path / "labels.csv").symlink_to(SHARED / "bccd" / "labels.csv")
    public = {r.image.name: r for r in ds.bccd(SHARED, "train")}
    lab = ds.read_lab_truth(tmp_path / "BCCD" / "JPEGImages", tmp_path,
                            get_truth_readers(get_plugin_manager(autoload=False)))
    assert len(lab) >= 30
    for r in lab:
        pub = public[r.image.name]
        assert len(pub.boxes) == 1 and [tuple(b) for b in r.truth.boxes] == [tuple(pub.boxes[0])]
        assert r.truth.box_classes == pub.classes
    one = [name for name, r in public.items()
           if len(r.boxes) == 1 and r.classes[0] and name in {Path(x["image"]).name for x in rows}]
    assert sorted(r.image.name for r in lab) == sorted(one)
