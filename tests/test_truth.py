"""Truth readers on small layouts written here, plus a smoke read of the real datasets if present."""

import asyncio
import re
import shutil
import sys
import unicodedata
from pathlib import Path

import cv2
import numpy as np
import pytest

from wbc_batch.truth import (WBC_NAMES, ImageTruth, TruthError, TruthSet, is_not_wbc,
                             is_other_wbc, load_truth, named_with_guess, names_any_wbc,
                             normalise_class, select_split, suggest_class)
from wbc_batch_plugins.truth_csv import CSVReader
from wbc_batch_plugins.truth_voc import VOCReader
from wbc_batch_plugins.truth_wbc_dataset import WBCDatasetReader
from wbc_batch_plugins.truth_yolo import YOLOReader

READERS = {r.name: r for r in (WBCDatasetReader(), VOCReader(), YOLOReader(), CSVReader())}


def write_image(path: Path, w=8, h=6, value=200):
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, data = cv2.imencode(path.suffix, np.full((h, w, 3), value, np.uint8))
    path.write_bytes(data.tobytes())
    return path


def write_mask(path: Path, w=8, h=6):
    mask = np.zeros((h, w), np.uint8)
    mask[1:5, 1:6] = 128
    mask[2:4, 2:4] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), mask)
    return path


# --- helpers -------------------------------------------------------------------------------------

def test_normalise_class():
    assert normalise_class("NEUTROPHIL") == "neutrophil"
    assert normalise_class(" Lymphocytes ") == "lymphocyte"
    assert normalise_class("EO") == "eosinophil"
    assert normalise_class("SNE") == normalise_class("BNE") == "neutrophil"  # PBC's file prefixes
    for name, cls in (("Neutrophile", "neutrophil"), ("éosinophiles", "eosinophil"),
                      ("Basophilen", "basophil"), ("Lymphozyt", "lymphocyte"),
                      ("Monozyten", "monocyte")):  # German and French, accents or not
        assert normalise_class(name) == cls, name
    assert normalise_class("ban") == "ban"  # no plural of BA
    assert normalise_class(unicodedata.normalize("NFD", "Neutrófilo segmentado")) == "neutrophil"
    assert names_any_wbc("Leucócitos") and names_any_wbc("Glóbulo blanco")  # accents or not
    assert is_not_wbc("Glóbulos rojos") and is_not_wbc("Hemácias") and is_not_wbc("eritroblasto")
    assert is_other_wbc("Mielocito") and is_other_wbc(unicodedata.normalize("NFD", "Mielócito"))
    assert is_other_wbc("Blastos") and names_any_wbc("globulos_blancos")  # as class lists join
    for name in ("Segmentados", "Cayados", "Bastonetes", "Neutrófilo en banda"):
        assert normalise_class(name) == "neutrophil", name
    assert normalise_class("Linfocito reactivo") == "lymphocyte"
    for name, cls in (("Neutrófilos", "neutrophil"), ("linfocito", "lymphocyte"),
                      ("Linfócitos", "lymphocyte"), ("Monocitos", "monocyte"),
                      ("eosinófilo", "eosinophil"), ("Basófilos", "basophil"),
                      ("Neutrofili", "neutrophil"), ("linfociti", "lymphocyte"),
                      ("Linfocita", "lymphocyte"), ("monociti", "monocyte"),
                      ("Eosinofili", "eosinophil"), ("basofilo", "basophil"),
                      ("Granulocito neutrófilo", "neutrophil"),
                      ("Neutrofilo segmentato", "neutrophil")):  # Spanish, Portuguese, Italian
        assert normalise_class(name) == cls, name
    assert normalise_class("Monocitoide") == "monocitoide" and normalise_class("linfo") == "linfo"
    assert is_not_wbc("Piastrine") and is_not_wbc("eritrociti") and "leucociti" in WBC_NAMES
    assert suggest_class("Neutrophills") == "neutrophil" and suggest_class("Blasts") is None
    assert suggest_class("Lymphoma") is None and suggest_class("Neutropenie") is None
    assert normalise_class("Leukozyten") == "leukozyten" and "leukozyten" in WBC_NAMES
    assert named_with_guess("Monocyts") == "Monocyts (monocyte?)"
    assert normalise_class("") is None and normalise_class(None) is None
    assert normalise_class("Blast") == "blast"


def test_truthset_matching_is_forgiving_but_never_guesses():
    ts = TruthSet({"Dataset 2/001.bmp": ImageTruth(cls="monocyte"),
                   "s1/x.jpg": ImageTruth(cls="basophil"), "s2/x.jpg": ImageTruth(cls="neutrophil"),
                   "masks_only/y": ImageTruth(cls="lymphocyte")})
    assert ts.find("Dataset 2/001.bmp").cls == "monocyte"
    assert ts.find("dataset 2/001.BMP").cls == "monocyte"                 # letter case
    assert ts.find("wbc/Dataset 2/001.bmp").cls == "monocyte"             # folder suffix
    assert ts.find("001.bmp").cls == "monocyte"                           # unique stem
    assert ts.find("masks_only/y.png").cls == "lymphocyte"                # no extension in truth
    assert ts.find("x.jpg") is None                                       # two candidates
    assert ts.find("s2/x.jpg").cls == "neutrophil"
    assert ts.find("nothing.png") is None
    assert ts.find("Dataset 2/001.png") is None and ts.find("001.png") is None  # its mask, not it
    assert ts.find("s1/x.jpeg").cls == "basophil"


def test_truth_and_masks_are_found_whatever_unicode_form_a_name_is_in():
    import unicodedata

    from wbc_batch.truth import mask_for

    nfc, nfd = (unicodedata.normalize(form, "Zürich/café") for form in ("NFC", "NFD"))
    ts = TruthSet({f"{nfc}.png": ImageTruth(cls="monocyte"), f"Ä/{nfc}_2.png": ImageTruth(cls="basophil")})
    assert ts.find(f"{nfd}.png").cls == "monocyte"                     # as a Mac writes it
    assert ts.find(f"{nfd.upper()}.PNG").cls == "monocyte"             # and in another case
    assert ts.find(unicodedata.normalize("NFD", f"x/Ä/{nfc}_2.png")).cls == "basophil"  # suffix
    assert ts.find(unicodedata.normalize("NFD", "café_2.png")).cls == "basophil"        # stem
    assert mask_for({nfc.lower(): "m.png"}, f"{nfd}.jpg") == "m.png"  # as mask_index keys it


def test_a_stem_match_never_crosses_folders_and_resolve_pairs_one_to_one():
    ts = TruthSet({"sample_B/field_01.jpg": ImageTruth(cls="lymphocyte"),
                   "field_02.jpg": ImageTruth(cls="monocyte"), "C/f3.png": ImageTruth(cls="basophil")})
    assert ts.find("sample_A/field_01.jpg") is None             # another sample's truth
    assert ts.find("run/sample_B/field_01.jpg").cls == "lymphocyte"
    assert ts.find("other/C/f3.png").cls == "basophil" and ts.find("f3.png").cls == "basophil"
    assert ts.find("D/f3.png") is None
    # field_02.jpg, a truth name without folder, is reached from two samples: neither gets it
    paired, ambiguous = ts.resolve(["sample_A/field_02.jpg", "sample_B/field_02.jpg",
                                    "sample_B/field_01.jpg"])
    assert paired == {"sample_B/field_01.jpg": "sample_B/field_01.jpg"}
    assert ambiguous == {"field_02.jpg": ["sample_A/field_02.jpg", "sample_B/field_02.jpg"]}
    # an exact name keeps its truth whatever else reaches it
    paired, ambiguous = ts.resolve(["field_02.jpg", "x/field_02.jpg"])
    assert paired == {"field_02.jpg": "field_02.jpg"} and not ambiguous


def test_truth_names_of_an_image_already_paired_under_another_spelling_are_found():
    t = ImageTruth(cls="monocyte")
    ts = TruthSet({"f2.png": t, "F2.PNG": t, "f3": t, "f3.png": t, "A/f4.png": t, "f4.png": t,
                   "gone.png": t, "B/f5.png": t, "f6.png": t, "run/X/f6.png": t})
    paired, ambiguous = ts.resolve(["f2.png", "f3.png", "A/f4.png", "A/f5.png", "f6.png"])
    unused = ts.unmatched(paired, ambiguous)
    assert unused == ["F2.PNG", "f3", "f4.png", "gone.png", "B/f5.png", "run/X/f6.png"]
    # B/f5.png is another sample's truth, not a spelling of A/f5.png
    assert ts.shadowed(paired, unused) == {"F2.PNG": "f2.png", "f3": "f3.png",
                                           "f4.png": "A/f4.png", "run/X/f6.png": "f6.png"}
    # folders below the sample named alike in every sample (S1/images/f.png): each key is
    # tried against its own sample's image, whose folders end or are ended by its own
    ts = TruthSet({"S1/images/f.png": t, "s1/Images/F.PNG": t, "S2/images/f.png": t,
                   "lab/S3/images/f.png": t, "S3/images/f": t})
    paired, ambiguous = ts.resolve(["S1/images/f.png", "S3/images/f.png"])
    assert ts.shadowed(paired, ts.unmatched(paired, ambiguous)) == {
        "s1/Images/F.PNG": "S1/images/f.png", "lab/S3/images/f.png": "S3/images/f.png"}


def test_load_truth_errors_name_the_problem(tmp_path):
    with pytest.raises(TruthError, match="not found"):
        load_truth(tmp_path / "nope", READERS)
    (tmp_path / "empty").mkdir()
    with pytest.raises(TruthError, match="no truth reader recognises"):
        load_truth(tmp_path / "empty", READERS)
    with pytest.raises(TruthError, match="unknown truth format 'xml'.*csv, voc"):
        load_truth(tmp_path / "empty", READERS, fmt="xml")


def test_a_readers_why_not_is_a_hint_only(tmp_path):
    class Shaky:
        name = "shaky"

        def can_read(self, path):
            return False

        def why_not(self, path):
            raise RuntimeError("boom")

        def read(self, path, input_dir):
            return {}

    (tmp_path / "empty").mkdir()
    with pytest.raises(TruthError, match="name one with --truth-format$"):
        load_truth(tmp_path / "empty", {**READERS, "shaky": Shaky()})


class Quitter:
    """A truth reader whose every method calls sys.exit()."""

    name, priority = "quitter", 100

    def can_read(self, path):
        sys.exit(2)

    def why_not(self, path):
        sys.exit(3)

    def read(self, path, input_dir):
        sys.exit("no licence")


def test_a_truth_reader_calling_sys_exit_is_passed_over_or_named(tmp_path, caplog):
    # before: SystemExit went past `except Exception` and ended wbc-batch without a word
    (tmp_path / "t.csv").write_text("image,class\na.png,neutrophil\n")
    readers = {**READERS, "quitter": Quitter()}
    assert load_truth(tmp_path / "t.csv", readers).reader == "csv"
    assert "truth reader 'quitter' failed while looking at" in caplog.text
    assert "SystemExit: 2" in caplog.text
    with pytest.raises(TruthError, match="truth reader 'quitter' failed on .*SystemExit: no licence"):
        load_truth(tmp_path / "t.csv", readers, fmt="quitter")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TruthError, match="no truth reader recognises"):
        load_truth(tmp_path / "empty", readers)  # why_not exiting is a hint passed over


def test_a_truth_reader_raising_cancelled_error_is_named_not_a_crash(tmp_path):
    # before: asyncio.CancelledError (a BaseException) from a reader that asks a LIMS went past
    # the check and ended wbc-batch with a traceback
    class Cancelled(Quitter):
        def read(self, path, input_dir):
            raise asyncio.CancelledError("LIMS request cancelled")

    (tmp_path / "t.csv").write_text("image,class\na.png,neutrophil\n")
    with pytest.raises(TruthError, match="'quitter' failed on .*CancelledError: LIMS request"):
        load_truth(tmp_path / "t.csv", {**READERS, "quitter": Cancelled()}, fmt="quitter")


