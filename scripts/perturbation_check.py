#!/usr/bin/env python3
"""How the models hold up when smears look different: colour casts, pale or shifted stain,
exposure, defocus, lamp falloff, a field stop, white margins and an info banner, camera noise and
compression, and magnification, on the val splits of the public datasets.

    python scripts/perturbation_check.py [--data ../shared/data] [--out results/perturb]
        [--sets wbc2 wbc1 pbc bccd] [--only warm blur ...] [--pbc-every 4] [--tables-only]
        [-- EVALUATE OPTIONS]

For each perturbation, altered copies of the split's images are written under OUT/images with
their relative names, so the original truth applies to them, and `wbc-batch evaluate` runs on them
(OUT/<perturbation>/<set>). The table printed at the end holds each set's headline numbers, and
OUT/perturbation_check.csv holds the same; for box sets it also gives the cells found and the
boxes matched, as counts. `--tables-only` prints the tables again from the evaluations already
under OUT, without running any. Every row re-encodes its images the same way (JPEG
sources at quality 95), so the row `none` is the baseline the others differ from by the
perturbation alone. Rescaled images are evaluated against the truth masks at their original size,
against TXL-PBC's YOLO boxes, which are fractions of the image, and against BCCD's VOC boxes,
which are in pixels: the evaluation scales boxes drawn on an image of the same shape at another
size (its VOC `<size>`) to the image it scores.

Fixed perturbations, not random ones, so that two model bundles can be compared row by row.
Use the val split for development; test rows are for the final measurement only.
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from wbc_batch.train.folders import add_data_option  # noqa: E402
from wbc_batch.atomic import atomic_write_text  # noqa: E402


def _gains(r: float, g: float, b: float):
    def apply(rgb):
        return np.clip(rgb.astype(np.float32) * np.float32([r, g, b]), 0, 255).astype(np.uint8)
    return apply


def _hsv(hue: int = 0, sat: float = 1.0):
    def apply(rgb):
        hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV).astype(np.float32)
        hsv[..., 0] = (hsv[..., 0] + hue) % 180
        hsv[..., 1] = np.clip(hsv[..., 1] * sat, 0, 255)
        return cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB)
    return apply


def _gamma(g: float):
    lut = np.clip(255.0 * (np.arange(256) / 255.0) ** g, 0, 255).astype(np.uint8)
    return lambda rgb: lut[rgb]


def _vignette(falloff: float):
    """Lamp falloff: the gain drops to 1 - falloff at the corners, with the square of the
    distance from the centre."""
    def apply(rgb):
        h, w = rgb.shape[:2]
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        r2 = ((yy - (h - 1) / 2) ** 2 + (xx - (w - 1) / 2) ** 2) / (((h - 1) / 2) ** 2 + ((w - 1) / 2) ** 2)
        gain = 1.0 - np.float32(falloff) * r2
        return np.clip(rgb.astype(np.float32) * gain[..., None] + 0.5, 0, 255).astype(np.uint8)
    return apply


def _jpeg(quality: int):
    def apply(rgb):
        ok, buf = cv2.imencode(".jpg", rgb, [cv2.IMWRITE_JPEG_QUALITY, quality])
        return cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)  # channel order is kept both ways
    return apply


def _noise(sigma: float):
    def apply(rgb):
        noise = np.random.default_rng(0).normal(0.0, sigma, rgb.shape).astype(np.float32)
        return np.clip(rgb.astype(np.float32) + noise + 0.5, 0, 255).astype(np.uint8)
    return apply


def _grey(rgb):
    return cv2.cvtColor(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)


def _sepia(rgb):
    """A monochrome camera's luminance, toned like an old print: R x1.0, G x0.92, B x0.8."""
    tone = np.array([1.0, 0.92, 0.8], np.float32)
    return np.clip(np.rint(_grey(rgb).astype(np.float32) * tone), 0, 255).astype(np.uint8)


def _blur(sigma: float):
    return lambda rgb: cv2.GaussianBlur(rgb, (0, 0), sigma)


