"""The synthetic smear generator: determinism, consistent truth, plausible cells, sample sets."""

import csv
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from wbc_batch import CLASSES
from wbc_batch.sample import (DEFAULT_SPECS, TRUTH_COLUMNS, SmearSpec, make_smear, mask_name,
                              write_sample_set)

REPO = Path(__file__).resolve().parents[1]


def components(binary: np.ndarray, min_area: float = 1) -> int:
    _, _, stats, _ = cv2.connectedComponentsWithStats(binary.astype(np.uint8))
    return int((stats[1:, cv2.CC_STAT_AREA] >= min_area).sum())


def single(cls, seed=0, d=160):
    return make_smear(d + 40, d + 40, cells=[(cls, d)], seed=seed, rbc_density=0)


# --- determinism and truth -----------------------------------------------------------------------

def test_same_seed_same_image_other_seed_other_image():
    a, b = make_smear(320, 240, n_wbc=4, seed=7), make_smear(320, 240, n_wbc=4, seed=7)
    assert np.array_equal(a.rgb, b.rgb) and np.array_equal(a.mask, b.mask)
    assert a.cells == b.cells
    c = make_smear(320, 240, n_wbc=4, seed=8)
    assert not np.array_equal(a.rgb, c.rgb)


def test_truth_is_consistent_with_the_maps():
    s = make_smear(640, 480, n_wbc=5, seed=11)
    assert s.rgb.shape == (480, 640, 3) and s.rgb.dtype == np.uint8
    assert s.mask.shape == (480, 640) and s.mask.dtype == np.uint8
    assert s.labels.dtype == np.uint16
    assert set(np.unique(s.mask)) <= {0, 128, 255}
    assert np.array_equal(s.mask > 0, s.labels > 0)
    assert [c.cell_id for c in s.cells] == list(range(1, len(s.cells) + 1))
    assert set(np.unique(s.labels)) == {0, *range(1, len(s.cells) + 1)}
    for c in s.cells:
        ys, xs = np.nonzero(s.labels == c.cell_id)
        assert (c.x, c.y, c.width, c.height) == (xs.min(), ys.min(), xs.max() - xs.min() + 1,
                                                 ys.max() - ys.min() + 1)
        assert c.x > 0 and c.y > 0 and c.x + c.width < 640 and c.y + c.height < 480  # inside
        own = s.mask[s.labels == c.cell_id]
        assert (own == 255).any() and (own == 128).any(), c.cls


def test_truth_box_holds_the_whole_cell_however_far_its_wobble_reaches():
    # the box was searched within R + 3..4 px of the centre, while a cell is drawn out to 1.2 R:
    # a large wobbly cell reaching further had a box 1 px short of its own mask
    for seed in range(40):
        s = make_smear(320, 240, n_wbc=1, diameter=(200, 232), seed=seed, rbc_density=0)
        for c in s.cells:
            ys, xs = np.nonzero(s.labels == c.cell_id)
            assert c.box == (xs.min(), ys.min(), xs.max() - xs.min() + 1,
                             ys.max() - ys.min() + 1), (seed, c)


def test_five_wbcs_give_one_of_each_class():
    for seed in range(3):
        s = make_smear(640, 480, n_wbc=5, seed=seed)
        assert sorted(s.classes) == sorted(CLASSES)


def test_explicit_cells_and_diameters():
    s = make_smear(400, 300, cells=[("monocyte", 100), ("lymphocyte", 60), "basophil"], seed=2)
    assert s.classes == ["monocyte", "lymphocyte", "basophil"]
    assert 92 <= s.cells[0].width <= 106 and 54 <= s.cells[1].width <= 64
    r = make_smear(400, 300, n_wbc=4, classes=["eosinophil"], diameter=(50, 60), seed=2)
    assert r.classes == ["eosinophil"] * 4
    assert all(46 <= c.width <= 64 for c in r.cells)