@pytest.mark.parametrize("priority", [None, "high", float("nan")])
def test_a_reader_whose_priority_is_not_a_number_counts_as_0_with_a_warning(tmp_path, caplog,
                                                                           priority):
    # before: `-None` in the sort key stopped every --truth run, a built-in format's too
    class Odd:
        name = "odd"

        def can_read(self, path):
            return True

        def read(self, path, input_dir):
            return {"a.png": ImageTruth(cls="neutrophil")}

    Odd.priority = priority
    (tmp_path / "t.csv").write_text("image,class\na.png,neutrophil\n")
    readers = {**READERS, "odd": Odd()}
    assert load_truth(tmp_path / "t.csv", readers, fmt="csv").reader == "csv"
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [f"truth reader 'odd' has priority {priority!r}, which is not a number; "
                        "taken as 0"]


@pytest.mark.parametrize("returned", [np.array([1, 2]), np.zeros((0,)), "pd"])
def test_a_reader_returning_an_array_or_a_data_frame_is_named(tmp_path, returned):
    # before: "The truth value of an array ... is ambiguous", naming no reader
    import pandas as pd

    if isinstance(returned, str):
        returned = pd.DataFrame({"image": ["a.png"], "class": ["neutrophil"]})

    class Arrays:
        name = "arrays"

        def can_read(self, path):
            return True

        def read(self, path, input_dir):
            return returned

    (tmp_path / "t.txt").write_text("x")
    with pytest.raises(TruthError, match=r"truth reader 'arrays' returned something other than "
                                         r"\{image name: ImageTruth\}"):
        load_truth(tmp_path / "t.txt", {"arrays": Arrays()})


def test_a_plugin_readers_truth_is_settled_as_the_built_in_readers_is(tmp_path):
    # boxes appended after ImageTruth() were not scored, without a word; "NE" stayed unknown
    class LineByLine:
        name = "lines"

        def __init__(self, classes):
            self.classes = classes

        def can_read(self, path):
            return True

        def read(self, path, input_dir):
            truth = ImageTruth()
            for cls in self.classes:
                truth.boxes.append((1 + 10 * len(truth.boxes), 2, 3, 4))
                truth.box_classes.append(cls)
            return {"a.png": truth, "b.png": ImageTruth(cls="Lymphs")}

    (tmp_path / "t.txt").write_text("x")
    ts = load_truth(tmp_path / "t.txt", {"lines": LineByLine(["NE", "WBC", None])})
    assert ts["a.png"].has_boxes and ts["a.png"].kinds == ("class", "boxes")
    assert ts["a.png"].box_classes == ["neutrophil", None, None]
    assert ts["b.png"].cls == "lymphocyte"

    class Uneven(LineByLine):
        def read(self, path, input_dir):
            items = super().read(path, input_dir)
            items["a.png"].box_classes.pop()
            return items

    with pytest.raises(TruthError, match="truth reader 'lines', image 'a.png': box_classes must "
                                         "have one entry per box"):
        load_truth(tmp_path / "t.txt", {"lines": Uneven(["NE", "NE"])})

    class Plain(LineByLine):
        def read(self, path, input_dir):
            return {"a.png": {"cls": "NE"}}

    with pytest.raises(TruthError, match="other than .*: 'a.png': a dict$"):
        load_truth(tmp_path / "t.txt", {"lines": Plain([])})

    class PathKeys(LineByLine):
        def read(self, path, input_dir):
            return {Path("a.png"): ImageTruth(cls="NE")}

    with pytest.raises(TruthError, match=r"other than .*: a key .*'a.png'\) that is a \w*Path, "
                                         r"not a str$"):
        load_truth(tmp_path / "t.txt", {"lines": PathKeys([])})


def test_select_split(tmp_path):
    write_image(tmp_path / "data" / "a" / "1.jpg")
    write_image(tmp_path / "data" / "a" / "2.jpg")
    split = tmp_path / "split.csv"
    split.write_text("image,class,split\na/1.jpg,neutrophil,test\na/2.jpg,neutrophil,val\n")
    assert select_split(split, "test", tmp_path / "data") == [tmp_path / "data" / "a" / "1.jpg"]
    with pytest.raises(TruthError, match="split 'train' has no rows.*test, val"):
        select_split(split, "train", tmp_path / "data")
    split.write_text("image,split\na/3.jpg,test\n")
    with pytest.raises(TruthError, match="not under"):
        select_split(split, "test", tmp_path / "data")

    # a lab's CSV as Excel saves it, which `train classifier --lab-csv` reads: a BOM, column
    # names and split values in capitals
    split.write_text("\ufeffImage,Class,Patient,Split\na/1.jpg,NE,p1,Train\na/2.jpg,LY,p2,Val\n",
                     encoding="utf-8")
    assert select_split(split, "val", tmp_path / "data") == [tmp_path / "data" / "a" / "2.jpg"]
    assert select_split(split, "train", tmp_path / "data", {"Patient": "P1"}) == [
        tmp_path / "data" / "a" / "1.jpg"]
    # a truth CSV with one row per cell, given a split column: each image once (it had been
    # analysed once per row, and its cells counted as often in the differential)
    split.write_text("image,x,y,width,height,class,split\n"
                     "a/2.jpg,1,1,5,5,NE,val\na/2.jpg,9,1,5,5,LY,val\n.\\a\\1.jpg,1,1,5,5,NE,val\n"
                     "a/1.jpg,9,9,5,5,MO,val\n")
    assert select_split(split, "val", tmp_path / "data") == [
        tmp_path / "data" / "a" / "2.jpg", tmp_path / "data" / "a" / "1.jpg"]
    # and under other spellings of one name
    split.write_text("image,split\na/1.jpg,val\na//1.jpg,val\na/./1.jpg,val\n./a/2.jpg,val\n")
    assert select_split(split, "val", tmp_path / "data") == [
        tmp_path / "data" / "a" / "1.jpg", tmp_path / "data" / "a" / "2.jpg"]
    # an absolute path stays one
    split.write_text(f"image,split\n{tmp_path / 'data' / 'a' / '1.jpg'},val\n")
    assert select_split(split, "val", tmp_path / "data") == [tmp_path / "data" / "a" / "1.jpg"]


# --- WBC Image Dataset ---------------------------------------------------------------------------

def make_wbc_dataset(root: Path):
    for k, n in ((1, 3), (2, 2)):
        for i in range(1, n + 1):
            write_image(root / f"Dataset {k}" / f"{i:03d}.bmp")
            write_mask(root / f"Dataset {k}" / f"{i:03d}.png")
    (root / "Class Labels of Dataset 1.csv").write_bytes(b"image ID,class label\r\n1,2\r\n2,1\r\n3,5\r\n")
    (root / "Class Labels of Dataset 2.csv").write_text("\ufeffimage ID,class\n1,3\n2,4\n", encoding="utf-8")


def test_wbc_dataset_reader(tmp_path):
    root = tmp_path / "wbc"
    make_wbc_dataset(root)
    reader = READERS["wbc_dataset"]
    assert reader.can_read(root) and reader.can_read(root / "Dataset 2")
    assert not reader.can_read(tmp_path)
    ts = load_truth(root, READERS, input_dir=root)
    assert ts.reader == "wbc_dataset" and len(ts) == 5
    t = ts["Dataset 1/003.bmp"]
    assert t.cls == "basophil" and t.mask_path == root / "Dataset 1" / "003.png"
    assert ts["Dataset 2/002.bmp"].cls == "eosinophil"
    assert ts["Dataset 1/001.bmp"].kinds == ("mask", "class")
    # one dataset folder as the run's input: names relative to it
    only2 = load_truth(root / "Dataset 2", READERS, input_dir=root / "Dataset 2")
    assert sorted(only2) == ["001.bmp", "002.bmp"] and only2["001.bmp"].cls == "monocyte"


def test_wbc_dataset_reader_takes_upper_case_extensions(tmp_path):
    root = tmp_path / "wbc"
    make_wbc_dataset(root)
    folder = root / "Dataset 2"
    for name in ("001.bmp", "001.png"):
        (folder / name).rename(folder / name.upper())
    ts = load_truth(folder, READERS, input_dir=folder)
    assert ts["001.BMP"].mask_path == folder / "001.PNG" and ts["001.BMP"].cls == "monocyte"


def test_wbc_dataset_bad_code(tmp_path):
    root = tmp_path / "wbc"
    make_wbc_dataset(root)
    (root / "Class Labels of Dataset 1.csv").write_text("image ID,class\n1,9\n")
    with pytest.raises(TruthError, match="class code 9"):
        load_truth(root, READERS, input_dir=root)


# --- VOC + BCCD labels ---------------------------------------------------------------------------

VOC = """<annotation><folder>JPEGImages</folder><filename>{name}.jpg</filename>
<size><width>64</width><height>48</height><depth>3</depth></size>{objects}</annotation>"""
OBJ = "<object><name>{label}</name><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"


def make_voc(root: Path):
    ann = root / "BCCD" / "Annotations"
    ann.mkdir(parents=True)
    specs = {
        "BloodImage_00000": [("WBC", 10, 5, 30, 25), ("RBC", 0, 0, 5, 5)],
        "BloodImage_00001": [("WBC", 1, 1, 11, 11), ("WBC", 30, 30, 40, 40)],
        "BloodImage_00002": [("Platelets", 3, 3, 6, 6)],
        "BloodImage_00003": [("WBC", 2, 2, 12, 12)],
        "lab_field": [("Neutrophil", 5, 5, 25, 25), ("lymphocyte", 30, 5, 50, 25)],
    }
    for name, objs in specs.items():
        objects = "".join(OBJ.format(label=l, x0=a, y0=b, x1=c, y1=d) for l, a, b, c, d in objs)
        (ann / f"{name}.xml").write_text(VOC.format(name=name, objects=objects))
        write_image(root / "BCCD" / "JPEGImages" / f"{name}.jpg", 64, 48)
    (root / "labels.csv").write_text(
        ",Image,Category\n,0,NEUTROPHIL\n,1,\"NEUTROPHIL, EOSINOPHIL\"\n,2,\n,3,\"MONOCYTE, MONOCYTE\"\n")


def test_voc_reader_with_bccd_labels(tmp_path):
    make_voc(tmp_path)
    assert READERS["voc"].can_read(tmp_path) and READERS["voc"].can_read(tmp_path / "BCCD" / "Annotations")
    ts = load_truth(tmp_path, READERS, input_dir=tmp_path)
    assert ts.reader == "voc" and len(ts) == 5
    t0 = ts["BCCD/JPEGImages/BloodImage_00000.jpg"]
    assert t0.boxes == [(10.0, 5.0, 20.0, 20.0)] and t0.box_classes == ["neutrophil"]
    t1 = ts["BCCD/JPEGImages/BloodImage_00001.jpg"]
    assert len(t1.boxes) == 2 and t1.box_classes == [None, None]        # two labels, two boxes
    t2 = ts["BCCD/JPEGImages/BloodImage_00002.jpg"]
    assert t2.has_boxes and t2.boxes == []                               # no WBC: still truth
    assert ts["BCCD/JPEGImages/BloodImage_00003.jpg"].box_classes == [None]  # two labels, one box
    assert ts["BCCD/JPEGImages/lab_field.jpg"].box_classes == ["neutrophil", "lymphocyte"]
    # the images folder as input: names relative to it
    ts2 = load_truth(tmp_path / "BCCD" / "Annotations", READERS,
                     input_dir=tmp_path / "BCCD" / "JPEGImages")
    assert "BloodImage_00000.jpg" in ts2


