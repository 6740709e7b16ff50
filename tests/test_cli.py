"""The command line, in-process with click's CliRunner and the fake backend."""

import dataclasses
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from wbc_batch.cli import build_cli, build_config, main
from wbc_batch.config import AnalysisParams, RunConfig

from conftest import write_image, draw_field


def test_run_ok(invoke, image_folder, tmp_path, fake_cli_args):
    out = tmp_path / "out"
    res = invoke("run", image_folder, "-o", out, *fake_cli_args)
    assert res.exit_code == 0, res.output
    assert "4 image(s) in" in res.stderr and "backend fake on cpu" in res.stderr
    assert "Done: 4 image(s), 4 ok, 0 failed, 7 WBC(s)" in res.stderr
    for name in ("cells.csv", "images.csv", "summary.csv", "report.xlsx", "run.json"):
        assert (out / name).is_file(), name
    assert (out / "overlays" / "s1" / "a.png.png").is_file()
    assert not (out / "masks").exists()


def test_help_groups_options_by_concern(invoke):
    res = invoke("run", "--help")
    assert res.exit_code == 0
    text = res.output
    heads = ["Input and output:", "Model and analysis:", "Hardware:", "Ground truth (accuracy report):"]
    positions = [text.index(h) for h in heads]
    assert positions == sorted(positions)
    assert text.index("--device") > text.index("Hardware:") > text.index("--diameter")
    for option in ("--output", "--backend", "--device", "--model", "--diameter", "--review-threshold",
                   "--save-masks", "--no-overlays", "--report", "--truth", "--truth-format",
                   "--threads", "--quiet", "--overwrite"):
        assert option in text


def _commands(group, path=()):
    import click

    for name, cmd in group.commands.items():
        yield path + (name,)
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, path + (name,))


def test_every_help_page_renders_its_text_as_written(pm, invoke):
    """Help strings are shown verbatim (click does no %-formatting): no '%%' leaks through."""
    paths = list(_commands(build_cli(pm)))
    assert ("train", "classifier") in paths and ("run",) in paths
    for path in paths:
        res = invoke(*path, "--help")
        assert res.exit_code == 0, path
        assert "%%" not in res.output, path


def test_some_images_failed_exit_1(invoke, image_folder, tmp_path, fake_cli_args):
    (image_folder / "s2" / "zz.png").write_bytes(b"")
    res = invoke("run", image_folder, "-o", tmp_path / "out", *fake_cli_args)
    assert res.exit_code == 1
    assert "failed: s2/zz.png: empty file (0 bytes)" in res.stderr


def test_a_run_whose_reports_cannot_be_written_says_so_last_not_results_in_out(
        invoke, image_folder, tmp_path, fake_cli_args, monkeypatch):
    # before: "Done: ... Results in OUT" (and the cells' lines) after the one line saying that
    # no report could be written, OUT holding overlays alone
    import wbc_batch.pipeline as pipeline

    def no_room(*args, **kwargs):  # OUT's disk full once the images are done
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pipeline.tempfile, "mkdtemp", no_room)
    out = tmp_path / "out"
    res = invoke("run", image_folder, "-o", out, *fake_cli_args)
    assert res.exit_code == 1 and not (out / "run.json").exists()
    assert "Results in" not in res.stderr
    assert f"No report of this run could be written to {out} (see above)" in res.stderr
    assert res.stderr.strip().splitlines()[-1] == (
        f"No report of this run is in {out} (why is said above, such as a full or read-only "
        "disk); once that is mended, run again with --overwrite.")


@pytest.mark.parametrize("args, message", [
    (["--backend", "nope"], "unknown backend 'nope' (installed: fake, onnx, torch)"),
    (["--device", "gpu"], "invalid device 'gpu'"),
    (["--report", "pdf"], "unknown report writer 'pdf'"),
    (["--truth-format", "nope", "--truth", "."], "unknown truth format 'nope'"),
    (["--threads", "-1"], "--threads"),
    (["--threads", "2147483648"], "2147483648 is not in the range 0<=x<=1024"),  # torch/ORT errors
    (["--outline-eps", "1e20"], "is not in the range 0.0001<=x<=1"),  # before: no cells, exit 0
    (["--outline-eps", "1e-5"], "is not in the range 0.0001<=x<=1"),  # before: NaN, wrong grey outlines
    (["--review-threshold", "2"], "--review-threshold"),
    (["--review-threshold", "nan"], "nan is not a finite number"),  # nan passes every range check
    (["--diameter", "inf"], "inf is not a finite number"),
    (["--diameter", "0.5"], "0.5 is not in the range x>=8"),  # 433 'WBCs' in one field before
])
def test_usage_errors_exit_2(invoke, image_folder, tmp_path, fake_bundle, args, message):
    base = ["--backend", "fake", "--model", str(fake_bundle)]
    res = invoke("run", image_folder, "-o", tmp_path / "out", *base, *args)
    assert res.exit_code == 2, res.output
    assert message in res.output
    assert not (tmp_path / "out").exists()


def test_missing_input_and_missing_output_option(invoke, tmp_path, fake_cli_args):
    res = invoke("run", tmp_path / "nowhere", "-o", tmp_path / "out", *fake_cli_args)
    assert res.exit_code == 2 and "input folder not found" in res.output
    res = invoke("run", tmp_path)
    assert res.exit_code == 2 and "Missing option '-o'" in res.output


