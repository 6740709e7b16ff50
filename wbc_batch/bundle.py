"""A model bundle: one folder holding the two networks and the metadata that describes them.

Layout::

    bundle.json               metadata: architectures, canonical WBC diameter, crop size,
                              classifier temperature, classes, training provenance
    segmenter.safetensors     U-Net weights
    classifier.safetensors    ResNet weights
    segmenter.onnx            ONNX exports of the same weights (for the onnx backend)
    classifier.onnx

The default bundle ships inside the package (`wbc_batch/models/`); `--model DIR` points at
another. Nothing here imports torch: backends load the files they need.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Optional

from . import CLASSES
from .errors import WbcBatchError

DEFAULT_BUNDLE_DIR = Path(__file__).parent / "models"
META_FILE = "bundle.json"
#: the bundle.json `format` this version writes and reads; a newer one is refused
#: (`check_format`), since what it means may have changed
BUNDLE_FORMAT = 1
FILES = {
    "segmenter": "segmenter.safetensors",
    "classifier": "classifier.safetensors",
    "segmenter_onnx": "segmenter.onnx",
    "classifier_onnx": "classifier.onnx",
    "red_cells": "red_cells.safetensors",
}


class BundleError(WbcBatchError, RuntimeError):
    """A model bundle is missing, unreadable or inconsistent; the message names the file."""


@dataclass(frozen=True)
class ModelBundle:
    """A loaded bundle description (metadata only; weights are read by the backends)."""

    root: Path
    meta: dict = field(default_factory=dict)

    @property
    def files(self) -> dict:
        """name -> Path of each model file present in the bundle."""
        return {k: self.root / v for k, v in FILES.items() if (self.root / v).exists()}

    def path(self, name: str) -> Path:
        """The path of model file `name` (a key of FILES); BundleError when it is missing."""
        p = self.root / FILES[name]
        if p.is_file() and p.stat().st_size > 0:
            return p
        if p.is_dir():
            raise BundleError(f"model file {p} is a folder, not a file; "
                              + repair_hint(self.root, "put the bundle's file there"))
        shipped = is_shipped(self.root)
        if p.is_file():
            raise BundleError(f"model file is empty: {p}"
                              + (f"; {reinstall_advice()}" if shipped else ""))
        hint = (" (the bundle has a segmenter but no classifier: did `wbc-batch train classifier` "
                "stop before writing it?)"
                if name == "classifier" and (self.root / FILES["segmenter"]).is_file()
                and not shipped else "")
        raise BundleError(f"model file not found: {p}{hint}"
                          + (f"; {reinstall_advice()}" if shipped else ""))

    @property
    def diameter(self) -> float:
        """The WBC diameter (pixels) the segmenter was trained at."""
        return float(self.meta["segmenter"]["diameter"])

    @property
    def crop_size(self) -> int:
        """Side of the square crop the classifier takes."""
        return int(self.meta["classifier"]["crop_size"])

    @property
    def crop_margin(self) -> float:
        """Crop side = margin * the longer side of the cell's bounding box."""
        return float(self.meta["classifier"].get("crop_margin", 1.3))

    @property
    def temperature(self) -> float:
        """Divide classifier logits by this before the softmax (calibrated on val)."""
        return float(self.meta["classifier"].get("temperature", 1.0))

    @cached_property
    def stain_reference(self):
        """The classifier's `stain.StainReference` (fitted on its training crops), or None for
        bundles trained before it existed. Read once per bundle, not once per image."""
        from .stain import StainReference

        meta = self.meta.get("classifier", {}).get("stain_reference")
        return StainReference.from_meta(meta) if meta else None

    @cached_property
    def stain_target(self):
        """The `stain.StainTarget` that cells with an unusual stain are redrawn in (the stain of
        the classifier's largest training source), or None for bundles trained before it existed."""
        from .stain import StainTarget

        meta = self.meta.get("classifier", {}).get("stain_target")
        return StainTarget.from_meta(meta) if meta else None

    @cached_property
    def red_cell_sizer(self):
        """The `red_cells.RedCellSizer` of the bundle's red_cells.safetensors, or the package's
        where the bundle has none (a bundle trained before it, or by a lab: a field's red cells'
        size does not depend on the segmenter or the classifier). Read once per bundle.

        :raises BundleError: the bundle's file cannot be read as the sizer (named)."""
        from .red_cells import RedCellSizer, shipped_sizer

        p = None if self.root is None else Path(self.root) / FILES["red_cells"]
        if p is None or not p.exists():  # a bundle described in memory has no files
            return shipped_sizer()
        try:
            return RedCellSizer.load(p)
        except ValueError as exc:
            hint = repair_hint(self.root, f"train it again (wbc-batch train red-cells -o "
                                          f"{self.root}), or remove it to use the shipped sizer")
            raise BundleError(f"{exc}; {hint}") from None

    @property
    def classes(self) -> tuple:
        return tuple(self.meta.get("classes", CLASSES))

    def stale_onnx(self) -> list:
        """The networks whose ONNX file is not the export of the weights the bundle's
        .safetensors now hold: retrained into a folder that kept its old exports, or weights and
        bundle.json copied over another bundle's exports. By the hashes `export_onnx` records in
        bundle.json (`ONNX_SOURCE`: each network's .safetensors and, since, its .onnx file). A
        network whose section records its weights' sha256 (`WEIGHTS_SHA256`, written by versions
        that also record exports) but no export of them has no export of its own: an .onnx file
        beside it came from other weights. Older bundles, without either record, are not checked."""
        recorded = self.meta.get(ONNX_SOURCE) or {}
        hashes = self.file_hashes()
        stale = set()
        for net in ("segmenter", "classifier"):
            if f"{net}_onnx" not in hashes:
                continue
            if net not in recorded:
                section = self.meta.get(net)
                if net in hashes and isinstance(section, dict) and section.get(WEIGHTS_SHA256):
                    stale.add(net)  # never exported: the .onnx beside it is another's
                continue
            if any(name in hashes and hashes[name]["sha256"] != recorded[name]
                   for name in (net, f"{net}_onnx") if name in recorded):
                stale.add(net)
        return sorted(stale)

    def file_hashes(self) -> dict:
        """name -> sha256 hex digest of every file of the bundle, metadata included; read once
        per bundle object (the ONNX backend's check and run.json share them)."""
        return self._hashes

    @cached_property
    def _hashes(self) -> dict:
        """A file that cannot be read (a folder in its place, no permission) is recorded with
        the reason instead of a hash: run.json is written after every image is analysed, and an
        unused ONNX file must not lose them."""
        from .red_cells import SHIPPED

        out = {}
        files = {**self.files, "meta": self.root / META_FILE}
        for name, p in sorted(files.items()):
            if not p.exists():
                continue
            try:
                out[name] = {"file": p.name, "sha256": sha256_file(p)}
            except OSError as exc:
                out[name] = {"file": p.name, "sha256": None,
                             "error": f"cannot read: {exc.strerror or exc}"}
        if "red_cells" not in files and SHIPPED.is_file():  # the package's, which it uses
            out["red_cells"] = {"file": str(SHIPPED), "sha256": sha256_file(SHIPPED)}
        return out


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