def test_a_box_written_twice_is_one_cell_in_every_reader(tmp_path, caplog):
    # an object exported twice was a WBC never found: recall fell without a word
    make_voc(tmp_path)
    ann = tmp_path / "BCCD" / "Annotations" / "BloodImage_00000.xml"
    twice = OBJ.format(label="WBC", x0=10, y0=5, x1=30, y1=25) * 2
    ann.write_text(VOC.format(name="BloodImage_00000", objects=twice))
    with caplog.at_level("WARNING", logger="wbc_batch"):
        ts = load_truth(tmp_path, READERS, input_dir=tmp_path)
    t0 = ts["BCCD/JPEGImages/BloodImage_00000.jpg"]
    assert t0.boxes == [(10.0, 5.0, 20.0, 20.0)] and t0.box_classes == ["neutrophil"]  # labels.csv's
    assert "1 WBC box(es) repeat an earlier box" in caplog.text
    assert "BCCD/JPEGImages/BloodImage_00000.jpg: 1" in caplog.text
    caplog.clear()
    make_yolo(tmp_path / "y")
    (tmp_path / "y" / "labels" / "test" / "a.txt").write_text("0 0.5 0.5 0.2 0.4\n" * 6)
    with caplog.at_level("WARNING", logger="wbc_batch"):
        ts = load_truth(tmp_path / "y" / "labels" / "test", READERS,
                        input_dir=tmp_path / "y" / "images" / "test")
    assert ts["a.jpg"].boxes == [pytest.approx((0.4, 0.3, 0.2, 0.4))]
    assert "5 WBC box(es) repeat" in caplog.text and "a.jpg: 5" in caplog.text
    # two boxes in one place with two classes are two cells as the truth says; nothing is said
    caplog.clear()
    items = {"f.png": ImageTruth(boxes=[(1, 1, 5, 5), (1, 1, 5, 5)],
                                 box_classes=["neutrophil", "eosinophil"])}
    load_truth(tmp_path, [_Reader(items)], input_dir=tmp_path)
    assert len(items["f.png"].boxes) == 2 and "repeat" not in caplog.text


class _Reader:
    """A third party's truth reader that returns `items` for any path."""

    name, priority = "third", 0

    def __init__(self, items):
        self.items = items

    def can_read(self, path):
        return True

    def read(self, path, input_dir):
        return self.items


@pytest.mark.parametrize("box", [(1, 1, 0, 5), (1, 1, 5, -2), (1, float("nan"), 5, 5), (1, 2, 3)])
def test_a_truth_box_without_area_is_refused_whoever_read_it(tmp_path, box):
    items = {"f.png": ImageTruth(boxes=[box])}
    with pytest.raises(TruthError, match=r"reader 'third', image 'f.png': the box .* has no area"):
        load_truth(tmp_path, [_Reader(items)], input_dir=tmp_path)
    make_yolo(tmp_path / "y")
    (tmp_path / "y" / "labels" / "test" / "a.txt").write_text("1 0.5 0.5 0 0\n\n0 0.5 0.5 0.2 0\n")
    with pytest.raises(TruthError, match=r"^a.txt line 3: a WBC box without area"):
        load_truth(tmp_path / "y" / "labels" / "test", READERS, fmt="yolo",
                   input_dir=tmp_path / "y" / "images" / "test")


def test_voc_size_is_kept_for_scaling_and_absent_or_zero_sizes_are_none(tmp_path):
    make_voc(tmp_path)
    ann = tmp_path / "BCCD" / "Annotations"
    ts = load_truth(tmp_path, READERS, input_dir=tmp_path)
    assert ts["BCCD/JPEGImages/BloodImage_00003.jpg"].box_size == (64, 48)
    for size in ("<size><width>0</width><height>0</height></size>", "",
                 "<size><width>x</width></size>"):
        text = VOC.format(name="BloodImage_00003", objects=OBJ.format(
            label="WBC", x0=2, y0=2, x1=12, y1=12))
        text = text.replace("<size><width>64</width><height>48</height><depth>3</depth></size>", size)
        (ann / "BloodImage_00003.xml").write_text(text)
        ts = load_truth(tmp_path, READERS, input_dir=tmp_path)
        assert ts["BCCD/JPEGImages/BloodImage_00003.jpg"].box_size is None


def test_voc_names_images_whose_labels_csv_names_a_wbc_their_xml_lacks(tmp_path, caplog):
    make_voc(tmp_path)
    with caplog.at_level("WARNING", logger="wbc_batch"):
        load_truth(tmp_path, READERS, input_dir=tmp_path)
    assert "labels.csv names a WBC" not in caplog.text  # 00002 has no label: no contradiction
    (tmp_path / "labels.csv").write_text(",Image,Category\n,0,NEUTROPHIL\n,2,EOSINOPHIL\n")
    with caplog.at_level("WARNING", logger="wbc_batch"):
        ts = load_truth(tmp_path, READERS, input_dir=tmp_path)
    assert ts["BCCD/JPEGImages/BloodImage_00002.jpg"].boxes == []  # the XML is the truth
    assert ("labels.csv names a WBC in 1 image(s) whose XML has no WBC box "
            "(BloodImage_00002: eosinophil); they are scored as fields without a WBC") in caplog.text


def test_voc_reads_every_annotations_folder_one_level_down(tmp_path):
    # a folder per clinic: only the first one's images were scored, unsaid
    for clinic in ("clinicA", "clinicB"):
        ann = tmp_path / clinic / "Annotations"
        ann.mkdir(parents=True)
        for name in ("f1", "f2"):
            (ann / f"{name}.xml").write_text(VOC.format(
                name=name, objects=OBJ.format(label="WBC", x0=1, y0=1, x1=11, y1=11)))
            write_image(tmp_path / clinic / "JPEGImages" / f"{name}.jpg", 64, 48)
    ts = load_truth(tmp_path, READERS, input_dir=tmp_path)
    assert sorted(ts.keys()) == [f"{c}/JPEGImages/{n}.jpg" for c in ("clinicA", "clinicB")
                                 for n in ("f1", "f2")]


def test_voc_files_per_sample_describe_that_samples_images(tmp_path):
    # every sample holds a field_01: labelImg's XMLs kept per sample, and CVAT's export (its
    # <filename> with the sample folder), were refused as two XMLs describing one image
    for sample, x0 in (("S1", 1), ("S2", 20)):
        write_image(tmp_path / "lab" / sample / "f1.png", 64, 48)
        (tmp_path / "ann" / sample).mkdir(parents=True)
        (tmp_path / "ann" / sample / "f1.xml").write_text(VOC.format(
            name="f1", objects=OBJ.format(label="WBC", x0=x0, y0=1, x1=x0 + 10, y1=11)
        ).replace("f1.jpg", "f1.png"))
        write_image(tmp_path / "cvat" / "JPEGImages" / sample / "f1.png", 64, 48)
        (tmp_path / "cvat" / "Annotations" / sample).mkdir(parents=True)
        (tmp_path / "cvat" / "Annotations" / sample / "f1.xml").write_text(VOC.format(
            name="f1", objects=OBJ.format(label="WBC", x0=x0, y0=1, x1=x0 + 10, y1=11)
        ).replace("f1.jpg", f"{sample}/f1.png"))
    labelimg = load_truth(tmp_path / "ann", READERS, input_dir=tmp_path / "lab")
    assert sorted(labelimg.keys()) == ["S1/f1.png", "S2/f1.png"]
    assert [labelimg.get(f"{s}/f1.png").boxes[0][0] for s in ("S1", "S2")] == [1, 20]
    cvat = load_truth(tmp_path / "cvat", READERS, input_dir=tmp_path / "cvat" / "JPEGImages")
    assert sorted(cvat.keys()) == ["S1/f1.png", "S2/f1.png"]
    assert [cvat.get(f"{s}/f1.png").boxes[0][0] for s in ("S1", "S2")] == [1, 20]
    # XMLs side by side, each <filename> naming its sample folder: found as written
    for sample in ("S1", "S2"):
        (tmp_path / "cvat" / "Annotations" / sample / "f1.xml").rename(
            tmp_path / "cvat" / "Annotations" / f"{sample}.xml")
    flat = load_truth(tmp_path / "cvat", READERS, input_dir=tmp_path / "cvat" / "JPEGImages")
    assert [flat.get(f"{s}/f1.png").boxes[0][0] for s in ("S1", "S2")] == [1, 20]
    # a folder named annotations above --truth is not the VOC layout's
    kept = tmp_path / "annotations" / "batch1"
    shutil.copytree(tmp_path / "ann", kept)
    above = load_truth(kept, READERS, input_dir=tmp_path / "lab")
    assert sorted(above.keys()) == ["S1/f1.png", "S2/f1.png"]
    # but one beside JPEGImages is, with one sample's XMLs given: they keep their sample folder
    write_image(tmp_path / "cvat" / "JPEGImages" / "f1.png", 64, 48)  # another sample's name
    (tmp_path / "cvat" / "Annotations" / "S1.xml").unlink()
    (tmp_path / "cvat" / "Annotations" / "S2.xml").unlink()
    (tmp_path / "cvat" / "Annotations" / "S1" / "f1.xml").write_text(VOC.format(
        name="f1", objects=OBJ.format(label="WBC", x0=1, y0=1, x1=11, y1=11)).replace("f1.jpg", "f1.png"))
    for truth in ("Annotations/S1", "Annotations/S1/f1.xml"):
        one = load_truth(tmp_path / "cvat" / truth, READERS,
                         input_dir=tmp_path / "cvat" / "JPEGImages")
        assert list(one.keys()) == ["S1/f1.png"], truth


def test_two_voc_files_describing_one_image_are_refused_naming_both(tmp_path):
    # an XML copied from another kept its <filename>: the copy's boxes replaced the image's own
    make_voc(tmp_path)
    ann = tmp_path / "BCCD" / "Annotations"
    (ann / "copied.xml").write_text(VOC.format(
        name="BloodImage_00003", objects=OBJ.format(label="WBC", x0=40, y0=20, x1=60, y1=40)))
    write_image(tmp_path / "BCCD" / "JPEGImages" / "copied.jpg", 64, 48)
    with pytest.raises(TruthError) as err:
        load_truth(tmp_path, READERS, input_dir=tmp_path)
    assert ("BCCD/Annotations/BloodImage_00003.xml and BCCD/Annotations/copied.xml both describe "
            "BCCD/JPEGImages/BloodImage_00003.jpg") in str(err.value)


def test_voc_reader_broken_xml(tmp_path):
    make_voc(tmp_path)
    (tmp_path / "BCCD" / "Annotations" / "BloodImage_00000.xml").write_text(
        VOC.format(name="x", objects="<object><name>WBC</name></object>"))
    with pytest.raises(TruthError, match="no valid bndbox"):
        load_truth(tmp_path, READERS, input_dir=tmp_path)


def test_voc_names_labs_use_are_read_and_unknown_ones_named(tmp_path, caplog):
    make_voc(tmp_path)
    ann = tmp_path / "BCCD" / "Annotations"
    objects = "".join(OBJ.format(label=l, x0=1 + 5 * k, y0=1, x1=11 + 5 * k, y1=11)
                      for k, l in enumerate(("Leukocyte", "WBC-neutrophil", "Lymph0", "RBC",
                                             "Blast", "Neutrophilic granulocyte", "Plasma cell",
                                             "Debris", "Immature RBC", "Mono?", "WBC?")))
    # labelImg on Windows writes the image's full path; the extension is sometimes missing
    verbatim = VOC.replace("{name}.jpg", "{name}")
    (ann / "BloodImage_00000.xml").write_text(
        verbatim.format(name="C:\\scans\\BloodImage_00000.jpg", objects=objects))
    (ann / "BloodImage_00001.xml").write_text(verbatim.format(name="BloodImage_00001", objects=""))
    (ann / "BloodImage_00003.xml").write_text(verbatim.format(name="renamed_since.jpg", objects=""))
    (ann / "x.xml").write_text(verbatim.format(name="D:\\out\\other.jpg", objects=""))
    write_image(tmp_path / "BCCD" / "JPEGImages" / "other.jpg", 64, 48)
    with caplog.at_level("WARNING", logger="wbc_batch"):
        ts = load_truth(tmp_path, READERS, input_dir=tmp_path)
    t0 = ts["BCCD/JPEGImages/BloodImage_00000.jpg"]
    # a blast and a plasma cell are WBCs whose class is scored as wrong (as CSV truth scores
    # them): left out, the cells found there counted as false cells
    # ("Immature RBC" is a red cell; "Mono?", a WBC whose class is unsure, as CSV truth reads it)
    # ("WBC?": a WBC of no subtype, as "WBC", not a class scored as wrong)
    assert len(t0.boxes) == 7 and t0.box_classes == [None, "neutrophil", "blast", "neutrophil",
                                                     "plasma cell", "mono?", None]
    assert "'Lymph0' (1)" in caplog.text and "'Debris' (1)" in caplog.text
    assert "'RBC'" not in caplog.text and "'Blast'" not in caplog.text.split("scored as wrong")[0]
    assert "'Immature RBC' (1), 'Lymph0' (1) are not taken for WBCs" in caplog.text
    assert "BCCD/JPEGImages/BloodImage_00001.jpg" in ts  # no extension: found by name
    assert "BCCD/JPEGImages/BloodImage_00003.jpg" in ts  # stale <filename>: the XML's own name
    assert "BCCD/JPEGImages/other.jpg" in ts  # x.xml, by the name it gives