def test_reports_selected_by_name(invoke, image_folder, tmp_path, fake_cli_args):
    out = tmp_path / "out"
    res = invoke("run", image_folder, "-o", out, "--report", "csv", *fake_cli_args)
    assert res.exit_code == 0
    assert (out / "cells.csv").is_file() and not (out / "report.xlsx").exists()


def test_quiet_prints_nothing(invoke, image_folder, tmp_path, fake_cli_args):
    res = invoke("run", image_folder, "-o", tmp_path / "out", "--quiet", *fake_cli_args)
    assert res.exit_code == 0 and res.output == ""


def test_quiet_still_says_what_went_wrong_and_a_gpu_asked_for_but_not_used(invoke, tmp_path,
                                                                           image_folder,
                                                                           fake_cli_args):
    # a scheduled `run -q` said nothing of its failed images, yet "Note: no CUDA device found"
    # on every CPU-only PC, where nobody had asked for a GPU
    (image_folder / "s1" / "bad.png").write_bytes(b"not an image")
    res = invoke("run", image_folder, "-o", tmp_path / "a", "--quiet", *fake_cli_args,
                 "--device", "auto")
    assert res.exit_code == 1
    assert res.stderr.splitlines() == ["  failed: s1/bad.png: not an image file (content is not "
                                       "JPEG, PNG, BMP or TIFF)"]
    res = invoke("run", image_folder, "-o", tmp_path / "b", "--quiet", *fake_cli_args,
                 "--device", "cuda")
    assert res.stderr.splitlines()[0] == ("Note: cuda requested but no CUDA device found; "
                                          "running on the CPU")
    assert res.stderr.count("Note:") == 1  # one line, once
    res = invoke("watch", image_folder, "-o", tmp_path / "w", "--once", "--quiet", "--settle",
                 "0", "--max-attempts", "1", *fake_cli_args, "--device", "cuda")
    assert res.exit_code == 1 and "Note: cuda requested but no CUDA device found" in res.stderr
    assert res.stderr.count("Note:") == 1
    assert "s1/bad.png: not an image file" in res.stderr and "Done" not in res.stderr
    res = invoke("watch", image_folder, "-o", tmp_path / "w2", "--once", "--quiet", "--settle",
                 "0", "--max-attempts", "1", *fake_cli_args, "--device", "auto")
    assert "s1/bad.png: not an image file" in res.stderr and "Note" not in res.stderr


@pytest.mark.parametrize("option, said", [("--device", "invalid device ''"),
                                           ("--backend", "names no backend")])
def test_an_empty_device_or_backend_is_refused_not_taken_for_the_default(invoke, tmp_path,
                                                                       image_folder, option,
                                                                       said):
    # `--device "$GPU"` with the variable unset ran quietly on auto
    res = invoke("run", image_folder, "-o", tmp_path / "out", option, "")
    assert res.exit_code == 2 and said in res.output and not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["run", "watch", "evaluate"])
def test_an_empty_input_or_output_is_refused_not_taken_for_the_current_folder(
        invoke, tmp_path, image_folder, command, monkeypatch):
    # `wbc-batch run "$SCANNER_DIR" -o "$OUT"` with a variable unset analysed, or wrote into,
    # the folder the script ran in
    monkeypatch.chdir(tmp_path)
    extra = ["--truth", image_folder] if command == "evaluate" else []
    tries = [("", tmp_path / "out", "'INBOX'" if command == "watch" else "'INPUT'"),
             (image_folder, "", "'-o' / '--output'")]
    for inp, out, named in tries[1:] if command == "evaluate" else tries:  # evaluate's INPUT
        res = invoke(command, inp, "-o", out, *extra)                      # must exist already
        assert res.exit_code == 2, res.output
        assert f"Invalid value for {named}: is empty: it names no folder" in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["input"]  # nothing written


def test_an_earlier_runs_drawings_given_as_input_are_refused(invoke, image_folder, tmp_path,
                                                             fake_cli_args):
    # a wrong pick in a file dialog: the overlays of a results folder were analysed as smears,
    # into a plausible report of wrong classes
    res = invoke("run", image_folder, "-o", tmp_path / "res", *fake_cli_args)
    assert res.exit_code == 0, res.output
    for drawn in ("overlays", "overlays/s1"):
        res = invoke("run", tmp_path / "res" / drawn, "-o", tmp_path / "again", *fake_cli_args)
        assert res.exit_code == 2 and not (tmp_path / "again").exists()
        assert (f"the input folder lies in {(tmp_path / 'res' / 'overlays').resolve()}, the "
                "drawings of an earlier run") in " ".join(res.output.split())
    # a lab's own Masks/ there, where case tells names apart, is smears (as a run of res finds)
    shutil.copytree(image_folder / "s1", tmp_path / "res" / "Masks" / "s1")
    if not (tmp_path / "res" / "masks").exists():
        res = invoke("run", tmp_path / "res" / "Masks", "-o", tmp_path / "again", *fake_cli_args)
        assert res.exit_code == 0, res.output


def test_help_lists_options_under_headings_and_no_bare_argument(invoke, monkeypatch):
    # click 8.5 gives arguments a help record: INPUT showed alone under "Other:"
    import click

    monkeypatch.setattr(click.Argument, "get_help_record",
                        lambda self, ctx: (self.name.upper(), ""), raising=False)
    res = invoke("run", "--help")
    other = res.output.split("Other:")[1]
    assert res.exit_code == 0 and "INPUT" not in other and "--help" in other


