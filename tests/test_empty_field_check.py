"""scripts/empty_field_check.py: what the scale estimate makes of empty fields and of fields of
WBCs too small to analyse, before `analysis.NUCLEUS_EVIDENCE` and with it."""

import re

import numpy as np

from conftest import draw_field, load_script, write_image


def _bccd(root, fields: dict) -> None:
    """A BCCD layout under `root`: {name: (split, [(cx, cy, r), ...])}, one WBC box per cell."""
    rows = ["image,annotation,labels,split"]
    for name, (split, cells) in fields.items():
        if split == "val":  # train rows are never read
            write_image(root / "bccd" / f"{name}.png", draw_field(640, 480, cells=cells))
            (root / "bccd" / f"{name}.xml").write_text(
                "<annotation>" + "".join(
                    f"<object><name>WBC</name><bndbox><xmin>{x - r}</xmin><ymin>{y - r}</ymin>"
                    f"<xmax>{x + r}</xmax><ymax>{y + r}</ymax></bndbox></object>"
                    for x, y, r in cells) + "</annotation>")
        rows.append(f"{name}.png,{name}.xml,,{split}")
    (root / "splits").mkdir()
    (root / "splits" / "bccd.csv").write_text("\n".join(rows) + "\n")


def test_it_prints_each_kind_of_field_before_the_bar_and_with_it(tmp_path, capsys, monkeypatch):
    script = load_script("empty_field_check")
    glass = script.glass_fields()
    assert len(glass) == 48 and len({name for name, _ in glass}) == 48
    assert np.array_equal(glass[5][1], script.glass_fields()[5][1])  # seeded: the same draw
    monkeypatch.setattr(script, "glass_fields", lambda seed: glass[:2])  # two, for time
    _bccd(tmp_path, {"a": ("val", [(160, 240, 55)]), "b": ("train", [(320, 240, 55)])})
    assert script.main(["--data", str(tmp_path), "--split", "val"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == ("nucleus share needed to refuse WBCs as too small "
                      "(analysis.NUCLEUS_EVIDENCE): 10 %")
    kinds = [line for line in out[1:] if not line.startswith("  ")]
    assert [k.split(":")[0] for k in kinds] == [
        "bare glass (seed 7)", "BCCD val strips without a WBC",
        "BCCD val fields tiled 3x3 and shrunk to WBCs of 4 to 8 px"]
    for line, n in zip(kinds, (2, 1, 3)):  # the strip right of the cell; 3 shrink factors
        assert re.fullmatch(rf"[^:]+: {n} fields; estimated under 8 px: \d+( \(nucleus share "
                            r"[\d.]+ to [\d.]+ %\))?; outcome changed by the bar: \d+", line), line
    outcomes = [line for line in out if line.startswith("  ")]
    assert len(outcomes) == 6
    for line, n in zip(outcomes, (2, 2, 1, 1, 3, 3)):
        m = re.fullmatch(r"  (before|now): refused as too small (\d+), analysed with WBCs found "
                         r"(\d+), with none (\d+)", line)
        assert m and sum(int(g) for g in m.groups()[1:]) == n, line


def test_txl_pbc_fields_are_shrunk_by_their_own_wbc_boxes(tmp_path, capsys, monkeypatch):
    script = load_script("empty_field_check")
    root = tmp_path / "txl-pbc" / "TXL_PBC"
    write_image(root / "images" / "val" / "t.png", draw_field(640, 480, cells=[(200, 240, 60)]))
    (root / "labels" / "val").mkdir(parents=True)
    (root / "labels" / "val" / "t.txt").write_text("0 0.3125 0.5 0.1875 0.25\n")  # 120x120 px
    fields = script.shrunk_fields(tmp_path, "val", "txl")
    # 3x3 tiles of 640x480, shrunk so that the 120 px WBC is 4.4, 6 and 7.7 px
    assert [rgb.shape[:2] for _, rgb in fields] == [
        (round(1440 * px / 120), round(1920 * px / 120)) for px in script.TINY_PX]
    monkeypatch.setattr(script, "glass_fields", lambda seed: [])
    assert script.main(["--data", str(tmp_path), "--set", "txl", "--seed", "8"]) == 0
    kinds = [line.split(":")[0] for line in capsys.readouterr().out.splitlines()[1:]
             if not line.startswith("  ")]
    assert kinds == ["bare glass (seed 8)",
                     "TXL-PBC val fields tiled 3x3 and shrunk to WBCs of 4 to 8 px"]


def test_a_field_is_analysed_at_the_bar_asked_for_and_the_bar_put_back(monkeypatch):
    from wbc_batch import analysis

    script = load_script("empty_field_check")
    bar, seen = analysis.NUCLEUS_EVIDENCE, []

    def refusing(rgb, session, bundle):  # find_cells, reading the bar it runs with
        seen.append(analysis.NUCLEUS_EVIDENCE)
        raise script.ImageNotAnalysable("too small")

    monkeypatch.setattr(script, "find_cells", refusing)
    assert script.analysed(np.zeros((40, 40, 3), np.uint8), None, None, 0.0) == "too small"
    assert seen == [0.0] and analysis.NUCLEUS_EVIDENCE == bar > 0