# --- YOLO ----------------------------------------------------------------------------------------

def make_yolo(root: Path):
    for split, names in (("test", ("a", "b")), ("val", ("c",))):
        for name in names:
            write_image(root / "images" / split / f"{name}.jpg", 100, 50)
    (root / "labels" / "test").mkdir(parents=True)
    (root / "labels" / "val").mkdir(parents=True)
    (root / "labels" / "test" / "a.txt").write_text("0 0.5 0.5 0.2 0.4\n1 0.1 0.1 0.1 0.1\n")
    (root / "labels" / "test" / "b.txt").write_text("2 0.5 0.5 0.1 0.1\n")
    (root / "labels" / "test" / "classes.txt").write_text("WBC\nRBC\nPC\n")
    (root / "labels" / "val" / "c.txt").write_text("0 0.25 0.25 0.5 0.5\n0 0.75 0.75 0.5 0.5\n")


def test_yolo_reader(tmp_path):
    make_yolo(tmp_path)
    images = tmp_path / "images" / "test"
    assert READERS["yolo"].can_read(tmp_path / "labels" / "test") and READERS["yolo"].can_read(tmp_path)
    ts = load_truth(tmp_path / "labels" / "test", READERS, input_dir=images)
    assert ts.reader == "yolo" and sorted(ts) == ["a.jpg", "b.jpg"]
    a = ts["a.jpg"]
    assert a.box_units == "norm" and a.pixel_boxes(100, 50) == [pytest.approx((40, 15, 20, 20))]
    assert ts["b.jpg"].has_boxes and ts["b.jpg"].boxes == []
    # the dataset root as truth: every split, matched to the run's images by name
    whole = load_truth(tmp_path, READERS, input_dir=images)
    assert len(whole) == 3 and whole.find("a.jpg").boxes == a.boxes


def test_yolo_labels_saved_with_a_bom_are_read(tmp_path):
    make_yolo(tmp_path)
    labels = tmp_path / "labels" / "test"
    (labels / "a.txt").write_text("\ufeff0 0.5 0.4 0.2 0.4\r\n", encoding="utf-8")  # Notepad's UTF-8
    assert READERS["yolo"].can_read(labels)
    ts = load_truth(labels, READERS, input_dir=tmp_path / "images" / "test")
    assert ts["a.jpg"].boxes == [pytest.approx((0.4, 0.2, 0.2, 0.4))]


def test_yolo_bad_line(tmp_path):
    make_yolo(tmp_path)
    (tmp_path / "labels" / "test" / "a.txt").write_text("0 0.5 0.5\n")
    with pytest.raises(TruthError, match="expected 'class cx cy w h'"):
        load_truth(tmp_path / "labels" / "test", READERS, fmt="yolo", input_dir=tmp_path / "images" / "test")


def test_yolo_coordinates_outside_0_1_are_refused_naming_the_file_under_the_truth(tmp_path):
    # labels in pixels, or a tracker's `class cx cy w h conf id`, were read as boxes in the wrong
    # place: recall 0 and no word. Two samples may both have f.txt: the message names which.
    make_yolo(tmp_path)
    labels, images = tmp_path / "labels" / "test", tmp_path / "images" / "test"
    (labels / "A").mkdir()
    (labels / "B").mkdir()
    (labels / "A" / "f.txt").write_text("0 0.5 0.5 0.2 0.4\n")
    for text, why in (("0 52.0 18.5 20.0 10.0", "coordinate 52 is outside 0 to 1.*like pixels"),
                      ("0 0.5 0.5 0.2 0.2 0.9 3", "coordinate 3 is outside.*a tracker's output"),
                      # track id 1 lies inside 0..1: the line was a triangle, a box of wrong place
                      ("0 0.816 0.39 0.14 0.185 0 1", "7 numbers ending in a whole one read as "
                                                        "a tracker's output"),
                      ("0 -0.2 0.5 0.2 0.2", "coordinate -0.2 is outside 0 to 1"),
                      # one value a little past 1 was said to "look like pixels"
                      ("0 1.003 0.5 0.2 0.2", "coordinate 1.003 is outside 0 to 1.*just past the "
                                              "image's edge .*set it to 1 in the label file"),
                      ("0 1.05 240 60 60", "coordinate 240 is outside 0 to 1.*like pixels")):
        (labels / "B" / "f.txt").write_text("1 0.1 0.1 0.1 0.1\n\n" + text + "\n")
        with pytest.raises(TruthError, match=f"^B/f.txt line 3: {why}"):
            load_truth(labels, READERS, fmt="yolo", input_dir=images)
        # not recognised either; the message says what the yolo reader did not like
        with pytest.raises(TruthError, match="no truth reader recognises .*Reader 'yolo' did not "
                                             f"accept labels/test/B/f.txt line 3: {why}"):
            load_truth(tmp_path, READERS, input_dir=images)
    # an export's rounding is not an error
    (labels / "B" / "f.txt").write_text("0 0.5 0.5 1.00004 0.2\n1 -0.00003 0.1 0.1 0.1\n")
    assert load_truth(labels, READERS, input_dir=images)["B/f"].boxes == \
        [pytest.approx((-0.00002, 0.4, 1.00004, 0.2))]


def test_yolo_bad_values_beyond_the_files_recognition_looks_at_are_refused(tmp_path):
    make_yolo(tmp_path)
    labels, images = tmp_path / "labels" / "test", tmp_path / "images" / "test"
    for k in range(8):
        (labels / f"z{k}.txt").write_text("0 0.5 0.5 0.2 0.4\n")
    (labels / "z7.txt").write_text("0 0.5 0.5 0.2 0.4\n0 320 240 64 64\n")
    assert READERS["yolo"].can_read(labels)
    with pytest.raises(TruthError, match="^z7.txt line 2: coordinate 320 is outside 0 to 1"):
        load_truth(labels, READERS, input_dir=images)


def test_yolo_exports_as_tools_write_them(tmp_path):
    make_yolo(tmp_path)
    labels = tmp_path / "labels" / "test"
    images = tmp_path / "images" / "test"
    for name in ("a0", "a1", "a2", "a3", "a4"):  # images without a WBC: empty label files
        write_image(images / f"{name}.jpg", 100, 50)
        (labels / f"{name}.txt").write_text("")
    assert READERS["yolo"].can_read(labels)
    # an export whose WBC class is not 0 says so in classes.txt; a polygon line is its box
    (labels / "classes.txt").write_text("RBC\nWBC\nPlatelet\n")
    (labels / "a.txt").write_text("0 0.5 0.5 0.2 0.4\n1 0.1 0.2 0.3 0.2 0.2 0.4\n")
    ts = load_truth(labels, READERS, input_dir=images)
    assert ts["a.jpg"].boxes == [pytest.approx((0.1, 0.2, 0.2, 0.2))] and ts["a0.jpg"].boxes == []
    (labels / "classes.txt").write_text("RBC\nPlatelet\n")
    with pytest.raises(TruthError, match="names no WBC class"):
        load_truth(labels, READERS, fmt="yolo", input_dir=images)
    (labels / "classes.txt").unlink()
    # the class list of the dataset root, found from labels/test too; a data.yaml's names
    (tmp_path / "classes.txt").write_text("RBC\nWBC\n")
    assert load_truth(labels, READERS, input_dir=images)["a.jpg"].boxes == \
        [pytest.approx((0.1, 0.2, 0.2, 0.2))]
    (tmp_path / "classes.txt").unlink()
    (tmp_path / "data.yaml").write_text("nc: 2\nnames: ['RBC', 'WBC']  # Roboflow\n")
    assert load_truth(labels, READERS, input_dir=images)["a.jpg"].boxes == \
        [pytest.approx((0.1, 0.2, 0.2, 0.2))]
    (tmp_path / "data.yaml").unlink()
    (labels / "a.txt").write_text("0 0.5 0.5 0.2 0.4 0.93\n")
    with pytest.raises(TruthError, match="a model's prediction, not ground truth"):
        load_truth(labels, READERS, fmt="yolo", input_dir=images)


def test_yolo_class_list_at_the_top_of_a_roboflow_export(tmp_path):
    # data.yaml beside train/ valid/ test/, each with images/ and labels/: it was not looked
    # for, so class 0 (Platelets in Roboflow's BCCD export) was scored as the WBCs
    (tmp_path / "data.yaml").write_text("nc: 3\nnames: ['Platelets', 'RBC', 'WBC']\n")
    images, labels = tmp_path / "valid" / "images", tmp_path / "valid" / "labels"
    write_image(images / "a.jpg", 100, 50)
    labels.mkdir(parents=True)
    (labels / "a.txt").write_text("2 0.5 0.5 0.2 0.4\n0 0.2 0.3 0.1 0.1\n")
    for truth in (labels, tmp_path / "valid"):
        assert load_truth(truth, READERS, input_dir=images)["a.jpg"].boxes == \
            [pytest.approx((0.4, 0.3, 0.2, 0.4))]
    # above a folder that is no split's, nothing is looked for: another project's list
    other = tmp_path / "project" / "labels"
    other.mkdir(parents=True)
    (other / "a.txt").write_text("0 0.5 0.5 0.2 0.4\n")
    (tmp_path / "data.yaml").write_text("nc: 2\nnames: ['RBC', 'WBC']\n")
    assert load_truth(other, READERS, input_dir=images)["a.jpg"].boxes == \
        [pytest.approx((0.4, 0.3, 0.2, 0.4))]


@pytest.mark.parametrize("names", [
    "names: {0: RBC, 1: WBC, 2: Platelets}\n",
    "names: {2: Platelets, 1: 'WBC', 0: RBC}\n",
    "names: [RBC,\n  WBC,\n  Platelets]\n",
    "names:\n  # classes\n  0: RBC\n  1: WBC\n",
    "names:\n  - RBC\n  - WBC\n",
    '"names": [RBC, WBC]\n',
])
def test_yolo_data_yaml_names_as_tools_write_them(tmp_path, names):
    # Ultralytics writes a mapping, others a list over several lines: class 1 is the WBC in all
    make_yolo(tmp_path)
    labels, images = tmp_path / "labels" / "test", tmp_path / "images" / "test"
    (labels / "a.txt").write_text("0 0.5 0.5 0.2 0.4\n1 0.2 0.3 0.2 0.2\n")
    (labels / "classes.txt").unlink()
    (tmp_path / "data.yaml").write_text("nc: 3\n" + names)
    assert load_truth(labels, READERS, input_dir=images)["a.jpg"].boxes == \
        [pytest.approx((0.1, 0.2, 0.2, 0.2))]