def _aperture(frac: float, outside: int = 0):
    """A round field stop (eyepiece or phone-adapter camera): black (grey level `outside`; 255:
    a transparent stop flattened to white) outside a circle of `frac` times half the image
    diagonal, with a soft edge 1 % of the shorter side wide."""
    def apply(rgb):
        h, w = rgb.shape[:2]
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        dist = np.sqrt((yy - (h - 1) / 2) ** 2 + (xx - (w - 1) / 2) ** 2)
        radius = frac * 0.5 * float(np.hypot(h - 1, w - 1))
        gain = np.clip((radius - dist) / max(1.0, 0.01 * min(h, w)), 0.0, 1.0)
        out = rgb.astype(np.float32) * gain[..., None] + outside * (1.0 - gain[..., None])
        return np.rint(out).astype(np.uint8)
    return apply


def _margin(frac: float, level: int):
    """White bars down both sides, `frac` of the width each, in grey level `level`: a field padded
    to a wider frame by camera or viewer software. The bars replace the image's pixels, so the
    size (and every truth box and mask) stays as it was."""
    def apply(rgb):
        out = rgb.copy()
        side = max(1, int(round(frac * rgb.shape[1])))
        out[:, :side] = level
        out[:, -side:] = level
        return out
    return apply


def _banner(frac: float, level: int):
    """An info banner across the bottom, `frac` of the height, in grey level `level`, with black
    text and a scale bar, as microscope camera software burns in. It replaces the image's
    pixels."""
    def apply(rgb):
        out = rgb.copy()
        h, w = rgb.shape[:2]
        depth = max(1, int(round(frac * h)))
        out[h - depth:] = level
        scale = depth / 40.0  # text about half the banner's height
        thick = max(1, int(round(2 * scale)))
        cv2.putText(out, "40x  2026-12-04  slide 17", (int(0.03 * w), h - int(0.3 * depth)),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.8 * scale, (0, 0, 0), thick, cv2.LINE_AA)
        bar_y = h - depth // 2
        cv2.rectangle(out, (int(0.80 * w), bar_y - thick), (int(0.95 * w), bar_y + thick), (0, 0, 0), -1)
        return out
    return apply


def _scale(f: float):
    interp = cv2.INTER_AREA if f < 1 else cv2.INTER_CUBIC
    return lambda rgb: cv2.resize(rgb, None, fx=f, fy=f, interpolation=interp)


#: name -> (what it imitates, function on uint8 RGB, geometric?)
PERTURBATIONS = {
    "none": ("baseline: re-encoded only", lambda rgb: rgb, False),
    "warm": ("yellow/warm cast (lamp, stain): R x1.10, B x0.80", _gains(1.10, 1.0, 0.80), False),
    "cool": ("blue/cool cast (white balance): R x0.85, B x1.15", _gains(0.85, 1.0, 1.15), False),
    "pale": ("pale, under-stained smear: saturation x0.55", _hsv(sat=0.55), False),
    "hue": ("stain hue shift: +20 degrees", _hsv(hue=10), False),
    "dark": ("under-exposed: gamma 1.6", _gamma(1.6), False),
    "bright": ("over-exposed: gamma 0.6", _gamma(0.6), False),
    "blur": ("out of focus: Gaussian blur, sigma 2 px", _blur(2.0), False),
    "grey": ("monochrome camera: luminance in R, G and B", _grey, False),
    "sepia": ("monochrome camera, toned: luminance x (1.0, 0.92, 0.8)", _sepia, False),
    "vignette": ("lamp falloff: 35 % darker in the corners", _vignette(0.35), False),
    "aperture": ("round field stop: black outside 0.75 of the half-diagonal", _aperture(0.75), False),
    "white-stop": ("round field stop saved white: white outside 0.75 of the half-diagonal",
                   _aperture(0.75, 255), False),
    "margin": ("white side bars: 10 % of the width each, grey level 255", _margin(0.10, 255), False),
    "banner": ("info banner: bottom 10 %, grey level 240, black text and scale bar", _banner(0.10, 240), False),
    "jpeg": ("strong compression: JPEG quality 50", _jpeg(50), False),
    "noise": ("sensor noise: Gaussian, sigma 8 grey levels", _noise(8.0), False),
    "small": ("lower magnification: 0.6x", _scale(0.6), True),
    "large": ("higher magnification: 1.5x", _scale(1.5), True),
    "tiny": ("much lower magnification: 0.4x", _scale(0.4), True),
    "huge": ("much higher magnification: 2x", _scale(2.0), True),
}


