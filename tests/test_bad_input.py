"""Issue #2 section 8: bad input gives a clear message and loses nothing.

Each case runs the real command line (in-process) with the fake backend."""

import cv2
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from wbc_batch.cli import build_cli
from wbc_batch.reports import SUMMARY_COLUMNS

from conftest import draw_field, encode, fail_decoding, standard_field, write_image


@pytest.fixture
def run_cli(pm, fake_cli_args):
    def call(input_dir, out, *extra):
        args = ["run", str(input_dir), "-o", str(out), *fake_cli_args, "--report", "csv", *extra]
        return CliRunner().invoke(build_cli(pm), args, catch_exceptions=False)

    return call


def images_table(out):
    return pd.read_csv(out / "images.csv", keep_default_na=False).set_index("image")


def test_empty_folder(run_cli, tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "readme.txt").write_text("no images here")
    out = tmp_path / "out"
    res = run_cli(tmp_path / "in", out)
    assert res.exit_code == 0
    assert "No images found" in res.stderr
    assert (out / "cells.csv").read_text(encoding="utf-8").startswith("image,cell_id,class,confidence")
    assert len(pd.read_csv(out / "cells.csv")) == 0
    assert len(pd.read_csv(out / "images.csv")) == 0
    assert list(pd.read_csv(out / "summary.csv").columns) == list(SUMMARY_COLUMNS)
    assert "it holds wbc-batch results" not in res.stderr
    # an earlier run's OUT given as INPUT: its overlays are never analysed, and that is said
    res = run_cli(out, tmp_path / "again")
    assert res.exit_code == 0 and "No images found" in res.stderr
    assert "it holds wbc-batch results, whose overlays/ and masks/ are never analysed" in res.stderr


def test_missing_folder_is_a_usage_error(run_cli, tmp_path):
    res = run_cli(tmp_path / "does-not-exist", tmp_path / "out")
    assert res.exit_code == 2 and "input folder not found" in res.output
    assert not (tmp_path / "out").exists()


def test_broken_files_are_rows_with_reasons(run_cli, tmp_path):
    root = tmp_path / "in"
    write_image(root / "good.png", standard_field())
    (root / "zero.jpg").write_bytes(b"")
    full = encode(standard_field(), ".jpg")
    (root / "truncated.jpg").write_bytes(full[: len(full) * 2 // 3])
    (root / "text.png").write_text("hello, I am a text file\n", encoding="utf-8")
    (root / "started.tif").write_bytes(b"II*\x00\x08\x00")  # a scanner's TIFF cut in its header
    out = tmp_path / "out"
    res = run_cli(root, out)
    assert res.exit_code == 1
    table = images_table(out)
    assert table.loc["good.png", "status"] == "ok" and int(table.loc["good.png", "wbc_count"]) == 3
    assert table.loc["zero.jpg", "error"] == "empty file (0 bytes)"
    assert table.loc["truncated.jpg", "error"] == "truncated JPEG (no end-of-image marker)"
    assert table.loc["text.png", "error"].startswith("not an image file")
    assert table.loc["started.tif", "error"] == "truncated TIFF (6 bytes, cut off inside its header)"
    bad = ["zero.jpg", "truncated.jpg", "text.png", "started.tif"]
    assert (table.loc[bad, "status"] == "error").all()
    for name in bad:
        assert f"failed: {name}: " in res.stderr


def test_a_reader_failing_in_an_unforeseen_way_fails_that_image_alone(run_cli, tmp_path,
                                                                     monkeypatch):
    import wbc_batch.pipeline as pipeline

    root = tmp_path / "in"
    write_image(root / "a.png", standard_field())
    write_image(root / "b.png", standard_field(variant=1))  # other bytes: decoded as ever
    fail_decoding(monkeypatch, pipeline, root / "a.png", RuntimeError("decoder bug"))
    out = tmp_path / "out"
    res = run_cli(root, out)
    assert res.exit_code == 1
    table = images_table(out)
    assert table.loc["a.png", "error"] == "cannot read the image: RuntimeError: decoder bug"
    assert table.loc["b.png", "status"] == "ok"


def test_16bit_gray_and_rgba(run_cli, tmp_path):
    root = tmp_path / "in"
    root.mkdir()
    rgb = draw_field(240, 200, [(120, 100, 24)])
    bgr16 = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR).astype(np.uint16) * 257
    assert cv2.imwrite(str(root / "sixteen.tif"), bgr16)
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    assert cv2.imwrite(str(root / "gray.png"), gray)
    bgra = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGRA)
    bgra[:20, :20, 3] = 0  # a transparent corner
    assert cv2.imwrite(str(root / "rgba.png"), bgra)
    out = tmp_path / "out"
    res = run_cli(root, out)
    assert res.exit_code == 0, res.output
    table = images_table(out)
    assert (table["status"] == "ok").all()
    assert table.loc["sixteen.tif", "wbc_count"] == 1 and table.loc["rgba.png", "wbc_count"] == 1
    assert table.loc["gray.png", "wbc_count"] == 1
    assert (table["width"] == 240).all() and (table["height"] == 200).all()


