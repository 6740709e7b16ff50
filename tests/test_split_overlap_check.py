"""scripts/split_overlap_check.py: copies of training images among the val and test rows, by
bytes and near (the same picture shifted or brightened), and the split files without them.
The public layout is built here in miniature, with drawn images."""

import csv
import shutil

import cv2
import numpy as np
import pytest

from conftest import load_script

SIZE = (96, 128)


@pytest.fixture(scope="module")
def soc():
    return load_script("split_overlap_check")


def scene(seed: int, size=SIZE, margin: int = 0) -> np.ndarray:
    """A BGR field of random discs with fine speckle, `margin` px larger on every side, so
    that two crops of it are one picture shifted."""
    rng = np.random.default_rng(seed)
    h, w = size[0] + 2 * margin, size[1] + 2 * margin
    img = np.full((h, w, 3), 220, np.uint8)
    for _ in range(40):
        centre = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        cv2.circle(img, centre, int(rng.integers(3, 10)),
                   [int(v) for v in rng.integers(60, 200, 3)], -1)
    return np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)


def round_cell(seed: int, size=SIZE) -> np.ndarray:
    """One dark disc of the same size in the centre, on a background of its own: what makes
    single-cell crops alike without being the same cell."""
    img = scene(seed, size)
    cv2.circle(img, (size[1] // 2, size[0] // 2), 28, (120, 40, 90), -1)
    return img


def write_csv(path, header, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


@pytest.fixture
def data(tmp_path):
    """Five sets with one image per split, and these copies:
    - TXL-PBC test `t_copy.png`: BCCD train's field, byte for byte (both models learned it);
    - TXL-PBC test `t_pbc.png`: PBC train's crop, byte for byte (the classifier's alone);
    - TXL-PBC test `t_val.png`: BCCD val's field (it chose the models' checkpoints);
    - BCCD test: BCCD train's field shifted by 9 and 5 px (a near copy);
    - PBC val: PBC train's crop one grey level brighter (a near copy);
    - Dataset 1 test: a different cell of the same size as Dataset 1 train's (no copy)."""
    root = tmp_path / "data"
    seed = iter(range(100))

    def draw(rel, image=None):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), scene(next(seed)) if image is None else image)
        return path

    wbc_rows = []
    for k in ("1", "2"):
        for split in ("train", "val", "test"):
            image = round_cell(int(k) * 10 + len(split)) if k == "1" else None
            draw(f"wbc-image-dataset/Dataset {k}/{split}.png", image)
            wbc_rows.append([f"Dataset {k}/{split}.png", f"Dataset {k}/{split}.mask.png", k, "",
                             0, split])
    write_csv(root / "splits" / "wbc-image-dataset.csv",
              ["image", "mask", "dataset", "class", "fold", "split"], wbc_rows)
    pbc_train = draw("pbc-wbc/basophil/a.png")
    brighter = np.clip(cv2.imread(str(pbc_train)).astype(int) + 1, 0, 255).astype(np.uint8)
    draw("pbc-wbc/basophil/v.png", brighter)
    draw("pbc-wbc/basophil/t.png")
    write_csv(root / "splits" / "pbc-wbc.csv", ["image", "class", "split"],
              [["basophil/a.png", "basophil", "train"], ["basophil/v.png", "basophil", "val"],
               ["basophil/t.png", "basophil", "test"]])
    field = scene(99, margin=12)
    bccd_train = draw("bccd/BCCD/JPEGImages/f1.png", field[12:-12, 12:-12])
    bccd_val = draw("bccd/BCCD/JPEGImages/f2.png")
    draw("bccd/BCCD/JPEGImages/f3.png", field[12 + 5: 12 + 5 + SIZE[0], 12 + 9: 12 + 9 + SIZE[1]])
    write_csv(root / "splits" / "bccd.csv", ["image", "annotation", "labels", "split"],
              [["BCCD/JPEGImages/f1.png", "a1.xml", "", "train"],
               ["BCCD/JPEGImages/f2.png", "a2.xml", "", "val"],
               ["BCCD/JPEGImages/f3.png", "a3.xml", "", "test"]])
    images = root / "txl-pbc" / "TXL_PBC" / "images"
    for split in ("train", "val", "test"):
        draw(f"txl-pbc/TXL_PBC/images/{split}/own.png")
    shutil.copyfile(bccd_train, images / "test" / "t_copy.png")
    shutil.copyfile(pbc_train, images / "test" / "t_pbc.png")
    shutil.copyfile(bccd_val, images / "test" / "t_val.png")
    return root


@pytest.fixture
def found(soc, data):
    rows = soc.rows(data)
    digests = [soc.digest(r.path) for r in rows]
    features = [soc.looks(r.path) for r in rows]
    return rows, soc.find_all(rows, digests, features)


def named(rows, pairs: dict) -> dict:
    """{query name: {(copied name, byte or near)}}."""
    return {rows[i].name: {(rows[j].name, "byte" if score == 2.0 else "near") for j, score in js}
            for i, js in pairs.items()}


def test_byte_and_near_copies_are_found_and_nothing_else(soc, found):
    rows, (vs_trained, vs_chosen) = found
    assert named(rows, vs_trained) == {
        "test/t_copy.png": {("BCCD/JPEGImages/f1.png", "byte")},
        "test/t_pbc.png": {("basophil/a.png", "byte")},
        "BCCD/JPEGImages/f3.png": {("BCCD/JPEGImages/f1.png", "near")},
        "basophil/v.png": {("basophil/a.png", "near")},
    }
    # PBC val's brighter crop chose the classifier's checkpoint: TXL-PBC's copy is near it
    assert named(rows, vs_chosen) == {"test/t_val.png": {("BCCD/JPEGImages/f2.png", "byte")},
                                      "test/t_pbc.png": {("basophil/v.png", "near")}}


def test_a_shifted_copy_scores_high_and_a_like_cell_low(soc):
    field = scene(5, margin=12)
    a = soc.looks_of(field[12:-12, 12:-12])
    b = soc.looks_of(field[2: 2 + SIZE[0], 20: 20 + SIZE[1]])
    assert soc.similarity(a, b) > soc.NEAR
    cells = [soc.looks_of(round_cell(k)) for k in (1, 2)]
    assert soc.similarity(*cells) < soc.LOOK   # the same disc, on another background


def test_the_tables_count_per_model(soc, found, capsys):
    rows, (vs_trained, vs_chosen) = found
    soc.report(rows, vs_trained, vs_chosen, near=True)
    trained, chosen, _ = capsys.readouterr().out.split("\n\n")
    lines = table(trained)
    # images, byte, near, segmenter, classifier, any
    assert lines[("TXL-PBC", "test")][:6] == ["4", "2", "0", "1", "2", "2"]
    assert lines[("BCCD", "test")][:6] == ["1", "0", "1", "1", "1", "1"]
    assert lines[("PBC", "val")][:6] == ["1", "0", "1", "0", "1", "1"]
    assert lines[("WBC Image Dataset 1", "test")][:6] == ["1", "0", "0", "0", "0", "0"]
    assert table(chosen)[("TXL-PBC", "test")] == ["4", "1", "1", "1", "2", "2", "1", "BCCD", "val,",
                                                  "1", "PBC", "val"]


def table(text: str) -> dict:
    """A printed copy table: {(set, split): the other columns}."""
    return {(line[2:24].strip(), line[25:30].strip()): line[30:].split()
            for line in text.splitlines()[2:]}


def test_the_split_files_leave_out_what_each_set_measures(soc, data, tmp_path, capsys):
    out = tmp_path / "unseen"
    assert soc.main(["--data", str(data), "--write-unseen", str(out)]) == 0
    with open(out / "txl-pbc.csv", newline="") as f:
        txl = {(r["image"], r["split"]) for r in csv.DictReader(f)}
    # cell finding is the segmenter's: the copy of PBC's crop stays
    assert txl == {("train/own.png", "train"), ("val/own.png", "val"), ("test/own.png", "test"),
                   ("test/t_pbc.png", "test")}
    with open(out / "bccd.csv", newline="") as f:
        bccd = list(csv.DictReader(f))
    assert [r["image"] for r in bccd] == ["BCCD/JPEGImages/f1.png", "BCCD/JPEGImages/f2.png"]
    assert bccd[0]["annotation"] == "a1.xml"   # every column kept
    with open(out / "pbc-wbc.csv", newline="") as f:
        assert [r["split"] for r in csv.DictReader(f)] == ["train", "test"]
    with open(out / "wbc-image-dataset.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 6
    assert ("left out: 1 BCCD test, 1 PBC val, 2 TXL-PBC test"
            in capsys.readouterr().out)


def test_bytes_only_without_the_near_pass(soc, data, capsys):
    assert soc.main(["--data", str(data), "--no-near"]) == 0
    printed = capsys.readouterr().out
    assert "byte copies only" in printed and "look at them" not in printed


def test_missing_data_is_one_line_and_exit_2(soc, tmp_path, capsys):
    assert soc.main(["--data", str(tmp_path / "nowhere"), "--no-near"]) == 2
    assert "no data at" in capsys.readouterr().err


def test_many_pairs_are_narrowed_to_the_most_alike_thumbnails(soc, found, monkeypatch):
    rows, (vs_trained, _) = found
    monkeypatch.setattr(soc, "ALL_PAIRS", 0)
    monkeypatch.setattr(soc, "CANDIDATES", 1)
    digests = [soc.digest(r.path) for r in rows]
    narrowed, _ = soc.find_all(rows, digests, [soc.looks(r.path) for r in rows])
    assert named(rows, narrowed) == named(rows, vs_trained)


def test_the_training_split_files_leave_out_the_copied_train_rows_and_chosen_val_rows(soc, data, tmp_path,
                                                                                   capsys):
    """--write-clean: the train rows a val or test row copies (BCCD's field, PBC's crop) and the
    val rows that chose checkpoints and that a test row copies (BCCD val's field; PBC val's crop,
    which TXL-PBC test's copy of PBC train's crop copies too) are left out; every test row stays."""
    out = tmp_path / "clean"
    assert soc.main(["--data", str(data), "--write-clean", str(out)]) == 0
    with open(out / "bccd.csv", newline="") as f:
        assert [(r["image"], r["split"]) for r in csv.DictReader(f)] == [("BCCD/JPEGImages/f3.png", "test")]
    with open(out / "pbc-wbc.csv", newline="") as f:
        assert [r["split"] for r in csv.DictReader(f)] == ["test"]
    with open(out / "txl-pbc.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 6
    with open(out / "wbc-image-dataset.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 6
    assert "left out: 1 BCCD train, 1 BCCD val, 1 PBC train, 1 PBC val\n" in capsys.readouterr().out