def test_a_diameter_larger_than_an_image_fails_that_image_with_the_reason(invoke, image_folder,
                                                                          tmp_path, fake_cli_args):
    # 600 typed for 60: before, every image was "ok" with no WBC, and exit 0
    out = tmp_path / "out"
    res = invoke("run", image_folder, "-o", out, "--diameter", "230", "--report", "csv",
                 *fake_cli_args)
    assert res.exit_code == 1
    images = pd.read_csv(out / "images.csv").set_index("image")
    assert images.loc["s1/a.png", "status"] == "ok"  # 320x240: the diameter fits
    # the reason alone: "analysis failed: ValueError:" before it read as a fault of the software
    assert images.loc["top.png", "error"] == ("the WBC diameter given (--diameter 230 px) is larger "
                                              "than the image's shorter side (200x200): no WBC "
                                              "fits in it")
    # longer than the short side only (600 typed for 60 on a 640x480 field): "ok, 0 WBCs" before
    invoke("run", image_folder, "-o", tmp_path / "b", "--diameter", "300", "--report", "csv",
           *fake_cli_args)
    images = pd.read_csv(tmp_path / "b" / "images.csv").set_index("image")
    assert images.loc["s1/a.png", "error"].endswith("shorter side (320x240): no WBC fits in it")


def test_masks_overlays_threshold_diameter(invoke, image_folder, tmp_path, fake_cli_args):
    out = tmp_path / "out"
    res = invoke("run", image_folder, "-o", out, "--save-masks", "--no-overlays",
                 "--review-threshold", "0.99", "--diameter", "48", *fake_cli_args)
    assert res.exit_code == 0, res.output
    assert (out / "masks" / "s2" / "c.png.png").is_file() and not (out / "overlays").exists()
    cells = pd.read_csv(out / "cells.csv")
    assert cells["needs_review"].all()


@pytest.mark.parametrize("field, value, message", [
    ("diameter_px", -5.0, "diameter_px must be None (estimated per image) or at least 8 pixels"),
    ("diameter_px", float("nan"), "diameter_px must be a finite number, not nan"),
    ("max_side", 0, "max_side must be a whole number of at least 256 pixels, not 0"),
    ("max_side", 512.5, "max_side must be a whole number"),
    ("tta_views", 3, "tta_views must be 1, 4 or 8, not 3"),
    ("review_threshold", float("nan"), "review_threshold must be a finite number"),
    ("review_threshold", 1.5, "review_threshold must be from 0 to 1, not 1.5"),
    ("box_trim", -1.0, "box_trim must be from 0 to 0.5, not -1.0"),
    ("outline_eps", 0.0, "outline_eps must be from 0.0001 to 1, not 0.0"),
    ("outline_eps", 1e-5, "outline_eps must be from 0.0001 to 1"),
    ("outline_eps", 1e20, "outline_eps must be from 0.0001 to 1"),
    ("min_falloff", "0.2", "min_falloff must be a finite number, not '0.2'"),
])
def test_analysis_params_from_python_refuse_what_the_command_line_refuses(field, value, message):
    # before: diameter_px=-5 or max_side=0 gave 0 cells and exit 0; tta_views=3 or a nan
    # diameter failed every image; nothing said why
    with pytest.raises(ValueError, match=re.escape(f"AnalysisParams.{message}")):
        AnalysisParams(**{field: value})


def test_analysis_params_take_every_value_the_command_line_takes():
    import numpy as np

    from wbc_batch.cli import run_command
    from wbc_batch.config import _RANGES

    options = {p.name: p for p in run_command.params}
    for option, field in (("review_threshold", "review_threshold"), ("box_trim", "box_trim"),
                          ("outline_refine", "outline_refine"), ("outline_eps", "outline_eps"),
                          ("grey_nucleus_contrast", "min_grey_nucleus_contrast"),
                          ("nucleus_over_field", "min_nucleus_over_field")):
        kind = options[option].type
        assert (kind.min, kind.max) == _RANGES[field], option  # the same bounds in both places
        AnalysisParams(**{field: kind.max})
        if not kind.min_open:
            AnalysisParams(**{field: kind.min})
    assert options["diameter"].type.min == 8
    AnalysisParams(diameter_px=8, tta_views=np.int64(8), max_side=256, min_falloff=0,
                   review_threshold=np.float32(0.5))
    for views in options["tta_views"].type.choices:
        AnalysisParams(tta_views=int(views))


def test_overwrite(invoke, image_folder, tmp_path, fake_cli_args):
    out = tmp_path / "out"
    assert invoke("run", image_folder, "-o", out, *fake_cli_args).exit_code == 0
    res = invoke("run", image_folder, "-o", out, *fake_cli_args)
    assert res.exit_code == 2 and "already holds results" in res.output and "--overwrite" in res.output
    assert "RunConfig" not in res.output  # a technician is told the option, not the Python API
    assert "summary.csv and 2 more)" in " ".join(res.output.split())  # report.xlsx, overlays/
    assert invoke("run", image_folder, "-o", out, "--overwrite", *fake_cli_args).exit_code == 0