def test_yolo_classes_named_after_cell_types_are_wbc_boxes_with_their_class(tmp_path):
    # an export labelled by cell type (no "WBC" class) was refused: "names no WBC class"
    make_yolo(tmp_path)
    labels, images = tmp_path / "labels" / "test", tmp_path / "images" / "test"
    (labels / "classes.txt").unlink()
    (tmp_path / "data.yaml").write_text("names: {0: Neutrophils, 1: RBC, 2: lymphocyte, 3: EO}\n")
    (labels / "a.txt").write_text("0 0.5 0.5 0.2 0.4\n1 0.2 0.3 0.2 0.2\n2 0.2 0.3 0.1 0.1\n"
                                  "3 0.7 0.7 0.2 0.2\n")
    truth = load_truth(labels, READERS, input_dir=images)["a.jpg"]
    assert truth.boxes == [pytest.approx((0.4, 0.3, 0.2, 0.4)), pytest.approx((0.15, 0.25, 0.1, 0.1)),
                           pytest.approx((0.6, 0.6, 0.2, 0.2))]
    assert truth.box_classes == ["neutrophil", "lymphocyte", "eosinophil"]
    # beside a class named WBC, its boxes have no class
    (tmp_path / "data.yaml").write_text("names: [WBC, RBC, monocyte]\n")
    (labels / "a.txt").write_text("0 0.5 0.5 0.2 0.4\n2 0.2 0.3 0.2 0.2\n")
    assert load_truth(labels, READERS, input_dir=images)["a.jpg"].box_classes == [None, "monocyte"]


def test_yolo_classes_that_name_neither_a_wbc_nor_a_red_cell_are_said(tmp_path, caplog):
    # a misspelt class or a WBC of no class scored (blasts) left the truth without a word
    make_yolo(tmp_path)
    labels, images = tmp_path / "labels" / "test", tmp_path / "images" / "test"
    (labels / "classes.txt").write_text("Neutrophil\nLymphocite\nBlast\nRBC\n")
    (labels / "a.txt").write_text("0 0.2 0.2 0.1 0.1\n1 0.5 0.5 0.1 0.1\n2 0.7 0.7 0.1 0.1\n"
                                  "3 0.9 0.9 0.05 0.05\n")
    truth = load_truth(labels, READERS, input_dir=images)["a.jpg"]
    # a blast is a WBC (found, it is no false cell) whose class is scored as wrong, as in CSV
    assert truth.box_classes == ["neutrophil", "blast"]
    assert re.search(r"label lines of classes named Lymphocite \(lymphocyte\?, 1 line\) "
                     r"are taken neither for WBCs nor for red cells or platelets", caplog.text)
    assert re.search(r"classes the models do not know, scored as wrong: 'blast' \(\d+\)", caplog.text)
    assert "RBC" not in caplog.text.split("named", 1)[1].split("are taken")[0]
    caplog.clear()  # red cells and platelets as class lists write them are no news
    (labels / "classes.txt").write_text("white_blood_cell\nred_blood_cell\nRBC's\nplatelets\n")
    (labels / "a.txt").write_text("0 0.2 0.2 0.1 0.1\n1 0.5 0.5 0.1 0.1\n2 0.7 0.7 0.1 0.1\n"
                                  "3 0.9 0.9 0.05 0.05\n")
    assert load_truth(labels, READERS, input_dir=images)["a.jpg"].box_classes == [None]
    assert "taken neither" not in caplog.text


def test_yolo_data_yaml_block_list_at_the_key_column_as_pyyaml_writes_it(tmp_path):
    # yaml.safe_dump({"names": [...], "nc": 3}) puts the `- ` items at column 0, then `nc:`
    make_yolo(tmp_path)
    labels, images = tmp_path / "labels" / "test", tmp_path / "images" / "test"
    (labels / "a.txt").write_text("0 0.5 0.5 0.2 0.4\n2 0.2 0.3 0.2 0.2\n")
    (labels / "classes.txt").unlink()
    (tmp_path / "data.yaml").write_text("names:\n- Platelets\n- RBC\n- WBC\nnc: 3\n")
    assert load_truth(labels, READERS, input_dir=images)["a.jpg"].boxes == \
        [pytest.approx((0.1, 0.2, 0.2, 0.2))]
    # the list ends at the first line that is neither an item nor indented
    (tmp_path / "data.yaml").write_text("names:\n- RBC\nnc: 2\n- WBC\n")
    with pytest.raises(TruthError, match="names no WBC class"):
        load_truth(labels, READERS, fmt="yolo", input_dir=images)


@pytest.mark.parametrize("names", ["names: {0: RBC, 1: WBC\n", "names: !!python/tuple x\n",
                                   '{"path": ".", "names": ["RBC", "WBC"], "nc": 2}\n',
                                   "names:\n  first: WBC\n", "names:\nnc: 2\n"])
def test_yolo_data_yaml_names_unreadable_is_an_error_not_class_0(tmp_path, names):
    make_yolo(tmp_path)
    (tmp_path / "labels" / "test" / "classes.txt").unlink()
    (tmp_path / "data.yaml").write_text(names)
    with pytest.raises(TruthError, match="data.yaml"):
        load_truth(tmp_path / "labels" / "test", READERS, fmt="yolo",
                   input_dir=tmp_path / "images" / "test")


# --- generic CSV, class folders, masks -----------------------------------------------------------

def test_csv_reader_classes_boxes_and_masks(tmp_path):
    data = tmp_path / "data"
    write_image(data / "s1" / "one.png")
    write_image(data / "s1" / "field.png", 64, 48)
    write_mask(tmp_path / "truth" / "masks" / "s1" / "one.png.png")
    (tmp_path / "truth").mkdir(exist_ok=True)
    (tmp_path / "truth" / "truth.csv").write_text(
        "image,class,x,y,width,height,split\n"
        "s1/one.png,Neutrophil,,,,,test\n"
        "s1/field.png,lymphocyte,1,2,10,10,test\n"
        "s1/field.png,,20,2,10,10,test\n"
        "s1/empty.png,,,,,,test\n")  # no WBC in it: each cell found there is a false one
    write_image(data / "s1" / "empty.png")
    reader = READERS["csv"]
    assert reader.can_read(tmp_path / "truth") and reader.can_read(tmp_path / "truth" / "truth.csv")
    ts = load_truth(tmp_path / "truth", READERS, input_dir=data)
    assert ts.reader == "csv"
    one = ts["s1/one.png"]
    assert one.cls == "neutrophil" and one.mask_path.name == "one.png.png" and not one.has_boxes
    field = ts["s1/field.png"]
    assert field.boxes == [(1.0, 2.0, 10.0, 10.0), (20.0, 2.0, 10.0, 10.0)]
    assert field.box_classes == ["lymphocyte", None] and field.cls is None
    empty = ts["s1/empty.png"]
    assert empty.has_boxes and empty.boxes == [] and empty.cls is None


def test_csv_reader_conflicting_classes(tmp_path):
    (tmp_path / "t.csv").write_text("image,class\na.png,neutrophil\na.png,monocyte\n")
    with pytest.raises(TruthError, match="two classes"):
        load_truth(tmp_path / "t.csv", READERS)


def test_plural_short_class_names_are_known():
    # lab folders and CSVs say "Lymphs", "Segs": read by truth readers and trainers alike
    from wbc_batch.truth import normalise_class

    assert [normalise_class(n) for n in ("Lymphs", "MONOS", "Neuts", "Segs", "Basos", "Eos")] == [
        "lymphocyte", "monocyte", "neutrophil", "neutrophil", "basophil", "eosinophil"]
    assert normalise_class("Plts") == "plts" and normalise_class("blasts") == "blasts"


def test_csv_reader_wbc_of_unknown_type_duplicates_and_unknown_classes(tmp_path, caplog):
    (tmp_path / "t.csv").write_text(
        "image,class,x,y,width,height\n"
        "./a.png,WBC,1,2,10,10\n"          # a white cell whose type is not given (as VOC's)
        "a.png,Leukocyte,30,2,10,10\n"
        "a.png,WBC,1,2,10,10\n"            # the same row again: counted once
        "b.png,WBC,,,,\n"                  # a single cell of unknown type: not 'no WBC'
        "c.png,Blasts,1,1,5,5\n"             # a class the models do not have
        "c.png,blasts,9,9,5,5\n")
    with caplog.at_level("WARNING", logger="wbc_batch"):
        ts = load_truth(tmp_path / "t.csv", READERS)
    assert ts["a.png"].boxes == [(1.0, 2.0, 10.0, 10.0), (30.0, 2.0, 10.0, 10.0)]
    assert ts["a.png"].box_classes == [None, None] and ts["a.png"].kinds == ("boxes",)
    assert "b.png" not in ts  # nothing to score it on: counted among images with truth, it was
    assert "t.csv: 1 image(s) have nothing to score them on (no cell type, box or mask), " \
           "and are left out (b.png)" in caplog.text
    assert "1 row(s) repeat an earlier row's image, box and class and are counted once (line 4)" \
        in caplog.text
    assert "classes the models do not know, scored as wrong: 'blasts' (2)" in caplog.text
    assert "wbc" not in caplog.text.split("do not know")[1].split("(known")[0]
    (tmp_path / "t.csv").write_text("image,class,x,y,width,height\n"
                                    "a.png,neutrophil,1,2,10,10\na.png,monocyte,1,2,10,10\n")
    with pytest.raises(TruthError, match="line 3: image 'a.png' has the box of line 2 with another"):
        load_truth(tmp_path / "t.csv", READERS)


def test_csv_masks_that_are_not_there_are_said_when_the_truth_is_read(tmp_path, caplog):
    write_mask(tmp_path / "m" / "a.png")
    (tmp_path / "t.csv").write_text("image,class,mask\na.bmp,neutrophil,m/a.png\n"
                                    "b.bmp,lymphocyte,m/b.png\nc.bmp,,m/c.png\n")
    with caplog.at_level("WARNING", logger="wbc_batch"):
        ts = load_truth(tmp_path / "t.csv", READERS)
    # kept, each noted in accuracy.csv when it is scored: b is scored on its class, c on nothing
    assert sorted(ts) == ["a.bmp", "b.bmp", "c.bmp"]
    assert "t.csv: 2 mask file(s) it names are not there (b.bmp: " in caplog.text
    assert "those images are left out of the pixel metrics" in caplog.text


def test_a_csv_row_without_a_class_keeps_the_mask_its_folder_gives_it(tmp_path, caplog):
    # the rows were judged empty before the folder's masks/ were matched to them
    truth = tmp_path / "truth"
    write_mask(truth / "masks" / "a.png"), write_mask(truth / "masks" / "b.png")
    (truth / "labels.csv").write_text("image,class\na.bmp,\nb.bmp,neutrophil\nc.bmp,\n")
    for name in ("a", "b", "c"):
        write_image(tmp_path / "inp" / f"{name}.bmp")
    with caplog.at_level("WARNING", logger="wbc_batch"):
        ts = load_truth(truth, READERS, input_dir=tmp_path / "inp")
    assert sorted(ts) == ["a.bmp", "b.bmp"] and ts["a.bmp"].kinds == ("mask",)
    assert "1 image(s) have nothing to score them on" in caplog.text and "(c.bmp)" in caplog.text


def test_a_semicolon_truth_csv_is_read_and_a_decimal_comma_in_a_box_named(tmp_path):
    # Excel's CSV in much of Europe: refused before, so a lab's CSV could train (`--lab-csv`)
    # but not measure the result on its own held-out rows
    (tmp_path / "t.csv").write_text("image;class;split\na.png;neutrophil;val\n")
    assert load_truth(tmp_path / "t.csv", READERS)["a.png"].cls == "neutrophil"
    assert load_truth(tmp_path, READERS)["a.png"].cls == "neutrophil"  # found in its folder
    write_image(tmp_path / "a.png")
    assert select_split(tmp_path / "t.csv", "val", tmp_path) == [tmp_path / "a.png"]
    (tmp_path / "t.csv").write_text("image;x;y;width;height;class\na.png;1,5;2;10;10;neutrophil\n")
    with pytest.raises(TruthError, match="line 2: box .* is not numeric; a decimal comma"):
        load_truth(tmp_path / "t.csv", READERS)


@pytest.mark.parametrize("column", ["label", "Cell_Type", "celltype", "category", "Type",
                                    "Cell type"])
def test_a_csv_class_column_under_another_name_is_read_and_named(tmp_path, caplog, column):
    # a `label` column was ignored: boxes without classes, and no class scoring without a word
    (tmp_path / "t.csv").write_text(f"image,x,y,width,height,{column}\n"
                                    "a.png,1,2,10,10,Neutrophil\na.png,20,2,10,10,LYMPH\n")
    with caplog.at_level("WARNING", logger="wbc_batch"):
        ts = load_truth(tmp_path / "t.csv", READERS)
    assert ts["a.png"].box_classes == ["neutrophil", "lymphocyte"]
    assert caplog.text.count("t.csv has no column 'class': the classes are read from its column "
                             f"{column.lower()!r}") == 1


