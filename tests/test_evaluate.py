"""`wbc-batch evaluate` end to end through the CLI, with the fake backend of tests/conftest.py.

Most tests also replace the per-image compute (`Runner.process_array`) by a rule any reader can
check: dark pixels are the WBC (gray < 150 cytoplasm, < 60 nucleus), one cell per image, its
class looked up in `FAKE_CLASSES`; so the expected accuracy is known exactly. The last two go
through the real analysis with the fake backend.
"""

import csv
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from wbc_batch import CLASSES
from wbc_batch.cli import build_cli
from wbc_batch.results import CellResult, ImageAnalysis

FAKE_CLASSES = {}  # image name -> class the fake analysis answers (default: neutrophil)


def fake_process_array(self, rgb, rel):
    gray = rgb.mean(axis=2)
    mask = np.where(gray < 60, 255, np.where(gray < 150, 128, 0)).astype(np.uint8)
    labels = (mask > 0).astype(np.int32)
    cells = []
    if labels.any():
        ys, xs = np.nonzero(labels)
        cls = FAKE_CLASSES.get(rel, "neutrophil")
        probs = tuple(0.9 if c == cls else 0.025 for c in CLASSES)
        cells.append(CellResult(cell_id=1, cls=cls, confidence=0.9, probs=probs, x=int(xs.min()),
                                y=int(ys.min()), width=int(xs.max() - xs.min() + 1),
                                height=int(ys.max() - ys.min() + 1), area_px=int(labels.sum()),
                                nucleus_area_px=int((mask == 255).sum()), needs_review=False))
    analysis = ImageAnalysis(cells=cells, cell_labels=labels, mask=mask, diameter_px=20.0, scale=1.0)
    return analysis.to_result(rel, 0.01), analysis


@pytest.fixture
def cli(monkeypatch, pm, fake_cli_args):
    """invoke(*args): `wbc-batch ...` with the shared fake backend and the fake analysis above."""
    import wbc_batch.pipeline

    monkeypatch.setattr(wbc_batch.pipeline.Runner, "process_array", fake_process_array)
    FAKE_CLASSES.clear()
    group = build_cli(pm)

    def invoke(*args):
        return CliRunner().invoke(group, [str(a) for a in args] + list(fake_cli_args),
                                  catch_exceptions=False)

    return invoke


def draw(path: Path, box, size=(40, 40), nucleus=True):
    """A pale field with one dark square 'cell' at box (x, y, w, h); returns its truth mask."""
    img = np.full((size[1], size[0], 3), 220, np.uint8)
    mask = np.zeros((size[1], size[0]), np.uint8)
    x, y, w, h = box
    img[y:y + h, x:x + w] = 100
    mask[y:y + h, x:x + w] = 128
    if nucleus:
        img[y + 2:y + h - 2, x + 2:x + w - 2] = 30
        mask[y + 2:y + h - 2, x + 2:x + w - 2] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, data = cv2.imencode(path.suffix, img)
    path.write_bytes(data.tobytes())
    return mask