def _split_images(path: Path, split: str, **where) -> list:
    with open(path, newline="", encoding="utf-8") as f:
        return [r["image"] for r in csv.DictReader(f)
                if r["split"] == split and all(r[k] == v for k, v in where.items())]


def dataset_sets(data: Path, split: str, pbc_every: int) -> dict:
    """name -> (source root, relative image names, evaluate arguments after INPUT)."""
    wbc, splits = data / "wbc-image-dataset", data / "splits"
    wbc_args = ["--truth", str(wbc), "--split-file", str(splits / "wbc-image-dataset.csv"), "--split", split]
    txl = data / "txl-pbc" / "TXL_PBC"
    return {
        "wbc2": (wbc, _split_images(splits / "wbc-image-dataset.csv", split, dataset="2"),
                 wbc_args + ["--where", "dataset=2"]),
        "wbc1": (wbc, _split_images(splits / "wbc-image-dataset.csv", split, dataset="1"),
                 wbc_args + ["--where", "dataset=1"]),
        "pbc": (data / "pbc-wbc", _split_images(splits / "pbc-wbc.csv", split)[::pbc_every],
                ["--truth", str(splits / "pbc-wbc.csv"), "--truth-format", "csv"]),
        "bccd": (data / "bccd", _split_images(splits / "bccd.csv", split),
                 ["--truth", str(data / "bccd"), "--truth-format", "voc",
                  "--split-file", str(splits / "bccd.csv"), "--split", split]),
        "txl": (txl / "images", sorted(f"{split}/{p.name}" for p in (txl / "images" / split).glob("*")),
                ["--truth", str(txl / "labels" / split), "--truth-format", "yolo", "--split", split]),
    }


def write_perturbed(src_root: Path, names: list, dst_root: Path, fn) -> int:
    """Altered copies of `src_root/name` at `dst_root/name`; returns how many were written."""
    n = 0
    for name in names:
        bgr = cv2.imread(str(src_root / name), cv2.IMREAD_COLOR)
        if bgr is None:
            print(f"  skipped unreadable {name}", file=sys.stderr)
            continue
        out = cv2.cvtColor(fn(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)), cv2.COLOR_RGB2BGR)
        dst = dst_root / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        params = [cv2.IMWRITE_JPEG_QUALITY, 95] if dst.suffix.lower() in (".jpg", ".jpeg") else []
        if not cv2.imwrite(str(dst), out, params):
            raise OSError(f"cannot write {dst}")
        n += 1
    return n


#: set kind -> (accuracy.csv scope, metric, column title)
HEADLINES = {
    "mask": [("pixels_wbc", "iou", "WBC IoU"), ("pixels_nucleus", "iou", "nucleus IoU"),
             ("classes", "accuracy", "class acc")],
    "class": [("classes", "accuracy", "accuracy"), ("classes", "macro_f1", "macro-F1"),
              ("classes", "ece", "ECE")],
    "box": [("detection", "found_cells", "found"), ("detection", "matched", "matched"),
            ("detection", "recall", "recall"), ("detection", "precision", "precision"),
            ("detection", "class_accuracy_all", "class acc")],
}
COUNTS = {"found", "matched"}  # printed as whole numbers, changes in cells rather than points
SPLITS = ("train", "val", "test")   # a misspelt split would find no image and pass silently
KIND = {"wbc2": "mask", "wbc1": "mask", "pbc": "class", "bccd": "box", "txl": "box"}


