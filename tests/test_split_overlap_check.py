"""scripts/split_overlap_check.py: byte copies of training images among the val and test rows,
near copies that hashing misses, and the split file of TXL-PBC rows the segmenter never saw.
The public layout is built here in miniature, with drawn images."""

import csv
import shutil

import cv2
import numpy as np
import pytest

from conftest import load_script


@pytest.fixture(scope="module")
def soc():
    return load_script("split_overlap_check")


def picture(seed: int, size=(48, 64)) -> np.ndarray:
    """A BGR image of random blobs, different for each seed."""
    rng = np.random.default_rng(seed)
    img = np.full((*size, 3), 220, np.uint8)
    for _ in range(6):
        centre = (int(rng.integers(0, size[1])), int(rng.integers(0, size[0])))
        cv2.circle(img, centre, int(rng.integers(4, 12)), [int(v) for v in rng.integers(0, 200, 3)], -1)
    return img


def write_csv(path, header, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


@pytest.fixture
def data(tmp_path):
    """Five sets, one image per split each, plus copies:
    - TXL-PBC test `t_copy.png` is BCCD train's field, byte for byte (the segmenter's);
    - TXL-PBC test `t_pbc.png` is PBC train's crop, byte for byte (the classifier's only);
    - PBC val `v.png` is PBC train's `a.png` with one grey level added (a near copy)."""
    root = tmp_path / "data"
    seed = iter(range(100))

    def draw(rel, image=None):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), picture(next(seed)) if image is None else image)
        return path

    wbc_rows = []
    for k in ("1", "2"):
        for split in ("train", "val", "test"):
            draw(f"wbc-image-dataset/Dataset {k}/{split}.bmp")
            wbc_rows.append([f"Dataset {k}/{split}.bmp", f"Dataset {k}/{split}.png", k, "", 0, split])
    write_csv(root / "splits" / "wbc-image-dataset.csv",
              ["image", "mask", "dataset", "class", "fold", "split"], wbc_rows)
    pbc_train = draw("pbc-wbc/basophil/a.png")
    draw("pbc-wbc/basophil/v.png", np.clip(cv2.imread(str(pbc_train)).astype(int) + 1, 0, 255)
         .astype(np.uint8))
    draw("pbc-wbc/basophil/t.png")
    write_csv(root / "splits" / "pbc-wbc.csv", ["image", "class", "split"],
              [["basophil/a.png", "basophil", "train"], ["basophil/v.png", "basophil", "val"],
               ["basophil/t.png", "basophil", "test"]])
    bccd_train = draw("bccd/BCCD/JPEGImages/f1.png")
    draw("bccd/BCCD/JPEGImages/f2.png")
    draw("bccd/BCCD/JPEGImages/f3.png")
    write_csv(root / "splits" / "bccd.csv", ["image", "annotation", "labels", "split"],
              [["BCCD/JPEGImages/f1.png", "", "", "train"], ["BCCD/JPEGImages/f2.png", "", "", "val"],
               ["BCCD/JPEGImages/f3.png", "", "", "test"]])
    images = root / "txl-pbc" / "TXL_PBC" / "images"
    for split in ("train", "val", "test"):
        draw(f"txl-pbc/TXL_PBC/images/{split}/own.png")
    shutil.copyfile(bccd_train, images / "test" / "t_copy.png")
    shutil.copyfile(pbc_train, images / "test" / "t_pbc.png")
    return root


def test_byte_copies_of_training_images_are_counted_per_model(soc, data, capsys):
    rows = soc.rows(data)
    digests = [soc.digest(r.path) for r in rows]
    seg = soc.report(rows, digests)
    copied = {rows[i].name for i in seg}
    assert copied == {"test/t_copy.png"}   # the segmenter never learned from PBC
    lines = {tuple(line.split()[:3]): line for line in capsys.readouterr().out.splitlines()}
    txl_test = lines[("TXL-PBC", "test", "3")].split()
    assert txl_test[3:6] == ["1", "2", "2"]   # segmenter, classifier (BCCD train too), either
    assert "1 BCCD train, 1 PBC train" in lines[("TXL-PBC", "test", "3")]
    assert lines[("PBC", "val", "1")].split()[3:6] == ["0", "0", "0"]   # a near copy, not a byte one


def test_an_image_is_not_its_own_copy(soc, data):
    rows = soc.rows(data)
    digests = [soc.digest(r.path) for r in rows]
    found = soc.copies(rows, digests, soc.trained_on(("bccd",)))
    assert [rows[i].name for i in found] == ["test/t_copy.png"]   # not BCCD's own train row


def test_a_near_copy_is_found_and_byte_copies_are_left_to_hashing(soc, data):
    rows = soc.rows(data)
    by_name = {(r.set, r.name): r for r in rows}
    keyed = {}
    for key, r in by_name.items():
        h, w, vec = soc.thumbnail(r.path)
        keyed[key] = ((h, w), vec, soc.digest(r.path))
    pool = [keyed[("pbc", "basophil/a.png")], keyed[("bccd", "BCCD/JPEGImages/f1.png")]]
    near, copy, other = soc.nearest_other(
        [keyed[("pbc", "basophil/v.png")], keyed[("txl", "test/t_copy.png")],
         keyed[("pbc", "basophil/t.png")]], pool)
    assert 0 < near < soc.NEAR
    assert copy > soc.NEAR   # its byte copy left out: the other pool image is far
    assert other > soc.NEAR


def test_no_pool_image_of_the_same_size_gives_inf(soc):
    vec = np.zeros(soc.THUMB * soc.THUMB, np.float32)
    assert soc.nearest_other([((10, 10), vec, "a")], [((20, 20), vec, "b")]) == [float("inf")]


def test_the_unseen_split_file_leaves_out_the_segmenters_copies_only(soc, data, tmp_path, capsys):
    out = tmp_path / "unseen.csv"
    assert soc.main(["--data", str(data), "--write-unseen", str(out)]) == 0
    with open(out, newline="") as f:
        kept = {(r["image"], r["split"]) for r in csv.DictReader(f)}
    assert kept == {("train/own.png", "train"), ("val/own.png", "val"), ("test/own.png", "test"),
                    ("test/t_pbc.png", "test")}
    printed = capsys.readouterr().out
    assert "PBC                    val      1 near copies" in printed
    assert "(2 test)" in printed


def test_missing_data_is_one_line_and_exit_2(soc, tmp_path, capsys):
    assert soc.main(["--data", str(tmp_path / "nowhere"), "--no-near"]) == 2
    assert "no data at" in capsys.readouterr().err