def test_build_config_is_frozen_and_complete(tmp_path):
    cfg = build_config(tmp_path, tmp_path / "o", backend="onnx", device="CUDA:1", diameter=60.0,
                       review_threshold=0.7, save_masks=True, no_overlays=True, reports=("csv",),
                       threads=2, quiet=True, overwrite=True, model_dir=tmp_path, tta_views="4",
                       box_trim=0.0, grey_nucleus_contrast=0.4, fill_margins=True,
                       nucleus_over_field=1.5, border_arc=True, fill_white_stop=True)
    assert cfg.analysis.min_nucleus_over_field == 1.5 and cfg.analysis.border_arc is True
    assert cfg.analysis.fill_white_stop is True
    assert build_config(tmp_path, tmp_path / "o").analysis.fill_white_stop is False
    assert isinstance(cfg, RunConfig) and cfg.analysis.tta_views == 4 and cfg.analysis.box_trim == 0
    assert cfg.analysis.min_grey_nucleus_contrast == 0.4 and cfg.analysis.fill_margins
    assert (cfg.backend, cfg.device, cfg.threads, cfg.writers) == ("onnx", "cuda:1", 2, ("csv",))
    assert cfg.analysis.diameter_px == 60.0 and cfg.analysis.review_threshold == 0.7
    assert cfg.save_masks and not cfg.save_overlays and cfg.quiet and cfg.overwrite
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.backend = "torch"
    assert build_config(tmp_path, tmp_path / "o").writers == ("csv", "xlsx")
    assert build_config(tmp_path, tmp_path / "o").analysis.box_trim == AnalysisParams.box_trim > 0
    assert build_config(tmp_path, tmp_path / "o").analysis.min_grey_nucleus_contrast == 0.26
    assert not build_config(tmp_path, tmp_path / "o").analysis.fill_margins  # off by default
    assert build_config(tmp_path, tmp_path / "o").analysis.min_nucleus_over_field == 0  # off too
    assert build_config(tmp_path, tmp_path / "o").analysis.border_arc is False  # and this


def test_border_arc_is_a_run_option_that_keeps_a_cut_fields_scale(invoke, tmp_path, fake_cli_args):
    """`--border-arc` reaches the analysis: a field cut through its only WBC is analysed at the
    whole field's scale with it, at 0.71 of it without, and run.json says which."""
    write_image(tmp_path / "in" / "whole.png", draw_field(400, 300, cells=[(200, 150, 50)]))
    write_image(tmp_path / "in" / "half.png", draw_field(400, 300, cells=[(200, 150, 50)])[:, 200:])
    size = {}
    for args, expected in (((), False), (("--border-arc",), True)):
        out = tmp_path / f"out-{expected}"
        res = invoke("run", tmp_path / "in", "-o", out, *fake_cli_args, *args)
        assert res.exit_code == 0, res.output
        info = json.loads((out / "run.json").read_text())
        assert info["parameters"]["analysis"]["border_arc"] is expected
        table = pd.read_csv(out / "images.csv")
        rows = dict(zip(table["image"], table["wbc_diameter_px"]))
        size[expected] = rows["half.png"] / rows["whole.png"]
    assert size[False] == pytest.approx(0.71, abs=0.05) and size[True] == pytest.approx(1, abs=0.05)


def test_plugins_command(invoke):
    res = invoke("plugins")
    assert res.exit_code == 0
    assert "torch" in res.output and "built-in (wbc_batch_plugins.torch_backend)" in res.output
    assert "fake" in res.output and "fake: always usable" in res.output
    assert "Report writers: csv, xlsx" in res.output
    assert "Truth readers:" in res.output
    assert "Commands:" in res.output and "run" in res.output and "export-onnx" in res.output


def test_plugins_lists_a_backend_whose_availability_calls_sys_exit(pm, invoke):
    # before: SystemExit went past `except Exception`: the listing ended there, exit code 9
    from wbc_batch.hookspecs import hookimpl

    class Quitter:
        name = "quitter"

        def availability(self):
            sys.exit(9)

        def open(self, bundle, device):
            raise AssertionError("not opened by `plugins`")

    class Plugin:
        @hookimpl
        def wbc_register_backends(self):
            return [Quitter()]

    pm.register(Plugin(), name="quitter-plugin")
    res = invoke("plugins")
    assert res.exit_code == 0
    assert re.search(r"quitter\s+NOT usable\s+availability check failed: SystemExit: 9", res.output)
    assert "Report writers: csv, xlsx" in res.output


def test_a_session_failing_to_close_after_a_complete_run_keeps_its_summary_and_exit_code(
        invoke, fake_plugin, image_folder, tmp_path, fake_cli_args, monkeypatch, caplog):
    # before: a traceback, exit code 1 and no "Done:" line after a complete run
    from conftest import FakeSession

    def close(self):
        raise RuntimeError("driver gone\nsecond line")

    monkeypatch.setattr(FakeSession, "close", close, raising=False)
    res = invoke("run", image_folder, "-o", tmp_path / "out", *fake_cli_args)
    assert res.exit_code == 0 and "Done: 4 image(s), 4 ok" in res.stderr
    assert "backend 'fake' failed to close its session: RuntimeError: driver gone" in caplog.text
    assert "second line" not in caplog.text


def test_export_onnx_calls_the_export(invoke, tmp_path, monkeypatch):
    import wbc_batch.export as export

    seen = {}

    class Report:
        files = (tmp_path / "x" / "segmenter.onnx", tmp_path / "x" / "classifier.onnx")

        def lines(self):
            return ["segmenter: max |torch - onnx| logit difference 1.0e-06"]

    def fake_export(bundle_dir, out_dir):
        seen["args"] = (bundle_dir, out_dir)
        return Report()

    monkeypatch.setattr(export, "export_onnx", fake_export)
    res = invoke("export-onnx", "--model", tmp_path, "-o", tmp_path / "x")
    assert res.exit_code == 0
    assert seen["args"] == (tmp_path, tmp_path / "x")
    assert "logit difference 1.0e-06" in res.output
    assert res.output.splitlines()[-1] == (f"Wrote segmenter.onnx, classifier.onnx, bundle.json "
                                           f"and a copy of the bundle's weights in "
                                           f"{tmp_path / 'x'}")  # which folder: it said none


