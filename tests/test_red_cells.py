"""The learned red-cell size (`wbc_batch.red_cells`) and its training
(`wbc_batch.train.red_cells`)."""

import math
from pathlib import Path

import cv2
import numpy as np
import pytest

from wbc_batch import red_cells as rc

torch = pytest.importorskip("torch")
from wbc_batch.train import red_cells as train_rc  # noqa: E402


def discs(size: tuple, diameter: float, n: int, seed: int = 0) -> np.ndarray:
    """A light field (RGB) with `n` pink discs `diameter` px across, at random places."""
    rng = np.random.default_rng(seed)
    rgb = np.full((*size, 3), (225, 220, 215), np.uint8)
    for _ in range(n):
        centre = (int(rng.integers(0, size[1])), int(rng.integers(0, size[0])))
        cv2.circle(rgb, centre, int(round(diameter / 2)), (200, 120, 130), -1)
    return rgb


def random_net(seed: int = 0):
    torch.manual_seed(seed)
    net = train_rc.build_net().eval()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.3)
    return net


def test_the_numpy_forward_pass_is_the_torch_network():
    net = random_net()
    x = np.random.default_rng(0).normal(size=(3, 3, rc.SIDE, rc.SIDE)).astype(np.float32)
    with torch.no_grad():
        expected = net(torch.from_numpy(x)).numpy()
    sizer = rc.RedCellSizer({k: v.numpy() for k, v in net.state_dict().items()})
    assert sizer.log_sizes(x) == pytest.approx(expected, abs=1e-4)


def test_weights_round_trip_through_safetensors(tmp_path):
    from safetensors.torch import save_file

    net = random_net(1)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    x = np.random.default_rng(1).normal(size=(1, 3, rc.SIDE, rc.SIDE)).astype(np.float32)
    with torch.no_grad():
        expected = net(torch.from_numpy(x)).numpy()
    assert rc.RedCellSizer.load(path).log_sizes(x) == pytest.approx(expected, abs=1e-4)


def test_an_unreadable_or_foreign_weights_file_is_named(tmp_path):
    from safetensors.numpy import save_file

    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="bad.safetensors"):
        rc.RedCellSizer.load(bad)
    other = tmp_path / "other.safetensors"
    save_file({"w": np.zeros(3, np.float32)}, str(other))
    with pytest.raises(ValueError, match="other.safetensors"):
        rc.RedCellSizer.load(other)


@pytest.mark.parametrize("h, w, side", [(480, 640, 480), (480, 640, 100), (300, 300, 300),
                                         (200, 900, 150)])
def test_windows_stay_inside_the_field_and_reach_its_far_edges(h, w, side):
    corners = rc.windows(h, w, side)
    assert 1 <= len(corners) <= rc.GRID ** 2
    assert all(0 <= x <= w - side and 0 <= y <= h - side for x, y in corners)
    assert max(x for x, _ in corners) == w - side and max(y for _, y in corners) == h - side


def test_red_cell_size_is_given_in_the_fields_pixels(monkeypatch):
    seen = []

    def fixed(rgb, sizer, side):
        seen.append(side)
        return 30.0 * rc.SIDE / side  # 30 field px, in any window

    monkeypatch.setattr(rc, "_median_size", fixed)
    assert rc.red_cell_size(np.zeros((480, 640, 3), np.uint8), object()) == pytest.approx(30.0)
    # the second pass frames the red cells at AIM px of the shrunk window
    assert seen == [480, round(30.0 * rc.SIDE / rc.AIM)]


def test_a_field_too_small_to_frame_red_cells_has_no_size():
    assert rc.red_cell_size(np.zeros((5, 40, 3), np.uint8), object()) is None


def test_the_bar_replaces_only_an_estimate_under_it():
    assert rc.barred_diameter(100.0, None) == 100.0
    assert rc.barred_diameter(100.0, 120.0) == 100.0             # 0.83 red cells: a small WBC
    assert rc.barred_diameter(90.0, 120.0) == pytest.approx(rc.WBC_OVER_RBC * 120.0)


