"""scripts/lab_fine_tune.py: the lab's cells are chosen by class share and laid out as
`--lab-classes` expects; on the real data, a fine-tuned bundle is trained and evaluated."""

import csv
from collections import Counter
from pathlib import Path

import pytest

from conftest import ROOT, draw_field, write_image, load_script
from wbc_batch.train import datasets as ds

SHARED = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="module")
def lf():
    return load_script("lab_fine_tune")


def _records(counts: dict) -> list:
    return [ds.ClassRecord(Path(f"/x/{cls}{i}.png"), cls, "lab") for cls, n in counts.items() for i in range(n)]


def test_cells_are_chosen_by_class_share_and_the_same_for_the_same_seed(lf):
    records = _records({"neutrophil": 105, "lymphocyte": 31, "monocyte": 28, "eosinophil": 12})
    got = lf.choose_cells(records, 25, seed=0)
    assert len(got) == 25 and len({r.image for r in got}) == 25
    # shares 14.9 / 4.4 / 3.98 / 1.7: floors 14, 4, 3, 1; the three largest remainders get one more
    assert Counter(r.cls for r in got) == {"neutrophil": 15, "lymphocyte": 4, "monocyte": 4, "eosinophil": 2}
    assert [r.image for r in lf.choose_cells(records, 25, seed=0)] == [r.image for r in got]
    assert {r.image for r in lf.choose_cells(records, 25, seed=1)} != {r.image for r in got}
    assert lf.choose_cells(records, 500) == records


def test_the_lab_folder_is_the_lab_classes_layout(lf, tmp_path):
    src = [write_image(tmp_path / f"src{i}.png", draw_field(40, 40)) for i in range(3)]
    records = [ds.ClassRecord(src[0], "monocyte", "x"), ds.ClassRecord(src[1], "monocyte", "x"),
               ds.ClassRecord(src[2], "basophil", "x")]
    folder = lf.write_lab_folder(records, tmp_path / "lab")
    read = ds.read_class_folders(folder)
    assert sorted((r.cls, Path(r.image).resolve()) for r in read) == sorted(
        (r.cls, r.image.resolve()) for r in records)


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data not present")
def test_the_script_fine_tunes_on_a_few_cells_and_evaluates_each_bundle(lf, tmp_path, capsys):
    work = tmp_path / "lab"
    argv = ["--bundle", str(ROOT / "wbc_batch" / "models"), "--source", "wbc2", "--sizes", "5",
            "--work", str(work), "--data", str(SHARED), "--", "--epochs", "1", "--min-steps", "1"]
    assert lf.main(argv) == 0
    assert sum(1 for p in (work / "k5" / "lab").rglob("*") if p.is_file()) == 5
    assert (work / "k5" / "bundle" / "classifier.safetensors").stat().st_size > 1_000_000
    with open(work / "lab_fine_tune.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["k"] for r in rows] == ["0", "5"]
    assert all(r["cells"] == "22" and 0 <= float(r["accuracy"]) <= 1 for r in rows)   # Dataset 2 val
    assert "| 5 | " in capsys.readouterr().out