def test_an_image_too_small_for_a_wbc_fails_with_the_reason_and_the_rest_go_on(run_cli, tmp_path):
    """A one-pixel image (a thumbnail, an icon) is not reported as a field without WBCs."""
    root = tmp_path / "in"
    write_image(root / "dot.png", np.full((1, 1, 3), 200, np.uint8))
    write_image(root / "strip.png", np.full((20, 640, 3), 200, np.uint8))
    write_image(root / "field.png", draw_field(320, 240, [(160, 120, 40)]))
    out = tmp_path / "out"
    res = run_cli(root, out, "--save-masks")
    assert res.exit_code == 1, res.output
    table = images_table(out)
    assert table.loc["dot.png", "status"] == "error" and "1x1 px" in table.loc["dot.png", "error"]
    assert "too small to hold a WBC (640x20 px" in table.loc["strip.png", "error"]
    assert table.loc["field.png", "status"] == "ok"
    assert not (out / "masks" / "dot.png.png").exists()


def test_glass_is_a_field_without_wbcs_and_without_a_wbc_size(run_cli, tmp_path):
    """A scanner's field of bare glass, with noise or dust, is `ok` with no WBC and no WBC size
    (an all-grey image had been given the image's width, dust had been taken for WBCs)."""
    import cv2

    root, rng = tmp_path / "in", np.random.default_rng(0)
    glass = np.clip(228 + 5 * rng.normal(0, 1, (240, 320, 3)), 0, 255).astype(np.uint8)
    write_image(root / "glass.png", glass)
    for x, y in ((40, 50), (200, 100), (280, 200)):
        cv2.circle(glass, (x, y), 3, (60, 60, 60), -1)
    write_image(root / "dust.png", glass)
    write_image(root / "grey.png", np.full((240, 320, 3), 128, np.uint8))
    write_image(root / "black.png", np.zeros((240, 320, 3), np.uint8))
    write_image(root / "field.png", draw_field(320, 240, [(160, 120, 40)]))
    out = tmp_path / "out"
    res = run_cli(root, out)
    assert res.exit_code == 0, res.output
    table = images_table(out)
    for name in ("glass.png", "dust.png", "grey.png", "black.png"):
        assert table.loc[name, "status"] == "ok" and table.loc[name, "wbc_count"] == 0
        assert table.loc[name, "wbc_diameter_px"] == ""
    assert table.loc["field.png", "status"] == "ok" and table.loc["field.png", "wbc_count"] == 1


