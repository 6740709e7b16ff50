"""scripts/txl_val_half.py: split files that give TXL-PBC val one of its two fixed halves, on a
drawn miniature of the public layout, read back by the readers training and evaluation use."""

import cv2
import numpy as np
import pytest

from conftest import load_script


@pytest.fixture
def data(tmp_path):
    """TXL-PBC with 5 val images (one without a label file, which no reader counts), 2 train and
    1 test image, and the three split files of DATA/splits."""
    root = tmp_path / "data"
    txl = root / "txl-pbc" / "TXL_PBC"
    for split, names in (("val", "dbeac"), ("train", "xy"), ("test", "t")):
        for name in names:
            path = txl / "images" / split / f"{name}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(path), np.full((40, 60, 3), 200, np.uint8))
            labels = txl / "labels" / split
            labels.mkdir(parents=True, exist_ok=True)
            (labels / f"{name}.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    (txl / "images" / "val" / "f.jpg").write_bytes((txl / "images" / "val" / "a.jpg").read_bytes())
    (root / "splits").mkdir()
    for name in ("wbc-image-dataset.csv", "pbc-wbc.csv", "bccd.csv"):
        (root / "splits" / name).write_text(f"image,split\n{name}.png,train\n")
    return root


def test_each_half_gives_val_the_images_training_cuts_it_into(data, tmp_path, capsys):
    from wbc_batch.train.datasets import txl_pbc
    from wbc_batch.train.segmenter import txl_val_halves

    script = load_script("txl_val_half")
    halves = txl_val_halves(txl_pbc(data, "val"))
    for half, expected in zip(("select", "judge"), halves):
        out = tmp_path / half
        assert script.main([half, str(out), "--data", str(data)]) == 0
        assert f"TXL-PBC val's {half} half, {len(expected)} images" in capsys.readouterr().out
        # read back as evaluate and training read a --splits folder
        assert ({r.image.name for r in txl_pbc(data, "val", splits=out)}
                == {r.image.name for r in expected})
        assert {r.image.name for r in txl_pbc(data, "train", splits=out)} == {"x.jpg", "y.jpg"}
        assert {r.image.name for r in txl_pbc(data, "test", splits=out)} == {"t.jpg"}
        for name in ("wbc-image-dataset.csv", "pbc-wbc.csv", "bccd.csv"):
            assert (out / name).read_bytes() == (data / "splits" / name).read_bytes()
    assert [r.image.stem for r in halves[0]] == ["a", "c", "e"]  # f has no label: not counted
    assert [r.image.stem for r in halves[1]] == ["b", "d"]


def test_without_the_data_it_says_where_it_looked(tmp_path, capsys):
    script = load_script("txl_val_half")
    with pytest.raises(SystemExit) as stop:
        script.main(["judge", str(tmp_path / "out"), "--data", str(tmp_path / "none")])
    assert stop.value.code == 2
    assert f"no public data at {tmp_path / 'none'}" in capsys.readouterr().err