#: bundle.json key: {network: sha256 of the .safetensors its ONNX file was exported from,
#: network + "_onnx": sha256 of that ONNX file}
ONNX_SOURCE = "onnx_exported_from"
#: bundle.json key, in a network's section: the sha256 of the .safetensors written with that
#: section (by training, since it records it); absent from older bundles, which are not checked
WEIGHTS_SHA256 = "weights_sha256"


def load_bundle(path: Optional[Path] = None, check: tuple = ("segmenter", "classifier")) -> ModelBundle:
    """Read a bundle's metadata. `None` means the default bundle shipped in the package.
    `check`: the networks whose weights must be those bundle.json describes (`_check_weights`);
    training, which cuts crops with the segmenter alone, checks only that one."""
    root = Path(path) if path is not None else DEFAULT_BUNDLE_DIR
    if root.is_file():  # --model OUT/bundle.json, or a weights file
        raise BundleError(f"a model bundle is a folder, the one that holds {META_FILE} and "
                          f"the weights; {root} is a file: give its folder, {root.parent}")
    if not root.is_dir():
        raise BundleError(f"model folder not found: {root}")
    meta_path = root / META_FILE
    if not meta_path.is_file():
        raise BundleError(f"not a model bundle (no {META_FILE}): {root}")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BundleError(f"cannot read {meta_path}: {exc}") from exc
    _check_meta(meta, meta_path)
    _check_weights(root, meta, meta_path, check)
    bundle = ModelBundle(root=root, meta=meta)
    try:  # built once here, so that a malformed one refuses the bundle, not every image
        bundle.stain_reference, bundle.stain_target
    except (ValueError, AttributeError) as exc:
        raise BundleError(f"{meta_path}: classifier.{exc}") from None
    return bundle


