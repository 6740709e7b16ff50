"""The pipeline core with the fake backend: results, files, hooks, failures, run.json."""

import asyncio
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import openpyxl
import pandas as pd
import pytest

from wbc_batch.config import AnalysisParams
from wbc_batch.hookspecs import hookimpl
from wbc_batch.output_folder import artifact_path, earlier_reports, holds_results
from wbc_batch.pipeline import PipelineError, ReportError, Runner, open_session, run
from wbc_batch.results import ImageAnalysis, ImageResult

from conftest import (FakeSession, draw_field, opened_only_by_read_bytes, register_writers, standard_field,
                      write_image)


def test_run_end_to_end(pm, make_config, image_folder, tmp_path):
    out = tmp_path / "out"
    outcome = run(make_config(image_folder, out, save_masks=True), pm)
    assert outcome.exit_code == 0
    assert [r.image for r in outcome.results] == ["s1/a.png", "s1/b.jpg", "s2/c.png", "top.png"]
    assert [len(r.cells) for r in outcome.results] == [3, 3, 1, 0]
    assert all(r.ok and r.width and r.height for r in outcome.results)
    for name in ("cells.csv", "images.csv", "summary.csv", "run.json"):
        assert (out / name).is_file()
    cells = pd.read_csv(out / "cells.csv")
    assert len(cells) == 7 and set(cells["image"]) == {"s1/a.png", "s1/b.jpg", "s2/c.png"}
    for rel in ("s1/a.png", "s1/b.jpg", "s2/c.png", "top.png"):
        overlay = cv2.imread(str(artifact_path(out, "overlays", rel)))
        mask = cv2.imread(str(artifact_path(out, "masks", rel)), cv2.IMREAD_UNCHANGED)
        src = cv2.imread(str(image_folder / rel))
        assert overlay.shape == src.shape
        assert mask.dtype == np.uint8 and mask.shape == src.shape[:2]
        assert set(np.unique(mask)) <= {0, 128, 255}
    mask = cv2.imread(str(out / "masks" / "s2" / "c.png.png"), cv2.IMREAD_UNCHANGED)
    assert mask[100, 150] == 255 and mask[100, 150 + 17] == 128 and mask[5, 5] == 0
    # no temporary files are left behind; the folder is marked as results, with the images the
    # run set out to draw (for a later --overwrite)
    assert sorted(p.name for p in out.rglob(".*")) == [".wbc-batch-images.json",
                                                        ".wbc-batch-results", ".wbc-batch.lock"]
    assert json.loads((out / ".wbc-batch-images.json").read_text()) == [
        "s1/a.png", "s1/b.jpg", "s2/c.png", "top.png"]


def test_run_json(pm, make_config, image_folder, tmp_path, fake_bundle):
    out = tmp_path / "out"
    run(make_config(image_folder, out, analysis=AnalysisParams(review_threshold=0.5)), pm)
    info = json.loads((out / "run.json").read_text(encoding="utf-8"))
    assert info["version"] and info["backend"] == "fake" and info["device"] == "cpu"
    # a report of 0.1.0 before and after the analysis changed: told apart by the revision (2
    # was written by two development commits, 3 by those of a first form of 4, which takes
    # glass for glass: `analysis.field_cover`)
    from wbc_batch.analysis import REVISION
    assert info["analysis_revision"] == REVISION == 4
    assert info["fallback_note"] == ""
    assert info["models"]["folder"] == str(fake_bundle)
    meta = info["models"]["files"]["meta"]
    assert meta["file"] == "bundle.json" and len(meta["sha256"]) == 64
    assert info["parameters"]["analysis"]["review_threshold"] == 0.5
    assert info["counts"]["images"] == 4 and info["counts"]["ok"] == 4 and info["counts"]["cells"] == 7
    assert set(info["timings"]) >= {"total_s", "read_s", "analyse_s", "write_s", "images_per_s",
                                   "reports_s"}  # total_s ends where the reports begin
    assert info["timings"]["reports_s"] >= 0
    assert info["interrupted"] is False


def test_run_json_names_the_folders_in_full(pm, make_config, image_folder, tmp_path,
                                            monkeypatch):
    # an archived report said "mix/smears": where, it could not say
    monkeypatch.chdir(image_folder.parent)
    run(make_config(Path(image_folder.name), Path("out")), pm)
    info = json.loads((image_folder.parent / "out" / "run.json").read_text(encoding="utf-8"))
    assert (info["input"], info["output"]) == (str(image_folder), str(image_folder.parent / "out"))


def test_fallback_note_reaches_run_json(pm, make_config, image_folder, tmp_path):
    out = tmp_path / "out"
    outcome = run(make_config(image_folder, out, device="cuda"), pm)
    assert outcome.device == "cpu" and "no CUDA device found" in outcome.fallback_note
    info = json.loads((out / "run.json").read_text(encoding="utf-8"))
    assert info["device"] == "cpu" and info["device_requested"] == "cuda"
    assert "running on the CPU" in info["fallback_note"]


def test_a_session_that_moves_to_the_cpu_while_running_is_what_run_json_says(
        pm, fake_plugin, make_config, image_folder, tmp_path, monkeypatch):
    # a GPU that fails mid-run (the onnx backend moves both networks to the CPU): before,
    # run.json kept the device the session had when it was opened
    opened = fake_plugin.backend.open

    def open_on_gpu(bundle, device="auto", threads=0):
        session = opened(bundle, "cpu", threads)
        session.device, segment = "cuda:0", session.segment

        def failing_over(batch):
            session.device, session.fallback_note = "cpu", "the GPU failed; the rest used the CPU"
            return segment(batch)

        session.segment = failing_over
        return session

    monkeypatch.setattr(fake_plugin.backend, "open", open_on_gpu)
    out = tmp_path / "out"
    run(make_config(image_folder, out), pm)
    info = json.loads((out / "run.json").read_text(encoding="utf-8"))
    assert info["device"] == "cpu" and info["fallback_note"] == "the GPU failed; the rest used the CPU"


def test_process_array_is_a_plain_function_of_the_image(pm, make_config, tmp_path):
    runner = Runner(make_config(tmp_path, tmp_path / "out"), pm)
    rgb = standard_field()
    result, analysis = runner.process_array(rgb, "x.png")
    again, _ = runner.process_array(rgb.copy(), "x.png")
    assert isinstance(result, ImageResult) and isinstance(analysis, ImageAnalysis)
    assert result.ok and len(result.cells) == 3 and (result.width, result.height) == (320, 240)
    assert [c.to_dict() for c in result.cells] == [c.to_dict() for c in again.cells]
    assert not (tmp_path / "out").exists()  # no files written by the compute


@pytest.mark.parametrize("rgb, said", [
    (np.zeros((240, 320), np.uint8), "uint8 (240, 320)"),
    (np.zeros((240, 320, 4), np.uint8), "uint8 (240, 320, 4)"),
    (np.zeros((3, 240, 320), np.uint8), "uint8 (3, 240, 320)"),
    (np.zeros((240, 320, 3), np.float32), "float32 (240, 320, 3)"),
    (np.zeros((240, 320, 3), np.uint16), "uint16 (240, 320, 3)"),
    ([[0, 0, 0]], "list"),
])
def test_process_array_refuses_what_is_not_a_uint8_rgb_image(pm, make_config, tmp_path, rgb,
                                                             said):
    # a float or 16-bit array was analysed into shifted boxes; others failed deep inside
    from wbc_batch.analysis import analyze

    runner = Runner(make_config(tmp_path, tmp_path / "out"), pm)
    with pytest.raises(ValueError, match=re.escape(f"process_array needs a uint8 RGB array of "
                                                   f"shape (height, width, 3) (imageio.read_image "
                                                   f"makes one from a file); got {said}")):
        runner.process_array(rgb, "x.png")
    with pytest.raises(ValueError, match=re.escape(f"analyze needs a uint8 RGB array of shape "
                                                   f"(height, width, 3) (imageio.read_image "
                                                   f"makes one from a file); got {said}")):
        analyze(rgb, runner.session, runner.bundle)  # before: analysed, or numpy's own error


def test_process_array_refuses_what_a_file_would_be_refused_as(pm, make_config, tmp_path):
    # a 10x10 array was "ok, 0 cells" where the same image as a file is "too small"
    from wbc_batch.imageio import NotASmearError

    runner = Runner(make_config(tmp_path, tmp_path / "out"), pm)
    with pytest.raises(NotASmearError, match="too small to hold a WBC") as info:
        runner.process_array(np.full((10, 10, 3), 200, np.uint8), "x.png")
    # a value given, as the README says of arrays: a service's `except ValueError` takes it
    assert isinstance(info.value, ValueError)


def test_a_runner_closed_while_a_call_waits_says_it_is_closed(pm, make_config, tmp_path,
                                                              fake_plugin):
    # before: the waiting call read the cleared session: "the backend's segment raised
    # AttributeError: 'NoneType' object has no attribute 'segment'", blaming the backend
    import threading

    from conftest import standard_field

    runner = Runner(make_config(tmp_path, tmp_path / "out"), pm)
    lock = threading.Lock()
    runner._one_session_call = lock  # as for a session that is not thread_safe
    lock.acquire()  # a call in progress holds it
    failed = []

    def call():
        try:
            runner.process_array(standard_field(), "x.png")
        except PipelineError as exc:
            failed.append(str(exc))

    waiting = threading.Thread(target=call)
    waiting.start()
    time.sleep(0.2)  # the call has passed the first check and waits for the session
    runner.close()
    lock.release()
    waiting.join(10)
    assert failed == ["this Runner is closed: make a new one to analyse more images"]


def test_process_array_takes_a_path_as_the_name_and_refuses_what_is_no_name(pm, make_config,
                                                                            tmp_path,
                                                                            monkeypatch):
    # before: a Path became the result's `image` (its `sample` then raised AttributeError), and
    # an array of any size was analysed, where a file over 200 megapixels is refused
    from pathlib import PurePosixPath

    import wbc_batch.imageio as imageio
    from conftest import standard_field
    from wbc_batch.errors import ConfigError

    with Runner(make_config(tmp_path, tmp_path / "out"), pm) as runner:
        result, _ = runner.process_array(standard_field(), PurePosixPath("s1/a.png"))
        assert result.image == "s1/a.png" and result.sample == "s1"
        for name in (None, "", 3):
            with pytest.raises(ConfigError, match="process_array needs the image's name as text"):
                runner.process_array(standard_field(), name)
        monkeypatch.setattr(imageio, "MAX_PIXELS", 1000)
        with pytest.raises(ValueError, match="image too large: 320x240 = 0.1 megapixels"):
            runner.process_array(standard_field(), "big.png")
    assert runner.session is None  # closed on leaving the block


def test_a_runner_given_something_that_is_no_session_says_so_at_once(pm, make_config,
                                                                      tmp_path, fake_bundle):
    # before: accepted; every image then failed with "'object' object has no attribute"
    from wbc_batch.bundle import load_bundle

    with pytest.raises(PipelineError, match=r"Runner\(session=...\) got <object object at .*>, "
                                            r"which has no segment\(\) and classify\(\)"):
        Runner(make_config(tmp_path, tmp_path / "out"), pm, session=object(),
               bundle=load_bundle(fake_bundle))


def test_run_gives_the_accuracy_tables_with_truth(pm, make_config, image_folder, tmp_path):
    # before: only by reading accuracy.csv back, as `run` closes its Runner
    truth = tmp_path / "truth.csv"
    truth.write_text("image,class\ns1/a.png,neutrophil\n")
    outcome = run(make_config(image_folder, tmp_path / "out", truth=truth), pm)
    summary = outcome.accuracy["summary"]
    assert (tmp_path / "out" / "accuracy.csv").is_file() and len(summary) > 0
    assert run(make_config(image_folder, tmp_path / "bare"), pm).accuracy is None


def test_run_config_refuses_a_device_the_command_line_refuses(tmp_path):
    # before: accepted, then "backend 'torch': invalid device 'gpu'" from Runner, naming no field
    from wbc_batch.config import RunConfig

    with pytest.raises(ValueError, match="RunConfig.device: invalid device 'gpu'"):
        RunConfig(input_dir=tmp_path, output_dir=tmp_path / "o", device="gpu")
    assert RunConfig(input_dir=tmp_path, output_dir=tmp_path / "o", device=" CUDA:0").device == \
        "cuda:0"


def test_run_config_refuses_threads_the_command_line_refuses(tmp_path):
    # 5000 ran silently; "2" failed as the backend's fault
    from wbc_batch.config import RunConfig

    for threads in (5000, -1, 2.5, "2", True):
        with pytest.raises(ValueError, match="RunConfig.threads must be a whole number from 0"):
            RunConfig(input_dir=tmp_path, output_dir=tmp_path / "o", threads=threads)
    four = RunConfig(input_dir=tmp_path, output_dir=tmp_path / "o", threads=np.int64(4)).threads
    assert four == 4 and type(four) is int  # a NumPy int was written "4" in run.json


def test_process_path_never_raises(pm, make_config, tmp_path):
    (tmp_path / "bad.png").write_text("not an image")
    runner = Runner(make_config(tmp_path, tmp_path / "out"), pm)
    result = runner.process_path(tmp_path / "bad.png")
    assert result.status == "error" and "not an image file" in result.error
    result = runner.process_path(tmp_path / "missing.png")
    assert result.status == "error" and "file not found" in result.error