@pytest.mark.parametrize("seed, size, n", [(0, (480, 640), 60), (1, (480, 640), 60),
                                          (2, (480, 640), 60), (3, (480, 640), 60),
                                          (4, (150, 150), 8), (5, (150, 150), 8)])
def test_a_training_window_is_labelled_with_the_size_its_discs_have_in_it(seed, size, n,
                                                                         monkeypatch):
    """The label is the discs' size in the window's px, whether the field was shrunk first
    (windows far larger than SIDE), mirrored (windows larger than the field: most windows of
    the 150 px fields) or neither."""
    monkeypatch.setattr(train_rc, "photometric", lambda win, rng: win)
    rgb = discs(size, 40, n, seed=seed)
    rng = np.random.default_rng(seed)
    labels = []
    while len(labels) < 6:
        win, label = train_rc.sample(rgb, 40.0, rng)
        if label < 12:  # too few px to measure a disc by
            continue
        pink = (win[..., 1].astype(int) < 175).astype(np.uint8)
        if label < 20 * rc.SIDE / min(size):  # a window twice the field: mirrored, not padded
            assert pink.mean() > 0.6 * (rgb[..., 1].astype(int) < 175).mean()
        _, _, st, _ = cv2.connectedComponentsWithStats(pink)
        lone = [math.sqrt(4 * a / math.pi) for x, y, bw, bh, a in st[1:]
                if x > 0 and y > 0 and x + bw < rc.SIDE and y + bh < rc.SIDE and abs(bw - bh) <= 2
                and a > 0.6 * bw * bh]  # a whole disc, touching no other
        if len(lone) >= 2:  # two overlapping discs can pass for one larger disc, not smaller
            assert min(lone) == pytest.approx(label, rel=0.1)
            labels.append(label)
    assert max(labels) > 1.5 * min(labels)  # at several scales
    if size == (150, 150):  # windows wider than the field: cut from it mirrored
        assert sum(label < 40 * rc.SIDE / 150 for label in labels) >= 2


@pytest.mark.parametrize("seed", range(6))
def test_an_edge_of_glass_covers_part_of_the_window_beyond_a_straight_line(seed):
    rng = np.random.default_rng(seed)
    win = np.random.default_rng(99).integers(0, 200, (rc.SIDE, rc.SIDE, 3)).astype(np.uint8)
    out = train_rc.glass_edge(win, rng)
    glass = (out != win).any(axis=2)
    low, high = train_rc.GLASS_SHARE
    assert low - 0.02 < glass.mean() < high + 0.02
    level = np.percentile(win.reshape(-1, 3), 99, axis=0)
    assert np.abs(out[glass] - level).max() <= 5 * train_rc.GLASS_NOISE  # glass, with noise
    # beyond a straight edge: the glass's border inside the window lies on a line
    inner = cv2.erode(glass.astype(np.uint8), np.ones((3, 3), np.uint8),
                      borderType=cv2.BORDER_CONSTANT, borderValue=1)
    ys, xs = np.nonzero(glass & (inner == 0))
    pts = np.c_[xs, ys] - np.c_[xs, ys].mean(axis=0)
    assert np.linalg.svd(pts, compute_uv=False)[1] / math.sqrt(len(pts)) < 1.0


#: the generator's PCG64 state as `sample` handed a window of `discs((480, 640), 40, 60)` at
#: 40 px to the photometric augmentation, for seeds 0, 1, 2, in the trainer before `glass`
#: (commit 4c8fe77). Taken there, before the augmentation's draws, whose count varies with
#: their outcomes, so that an extra draw cannot be made up for by one fewer.
STATE_AT_PHOTOMETRIC = (45622952943019519016089485487844936367,
                        162128603362175462220222700336991012114,
                        114197255155374232472765730509001774285)