def test_wbcs_never_touch_and_red_cells_stay_out_of_the_mask():
    s = make_smear(640, 480, n_wbc=8, diameter=70, seed=4)
    grown = [cv2.dilate((s.labels == c.cell_id).astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
             for c in s.cells]
    for i in range(len(grown)):
        for j in range(i + 1, len(grown)):
            assert not (grown[i] & grown[j]).any()
    # red cells are drawn (reddish pixels outside the WBC mask) but never labelled
    red = (s.rgb[..., 0].astype(int) - s.rgb[..., 2] > 40) & (s.mask == 0)
    assert red.sum() > 0.1 * s.mask.size


def test_cells_that_do_not_fit_are_left_out():
    s = make_smear(200, 200, n_wbc=30, diameter=60, seed=0)
    assert 1 <= len(s.cells) < 30
    assert make_smear(1, 1, seed=0).cells == []
    assert make_smear(30, 30, cells=[("neutrophil", 100)], seed=0).cells == []


def test_unknown_class_and_bad_size_are_refused():
    with pytest.raises(ValueError, match="platelet"):
        make_smear(100, 100, cells=["platelet"])
    with pytest.raises(ValueError, match="platelet"):
        make_smear(100, 100, classes=["platelet"])
    with pytest.raises(ValueError):
        make_smear(0, 10)


# --- what the cells look like --------------------------------------------------------------------

def test_neutrophil_has_three_to_five_connected_lobes():
    seen = set()
    for seed in range(12):
        s = single("neutrophil", seed)
        nuc = s.mask == 255
        assert components(nuc) == 1  # lobes joined by filaments
        thin = cv2.erode(nuc.astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (9, 9)))
        lobes = components(thin, min_area=64)
        assert 3 <= lobes <= 5, seed
        seen.add(lobes)
    assert seen == {3, 4, 5}