def test_csv_class_column_names_two_aliases_and_class_itself(tmp_path, caplog):
    (tmp_path / "t.csv").write_text("image,type,label\na.png,smear,lymphocyte\n")
    with caplog.at_level("WARNING", logger="wbc_batch"):
        ts = load_truth(tmp_path / "t.csv", READERS)
    assert ts["a.png"].cls == "lymphocyte"  # `label` comes before `type`
    assert "read from its column 'label'; its column(s) 'type' are ignored" in caplog.text
    caplog.clear()
    (tmp_path / "t.csv").write_text("image,class,label\na.png,monocyte,lymphocyte\n")
    with caplog.at_level("WARNING", logger="wbc_batch"):
        assert load_truth(tmp_path / "t.csv", READERS)["a.png"].cls == "monocyte"
    assert "column" not in caplog.text


def test_csv_errors_give_the_line_of_the_file(tmp_path):
    # the csv module skips blank lines; a line break inside quotes makes one row of two lines
    t = tmp_path / "t.csv"
    t.write_text('image,x,y,width,height,class,note\na.png,1,2,10,10,neutrophil,"two\nlines"\n\n\n'
                 "a.png,5,5,10,abc,lymphocyte,\n")
    with pytest.raises(TruthError, match=r"^t.csv line 6: box \['5', '5', '10', 'abc'\]"):
        load_truth(t, READERS)
    t.write_text("image,class,x,y,width,height\n\na.png,neutrophil,1,2,10,10\n"
                 "a.png,monocyte,1,2,10,10\n")
    with pytest.raises(TruthError, match="^t.csv line 4: image 'a.png' has the box of line 3"):
        load_truth(t, READERS)
    t.write_text("image,class\n\na.png,neutrophil\n\na.png,monocyte\n")
    with pytest.raises(TruthError, match=r"^t.csv line 5: image 'a.png' has two classes "
                                         r"\(neutrophil on line 3, monocyte\)"):
        load_truth(t, READERS)
    t.write_text("image,class,x,y,width,height\n\nb.jpg,neutrophil,10,10,50,50\n\n"
                 "b.jpg,neutrophil,,,,\n")
    with pytest.raises(TruthError, match="^t.csv line 5: image 'b.jpg' has a row with a class"):
        load_truth(t, READERS)
    t.write_bytes(b"image,class\na.png,neutrophil\n\nn\xe9.png,eosinophil\n")
    with pytest.raises(TruthError, match=r"not UTF-8 text \(line 4\)"):
        load_truth(t, READERS)
    t.write_text("name,class\na.png,neutrophil\n")
    with pytest.raises(TruthError, match=r"needs a column 'image' in its first line \(or, beside a .*"
                                         "'filename' or 'file_name'"):
        load_truth(t, READERS, fmt="csv")


def test_a_csv_naming_its_images_filename_as_bccds_export_does_is_read(tmp_path, caplog):
    # BCCD's own CSV export (filename,cell_type,xmin,xmax,ymin,ymax) was "not recognised"
    t = tmp_path / "bccd.csv"
    t.write_text("filename,cell_type,xmin,xmax,ymin,ymax\n"
                 "BloodImage_00001.jpg,EOSINOPHIL,10,60,20,80\n")
    truth = load_truth(t, READERS)
    assert truth.reader == "csv"
    assert truth["BloodImage_00001.jpg"].boxes == [(10.0, 20.0, 50.0, 60.0)]
    assert truth["BloodImage_00001.jpg"].box_classes == ["eosinophil"]
    assert "bccd.csv has no column 'image': the images are named by its column 'filename'" \
        in caplog.text
    # a file list without a class or a box is no truth
    (tmp_path / "list.csv").write_text("filename,size\na.png,100\n")
    with pytest.raises(TruthError, match="no truth reader recognises"):
        load_truth(tmp_path / "list.csv", READERS)
    # a mask column says so too
    (tmp_path / "m.csv").write_text("filename,mask\na.png,masks/a.png\n")
    assert load_truth(tmp_path / "m.csv", READERS)["a.png"].mask_path.name == "a.png"
    # in a truth folder, a CSV without `image` (an inventory: file,type) is not its truth:
    # its 'type' had become every class-folder image's class ("png")
    folder = tmp_path / "classes"
    for cls in ("neutrophil", "lymphocyte"):
        write_image(folder / cls / f"{cls}.png", 64, 48)
    (folder / "inventory.csv").write_text("filename,type\nneutrophil/neutrophil.png,png\n"
                                          "lymphocyte/lymphocyte.png,png\n")
    truth = load_truth(folder, READERS, input_dir=folder)
    assert {k: v.cls for k, v in truth.items()} == {"neutrophil/neutrophil.png": "neutrophil",
                                                     "lymphocyte/lymphocyte.png": "lymphocyte"}
    # but a folder's truth.csv is truth by its name: its `filename` column is read
    (tmp_path / "named").mkdir()
    (tmp_path / "named" / "truth.csv").write_text("filename,class\na.png,monocyte\n")
    assert load_truth(tmp_path / "named", READERS)["a.png"].cls == "monocyte"


def test_a_split_files_masks_are_found_under_the_input_folder(tmp_path):
    # splits/wbc-image-dataset.csv names its masks like its images, relative to the data folder
    data, splits = tmp_path / "data", tmp_path / "splits"
    for name in ("001", "002"):
        write_image(data / "Dataset 1" / f"{name}.bmp")
        write_mask(data / "Dataset 1" / f"{name}.png")
    write_mask(splits / "Dataset 1" / "002.png")  # one beside the CSV too: that one comes first
    (splits / "s.csv").write_text("image,mask,dataset,class,fold,split\n" + "".join(
        f"Dataset 1/{n}.bmp,Dataset 1/{n}.png,1,neutrophil,1,val\n" for n in ("001", "002", "003")))
    ts = load_truth(splits / "s.csv", READERS, input_dir=data)
    assert ts["Dataset 1/001.bmp"].mask_path == data / "Dataset 1" / "001.png"
    assert ts["Dataset 1/002.bmp"].mask_path == splits / "Dataset 1" / "002.png"
    # found in neither: named where it was looked for first, for the warning when it is read
    assert ts["Dataset 1/003.bmp"].mask_path == splits / "Dataset 1" / "003.png"


def test_csv_reader_class_folders(tmp_path):
    for cls, names in (("neutrophil", ("n1.jpg", "n2.jpg")), ("BASOPHIL", ("b1.jpg",))):
        for name in names:
            write_image(tmp_path / "pbc" / cls / name)
    ts = load_truth(tmp_path / "pbc", READERS, input_dir=tmp_path / "pbc")
    assert ts.reader == "csv" and len(ts) == 3
    assert ts["BASOPHIL/b1.jpg"].cls == "basophil" and ts["neutrophil/n2.jpg"].cls == "neutrophil"


def test_class_folders_beside_one_that_names_no_class_say_so(tmp_path, caplog):
    # evaluate HELD_OUT --truth HELD_OUT left Basophills/ out of every figure without a word
    for sub in ("Neutrophils", "Lymphs", "Basophills", "masks", ".cache"):
        write_image(tmp_path / "held" / sub / "x.jpg")
    (tmp_path / "held" / "notes").mkdir()  # no image: no class folder misspelt
    (tmp_path / "held" / "old-results").mkdir()
    write_image(tmp_path / "held" / "old-results" / "overlays" / "x.jpg.png")
    (tmp_path / "held" / "old-results" / "run.json").write_text("{}")
    (tmp_path / "held" / "old-results" / "images.csv").write_text("image\n")
    write_image(tmp_path / "held" / "mixed" / "a3.png")  # named by the truth CSV: it has truth
    (tmp_path / "held" / "truth.csv").write_text("image,class\nmixed/a3.png,monocyte\n")
    with caplog.at_level("WARNING"):
        ts = load_truth(tmp_path / "held", READERS, input_dir=tmp_path / "held")
    assert sorted(ts) == ["Lymphs/x.jpg", "Neutrophils/x.jpg", "mixed/a3.png"]
    warned = [r.getMessage() for r in caplog.records if "name no class" in r.getMessage()]
    assert warned == [f"{tmp_path / 'held'}: folders that name no class, whose images get no "
                      "truth: Basophills (basophil?) (classes: neutrophil, lymphocyte, monocyte, "
                      "eosinophil, basophil)"]


def test_csv_truth_as_labs_save_it(tmp_path):
    write_image(tmp_path / "data" / "s1" / "one.png")
    write_mask(tmp_path / "truth" / "masks" / "one.png")
    (tmp_path / "truth" / "truth.csv").write_text("image,mask\ns1\\one.png,masks\\one.png\n")
    ts = load_truth(tmp_path / "truth", READERS, input_dir=tmp_path / "data")
    assert ts["s1/one.png"].mask_path == tmp_path / "truth" / "masks" / "one.png"
    (tmp_path / "truth" / "truth.csv").write_bytes("image,class\nn\u00e9.png,neutrophil\n".encode("latin-1"))
    with pytest.raises(TruthError, match="not UTF-8"):
        load_truth(tmp_path / "truth", READERS, input_dir=tmp_path / "data")
    write_image(tmp_path / "only" / "Neutrophils" / "n1.jpg")  # a lab's check of one class
    ts = load_truth(tmp_path / "only", READERS, fmt="csv", input_dir=tmp_path / "only")
    assert ts["Neutrophils/n1.jpg"].cls == "neutrophil"


def test_csv_truth_of_every_object_leaves_red_cells_and_platelets_out(tmp_path, caplog):
    (tmp_path / "t.csv").write_text(
        "image,x,y,width,height,class\n"
        "f.jpg,10,10,40,40,NEU\nf.jpg,60,10,20,20,RBC\nf.jpg,90,10,8,8,Platelets\n"
        "f.jpg,99,10,8,8,Thrombozyten\nf.jpg,120,10,20,20,Hématie\n"
        "g.jpg,5,5,20,20,RBC\n")  # a field of red cells only: annotated, without a WBC
    with caplog.at_level("WARNING", logger="wbc_batch"):
        ts = load_truth(tmp_path / "t.csv", READERS)
    assert ts["f.jpg"].boxes == [(10.0, 10.0, 40.0, 40.0)] and ts["f.jpg"].box_classes == ["neutrophil"]
    assert ts["g.jpg"].has_boxes and ts["g.jpg"].boxes == []
    assert "not WBCs and are left out ('Hématie' 1, 'Platelets' 1, 'RBC' 2, 'Thrombozyten' 1)" \
        in caplog.text
    assert "do not know" not in caplog.text


def test_csv_boxes_by_their_corners_are_read_and_bad_boxes_refused(tmp_path):
    (tmp_path / "t.csv").write_text("image,xmin,ymin,xmax,ymax,label\nf.jpg,10,20,50,70,WBC\n")
    assert load_truth(tmp_path / "t.csv", READERS)["f.jpg"].boxes == [(10.0, 20.0, 40.0, 50.0)]
    (tmp_path / "t.csv").write_text("image,class,width,height\na.png,NE,640,480\n")  # image size
    assert load_truth(tmp_path / "t.csv", READERS)["a.png"].cls == "neutrophil"
    bad = {"image,xmin,ymin,xmax,ymax,label\nf.jpg,50,20,10,70,WBC\n": "line 2: .* has no area",
           "image,x,y,width,height,class\nf.jpg,478,143,-20,232,NEU\n": "width and height above 0",
           "image,x,y,width,height,class\nf.jpg,1,1,nan,5,NEU\n": "not a finite number",
           "image,x,y,width,height,class\nf.jpg,1,1,inf,5,NEU\n": "not a finite number",
           "image,xmin,ymin,class\nf.jpg,1,1,NEU\n": "box columns xmin, ymin that make no whole box"}
    for text, message in bad.items():
        (tmp_path / "t.csv").write_text(text)
        with pytest.raises(TruthError, match=message):
            load_truth(tmp_path / "t.csv", READERS)