@pytest.mark.parametrize("seed", range(3))
def test_without_glass_a_window_takes_the_draws_of_the_recipe_before_it(seed, monkeypatch):
    """Without glass no draw is made for it, so the recipe's windows (and the shipped sizer,
    which `train red-cells` reproduces byte for byte) are what they were before the option."""
    states = []

    def photometric(win, rng):
        states.append(rng.bit_generator.state["state"]["state"])
        return win

    monkeypatch.setattr(train_rc, "photometric", photometric)
    rgb = discs((480, 640), 40, 60)
    win, label = train_rc.sample(rgb, 40.0, np.random.default_rng(seed), glass=0.0)
    win_glassed, label_glassed = train_rc.sample(rgb, 40.0, np.random.default_rng(seed), glass=1.0)
    assert states[0] == STATE_AT_PHOTOMETRIC[seed]
    assert states[1] != STATE_AT_PHOTOMETRIC[seed]      # glass: its draws
    assert label_glassed == label                        # the red cells keep their size
    assert not np.array_equal(win_glassed, win)


@pytest.mark.parametrize("seed", range(2))
def test_the_shipped_sizer_reads_a_field_enlarged_twice_as_twice_the_size(seed):
    """Whatever it reads in a generated smear's red cells, it reads in original px: the same
    field at twice the magnification gives twice the size."""
    from wbc_batch.sample import make_smear

    rgb = make_smear(480, 360, cells=1, seed=seed).rgb
    once = rc.red_cell_size(rgb, rc.shipped_sizer())
    twice = rc.red_cell_size(cv2.resize(rgb, None, fx=2, fy=2, interpolation=cv2.INTER_LINEAR),
                             rc.shipped_sizer())
    assert twice / once == pytest.approx(2.0, rel=0.1)


def test_a_missing_or_damaged_shipped_sizer_is_a_bundle_error_saying_to_reinstall(tmp_path,
                                                                                 monkeypatch):
    from wbc_batch.bundle import BundleError

    monkeypatch.setattr(rc, "SHIPPED", tmp_path / "red_cells.safetensors")
    rc.shipped_sizer.cache_clear()
    try:
        with pytest.raises(BundleError, match=r"red_cells.safetensors.*(reinstall|restore)"):
            rc.sizer_of(object())
    finally:
        rc.shipped_sizer.cache_clear()


def _mini_public_data(root: Path) -> Path:
    """BCCD and TXL-PBC layouts with two and three train fields, of drawn discs boxed as RBCs;
    one of TXL-PBC's is of BCCD's size."""
    data = root / "data"
    (data / "splits").mkdir(parents=True)
    (data / "bccd" / "BCCD" / "JPEGImages").mkdir(parents=True)
    (data / "bccd" / "BCCD" / "Annotations").mkdir(parents=True)
    txl = data / "txl-pbc" / "TXL_PBC"
    (txl / "images" / "train").mkdir(parents=True)
    (txl / "labels" / "train").mkdir(parents=True)
    rows = ["image,annotation,labels,split"]
    for k in range(2):
        rgb, boxes = _boxed_discs(seed=k)
        name = f"BloodImage_{k:05d}"
        cv2.imwrite(str(data / "bccd" / "BCCD" / "JPEGImages" / f"{name}.jpg"), rgb[..., ::-1])
        objects = "".join(f"<object><name>RBC</name><bndbox><xmin>{x}</xmin><ymin>{y}</ymin>"
                          f"<xmax>{x + s}</xmax><ymax>{y + s}</ymax></bndbox></object>"
                          for x, y, s in boxes)
        (data / "bccd" / "BCCD" / "Annotations" / f"{name}.xml").write_text(
            f"<annotation>{objects}</annotation>")
        rows.append(f"BCCD/JPEGImages/{name}.jpg,BCCD/Annotations/{name}.xml,NEUTROPHIL,train")
        rgb, boxes = _boxed_discs(seed=10 + k, size=(360, 360))
        cv2.imwrite(str(txl / "images" / "train" / f"t{k}.jpg"), rgb[..., ::-1])
        (txl / "labels" / "train" / f"t{k}.txt").write_text("".join(
            f"1 {(x + s / 2) / 360} {(y + s / 2) / 360} {s / 360} {s / 360}\n"
            for x, y, s in boxes))
    rgb, boxes = _boxed_discs(seed=20)  # of BCCD's size: where TXL-PBC's copies of BCCD fields are
    cv2.imwrite(str(txl / "images" / "train" / "t9.jpg"), rgb[..., ::-1])
    (txl / "labels" / "train" / "t9.txt").write_text("".join(
        f"1 {(x + s / 2) / 640} {(y + s / 2) / 480} {s / 640} {s / 480}\n" for x, y, s in boxes))
    (data / "splits" / "bccd.csv").write_text("\n".join(rows) + "\n")
    return data