@pytest.mark.parametrize("args", [(), ("--model", "{shipped}"), ("-o", "{shipped}"),
                                  ("--model", "{tmp}", "-o", "{shipped}/lab")])
def test_export_onnx_never_writes_into_the_package(invoke, tmp_path, monkeypatch, args):
    # before: a plain `export-onnx` rewrote the shipped exports and bundle.json in place
    from wbc_batch import export
    from wbc_batch.bundle import DEFAULT_BUNDLE_DIR

    monkeypatch.setattr(export, "export_onnx", lambda *a: pytest.fail("exported into the package"))
    res = invoke("export-onnx", *(a.format(shipped=DEFAULT_BUNDLE_DIR, tmp=tmp_path) for a in args))
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "shipped with wbc-batch" in res.output or "inside the installed wbc_batch" in res.output
    assert "-o MY_BUNDLE" in res.output


def test_export_onnx_into_a_file_says_so_without_a_traceback(invoke, tmp_path):
    afile = tmp_path / "AFILE"
    afile.write_text("not a folder")
    res = invoke("export-onnx", "-o", afile)
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert f"-o {afile} is a file: name a folder for the model bundle" in res.output
    assert afile.read_text() == "not a folder"


def test_export_onnx_never_replaces_another_bundle_or_fills_a_results_folder(
        invoke, tmp_path, image_folder, fake_cli_args):
    # before: another bundle's bundle.json and weights were replaced without a word, and a
    # run's results folder got a bundle's files beside its reports
    import shutil

    from wbc_batch.bundle import DEFAULT_BUNDLE_DIR

    other = tmp_path / "other"
    shutil.copytree(DEFAULT_BUNDLE_DIR, other, ignore=shutil.ignore_patterns("*.onnx"))
    (other / "classifier.safetensors").write_bytes(b"another classifier")
    before = {p.name: p.read_bytes() for p in other.iterdir()}
    res = invoke("export-onnx", "-o", other)
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert f"-o {other} holds another model bundle (its classifier is not" in res.output
    assert {p.name: p.read_bytes() for p in other.iterdir()} == before
    assert invoke("run", image_folder, "-o", tmp_path / "results", *fake_cli_args).exit_code == 0
    res = invoke("export-onnx", "-o", tmp_path / "results")
    assert res.exit_code == 2 and "holds the results of a wbc-batch run or watch" in res.output
    assert not (tmp_path / "results" / "bundle.json").exists()


def test_export_onnx_of_a_bundle_it_cannot_read_names_the_file(invoke, tmp_path):
    import shutil

    from wbc_batch.bundle import DEFAULT_BUNDLE_DIR

    bundle = tmp_path / "bundle"
    shutil.copytree(DEFAULT_BUNDLE_DIR, bundle)
    (bundle / "classifier.safetensors").unlink()
    (bundle / "classifier.safetensors").mkdir()          # a folder where the weights should be
    res = invoke("export-onnx", "--model", bundle, "-o", tmp_path / "exported")
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert f"model file {bundle / 'classifier.safetensors'} is a folder, not a file" in res.output
    # before: the folder was made and half filled (bundle.json, the segmenter's weights)
    assert not (tmp_path / "exported").exists()
    (bundle / "classifier.safetensors").rmdir()
    res = invoke("export-onnx", "--model", bundle, "-o", tmp_path / "exported")
    assert res.exit_code == 2 and not (tmp_path / "exported").exists()
    assert "classifier.safetensors" in res.output