def read_summary(path: Path) -> dict:
    with open(path, newline="", encoding="utf-8") as f:
        return {(r["scope"], r["metric"]): float(r["value"]) for r in csv.DictReader(f)
                if r["section"] == "summary" and r["value"] not in ("", "nan")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_option(ap, ROOT)
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "perturb")
    ap.add_argument("--split", default="val", choices=SPLITS)
    ap.add_argument("--sets", nargs="+", default=["wbc2", "wbc1", "pbc", "bccd"], choices=list(KIND))
    ap.add_argument("--only", nargs="+", default=list(PERTURBATIONS), choices=list(PERTURBATIONS))
    ap.add_argument("--pbc-every", type=int, default=4, help="evaluate every Nth PBC image of the split")
    ap.add_argument("--tables-only", action="store_true",
                    help="evaluate nothing: print the tables from the evaluations already under OUT")
    ap.add_argument("evaluate_options", nargs=argparse.REMAINDER,
                    help="after --: passed to wbc-batch evaluate (e.g. --model DIR)")
    args = ap.parse_args(argv)
    extra = [a for a in args.evaluate_options if a != "--"]
    if not args.tables_only and not (args.data / "splits").is_dir():
        print(f"no data at {args.data} (use --data)", file=sys.stderr)
        return 2
    sets = {} if args.tables_only else dataset_sets(args.data, args.split, max(1, args.pbc_every))
    rows, status = [], 0
    for pert in args.only:
        what, fn, _ = PERTURBATIONS[pert]
        for name in args.sets:
            out = args.out / pert / name
            if not args.tables_only:
                root, names, eval_args = sets[name]
                images = args.out / "images" / pert / name
                n = write_perturbed(root, names, images, fn)
                cmd = ["wbc-batch", "evaluate", str(images), *eval_args, "-o", str(out),
                       "--overwrite", "--no-overlays", *extra]
                print(f"=== {pert} ({what}) / {name}: {n} images\n{' '.join(cmd)}", flush=True)
                rc = subprocess.run(cmd, stdout=subprocess.DEVNULL).returncode
                if rc:
                    print(f"(exit code {rc})", flush=True)
                    status = max(status, rc)
                    continue
            elif not (out / "accuracy.csv").is_file():
                print(f"(no evaluation at {out})", flush=True)
                status = max(status, 1)
                continue
            summary = read_summary(out / "accuracy.csv")
            n = int(summary.get(("run", "images"), 0))
            for scope, metric, title in HEADLINES[KIND[name]]:
                if (scope, metric) in summary:
                    rows.append({"perturbation": pert, "set": name, "metric": title,
                                 "value": summary[(scope, metric)], "images": n})
    _report(rows, args)
    return status


def _report(rows: list, args) -> None:
    lines = ["perturbation,set,metric,value,images"]
    lines += [f"{r['perturbation']},{r['set']},{r['metric']},{r['value']:.6f},{r['images']}" for r in rows]
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "perturbation_check.csv", "\n".join(lines) + "\n")
    base = {(r["set"], r["metric"]): r["value"] for r in rows if r["perturbation"] == "none"}
    for name in args.sets:
        titles = [t for _, _, t in HEADLINES[KIND[name]]
                  if any(r["set"] == name and r["metric"] == t for r in rows)]
        if not titles:
            continue
        print(f"\n{name} ({args.split}): value, and change against 'none' in points")
        print("| perturbation | " + " | ".join(titles) + " |")
        print("|---|" + "---|" * len(titles))
        for pert in args.only:
            got = {r["metric"]: r["value"] for r in rows if r["set"] == name and r["perturbation"] == pert}
            if not got:
                continue
            cells = []
            for t in titles:
                v = got.get(t)
                if v is None:
                    cells.append("")
                elif t == "ECE":
                    cells.append(f"{v:.3f}")
                elif pert == "none" or (name, t) not in base:
                    cells.append(f"{v:.0f}" if t in COUNTS else f"{100 * v:.1f}")
                elif t in COUNTS:
                    cells.append(f"{v:.0f} ({v - base[(name, t)]:+.0f})")
                else:
                    cells.append(f"{100 * v:.1f} ({100 * (v - base[(name, t)]):+.1f})")
            print(f"| {pert} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    sys.exit(main())
