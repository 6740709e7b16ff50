"""Synthetic blood smears with ground truth: `sample_data/` and the tests' fixtures.

`make_smear()` draws a field of view: a pale background with gentle uneven illumination, red
cells (slightly irregular discs with a darker rim and a central pallor) and white blood cells of
the five classes, each with its own look:

- neutrophil: pale pink-lilac cytoplasm with fine granules; 3-5 nuclear lobes on a curve,
  joined by thin chromatin bridges.
- lymphocyte: small; a large round, dense, slightly eccentric nucleus with a thin rim of light
  blue cytoplasm.
- monocyte: large; a kidney-shaped (notched) lighter, lacy nucleus in grey-blue cytoplasm with a
  few vacuoles.
- eosinophil: a bilobed nucleus in cytoplasm packed with coarse orange-red granules.
- basophil: dark purple granules over the whole cell, obscuring its (lobed) nucleus.

Then a little blur and sensor noise. Everything is drawn with numpy on each cell's bounding
patch (no per-pixel Python), so a 640x480 field takes a few milliseconds. The same seed gives
the same image, bit for bit.

The ground truth comes with it: `Smear.mask` (0 background and red cells, 128 cytoplasm, 255
nucleus: the WBC Image Dataset convention), `Smear.labels` (uint16, k on the pixels of cell k),
and `Smear.cells` (class and bounding box per WBC). `write_sample_set()` saves images and truth
in the layout the generic truth reader (`--truth-format csv`) reads; see sample_data/README.md.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import cv2
import numpy as np

from . import CLASSES

#: WBC diameter relative to the field's typical diameter, per class (lymphocytes are small,
#: monocytes large)
CLASS_SIZE = {"neutrophil": 1.0, "lymphocyte": 0.78, "monocyte": 1.18, "eosinophil": 1.05,
              "basophil": 0.92}
#: red cell diameter relative to the typical WBC diameter
RBC_SIZE = 0.72

# Wright-Giemsa-like colours, RGB 0..255
BACKGROUND = (238, 231, 228)
RBC_BODY = (222, 148, 152)
RBC_PALLOR = (238, 205, 203)
CYTOPLASM = {
    "neutrophil": (226, 198, 214),
    "lymphocyte": (158, 178, 226),
    "monocyte": (186, 182, 208),
    "eosinophil": (236, 178, 150),
    "basophil": (196, 166, 206),
}
NUCLEUS = {
    "neutrophil": (96, 46, 128),
    "lymphocyte": (68, 34, 112),
    "monocyte": (128, 88, 162),
    "eosinophil": (98, 48, 128),
    "basophil": (86, 42, 118),
}
GRANULES = {
    "neutrophil": (196, 150, 190),
    "eosinophil": (222, 92, 58),
    "basophil": (52, 20, 82),
}

Diameter = Union[None, float, tuple]


@dataclass(frozen=True)
class TruthCell:
    """One drawn WBC: its id (value in `Smear.labels`), class, and bounding box in pixels."""

    cell_id: int
    cls: str
    x: int
    y: int
    width: int
    height: int
    diameter: float

    @property
    def box(self) -> tuple:
        return (self.x, self.y, self.width, self.height)


@dataclass
class Smear:
    """A synthetic field: the image and its ground truth."""

    rgb: np.ndarray      # uint8 (H, W, 3) RGB
    mask: np.ndarray     # uint8 (H, W): 0 background, 128 cytoplasm, 255 nucleus
    labels: np.ndarray   # uint16 (H, W): 0 background, k on the pixels of cells[k - 1]
    cells: list = field(default_factory=list)  # TruthCell, in cell_id order
    seed: int = 0

    @property
    def classes(self) -> list:
        return [c.cls for c in self.cells]


# --- shapes: soft (anti-aliased) alpha maps on a patch ------------------------------------------

def _ramp(signed_distance: np.ndarray) -> np.ndarray:
    """Alpha from a signed distance (positive inside), one pixel of anti-aliasing."""
    return np.clip(signed_distance + 0.5, 0.0, 1.0)


def _blob_sd(dx, dy, radius: float, harmonics) -> np.ndarray:
    """Signed distance (approximate) to a wobbly disc r(theta) = R (1 + sum a cos(k theta + p))."""
    rho = np.sqrt(dx * dx + dy * dy)
    theta = np.arctan2(dy, dx)
    r = np.full_like(rho, radius)
    for k, amp, phase in harmonics:
        r = r + radius * amp * np.cos(k * theta + phase)
    return r - rho


def _wobble(rng, amount: float) -> list:
    return [(k, rng.uniform(-amount, amount) / k, rng.uniform(0, 2 * math.pi)) for k in (2, 3, 4, 5)]


def _disc_sd(dx, dy, cx: float, cy: float, r: float) -> np.ndarray:
    return r - np.sqrt((dx - cx) ** 2 + (dy - cy) ** 2)


def _capsule_sd(dx, dy, a, b, half_width: float) -> np.ndarray:
    """Signed distance to a thick segment from a to b."""
    ax, ay = a
    bx, by = b
    vx, vy = bx - ax, by - ay
    t = np.clip(((dx - ax) * vx + (dy - ay) * vy) / max(vx * vx + vy * vy, 1e-6), 0.0, 1.0)
    return half_width - np.sqrt((dx - ax - t * vx) ** 2 + (dy - ay - t * vy) ** 2)


def _smooth_noise(rng, shape: tuple, cell: float) -> np.ndarray:
    """Zero-mean, unit-ish smooth noise with features about `cell` pixels wide."""
    h, w = shape
    gh, gw = max(2, int(h / max(cell, 1.0)) + 2), max(2, int(w / max(cell, 1.0)) + 2)
    grid = rng.standard_normal((gh, gw)).astype(np.float32)
    return cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)


def _granules(rng, dx, dy, radius: float, size: float, cover: float) -> np.ndarray:
    """Alpha of round granules (diameter about `size` px, varying) scattered over a disc of
    `radius` around the patch centre so that they cover about `cover` of it."""
    h, w = dx.shape
    canvas = np.zeros((h, w), np.uint8)
    r_g = max(0.6, size / 2.0)
    n = int(cover * radius * radius / (r_g * r_g))
    rho = radius * np.sqrt(rng.random(n))
    theta = rng.uniform(0, 2 * math.pi, n)
    # patch pixel (0, 0) has local coordinates (dx[0, 0], dy[0, 0])
    px = (rho * np.cos(theta) - dx[0, 0]) * 16
    py = (rho * np.sin(theta) - dy[0, 0]) * 16
    radii = r_g * rng.uniform(0.7, 1.3, n) * 16
    shade = rng.integers(170, 256, n)
    for x, y, r, v in zip(px.astype(int), py.astype(int), radii.astype(int), shade):
        cv2.circle(canvas, (int(x), int(y)), int(r), int(v), -1, cv2.LINE_AA, shift=4)
    return canvas.astype(np.float32) / 255.0


def _rotate(dx, dy, angle: float):
    c, s = math.cos(angle), math.sin(angle)
    return c * dx + s * dy, -s * dx + c * dy


# --- nuclei, in coordinates centred on the cell --------------------------------------------------

def _nucleus_sd(cls: str, dx, dy, R: float, rng) -> np.ndarray:
    angle = rng.uniform(0, 2 * math.pi)
    ux, uy = _rotate(dx, dy, angle)
    if cls == "neutrophil":
        # 3-5 sausage-shaped lobes along a curve, joined by thin chromatin filaments
        n = int(rng.integers(3, 6))
        arc_r = R * rng.uniform(0.42, 0.5)
        offset = arc_r * 0.35
        half = R * rng.uniform(0.15, 0.18) * (1.0 if n < 5 else 0.9)
        gap = R * 0.08
        core = R * rng.uniform(0.08, 0.22)
        max_len = 1.8 * math.pi * arc_r / n  # the lobes may wrap at most 0.9 of a turn
        if 2 * half + gap + core > max_len:
            core = max(0.0, max_len - 2 * half - gap)
            half = min(half, (max_len - gap) / 2)
        step = (2 * half + gap + core) / arc_r
        span = n * step

        def at(t):
            return (arc_r * math.cos(t) - offset, arc_r * math.sin(t))

        sd = np.full(ux.shape, -1e3, np.float32)
        prev_end = None
        trim = (half + gap / 2) / arc_r  # round lobe ends stay `gap` apart along the arc
        for i in range(n):
            t0 = -span / 2 + i * step + trim
            t1 = -span / 2 + (i + 1) * step - trim
            tm = (t0 + t1) / 2
            w = half * rng.uniform(0.85, 1.1)
            sd = np.maximum(sd, _capsule_sd(ux, uy, at(t0), at(tm), w))
            sd = np.maximum(sd, _capsule_sd(ux, uy, at(tm), at(t1), w))
            if prev_end is not None:
                sd = np.maximum(sd, _capsule_sd(ux, uy, prev_end, at(t0), R * 0.035))
            prev_end = at(t1)
        return sd
    if cls == "lymphocyte":
        r = R * rng.uniform(0.76, 0.84)
        ecc = R - r - 1.5
        return _blob_sd(ux - ecc * rng.uniform(0.3, 0.9), uy, r, _wobble(rng, 0.04))
    if cls == "monocyte":
        a, b = R * 0.66, R * 0.5
        ell = (1.0 - np.sqrt((ux / a) ** 2 + (uy / b) ** 2)) * b
        notch = _disc_sd(ux, uy, 0.0, b * rng.uniform(1.05, 1.2), R * rng.uniform(0.26, 0.32))
        return np.minimum(ell, -notch)
    if cls == "eosinophil":
        sep, r = R * rng.uniform(0.30, 0.36), R * rng.uniform(0.27, 0.31)
        sd = np.maximum(_disc_sd(ux, uy, -sep, 0.0, r), _disc_sd(ux, uy, sep, 0.0, r * 0.95))
        return np.maximum(sd, _capsule_sd(ux, uy, (-sep, 0.0), (sep, 0.0), R * 0.045))
    if cls == "basophil":
        sep, r = R * 0.26, R * 0.32
        sd = np.maximum(_disc_sd(ux, uy, -sep, -R * 0.05, r), _disc_sd(ux, uy, sep, R * 0.08, r * 0.9))
        return np.maximum(sd, _disc_sd(ux, uy, 0.0, -R * 0.25, r * 0.7))
    raise ValueError(f"unknown class {cls!r} (known: {', '.join(CLASSES)})")


# --- drawing -------------------------------------------------------------------------------------

WBC_PATCH = 1.2   # half the side of the square a WBC is drawn in, in radii (its wobble fits)


def _window(cx: float, cy: float, half: float, shape: tuple):
    """(rows, columns) slices of a square patch around (cx, cy), clipped; None when empty."""
    h, w = shape
    x0, x1 = max(0, int(cx - half) - 2), min(w, int(cx + half) + 3)
    y0, y1 = max(0, int(cy - half) - 2), min(h, int(cy + half) + 3)
    if x0 >= x1 or y0 >= y1:
        return None
    return slice(y0, y1), slice(x0, x1)


def _patch(cx: float, cy: float, half: float, shape: tuple):
    """Slices and local coordinates (relative to the centre) of a square patch, clipped."""
    sl = _window(cx, cy, half, shape)
    if sl is None:
        return None
    dy, dx = np.mgrid[sl].astype(np.float32)
    return sl, dx - cx, dy - cy


def _composite(dst: np.ndarray, colour, alpha: np.ndarray) -> None:
    a = alpha[..., None]
    dst *= 1.0 - a
    dst += np.asarray(colour, np.float32) * a


def _draw_rbc(img: np.ndarray, cx: float, cy: float, r: float, rng, tint) -> None:
    found = _patch(cx, cy, r * 1.15, img.shape[:2])
    if found is None:
        return
    sl, dx, dy = found
    sd = _blob_sd(dx, dy, r, _wobble(rng, 0.05))
    alpha = _ramp(sd) * 0.92
    rho = np.sqrt(dx * dx + dy * dy) / r
    rim = np.clip(1.0 - sd / (0.18 * r), 0.0, 1.0)  # 1 at the edge, 0 inside
    body = np.asarray(RBC_BODY, np.float32) * tint
    colour = body[None, None, :] * (1.0 - 0.10 * rim[..., None])
    edge = rng.uniform(0.42, 0.55)
    pallor = (0.8 * np.clip((edge - rho) / 0.4, 0.0, 1.0))[..., None]
    colour = colour * (1.0 - pallor) + np.asarray(RBC_PALLOR, np.float32) * tint * pallor
    patch = img[sl]
    a = alpha[..., None]
    patch *= 1.0 - a
    patch += colour * a


def _draw_wbc(img, mask, labels, cell_id: int, cls: str, cx: float, cy: float, R: float, rng, tint):
    found = _patch(cx, cy, R * WBC_PATCH, img.shape[:2])
    sl, dx, dy = found
    shape = dx.shape
    cell_sd = _blob_sd(dx, dy, R, _wobble(rng, 0.06 if cls != "lymphocyte" else 0.03))
    a_cell = _ramp(cell_sd)
    nuc_sd = np.minimum(_nucleus_sd(cls, dx, dy, R, rng), cell_sd - 1.0)
    a_nuc = _ramp(nuc_sd)
    patch = img[sl]

    # cytoplasm, with its texture
    tex = _smooth_noise(rng, shape, R * 0.25)
    cyto = np.asarray(CYTOPLASM[cls], np.float32) * tint
    colour = cyto[None, None, :] * (1.0 + 0.03 * tex[..., None])
    if cls == "neutrophil":
        g = _granules(rng, dx, dy, R * 0.95, max(1.0, R * 0.035), 0.5)[..., None] * 0.35
        colour = colour * (1 - g) + np.asarray(GRANULES[cls], np.float32) * tint * g
    elif cls == "monocyte":
        for _ in range(int(rng.integers(2, 6))):  # a few vacuoles
            t, d = rng.uniform(0, 2 * math.pi), rng.uniform(0.55, 0.8) * R
            vac = _ramp(_disc_sd(dx, dy, d * math.cos(t), d * math.sin(t), R * rng.uniform(0.05, 0.09)))
            colour = colour * (1 - 0.5 * vac[..., None]) + 245.0 * 0.5 * vac[..., None]
    a = a_cell[..., None]
    patch *= 1.0 - a
    patch += colour * a

    # eosinophil granules sit in the cytoplasm, around the nucleus
    if cls == "eosinophil":
        g = _granules(rng, dx, dy, R * 0.97, max(1.5, R * 0.085), 0.95) * a_cell * (1.0 - 0.7 * a_nuc) * 0.9
        _composite(patch, np.asarray(GRANULES[cls], np.float32) * tint, g)

    # nucleus with chromatin texture
    chrom = _smooth_noise(rng, shape, R * (0.12 if cls != "monocyte" else 0.18))
    nuc = np.asarray(NUCLEUS[cls], np.float32) * tint
    strength = 0.12 if cls != "monocyte" else 0.18
    ncol = nuc[None, None, :] * (1.0 + strength * chrom[..., None])
    a = a_nuc[..., None]
    patch *= 1.0 - a
    patch += ncol * a

    # basophil granules cover everything, nucleus included
    if cls == "basophil":
        g = _granules(rng, dx, dy, R * 0.95, max(1.5, R * 0.10), 0.75) * a_cell * 0.92
        _composite(patch, np.asarray(GRANULES[cls], np.float32) * tint, g)

    inside = a_cell >= 0.5
    mk = mask[sl]
    lb = labels[sl]
    free = lb == 0
    mk[inside & free] = 128
    mk[(a_nuc >= 0.5) & inside & free] = 255
    lb[inside & free] = cell_id


# --- the field -----------------------------------------------------------------------------------

def _default_diameter(width: int, height: int) -> float:
    return float(np.clip(min(width, height) / 5.5, 20.0, 220.0))


def _wbc_plan(cells, n_wbc, classes, diameter: Diameter, width, height, rng) -> list:
    """[(class, diameter)] of the WBCs to draw."""
    base = _default_diameter(width, height)

    def size(cls, d):
        if d is None:
            d = diameter
        if d is None:
            return base * CLASS_SIZE[cls] * rng.uniform(0.92, 1.08)
        if isinstance(d, (tuple, list)):
            return float(rng.uniform(d[0], d[1]))
        return float(d)

    if cells is not None and not isinstance(cells, (int, np.integer)):
        plan = []
        for item in cells:
            cls, d = (item, None) if isinstance(item, str) else (item[0], item[1] if len(item) > 1 else None)
            if cls not in CLASS_SIZE:
                raise ValueError(f"unknown class {cls!r} (known: {', '.join(CLASSES)})")
            plan.append((cls, size(cls, d)))
        return plan
    n = int(cells if cells is not None else (n_wbc if n_wbc is not None else 3))
    pool = list(classes) if classes else list(CLASSES)
    for cls in pool:
        if cls not in CLASS_SIZE:
            raise ValueError(f"unknown class {cls!r} (known: {', '.join(CLASSES)})")
    start = int(rng.integers(len(pool))) if not classes else 0
    return [(pool[(start + i) % len(pool)], size(pool[(start + i) % len(pool)], None)) for i in range(n)]


def _place_wbcs(plan, width, height, rng, gap: float) -> list:
    placed = []  # (cls, cx, cy, R)
    for cls, d in plan:
        R = d / 2.0
        lo_x, hi_x = R + 2, width - R - 2
        lo_y, hi_y = R + 2, height - R - 2
        if lo_x > hi_x or lo_y > hi_y:
            continue
        for _ in range(300):
            cx, cy = rng.uniform(lo_x, hi_x), rng.uniform(lo_y, hi_y)
            if all(math.hypot(cx - x, cy - y) >= R + r + gap for _, x, y, r in placed):
                placed.append((cls, cx, cy, R))
                break
    return placed


def make_smear(width: int = 640, height: int = 480, cells=None, *, n_wbc: Optional[int] = None,
               classes: Optional[Sequence[str]] = None, diameter: Diameter = None, seed: int = 0,
               rbc_density: float = 0.45, gap: Optional[float] = None, noise: float = 2.5,
               blur: float = 0.7) -> Smear:
    """Draw a synthetic smear field with its ground truth.

    :param width, height: image size in pixels.
    :param cells: the WBCs: a number, or a list of classes or of `(class, diameter)` pairs
        (diameter None: the default). Overrides `n_wbc` and `classes`.
    :param n_wbc: how many WBCs (default 3), with classes taken in turn from `classes`
        (default: all five, starting at a seeded random one, so 5 WBCs give one of each).
    :param diameter: WBC diameter in pixels: a number, a `(low, high)` range drawn per cell, or
        None: min(width, height) / 5.5 (clipped to 20..220), scaled per class (`CLASS_SIZE`).
    :param seed: the same seed and arguments give the same image, bit for bit.
    :param rbc_density: fraction of the free field covered by red cells (0 for none).
    :param gap: least distance between two WBCs in pixels (default 15 % of the median diameter;
        0 lets them touch).
    :param noise: standard deviation of the sensor noise, in grey levels.
    :param blur: Gaussian blur, in pixels at a 100 px WBC diameter (scaled with it).
    :returns: a `Smear`. WBCs that do not fit (too big, too many) are left out: `Smear.cells`
        lists the ones drawn, always fully inside the image.
    """
    width, height = int(width), int(height)
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    rng = np.random.default_rng(seed)
    tint = (1.0 + rng.uniform(-0.04, 0.04, 3)).astype(np.float32)  # per-smear stain variation
    plan = _wbc_plan(cells, n_wbc, classes, diameter, width, height, rng)
    typical = float(np.median([d for _, d in plan])) if plan else (
        float(np.mean(diameter)) if diameter is not None else _default_diameter(width, height))
    gap = 0.15 * typical if gap is None else float(gap)
    wbcs = _place_wbcs(plan, width, height, rng, gap)

    img = np.empty((height, width, 3), np.float32)
    img[:] = np.asarray(BACKGROUND, np.float32)
    light = _smooth_noise(rng, (height, width), max(width, height) / 3.0)
    img *= (1.0 + 0.025 * light)[..., None]

    # red cells, kept off the WBCs (they may touch them)
    r_rbc = typical * RBC_SIZE / 2.0
    if rbc_density > 0 and r_rbc >= 2:
        free = width * height - sum(math.pi * R * R for *_, R in wbcs)
        n = int(rbc_density * max(free, 0) / (math.pi * r_rbc * r_rbc))
        rbcs = []
        for _ in range(n * 4):
            if len(rbcs) >= n:
                break
            r = r_rbc * rng.uniform(0.88, 1.12)
            cx, cy = rng.uniform(-0.5 * r, width + 0.5 * r), rng.uniform(-0.5 * r, height + 0.5 * r)
            if any(math.hypot(cx - x, cy - y) < R + 0.75 * r for _, x, y, R in wbcs):
                continue
            if any(math.hypot(cx - x, cy - y) < 1.55 * r for x, y in rbcs):
                continue
            rbcs.append((cx, cy))
            _draw_rbc(img, cx, cy, r, rng, tint)

    mask = np.zeros((height, width), np.uint8)
    labels = np.zeros((height, width), np.uint16)
    for i, (cls, cx, cy, R) in enumerate(wbcs, start=1):
        _draw_wbc(img, mask, labels, i, cls, cx, cy, R, rng, tint)

    sigma = blur * typical / 100.0
    if sigma > 0.3:
        img = cv2.GaussianBlur(img, (0, 0), sigma)
    if noise > 0:
        img += rng.standard_normal(img.shape, dtype=np.float32) * noise
    rgb = np.clip(img + 0.5, 0, 255).astype(np.uint8)

    truth = []
    for i, (cls, cx, cy, R) in enumerate(wbcs, start=1):
        # the box of the cell's labels, searched in the whole patch it was drawn in: its wobble
        # reaches past R + 3 px in large cells
        rows, cols = _window(cx, cy, R * WBC_PATCH, labels.shape)
        y0, x0 = rows.start, cols.start
        ys, xs = np.nonzero(labels[rows, cols] == i)
        if len(xs) == 0:
            continue
        truth.append(TruthCell(i, cls, x0 + int(xs.min()), y0 + int(ys.min()),
                               int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1),
                               round(2.0 * R, 2)))
    return Smear(rgb=rgb, mask=mask, labels=labels, cells=truth, seed=seed)


# --- sample sets on disk -------------------------------------------------------------------------

def empty_fields(width: int = 640, height: int = 480, seed: int = 0) -> dict:
    """Fields of view without a single cell, as a scanner delivers them off the smear: name ->
    uint8 RGB. Blank glass, a black frame, glass with sensor noise (sigma 2 grey levels), and
    glass with that noise and lamp falloff (30 % darker in the corners)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width].astype(np.float32)
    falloff = 1 - 0.15 * (((xx - width / 2) / (width / 2)) ** 2 + ((yy - height / 2) / (height / 2)) ** 2)
    glass = np.array([230, 215, 225], np.float32)
    noise = rng.normal(0, 2, (height, width, 3))
    return {
        "blank": np.full((height, width, 3), 230, np.uint8),
        "black": np.zeros((height, width, 3), np.uint8),
        "sensor noise": np.clip(glass + noise, 0, 255).astype(np.uint8),
        "lamp falloff": np.clip(glass * falloff[..., None] + noise, 0, 255).astype(np.uint8),
    }