def test_export_onnx_without_the_onnx_package_says_how_to_get_it(invoke, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnx" else real(name, *a))
    res = invoke("export-onnx", "--model", tmp_path)
    assert res.exit_code == 2 and "Traceback" not in res.output  # a setup error, as README says
    assert 'needs the onnx package' in res.output and 'pip install onnx' in res.output


def test_export_onnx_without_onnxruntime_or_a_writable_bundle_writes_nothing(invoke, tmp_path,
                                                                             monkeypatch):
    # without onnxruntime: a traceback from the parity check, after the files were written;
    # a bundle that cannot be written: exit 1 naming a temporary file
    import wbc_batch.export as export
    from wbc_batch.bundle import DEFAULT_BUNDLE_DIR

    bundle = tmp_path / "b"
    shutil.copytree(DEFAULT_BUNDLE_DIR, bundle, ignore=shutil.ignore_patterns("*.onnx"))
    monkeypatch.setattr(export, "export_onnx", lambda *a: pytest.fail("exported"))
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    res = invoke("export-onnx", "--model", bundle)
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert res.output.strip() == ("Error: export-onnx checks the export with onnxruntime, which "
                                  "cannot be imported: onnxruntime is not installed; install it "
                                  "with: pip install onnxruntime-gpu (pip install onnxruntime "
                                  "where no GPU build exists, as on macOS)")
    monkeypatch.delitem(sys.modules, "onnxruntime")
    monkeypatch.setattr("os.access", lambda path, mode: not (Path(path) == bundle
                                                             and mode & os.W_OK))
    res = invoke("export-onnx", "--model", bundle)
    assert res.exit_code == 2 and "cannot be written (no permission): export into a folder of " \
        "your own with -o NEW_FOLDER" in res.output


def test_truth_adds_accuracy(invoke, tmp_path, fake_cli_args):
    root = tmp_path / "in"
    write_image(root / "a.png", draw_field(200, 200, [(100, 100, 30)]))
    write_image(root / "b.png", draw_field(200, 200, [(90, 110, 30)]))
    truth = tmp_path / "truth.csv"
    truth.write_text("image,class\na.png,neutrophil\nb.png,lymphocyte\n", encoding="utf-8")
    out = tmp_path / "out"
    res = invoke("run", root, "-o", out, "--truth", truth, "--truth-format", "csv", *fake_cli_args)
    assert res.exit_code == 0, res.output
    assert (out / "accuracy.csv").is_file()
    # a later run without truth does not leave a stale accuracy.csv behind
    res = invoke("run", root, "-o", out, "--overwrite", *fake_cli_args)
    assert res.exit_code == 0 and not (out / "accuracy.csv").exists()


def test_truth_for_some_images_says_how_many_and_a_format_without_truth_is_refused(
        invoke, image_folder, tmp_path, fake_cli_args, caplog):
    truth = tmp_path / "truth.csv"
    truth.write_text("image,class\ns1/a.png,neutrophil\n", encoding="utf-8")
    res = invoke("run", image_folder, "-o", tmp_path / "out", "--truth", truth, *fake_cli_args)
    assert res.exit_code == 0, res.output
    assert "ground truth found for 1 of 4 images" in caplog.text
    # the reader found for it is said, and kept in run.json
    assert f"Truth: {truth} read as 'csv'" in res.output
    info = json.loads((tmp_path / "out" / "run.json").read_text(encoding="utf-8"))
    assert info["parameters"]["truth_format"] is None and info["parameters"]["truth_reader"] == "csv"
    res = invoke("run", image_folder, "-o", tmp_path / "out2", "--truth-format", "csv", *fake_cli_args)
    assert res.exit_code == 2 and "names how to read --truth, which is not given" in res.output


def test_a_signal_while_overwrite_removes_the_earlier_results_says_no_report_was_written(
        invoke, image_folder, tmp_path, fake_cli_args, monkeypatch):
    # a review: it said "reports written for the images finished so far" while OUT held the
    # earlier run's reports (now removed first, and whole: see test_pipeline)
    import signal

    from wbc_batch import output_folder

    out = tmp_path / "out"
    assert invoke("run", image_folder, "-o", out, *fake_cli_args).exit_code == 0
    real, calls = output_folder.remove_artifacts, []

    def removing(out_dir, name):
        calls.append(name)
        if len(calls) == 1:
            signal.raise_signal(signal.SIGTERM)
        return real(out_dir, name)

    monkeypatch.setattr(output_folder, "remove_artifacts", removing)
    res = invoke("run", image_folder, "-o", out, "--overwrite", *fake_cli_args)
    assert res.exit_code == 143
    assert res.stderr.strip() == ("Interrupted before any image was analysed: no reports were "
                                  "written (--overwrite had removed the earlier run's results "
                                  "first).")
    assert not (out / "run.json").exists() and not list((out / "overlays").rglob("*.png"))


@pytest.mark.parametrize("stop, code, said", [
    (KeyboardInterrupt(), 130, "Interrupted before the watcher started; nothing was analysed."),
    ("StopNow", 143, "Stopped at once (second signal); the ledger is consistent"),
])
def test_watch_says_what_a_stop_left(invoke, image_folder, tmp_path, fake_cli_args, monkeypatch,
                                     stop, code, said):
    # a Ctrl-C before the watcher's own handlers (while OUT is checked) was "Stopped at once
    # (second interrupt)", as if a first one had been handled
    import signal

    from wbc_batch import interrupts, output_folder

    if stop == "StopNow":
        stop = interrupts.StopNow(signal.SIGTERM)

    def checking(config):
        raise stop

    monkeypatch.setattr(output_folder, "check_folders", checking)
    res = invoke("watch", image_folder, "-o", tmp_path / "out", "--once", *fake_cli_args)
    assert res.exit_code == code and said in res.stderr


def test_interrupt_exits_130_with_reports(pm, invoke, image_folder, tmp_path, fake_cli_args):
    from wbc_batch.hookspecs import hookimpl

    class Interrupt:
        @hookimpl
        def wbc_image_start(self, image, index, total):
            if index == 1:
                raise KeyboardInterrupt

    pm.register(Interrupt())
    res = invoke("run", image_folder, "-o", tmp_path / "out", *fake_cli_args)
    assert res.exit_code == 130 and "Interrupted" in res.stderr
    assert (tmp_path / "out" / "run.json").is_file()


def test_version(invoke):
    res = invoke("--version")
    assert res.exit_code == 0 and "wbc-batch, version" in res.output


def test_python_m_wbc_batch_is_the_command():
    # for a venv not activated: its scripts folder, with wbc-batch, is not on PATH
    import subprocess

    res = subprocess.run([sys.executable, "-m", "wbc_batch", "--version"], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.startswith("wbc-batch, version"), res.stderr


def test_main_reports_plugin_errors_as_usage_errors(monkeypatch, capsys):
    import wbc_batch.plugins as plugins

    def broken(*a, **k):
        raise plugins.PluginError("a 'wbc_batch' entry-point plugin failed to load: boom")

    monkeypatch.setattr(plugins, "get_plugin_manager", broken)
    with pytest.raises(SystemExit) as info:
        main(["plugins"])
    assert info.value.code == 2
    assert "failed to load: boom" in capsys.readouterr().err


# --- the progress bar plugin ----------------------------------------------------------------------

class TTY(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_only_on_a_terminal_and_not_quiet(pm, make_config, image_folder, tmp_path,
                                                       monkeypatch):
    from wbc_batch.pipeline import run

    tty = TTY()
    monkeypatch.setattr(sys, "stderr", tty)
    run(make_config(image_folder, tmp_path / "a", quiet=False), pm)
    drawn = tty.getvalue()
    assert "\r[" in drawn and "4/4" in drawn and drawn.endswith("\n")

    tty = TTY()
    monkeypatch.setattr(sys, "stderr", tty)
    run(make_config(image_folder, tmp_path / "b", quiet=True), pm)
    assert tty.getvalue() == ""

    pipe = io.StringIO()  # not a terminal
    monkeypatch.setattr(sys, "stderr", pipe)
    run(make_config(image_folder, tmp_path / "c", quiet=False), pm)
    assert pipe.getvalue() == ""


def test_progress_line():
    from wbc_batch_plugins.progress import ProgressBar

    bar = ProgressBar(4, io.StringIO())
    assert bar.line().startswith("[" + "." * 28 + "] 0/4")
    bar.start_image("s1/a.png", 4)
    bar.finish_image(True, 4)
    bar.finish_image(False, 4)
    line = bar.line()
    assert "2/4" in line and "1 error" in line and "img/s" in line and "left" in line


def test_a_duplicate_is_said_apart_and_is_no_failure(invoke, tmp_path, fake_cli_args, monkeypatch):
    import shutil

    import wbc_batch_plugins.progress as progress

    finished = []
    monkeypatch.setattr(progress.ProgressBar, "finish_image",
                        lambda self, ok, total: finished.append(ok))
    monkeypatch.setattr(progress, "_interactive", lambda stream: True)
    root = tmp_path / "in"
    write_image(root / "a.png", draw_field(200, 200, [(100, 100, 22)]))
    shutil.copyfile(root / "a.png", root / "b.png")
    res = invoke("run", root, "-o", tmp_path / "out", *fake_cli_args)
    assert res.exit_code == 0, res.output
    assert ("Done: 2 image(s), 1 ok, 0 failed, 1 duplicate(s) counted under their first name, "
            "1 WBC(s)") in res.stderr
    assert "failed: b.png" not in res.stderr   # not listed among the failed images
    assert "another sample" not in res.stderr
    assert finished == [True, True]    # the progress bar counts no error


def test_a_copy_of_another_samples_file_is_said(invoke, tmp_path, fake_cli_args):
    import shutil

    root = tmp_path / "in"
    write_image(root / "p1" / "a.png", draw_field(200, 200, [(100, 100, 22)]))
    (root / "p2").mkdir()
    shutil.copyfile(root / "p1" / "a.png", root / "p2" / "a.png")
    res = invoke("run", root, "-o", tmp_path / "out", *fake_cli_args)
    assert res.exit_code == 0, res.output
    line = ("1 duplicate(s) copy a file of another sample and are not counted in their own "
            "(the first: p2/a.png is p1/a.png)")
    assert line in res.stderr
    res = invoke("watch", root, "-o", tmp_path / "watched", "--once", *fake_cli_args)
    assert res.exit_code == 0 and line in res.stderr, res.output


def test_file_names_reach_the_terminal_escaped(capsys):
    """A file name may hold ESC [ ... (colours, cursor moves), a carriage return or a line feed:
    in the progress bar, a warning or a watch message they acted on the terminal."""
    import logging

    from wbc_batch.cli import TerminalFormatter
    from wbc_batch_plugins.progress import ProgressBar

    bad = "s1/a\x1b[2J\rb\nc\x9b31m.png"
    bar = ProgressBar(4, io.StringIO(), columns=200)
    bar.start_image(bad, 4)
    line = bar.line()                              # the name's tail: its last 30 cells
    assert line.endswith("\\x0db\\x0ac\\x9b31m.png") and not {"\x1b", "\r", "\n", "\x9b"} & set(line)
    record = logging.LogRecord("wbc_batch", logging.WARNING, "", 0, "cannot read %s\nnext line",
                               (bad,), None)
    shown = TerminalFormatter("wbc-batch: %(message)s").format(record)
    assert shown == "wbc-batch: cannot read s1/a\\x1b[2J\\x0db\\x0ac\\x9b31m.png\nnext line"


def test_progress_line_fits_the_terminal_so_a_redraw_never_wraps():
    from wbc_batch_plugins.progress import ProgressBar, _cells

    stream = io.StringIO()
    bar = ProgressBar(400, stream, columns=80)
    name = "Patient 12/日本語 フィールド scanned at 100x oil immersion.png"
    bar.start_image(name, 400)
    for _ in range(3):
        bar.finish_image(False, 400)
    bar.draw(force=True)
    lines = stream.getvalue().split("\r")[1:]
    assert lines and all(_cells(text) <= 79 for text in lines)  # before: up to ~100 cells
    full = bar.line(columns=200)
    assert full.endswith("oil immersion.png") and "  ..." in full and "3 errors" in full
    narrow = bar.line(columns=40)
    assert _cells(narrow) <= 39 and narrow.startswith("[") and "immersion" not in narrow
    assert _cells(ProgressBar(4, stream).line()) < 80  # no width given: as before


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a pseudo-terminal")
def test_progress_bar_asks_the_width_of_the_terminal_it_draws_on(monkeypatch):
    # stdout sent to a file (`run ... > log.txt`) made it take 80 columns on a 50-column stderr
    import fcntl
    import struct
    import termios

    from wbc_batch_plugins.progress import _columns

    leader, follower = os.openpty()
    try:
        fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 50, 0, 0))
        with os.fdopen(os.dup(follower), "w") as tty:
            monkeypatch.setenv("COLUMNS", "80")
            assert _columns(tty) == 50
        assert _columns(io.StringIO()) == 80  # not a terminal: $COLUMNS
    finally:
        os.close(leader)
        os.close(follower)


def test_ctrl_c_while_the_plugins_load_gives_a_line_not_a_traceback(monkeypatch, capsys):
    # a Ctrl-C in the first second of a run ended in a traceback from inside pandas' import
    from wbc_batch import cli

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_cli", interrupted)
    with pytest.raises(SystemExit) as exc:
        cli.main(["run", "x"])
    assert exc.value.code == 130
    assert capsys.readouterr().err == "\nInterrupted before anything was done.\n"


CTRL_C_IN_IMPORT = """
import sys

class CtrlC:  # as if the user pressed Ctrl-C while Python loads the CLI's modules
    def find_spec(self, name, path=None, target=None):
        if name == "wbc_batch.cli":
            raise KeyboardInterrupt

sys.meta_path.insert(0, CtrlC())
from wbc_batch.__main__ import main
main(["--version"])
"""


def test_ctrl_c_while_python_imports_the_cli_gives_a_line_not_a_traceback():
    # the console script imported wbc_batch.cli before any guard: a Ctrl-C in its first 0.1 s
    # (numpy's import) printed a traceback
    done = subprocess.run([sys.executable, "-c", CTRL_C_IN_IMPORT], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 130
    assert done.stderr == "\nInterrupted before anything was done.\n"


def test_ctrl_c_in_a_command_without_its_own_handling_gives_a_line_and_130(invoke, monkeypatch):
    # `plugins` (and export-onnx, a plugin's command) ended in click's "Aborted!" and exit 1
    from wbc_batch import plugins

    def interrupted(pm):
        raise KeyboardInterrupt

    monkeypatch.setattr(plugins, "get_backends", interrupted)
    res = invoke("plugins")
    assert res.exit_code == 130
    assert res.output.endswith("\nInterrupted.\n") and "Aborted" not in res.output


def test_the_guard_says_what_the_cli_says():
    from wbc_batch import __main__
    from wbc_batch.interrupts import BEFORE_START

    assert __main__.BEFORE_START == BEFORE_START


def test_the_console_script_is_the_guarded_entry_point():
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(Path(__file__).resolve().parents[1] / "setup.cfg", encoding="utf-8")
    scripts = cfg["options.entry_points"]["console_scripts"].strip().splitlines()
    assert scripts == ["wbc-batch = wbc_batch.__main__:main"]


def test_a_run_that_cannot_start_says_why_without_sending_the_user_to_help(invoke, tmp_path,
                                                                          image_folder,
                                                                          fake_cli_args):
    # a third party's backend crashing on open was shown as "Usage: ... Try --help"
    args = list(fake_cli_args)
    args[args.index("--backend") + 1] = "nosuch"
    for command in (["run"], ["evaluate", "--truth", str(image_folder)], ["watch", "--once"]):
        res = invoke(*command[:1], image_folder, "-o", tmp_path / command[0], *command[1:],
                     *args)
        assert res.exit_code == 2, res.output
        assert "Error: unknown backend 'nosuch'" in res.output
        assert "Usage:" not in res.output and "--help" not in res.output


def test_first_time_mistakes_say_what_to_do(invoke, image_folder, tmp_path, fake_cli_args):
    # a threshold given in percent, one image named as INPUT: the generic messages said neither
    res = invoke("run", image_folder, "-o", tmp_path / "o", "--review-threshold", "80", *fake_cli_args)
    assert res.exit_code == 2
    assert "80 is not between 0 and 1: a probability, not a percentage (for 80 %, give 0.8)" in res.output
    res = invoke("run", image_folder, "-o", tmp_path / "o", "--review-threshold", "15%", *fake_cli_args)
    assert res.exit_code == 2 and "(for 15 %, give 0.15)" in res.output
    for value, said in (("abc", "'abc' is not a valid float range"), ("180", "not in the range"),
                        ("1.5", "not in the range"),  # 0.015 would flag nothing: no hint
                        ("nan", "nan is not a finite number")):
        res = invoke("run", image_folder, "-o", tmp_path / "o", "--review-threshold", value, *fake_cli_args)
        assert res.exit_code == 2 and said in res.output, res.output
    image = next(image_folder.rglob("*.png"))
    res = invoke("run", image, "-o", tmp_path / "o", *fake_cli_args)
    assert res.exit_code == 2
    assert f"input is not a folder: {image}: put the image in a folder and name that folder" in res.output
    (tmp_path / "notes.txt").write_text("x")
    res = invoke("run", tmp_path / "notes.txt", "-o", tmp_path / "o", *fake_cli_args)
    assert res.exit_code == 2 and "put the image" not in res.output


def test_train_takes_output_as_every_other_command_does(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from wbc_batch.train import segmenter

    for command in ("segmenter", "classifier", "stain-reference"):
        res = CliRunner().invoke(build_cli(), ["train", command, "--help"])
        assert "-o, --out, --output" in res.output, (command, res.output)
    seen = []
    monkeypatch.setattr(segmenter, "train_segmenter", lambda cfg, log=print: seen.append(cfg))
    lab = tmp_path / "lab"
    lab.mkdir()
    res = CliRunner().invoke(build_cli(), ["train", "segmenter", "--no-public", "--lab-masks", str(lab),
                                           "--output", str(tmp_path / "b")])
    assert seen and seen[0].out == tmp_path / "b", res.output