def make_wbc_dataset(root: Path):
    rows = []
    labels = []
    for i, split in enumerate(("test", "test", "val", "val"), start=1):
        name = f"Dataset 2/{i:03d}"
        mask = draw(root / f"{name}.bmp", (5 + i, 5, 12, 12))
        cv2.imwrite(str(root / f"{name}.png"), mask)
        rows.append((f"{name}.bmp", f"{name}.png", 2, "neutrophil", 0, split))
        labels.append(f"{i},1")
    (root / "Class Labels of Dataset 2.csv").write_text("image ID,class\n" + "\n".join(labels) + "\n")
    split_file = root.parent / "split.csv"
    with open(split_file, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(("image", "mask", "dataset", "class", "fold", "split"))
        w.writerows(rows)
    return split_file


def read_accuracy(out: Path) -> dict:
    with open(out / "accuracy.csv", newline="") as fh:
        return {(r["section"], r["scope"], r["metric"]): r["value"] for r in csv.DictReader(fh)}


def test_run_leaves_out_the_truth_masks_kept_beside_the_images(cli, tmp_path, caplog):
    data = tmp_path / "wbc"
    make_wbc_dataset(data)  # Dataset 2/001.bmp beside its mask Dataset 2/001.png
    out = tmp_path / "out"
    res = cli("run", data, "--truth", data, "-o", out, "--no-overlays", "--report", "csv")
    assert res.exit_code == 0, res.output
    assert ("4 file(s) of the input are the ground truth's masks (Dataset 2/001.png, ...) and are "
            "not analysed") in caplog.text
    with open(out / "images.csv", newline="") as fh:
        assert [r["image"] for r in csv.DictReader(fh)] == [f"Dataset 2/{i:03d}.bmp" for i in range(1, 5)]
    acc = read_accuracy(out)
    assert acc[("summary", "run", "images")] == acc[("summary", "run", "images_with_truth")] == "4"
    assert acc[("summary", "run", "images_failed")] == "0"
    res = cli("run", data, "-o", tmp_path / "plain", "--no-overlays", "--report", "csv")
    with open(tmp_path / "plain" / "images.csv", newline="") as fh:  # no truth: nothing is a mask
        assert len(list(csv.DictReader(fh))) == 8
    # evaluate on the dataset's folder (--split FOLDER, no split file) leaves them out too
    res = cli("evaluate", data, "--truth", data, "--split", "Dataset 2", "-o", tmp_path / "ev",
              "--no-overlays", "--report", "csv")
    assert res.exit_code == 0, res.output
    assert "evaluate: 4 image(s) (folder Dataset 2)" in res.output
    # another run holds OUT: its refusal is the only thing said, not the masks left out
    from wbc_batch.output_folder import lock_output

    held = lock_output(tmp_path / "held")
    try:
        caplog.clear()
        for command in ("run", "evaluate"):
            res = cli(command, data, "--truth", data, "-o", tmp_path / "held", "--report", "csv")
            assert res.exit_code == 2 and "another wbc-batch run, watch or training" in res.output
            assert "ground truth's masks" not in caplog.text + res.output
    finally:
        held.close()


def test_evaluate_split_pixels_and_classes(cli, tmp_path):
    data = tmp_path / "wbc"
    split_file = make_wbc_dataset(data)
    FAKE_CLASSES["Dataset 2/004.bmp"] = "monocyte"
    out = tmp_path / "out"
    res = cli("evaluate", data, "--truth", data, "--split-file", split_file, "--split", "val",
              "-o", out, "--no-overlays", "--quiet")
    assert res.exit_code == 0, res.output
    with open(out / "images.csv", newline="") as fh:
        assert sorted(r["image"] for r in csv.DictReader(fh)) == ["Dataset 2/003.bmp",
                                                                  "Dataset 2/004.bmp"]
    acc = read_accuracy(out)
    assert float(acc[("summary", "pixels_wbc", "iou")]) == 1.0
    assert float(acc[("summary", "pixels_nucleus", "recall")]) == 1.0
    assert float(acc[("summary", "classes", "accuracy")]) == 0.5
    assert "whole WBC" in res.output and "100.00%" in res.output
    assert "accuracy 50.00%" in res.output
    from openpyxl import load_workbook

    assert "Accuracy" in load_workbook(out / "report.xlsx").sheetnames
    # the truth of the other splits is no "unmatched" entry
    assert ("summary", "run", "truth_entries_unmatched") not in acc
    import json

    assert json.loads((out / "run.json").read_text())["truth_unmatched"] == []


def test_evaluate_where_filters_split_rows(cli, tmp_path):
    data = tmp_path / "wbc"
    split_file = make_wbc_dataset(data)
    text = split_file.read_text().replace("Dataset 2/001.bmp,Dataset 2/001.png,2,",
                                          "Dataset 2/001.bmp,Dataset 2/001.png,1,")
    split_file.write_text(text)
    out = tmp_path / "out"
    res = cli("evaluate", data, "--truth", data, "--split-file", split_file, "--split", "test",
              "--where", "dataset=2", "-o", out, "--no-overlays",
              "--report", "csv")
    assert res.exit_code == 0, res.output
    assert "1 image(s) (split 'test', dataset=2 of split.csv)" in res.output
    res = cli("evaluate", data, "--truth", data, "--split-file", split_file, "--split", "test",
              "--where", "nope=1", "-o", tmp_path / "o2")
    assert res.exit_code == 2 and "no column 'nope'" in res.output


def test_evaluate_split_file_needs_an_explicit_split(cli, tmp_path):
    data = tmp_path / "wbc"
    split_file = make_wbc_dataset(data)
    res = cli("evaluate", data, "--truth", data, "--split-file", split_file, "-o", tmp_path / "o")
    assert res.exit_code == 2 and "needs --split" in res.output


def test_evaluate_without_split_takes_only_images_with_truth(cli, tmp_path):
    data = tmp_path / "wbc"
    make_wbc_dataset(data)
    out = tmp_path / "out"
    res = cli("evaluate", data, "--truth", data, "-o", out, "--no-overlays",
              "--report", "csv", "--quiet")
    assert res.exit_code == 0, res.output
    with open(out / "images.csv", newline="") as fh:
        names = [r["image"] for r in csv.DictReader(fh)]
    assert len(names) == 4 and all(n.endswith(".bmp") for n in names)  # never the masks


def test_evaluate_yolo_folder_split_and_a_broken_image(cli, tmp_path):
    root = tmp_path / "txl"
    draw(root / "images" / "test" / "a.png", (10, 10, 10, 10))
    draw(root / "images" / "test" / "b.png", (2, 2, 8, 8))
    (root / "images" / "test" / "c.png").write_bytes(b"not an image")
    draw(root / "images" / "val" / "v.png", (2, 2, 8, 8))
    labels = root / "labels" / "test"
    labels.mkdir(parents=True)
    (labels / "a.txt").write_text("0 0.375 0.375 0.25 0.25\n1 0.9 0.9 0.1 0.1\n")  # matches
    (labels / "b.txt").write_text("0 0.8 0.8 0.2 0.2\n")                        # missed + FP
    (labels / "c.txt").write_text("0 0.5 0.5 0.2 0.2\n")                        # failed image
    out = tmp_path / "out"
    res = cli("evaluate", root / "images", "--truth", labels, "--split", "test", "-o", out,
              "--no-overlays", "--report", "csv", "--quiet")
    assert res.exit_code == 1, res.output  # one image failed
    acc = read_accuracy(out)
    assert float(acc[("summary", "detection", "recall")]) == pytest.approx(1 / 3)
    assert float(acc[("summary", "detection", "precision")]) == pytest.approx(1 / 2)
    assert "1 failed, scored as finding nothing" in res.output


def test_evaluate_with_no_matching_truth_is_a_usage_error(cli, tmp_path):
    draw(tmp_path / "imgs" / "x.png", (2, 2, 8, 8))
    (tmp_path / "t.csv").write_text("image,class\nother.png,neutrophil\n")
    res = cli("evaluate", tmp_path / "imgs", "--truth", tmp_path / "t.csv", "--split", "nope",
              "-o", tmp_path / "out")
    assert res.exit_code == 2 and "INPUT/NAME" not in res.output and "nope" in res.output
    res = cli("evaluate", tmp_path / "imgs", "--truth", tmp_path / "t.csv", "-o", tmp_path / "out")
    assert res.exit_code == 2 and "no image to evaluate" in res.output


def test_run_with_truth_counts_a_copy_the_truth_does_not_name_once(cli, tmp_path):
    # `run --truth` over a folder with more images than the truth names analysed and counted a
    # byte copy of a scored image (s2/a again.png, s1/d.png) as cells of its own, which plain
    # `run` counts once
    import pandas as pd

    imgs = tmp_path / "imgs"
    draw(imgs / "s1" / "a.png", (2, 2, 8, 8))
    draw(imgs / "s1" / "c.png", (4, 4, 12, 12))
    for copy, of in (("s0/copy of a.png", "s1/a.png"), ("s2/a again.png", "s1/a.png"),
                     ("s1/d.png", "s1/c.png"), ("s3/a.png", "s1/a.png")):
        (imgs / copy).parent.mkdir(parents=True, exist_ok=True)
        (imgs / copy).write_bytes((imgs / of).read_bytes())
    (tmp_path / "t.csv").write_text("image,class\ns1/a.png,neutrophil\ns3/a.png,neutrophil\n")
    out = tmp_path / "out"
    res = cli("run", imgs, "--truth", tmp_path / "t.csv", "-o", out, "--no-overlays", "--report", "csv")
    assert res.exit_code == 0, res.output
    status = dict(pd.read_csv(out / "images.csv")[["image", "status"]].itertuples(index=False))
    # every image the truth names is scored and counted, also where it copies an earlier file
    # (s1/a.png, s3/a.png); the others that copy an earlier file are duplicates, as without truth
    assert status == {"s0/copy of a.png": "ok", "s1/a.png": "ok", "s1/c.png": "ok",
                      "s1/d.png": "duplicate", "s2/a again.png": "duplicate", "s3/a.png": "ok"}
    assert float(read_accuracy(out)[("summary", "run", "images_with_truth")]) == 2
    plain = tmp_path / "plain"
    assert cli("run", imgs, "-o", plain, "--no-overlays", "--report", "csv").exit_code == 0
    counted = pd.read_csv(plain / "images.csv").query("status == 'ok'")["image"].tolist()
    assert counted == ["s0/copy of a.png", "s1/c.png"]  # without truth: the first of each content


def test_a_name_a_mac_wrote_decomposed_finds_its_truth_typed_composed(cli, tmp_path):
    # café.png on disk as "cafe" + a combining accent (macOS), café.png in the CSV as typed: the
    # two look alike, and the image was analysed but never scored, its truth "matching no image"
    import unicodedata

    nfd, nfc = (unicodedata.normalize(form, "café") for form in ("NFD", "NFC"))
    assert nfd != nfc
    try:
        draw(tmp_path / "imgs" / f"{nfd}.png", (2, 2, 8, 8))
    except OSError:
        pytest.skip("this file system cannot hold a decomposed name")
    if {p.name for p in (tmp_path / "imgs").iterdir()} != {f"{nfd}.png"}:
        pytest.skip("this file system composes names itself")
    (tmp_path / "t.csv").write_text(f"image,class\n{nfc}.png,neutrophil\n", encoding="utf-8")
    out = tmp_path / "out"
    res = cli("evaluate", tmp_path / "imgs", "--truth", tmp_path / "t.csv", "-o", out,
              "--no-overlays", "--report", "csv")
    assert res.exit_code == 0, res.output
    acc = read_accuracy(out)
    assert float(acc[("summary", "run", "images_with_truth")]) == 1
    assert ("summary", "run", "truth_entries_unmatched") not in acc


def test_evaluate_names_truth_without_image_and_truth_several_images_reach(cli, tmp_path, caplog):
    for sample in ("A", "B"):
        draw(tmp_path / "imgs" / sample / "f1.png", (2, 2, 8, 8))
    draw(tmp_path / "imgs" / "B" / "f2.png", (2, 2, 8, 8))
    (tmp_path / "t.csv").write_text("image,class\nf1.png,neutrophil\nB/f2.png,monocyte\n"
                                    "B/gone.png,basophil\n")
    out = tmp_path / "out"
    res = cli("evaluate", tmp_path / "imgs", "--truth", tmp_path / "t.csv", "-o", out,
              "--no-overlays", "--report", "csv")
    assert res.exit_code == 0, res.output
    assert "1 of 3 ground-truth entries match no image and are not scored: B/gone.png" in res.output
    assert "2 of 3 image(s) have no ground truth and are not scored: A/f1.png, B/f1.png" in res.output
    assert "truth f1.png matches 2 images (A/f1.png, B/f1.png): none of them is scored" in caplog.text
    acc = read_accuracy(out)
    assert float(acc[("summary", "run", "images_with_truth")]) == 1  # B/f2.png alone
    # the saved reports say so too (f1.png, which two images reach, is named on its own)
    assert float(acc[("summary", "run", "truth_entries_unmatched")]) == 1
    import json

    assert json.loads((out / "run.json").read_text())["truth_unmatched"] == ["B/gone.png"]
    # and f1.png, scored against neither image (only the terminal said so before)
    assert float(acc[("summary", "run", "truth_entries_ambiguous")]) == 1
    assert json.loads((out / "run.json").read_text())["truth_ambiguous"] == \
        {"f1.png": ["A/f1.png", "B/f1.png"]}


def test_evaluate_leaves_out_an_image_whose_truth_another_image_matches_exactly(cli, tmp_path):
    # before: F1.PNG beside f1.png (a link, a copy under another case) was chosen by the loose
    # match, then found no truth of its own: analysed, not scored, and its cells counted again
    draw(tmp_path / "imgs" / "A" / "f1.png", (2, 2, 8, 8))
    (tmp_path / "imgs" / "A" / "F1.PNG").symlink_to(tmp_path / "imgs" / "A" / "f1.png")
    draw(tmp_path / "imgs" / "A" / "F2.PNG", (2, 2, 8, 8))  # alone: its truth, spelled f2.png
    (tmp_path / "t.csv").write_text("image,class\nA/f1.png,neutrophil\nA/f2.png,monocyte\n")
    out = tmp_path / "out"
    res = cli("evaluate", tmp_path / "imgs", "--truth", tmp_path / "t.csv", "-o", out,
              "--no-overlays", "--report", "csv")
    assert res.exit_code == 0, res.output
    with open(out / "images.csv", newline="") as fh:
        assert sorted(r["image"] for r in csv.DictReader(fh)) == ["A/F2.PNG", "A/f1.png"]
    assert "have no ground truth" not in res.output
    assert ("Note: 1 image(s) reach ground truth whose name another image has exactly, and are "
            "not evaluated: A/F1.PNG") in res.output
    assert float(read_accuracy(out)[("summary", "run", "images_with_truth")]) == 2


def test_evaluate_says_when_every_image_reaches_truth_only_ambiguously(cli, tmp_path):
    for sample in ("A", "B"):
        draw(tmp_path / "imgs" / sample / "f1.png", (2, 2, 8, 8))
    (tmp_path / "t.csv").write_text("image,class\nf1.png,neutrophil\n")
    res = cli("evaluate", tmp_path / "imgs", "--truth", tmp_path / "t.csv", "-o", tmp_path / "out")
    assert res.exit_code == 2 and "no image to evaluate" in res.output
    assert "truth f1.png matches 2 images (A/f1.png, B/f1.png)" in res.output
    assert "give the images' folders" in res.output


def test_evaluate_and_run_say_when_each_image_fits_several_truth_names(cli, tmp_path, caplog):
    """The reverse of the case above: the truth names hold the samples' folders, the input is
    one sample's folder, so `f1.png` fits both `A/f1.png` and `B/f1.png`."""
    draw(tmp_path / "imgs" / "A" / "f1.png", (2, 2, 8, 8))
    (tmp_path / "t.csv").write_text("image,class\nA/f1.png,neutrophil\nB/f1.png,monocyte\n")
    res = cli("evaluate", tmp_path / "imgs" / "A", "--truth", tmp_path / "t.csv", "-o",
              tmp_path / "out")
    assert res.exit_code == 2, res.output
    assert f"no image in {tmp_path / 'imgs' / 'A'} matches the ground truth" in res.output
    assert "f1.png fits 2 truth names (A/f1.png, B/f1.png)" in res.output
    assert "give the input folder the truth names are relative to" in res.output
    res = cli("run", tmp_path / "imgs" / "A", "--truth", tmp_path / "t.csv", "-o",
              tmp_path / "run", "--no-overlays", "--report", "csv")
    assert res.exit_code == 0, res.output
    assert ("ground truth found for 0 of 1 images; the others are analysed and reported but not "
            "scored (accuracy.csv: images_with_truth): f1.png fits 2 truth names") in caplog.text
    res = cli("evaluate", tmp_path / "imgs", "--truth", tmp_path / "t.csv", "-o",
              tmp_path / "whole", "--no-overlays", "--report", "csv")
    assert res.exit_code == 0, res.output  # from the folder the names are relative to: scored


def test_run_names_truth_entries_no_image_reached(cli, tmp_path, caplog):
    # the same image spelled in two letter cases: one row is scored, the other is named as
    # that image's (a bare "match no image" named a file the run has, and was dismissed)
    draw(tmp_path / "imgs" / "B" / "f1.png", (2, 2, 8, 8))
    (tmp_path / "t.csv").write_text("image,class,x,y,width,height\n"
                                    "B/f1.png,neutrophil,2,2,8,8\nb/F1.png,monocyte,20,20,8,8\n"
                                    "gone.png,basophil,2,2,8,8\n")
    res = cli("run", tmp_path / "imgs", "--truth", tmp_path / "t.csv", "-o", tmp_path / "out",
              "--no-overlays")
    assert res.exit_code == 0, res.output
    assert ("1 ground-truth entry names an image whose truth is read under another spelling of "
            "its name, and is not scored: b/F1.png, image B/f1.png, scored against the truth of "
            "B/f1.png (give all the rows of one image the same name)") in caplog.text
    assert "1 of 3 ground-truth entries match no image of this run and are not scored (gone.png)" \
        in caplog.text
    res = cli("evaluate", tmp_path / "imgs", "--truth", tmp_path / "t.csv", "-o",
              tmp_path / "eval", "--no-overlays", "--report", "csv")
    assert res.exit_code == 0, res.output
    assert "Warning: 1 ground-truth entry names an image whose truth is read under" in res.output
    assert "1 of 3 ground-truth entries match no image and are not scored: gone.png" in res.output
    # and the saved reports say so too, not only the terminal
    import json

    import openpyxl

    assert json.loads((tmp_path / "out" / "run.json").read_text())["truth_unmatched"] == [
        "b/F1.png", "gone.png"]
    rows = list(csv.reader(open(tmp_path / "out" / "accuracy.csv", newline="", encoding="utf-8")))
    assert [r for r in rows if "truth_entries_unmatched" in r] == [
        ["summary", "run", "truth_entries_unmatched", "2", ""]]
    sheet = openpyxl.load_workbook(tmp_path / "out" / "report.xlsx")["Accuracy"]
    assert any("truth_entries_unmatched" in str(c.value) for row in sheet.iter_rows() for c in row)


def test_an_unreadable_truth_mask_is_named(cli, tmp_path, caplog):
    draw(tmp_path / "imgs" / "f1.png", (2, 2, 8, 8))
    draw(tmp_path / "imgs" / "f2.png", (2, 2, 8, 8))
    cv2.imwrite(str(tmp_path / "m1.png"), np.zeros((32, 32), np.uint8))
    (tmp_path / "t.csv").write_text("image,class,mask\nf1.png,,m1.png\nf2.png,,missing.png\n")
    res = cli("evaluate", tmp_path / "imgs", "--truth", tmp_path / "t.csv", "-o", tmp_path / "out",
              "--no-overlays", "--report", "csv")
    assert res.exit_code == 0, res.output
    assert "f2.png: its truth mask cannot be read" in caplog.text
    assert "left out of the pixel metrics" in caplog.text


# --- through the real analysis, with the shared fake backend (tests/conftest.py) -------------------

def test_evaluate_real_analysis_finds_the_drawn_cells(pm, fake_cli_args, tmp_path):
    from conftest import draw_field, write_image

    cells = {"s1/a.png": [(80, 70, 24), (230, 150, 26)], "s1/b.png": [(160, 120, 30)]}
    truth_rows = ["image,x,y,width,height,class"]
    for name, discs in cells.items():
        rgb = draw_field(320, 240, discs)
        write_image(tmp_path / "in" / name, rgb)
        mask = np.zeros((240, 320), np.uint8)
        for cx, cy, r in discs:
            cv2.circle(mask, (cx, cy), r, 128, -1)
            cv2.circle(mask, (cx, cy), max(1, int(r * 0.5)), 255, -1)
            truth_rows.append(f"{name},{cx - r},{cy - r},{2 * r},{2 * r},")
        (tmp_path / "truth" / "masks" / "s1").mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(tmp_path / "truth" / "masks" / name), mask)
    (tmp_path / "truth" / "truth.csv").write_text("\n".join(truth_rows) + "\n")
    out = tmp_path / "out"
    res = CliRunner().invoke(build_cli(pm), ["evaluate", str(tmp_path / "in"), "--truth",
                                             str(tmp_path / "truth"), "-o", str(out), "--quiet",
                                             "--no-overlays", *fake_cli_args],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    acc = read_accuracy(out)
    assert float(acc[("summary", "detection", "recall")]) == 1.0
    assert float(acc[("summary", "detection", "precision")]) == 1.0
    assert float(acc[("summary", "pixels_wbc", "iou")]) > 0.8
    assert "Cell finding" in res.output and "whole WBC" in res.output


def test_evaluate_sample_data(pm, fake_cli_args, tmp_path):
    """The shipped sample_data and its truth (boxes, classes, masks) evaluate end to end."""
    root = Path(__file__).resolve().parents[1] / "sample_data"
    if not (root / "truth").is_dir():
        pytest.skip("sample_data/truth not generated yet")
    out = tmp_path / "out"
    res = CliRunner().invoke(build_cli(pm), ["evaluate", str(root / "smears"), "--truth",
                                             str(root / "truth"), "-o", str(out), "--quiet",
                                             "--no-overlays", *fake_cli_args],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    acc = read_accuracy(out)
    n_images = len(list((root / "truth" / "masks").rglob("*.png")))
    assert int(float(acc[("summary", "run", "images_with_truth")])) == n_images
    for key in (("summary", "detection", "recall"), ("summary", "pixels_wbc", "iou"),
                ("summary", "classes", "accuracy")):
        assert 0.0 <= float(acc[key]) <= 1.0


@pytest.mark.parametrize("extra", [["--split", "test"], ["--split=train"], ["--where", "dataset=1"],
                                   ["--split-file", "x.csv"]])
def test_the_split_script_refuses_options_that_would_choose_other_rows(extra):
    # `SPLIT=val scripts/evaluate_test_splits.sh --split test` measured test under a val label
    import os
    import subprocess

    script = Path(__file__).resolve().parents[1] / "scripts" / "evaluate_test_splits.sh"
    res = subprocess.run(["bash", str(script), *extra], capture_output=True, text=True,
                         env=dict(os.environ, SPLIT="val", ONLY="wbc2"))
    assert res.returncode == 2 and "is set by this script" in res.stderr


def test_the_split_script_refuses_a_splits_folder_without_the_split_files(tmp_path):
    import os
    import subprocess

    (tmp_path / "data" / "splits").mkdir(parents=True)
    (tmp_path / "unseen").mkdir()
    (tmp_path / "unseen" / "bccd.csv").write_text("image,annotation,labels,split\n")
    script = Path(__file__).resolve().parents[1] / "scripts" / "evaluate_test_splits.sh"
    res = subprocess.run(["bash", str(script)], capture_output=True, text=True,
                         env=dict(os.environ, SPLIT="val", ONLY="bccd",
                                  WBC_BATCH_DATA=str(tmp_path / "data"),
                                  SPLITS=str(tmp_path / "unseen")))
    assert res.returncode == 2
    assert f"no wbc-image-dataset.csv in {tmp_path / 'unseen'}" in res.stderr


def test_evaluate_records_and_names_files_in_formats_not_read(cli, tmp_path):
    # evaluate never filled run.json's not_read, so the Summary said nothing of a WebP field;
    # and a truth whose only image is a WebP said "matches no image" without a word of it
    import json

    from conftest import draw_field, write_image

    data = tmp_path / "in"
    write_image(data / "a.png", draw_field(200, 200, cells=[(100, 100, 30)]))
    ok, webp = cv2.imencode(".webp", draw_field(200, 200, cells=[(100, 100, 30)]))
    (data / "b.webp").write_bytes(webp.tobytes())
    truth = tmp_path / "truth.csv"
    truth.write_text("image,class\na.png,lymphocyte\nb.webp,neutrophil\n")
    res = cli("evaluate", data, "--truth", truth, "-o", tmp_path / "ev", "--report", "csv")
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "ev" / "run.json").read_text())["not_read"] == ["b.webp"]
    (data / "a.png").unlink()
    res = cli("evaluate", data, "--truth", truth, "-o", tmp_path / "ev2", "--report", "csv")
    assert res.exit_code == 2
    assert "1 file(s) in formats that are not read were left out, such as b.webp" in res.output