def test_one_failing_analysis_does_not_stop_the_run(pm, make_config, image_folder, tmp_path,
                                                    monkeypatch):
    import wbc_batch.analysis as analysis

    real = analysis.analyze

    def flaky(rgb, *args, **kwargs):
        if rgb.shape[:2] == (200, 300):
            raise RuntimeError("boom\nsecond line")
        return real(rgb, *args, **kwargs)

    monkeypatch.setattr(analysis, "analyze", flaky)
    outcome = run(make_config(image_folder, tmp_path / "out"), pm)
    assert outcome.exit_code == 1
    bad = [r for r in outcome.results if not r.ok]
    assert [r.image for r in bad] == ["s2/c.png"]
    assert bad[0].error == "analysis failed: RuntimeError: boom"
    assert (bad[0].width, bad[0].height) == (300, 200)  # it was read before it failed
    images = pd.read_csv(tmp_path / "out" / "images.csv")
    assert images.set_index("image").loc["s2/c.png", "status"] == "error"
    assert (images["status"] == "ok").sum() == 3


def test_overlay_write_failure_is_reported_on_the_image(pm, make_config, image_folder, tmp_path,
                                                        monkeypatch):
    import wbc_batch.overlay as overlay

    def broken(rgb, analysis):
        raise OSError("disk full")

    monkeypatch.setattr(overlay, "draw_overlay", broken)
    outcome = run(make_config(image_folder, tmp_path / "out"), pm)
    assert outcome.exit_code == 1
    assert all(r.error == "cannot write the overlay or mask: disk full" for r in outcome.results)


def test_an_image_whose_overlay_failed_is_scored_as_failed(pm, make_config, image_folder, tmp_path,
                                                           monkeypatch):
    # images.csv says the image failed, so accuracy.csv may not credit it with the cells it found
    import wbc_batch.overlay as overlay

    truth = tmp_path / "truth.csv"
    truth.write_text("image,x,y,width,height,class\n"
                     "s2/c.png,128,78,44,44,neutrophil\ns1/a.png,,,,,\n")

    def broken_where_cells(rgb, analysis):
        if analysis.cells:
            raise OSError("disk full")
        return rgb

    monkeypatch.setattr(overlay, "draw_overlay", broken_where_cells)
    out = tmp_path / "out"
    outcome = run(make_config(image_folder, out, truth=truth), pm)
    assert {r.image: r.status for r in outcome.results}["s2/c.png"] == "error"
    acc = pd.read_csv(out / "accuracy.csv")
    summary = acc[acc["section"] == "summary"].set_index(["scope", "metric"])["value"]
    assert float(summary[("run", "images_with_truth_failed")]) == 2  # a.png, c.png: both had cells
    per_image = acc[(acc["section"] == "per_image") & (acc["scope"] == "s2/c.png")]
    assert per_image.set_index("metric").loc["status", "value"] == "error"


def _raise_value_error():
    raise ValueError("cannot store this")


def _raise_cancelled():
    raise asyncio.CancelledError("upload cancelled")


@pytest.mark.parametrize("fail, error", [
    (_raise_value_error, "ValueError: cannot store this"),
    # before: SystemExit went past `except Exception`: wbc-batch ended with the plugin's exit
    # code, without the reports after it and without run.json
    (lambda: sys.exit(4), "SystemExit: 4"),
    # before: a BaseException that is neither (an async upload's CancelledError) lost the batch
    (_raise_cancelled, "CancelledError: upload cancelled"),
])
def test_a_failing_report_writer_loses_no_other_report(pm, make_config, image_folder, tmp_path,
                                                       fail, error):
    class Broken:
        name = "broken"

        def write(self, out_dir, tables):
            fail()

    register_writers(pm, Broken(), name="broken-writer")
    out = tmp_path / "out"
    outcome = run(make_config(image_folder, out, writers=("broken", "csv")), pm)
    assert outcome.exit_code == 1 and all(r.ok for r in outcome.results)
    assert len(pd.read_csv(out / "images.csv")) == 4  # the writer after it wrote its files
    info = json.loads((out / "run.json").read_text())
    assert info["report_errors"] == [f"report writer 'broken' failed: {error}"]


def test_when_every_writer_chosen_fails_the_csv_writer_keeps_the_results(
        pm, make_config, image_folder, tmp_path, caplog):
    # before: `--report lis-upload` failing left OUT with run.json alone, every cell lost, and
    # the error line said "the other reports are written"
    class Upload:
        name = "lis-upload"

        def write(self, out_dir, tables):
            raise RuntimeError("LIS upload failed: 503")

    register_writers(pm, Upload(), name="lis")
    out = tmp_path / "out"
    outcome = run(make_config(image_folder, out, writers=("lis-upload",)), pm)
    assert outcome.exit_code == 1 and all(r.ok for r in outcome.results)
    assert len(pd.read_csv(out / "images.csv")) == 4 and (out / "cells.csv").is_file()
    info = json.loads((out / "run.json").read_text())
    assert info["report_files"] == ["cells.csv", "images.csv", "summary.csv"]
    assert info["report_errors"] == [
        "report writer 'lis-upload' failed: RuntimeError: LIS upload failed: 503",
        "every report writer chosen failed, so the 'csv' writer's reports are written instead, "
        "that no result is lost: cells.csv, images.csv, summary.csv"]
    assert "(the other reports are written)" in caplog.text

    caplog.clear()
    pm.unregister(name="csv")  # no spare: say what OUT holds
    outcome = run(make_config(image_folder, tmp_path / "bare", writers=("lis-upload",)), pm)
    assert outcome.exit_code == 1 and not (tmp_path / "bare" / "cells.csv").exists()
    assert "LIS upload failed: 503 (OUT holds only run.json, with the run's counts)" in caplog.text


def test_a_plugins_failure_comes_with_its_traceback_where_the_variable_asks(
        pm, make_config, image_folder, tmp_path, monkeypatch, capsys):
    # before: one line, "report writer 'lis-upload' failed: KeyError: 'x'", and no way for the
    # plugin's author to see where in the plugin it was raised
    class Upload:
        name = "lis-upload"

        def write(self, out_dir, tables):
            return {}["sample-id"]

    register_writers(pm, Upload(), name="lis")
    monkeypatch.delenv("WBC_BATCH_TRACEBACKS", raising=False)
    outcome = run(make_config(image_folder, tmp_path / "quiet", writers=("lis-upload", "csv")), pm)
    assert outcome.exit_code == 1 and "Traceback" not in capsys.readouterr().err
    monkeypatch.setenv("WBC_BATCH_TRACEBACKS", "1")
    outcome = run(make_config(image_folder, tmp_path / "out", writers=("lis-upload", "csv")), pm)
    err = capsys.readouterr().err
    assert outcome.exit_code == 1 and "(WBC_BATCH_TRACEBACKS is set):\nTraceback (most recent call last)" in err
    assert err.count("Traceback (most recent call last)") == 1
    assert 'return {}["sample-id"]' in err and "KeyError: 'sample-id'" in err
    assert json.loads((tmp_path / "out" / "run.json").read_text())["report_errors"] == [
        "report writer 'lis-upload' failed: KeyError: 'sample-id'"]


def test_a_backends_failure_wrapped_and_caught_again_prints_its_traceback_once(
        pm, make_config, image_folder, tmp_path, monkeypatch, capsys):
    # before: the backend's error was printed where `session_output` caught it, and again, with
    # it inside, where the image's analysis caught the BackendError made of it
    from conftest import FakeSession

    def broken(self, batch):
        raise RuntimeError("seg boom")

    monkeypatch.setattr(FakeSession, "segment", broken)
    monkeypatch.setenv("WBC_BATCH_TRACEBACKS", "1")
    outcome = run(make_config(image_folder, tmp_path / "out"), pm)
    err = capsys.readouterr().err
    failed = [r for r in outcome.results if not r.ok]
    # top.png is bare glass, never shown to the segmenter (`analysis.field_cover`)
    assert outcome.exit_code == 1 and [r.image for r in outcome.results if r.ok] == ["top.png"]
    assert err.count("(WBC_BATCH_TRACEBACKS is set):\n") == len(failed) == 3
    assert err.count("RuntimeError: seg boom") == 3


def test_a_watchers_next_rebuild_removes_what_the_spare_writer_wrote(pm, make_config,
                                                                     image_folder, tmp_path):
    # before: a cells.csv of the rebuild whose writer had failed stayed in OUT for good, no
    # longer in run.json and never updated
    lab = _Writes("lab", {"lab.xlsx": "x"})
    register_writers(pm, lab)
    runner = Runner(make_config(image_folder, tmp_path / "out", writers=("lab",)), pm)
    runner.out.mkdir(parents=True)
    results = [ImageResult("s1/a.png", "ok", width=10, height=10)]
    runner.write_reports(results, watch={"once": False})
    lab.then = lambda folder: (_ for _ in ()).throw(RuntimeError("share gone"))
    with pytest.raises(ReportError, match="every report writer chosen failed"):
        runner.write_reports(results, watch={"once": False})
    assert (runner.out / "cells.csv").is_file()
    lab.then = None
    runner.write_reports(results, watch={"once": False})
    assert not (runner.out / "cells.csv").exists() and not (runner.out / "summary.csv").exists()
    assert json.loads((runner.out / "run.json").read_text())["report_files"] == ["lab.xlsx"]


def test_the_spare_writers_files_go_even_after_a_rebuild_where_one_writer_failed_again(
        pm, make_config, image_folder, tmp_path):
    # a first mend forgot them at a rebuild where one writer of two failed (run.json kept them)
    a, b = _Writes("a", {"a.txt": "a"}), _Writes("b", {"b.txt": "b"})
    register_writers(pm, a, b)
    runner = Runner(make_config(image_folder, tmp_path / "out", writers=("a", "b")), pm)
    runner.out.mkdir(parents=True)
    results = [ImageResult("s1/a.png", "ok", width=10, height=10)]
    down = lambda folder: (_ for _ in ()).throw(RuntimeError("down"))  # noqa: E731
    for then_a, then_b, raises in ((None, None, False), (down, down, True), (down, None, True),
                                   (None, None, False)):
        a.then, b.then = then_a, then_b
        if raises:
            with pytest.raises(ReportError):
                runner.write_reports(results, watch={"once": False})
        else:
            runner.write_reports(results, watch={"once": False})
    assert sorted(p.name for p in runner.out.iterdir() if not p.name.startswith(".")) == [
        "a.txt", "b.txt", "run.json"]


def test_a_runner_without_writers_writes_run_json_alone_as_it_did(pm, make_config, image_folder,
                                                                  tmp_path):
    # a first version of the spare writer took no writers for every writer failing
    runner = Runner(make_config(image_folder, tmp_path / "out", writers=()), pm)
    runner.out.mkdir(parents=True)
    written = runner.write_reports([ImageResult("s1/a.png", "ok", width=10, height=10)])
    assert [p.name for p in written] == ["run.json"]


def test_the_spare_writer_is_for_every_writer_failing_not_for_one_writing_nothing(
        pm, make_config, image_folder, tmp_path, monkeypatch):
    upload = _Writes("upload", {})  # an upload: succeeds, writes no file
    broken = _Writes("broken", {}, then=lambda folder: (_ for _ in ()).throw(OSError(28, "full")))
    out = tmp_path / "out"
    _run_writers(pm, make_config, image_folder, out, upload, broken, names=("upload", "broken"))
    assert json.loads((out / "run.json").read_text())["report_errors"] == [
        "report writer 'broken' failed: OSError: [Errno 28] full"]
    assert not (out / "cells.csv").exists()
    # a full disk that keeps the spare from its folder too: said, not a traceback
    real_mkdir = Path.mkdir

    def no_room(self, *args, **kwargs):
        if self.name == "spare":
            raise OSError(28, "No space left on device")
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", no_room)
    outcome = run(make_config(image_folder, tmp_path / "full", writers=("broken",)), pm)
    assert outcome.exit_code == 1
    assert json.loads((tmp_path / "full" / "run.json").read_text())["report_errors"][-1] == (
        "the 'csv' writer could not write the reports instead: No space left on device")


def test_a_failed_writers_kept_accuracy_csv_stays_in_a_watchers_rebuild(pm, make_config,
                                                                       image_folder, tmp_path):
    # before: run.json kept naming it (its writer failed), but it was deleted as a leftover
    acc = _Writes("acc", {"accuracy.csv": "metric,value\nlis_agreement,0.9\n"})
    register_writers(pm, acc)
    runner = Runner(make_config(image_folder, tmp_path / "out", writers=("csv", "acc")), pm)
    runner.out.mkdir(parents=True)
    results = [ImageResult("s1/a.png", "ok", width=10, height=10)]
    runner.write_reports(results, watch={"once": False})
    acc.then = lambda folder: (_ for _ in ()).throw(RuntimeError("LIS down"))
    with pytest.raises(ReportError):
        runner.write_reports(results, watch={"once": False})
    assert "accuracy.csv" in json.loads((runner.out / "run.json").read_text())["report_files"]
    assert "lis_agreement" in (runner.out / "accuracy.csv").read_text()


def test_a_writers_own_accuracy_csv_is_kept_in_a_run_without_truth(pm, make_config,
                                                                    image_folder, tmp_path):
    # before: listed in run.json's report_files, then deleted as an earlier run's leftover
    class LabAccuracy:
        name = "lab-acc"

        def write(self, out_dir, tables):
            (out_dir / "accuracy.csv").write_text("metric,value\nagreement_with_lis,0.97\n")

    register_writers(pm, LabAccuracy(), name="lab-acc")
    out = tmp_path / "out"
    outcome = run(make_config(image_folder, out, writers=("csv", "lab-acc")), pm)
    assert outcome.exit_code == 0
    assert "agreement_with_lis" in (out / "accuracy.csv").read_text()
    assert "accuracy.csv" in json.loads((out / "run.json").read_text())["report_files"]
    run(make_config(image_folder, out, writers=("csv",), overwrite=True), pm)
    assert not (out / "accuracy.csv").exists()  # without that writer: not this run's report