#: (section, key, smallest value allowed, whether the bundle must give it) of bundle.json's numbers
_NUMBERS = (("segmenter", "diameter", 0.0, True), ("classifier", "crop_size", 0.0, True),
            ("classifier", "crop_margin", 0.0, False),
            # logits are divided by it: it must be above 0.01, or their softmax can overflow
            ("classifier", "temperature", 0.01, False))
#: the architecture fields bundle.json may set that are lists (the others are single numbers)
_ARCH_LISTS = {"widths", "blocks"}
_ARCH_NUMBERS = {"groups", "num_classes"}
#: the architecture fields each network reads (`nets.SEGMENTER_DEFAULTS`, `CLASSIFIER_DEFAULTS`):
#: another is a typo ("width", "depth") that would build the default network without a word
ARCH_FIELDS = {"segmenter": ("widths", "groups"),
               "classifier": ("widths", "blocks", "groups", "num_classes")}


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _check_arch(meta, meta_path: Path) -> None:
    for section in ("segmenter", "classifier"):
        arch = meta[section].get("arch", {})
        if not isinstance(arch, dict):
            raise BundleError(f"{meta_path}: {section}.arch is not a JSON object")
        unknown = sorted(set(arch) - set(ARCH_FIELDS[section]))
        if unknown:
            raise BundleError(f"{meta_path}: {section}.arch has {unknown[0]!r}, which no "
                              f"{section} reads (it reads {', '.join(ARCH_FIELDS[section])})")
        for key, value in arch.items():
            if key in _ARCH_LISTS and not (isinstance(value, list) and value
                                           and all(map(_positive_int, value))):
                what = "a list of whole numbers above 0"
            elif key in _ARCH_NUMBERS and not _positive_int(value):
                what = "a whole number above 0"
            else:
                continue
            raise BundleError(f"{meta_path}: {section}.arch.{key} is {value!r}, not {what}")
    classes = meta["classifier"].get("arch", {}).get("num_classes", len(CLASSES))
    if classes != len(CLASSES):
        raise BundleError(f"{meta_path}: the classifier has {classes} classes; wbc-batch reports "
                          f"{len(CLASSES)} ({', '.join(CLASSES)})")


def _check_meta(meta, meta_path: Path) -> None:
    """Refuse a bundle.json that would fail later, image by image, or give NaN probabilities:
    sections that are not objects, and run-time numbers missing, not numbers or out of range."""
    if not isinstance(meta, dict):
        raise BundleError(f"{meta_path} is not a JSON object")
    check_format(meta, meta_path)
    for key in ("segmenter", "classifier"):
        if key not in meta:
            hint = (f" (a bundle with a segmenter alone: train its classifier with `wbc-batch "
                    f"train classifier -o {meta_path.parent}`, or did that stop before writing "
                    "it?)" if key == "classifier" and isinstance(meta.get("segmenter"), dict)
                    else "")
            raise BundleError(f"{meta_path} has no '{key}' section{hint}")
        if not isinstance(meta[key], dict):
            raise BundleError(f"{meta_path}: '{key}' is not a JSON object")
    for section, key, least, required in _NUMBERS:
        if key not in meta[section]:
            if required:
                raise BundleError(f"{meta_path}: '{section}' has no '{key}'")
            continue
        value = meta[section][key]
        if (isinstance(value, bool) or not isinstance(value, (int, float))
                or not math.isfinite(value) or value <= least
                or (key == "crop_size" and value != int(value))):
            raise BundleError(f"{meta_path}: {section}.{key} is {value!r}, not a "
                              f"{'whole ' if key == 'crop_size' else ''}number above {least:g}")
    _check_trained_crops(meta, meta_path)
    classes = meta.get("classes", list(CLASSES))
    if not isinstance(classes, list) or tuple(classes) != CLASSES:
        raise BundleError(f"{meta_path}: classes {classes!r} differ from {list(CLASSES)}")
    _check_arch(meta, meta_path)
    for section in ("segmenter", "classifier"):
        if not isinstance(meta[section].get(WEIGHTS_SHA256, ""), str):
            raise BundleError(f"{meta_path}: {section}.{WEIGHTS_SHA256} is not a sha256 string")
    source = meta.get(ONNX_SOURCE, {})
    if not isinstance(source, dict) or not all(isinstance(v, str) for v in source.values()):
        raise BundleError(f"{meta_path}: {ONNX_SOURCE} is not an object of sha256 strings")