@pytest.mark.parametrize("header, row", [
    ("x_min,y_min,x_max,y_max", "10,20,50,70"), ("X1,Y1,X2,Y2", "10,20,50,70"),
    ("left,top,right,bottom", "10,20,50,70"), ("Left,Top,Width,Height", "10,20,40,50"),
    ("bbox_x,bbox_y,bbox_width,bbox_height", "10,20,40,50"), ("x,y,w,h", "10,20,40,50"),
    ("X Min,Y Min,X Max,Y Max", "10,20,50,70"),
    ("X,Y,BX,BY,Width,Height", "30,45,10,20,40,50"),  # ImageJ: X, Y the centroid
])
def test_csv_boxes_in_the_other_ways_labs_write_them(tmp_path, header, row):
    # before: columns not named x, y, width, height or xmin...ymax were left out without a word,
    # and each row's class scored against the middle cell of its field
    (tmp_path / "t.csv").write_text(f"image,{header},class\nf.jpg,{row},NEU\n")
    truth = load_truth(tmp_path / "t.csv", READERS)["f.jpg"]
    assert truth.boxes == [(10.0, 20.0, 40.0, 50.0)] and truth.box_classes == ["neutrophil"]


@pytest.mark.parametrize("header, said", [
    ("x_center,y_center,width,height", "box columns x_center, y_center that make no whole box; a box's "
                                       "centre is not read"),
    ("x_min,y_min,width,height", "box columns x_min, y_min that make no whole box"),
    ("x1,y1,class2", "box columns x1, y1 that make no whole box"),
])
def test_csv_box_columns_that_make_no_box_are_refused_by_name(tmp_path, header, said):
    (tmp_path / "t.csv").write_text(f"image,{header},class\nf.jpg,1,2,3,4,NEU\n")
    with pytest.raises(TruthError, match=re.escape(said)):
        load_truth(tmp_path / "t.csv", READERS)


@pytest.mark.parametrize("word", ["top", "left", "h", "w", "right", "bottom", "x1", "by"])
def test_a_single_column_that_only_shares_a_box_words_name_is_not_refused(tmp_path, word):
    (tmp_path / "t.csv").write_text(f"image,class,{word}\nf.jpg,NEU,5\n")
    assert load_truth(tmp_path / "t.csv", READERS)["f.jpg"].cls == "neutrophil"


@pytest.mark.parametrize("header, row", [
    ("width,height,class,left,top,right,bottom", "640,480,NEU,10,20,50,70"),
    ("class,x,y,w,h,width,height", "NEU,10,20,40,50,640,480"),
])
def test_the_images_width_and_height_beside_a_box_are_not_taken_for_its_size(tmp_path, header,
                                                                              row):
    (tmp_path / "t.csv").write_text(f"image,{header}\nf.jpg,{row}\n")
    assert load_truth(tmp_path / "t.csv", READERS)["f.jpg"].boxes == [(10.0, 20.0, 40.0, 50.0)]


def test_imagej_results_table_is_read_as_saved_its_label_giving_image_and_class(tmp_path, caplog):
    # before: its Label ("title:ROI name") was read as the class, and the file refused for
    # having no image column (the README said to rename Label `image`, which named no image)
    (tmp_path / "Results.csv").write_text(
        " ,Label,Area,Mean,X,Y,BX,BY,Width,Height\n"
        "1,f1.jpg:Neutrophil,7850,120,60,60,10,10,100,100\n"
        "2,f1.jpg:0123-0456,6360,118,245,245,200,200,90,90\n"   # ImageJ's own ROI name
        "3,f2.png:Lymphs:2,5000,90,50,50,10,10,80,80\n"         # in a stack: :slice after it
        "4,f2.png:RBC,3000,200,150,150,130,130,40,40\n"         # a red cell: left out
        "5,f2.png:cell 3,4000,100,250,250,220,220,60,60\n")     # names no cell: no class
    with caplog.at_level("WARNING", logger="wbc_batch"):
        truth = load_truth(tmp_path / "Results.csv", READERS)
    assert truth["f1.jpg"].boxes == [(10.0, 10.0, 100.0, 100.0), (200.0, 200.0, 90.0, 90.0)]
    assert truth["f1.jpg"].box_classes == ["neutrophil", None]
    assert truth["f2.png"].boxes == [(10.0, 10.0, 80.0, 80.0), (220.0, 220.0, 60.0, 60.0)]
    assert truth["f2.png"].box_classes == ["lymphocyte", None]
    assert "Results.csv is read as ImageJ's results table" in caplog.text
    assert ("1 ROI name(s) name no cell; their rows are scored as WBC boxes without a class "
            "('cell 3' 1)") in caplog.text
    assert "'RBC' 1" in caplog.text  # said as any file's red cells are
    # a class column of its own, under any name read as one, is taken over the ROI names
    for column in ("Class", "Type", "Cell type"):
        (tmp_path / "Results.csv").write_text(f"Label,{column},BX,BY,Width,Height\n"
                                              "f1.jpg:0001-0002,EO,1,2,30,40\n")
        assert load_truth(tmp_path / "Results.csv", READERS)["f1.jpg"].box_classes == [
            "eosinophil"], column
    # ROIs numbered (by hand, or as ImageJ makes a repeated name unique), a large image's own
    # ROI names, and the rows Analyze > Summarize adds
    caplog.clear()
    (tmp_path / "Results.csv").write_text(
        " ,Label,BX,BY,Width,Height\n1,f1.jpg:neutrophil-1,1,2,30,40\n"
        "2,f1.jpg:Lymph 2,50,2,30,40\n3,f1.jpg:RBC-1,100,2,30,40\n"
        "4,f1.jpg:12345-10234,150,2,30,40\n5,f1.jpg:100234-001200-1,200,2,30,40\n"
        "6,Mean,75,2,30,40\n7,SD,50,0,0,0\n")
    with caplog.at_level("WARNING", logger="wbc_batch"):
        truth = load_truth(tmp_path / "Results.csv", READERS)["f1.jpg"]
    assert truth.box_classes == ["neutrophil", "lymphocyte", None, None] and len(truth.boxes) == 4
    assert "the rows of Analyze > Summarize (Mean, SD; line 7, 8) are no cells" in caplog.text
    assert "ROI name(s) name no cell" not in caplog.text and "('RBC' 1)" in caplog.text
    # a class column under a name that is not read is said, as in any other CSV
    caplog.clear()
    (tmp_path / "Results.csv").write_text("Label,Cell class,BX,BY,Width,Height\n"
                                          "f1.jpg:0001-0002,EO,1,2,30,40\n")
    with caplog.at_level("WARNING", logger="wbc_batch"):
        load_truth(tmp_path / "Results.csv", READERS)
    assert "its column(s) 'cell class', which hold cell types, are not read" in caplog.text
    # a class typed in Label beside ImageJ's box names no image: said, not read as a class
    (tmp_path / "Results.csv").write_text("Label,BX,BY,Width,Height\nneutrophil,1,2,30,40\n")
    with pytest.raises(TruthError, match=r"line 2: read as ImageJ's results table .* its Label "
                                         r"'neutrophil' names no image file"):
        load_truth(tmp_path / "Results.csv", READERS)
    # with an image column, Label is a class column as before
    (tmp_path / "Results.csv").write_text("image,Label,BX,BY,Width,Height\nf.jpg,MONO,1,2,30,40\n")
    assert load_truth(tmp_path / "Results.csv", READERS)["f.jpg"].box_classes == ["monocyte"]


def test_a_csv_named_by_its_filename_column_with_another_box_spelling_is_read(tmp_path):
    (tmp_path / "t.csv").write_text("filename,x1,y1,x2,y2\na.png,1,2,30,40\n")
    assert load_truth(tmp_path / "t.csv", READERS)["a.png"].boxes == [(1.0, 2.0, 29.0, 38.0)]


def test_a_csv_whose_class_column_has_another_name_says_no_type_is_scored(tmp_path, caplog):
    # before: "cell class" (or "Zelltyp") was not read, and the class metrics went missing
    # without a word
    (tmp_path / "t.csv").write_text("image,x,y,width,height,cell class\nf.jpg,1,2,30,30,NEU\n")
    with caplog.at_level("WARNING", logger="wbc_batch"):
        truth = load_truth(tmp_path / "t.csv", READERS)["f.jpg"]
    assert truth.box_classes == [None]
    assert "t.csv has no column 'class' (nor 'label'" in caplog.text
    assert ("no cell type is scored; its column(s) 'cell class', which hold cell types, are not "
            "read") in caplog.text
    caplog.clear()
    (tmp_path / "t.csv").write_text("image,x,y,width,height,split,fold,id\n"  # boxes only
                                    "f.jpg,1,2,30,30,val,3,17\n")
    with caplog.at_level("WARNING", logger="wbc_batch"):
        load_truth(tmp_path / "t.csv", READERS)
    assert "no column 'class'" not in caplog.text


def test_a_csv_no_reader_recognises_says_what_the_csv_reader_found_wrong(tmp_path):
    # before: "no truth reader recognises X (installed: ...); name one with --truth-format",
    # where naming it gave the useful line
    (tmp_path / "t.csv").write_text("Bild;Zelltyp\nf.jpg;NEU\n")
    with pytest.raises(TruthError) as info:
        load_truth(tmp_path / "t.csv", READERS)
    assert "Reader 'csv' did not accept truth CSV" in str(info.value)
    assert "needs a column 'image'" in str(info.value) and "has: bild, zelltyp" in str(info.value)


def test_masks_beside_a_csv_that_match_no_image_are_named(tmp_path, caplog):
    # masks/a_mask.png beside truth.csv: no image got a mask, and the pixel metrics went missing
    # without a word
    (tmp_path / "truth.csv").write_text("image,class\na.jpg,NEU\n")
    write_image(tmp_path / "masks" / "a_mask.png")
    with caplog.at_level("WARNING", logger="wbc_batch"):
        truth = load_truth(tmp_path, READERS)
    assert truth["a.jpg"].mask_path is None
    assert "1 mask(s) match no image of the truth (a_mask.png)" in caplog.text
    caplog.clear()  # masks of more images than the CSV names, each of its own found: not said
    (tmp_path / "truth.csv").write_text("image,class\nb.jpg,NEU\n")
    write_image(tmp_path / "masks" / "b.png")
    with caplog.at_level("WARNING", logger="wbc_batch"):
        assert load_truth(tmp_path, READERS)["b.jpg"].mask_path is not None
    assert "match no image" not in caplog.text
    caplog.clear()  # masks only: each is an entry, none unused
    (tmp_path / "truth.csv").unlink()
    with caplog.at_level("WARNING", logger="wbc_batch"):
        load_truth(tmp_path, READERS)
    assert "match no image" not in caplog.text


def test_an_image_given_its_class_twice_without_boxes_is_one_cell_said(tmp_path, caplog):
    # two rows of NEU for one field: a lab may have meant two cells; they were merged unsaid
    (tmp_path / "t.csv").write_text("image,class\nf.jpg,NEU\nf.jpg,NEU\ng.jpg,LYM\n")
    with caplog.at_level("WARNING", logger="wbc_batch"):
        truth = load_truth(tmp_path / "t.csv", READERS)
    assert truth["f.jpg"].cls == "neutrophil" and truth["g.jpg"].cls == "lymphocyte"
    assert ("t.csv: 1 row(s) give an image without boxes the class an earlier row gave it "
            "(line 3); each such image is one cell, scored once") in caplog.text


def test_nucleated_red_cells_and_artefacts_in_csv_truth_are_no_wbcs(tmp_path, caplog):
    # VOC truth left NRBC out; a CSV counted it as a WBC of an unknown class, scored as wrong
    (tmp_path / "t.csv").write_text("image,x,y,width,height,class\nf.jpg,1,2,30,30,NEU\n"
                                    "f.jpg,50,2,30,30,NRBC\nf.jpg,90,2,30,30,Artifact\n")
    with caplog.at_level("WARNING", logger="wbc_batch"):
        truth = load_truth(tmp_path / "t.csv", READERS)["f.jpg"]
    assert truth.boxes == [(1.0, 2.0, 30.0, 30.0)] and truth.box_classes == ["neutrophil"]
    assert "artefacts are not WBCs and are left out ('Artifact' 1, 'NRBC' 1)" in caplog.text


