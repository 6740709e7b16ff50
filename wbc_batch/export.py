"""Export a bundle's torch weights to ONNX and check that both give the same answers.

`export_onnx(bundle_dir, out_dir)` writes `segmenter.onnx` and `classifier.onnx` (dynamic batch
and, for the segmenter, dynamic height and width), then runs both runtimes on the same inputs
(synthetic smears from the sample generator when available, else seeded noise) and reports the
largest absolute logit difference and whether the predicted classes agree.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

OPSET = 17


@dataclass(frozen=True)
class ParityReport:
    segmenter_max_abs_diff: float
    classifier_max_abs_diff: float
    segmenter_pixels_agree: float     # fraction of pixels with the same argmax class
    classifier_classes_agree: bool
    files: tuple

    def lines(self) -> list:
        return [
            f"segmenter: max |torch - onnx| logit difference {self.segmenter_max_abs_diff:.2e}, "
            f"{100 * self.segmenter_pixels_agree:.3f}% of pixels same class",
            f"classifier: max |torch - onnx| logit difference {self.classifier_max_abs_diff:.2e}, "
            f"classes {'identical' if self.classifier_classes_agree else 'DIFFER'}",
        ]


def export_onnx(bundle_dir: Path | None = None, out_dir: Path | None = None) -> ParityReport:
    """Write the ONNX files for the bundle at `bundle_dir` (default bundle if None) into `out_dir`
    (the bundle folder itself if None; otherwise the bundle's other files are copied along so the
    result is a complete bundle). Returns the parity report."""
    import torch

    from .atomic import atomic_copy
    from .bundle import FILES, META_FILE, ONNX_SOURCE, load_bundle, sha256_file, write_meta
    from .nets import build_classifier, build_segmenter, load_weights

    bundle = load_bundle(bundle_dir)
    out = Path(out_dir) if out_dir is not None else bundle.root
    # the weights first: a bundle that cannot be exported leaves no half-copied `out_dir`
    seg = load_weights(build_segmenter(bundle.meta), bundle.path("segmenter"))
    clf = load_weights(build_classifier(bundle.meta), bundle.path("classifier"))
    if out.resolve() != bundle.root.resolve():
        _refuse_other_bundle(out, bundle)
    out.mkdir(parents=True, exist_ok=True)
    if out.resolve() != bundle.root.resolve():
        for name in (META_FILE, FILES["segmenter"], FILES["classifier"]):
            atomic_copy(bundle.root / name, out / name)
    size = bundle.crop_size
    seg_path, clf_path = out / FILES["segmenter_onnx"], out / FILES["classifier_onnx"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _export(seg, torch.zeros(1, 3, 128, 160), seg_path, {0: "batch", 2: "height", 3: "width"})
        _export(clf, torch.zeros(2, 3, size, size), clf_path, {0: "batch"})
    meta = dict(bundle.meta)
    meta[ONNX_SOURCE] = {name: sha256_file(out / FILES[name]) for name in
                         ("segmenter", "classifier", "segmenter_onnx", "classifier_onnx")}
    write_meta(out, meta)  # so a later retraining into this folder is caught (ModelBundle.stale_onnx)
    return check_parity(seg, clf, seg_path, clf_path, size, (seg_path, clf_path))


def _refuse_other_bundle(out: Path, bundle) -> None:
    """Refuse an `out_dir` that holds weights other than `bundle`'s: the copy would replace
    another model bundle (its bundle.json, stain reference and weights) without a word.

    :raises ValueError: naming the folder and the network that differs."""
    from .bundle import FILES, sha256_file

    for name in ("segmenter", "classifier"):
        there = out / FILES[name]
        if there.is_file() and sha256_file(there) != sha256_file(bundle.path(name)):
            raise ValueError(f"-o {out} holds another model bundle (its {name} is not "
                             f"{bundle.root}'s), which the export would replace: name an empty "
                             "folder, or export into the bundle itself (without -o)")


def _export(model, example, path: Path, axes: dict) -> None:
    """Export `model` to `path` atomically: a failure (a full disk) leaves neither a part file
    nor a temporary one."""
    import torch

    from .atomic import atomic_path

    with atomic_path(path) as tmp:
        torch.onnx.export(model, (example,), str(tmp), dynamo=False, opset_version=OPSET,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": axes, "logits": axes if len(axes) > 1 else {0: "batch"}})


def _inputs(size: int):
    """Realistic inputs: synthetic smears (and their cell crops), normalised as at run time."""
    from .preprocess import normalize, normalize_crops, pad_to_multiple

    rng = np.random.default_rng(0)
    try:
        from .sample import make_smear

        smear = make_smear(320, 256, seed=3)
        rgb = smear.rgb if hasattr(smear, "rgb") else smear.image
    except Exception:  # the generator is optional here; noise still checks the arithmetic
        rgb = rng.integers(0, 256, (256, 320, 3), dtype=np.uint8)
    x, _ = pad_to_multiple(normalize(rgb), 32)
    crops = [rgb[y:y + size, x0:x0 + size] for y, x0 in ((0, 0), (60, 100), (120, 200))]
    crops = [c if c.shape[:2] == (size, size) else rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
             for c in crops]
    return x[None], normalize_crops(crops)


def check_parity(seg, clf, seg_path, clf_path, size, files=()) -> ParityReport:
    from .backend import onnxruntime_telemetry_off

    onnxruntime_telemetry_off()
    import onnxruntime as ort
    import torch

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    seg_x, clf_x = _inputs(size)
    with torch.inference_mode():
        t_seg = seg(torch.from_numpy(seg_x)).numpy()
        t_clf = clf(torch.from_numpy(clf_x)).numpy()
    o_seg = ort.InferenceSession(str(seg_path), opts, providers=["CPUExecutionProvider"]).run(None, {"input": seg_x})[0]
    o_clf = ort.InferenceSession(str(clf_path), opts, providers=["CPUExecutionProvider"]).run(None, {"input": clf_x})[0]
    return ParityReport(
        segmenter_max_abs_diff=float(np.abs(t_seg - o_seg).max()),
        classifier_max_abs_diff=float(np.abs(t_clf - o_clf).max()),
        segmenter_pixels_agree=float((t_seg.argmax(1) == o_seg.argmax(1)).mean()),
        classifier_classes_agree=bool((t_clf.argmax(1) == o_clf.argmax(1)).all()),
        files=tuple(str(f) for f in files),
    )
