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
    assert lf.write_lab_folder(records, tmp_path / "lab") == ["--lab-classes", str(tmp_path / "lab")]
    read = ds.read_class_folders(tmp_path / "lab")
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


def test_fields_are_laid_out_as_a_box_truth_that_lab_truth_reads_back(lf, tmp_path):
    from wbc_batch.plugins import get_plugin_manager, get_truth_readers

    src = [write_image(tmp_path / f"Field {i}.jpg", draw_field(120, 90)) for i in range(2)]
    fields = [lf.LabField(src[0], [(5, 6, 30, 31)], "eosinophil"),
              lf.LabField(src[1], [(1, 2, 20, 20), (50, 40, 25, 26)], "neutrophil")]
    options = lf.write_lab_folder(fields, tmp_path / "lab")
    assert options == ["--lab-truth", str(tmp_path / "lab" / "fields"), str(tmp_path / "lab" / "truth.csv")]
    readers = get_truth_readers(get_plugin_manager(autoload=False))
    read = ds.read_lab_truth(Path(options[1]), Path(options[2]), readers)
    assert sorted((Path(r.image).resolve(), r.truth.boxes, r.truth.box_classes) for r in read) == [
        (src[0].resolve(), [(5, 6, 30, 31)], ["eosinophil"]),
        (src[1].resolve(), [(1, 2, 20, 20), (50, 40, 25, 26)], ["neutrophil", "neutrophil"])]


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data not present")
def test_bccd_fields_whose_boxes_share_one_subtype_are_the_labelled_ones(lf):
    fields = lf.labelled_records(SHARED, "bccd")
    every = ds.bccd(SHARED, "train")
    assert fields and all(isinstance(f, lf.LabField) and f.boxes for f in fields)
    by_image = {r.image: r for r in every}
    for f in fields:  # every box of the field, each with the field's one subtype
        assert by_image[f.image].boxes == f.boxes and set(by_image[f.image].classes) == {f.cls}
    assert len(fields) == sum(1 for r in every if r.boxes and r.classes[0] is not None)


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data not present")
def test_other_split_files_narrow_the_train_images_chosen_from(lf, tmp_path):
    splits = tmp_path / "splits"
    splits.mkdir()
    with open(SHARED / "splits" / "bccd.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    kept = [r for r in rows if r["split"] == "train"][::2]
    with open(splits / "bccd.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(kept)
    every = {f.image for f in lf.labelled_records(SHARED, "bccd")}
    narrowed = {f.image for f in lf.labelled_records(SHARED, "bccd", splits)}
    assert narrowed and narrowed < every
    assert narrowed == every & {SHARED / "bccd" / r["image"] for r in kept}