def test_a_writer_editing_its_tables_changes_no_other_report(pm, make_config, image_folder,
                                                             tmp_path):
    # before: every writer got the same tables, so one converting a column in place changed
    # cells.csv written after it, and one removing a column broke report.xlsx
    class Micrometres:
        name = "micrometres"

        def write(self, out_dir, tables):
            tables.cells["x"] = tables.cells["x"] * 0.1
            del tables.cells["needs_review"]
            tables.images["status"] = "edited"
            tables.accuracy.clear()
            tables.run_info["backend"] = "edited"
            tables.results.clear()
            tables.overlay_links.clear()
            return []

    register_writers(pm, Micrometres(), name="micrometres")
    plain, edited = tmp_path / "plain", tmp_path / "edited"
    run(make_config(image_folder, plain, writers=("csv", "xlsx")), pm)
    outcome = run(make_config(image_folder, edited, writers=("micrometres", "csv", "xlsx")), pm)
    assert outcome.exit_code == 0
    for name in ("cells.csv", "images.csv", "summary.csv"):
        ours, theirs = (pd.read_csv(d / name).drop(columns=["seconds"], errors="ignore")
                        for d in (edited, plain))
        pd.testing.assert_frame_equal(ours, theirs)
    cells = pd.read_excel(edited / "report.xlsx", sheet_name=None)
    assert {n: len(t) for n, t in cells.items()} == {
        n: len(t) for n, t in pd.read_excel(plain / "report.xlsx", sheet_name=None).items()}


class ExitingSession:
    """A session whose classify() raises `stop` (sys.exit() by default) on the image of the given
    size."""

    def __init__(self, inner, size, stop=None):
        self.inner, self.size, self.stop = inner, size, stop or SystemExit(7)
        self.device, self.fallback_note = inner.device, inner.fallback_note
        self.image = None

    def segment(self, batch):
        self.image = batch.shape[2:]
        return self.inner.segment(batch)

    def classify(self, batch):
        if self.image == self.size:
            raise self.stop
        return self.inner.classify(batch)


@pytest.mark.parametrize("stop, said", [
    # before: the whole run ended silently with exit code 7, no report written
    (SystemExit(7), "SystemExit: 7"),
    # before: a torch wrapper's asyncio.CancelledError lost the batch the same way
    (asyncio.CancelledError("stream closed"), "CancelledError: stream closed"),
])
def test_a_backend_calling_sys_exit_fails_that_image_and_the_run_goes_on(
        pm, make_config, image_folder, tmp_path, fake_plugin, monkeypatch, stop, said):
    backend = fake_plugin.backend
    real_open = backend.open
    monkeypatch.setattr(backend, "open",
                        lambda *a, **k: ExitingSession(real_open(*a, **k), (224, 320), stop))
    out = tmp_path / "out"
    outcome = run(make_config(image_folder, out, analysis=AnalysisParams(diameter_px=40)), pm)
    bad = [r for r in outcome.results if not r.ok]
    assert outcome.exit_code == 1 and [r.image for r in bad] == ["s2/c.png"]
    assert bad[0].error == f"analysis failed in backend 'fake': the backend's classify raised {said}"
    assert len(pd.read_csv(out / "images.csv")) == 4