def test_csv_truth_saved_tab_separated_or_as_unicode_text_with_spaces_after_commas(tmp_path):
    (tmp_path / "tabs.csv").write_text("image\tclass\na.png\tNEU\n")
    (tmp_path / "unicode.csv").write_bytes("image\tclass\r\nb.png\tLYM\r\n".encode("utf-16"))
    (tmp_path / "spaced.csv").write_text('image, class\n"c.png", "MONO"\n')
    assert load_truth(tmp_path / "tabs.csv", READERS)["a.png"].cls == "neutrophil"
    assert load_truth(tmp_path / "unicode.csv", READERS)["b.png"].cls == "lymphocyte"
    assert load_truth(tmp_path / "spaced.csv", READERS)["c.png"].cls == "monocyte"
    # Excel saves both as .txt; and any of them is a split file too
    (tmp_path / "unicode.txt").write_bytes((tmp_path / "unicode.csv").read_bytes())
    assert load_truth(tmp_path / "unicode.txt", READERS)["b.png"].cls == "lymphocyte"
    write_image(tmp_path / "b.png")
    for name in ("unicode.csv", "tabs.csv"):
        text = (tmp_path / name).read_bytes().decode("utf-16" if name == "unicode.csv" else "utf-8")
        rows = [line.rstrip("\r") + ("\tsplit" if i == 0 else "\tval") for i, line in
                enumerate(text.strip().splitlines())]
        split = tmp_path / f"split_{name}"
        split.write_bytes("\r\n".join(rows).replace("a.png", "b.png").encode(
            "utf-16" if name == "unicode.csv" else "utf-8"))
        assert select_split(split, "val", tmp_path) == [tmp_path / "b.png"], name


def test_class_names_of_several_words_name_their_class():
    named = {"Band neutrophil": "neutrophil", "Neutrophil (band)": "neutrophil",
             "Seg. neutrophil": "neutrophil", "Neutrophil-segmented": "neutrophil",
             "Stab": "neutrophil", "PMN": "neutrophil", "LYMPHO": "lymphocyte",
             "Reactive lymphocyte": "lymphocyte", "Large granular lymphocytes": "lymphocyte",
             "EOSINO": "eosinophil",
             # a lab's abbreviations with a point, and the granulocytes' full names
             "Mono.": "monocyte", "Lymph.": "lymphocyte", "Neut.": "neutrophil",
             "Baso.": "basophil", "Eos.": "eosinophil", "(eo)": "eosinophil",
             "Neutrophilic granulocyte": "neutrophil", "Eosinophilic granulocytes": "eosinophil",
             "Basophilic granulocyte": "basophil", "Neutrophiler Granulozyt": "neutrophil",
             "Eosinophile Granulozyten": "eosinophil",
             "Polynucléaire neutrophile": "neutrophil"}
    assert {k: normalise_class(k) for k in named} == named
    # precursors, other lineages and negations stay unknown (a review found them taken for
    # mature cells, in truth and in a lab's training data alike)
    for other in ("Lymphocyte/Monocyte", "Basophilic stippling", "mononuclear cell", "Lymphoma",
                  "Smudge cell", "eosinophilic myelocyte", "Neutrophil myelocyte",
                  "Neutrophil metamyelocyte", "Myélocyte éosinophile", "Immature neutrophil",
                  "Eosinophilic band", "Basophil normoblast", "Pro-monocyte", "Mono blast",
                  "Not neutrophil", "Non-lymphocyte", "No lymphocyte", "Smudge cell (lymphocyte)",
                  "Granulocyte", "Cell.", "Eosinophilic neutrophil", "Basophilic erythroblast",
                  "Neutrophilic myelocyte", "Mono?", "Eos*", "Reactive lymphocyte?"):
        assert normalise_class(other) == other.lower(), other


def test_voc_boxes_named_in_several_words_count_and_a_box_without_area_is_refused(tmp_path):
    make_voc(tmp_path)
    ann = tmp_path / "BCCD" / "Annotations"
    objects = "".join(OBJ.format(label=l, x0=a, y0=1, x1=a + 10, y1=11)
                      for l, a in (("Band neutrophil", 1), ("Reactive lymphocyte", 20)))
    (ann / "lab_field.xml").write_text(VOC.format(name="lab_field", objects=objects))
    ts = load_truth(tmp_path, READERS, input_dir=tmp_path)
    assert ts["BCCD/JPEGImages/lab_field.jpg"].box_classes == ["neutrophil", "lymphocyte"]
    objects = OBJ.format(label="WBC", x0=30, y0=1, x1=10, y1=11)  # xmin and xmax swapped
    (ann / "lab_field.xml").write_text(VOC.format(name="lab_field", objects=objects))
    with pytest.raises(TruthError, match="lab_field.xml: an object 'WBC' has a bndbox without area"):
        load_truth(tmp_path, READERS, input_dir=tmp_path)


def test_yolo_lines_of_classes_the_list_lacks_or_no_line_of_class_0_are_named(tmp_path, caplog):
    labels = tmp_path / "labels"
    labels.mkdir()
    (labels / "classes.txt").write_text("RBC\nWBC\nPlatelets\n")
    (labels / "a.txt").write_text("1 0.5 0.5 0.2 0.2\n7 0.5 0.5 0.1 0.1\n")
    with caplog.at_level("WARNING", logger="wbc_batch"):
        ts = load_truth(labels, READERS, fmt="yolo")
    assert len(ts["a"].boxes) == 1
    assert "class number(s) 7, which its class list does not name, are ignored" in caplog.text
    caplog.clear()
    (labels / "classes.txt").unlink()
    (labels / "a.txt").write_text("5 0.5 0.5 0.2 0.2\n")
    with caplog.at_level("WARNING", logger="wbc_batch"):
        ts = load_truth(labels, READERS, fmt="yolo")
    assert ts["a"].boxes == [] and "no label line is of class 0" in caplog.text


def test_csv_reader_masks_only(tmp_path):
    write_mask(tmp_path / "truth" / "masks" / "s1" / "a.png")
    write_mask(tmp_path / "truth" / "masks" / "b.jpg.png")
    ts = load_truth(tmp_path / "truth", READERS, input_dir=tmp_path / "data")
    assert ts.find("s1/a.tif").mask_path.name == "a.png"
    assert ts.find("b.jpg").mask_path.name == "b.jpg.png"


# --- the real datasets (../shared/data), when present ----------------------------------------------

SHARED = next((p for p in (Path(__file__).resolve().parents[2] / "shared" / "data",
                           Path("/work/shared/data")) if p.is_dir()), None)
real = pytest.mark.skipif(SHARED is None, reason="../shared/data not available")


@real
def test_real_wbc_image_dataset():
    root = SHARED / "wbc-image-dataset"
    ts = load_truth(root, READERS, input_dir=root)
    assert ts.reader == "wbc_dataset" and len(ts) == 400
    tests = select_split(SHARED / "splits" / "wbc-image-dataset.csv", "test", root)
    rel = [p.relative_to(root).as_posix() for p in tests]
    assert all(ts.find(r) is not None and ts.find(r).mask_path.is_file() for r in rel)
    assert sum(r.startswith("Dataset 2/") for r in rel) == 22


@real
def test_real_wbc_image_dataset_split_file_as_truth():
    root = SHARED / "wbc-image-dataset"
    ts = load_truth(SHARED / "splits" / "wbc-image-dataset.csv", READERS, input_dir=root)
    val = [p.relative_to(root).as_posix()
           for p in select_split(SHARED / "splits" / "wbc-image-dataset.csv", "val", root)]
    assert val and all(ts[name].mask_path.is_file() and ts[name].cls for name in val)


@real
def test_real_bccd():
    root = SHARED / "bccd"
    ts = load_truth(root, READERS, input_dir=root)
    assert ts.reader == "voc" and len(ts) == 364
    tests = select_split(SHARED / "splits" / "bccd.csv", "test", root)
    truths = [ts.find(p.relative_to(root).as_posix()) for p in tests]
    assert len(truths) == 72 and all(t is not None for t in truths)
    assert sum(1 for t in truths if len(t.boxes) == 1 and t.box_classes[0] is not None) > 50


@real
def test_real_txl_pbc():
    root = SHARED / "txl-pbc" / "TXL_PBC"
    ts = load_truth(root / "labels" / "test", READERS, input_dir=root / "images" / "test")
    assert ts.reader == "yolo"
    images = sorted((root / "images" / "test").iterdir())
    assert all(ts.find(p.name) is not None for p in images)


@real
def test_real_pbc_split_file_and_folders():
    root = SHARED / "pbc-wbc"
    by_csv = load_truth(SHARED / "splits" / "pbc-wbc.csv", READERS, input_dir=root)
    by_dirs = load_truth(root, READERS, input_dir=root)
    assert by_csv.reader == by_dirs.reader == "csv"
    assert len(by_csv) == len(by_dirs) > 5000
    name = next(iter(by_csv))
    assert by_dirs[name].cls == by_csv[name].cls


def test_a_csv_image_with_a_class_row_and_box_rows_is_refused(tmp_path):
    # its one WBC was scored twice: as the image's single cell and as the boxed cell
    (tmp_path / "t.csv").write_text("image,class,x,y,width,height\na.jpg,neutrophil,,,,\n"
                                    "a.jpg,neutrophil,10,10,50,50\n")
    with pytest.raises(TruthError, match="'a.jpg' has a row with a class and no box"):
        load_truth(tmp_path / "t.csv", READERS)


def test_several_fit_names_the_truth_names_that_tie_and_key_for_takes_none():
    truth = TruthSet({"A/f1.png": ImageTruth(cls="neutrophil"), "B/f1.png": ImageTruth(cls="monocyte"),
                      "B/f2.png": ImageTruth(cls="basophil"), "A/f3.png": ImageTruth(cls="basophil"),
                      "B/f3.png": ImageTruth(cls="basophil")})
    assert truth.key_for("f1.png") is None and truth.several_fit("f1.png") == ["A/f1.png", "B/f1.png"]
    assert truth.key_for("f2.png") == "B/f2.png" and truth.several_fit("f2.png") == []
    assert truth.several_fit("A/f1.png") == [] and truth.several_fit("nothing.png") == []
    assert truth.several_fit_note(["f2.png", "nothing.png"]) == ""
    note = truth.several_fit_note(["f1.png", "f2.png", "f3.png"])
    many = truth.several_fit_note(["f1.png", "f3.png"] + [f"x{i}.png" for i in range(300)])
    assert "and 1 more of the first 200 image(s) fit several" in many
    assert note.startswith("f1.png fits 2 truth names (A/f1.png, B/f1.png), and 1 more image(s)")


def test_a_csv_with_excels_sep_line_is_read_with_its_lines_counted_from_the_file(tmp_path):
    # a lab's export starting with Excel's `sep=;` was refused ("found ['sep=', '']")
    t = tmp_path / "t.csv"
    t.write_text("sep=;\r\nimage;class;x;y;width;height\r\na.png;NEU;1;1;5;5\r\n"
                 "a.png;NEU;1;1;5;abc\r\n", encoding="utf-8-sig")
    with pytest.raises(TruthError, match=r"^t.csv line 4: box \['1', '1', '5', 'abc'\]"):
        load_truth(t, READERS)
    for sep in ("sep=;", "SEP=;", '"sep=;"', "sep=;;"):  # also as a spreadsheet saved it back
        t.write_text(f"{sep}\nimage;class\na.png;NEU\n")
        assert load_truth(t, READERS)["a.png"].cls == "neutrophil", sep
    from wbc_batch.truth import select_split

    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "s.csv").write_text("sep=;\nimage;split\na.png;val\n")
    assert select_split(tmp_path / "s.csv", "val", tmp_path) == [tmp_path / "a.png"]