def test_a_stack_a_broken_link_and_a_webp_are_rows_with_reasons(run_cli, tmp_path):
    """Files a lab's other tools leave in a folder: none is silently cut short or left out."""
    import os

    root = tmp_path / "in"
    write_image(root / "field.png", standard_field())
    bgr = cv2.cvtColor(standard_field(), cv2.COLOR_RGB2BGR)
    assert cv2.imwritemulti(str(root / "focus_stack.tif"), [bgr, bgr])
    os.symlink(tmp_path / "share" / "x.png", root / "on_share.png")
    ok, webp = cv2.imencode(".webp", bgr)
    assert ok
    (root / "export.png").write_bytes(webp.tobytes())
    out = tmp_path / "out"
    res = run_cli(root, out)
    assert res.exit_code == 1, res.output
    table = images_table(out)
    assert table.loc["field.png", "status"] == "ok" and int(table.loc["field.png", "wbc_count"]) == 3
    assert table.loc["focus_stack.tif", "error"].startswith("multi-page TIFF with 2 full-size pages")
    assert table.loc["on_share.png", "error"].startswith("broken link: its target")
    assert table.loc["export.png", "error"].startswith("the content is WebP, which is not read")


def test_files_in_formats_not_read_are_counted_in_run_json_and_the_summary_sheet(run_cli, tmp_path):
    """A lab reading only report.xlsx (a run from cron) sees that a WebP field was not read."""
    import json

    import openpyxl

    root = tmp_path / "in"
    write_image(root / "s1" / "field.png", standard_field())
    ok, webp = cv2.imencode(".webp", cv2.cvtColor(standard_field(), cv2.COLOR_RGB2BGR))
    (root / "s1" / "field2.webp").write_bytes(webp.tobytes())
    out = tmp_path / "out"
    res = run_cli(root, out, "--report", "xlsx")
    assert res.exit_code == 0, res.output
    assert json.loads((out / "run.json").read_text())["not_read"] == ["s1/field2.webp"]
    rows = list(openpyxl.load_workbook(out / "report.xlsx")["Summary"].iter_rows(values_only=True))
    assert ("files in formats not read", 1) in [r[:2] for r in rows]