def test_a_ctrl_c_in_a_backend_still_stops_the_run(pm, make_config, image_folder, tmp_path,
                                                   fake_plugin, monkeypatch):
    backend = fake_plugin.backend
    real_open = backend.open
    monkeypatch.setattr(backend, "open", lambda *a, **k: ExitingSession(
        real_open(*a, **k), (224, 320), KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        run(make_config(image_folder, tmp_path / "out", analysis=AnalysisParams(diameter_px=40)), pm)


def test_a_backend_calling_sys_exit_when_opened_is_a_usage_error_naming_it(pm, make_config,
                                                                           fake_plugin, tmp_path,
                                                                           monkeypatch):
    def quits(*args, **kwargs):
        sys.exit("no licence")

    monkeypatch.setattr(fake_plugin.backend, "open", quits)
    with pytest.raises(PipelineError, match="backend 'fake' failed to open: SystemExit: no licence"):
        Runner(make_config(tmp_path, tmp_path / "out"), pm)


def test_ctrl_c_in_a_backend_still_stops_the_run(pm, make_config, image_folder, fake_plugin,
                                                tmp_path, monkeypatch):
    class CtrlC(ExitingSession):
        def classify(self, batch):
            raise KeyboardInterrupt

    real_open = fake_plugin.backend.open
    monkeypatch.setattr(fake_plugin.backend, "open", lambda *a, **k: CtrlC(real_open(*a, **k), None))
    with pytest.raises(KeyboardInterrupt):
        run(make_config(image_folder, tmp_path / "out"), pm)


class Recorder:
    """Records every lifecycle hook call."""

    def __init__(self):
        self.calls = []

    @hookimpl
    def wbc_run_start(self, config, total):
        self.calls.append(("run_start", total))

    @hookimpl
    def wbc_image_start(self, image, index, total):
        self.calls.append(("image_start", image, index, total))

    @hookimpl
    def wbc_image_done(self, result, index, total):
        self.calls.append(("image_done", result.image, index, result.status))

    @hookimpl
    def wbc_run_end(self, config, results, seconds):
        self.calls.append(("run_end", len(results), seconds >= 0))


def test_lifecycle_hooks(pm, make_config, image_folder, tmp_path):
    rec = Recorder()
    pm.register(rec)
    (image_folder / "s2" / "zz.png").write_bytes(b"")
    run(make_config(image_folder, tmp_path / "out"), pm)
    calls = rec.calls
    assert calls[0] == ("run_start", 5) and calls[-1] == ("run_end", 5, True)
    starts = [c for c in calls if c[0] == "image_start"]
    dones = [c for c in calls if c[0] == "image_done"]
    assert [c[2] for c in starts] == [0, 1, 2, 3, 4] and all(c[3] == 5 for c in starts)
    assert [(c[1], c[2]) for c in dones] == [(s[1], s[2]) for s in starts]
    assert dones[3] == ("image_done", "s2/zz.png", 3, "error")
    for s in starts:  # every image is started before it is done
        assert calls.index(s) < calls.index(next(d for d in dones if d[2] == s[2]))


def test_interrupted_run_still_writes_reports(pm, make_config, image_folder, tmp_path):
    class Interrupt:
        @hookimpl
        def wbc_image_start(self, image, index, total):
            if index == 2:
                raise KeyboardInterrupt

    pm.register(Interrupt())
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run(make_config(image_folder, out, writers=("csv", "xlsx")), pm)
    info = json.loads((out / "run.json").read_text(encoding="utf-8"))
    assert info["interrupted"] is True and info["counts"]["images"] == 2
    assert info["images_found"] == 4
    assert len(pd.read_csv(out / "images.csv")) == 2
    summary = openpyxl.load_workbook(out / "report.xlsx")["Summary"]
    # which differentials are partial: the banner gave the run's count alone
    assert info["samples_not_finished"] == {".": [0, 1], "s2": [0, 1]}
    assert summary["A3"].value == ("INTERRUPTED: 2 of the 4 images were analysed; the counts and "
                                   "percentages cover those only. Samples not finished: . (0 of "
                                   "1), s2 (0 of 1).")
    # summary.csv says it too (it looked like a whole differential: a LIS import took it as
    # one), and lists the samples of which no image was finished, with no cells
    csv = pd.read_csv(out / "summary.csv", keep_default_na=False)
    complete = dict(zip(csv["sample"], csv["complete"]))
    assert complete == {"ALL": False, ".": False, "s1": True, "s2": False}
    assert csv[csv["sample"] == "s2"]["images"].tolist() == [0] * 5
    assert csv[csv["sample"] == "s2"]["count"].tolist() == [0] * 5
    rows = list(summary.iter_rows(values_only=True))
    head = next(i for i, r in enumerate(rows) if r and r[0] == "sample")
    col = rows[head].index("complete")
    marks = {r[0]: r[col] for r in rows[head + 1:head + 5]}
    assert marks == {"ALL": "no: partial", ".": "no: partial", "s1": "yes", "s2": "no: partial"}


def test_samples_not_finished_counts_each_samples_images():
    from wbc_batch.pipeline import samples_not_finished

    found = ["s1/a.png", "s1/b.png", "s1/c.png", "s2/d.png", "top.png"]
    done = [ImageResult("s1/a.png", "ok"), ImageResult("s1/b.png", "duplicate"),
            ImageResult("s2/d.png", "error")]
    assert samples_not_finished(found, done) == {".": [0, 1], "s1": [2, 3]}


def test_reports_of_part_of_the_images_say_how_many_were_not_analysed(pm, make_config,
                                                                      image_folder, tmp_path):
    # accuracy.csv of a stopped run, and a watch session's report written with files still
    # pending, read as a whole evaluation or a whole differential
    class Interrupt:
        @hookimpl
        def wbc_image_start(self, image, index, total):
            if index == 3:
                raise KeyboardInterrupt

    truth = tmp_path / "truth.csv"
    truth.write_text("image,x,y,width,height,class\ns2/c.png,128,78,44,44,neutrophil\n")
    pm.register(Interrupt())
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run(make_config(image_folder, out, truth=truth), pm)
    acc = pd.read_csv(out / "accuracy.csv")
    summary = acc[acc["section"] == "summary"].set_index(["scope", "metric"])["value"]
    assert float(summary[("run", "images_not_analysed")]) == 1

    runner = Runner(make_config(image_folder, tmp_path / "w", writers=("csv", "xlsx"),
                                truth=truth), pm)
    results = [ImageResult("s1/a.png", "ok", width=10, height=10)]
    runner.write_reports(results, watch={"counts": {"pending": 3, "done": 1}})
    sheet = openpyxl.load_workbook(tmp_path / "w" / "report.xlsx")["Summary"]
    assert sheet["A3"].value == ("NOT FINISHED: 3 file(s) found in the inbox were not analysed "
                                 "yet when this report was written; the counts and percentages "
                                 "cover the 1 images analysed.")
    acc = pd.read_csv(tmp_path / "w" / "accuracy.csv")
    assert ((acc["metric"] == "images_not_analysed") & (acc["value"] == 3)).any()
    # a duplicate is not one of the images analysed, as the Summary's images column counts them
    # (a review: the line said 95 where the column said 94)
    runner.write_reports(results + [ImageResult.duplicate("s2/c.png", "duplicate of s1/a.png")],
                         watch={"counts": {"pending": 3, "done": 2}})
    sheet = openpyxl.load_workbook(tmp_path / "w" / "report.xlsx")["Summary"]
    assert sheet["A3"].value.endswith("cover the 1 images analysed.")
    runner.write_reports(results, watch={"counts": {"pending": 3, "done": 1}},
                         samples_not_finished={"s1": [1, 4]})
    sheet = openpyxl.load_workbook(tmp_path / "w" / "report.xlsx")["Summary"]
    assert sheet["A3"].value.endswith("cover the 1 images analysed. Samples not finished: s1 (1 "
                                      "of 4).")
    runner.write_reports(results, watch={"counts": {"pending": 0, "done": 1}})
    assert openpyxl.load_workbook(tmp_path / "w" / "report.xlsx")["Summary"]["A3"].value is None


def test_threads_reach_the_backend(pm, make_config, fake_plugin, tmp_path):
    Runner(make_config(tmp_path, tmp_path / "out", threads=3, device="auto"), pm)
    assert fake_plugin.backend.opened == [("auto", 3)]


def test_open_session_accepts_two_argument_backends():
    class Old:
        def open(self, bundle, device):
            return ("opened", device)

    class New:
        def open(self, bundle, device, threads=0):
            return ("opened", device, threads)

    assert open_session(Old(), None, "cpu", 4) == ("opened", "cpu")
    assert open_session(New(), None, "cpu", 4) == ("opened", "cpu", 4)


def test_unknown_backend_writer_and_bad_model(pm, make_config, tmp_path, fake_bundle):
    with pytest.raises(PipelineError, match=r"unknown backend 'nope' \(installed: fake, onnx, torch\)"):
        Runner(make_config(tmp_path, tmp_path / "o", backend="nope"), pm)
    with pytest.raises(PipelineError, match=r"unknown report writer 'pdf' \(installed: csv, xlsx"):
        Runner(make_config(tmp_path, tmp_path / "o", writers=("csv", "pdf")), pm)
    with pytest.raises(PipelineError, match="model folder not found"):
        Runner(make_config(tmp_path, tmp_path / "o", model_dir=tmp_path / "nomodel"), pm)
    # before: "model folder not found: .../bundle.json", for a file that is there
    with pytest.raises(PipelineError, match=r"a model bundle is a folder, the one that holds "
                                            r"bundle.json and the weights; .* is a file: give its "
                                            r"folder, "):
        Runner(make_config(tmp_path, tmp_path / "o", model_dir=fake_bundle / "bundle.json"), pm)


def test_output_folder_rules(pm, make_config, image_folder, tmp_path):
    out = tmp_path / "out"
    run(make_config(image_folder, out), pm)
    assert "run.json" in holds_results(out) and "overlays/" in holds_results(out)
    with pytest.raises(PipelineError, match="already holds results.*--overwrite"):
        run(make_config(image_folder, out), pm)
    assert run(make_config(image_folder, out, overwrite=True), pm).exit_code == 0
    with pytest.raises(PipelineError, match="must not be the input folder"):
        run(make_config(image_folder, image_folder), pm)
    with pytest.raises(PipelineError, match="input folder not found"):
        run(make_config(tmp_path / "missing", out), pm)
    # the overlays as input, with --overwrite: emptied before any was read, all "not found"
    drawn = sorted((out / "overlays").rglob("*.png"))
    with pytest.raises(PipelineError, match="input folder lies in the output folder's overlays/"):
        run(make_config(out / "overlays" / "s1", out, overwrite=True), pm)
    assert sorted((out / "overlays").rglob("*.png")) == drawn and drawn
    (out / "Masks" / "s1").mkdir(parents=True)  # masks/ where folders ignore case (macOS, Windows)
    with pytest.raises(PipelineError, match="input folder lies in the output folder's masks/"):
        run(make_config(out / "Masks" / "s1", out, overwrite=True), pm)
    # OUT's overlays/ a link to the input folder: each overlay drawn there would be a new image
    linked = tmp_path / "linked"
    (linked / "big").mkdir(parents=True)
    shutil.copytree(image_folder, linked / "big" / "s")
    (linked / "res").mkdir()
    (linked / "res" / "overlays").symlink_to(linked / "big")
    with pytest.raises(PipelineError, match="input folder lies in the output folder's overlays/"):
        run(make_config(linked / "big", linked / "res", overwrite=True), pm)
    # where case tells folders apart, res/overlays is no folder of Res's
    other = tmp_path / "res" / "overlays"
    shutil.copytree(image_folder, other)
    if not (tmp_path / "RES").exists():  # a file system that tells case apart
        assert run(make_config(other, tmp_path / "Res"), pm).exit_code == 0
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(PipelineError, match="not a folder"):
        run(make_config(image_folder, tmp_path / "file.txt"), pm)


def test_explicit_image_list(pm, make_config, image_folder, tmp_path):
    outcome = run(make_config(image_folder, tmp_path / "out"),
                  pm, images=[image_folder / "s2" / "c.png"])
    assert [r.image for r in outcome.results] == ["s2/c.png"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes (POSIX)")
def test_a_pipe_put_where_an_image_was_fails_that_image_at_once(pm, make_config, image_folder,
                                                                 tmp_path):
    # an image replaced by a named pipe after the search: reading it waited for ever for a
    # writer, and the run with it (a first SIGTERM then wrote the reports, but the process
    # stayed, joined to the blocked reader)
    import threading

    pipe = image_folder / "s2" / "c.png"
    pipe.unlink()
    os.mkfifo(pipe)
    done = []
    worker = threading.Thread(target=lambda: done.append(run(
        make_config(image_folder, tmp_path / "out"), pm,
        images=[image_folder / "s1" / "a.png", pipe, image_folder / "top.png"])), daemon=True)
    worker.start()
    worker.join(60)
    assert done, "the run waited on the pipe"
    results = {r.image: r for r in done[0].results}
    assert results["s2/c.png"].error == "not a regular file (a pipe, a device or a socket)"
    assert results["s1/a.png"].ok and results["top.png"].ok


def test_many_images_keep_their_order(pm, make_config, tmp_path):
    root = tmp_path / "in"
    for i in range(7):
        write_image(root / f"im{i}.png", draw_field(120 + 10 * i, 100, [(60, 50, 12)] * (i % 2)))
    outcome = run(make_config(root, tmp_path / "out", save_overlays=False), pm)
    assert [r.image for r in outcome.results] == [f"im{i}.png" for i in range(7)]
    assert [r.width for r in outcome.results] == [120 + 10 * i for i in range(7)]
    assert [len(r.cells) for r in outcome.results] == [i % 2 for i in range(7)]
    assert not (tmp_path / "out" / "overlays").exists()


# --- several images in analysis at once (what `run` does on a GPU) ------------------------------

def test_analysis_workers_only_on_a_gpu():
    from wbc_batch.pipeline import GPU_ANALYSIS_WORKERS, analysis_workers

    assert analysis_workers("cpu", 16) == 1
    assert analysis_workers("cuda:0", 64) == GPU_ANALYSIS_WORKERS > 1
    assert analysis_workers("cuda:0", 16) == 8
    assert analysis_workers("cuda:1", 4) == 2
    assert analysis_workers("cuda:0", 1) == 1


@pytest.mark.skipif(not hasattr(__import__("os"), "sched_setaffinity"), reason="Linux only")
def test_usable_cores_follow_the_process_affinity():
    """A process pinned to one core (a container's cpuset, taskset) counts one core, whatever
    the machine has: it must not start a worker per core of the host."""
    import subprocess
    import sys

    code = ("import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
            "from wbc_batch.pipeline import analysis_workers, usable_cores; "
            "print(usable_cores(), analysis_workers('cuda:0'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["1", "1"]


@pytest.mark.parametrize("thread_safe, expected", [(None, 1), (True, 2), (False, 1)])
def test_only_a_session_that_says_it_is_thread_safe_gets_images_at_once(pm, make_config, tmp_path,
                                                                       monkeypatch, thread_safe,
                                                                       expected):
    # before: a session that did not say (None) was called from several threads at once
    import types

    import wbc_batch.pipeline as pipeline

    monkeypatch.setattr(pipeline, "usable_cores", lambda: 4)
    session = types.SimpleNamespace(device="cuda:0", segment=print, classify=print)
    if thread_safe is not None:
        session.thread_safe = thread_safe
    runner = Runner(make_config(tmp_path, tmp_path / "out"), pm, session=session)
    assert runner.device == "cuda:0" and runner.analysis_workers == expected


def test_a_session_that_does_not_say_its_device_is_taken_to_run_on_the_cpu(pm, make_config,
                                                                          image_folder, tmp_path,
                                                                          monkeypatch):
    # the README's minimal backend: before, `--device cuda` on a machine without a GPU was
    # reported (and recorded in run.json) as "cuda", and analysed images from many threads
    import wbc_batch.pipeline as pipeline

    from conftest import FakeSession

    class Minimal:
        def __init__(self):
            self.inner = FakeSession()

        def segment(self, batch):
            return self.inner.segment(batch)

        def classify(self, batch):
            return self.inner.classify(batch)

    class Backend:
        name = "minimal"

        def availability(self):
            return True, "CPU only"

        def open(self, bundle, device):
            return Minimal()

    class Plugin:
        @hookimpl
        def wbc_register_backends(self):
            return [Backend()]

    pm.register(Plugin(), name="minimal")
    monkeypatch.setattr(pipeline, "usable_cores", lambda: 4)
    config = make_config(image_folder, tmp_path / "out", backend="minimal", device="cuda")
    runner = Runner(config, pm)
    assert (runner.device, runner.fallback_note, runner.analysis_workers) == ("cpu", "", 1)
    outcome = run(config, pm)
    assert outcome.exit_code == 0 and outcome.device == "cpu"
    assert json.loads((tmp_path / "out" / "run.json").read_text())["device"] == "cpu"


def test_images_analysed_at_once_give_the_serial_results_in_order(pm, make_config, image_folder,
                                                                 tmp_path):
    (image_folder / "s1" / "broken.png").write_text("not an image")
    outcomes = {}
    for workers in (1, 3):
        out = tmp_path / f"out{workers}"
        runner = Runner(make_config(image_folder, out, save_masks=True), pm)
        runner.analysis_workers = workers
        outcomes[workers] = runner.run()
        runner.close()
    serial, parallel = outcomes[1].results, outcomes[3].results
    assert [r.image for r in parallel] == [r.image for r in serial] == \
        ["s1/a.png", "s1/b.jpg", "s1/broken.png", "s2/c.png", "top.png"]
    assert [(r.status, r.error) for r in parallel] == [(r.status, r.error) for r in serial]
    assert [[c.to_dict() for c in r.cells] for r in parallel] == \
        [[c.to_dict() for c in r.cells] for r in serial]
    assert pd.read_csv(tmp_path / "out3" / "cells.csv").equals(pd.read_csv(tmp_path / "out1" / "cells.csv"))
    for rel in ("s1/a.png", "s2/c.png", "top.png"):
        assert artifact_path(tmp_path / "out3", "masks", rel).read_bytes() == \
            artifact_path(tmp_path / "out1", "masks", rel).read_bytes()
    info = json.loads((tmp_path / "out3" / "run.json").read_text(encoding="utf-8"))
    assert info["counts"]["images"] == 5 and info["counts"]["error"] == 1
    assert info["parameters"]["analysis_workers"] == 3


def test_images_really_are_analysed_at_once(pm, make_config, tmp_path):
    """With 3 workers, a second image's segmentation starts while the first's is still running
    (each call waits, up to a bound, for a partner; serial analysis would never find one)."""
    import threading

    from conftest import FakeSession

    class Overlapping(FakeSession):
        def __init__(self):
            super().__init__()
            self.lock, self.active, self.most = threading.Lock(), 0, 0
            self.partner = threading.Event()

        def segment(self, batch):
            with self.lock:
                self.active += 1
                self.most = max(self.most, self.active)
                if self.active >= 2:
                    self.partner.set()
            self.partner.wait(timeout=5)
            try:
                return super().segment(batch)
            finally:
                with self.lock:
                    self.active -= 1

    for i in range(4):
        write_image(tmp_path / "in" / f"{i}.png", standard_field(variant=i))
    session = Overlapping()
    runner = Runner(make_config(tmp_path / "in", tmp_path / "out"), pm, session=session)
    runner.analysis_workers = 3
    outcome = runner.run()
    assert outcome.exit_code == 0 and [len(r.cells) for r in outcome.results] == [3, 3, 3, 3]
    assert session.most >= 2


def test_a_very_large_image_is_analysed_alone(pm, make_config, tmp_path, monkeypatch):
    """Analysing several images at once must not hold several very large ones in memory: an
    image over ALONE_PIXELS waits for the images before it, and the next wait for it. (Each
    segment call waits, up to a bound, for a partner, so any allowed overlap does happen.)"""
    import threading

    import wbc_batch.pipeline as pipeline

    from conftest import FakeSession

    class Watching(FakeSession):
        def __init__(self):
            super().__init__()
            self.cond, self.active, self.seen = threading.Condition(), [], []

        def segment(self, batch):
            pixels = (batch.shape[2], batch.shape[3])
            with self.cond:
                self.active.append(pixels)
                self.cond.notify_all()
                self.cond.wait_for(lambda: len(self.active) > 1, timeout=0.5)
                self.seen.append((pixels, len(self.active)))
            try:
                return super().segment(batch)
            finally:
                with self.cond:
                    self.active.remove(pixels)

    monkeypatch.setattr(pipeline, "ALONE_PIXELS", 720 * 240 - 1)
    # the large image is the only wide one, so its segment calls are told apart by their shape
    sizes = {"a": (320, 240), "b": (320, 240), "c": (720, 240), "d": (320, 240), "e": (320, 240)}
    for k, (name, size) in enumerate(sizes.items()):
        write_image(tmp_path / "in" / f"{name}.png", standard_field(*size, variant=k))
    session = Watching()
    runner = Runner(make_config(tmp_path / "in", tmp_path / "out"), pm, session=session)
    runner.analysis_workers = 3
    outcome = runner.run()
    assert [r.image for r in outcome.results] == [f"{n}.png" for n in sizes]
    assert all(r.ok and r.cells for r in outcome.results)
    wide = [n for (h, w), n in session.seen if w > 2 * h]
    assert wide and all(n == 1 for n in wide)
    assert any(n > 1 for (h, w), n in session.seen if w <= 2 * h)  # the small ones did overlap


def test_label_masks_in_the_input_are_errors_not_cells(pm, make_config, tmp_path):
    """A lab's training folder (images with a masks/ folder, or the WBC Image Dataset's masks
    beside its images): the masks are reported as not smears, never analysed into cells."""
    write_image(tmp_path / "in" / "a.png", standard_field())
    mask = np.zeros((240, 320), np.uint8)
    mask[100:140, 100:140], mask[110:130, 110:130] = 128, 255
    (tmp_path / "in" / "masks").mkdir()
    cv2.imwrite(str(tmp_path / "in" / "masks" / "a.png"), mask)
    outcome = run(make_config(tmp_path / "in", tmp_path / "out"), pm)
    by_name = {r.image: r for r in outcome.results}
    assert by_name["a.png"].ok and len(by_name["a.png"].cells) == 3
    assert by_name["masks/a.png"].status == "error" and not by_name["masks/a.png"].cells
    assert "label mask" in by_name["masks/a.png"].error and "0, 128, 255" in by_name["masks/a.png"].error
    assert outcome.exit_code == 1


# --- interrupted, killed and overwritten runs -----------------------------------------------------

def _accuracy_counts(out: Path) -> tuple:
    import csv

    with open(out / "accuracy.csv", newline="") as fh:
        rows = {(r["section"], r["scope"], r["metric"]): r["value"] for r in csv.DictReader(fh)}
    return tuple(int(float(rows[("summary", "run", k)])) for k in ("images", "images_with_truth"))


@pytest.mark.parametrize("when", [0.0, 0.2])
def test_an_interrupt_while_an_overlay_is_written_scores_only_the_images_it_reports(
        pm, make_config, image_folder, tmp_path, monkeypatch, when):
    # Ctrl-C while OUT (a slow share) takes an overlay: the images scored against the truth must
    # be those reported, whatever the moment (before: 1 reported, 3 scored)
    import _thread
    import threading

    truth = tmp_path / "truth.csv"
    truth.write_text("image,class\n" + "".join(f"{rel},neutrophil\n" for rel in
                                                 ("s1/a.png", "s1/b.jpg", "s2/c.png", "top.png")))
    real = Runner.save_outputs
    calls = []

    def slow(self, rel, rgb, analysis):
        calls.append(rel)
        if len(calls) == 2:
            timer = threading.Timer(when, _thread.interrupt_main)
            timer.start()
            time.sleep(0.5)
            timer.join()  # a loaded machine may run the timer late: still within this write
        return real(self, rel, rgb, analysis)

    monkeypatch.setattr(Runner, "save_outputs", slow)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run(make_config(image_folder, out, truth=truth, truth_format="csv"), pm)
    reported = list(pd.read_csv(out / "images.csv")["image"])
    assert 1 <= len(reported) < 4
    assert _accuracy_counts(out) == (len(reported), len(reported))


def test_overwrite_leaves_no_report_of_the_earlier_run(pm, make_config, image_folder, tmp_path):
    out = tmp_path / "out"
    run(make_config(image_folder, out, writers=("csv", "xlsx")), pm)
    assert (out / "cells.csv").is_file() and (out / "report.xlsx").is_file()
    one = tmp_path / "one"
    write_image(one / "x.png", standard_field())
    run(make_config(one, out, writers=("xlsx",), overwrite=True), pm)
    # before: cells.csv, images.csv and summary.csv of the first run stayed beside the new xlsx
    assert not [n for n in ("cells.csv", "images.csv", "summary.csv") if (out / n).exists()]
    assert json.loads((out / "run.json").read_text())["counts"]["images"] == 1


def test_overwrite_removes_the_overlay_and_mask_of_an_image_that_now_fails(pm, make_config,
                                                                           image_folder, tmp_path):
    out = tmp_path / "out"
    run(make_config(image_folder, out, save_masks=True), pm)
    drawn = [artifact_path(out, kind, "s1/a.png") for kind in ("overlays", "masks")]
    assert all(p.is_file() for p in drawn)
    (image_folder / "s1" / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n")  # cut short since
    outcome = run(make_config(image_folder, out, save_masks=True, overwrite=True), pm)
    assert {r.image: r.status for r in outcome.results}["s1/a.png"] == "error"
    assert not any(p.exists() for p in drawn)  # before: the first run's cells, drawn
    assert artifact_path(out, "overlays", "s1/b.jpg").is_file()

    (image_folder / "s1" / "b.jpg").unlink()  # gone from INPUT: its drawing goes from OUT too
    own = [out / "masks" / "s1" / "b.png", out / "masks" / "field_01.png",
           out / "overlays" / "notes.txt"]  # a lab's own files: never ours to remove
    for path in own:
        path.write_bytes(b"the lab's")
    run(make_config(image_folder, out, save_masks=True, overwrite=True), pm)
    assert not artifact_path(out, "overlays", "s1/b.jpg").exists()
    assert not artifact_path(out, "masks", "s1/b.jpg").exists()
    assert artifact_path(out, "overlays", "s2/c.png").is_file()
    assert all(path.read_bytes() == b"the lab's" for path in own)


def test_overwrite_leaves_no_drawing_of_the_earlier_runs_cells(pm, make_config, image_folder,
                                                                tmp_path):
    out = tmp_path / "out"
    run(make_config(image_folder, out, save_masks=True), pm)
    masks = sorted((out / "masks").rglob("*.png"))
    assert len(masks) == 4
    (out / "masks" / "lab").mkdir()  # a lab's own folder: never ours to remove
    run(make_config(image_folder, out, overwrite=True), pm)  # this time without --save-masks
    assert not [p for p in masks if p.exists()]  # before: the first run's masks stayed
    assert artifact_path(out, "overlays", "s1/a.png").is_file()
    assert sorted(p.name for p in (out / "masks").iterdir()) == ["lab"]  # s1/, s2/ emptied: gone


def test_overwrite_finds_the_drawings_of_a_run_killed_before_its_images_csv(
        pm, make_config, image_folder, tmp_path):
    # a review: a run killed with -9 left overlays and no images.csv; after an image left INPUT,
    # `--overwrite` kept its overlay, a drawing of cells no report counts
    out = tmp_path / "out"
    run(make_config(image_folder, out, save_masks=True), pm)
    for name in ("images.csv", "cells.csv", "summary.csv", "run.json"):
        (out / name).unlink()  # as a kill before the reports leaves it
    (out / "overlays" / "lab.png").write_bytes(b"the lab's")  # no run listed it: never ours
    (image_folder / "s1" / "a.png").unlink()
    run(make_config(image_folder, out, overwrite=True), pm)
    assert not artifact_path(out, "overlays", "s1/a.png").exists()
    assert not artifact_path(out, "masks", "s1/a.png").exists()
    assert artifact_path(out, "overlays", "s1/b.jpg").is_file()
    assert (out / "overlays" / "lab.png").read_bytes() == b"the lab's"


def test_a_kill_while_overwrite_removes_an_older_folders_results_leaves_them_findable(
        pm, make_config, image_folder, tmp_path, monkeypatch):
    # a review: in a folder of a version without the images list, a kill after images.csv was
    # removed and before the drawings were left drawings no later --overwrite could find
    from wbc_batch import output_folder

    out = tmp_path / "out"
    run(make_config(image_folder, out), pm)
    (out / output_folder.IMAGES_LIST).unlink()  # as the version before wrote it
    drawn = sorted((out / "overlays").rglob("*.png"))
    real, calls = output_folder.remove_artifacts, []

    class Killed(BaseException):
        pass

    def removing(out_dir, name):
        calls.append(name)
        if len(calls) == 2:
            raise Killed  # as kill -9 would stop it
        return real(out_dir, name)

    monkeypatch.setattr(output_folder, "remove_artifacts", removing)
    with pytest.raises(Killed):
        output_folder.prepare_output_dir(make_config(image_folder, out, overwrite=True))
    assert not (out / "images.csv").exists() and any(p.exists() for p in drawn)
    monkeypatch.setattr(output_folder, "remove_artifacts", real)
    for path in image_folder.rglob("*.*"):
        if path.name != "top.png":
            path.unlink()
    run(make_config(image_folder, out, overwrite=True), pm)
    assert not [p for p in drawn if p.exists() and p.name != "top.png.png"]


def test_overwrite_removes_run_json_first_and_a_signal_waits_for_the_whole_removal(
        pm, make_config, image_folder, tmp_path, monkeypatch):
    # a review: Ctrl-C (or a kill) while --overwrite removed many earlier overlays left the
    # earlier run.json, which says the run was complete, beside reports whose drawings were gone
    import signal

    from wbc_batch import interrupts, output_folder

    out = tmp_path / "out"
    run(make_config(image_folder, out), pm)
    drawn = sorted((out / "overlays").rglob("*.png"))
    real, seen = output_folder.remove_artifacts, []

    def removing(out_dir, name):
        seen.append([p.name for p in out_dir.glob("*.*sv")] + [p.name for p in out_dir.glob("run.json")])
        if len(seen) == 1:
            signal.raise_signal(signal.SIGINT)  # held until every earlier result is removed
        return real(out_dir, name)

    monkeypatch.setattr(output_folder, "remove_artifacts", removing)
    with pytest.raises(KeyboardInterrupt), interrupts.terminate_as_interrupt():
        output_folder.prepare_output_dir(make_config(image_folder, out, overwrite=True))
    assert seen[0] == []  # the reports, run.json first, went before any drawing
    assert len(seen) == 4 and not [p for p in drawn if p.exists()]


def test_overwrite_finds_the_drawings_of_names_guarded_in_images_csv_and_stays_in_out(
        pm, make_config, tmp_path):
    # images.csv shows '=a.png for =a.png: before, its mask outlived --overwrite; and a name
    # such as ../../keep, hand-edited into images.csv, removed a file outside OUT. A colon (a
    # camera's time stamp) had been taken for a Windows drive, and its drawings kept
    folder, out = tmp_path / "in", tmp_path / "out"
    latin1, control = os.fsdecode(b"caf\xe9.png"), "x\x01y.png"  # shown caf\xe9.png, x\x01y.png
    for k, name in enumerate(("=a.png", "-b.png", "c.png", latin1, control,
                              "2024-03-01 10:30:00.png", "10:30 run/d.png")):
        write_image(folder / name, standard_field(variant=k))
    run(make_config(folder, out, save_masks=True), pm)
    masks = sorted((out / "masks").rglob("*.png"))
    assert len(masks) == 7
    with open(out / "images.csv", "a", encoding="utf-8") as fh:
        fh.write("../../keep,ok,,0,0,0,0,0,0,0,0,1,1,0.1\n")
    (tmp_path / "keep.png").write_bytes(b"the lab's")
    run(make_config(folder, out, overwrite=True), pm)
    assert not [p for p in masks if p.exists()]
    assert (tmp_path / "keep.png").read_bytes() == b"the lab's"


class _JsonWriter:
    """A plugin's report writer: counts.json and a file in a folder of its own."""

    name = "counts-json"

    def write(self, out_dir, tables):
        (out_dir / "plugin").mkdir(exist_ok=True)
        paths = [out_dir / "counts.json", out_dir / "plugin" / "detail.txt"]
        for path in paths:
            path.write_text(json.dumps({"images": len(tables.images)}))
        return paths


def test_overwrite_removes_a_plugin_writers_files_of_the_earlier_run(pm, make_config,
                                                                    image_folder, tmp_path):
    register_writers(pm, _JsonWriter())
    out = tmp_path / "out"
    run(make_config(image_folder, out, writers=("csv", "counts-json")), pm)
    info = json.loads((out / "run.json").read_text())
    assert info["report_files"] == ["cells.csv", "counts.json", "images.csv", "plugin/detail.txt",
                                    "summary.csv"]
    one = tmp_path / "one"
    write_image(one / "x.png", standard_field())
    run(make_config(one, out, writers=("csv",), overwrite=True), pm)
    # before: counts.json said 4 images beside an images.csv of one
    assert not (out / "counts.json").exists() and not (out / "plugin").exists()  # nor its folder
    assert len(pd.read_csv(out / "images.csv")) == 1


def test_a_kill_while_overwrite_removes_the_reports_leaves_a_plugins_files_findable(
        pm, make_config, image_folder, tmp_path, monkeypatch):
    # run.json, the only record of a plugin writer's files, went first: a kill before counts.json
    # was removed left it, unknown to every later --overwrite, beside the next run's reports
    from wbc_batch import output_folder

    register_writers(pm, _JsonWriter())
    out = tmp_path / "out"
    run(make_config(image_folder, out, writers=("csv", "counts-json")), pm)

    class Killed(BaseException):
        pass

    removed = output_folder.remove_report

    def killed_at_counts(path, out_dir):
        if path.name == "counts.json":
            raise Killed
        removed(path, out_dir)

    monkeypatch.setattr(output_folder, "remove_report", killed_at_counts)
    with pytest.raises(Killed):
        output_folder.remove_earlier_results(out)
    monkeypatch.undo()
    assert not (out / "run.json").exists() and (out / "counts.json").exists()
    run(make_config(image_folder, out, writers=("csv",), overwrite=True), pm)
    assert not (out / "counts.json").exists() and not (out / "plugin").exists()
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "cells.csv", "images.csv", "overlays", "run.json", "summary.csv"]
    assert not (out / output_folder.REPORTS_LIST).exists()  # gone once they are


def test_a_hand_edited_run_json_makes_overwrite_remove_only_report_files(pm, make_config,
                                                                         image_folder, tmp_path):
    from wbc_batch.output_folder import earlier_reports

    out = tmp_path / "out"
    run(make_config(image_folder, out), pm)
    (tmp_path / "outside.txt").write_text("keep")
    (out / "ledger.sqlite").write_text("keep")
    (out / "notes.txt").write_text("a report")
    (out / "overlays" / "s1").mkdir(parents=True, exist_ok=True)
    (out / "overlays" / "s1" / "a.png.png").write_text("keep")
    info = json.loads((out / "run.json").read_text())
    info["report_files"] = ["../outside.txt", str(tmp_path / "outside.txt"), "ledger.sqlite",
                            ".wbc-batch-results", "overlays/s1/a.png.png", "./notes.txt",
                            "s1/../../outside.txt", "", 7, None, "notes.txt", "missing.csv"]
    (out / "run.json").write_text(json.dumps(info))
    assert earlier_reports(out) == [out / "notes.txt"]
    (out / "ledger.sqlite").unlink()  # run refuses a watcher's folder
    run(make_config(image_folder, out, overwrite=True), pm)
    assert (tmp_path / "outside.txt").read_text() == "keep" and not (out / "notes.txt").exists()
    assert (out / ".wbc-batch-results").exists() and (out / "overlays" / "s1" / "a.png.png").exists()
    (out / "run.json").write_text("{not json")
    assert earlier_reports(out) == []


def test_a_run_killed_before_its_reports_leaves_a_folder_no_later_run_counts(
        pm, make_config, image_folder, tmp_path):
    from wbc_batch.discovery import discover_images
    from wbc_batch.output_folder import prepare_output_dir

    inside = image_folder / "res_a"  # OUT inside INPUT, killed after its first overlay
    prepare_output_dir(make_config(image_folder, inside))
    write_image(inside / "overlays" / "s1" / "a.png.png", standard_field())
    names = sorted(p.relative_to(image_folder).as_posix()
                   for p in discover_images(image_folder, exclude=tmp_path / "res_b"))
    assert names == ["s1/a.png", "s1/b.jpg", "s2/c.png", "top.png"]


def test_an_image_with_a_long_name_gets_its_overlay(pm, make_config, tmp_path):
    # the temporary overlay name added 22 bytes to the image's: names of 234 bytes and more
    # failed with 'File name too long'; and `<name>.png` itself passes 255 bytes from 252 on
    from wbc_batch.reports import overlay_name

    long, longest = "x" * 240 + ".png", "\u00e9" * 125 + "x.png"  # 244 and 255 bytes
    for k, name in enumerate((long, longest)):
        write_image(tmp_path / "in" / name, standard_field(variant=k))
    outcome = run(make_config(tmp_path / "in", tmp_path / "out", writers=("csv", "xlsx")), pm)
    assert outcome.exit_code == 0 and all(r.ok for r in outcome.results)
    assert (tmp_path / "out" / "overlays" / f"{long}.png").is_file()
    shortened = overlay_name(longest)  # what the reports link to
    assert shortened != f"overlays/{longest}.png" and (tmp_path / "out" / shortened).is_file()


def test_a_ctrl_c_while_the_reports_are_written_waits_for_the_whole_set(
        pm, make_config, image_folder, tmp_path):
    import os
    import signal

    class Tap:
        """A report writer during which the user presses Ctrl-C."""

        name = "tap"

        def write(self, out_dir, tables):
            os.kill(os.getpid(), signal.SIGINT)
            return []

    register_writers(pm, Tap())
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run(make_config(image_folder, out, writers=("tap", "csv", "xlsx")), pm)
    # the writers after it and run.json were written, from the same results, before it acted
    info = json.loads((out / "run.json").read_text())
    assert (out / "report.xlsx").is_file() and len(pd.read_csv(out / "images.csv")) == 4
    assert info["counts"]["images"] == 4 and info["interrupted"] is False


def test_two_writers_never_share_an_output_folder(invoke, image_folder, tmp_path, fake_cli_args):
    # two runs into one OUT both exited 0, leaving report.xlsx of one and cells.csv of the other
    from wbc_batch.output_folder import lock_output

    out = tmp_path / "out"
    held = lock_output(out)
    try:
        res = invoke("run", image_folder, "-o", out, *fake_cli_args)
        assert res.exit_code == 2 and "another wbc-batch run, watch or training is writing to" in res.output
        assert "image(s) in" not in res.output  # refused before the run is announced
        assert not (out / "run.json").exists()
    finally:
        held.close()
    assert invoke("run", image_folder, "-o", out, *fake_cli_args).exit_code == 0
    # a folder with results, being rewritten: before, "already holds results ... pass
    # --overwrite", and with --overwrite the refusal came with a usage line and "Try --help"
    held = lock_output(out)
    try:
        for extra in ((), ("--overwrite",)):
            res = invoke("run", image_folder, "-o", out, *fake_cli_args, *extra)
            assert res.exit_code == 2 and "another wbc-batch run, watch or training is writing to" in res.output
            assert "Usage:" not in res.output and "already holds results" not in res.output
        # a watcher's folder, its watcher running: waiting for it would never do
        (out / "ledger.sqlite").write_bytes(b"")
        res = invoke("run", image_folder, "-o", out, *fake_cli_args, "--overwrite")
        assert res.exit_code == 2 and "belongs to `wbc-batch watch`" in res.output
    finally:
        held.close()


def test_a_claimed_output_folder_is_locked_for_the_body_and_released_however_it_ends(
        make_config, image_folder, tmp_path):
    from wbc_batch.discovery import RESULTS_MARKER
    from wbc_batch.output_folder import claimed_output, lock_output
    from wbc_batch.pipeline import PipelineError

    out = tmp_path / "out"
    config = make_config(image_folder, out)
    with pytest.raises(RuntimeError):
        with claimed_output(config) as held:
            assert held == out and (out / RESULTS_MARKER).is_file()
            with pytest.raises(PipelineError, match="another wbc-batch run, watch or training"):
                lock_output(out)
            raise RuntimeError("the run failed")
    lock_output(out).close()  # released after the failure
    (out / "report.xlsx").write_bytes(b"")  # results: refused without overwrite ...
    with pytest.raises(PipelineError, match="already holds results"):
        with claimed_output(config):
            pytest.fail("the body ran in a refused folder")
    lock_output(out).close()  # ... and the lock taken for the check was released


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="root opens a read-only file for writing anyway")
def test_a_lock_file_another_user_made_can_still_be_locked(tmp_path):
    # a colleague's umask-022 lock file is read-only to us; flock needs no write access
    from wbc_batch.output_folder import OUTPUT_LOCK, lock_output

    out = tmp_path / "out"
    lock_output(out).close()
    (out / OUTPUT_LOCK).chmod(0o444)
    lock_output(out).close()


def test_an_output_folder_on_a_share_without_locks_is_written_with_a_warning(tmp_path, monkeypatch,
                                                                           caplog):
    # flock on an NFS mount without lockd fails with ENOLCK: that is no other writer
    import errno
    import fcntl

    from wbc_batch.output_folder import lock_output

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with caplog.at_level("WARNING", logger="wbc_batch"):
        handle = lock_output(tmp_path / "out")
    handle.close()
    assert "cannot lock the output folder" in caplog.text and "No locks available" in caplog.text


def test_a_watch_folder_is_refused_and_a_killed_runs_leftovers_are_removed(invoke, image_folder,
                                                                         tmp_path, fake_cli_args):
    out = tmp_path / "out"
    (out / "overlays").mkdir(parents=True)
    (out / ".cells.csv.x1y2ab_9.tmp.csv").write_text("half a file")
    (out / "overlays" / ".a.png.q9c4mz0t.tmp.png").write_bytes(b"half")
    (out / "notes.txt").write_text("the lab's own")
    (out / ".lab-notes.tmp.txt").write_text("the lab's own, hidden")  # was removed as ours
    assert invoke("run", image_folder, "-o", out, "--overwrite", *fake_cli_args).exit_code == 0
    assert sorted(p.name for p in out.iterdir()
                  if p.name.startswith(".") and ".tmp" in p.name) == [".lab-notes.tmp.txt"]
    assert not list((out / "overlays").glob(".*.tmp*")) and (out / "notes.txt").is_file()
    watched = tmp_path / "watched"
    watched.mkdir()
    (watched / "ledger.sqlite").write_bytes(b"")
    res = invoke("run", image_folder, "-o", watched, "--overwrite", *fake_cli_args)
    assert res.exit_code == 2 and "belongs to `wbc-batch watch`" in res.output


def test_run_json_on_a_full_disk_is_a_report_error_not_a_traceback(make_config, image_folder,
                                                                  tmp_path, pm, monkeypatch):
    import wbc_batch.pipeline as pipeline

    real = pipeline.atomic_write_text

    def full(path, text, *args, **kwargs):
        if Path(path).name == "run.json":
            raise OSError(28, "No space left on device")
        return real(path, text, *args, **kwargs)

    monkeypatch.setattr(pipeline, "atomic_write_text", full)
    outcome = pipeline.run(make_config(image_folder, tmp_path / "out", writers=("csv",)), pm)
    assert outcome.exit_code == 1 and (tmp_path / "out" / "cells.csv").is_file()


class _Killed(KeyboardInterrupt):
    """What a kill -9 does to a rebuild: it stops, and nothing after it runs (a stop, which goes
    through every catch of a plugin's failures; any other exception is the writer failing)."""


def test_a_rebuild_cut_short_leaves_the_last_whole_set_of_reports(pm, make_config, image_folder,
                                                                  tmp_path):
    # watch rebuilds images.csv and report.xlsx from the ledger; a kill while the slow workbook
    # was built left a new images.csv beside the old report.xlsx and run.json
    from openpyxl import load_workbook

    from wbc_batch.output_folder import STAGE_PREFIX, remove_output_leftovers

    class Cut:
        name = "cut"

        def write(self, out_dir, tables):
            raise _Killed()

    register_writers(pm, Cut())
    out = tmp_path / "out"
    runner = Runner(make_config(image_folder, out, writers=("csv", "xlsx")), pm=pm)
    old = [ImageResult.failed(f"img{i}.png", "cannot decode") for i in range(3)]
    written = runner.write_reports(old)
    assert sorted(p.name for p in written) == ["cells.csv", "images.csv", "report.xlsx",
                                               "run.json", "summary.csv"]
    assert all(p.parent == out for p in written)
    runner.writers = [w for w in runner.writers if w.name == "csv"] + [Cut()]
    with pytest.raises(_Killed):
        runner.write_reports(old + [ImageResult.failed("img9.png", "cannot decode")])
    assert len(pd.read_csv(out / "images.csv")) == 3  # not the half-written rebuild's 4
    assert load_workbook(out / "report.xlsx")["Images"].max_row == 4
    assert json.loads((out / "run.json").read_text())["counts"]["images"] == 3
    assert not [p for p in out.iterdir() if p.name.startswith(STAGE_PREFIX)]
    # a real kill leaves the staging folder behind: the next start removes it, and only it
    (out / f"{STAGE_PREFIX}x1k2m9p0.tmp" / "sub").mkdir(parents=True)
    (out / f"{STAGE_PREFIX}x1k2m9p0.tmp" / "sub" / "images.csv").write_text("half")
    (out / ".scan.tmp").mkdir()  # not ours: a hidden folder a scanner uploads into
    remove_output_leftovers(out)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [".scan.tmp"]
    runner.close()


def test_run_json_counts_a_duplicate_apart_from_the_errors(pm, make_config, image_folder,
                                                           tmp_path):
    runner = Runner(make_config(image_folder, tmp_path / "out"), pm=pm)
    results = [ImageResult("a.png", "ok"), ImageResult.failed("b.png", "cannot decode"),
               ImageResult.duplicate("c.png", "duplicate of a.png")]
    info = runner.run_info(results)
    counts = info["counts"]
    assert (counts["images"], counts["ok"], counts["error"], counts["duplicate"]) == (3, 1, 1, 1)
    from wbc_batch.pipeline import _flat_facts

    assert _flat_facts(info)["duplicates (counted under their first name)"] == 1  # Summary sheet
    runner.close()


def test_a_byte_identical_copy_is_counted_once_under_its_first_name(pm, make_config, tmp_path):
    # before: run analysed and counted every name, so a scanner's second export of a field
    # (or a link to it) counted its cells twice in the differential
    import shutil

    root, out = tmp_path / "in", tmp_path / "out"
    write_image(root / "s1" / "a.png", standard_field())
    write_image(root / "s1" / "b.png", standard_field(variant=1))
    (root / "s2").mkdir()
    shutil.copyfile(root / "s1" / "a.png", root / "s2" / "copy.png")
    os.symlink(root / "s1" / "b.png", root / "s2" / "link.png")
    outcome = run(make_config(root, out), pm)
    status = {r.image: (r.status, r.error) for r in outcome.results}
    assert status["s2/copy.png"] == (
        "duplicate", "duplicate of s1/a.png (identical content); counted once, under that name")
    assert status["s2/link.png"][0] == "duplicate"
    assert outcome.exit_code == 0 and outcome.n_cells == 6
    summary = pd.read_csv(out / "summary.csv", keep_default_na=False)
    alls = summary[summary["sample"] == "ALL"]
    assert alls["count"].sum() == 6 and set(alls["images"]) == {2}
    assert not (out / "overlays" / "s2").exists()   # the copies' cells are drawn under s1
    info = json.loads((out / "run.json").read_text(encoding="utf-8"))
    assert (info["counts"]["images"], info["counts"]["ok"], info["counts"]["duplicate"]) == (4, 2, 2)


def test_a_copy_takes_over_no_drawing_and_keeps_none_of_an_earlier_run(pm, make_config, tmp_path):
    import shutil

    root, out = tmp_path / "in", tmp_path / "out"
    write_image(root / "a.png", standard_field())
    write_image(root / "b.png", standard_field(variant=1))
    run(make_config(root, out), pm)
    assert artifact_path(out, "overlays", "b.png").is_file()
    shutil.copyfile(root / "a.png", root / "b.png")  # b is now a copy of a
    outcome = run(make_config(root, out, overwrite=True), pm)
    assert [r.status for r in outcome.results] == ["ok", "duplicate"]
    assert not artifact_path(out, "overlays", "b.png").exists()


def test_a_copy_of_a_file_that_could_not_be_read_is_read_on_its_own(pm, make_config, tmp_path,
                                                                      monkeypatch):
    # the first file's read may be what failed (a share dropping out), not its content
    import shutil

    import wbc_batch.pipeline as pipeline

    root = tmp_path / "in"
    write_image(root / "a.png", standard_field())
    shutil.copyfile(root / "a.png", root / "b.png")
    real = pipeline.read_bytes

    def flaky(path):
        if Path(path).name == "a.png":
            raise OSError("share went away")
        return real(path)

    monkeypatch.setattr(pipeline, "read_bytes", flaky)
    outcome = run(make_config(root, tmp_path / "out"), pm)
    assert [r.status for r in outcome.results] == ["error", "ok"]
    assert "share went away" in outcome.results[0].error
    assert outcome.n_cells == 3


def test_run_reads_each_file_once_and_counts_copies_by_the_bytes_it_decoded(
        pm, make_config, tmp_path, monkeypatch):
    # a share is read once per image, and the hash that names a copy is of the bytes analysed
    import shutil

    import wbc_batch.pipeline as pipeline

    root = tmp_path / "in"
    write_image(root / "a.png", standard_field())
    shutil.copyfile(root / "a.png", root / "b.png")
    write_image(root / "c.png", standard_field(variant=1))
    reads, real = [], pipeline.read_bytes

    def counted(path):
        reads.append(Path(path).name)
        return real(path)

    monkeypatch.setattr(pipeline, "read_bytes", counted)
    opened_only_by_read_bytes(monkeypatch, root)  # no second way in
    outcome = run(make_config(root, tmp_path / "out"), pm)
    assert sorted(reads) == ["a.png", "b.png", "c.png"]
    assert [r.status for r in outcome.results] == ["ok", "duplicate", "ok"]


def test_a_copy_of_an_image_whose_analysis_failed_says_so(pm, make_config, tmp_path, monkeypatch):
    import shutil

    root = tmp_path / "in"
    write_image(root / "a.png", standard_field())
    shutil.copyfile(root / "a.png", root / "b.png")
    runner = Runner(make_config(root, tmp_path / "out"), pm)
    monkeypatch.setattr(runner, "process_array", lambda rgb, rel: (_ for _ in ()).throw(
        MemoryError()))
    outcome = runner.run()
    runner.close()
    # a failure in its own sample too, not a duplicate counted nowhere
    assert [r.status for r in outcome.results] == ["error", "error"]
    assert outcome.results[1].error == ("identical to a.png, which failed: "
                                        + outcome.results[0].error)
    assert (outcome.results[1].width, outcome.results[1].height) == (
        outcome.results[0].width, outcome.results[0].height)
    assert outcome.exit_code == 1


def test_with_truth_every_file_is_analysed_scored_and_counted(pm, make_config, tmp_path):
    # an evaluation measures what its truth names: a public set may hold one cell twice
    import shutil

    root, out = tmp_path / "in", tmp_path / "out"
    write_image(root / "a.png", draw_field(200, 200, [(100, 100, 22)]))
    shutil.copyfile(root / "a.png", root / "b.png")
    truth = tmp_path / "truth.csv"
    truth.write_text("image,x,y,width,height,class\n"
                     "a.png,78,78,44,44,neutrophil\nb.png,78,78,44,44,neutrophil\n")
    outcome = run(make_config(root, out, truth=truth), pm)
    assert [r.status for r in outcome.results] == ["ok", "ok"] and outcome.n_cells == 2
    acc = pd.read_csv(out / "accuracy.csv")
    summary = acc[acc["section"] == "summary"].set_index(["scope", "metric"])["value"]
    assert float(summary[("run", "images_with_truth")]) == 2
    assert float(summary[("run", "images_with_truth_failed")]) == 0


def test_a_copy_of_another_samples_file_is_named(pm, make_config, tmp_path):
    # a field filed under two patients counts in the first one only: the run says which
    import shutil

    root, out = tmp_path / "in", tmp_path / "out"
    write_image(root / "s1" / "a.png", standard_field())
    write_image(root / "s2" / "b.png", standard_field(variant=1))
    shutil.copyfile(root / "s1" / "a.png", root / "s1" / "c.png")         # same sample
    shutil.copyfile(root / "s2" / "b.png", root / "s1" / "z.png")         # s2's field, in s1
    outcome = run(make_config(root, out), pm)
    status = {r.image: r.status for r in outcome.results}
    assert status == {"s1/a.png": "ok", "s1/c.png": "duplicate", "s1/z.png": "ok",
                      "s2/b.png": "duplicate"}
    info = json.loads((out / "run.json").read_text(encoding="utf-8"))
    assert info["duplicates_across_samples"] == [{"image": "s2/b.png", "copy_of": "s1/z.png"}]
    from wbc_batch.pipeline import _flat_facts

    assert _flat_facts(info)["duplicates of another sample's file"] == 1


def test_a_writer_sees_out_and_its_files_are_dropped_when_it_fails(pm, make_config, image_folder,
                                                                   tmp_path):
    seen = {}

    class Half:
        name = "half"

        def write(self, out_dir, tables):
            seen["overlays"] = sorted(p.name for p in (tables.output_dir / "overlays").rglob("*.png"))
            (out_dir / "half.txt").write_text("the first half of a report")
            raise ValueError("disk quota")

    register_writers(pm, Half())
    out = tmp_path / "out"
    outcome = run(make_config(image_folder, out, writers=("half", "csv")), pm)
    assert outcome.exit_code == 1 and len(seen["overlays"]) == 4  # the overlays, in OUT
    assert not (out / "half.txt").exists()
    info = json.loads((out / "run.json").read_text())
    assert "half.txt" not in info["report_files"] and "cells.csv" in info["report_files"]


# --- each report writer in its own staging folder ------------------------------------------------

class _Writes:
    """A plugin writer that writes `files` ({name in its folder: text}), then does `then()`."""

    def __init__(self, name, files, then=None, returns=None):
        self.name, self.files, self.then, self.returns = name, files, then, returns
        self.found = None  # what its folder held when it was called

    def write(self, out_dir, tables):
        self.found = sorted(p.name for p in out_dir.iterdir())
        for name, text in self.files.items():
            (out_dir / name).parent.mkdir(parents=True, exist_ok=True)
            (out_dir / name).write_text(text)
        if self.then is not None:
            self.then(out_dir)
        return [out_dir / n for n in self.files] if self.returns is None else self.returns


def _run_writers(pm, make_config, image_folder, out, *writers, names=None):
    register_writers(pm, *writers)
    return run(make_config(image_folder, out, writers=names or ("csv", *(w.name for w in writers))),
               pm)


def test_a_failed_writers_earlier_file_stays_named_in_run_json_so_it_can_be_removed(
        pm, make_config, image_folder, tmp_path):
    # watch rebuilds in place: before, a writer failing at a rebuild left its file of the last
    # rebuild in OUT, no longer named by run.json, so no later session or --overwrite removed it
    out = tmp_path / "out"
    lis = _Writes("lis", {"lis.hl7": "MSH|"})
    register_writers(pm, lis)
    runner = Runner(make_config(image_folder, out, writers=("csv", "lis")), pm)
    runner.out.mkdir(parents=True)
    results = [ImageResult("s1/a.png", "ok", width=10, height=10)]
    runner.write_reports(results)
    assert "lis.hl7" in json.loads((out / "run.json").read_text())["report_files"]
    lis.then = lambda folder: (_ for _ in ()).throw(RuntimeError("LIS unreachable"))
    with pytest.raises(ReportError):
        runner.write_reports(results)
    info = json.loads((out / "run.json").read_text())
    assert "lis.hl7" in info["report_files"] and (out / "lis.hl7").read_text() == "MSH|"
    assert out / "lis.hl7" in earlier_reports(out)  # what --overwrite or watch then removes


def test_a_writer_can_tell_a_watchers_rebuild_from_a_run(pm, make_config, image_folder,
                                                          tmp_path):
    # a writer uploading to a LIS is called at every rebuild of a watcher, with every result
    seen = []

    class Spy:
        name = "spy"

        def write(self, out_dir, tables):
            seen.append(tables.run_info["command"])

    register_writers(pm, Spy())
    runner = Runner(make_config(image_folder, tmp_path / "out", writers=("spy",)), pm)
    runner.out.mkdir(parents=True)
    results = [ImageResult("s1/a.png", "ok", width=10, height=10)]
    runner.write_reports(results)
    runner.write_reports(results, watch={"once": False})
    assert seen == ["run", "watch"]


def test_a_writer_writing_another_writers_file_fails_and_the_first_keeps_it(
        pm, make_config, image_folder, tmp_path):
    # before: a LIS writer's summary.csv silently replaced the csv writer's
    lis = _Writes("lis", {"summary.csv": "lis", "lis.hl7": "MSH|"})
    out = tmp_path / "out"
    outcome = _run_writers(pm, make_config, image_folder, out, lis)
    assert outcome.exit_code == 1 and all(r.ok for r in outcome.results)
    assert "sample" in pd.read_csv(out / "summary.csv").columns  # the csv writer's
    assert not (out / "lis.hl7").exists()  # a failed writer publishes none of its files
    info = json.loads((out / "run.json").read_text())
    assert info["report_errors"] == ["report writer 'lis' failed: it wrote summary.csv, but "
                                     "report writer 'csv' wrote summary.csv first"]
    assert "lis.hl7" not in info["report_files"] and "summary.csv" in info["report_files"]
    assert lis.found == []  # its folder was empty: not the csv writer's files


def test_names_are_compared_ignoring_case_and_a_file_may_not_be_another_writers_folder(
        pm, make_config, image_folder, tmp_path):
    first = _Writes("first", {"lis/a.txt": "1"})
    second = _Writes("second", {"LIS": "2", "Cells.CSV": "2"})
    out = tmp_path / "out"
    _run_writers(pm, make_config, image_folder, out, first, second)
    info = json.loads((out / "run.json").read_text())
    assert info["report_errors"] == [
        "report writer 'second' failed: it wrote Cells.CSV, but report writer 'csv' wrote "
        "cells.csv first"]
    assert (out / "lis" / "a.txt").read_text() == "1"


def test_a_writer_that_raises_after_writing_another_writers_file_leaves_that_file_whole(
        pm, make_config, image_folder, tmp_path):
    # before: its half cells.csv stayed in place of the csv writer's (only new names were dropped)
    def fail(out_dir):
        raise OSError("disk quota")

    out = tmp_path / "out"
    outcome = _run_writers(pm, make_config, image_folder, out,
                           _Writes("half", {"cells.csv": "the first half"}, then=fail))
    assert outcome.exit_code == 1
    assert len(pd.read_csv(out / "cells.csv")) == 7
    assert json.loads((out / "run.json").read_text())["report_errors"] == [
        "report writer 'half' failed: OSError: disk quota"]


def test_a_writer_cannot_remove_the_files_another_wrote(pm, make_config, image_folder, tmp_path):
    def erase(out_dir):
        for path in out_dir.iterdir():
            path.unlink()

    out = tmp_path / "out"
    outcome = _run_writers(pm, make_config, image_folder, out, _Writes("eraser", {}, then=erase))
    assert outcome.exit_code == 0
    for name in ("cells.csv", "images.csv", "summary.csv", "run.json"):
        assert (out / name).is_file(), name


@pytest.mark.parametrize("name", ["run.json", "RUN.json", "overlays/s1/a.png.png", "masks/x.png",
                                  "ledger.sqlite", "ledger.sqlite-wal", ".wbc-batch.lock",
                                  ".wbc-batch-results", "sub/.hidden"])
def test_a_writer_writing_a_name_wbc_batch_keeps_fails(pm, make_config, image_folder, tmp_path,
                                                       name):
    out = tmp_path / "out"
    outcome = _run_writers(pm, make_config, image_folder, out,
                           _Writes("sly", {name: "{}", "sly.txt": "x"}))
    assert outcome.exit_code == 1
    info = json.loads((out / "run.json").read_text())
    assert info["counts"]["images"] == 4  # wbc-batch's own run.json
    assert info["report_errors"] == [
        f"report writer 'sly' failed: it wrote {name}, a name wbc-batch keeps "
        f"({_kept_reason(name)})"]
    assert not (out / "sly.txt").exists()
    if name.startswith(("overlays/", "masks/")):
        assert not (out / name).exists() or (out / name).read_bytes() != b"{}"


def test_a_writer_writing_straight_into_out_is_named(pm, make_config, image_folder, tmp_path,
                                                     caplog):
    # before: no word; its files were never written whole, not in run.json, kept by --overwrite
    def direct(out_dir):
        (tmp_path / "out" / "direct.json").write_text("{}")
        (tmp_path / "out" / "cells.csv").write_text("half")

    out = tmp_path / "out"
    outcome = _run_writers(pm, make_config, image_folder, out,
                           _Writes("direct", {"own.txt": "x"}, then=direct))
    assert outcome.exit_code == 0 and (out / "own.txt").read_text() == "x"
    assert ("cells.csv (and 1 more) appeared or changed in the output folder while report writer "
            "'direct' ran: a writer must write in the folder it is given") in caplog.text
    assert len(pd.read_csv(out / "cells.csv")) == 7  # the csv writer's, put in place after


def test_files_coming_and_going_in_a_folder_inside_out_are_no_writers_doing(
        pm, make_config, image_folder, tmp_path, caplog):
    # a scanner's inbox inside OUT, or the workbook open on a share (~$report.xlsx), while the
    # writers run: a first version failed csv and xlsx for it, and no cells.csv was written
    out = tmp_path / "out"
    (out / "inbox").mkdir(parents=True)

    def scanner(out_dir):
        (out / "inbox" / "scan_1.part").write_text("...")
        (out / "~$report.xlsx").write_text("lock")

    outcome = _run_writers(pm, make_config, image_folder, out, _Writes("busy", {}, then=scanner))
    assert outcome.exit_code == 0 and "appeared or changed" not in caplog.text


def test_a_writer_writing_a_link_to_a_folder_fails(pm, make_config, image_folder, tmp_path):
    # before: a link to a folder was passed over without a word (a link to a file failed)
    def link(out_dir):
        (out_dir / "shared").symlink_to(tmp_path, target_is_directory=True)

    out = tmp_path / "out"
    _run_writers(pm, make_config, image_folder, out, _Writes("linker", {"a.txt": "x"}, then=link))
    assert json.loads((out / "run.json").read_text())["report_errors"] == [
        "report writer 'linker' failed: it wrote shared as a link; a report file must be a plain "
        "file"]
    assert not (out / "a.txt").exists()


def _kept_reason(name):
    from wbc_batch.output_folder import kept_name

    return kept_name(name.split("/"))


def test_paths_returned_relative_to_the_working_folder_or_the_writers_own_are_not_warned_of(
        pm, make_config, image_folder, tmp_path, caplog, monkeypatch):
    # OUT given as a relative path: the built-in writers return paths relative to the working
    # folder (a quick start with -o results warned of report.xlsx); a plugin may return its own
    class Relative:
        name = "relative"

        def write(self, out_dir, tables):
            (Path(out_dir) / "rel.txt").write_text("r")
            return [Path("rel.txt")]

    monkeypatch.chdir(tmp_path)
    register_writers(pm, Relative())
    outcome = run(make_config(image_folder, Path("out"), writers=("csv", "xlsx", "relative")), pm)
    assert outcome.exit_code == 0 and (tmp_path / "out" / "rel.txt").is_file()
    assert (tmp_path / "out" / "report.xlsx").is_file()
    assert not [r for r in caplog.records if "not published" in r.getMessage()]


def test_a_writers_unreturned_files_are_published_and_a_path_outside_its_folder_is_not(
        pm, make_config, image_folder, tmp_path, caplog):
    elsewhere = tmp_path / "elsewhere.txt"
    elsewhere.write_text("not a report")
    writer = _Writes("loose", {"kept.txt": "k", "sub/also.txt": "a"},
                     returns=[elsewhere, tmp_path / "missing.txt"])
    out = tmp_path / "out"
    outcome = _run_writers(pm, make_config, image_folder, out, writer)
    assert outcome.exit_code == 0
    assert (out / "kept.txt").is_file() and (out / "sub" / "also.txt").is_file()
    assert not (out / "elsewhere.txt").exists()
    warned = [r.getMessage() for r in caplog.records if "not published" in r.getMessage()]
    assert warned == [
        f"report writer 'loose' returned {path}, which is not a file in the folder it was given "
        "to write in: not published" for path in (elsewhere, tmp_path / "missing.txt")]


@pytest.mark.parametrize("target", ["report.xlsx", "a.png.png", "run.json", "noext", "x" * 230 + ".png"])
def test_the_temporary_names_of_atomic_writes_are_told_from_a_labs_own_hidden_files(tmp_path, target):
    from wbc_batch.atomic import _temp_in, is_leftover

    temp = _temp_in(tmp_path / target)
    assert is_leftover(temp.name)
    for name in (".lab-notes.tmp.txt", ".notes.tmp", ".x.tmp.csv", f".{target}.tmp",
                 ".backup.20240101.tmp", ".scan.20240612.tmp.txt"):
        assert not is_leftover(name)


def test_images_with_flat_margins_left_in_are_named(pm, make_config, tmp_path, caplog):
    # before: one line, once per process, naming no image, and nothing in the reports: under
    # watch or cron nobody could tell which images were analysed with their banner
    from test_frame import white_bars

    root = tmp_path / "input"
    write_image(root / "s1" / "a.png", standard_field(400, 300))
    write_image(root / "s1" / "b.png", white_bars(standard_field(400, 300, variant=1), 40))
    write_image(root / "s2" / "c.png", white_bars(standard_field(400, 300, variant=2), 30))
    out = tmp_path / "out"
    with caplog.at_level("WARNING", logger="wbc_batch"):
        run(make_config(root, out, writers=("csv", "xlsx")), pm)
    said = [m for m in caplog.messages if "flat light band" in m]
    assert len(said) == 1 and said[0].startswith("s1/b.png has a flat light band along its edge")
    info = json.loads((out / "run.json").read_text(encoding="utf-8"))
    assert info["flat_margins"] == ["s1/b.png", "s2/c.png"]
    facts = {r[0]: r[1] for r in openpyxl.load_workbook(out / "report.xlsx")["Summary"].iter_rows(
        values_only=True) if r and r[0]}
    assert facts["images with flat margins analysed as they are"] == 2
    assert facts["analysis revision"] == 4 and facts["version"]


def test_flat_margins_are_kept_with_each_result_so_a_later_watch_session_reports_them(
        pm, make_config, tmp_path):
    # a second `watch --once` session's run.json listed none: the images were named from the
    # process's memory, not from the results, which the ledger keeps across sessions
    from test_frame import white_bars

    root = tmp_path / "input"
    write_image(root / "b.png", white_bars(standard_field(400, 300, variant=1), 40))
    runner = Runner(make_config(root, tmp_path / "out"), pm)
    try:
        result, _ = runner.process_array(white_bars(standard_field(400, 300, variant=1), 40), "b.png")
    finally:
        runner.close()
    assert result.margins_left
    stored = ImageResult.from_dict(json.loads(json.dumps(result.to_dict())))  # as the ledger does
    assert stored == result
    later = Runner(make_config(root, tmp_path / "out2"), pm)  # another session: said nothing yet
    try:
        info = later.run_info([stored, ImageResult("c.png", "ok")], {})
    finally:
        later.close()
    assert info["flat_margins"] == ["b.png"]


def test_a_result_written_by_another_version_is_read():
    from wbc_batch.results import CellResult

    cell = CellResult(cell_id=1, cls="neutrophil", confidence=0.9, probs=(0.9, 0.1, 0, 0, 0),
                      x=1, y=2, width=3, height=4, area_px=9, nucleus_area_px=4,
                      needs_review=False)
    d = ImageResult("a.png", "ok", width=4, height=3, cells=(cell,)).to_dict()
    later = {**d, "a_later_field": 1, "cells": [{**d["cells"][0], "a_later_field": 2}]}
    assert ImageResult.from_dict(later) == ImageResult.from_dict(d)
    d.pop("margins_left")  # an earlier version's
    assert ImageResult.from_dict(d).margins_left is False


@pytest.mark.skipif(os.name == "nt", reason="no advisory locks on Windows")
def test_a_lock_held_for_a_moment_by_another_probe_is_waited_for_once(tmp_path):
    # another process's `refuse_busy` holds OUT's lock for microseconds to look: a run or
    # watcher starting at that moment was refused as if OUT were being written
    import fcntl
    import threading

    from wbc_batch.output_folder import OUTPUT_LOCK, lock_output, refuse_busy

    out = tmp_path / "out"
    lock_output(out).close()
    for claim in (lambda: lock_output(out).close(), lambda: refuse_busy(out)):
        fd = os.open(out / OUTPUT_LOCK, os.O_RDONLY)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        threading.Timer(0.01, os.close, (fd,)).start()  # the other probe lets go
        claim()  # waited for, not refused
    held = lock_output(out)  # a real holder: refused, by both
    try:
        with pytest.raises(PipelineError, match="another wbc-batch run, watch or training"):
            lock_output(out)
        with pytest.raises(PipelineError, match="another wbc-batch run, watch or training"):
            refuse_busy(out)
    finally:
        held.close()


def test_images_outside_the_input_folder_are_refused_before_out_is_made(pm, make_config, tmp_path):
    # two field_01.jpg of two folders outside INPUT were both named field_01.jpg, in sample ".",
    # one overlay drawn over the other's, exit 0
    inside = tmp_path / "input"
    write_image(inside / "a.png", standard_field())
    other = [write_image(tmp_path / "other" / s / "field_01.png", standard_field(variant=i))
             for i, s in enumerate(("s2", "s3"))]
    out = tmp_path / "out"
    with pytest.raises(PipelineError, match=r"field_01.png is not inside the input folder .*input: "
                                            r"give an input folder that holds every image"):
        run(make_config(inside, out), pm, images=[inside / "a.png", *other])
    assert not out.exists()
    sneaky = inside / ".." / "other" / "s2" / "field_01.png"  # its overlay went outside OUT
    with pytest.raises(PipelineError, match="is not inside the input folder"):
        run(make_config(inside, out), pm, images=[sneaky])
    assert not out.exists()
    (inside / "sub").mkdir()
    outcome = run(make_config(inside, tmp_path / "out2"), pm,
                  images=[inside / "sub" / ".." / "a.png"])
    assert [r.image for r in outcome.results] == ["a.png"]  # inside, by its plain name
    outcome = run(make_config(tmp_path / "other", out), pm, images=other)  # their common folder
    assert [r.image for r in outcome.results] == ["s2/field_01.png", "s3/field_01.png"]


def test_a_relative_image_path_outside_the_input_says_where_it_was_looked_for(
        pm, make_config, tmp_path, monkeypatch):
    # a program gave the name inside the input folder, as the reports name it; the error said
    # only that it was not inside
    inside = tmp_path / "input"
    write_image(inside / "s1" / "a.png", standard_field())
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PipelineError) as info:
        run(make_config(inside, tmp_path / "out"), pm, images=["s1/a.png"])
    assert (f"(a relative path is taken from the current folder, {tmp_path}; "
            f"{inside / 's1' / 'a.png'} names the file of that name inside the input folder)"
            ) in str(info.value)


@pytest.mark.skipif(os.name == "nt", reason="POSIX permissions")
def test_result_files_follow_the_host_programs_umask_of_now(tmp_path):
    # the umask was read once, at import: a program that set 077 afterwards (patient data)
    # still got reports readable by everyone
    from wbc_batch.atomic import atomic_write_text

    before = os.umask(0o077)
    try:
        path = atomic_write_text(tmp_path / "cells.csv", "x\n")
    finally:
        os.umask(before)
    assert path.stat().st_mode & 0o777 == 0o600


def test_every_error_wbc_batch_raises_on_purpose_has_one_base():
    # a program using wbc-batch as a library had to list a dozen classes to catch its errors
    from wbc_batch import (backend, bundle, devices, errors, imageio, ledger, plugins, results,
                           truth)
    from wbc_batch.train import datasets, folders

    raised = [errors.PipelineError, errors.ReportError, errors.WatchError, plugins.PluginError,
              ledger.LedgerError, devices.DeviceError, backend.BackendError, bundle.BundleError,
              truth.TruthError, imageio.ImageReadError, imageio.NotASmearError,
              results.ImageNotAnalysable, datasets.TrainingDataError, folders.BundleFolderError,
              errors.ConfigError, errors.RunnerClosedError]
    assert all(issubclass(cls, errors.WbcBatchError) for cls in raised)
    # a value that cannot be read as an image, as every bad value given, is a ValueError; a
    # Runner called after close(), or an OUT another run holds, a state: a RuntimeError
    from wbc_batch.output_folder import OutputBusyError

    with pytest.raises(ValueError, match="not an image file"):
        imageio.decode_smear(b"garbage, not an image")
    assert issubclass(imageio.NotASmearError, ValueError)
    assert issubclass(errors.RunnerClosedError, RuntimeError)
    assert issubclass(OutputBusyError, RuntimeError)
    from wbc_batch.config import AnalysisParams

    with pytest.raises(errors.WbcBatchError, match="diameter_px"):  # what a library user
        AnalysisParams(diameter_px=-1)                              # meets first
    assert issubclass(devices.DeviceError, ValueError)  # and still what they were
    assert issubclass(bundle.BundleError, RuntimeError)


def test_a_plugin_that_cannot_be_loaded_is_a_pipeline_error_for_run(make_config, image_folder,
                                                                    tmp_path, monkeypatch):
    # run() and Runner promise PipelineError; an installed plugin that could not be loaded came
    # out as PluginError
    import wbc_batch.pipeline as pipeline
    from wbc_batch.plugins import PluginError

    def broken(*args, **kwargs):
        raise PluginError("the 'wbc_batch' plugin 'acme' cannot be loaded")

    monkeypatch.setattr(pipeline, "get_plugin_manager", broken)
    with pytest.raises(PipelineError, match="plugin 'acme' cannot be loaded"):
        run(make_config(image_folder, tmp_path / "out"))


def test_a_session_not_thread_safe_gets_one_call_at_a_time_from_process_array(pm, make_config,
                                                                            tmp_path):
    # `run` kept to one image at a time for it; a program calling process_array from several
    # threads sent its calls at once
    import threading

    class OneAtATime(FakeSession):
        thread_safe = False

        def __init__(self):
            super().__init__()
            self.inside, self.most = 0, 0
            self.guard = threading.Lock()

        def _enter(self):
            with self.guard:
                self.inside += 1
                self.most = max(self.most, self.inside)
            time.sleep(0.01)
            with self.guard:
                self.inside -= 1

        def segment(self, batch):
            self._enter()
            return super().segment(batch)

    session = OneAtATime()
    runner = Runner(make_config(tmp_path, tmp_path / "out"), pm, session=session)
    field = standard_field()
    threads = [threading.Thread(target=runner.process_array, args=(field, f"{i}.png"))
               for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert session.segment_calls >= 4 and session.most == 1
    runner.close()
    with pytest.raises(PipelineError, match="this Runner is closed") as late:
        runner.process_array(field, "late.png")
    assert isinstance(late.value, RuntimeError)  # a state, not a value given
    with pytest.raises(PipelineError, match="this Runner is closed"):  # not a report of errors
        runner.run([])
    assert not (tmp_path / "out").exists()


def test_run_config_refuses_values_that_failed_later_or_meant_another_thing(tmp_path):
    import numpy as np

    from wbc_batch.config import AnalysisParams, RunConfig

    for kw, said in ((dict(writers="csv"), "writers must be a tuple of report writer names"),
                     (dict(analysis={"review_threshold": 0.9}), "analysis must be an AnalysisParams"),
                     (dict(save_overlays="no"), "save_overlays must be True or False")):
        with pytest.raises(ValueError, match=said):  # "c", "s", "v"; every image failing; true
            RunConfig(input_dir=tmp_path, output_dir=tmp_path / "out", **kw)
    params = AnalysisParams(diameter_px=np.float32(110.0), max_side=np.int64(1024),
                            stain_check=np.True_)
    assert type(params.diameter_px) is float and type(params.max_side) is int  # not "110.0"
    assert params.stain_check is True  # not "True" in run.json and the watch fingerprint
    with pytest.raises(ValueError, match="AnalysisParams.fill_margins must be True or False"):
        AnalysisParams(fill_margins="no")
    config = RunConfig(input_dir=tmp_path, output_dir=tmp_path, save_overlays=np.False_,
                       writers=(w for w in ["csv"]))
    assert config.save_overlays is False and config.writers == ("csv",)  # not used up: ()
    with pytest.raises(ValueError, match="writers must be a tuple"):
        RunConfig(input_dir=tmp_path, output_dir=tmp_path, writers=None)
