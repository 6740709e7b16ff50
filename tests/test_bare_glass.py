"""A field taken for bare glass is no longer "ok, 0 WBCs" and nothing else: run.json lists it,
report.xlsx's Summary counts it, and `run`, `evaluate` and `watch --once` say how many there
were, since a blank frame, or a faded or washed-out smear, is taken for glass too."""

import json

import numpy as np
import pytest

from conftest import BACKGROUND, draw_field, write_image
from wbc_batch.results import ImageResult, bare_glass_line

GLASS_LINE = "image(s) taken for bare glass or a blank frame, with no WBC looked for in them"


@pytest.fixture
def inbox(tmp_path):
    """Two fields with a WBC and two of bare glass, one of them with camera noise."""
    folder = tmp_path / "in"
    for i in range(2):
        write_image(folder / f"field_{i}.png", draw_field(160, 160, [(70 + 4 * i, 80, 30)]))
    write_image(folder / "glass.png", np.full((160, 160, 3), BACKGROUND, np.uint8))
    noise = np.random.default_rng(0).normal(0, 3, (160, 160, 3))
    write_image(folder / "noisy.png", np.clip(noise + BACKGROUND, 0, 255).astype(np.uint8))
    return folder


def _glass_count(xlsx) -> object:
    from openpyxl import load_workbook

    summary = load_workbook(xlsx)["Summary"]
    for row in summary.iter_rows(values_only=True):
        if row[0] == "images taken for bare glass (no WBC looked for)":
            return row[1]
    return None


def test_a_run_lists_and_counts_the_fields_taken_for_glass(invoke, inbox, tmp_path, fake_cli_args):
    out = tmp_path / "out"
    res = invoke("run", inbox, "-o", out, *fake_cli_args)
    assert res.exit_code == 0, res.output
    info = json.loads((out / "run.json").read_text(encoding="utf-8"))
    assert info["bare_glass"] == ["glass.png", "noisy.png"]
    assert f"  2 {GLASS_LINE}, first glass.png (bare_glass in run.json)" in res.stderr
    assert "README, \"Fields of bare glass\"" in res.stderr
    assert _glass_count(out / "report.xlsx") == 2
    assert info["counts"]["cells"] == 2                     # the fields' WBCs, as before


def test_a_run_without_glass_says_nothing_of_it(invoke, inbox, tmp_path, fake_cli_args):
    for name in ("glass.png", "noisy.png"):
        (inbox / name).unlink()
    out = tmp_path / "out"
    res = invoke("run", inbox, "-o", out, *fake_cli_args)
    assert res.exit_code == 0, res.output
    assert json.loads((out / "run.json").read_text(encoding="utf-8"))["bare_glass"] == []
    assert GLASS_LINE not in res.stderr and _glass_count(out / "report.xlsx") is None


def test_watch_once_counts_the_glass_of_all_out_holds(invoke, inbox, tmp_path, fake_cli_args):
    """Its reports are rebuilt from the ledger over every image OUT holds: so is the count."""
    out = tmp_path / "watched"
    res = invoke("watch", inbox, "-o", out, "--once", *fake_cli_args)
    assert res.exit_code == 0, res.output
    assert res.stderr.count(GLASS_LINE) == 1 and f"  2 {GLASS_LINE}" in res.stderr
    write_image(inbox / "more_glass.png", np.full((160, 160, 3), BACKGROUND, np.uint8) - 1)
    res = invoke("watch", inbox, "-o", out, "--once", *fake_cli_args)
    assert res.exit_code == 0, res.output
    assert f"  3 {GLASS_LINE}" in res.stderr
    info = json.loads((out / "run.json").read_text(encoding="utf-8"))
    assert info["bare_glass"] == ["glass.png", "more_glass.png", "noisy.png"]
    assert _glass_count(out / "report.xlsx") == 3


def test_results_stored_before_the_flag_was_kept_read_as_not_glass():
    stored = {"image": "a.png", "status": "ok", "width": 9, "height": 9, "cells": []}
    assert ImageResult.from_dict(stored).bare_glass is False
    kept = ImageResult("b.png", "ok", bare_glass=True)
    assert ImageResult.from_dict(kept.to_dict()).bare_glass is True
    assert bare_glass_line([]) is None and bare_glass_line(None) is None
