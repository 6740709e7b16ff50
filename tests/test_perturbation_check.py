"""scripts/perturbation_check.py: fixed perturbations, copies under the same names, the summary table."""

import csv
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="module")
def pc():
    return load_script("perturbation_check")


def _image(seed=0):
    rng = np.random.default_rng(seed)
    img = np.full((60, 80, 3), (220, 200, 210), np.uint8)
    cv2.circle(img, (40, 30), 15, (120, 60, 150), -1)
    return np.clip(img.astype(int) + rng.integers(-5, 6, img.shape), 0, 255).astype(np.uint8)


def test_perturbations_are_fixed_and_only_the_geometric_ones_change_the_size(pc):
    img = _image()
    assert np.array_equal(pc.PERTURBATIONS["none"][1](img), img)
    for name, (_, fn, geometric) in pc.PERTURBATIONS.items():
        out = fn(img)
        assert out.dtype == np.uint8 and np.array_equal(out, fn(img)), name
        assert (out.shape != img.shape) == geometric, name
        assert name == "none" or not np.array_equal(out, img), name
    assert pc.PERTURBATIONS["small"][1](img).shape == (36, 48, 3)
    warm = pc.PERTURBATIONS["warm"][1](img).astype(int)
    assert (warm[..., 2] < img[..., 2]).all() and (warm[..., 0] >= img[..., 0]).all()
    grey = pc.PERTURBATIONS["grey"][1](img)
    assert np.array_equal(grey[..., 0], grey[..., 1]) and np.array_equal(grey[..., 1], grey[..., 2])
    sepia = pc.PERTURBATIONS["sepia"][1](img).astype(int)
    assert (sepia[..., 0] >= sepia[..., 1]).all() and (sepia[..., 1] >= sepia[..., 2]).all()
    assert np.abs(sepia[..., 2] - np.rint(grey[..., 0] * 0.8)).max() == 0
    flat = np.full((61, 81, 3), 200, np.uint8)
    vignette = pc.PERTURBATIONS["vignette"][1](flat)
    assert vignette[30, 40].tolist() == [200] * 3 and vignette[0, 0].tolist() == [130] * 3
    assert vignette[0, 40, 0] > vignette[0, 0, 0]
    noise = pc.PERTURBATIONS["noise"][1](flat).astype(float) - 200
    assert 7.5 < noise.std() < 8.5 and abs(noise.mean()) < 0.3
    assert pc.PERTURBATIONS["tiny"][1](img).shape == (24, 32, 3)
    assert pc.PERTURBATIONS["huge"][1](img).shape == (120, 160, 3)
    margin = pc.PERTURBATIONS["margin"][1](img)
    assert (margin[:, :8] == 255).all() and (margin[:, -8:] == 255).all()
    assert np.array_equal(margin[:, 8:-8], img[:, 8:-8])
    banner = pc.PERTURBATIONS["banner"][1](img)
    assert np.array_equal(banner[:-6], img[:-6]) and (banner[-6:] == 0).any()  # black text
    assert (banner[-6:] == 240).all(axis=2).mean() > 0.5