def test_lymphocyte_round_nucleus_thin_blue_rim():
    s = single("lymphocyte", 1)
    cell, nuc = s.labels == 1, s.mask == 255
    assert nuc.sum() / cell.sum() > 0.5
    rim = s.rgb[s.mask == 128].astype(float).mean(axis=0)
    assert rim[2] > rim[0] + 20  # blue cytoplasm
    contours, _ = cv2.findContours(nuc.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    solidity = nuc.sum() / cv2.contourArea(cv2.convexHull(contours[0]))
    assert solidity > 0.97  # round


def test_monocyte_kidney_nucleus_grey_blue_cytoplasm():
    for seed in range(3):
        s = single("monocyte", seed)
        nuc = (s.mask == 255).astype(np.uint8)
        contours, _ = cv2.findContours(nuc, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        solidity = nuc.sum() / cv2.contourArea(cv2.convexHull(contours[0]))
        assert solidity < 0.96  # notched
        cyto = s.rgb[s.mask == 128].astype(float).mean(axis=0)
        assert cyto[2] >= cyto[0] and cyto.max() - cyto.min() < 45  # greyish blue


def test_eosinophil_bilobed_with_orange_granules():
    s = single("eosinophil", 3)
    thin = cv2.erode((s.mask == 255).astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (9, 9)))
    assert components(thin, min_area=64) == 2
    cyto = s.rgb[s.mask == 128].astype(float).mean(axis=0)
    assert cyto[0] > cyto[1] + 50 and cyto[0] > cyto[2] + 80  # orange-red


def test_basophil_is_darkest_and_granules_hide_the_nucleus():
    means = {c: single(c, 4).rgb[single(c, 4).mask == 128].astype(float).mean() for c in CLASSES}
    assert min(means, key=means.get) == "basophil"
    s = single("basophil", 4)
    nuc, cyto = s.rgb[s.mask == 255].astype(float), s.rgb[s.mask == 128].astype(float)
    assert np.abs(nuc.mean(axis=0) - cyto.mean(axis=0)).max() < 80  # little contrast


def test_nuclei_darker_than_cytoplasm_background_pale():
    s = make_smear(640, 480, n_wbc=5, seed=9, rbc_density=0.3)
    for c in s.cells:
        own = s.labels == c.cell_id
        assert s.rgb[own & (s.mask == 255)].mean() < s.rgb[own & (s.mask == 128)].mean() - 15
    far = cv2.erode((s.mask == 0).astype(np.uint8), np.ones((15, 15), np.uint8)) > 0
    assert np.median(s.rgb[far].mean(axis=-1)) > 180


def test_fast_enough_for_fixtures():
    make_smear(640, 480, n_wbc=5, seed=0)
    t = time.perf_counter()
    for seed in range(3):
        make_smear(640, 480, n_wbc=5, seed=seed)
    assert (time.perf_counter() - t) / 3 < 0.5  # ~50 ms on one core; generous for busy CI


# --- sample sets on disk -------------------------------------------------------------------------

def read_truth(path):
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_write_sample_set_layout(tmp_path):
    specs = (SmearSpec("s1/a.jpg", 160, 120, 2, seed=1), SmearSpec("s1/b.png", 160, 120, 1, seed=2),
             SmearSpec("s2/c.bmp", 200, 150, 2, ("basophil",), seed=3))
    made = write_sample_set(tmp_path, specs)
    for spec in specs:
        img = cv2.imread(str(tmp_path / "smears" / spec.name))
        assert img.shape == (spec.height, spec.width, 3)
        mask = cv2.imread(str(tmp_path / "truth" / mask_name(spec.name)), cv2.IMREAD_UNCHANGED)
        assert mask.ndim == 2 and np.array_equal(mask, made["smears"][spec.name].mask)
    png = cv2.cvtColor(cv2.imread(str(tmp_path / "smears/s1/b.png")), cv2.COLOR_BGR2RGB)
    assert np.array_equal(png, made["smears"]["s1/b.png"].rgb)  # lossless formats keep every pixel
    rows = read_truth(tmp_path / "truth" / "truth.csv")
    assert list(rows[0]) == list(TRUTH_COLUMNS)
    assert len(rows) == sum(len(s.cells) for s in made["smears"].values())
    first = made["smears"]["s1/a.jpg"].cells[0]
    assert rows[0] == {"image": "s1/a.jpg", "x": str(first.x), "y": str(first.y),
                       "width": str(first.width), "height": str(first.height), "class": first.cls}
    # the images folder holds the images and nothing else: a run over it never reads a mask
    in_smears = {p.relative_to(tmp_path / "smears").as_posix()
                 for p in (tmp_path / "smears").rglob("*") if p.is_file()}
    assert in_smears == {s.name for s in specs}
    assert mask_name("s1/a.jpg") == "masks/s1/a.png" and mask_name("x.tif") == "masks/x.png"


def test_generic_truth_reader_reads_a_sample_set(tmp_path):
    from wbc_batch_plugins.truth_csv import CSVReader

    made = write_sample_set(tmp_path, DEFAULT_SPECS[:2])
    reader = CSVReader()
    assert reader.can_read(tmp_path / "truth")
    truth = reader.read(tmp_path / "truth", tmp_path / "smears")
    assert sorted(truth) == sorted(s.name for s in DEFAULT_SPECS[:2])
    for name, smear in made["smears"].items():
        t = truth[name]
        assert [tuple(int(v) for v in b) for b in t.boxes] == [c.box for c in smear.cells]
        assert t.box_classes == smear.classes
        assert t.mask_path is not None and Path(t.mask_path).is_file()


def test_default_specs_cover_the_classes_samples_and_formats():
    names = [s.name for s in DEFAULT_SPECS]
    assert len({n.split("/")[0] for n in names}) == 2
    assert {Path(n).suffix for n in names} >= {".jpg", ".png"}
    assert any((s.width, s.height) == (1024, 768) for s in DEFAULT_SPECS)


def test_committed_sample_data_matches_the_generator(tmp_path):
    """sample_data/ is what scripts/make_sample_data.py writes (masks, truth, lossless images)."""
    root = REPO / "sample_data"
    if not (root / "truth" / "truth.csv").is_file():
        pytest.skip("sample_data/ not present")
    made = write_sample_set(tmp_path, DEFAULT_SPECS)
    assert (root / "truth" / "truth.csv").read_bytes() == (tmp_path / "truth" / "truth.csv").read_bytes()
    counts = {}
    for row in read_truth(root / "truth" / "truth.csv"):
        counts[row["class"]] = counts.get(row["class"], 0) + 1
    assert set(counts) == set(CLASSES) and min(counts.values()) >= 3
    for spec in DEFAULT_SPECS:
        committed = cv2.imread(str(root / "truth" / mask_name(spec.name)), cv2.IMREAD_UNCHANGED)
        assert np.array_equal(committed, made["smears"][spec.name].mask)
        image = cv2.imread(str(root / "smears" / spec.name))
        assert image.shape[:2] == (spec.height, spec.width)
        if spec.name.endswith(".png"):
            assert np.array_equal(cv2.cvtColor(image, cv2.COLOR_BGR2RGB), made["smears"][spec.name].rgb)
