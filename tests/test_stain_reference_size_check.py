"""scripts/stain_reference_size_check.py: how many of one microscope's cells a stain reference
fitted on n of its crops flags (it chose train.classifier.MIN_STAIN_CROPS)."""

import re

import numpy as np

from conftest import draw_field, load_script, write_image


def test_it_fits_on_val_rows_only_and_prints_a_share_per_size(tmp_path, capsys):
    script = load_script("stain_reference_size_check")
    rows = ["image,class,split"]
    rng = np.random.default_rng(0)
    for i in range(16):
        split = "train" if i < 4 else "val"  # train rows are never read
        name = f"neutrophil/{split}_{i}.png"
        if split == "val":
            write_image(tmp_path / "pbc-wbc" / name,
                        draw_field(160, 160, cells=[(80, 80, int(rng.integers(20, 30)))]))
        rows.append(f"{name},neutrophil,{split}")
    (tmp_path / "splits").mkdir()
    (tmp_path / "splits" / "pbc-wbc.csv").write_text("\n".join(rows) + "\n")
    # another microscope's cells: one BCCD val field with two WBC boxes, and a train one unread
    write_image(tmp_path / "bccd" / "f.png", draw_field(200, 160, cells=[(50, 60, 25), (140, 90, 22)]))
    (tmp_path / "bccd" / "f.xml").write_text(
        "<annotation>" + "".join(f"<object><name>WBC</name><bndbox><xmin>{x - 30}</xmin><ymin>{y - 30}"
                                 f"</ymin><xmax>{x + 30}</xmax><ymax>{y + 30}</ymax></bndbox></object>"
                                 for x, y in ((50, 60), (140, 90)))
        + "<object><name>RBC</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>9</xmax><ymax>9</ymax>"
          "</bndbox></object></annotation>")
    (tmp_path / "splits" / "bccd.csv").write_text("image,annotation,labels,split\nf.png,f.xml,,val\n"
                                                  "nothere.png,nothere.xml,,train\n")
    assert script.main(["--data", str(tmp_path), "--sizes", "4", "8", "--repeats", "2",
                        "--pool", "8", "--judged", "4"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "PBC val: fitted on n of 8 crops, judged on 4 others and on 2 BCCD val cells"
    for line, n in zip(out[1:], (4, 8)):
        share = re.fullmatch(rf"n +{n}: PBC +([\d.]+) % flagged \(lowest ([\d.]+), highest ([\d.]+), "
                             r"2 fits\); BCCD ([\d.]+) % \(lowest ([\d.]+)\)", line)
        assert share and 0 <= float(share[2]) <= float(share[1]) <= float(share[3]) <= 100, line
        assert 0 <= float(share[5]) <= float(share[4]) <= 100, line