def test_copies_keep_their_relative_names_and_unreadable_files_are_skipped(pc, tmp_path):
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    cv2.imwrite(str(src / "a" / "x.png"), _image())
    cv2.imwrite(str(src / "y.jpg"), _image(1))
    (src / "bad.jpg").write_bytes(b"not an image")
    dst = tmp_path / "dst"
    n = pc.write_perturbed(src, ["a/x.png", "y.jpg", "bad.jpg"], dst, pc.PERTURBATIONS["none"][1])
    assert n == 2 and not (dst / "bad.jpg").exists()
    assert np.array_equal(cv2.imread(str(dst / "a" / "x.png")), cv2.imread(str(src / "a" / "x.png")))
    assert cv2.imread(str(dst / "y.jpg")).shape == (60, 80, 3)


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data not present")
def test_the_script_evaluates_each_perturbation_against_the_original_truth(pc, tmp_path, capsys):
    out = tmp_path / "p"
    assert pc.main(["--data", str(SHARED), "--out", str(out), "--sets", "wbc2", "--only", "none", "small"]) == 0
    with open(out / "perturbation_check.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {(r["perturbation"], r["metric"]) for r in rows} >= {("none", "WBC IoU"), ("small", "WBC IoU")}
    iou = {r["perturbation"]: float(r["value"]) for r in rows if r["metric"] == "WBC IoU"}
    assert 0.8 < iou["none"] <= 1 and 0.5 < iou["small"] <= 1
    assert all(r["images"] == "22" for r in rows)   # the 22 Dataset 2 val images, none lost
    assert "| small | " in capsys.readouterr().out


def _summary(folder: Path, values: dict) -> None:
    """An evaluate folder's accuracy.csv holding only summary rows: (scope, metric) -> value."""
    folder.mkdir(parents=True)
    with open(folder / "accuracy.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(("section", "scope", "metric", "value", "n"))
        for (scope, metric), value in values.items():
            w.writerow(("summary", scope, metric, value, ""))


def test_tables_only_reprints_counts_and_rates_from_earlier_evaluations_without_data(pc, tmp_path, capsys):
    out = tmp_path / "p"
    for pert, found, matched in (("none", 90, 87), ("hue", 94, 84)):
        _summary(out / pert / "bccd", {("run", "images"): 87, ("detection", "found_cells"): found,
                                       ("detection", "matched"): matched,
                                       ("detection", "recall"): matched / 87,
                                       ("detection", "precision"): matched / found})
    assert pc.main(["--data", str(tmp_path / "nowhere"), "--out", str(out), "--sets", "bccd",
                    "--only", "none", "hue", "--tables-only"]) == 0
    printed = capsys.readouterr().out
    assert "| none | 90 | 87 | 100.0 | 96.7 |" in printed
    assert "| hue | 94 (+4) | 84 (-3) | 96.6 (-3.4) | 89.4 (-7.3) |" in printed
    with open(out / "perturbation_check.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {(r["perturbation"], r["metric"]) for r in rows} == {
        (p, m) for p in ("none", "hue") for m in ("found", "matched", "recall", "precision")}
    assert all(r["images"] == "87" for r in rows)
    # a perturbation with no evaluation under OUT is reported, not silently left out
    assert pc.main(["--out", str(out), "--sets", "bccd", "--only", "none", "pale", "--tables-only"]) == 1
    assert "no evaluation at" in capsys.readouterr().out
    # BCCD is rescaled too (the evaluation scales its pixel boxes): a missing `small` is reported
    assert pc.main(["--out", str(out), "--sets", "bccd", "--only", "none", "small",
                    "--tables-only"]) == 1
    assert f"no evaluation at {out / 'small' / 'bccd'}" in capsys.readouterr().out


@pytest.fixture(scope="module")
def rf():
    return load_script("review_flags")


ACCURACY_HEAD = ("section", "scope", "metric", "value", "n")
CELLS_HEAD = ("image", "confidence", "needs_review", "unusual_stain")


def _write_evaluation(folder, accuracy_rows, cell_rows):
    """The two files of an evaluate folder that review_flags.py reads (only the columns it reads)."""
    for name, data in (("accuracy.csv", accuracy_rows), ("cells.csv", cell_rows)):
        with open(folder / name, "w", newline="") as f:
            csv.writer(f).writerows(data)


def test_review_flags_counts_the_errors_no_flag_caught(rf, tmp_path):
    rows, cells = [ACCURACY_HEAD], [CELLS_HEAD]
    # (correct, confidence, needs_review, unusual_stain): right and sure; wrong but flagged for its
    # stain only; wrong, sure and unflagged (silent); wrong and unsure
    for i, (ok, conf, review, odd) in enumerate([(True, 0.95, False, False), (False, 0.9, True, True),
                                                 (False, 0.95, False, False), (False, 0.5, True, False)]):
        rows.append(("per_image", f"img{i}.png", "correct", str(ok), ""))
        cells.append((f"img{i}.png", conf, review, odd))
    cells.append(("two.png", 0.9, False, False))  # two cells in one image: not scored
    cells.append(("two.png", 0.9, False, False))
    _write_evaluation(tmp_path, rows, cells)
    got = rf.flag_table(tmp_path)
    assert (got["cells"], got["right"], got["needs_review"], got["unusual_stain"]) == (4, 1, 2, 1)
    # the stain flag caught one error the confidence threshold alone would have missed
    assert (got["silent_errors"], got["silent_errors_confidence_only"]) == (1, 2)


def test_review_flags_on_fields_counts_images_with_one_labelled_box_and_one_cell(rf, tmp_path):
    rows, cells = [ACCURACY_HEAD], [CELLS_HEAD]
    # (truth_boxes, found, matched, labelled_correct): wrong and silent; right; two boxes (not
    # scored); missed box (not scored); no class label (not scored)
    fields = [(1, 1, 1, "0"), (1, 1, 1, "1"), (2, 1, 1, "1"), (1, 1, 0, ""), (1, 1, 1, "")]
    for i, (boxes, found, matched, right) in enumerate(fields):
        for metric, value in (("truth_boxes", boxes), ("found_cells", found), ("matched", matched),
                              ("labelled_correct", right)):
            rows.append(("per_image", f"f{i}.jpg", metric, str(value), ""))
        cells.append((f"f{i}.jpg", 0.95, False, False))
    _write_evaluation(tmp_path, rows, cells)
    got = rf.flag_table(tmp_path)
    assert (got["cells"], got["right"], got["silent_errors"]) == (2, 1, 1)


def test_grey_images_check_counts_grey_and_toned_images_but_not_stained_ones(tmp_path):
    gic = load_script("grey_images_check")
    stained = _image()
    grey = cv2.cvtColor(cv2.cvtColor(stained, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
    toned = np.clip(np.rint(grey * np.array([1.0, 0.92, 0.8])), 0, 255).astype(np.uint8)
    for name, img in (("stained.png", stained), ("grey.png", grey), ("toned.png", toned)):
        cv2.imwrite(str(tmp_path / name), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    assert gic.count_grey(tmp_path, ["stained.png", "grey.png", "toned.png", "bad.jpg"]) == (3, 2)
    framed = stained.copy()
    framed[:, :framed.shape[1] // 8] = 0  # a black bar down the left side
    cv2.imwrite(str(tmp_path / "framed.png"), cv2.cvtColor(framed, cv2.COLOR_RGB2BGR))
    bannered = stained.copy()
    bannered[-bannered.shape[0] // 8:] = 245  # an info banner across the bottom
    cv2.imwrite(str(tmp_path / "bannered.png"), cv2.cvtColor(bannered, cv2.COLOR_RGB2BGR))
    # a black bar is the frame's, a light banner a flat margin, a stop saved white a white surround
    camera = cv2.resize(stained, (640, 480))  # a stop is a camera's frame, not a small crop's
    white = load_script("perturbation_check").PERTURBATIONS["white-stop"][1](camera)
    cv2.imwrite(str(tmp_path / "white.png"), cv2.cvtColor(white, cv2.COLOR_RGB2BGR))
    assert gic.count_images(tmp_path, ["stained.png", "grey.png", "framed.png", "bannered.png",
                                       "white.png"]) == (5, 1, 1, 1, 1)


@pytest.mark.parametrize("script, option", [("perturbation_check", "--split"),
                                            ("grey_images_check", "--splits")])
def test_a_misspelt_split_is_refused_not_counted_as_empty(script, option, tmp_path, capsys):
    # `--split vall` found no image in any set and passed with nothing checked
    (tmp_path / "splits").mkdir()
    for name in ("wbc-image-dataset.csv", "pbc-wbc.csv", "bccd.csv"):
        (tmp_path / "splits" / name).write_text("image,split,dataset\n")
    with pytest.raises(SystemExit) as exit_:
        load_script(script).main(["--data", str(tmp_path), option, "vall"])
    assert exit_.value.code == 2
    assert "invalid choice: 'vall' (choose from" in capsys.readouterr().err