def lamp_falloff(rgb: np.ndarray, falloff: float, centre=(0.5, 0.5)) -> np.ndarray:
    """The image lit unevenly, as by a misaligned lamp: the gain is 1 at `centre` (fractions of
    width and height) and falls with the square of the distance, to 1 - `falloff` at the
    farthest corner."""
    h, w = rgb.shape[:2]
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    cx, cy = centre[0] * (w - 1), centre[1] * (h - 1)
    d2 = (xx - cx) ** 2 + (yy - cy) ** 2
    gain = 1.0 - np.float32(falloff) * d2 / d2.max()
    return np.clip(rgb.astype(np.float32) * gain[..., None] + 0.5, 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class SmearSpec:
    """One image of a sample set: its relative name (with extension: .jpg, .png, .bmp, .tif)
    and the `make_smear` arguments."""

    name: str
    width: int = 640
    height: int = 480
    n_wbc: int = 3
    classes: Optional[tuple] = None
    diameter: Diameter = None
    seed: int = 0


#: sample_data/: two samples, six fields, every class at least twice, three sizes of WBC
DEFAULT_SPECS = (
    SmearSpec("sample_A/field_01.jpg", 640, 480, 3, ("neutrophil", "lymphocyte", "monocyte"), seed=101),
    SmearSpec("sample_A/field_02.png", 640, 480, 3, ("eosinophil", "basophil", "neutrophil"), seed=102),
    SmearSpec("sample_A/field_03.jpg", 1024, 768, 6, None, diameter=(130, 160), seed=103),
    SmearSpec("sample_B/field_01.jpg", 640, 480, 2, ("lymphocyte", "eosinophil"), diameter=(70, 85), seed=201),
    SmearSpec("sample_B/field_02.png", 640, 480, 4, ("monocyte", "basophil", "neutrophil", "lymphocyte"),
              seed=202),
    SmearSpec("sample_B/field_03.jpg", 640, 480, 3, ("neutrophil", "neutrophil", "eosinophil"),
              diameter=(95, 110), seed=203),
)

TRUTH_COLUMNS = ("image", "x", "y", "width", "height", "class")


def encode_image(rgb: np.ndarray, suffix: str, jpeg_quality: int = 92) -> bytes:
    """The bytes of an image file of the given suffix (.jpg/.jpeg/.png/.bmp/.tif/.tiff)."""
    params = [cv2.IMWRITE_JPEG_QUALITY, int(jpeg_quality)] if suffix.lower() in (".jpg", ".jpeg") else []
    img = rgb if rgb.ndim == 2 else cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(suffix.lower(), img, params)
    if not ok:
        raise ValueError(f"cannot encode an image as {suffix}")
    return buf.tobytes()


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def mask_name(image: str) -> str:
    """The truth mask of an image, relative to the truth folder: `masks/<image without ext>.png`."""
    stem = image.rsplit(".", 1)[0] if "." in image.rsplit("/", 1)[-1] else image
    return f"masks/{stem}.png"


def write_sample_set(folder, specs: Sequence[SmearSpec] = DEFAULT_SPECS, images_subdir: str = "smears",
                     truth_subdir: str = "truth", jpeg_quality: int = 92) -> dict:
    """Draw the fields of `specs` and save them with their ground truth.

    Layout (names relative to `folder`; see sample_data/README.md):
    `<images_subdir>/<spec.name>` the images; `<truth_subdir>/truth.csv` one row per WBC
    (image,x,y,width,height,class; image relative to the images folder); `<truth_subdir>/masks/
    <spec.name without extension>.png` the 0/128/255 masks. The truth lives outside the images
    folder so that a run over the images never mistakes a mask for an image.

    :returns: `{"images": [paths], "truth_csv": path, "masks": [paths], "smears": {name: Smear}}`.
    """
    folder = Path(folder)
    images_dir = folder / images_subdir if images_subdir else folder
    truth_dir = folder / truth_subdir
    images, masks, smears, rows = [], [], {}, []
    for spec in specs:
        smear = make_smear(spec.width, spec.height, n_wbc=spec.n_wbc, classes=spec.classes,
                           diameter=spec.diameter, seed=spec.seed)
        smears[spec.name] = smear
        suffix = Path(spec.name).suffix
        images.append(_write(images_dir / spec.name, encode_image(smear.rgb, suffix, jpeg_quality)))
        masks.append(_write(truth_dir / mask_name(spec.name), encode_image(smear.mask, ".png")))
        if not smear.cells:
            rows.append((spec.name, "", "", "", "", ""))
        for c in smear.cells:
            rows.append((spec.name, c.x, c.y, c.width, c.height, c.cls))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(TRUTH_COLUMNS)
    writer.writerows(rows)
    truth_csv = _write(truth_dir / "truth.csv", buf.getvalue().encode("utf-8"))
    return {"images": images, "truth_csv": truth_csv, "masks": masks, "smears": smears}