def _boxed_discs(seed: int, size: tuple = (480, 640), d: int = 40) -> tuple:
    """A light field with pink discs `d` px across on a grid, and their (x, y, side) boxes."""
    rng = np.random.default_rng(seed)
    rgb = np.full((*size, 3), (225, 220, 215), np.uint8)
    boxes = []
    for y in range(10, size[0] - d - 10, d + 12):
        for x in range(10, size[1] - d - 10, d + 12):
            x1, y1 = x + int(rng.integers(0, 6)), y + int(rng.integers(0, 6))
            cv2.circle(rgb, (x1 + d // 2, y1 + d // 2), d // 2, (200, 120, 130), -1)
            boxes.append((x1, y1, d))
    return rgb, boxes


def test_train_red_cells_writes_a_sizer_that_loads_and_can_leave_bccd_out(tmp_path):
    from click.testing import CliRunner

    from wbc_batch.cli import build_cli

    data = _mini_public_data(tmp_path)
    out = tmp_path / "bundle"
    train = ["train", "red-cells", "--data", str(data), "-o", str(out), "--threads", "1"]
    result = CliRunner().invoke(build_cli(), train + ["--steps", "2"])
    assert result.exit_code == 0, result.output
    assert "5 train fields" in result.output and "Done:" in result.output
    sizer = rc.RedCellSizer.load(out / rc.WEIGHTS_FILE)
    assert rc.red_cell_size(_boxed_discs(0)[0], sizer) > 0
    result = CliRunner().invoke(build_cli(), train + ["--steps", "1", "--leave-out-bccd"])
    assert result.exit_code == 0, result.output
    assert "2 train fields" in result.output  # TXL-PBC's two of 360 x 360 px


def test_a_train_image_that_cannot_be_read_is_named(tmp_path):
    from click.testing import CliRunner

    from wbc_batch.cli import build_cli

    data = _mini_public_data(tmp_path)
    broken = data / "bccd" / "BCCD" / "JPEGImages" / "BloodImage_00001.jpg"
    broken.write_bytes(b"not a jpeg")
    result = CliRunner().invoke(build_cli(), ["train", "red-cells", "--data", str(data),
                                              "-o", str(tmp_path / "out"), "--steps", "1"])
    assert result.exit_code == 1 and "BloodImage_00001.jpg" in result.output
    assert not (tmp_path / "out" / rc.WEIGHTS_FILE).exists()


def test_a_train_jpeg_cut_short_is_named_with_why(tmp_path):
    """Its header still gives its size, so it is listed; reading its pixels names it (it had
    stopped the training with a traceback that named no file)."""
    from click.testing import CliRunner

    from wbc_batch.cli import build_cli

    data = _mini_public_data(tmp_path)
    cut = data / "bccd" / "BCCD" / "JPEGImages" / "BloodImage_00001.jpg"
    cut.write_bytes(cut.read_bytes()[:2000])
    result = CliRunner().invoke(build_cli(), ["train", "red-cells", "--data", str(data),
                                              "-o", str(tmp_path / "out"), "--steps", "1"])
    assert result.exit_code == 1, result.output
    assert "BloodImage_00001.jpg (truncated JPEG" in result.output
    assert not (tmp_path / "out" / rc.WEIGHTS_FILE).exists()


def test_train_red_cells_without_the_data_says_so_and_writes_nothing(tmp_path):
    from click.testing import CliRunner

    from wbc_batch.cli import build_cli

    result = CliRunner().invoke(build_cli(), ["train", "red-cells", "--data",
                                              str(tmp_path / "none"), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2 and "no public data" in result.output
    assert not (tmp_path / "out").exists()


def test_a_bundles_own_sizer_is_used_and_a_broken_one_named(tmp_path):
    import shutil

    from wbc_batch.bundle import BundleError, load_bundle

    MODELS = Path(rc.__file__).resolve().parent / "models"
    for name in ("bundle.json", "segmenter.safetensors", "classifier.safetensors"):
        shutil.copy(MODELS / name, tmp_path / name)
    assert load_bundle(tmp_path).red_cell_sizer is rc.shipped_sizer()  # none of its own
    (tmp_path / rc.WEIGHTS_FILE).write_bytes(b"broken")
    with pytest.raises(BundleError, match="red_cells.safetensors"):
        load_bundle(tmp_path).red_cell_sizer


def test_a_ledgers_fingerprint_holds_the_sizer_only_where_the_bar_reads_it(tmp_path):
    """Ledgers written before the sizer existed resume with the bar off; with it on, other
    sizer weights are other results."""
    import json

    from wbc_batch.config import AnalysisParams, RunConfig
    from wbc_batch.resume import fingerprint

    class Runner:
        bundle = None

        def __init__(self, sizer_sha):
            self.sizer_sha = sizer_sha

        def model_hashes(self):
            return {"segmenter": {"sha256": "s"}, "classifier": {"sha256": "c"},
                    "red_cells": {"sha256": self.sizer_sha}}

    def held(bar: bool, sha: str) -> dict:
        config = RunConfig(input_dir=tmp_path, output_dir=tmp_path / "out",
                           analysis=AnalysisParams(red_cell_bar=bar))
        return json.loads(fingerprint(Runner(sha), config))

    assert held(False, "a") == held(False, "b")
    assert "red_cells" not in held(False, "a")["weights"]
    assert "red_cell_bar" not in held(False, "a")["analysis"]  # as ledgers before it wrote it
    assert held(True, "a")["weights"]["red_cells"] == "a" and held(True, "a") != held(True, "b")


def test_a_broken_sizer_in_the_bundle_stops_a_run_with_the_bar_before_any_image(tmp_path):
    """And a run without the bar never reads it."""
    import shutil

    from click.testing import CliRunner

    from wbc_batch.cli import build_cli
    from wbc_batch.sample import make_smear

    models = Path(rc.__file__).resolve().parent / "models"
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    for name in ("bundle.json", "segmenter.safetensors", "classifier.safetensors"):
        shutil.copy(models / name, bundle / name)
    (bundle / rc.WEIGHTS_FILE).write_bytes(b"broken")
    inbox = tmp_path / "in"
    inbox.mkdir()
    cv2.imwrite(str(inbox / "f.png"), make_smear(320, 240, cells=1, seed=3).rgb[..., ::-1])
    result = CliRunner().invoke(build_cli(), ["run", str(inbox), "-o", str(tmp_path / "out"),
                                              "--model", str(bundle), "--red-cell-bar", "-q"])
    assert result.exit_code != 0 and "red_cells.safetensors" in result.output
    assert not (tmp_path / "out" / "images.csv").exists()
    result = CliRunner().invoke(build_cli(), ["run", str(inbox), "-o", str(tmp_path / "out2"),
                                              "--model", str(bundle), "-q"])
    assert result.exit_code == 0, result.output


def test_the_wbc_over_red_cell_ratio_is_taken_per_field_with_a_wbc(tmp_path):
    data = _mini_public_data(tmp_path)
    label = data / "txl-pbc" / "TXL_PBC" / "labels" / "train" / "t0.txt"
    label.write_text(label.read_text() + "0 0.5 0.5 0.2 0.2\n")  # a WBC 72 px across
    ratios = train_rc.wbc_over_red_cells(data, "train")
    assert ratios == [pytest.approx(72 / 40, rel=0.03)]  # red cells 40 px; no other field has one


def test_a_stopped_sizer_training_exits_130_saying_nothing_was_written(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from wbc_batch.cli import build_cli

    def stopped(cfg, log=print):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_rc, "train_sizer", stopped)
    result = CliRunner().invoke(build_cli(), ["train", "red-cells", "--data",
                                              str(_mini_public_data(tmp_path)),
                                              "-o", str(tmp_path / "out")])
    assert result.exit_code == 130, result.output
    assert result.output.strip().splitlines()[-1] == "Interrupted: nothing was written."