def test_a_folder_of_images_only_in_formats_not_read_fails_the_run(run_cli, tmp_path):
    """A scanner set to WebP: nothing is analysed. The run had exited 0 with empty reports, so a
    lab's script took it for a folder without images; beside PNGs (above) the code stays 0."""
    import json

    root = tmp_path / "in"
    ok, webp = cv2.imencode(".webp", cv2.cvtColor(standard_field(), cv2.COLOR_RGB2BGR))
    for name in ("s1/a.webp", "s1/b.webp"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(webp.tobytes())
    out = tmp_path / "out"
    res = run_cli(root, out)
    assert res.exit_code == 1, res.output
    assert "2 file(s) in formats that are not read were left out (above), so the run fails" in res.output
    assert json.loads((out / "run.json").read_text())["not_read"] == ["s1/a.webp", "s1/b.webp"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_cli(empty, tmp_path / "out2").exit_code == 0  # no image at all: as before
    res = run_cli(root, tmp_path / "out3", "--quiet")  # why it fails is said with -q too
    assert res.exit_code == 1
    assert ("no image analysed: 2 file(s) in formats that are not read, such as s1/a.webp "
            "(run.json: not_read)") in res.output


def test_a_sample_folder_behind_a_missing_link_fails_the_run_and_is_named(run_cli, tmp_path):
    import json
    import os

    root = tmp_path / "in"
    write_image(root / "s1" / "field.png", standard_field())
    os.symlink(tmp_path / "share_not_mounted" / "s2", root / "s2")
    out = tmp_path / "out"
    res = run_cli(root, out)
    assert res.exit_code == 1, res.output
    assert f"left out: {root / 's2'}: link to {tmp_path / 'share_not_mounted' / 's2'}" in res.output
    info = json.loads((out / "run.json").read_text())
    assert [item["path"] for item in info["left_out"]] == [str(root / "s2")]
    assert list(images_table(out).index) == ["s1/field.png"]


def test_an_output_folder_inside_the_input_holding_smears_is_refused(run_cli, tmp_path):
    root = tmp_path / "in"
    write_image(root / "s1" / "field_01.png", standard_field())
    write_image(root / "field_02.png", standard_field())
    res = run_cli(root, root / "s1")
    assert res.exit_code == 2
    assert "holds 1 image(s) of its own (field_01.png)" in res.output
    assert not (root / "s1" / "run.json").exists()
    assert run_cli(root, root / "results").exit_code == 0  # a new folder inside INPUT is fine
    assert run_cli(root, root / "results", "--overwrite").exit_code == 0  # and so are its overlays


def test_12000_by_9000_image_is_processed(run_cli, tmp_path):
    root = tmp_path / "in"
    # WBCs covering 0.8 % of it (under 0.5 % it would be glass with dust: `analysis.field_cover`)
    big = draw_field(12000, 9000, [(3000, 3000, 300), (8000, 6000, 300), (6000, 2000, 300)])
    write_image(root / "big.jpg", big, params=(cv2.IMWRITE_JPEG_QUALITY, 90))
    del big
    out = tmp_path / "out"
    res = run_cli(root, out, "--no-overlays")
    assert res.exit_code == 0, res.output
    table = images_table(out)
    assert table.loc["big.jpg", "status"] == "ok"
    assert (table.loc["big.jpg", "width"], table.loc["big.jpg", "height"]) == (12000, 9000)
    assert table.loc["big.jpg", "wbc_count"] == 3


def test_unicode_and_spaces_in_names(run_cli, tmp_path):
    root = tmp_path / "Eingang Ü"
    write_image(root / "Probe 1 ß" / "Blut ausstrich é.png", standard_field())
    write_image(root / "=HYPERLINK(1).png", standard_field(variant=1))
    out = tmp_path / "Ergebnis ä"
    res = run_cli(root, out)
    assert res.exit_code == 0, res.output
    cells = pd.read_csv(out / "cells.csv")
    assert "Probe 1 ß/Blut ausstrich é.png" in set(cells["image"])
    assert "'=HYPERLINK(1).png" in set(cells["image"])  # neutralised against formula injection
    assert (out / "overlays" / "Probe 1 ß" / "Blut ausstrich é.png.png").is_file()
    summary = pd.read_csv(out / "summary.csv")
    assert "Probe 1 ß" in set(summary["sample"])


def test_an_output_folder_that_cannot_be_written_is_a_usage_error_before_any_analysis(
        run_cli, tmp_path):
    write_image(tmp_path / "in" / "a.png", standard_field())
    blocker = tmp_path / "file"
    blocker.write_text("a file where the output's parent folder should be")
    res = run_cli(tmp_path / "in", blocker / "out")
    assert res.exit_code == 2
    assert f"cannot write to the output folder {blocker / 'out'}" in res.output
    assert "Done:" not in res.output


def test_output_inside_input(run_cli, tmp_path):
    root = tmp_path / "in"
    write_image(root / "s1" / "a.png", standard_field())
    out = root / "results"
    assert run_cli(root, out).exit_code == 0
    # a second run does not pick up the first run's overlays as input images
    res = run_cli(root, out, "--overwrite")
    assert res.exit_code == 0
    assert list(images_table(out).index) == ["s1/a.png"]
    assert "1 image(s) in" in res.stderr


def test_output_that_already_holds_results(run_cli, tmp_path):
    root = tmp_path / "in"
    write_image(root / "a.png", standard_field())
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert run_cli(root, out).exit_code == 0  # a folder without results is fine
    before = (out / "cells.csv").read_bytes()
    res = run_cli(root, out)
    assert res.exit_code == 2
    assert "already holds results" in res.output and "--overwrite" in res.output
    assert (out / "cells.csv").read_bytes() == before  # nothing touched
    res = run_cli(root, out, "--overwrite")
    assert res.exit_code == 0
    assert (out / "notes.txt").read_text() == "mine"  # --overwrite deletes nothing else