def _check_trained_crops(meta: dict, meta_path: Path) -> None:
    """Refuse a classifier's crop size or margin that is not the one its training recorded
    (`classifier.config`, written by `train classifier`): the weights learned cells at that
    size, and other crops change classes without any error (a hand edit; the weights' sha256
    does not cover bundle.json). A bundle without the record is not checked."""
    section = meta["classifier"]
    trained = section.get("config")
    if not isinstance(trained, dict):
        return
    for key in ("crop_size", "crop_margin"):
        used, learned = section.get(key), trained.get(key)
        if used is None or not isinstance(learned, (int, float)) or isinstance(learned, bool):
            continue
        if not math.isclose(float(used), float(learned), rel_tol=1e-9):
            raise BundleError(f"{meta_path}: classifier.{key} is {used!r}, but the classifier was "
                              f"trained with {learned!r} (classifier.config.{key}): crops of "
                              "another size or margin change its classes; set it back to "
                              f"{learned!r}")


def check_format(meta: dict, meta_path: Path) -> None:
    """Refuse a bundle.json of a newer `format` than `BUNDLE_FORMAT` (or no whole number), which
    this version would read as it reads its own, whatever the new fields change.

    :raises BundleError: naming the file and the format."""
    fmt = meta.get("format", BUNDLE_FORMAT)
    if isinstance(fmt, bool) or not isinstance(fmt, int) or fmt < 1:
        raise BundleError(f"{meta_path}: format {fmt!r} is not a bundle format (a whole number "
                          "from 1)")
    if fmt > BUNDLE_FORMAT:
        version = meta.get("wbc_batch_version")
        by = f" (written by wbc-batch {version})" if version else ""
        raise BundleError(f"{meta_path}: bundle format {fmt}{by} is newer than this wbc-batch "
                          f"reads (up to {BUNDLE_FORMAT}): upgrade wbc-batch to use this bundle")


def weights_differ(root: Path, meta: dict, name: str) -> bool:
    """Whether the `name` weights in `root` are not those `meta` (bundle.json) records by sha256
    (`WEIGHTS_SHA256`); False where it records none, or the file is missing or unreadable."""
    section = meta.get(name) if isinstance(meta.get(name), dict) else {}
    recorded, path = section.get(WEIGHTS_SHA256), root / FILES[name]
    if recorded is None or not path.is_file():
        return False
    try:
        return sha256_file(path) != recorded
    except OSError:
        return False


def _check_weights(root: Path, meta: dict, meta_path: Path, networks: tuple) -> None:
    """Refuse weights that are not those bundle.json describes (crop size, temperature, stain
    reference): training stopped between writing the two, or one was copied over from another
    bundle. Only where bundle.json records their sha256 (`WEIGHTS_SHA256`); a missing or
    unreadable file is left to `ModelBundle.path` and the backends, which name it."""
    for name in networks:
        path = root / FILES[name]
        if weights_differ(root, meta, name):
            raise BundleError(f"{path} is not the {name} {meta_path} describes (its sha256 differs: "
                              "the file is damaged or was copied only in part, a training run "
                              "stopped between writing the two, or the file was copied from "
                              "another bundle); "
                              + repair_hint(root, "restore both files, or train it again"))


def reinstall_advice() -> str:
    """What to do when a file of the bundle shipped in the package is missing or damaged: nothing
    writes there (training and export-onnx refuse it), so the installation itself is damaged.
    In a git checkout (an editable install), the package is the working tree: a reinstall would
    leave the file as it is, git restores it."""
    root = DEFAULT_BUNDLE_DIR.parent.parent
    if (root / ".git").exists():
        return (f"the checkout's {DEFAULT_BUNDLE_DIR.name} folder is damaged: restore it with "
                f"`git checkout -- {DEFAULT_BUNDLE_DIR.parent.name}/{DEFAULT_BUNDLE_DIR.name}` "
                f"in {root}")
    return ("the installed wbc-batch is damaged: reinstall it (pip install --force-reinstall "
            "--no-deps, of the wheel or the package you installed)")


def is_shipped(root) -> bool:
    """Whether `root` is the bundle shipped in the package (by any spelling or link)."""
    try:
        return Path(root).resolve() == DEFAULT_BUNDLE_DIR.resolve()
    except OSError:
        return False


def repair_hint(root, usual: str) -> str:
    """`usual` (what to do about a bundle's bad file), or `reinstall_advice()` for the shipped
    bundle."""
    return reinstall_advice() if is_shipped(root) else usual


def meta_text(meta: dict) -> str:
    """bundle.json's text, as `write_meta` writes it."""
    return json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n"


def write_meta(root: Path, meta: dict) -> None:
    """Write bundle.json atomically."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / (META_FILE + ".tmp")
    tmp.write_text(meta_text(meta), encoding="utf-8")
    tmp.replace(root / META_FILE)
