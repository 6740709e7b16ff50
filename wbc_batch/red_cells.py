"""The size of a field's red cells, learned: a field's magnification whether or not it holds a WBC.

A WBC is larger than the red cells beside it in every smear but for the smallest lymphocytes,
which are about a red cell's size. A field of red cells without any WBC leaves the WBC scale
estimate nothing to measure, and it settles on red cells or smaller things (docs/EXPERIMENTS.md,
"Fields without a WBC"); the red cells' size tells such an estimate apart.

`RedCellSizer` is a small convolutional regressor (`CHANNELS`, GroupNorm, no batch statistics)
that reads a square window of the field, shrunk to `SIDE` px and standardised per channel, and
gives the log of the typical red cell's size (sqrt(w h) of its box) in the shrunk window's
pixels. It is trained by `wbc_batch.train.red_cells` on the RBC boxes of BCCD and TXL-PBC train
fields, at window scales that put red cells from `MIN_SIZE` to `MAX_SIZE` px across. Its
forward pass here is numpy and OpenCV alone, so it runs the same under every backend.

`red_cell_size` reads a field in two passes: windows the field's shorter side across, then
windows sized so that the red cells come out about `AIM` px across; each pass takes up to
`GRID` x `GRID` windows spread over the field and the median of their answers, the second's in
original pixels.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Optional

import cv2
import numpy as np

#: the shrunk window's side, px
SIDE = 128
#: channels of each stage (a stride-2 convolution then a stride-1 one, each 3x3, GroupNorm, ReLU)
CHANNELS = (16, 24, 32, 48, 64, 64)
GROUPS = 4
#: red-cell sizes, in the shrunk window's px, that training covers
MIN_SIZE, MAX_SIZE = 3.5, 64.0
#: the red cells' size the second pass frames them at, px of the shrunk window
AIM = 24.0
#: the second pass's windows along each side, at most
GRID = 3
WEIGHTS_FILE = "red_cells.safetensors"
#: the shipped sizer's weights, in the shipped bundle; used for every bundle without its own
#: (`ModelBundle.red_cell_sizer`), since a field's red cells' size does not depend on the
#: segmenter or classifier a lab trains
SHIPPED = Path(__file__).resolve().parent / "models" / WEIGHTS_FILE
#: a WBC size estimate under this many red cells' sizes is taken for red cells, not WBCs ...
BAR = 0.8
#: ... and replaced by this many: the median, over the train fields the sizer learned from, of
#: their WBC boxes' size over their red cells' (docs/EXPERIMENTS.md, "A learned red-cell size")
WBC_OVER_RBC = 1.82


def layer_names() -> list:
    """(conv name, norm name, stride) of each convolution, in order: the torch module's names."""
    out, i = [], 0
    for _ in CHANNELS:
        for stride in (2, 1):
            out.append((f"body.{i}", f"body.{i + 1}", stride))
            i += 3
    return out


def standardise(window: np.ndarray) -> np.ndarray:
    """A uint8 RGB window already at SIDE x SIDE as the network's float32 (3, SIDE, SIDE) input:
    each channel less its mean, over its spread, so a lamp's or a stain's colour counts less."""
    x = window.astype(np.float32).transpose(2, 0, 1)
    mean = x.mean(axis=(1, 2), keepdims=True)
    std = x.std(axis=(1, 2), keepdims=True)
    return (x - mean) / np.maximum(std, 1.0)


def shrink(rgb: np.ndarray, x: int, y: int, side: int) -> np.ndarray:
    """The square window of `rgb` at (x, y), `side` px across, shrunk (or enlarged) to SIDE."""
    win = rgb[y:y + side, x:x + side]
    inter = cv2.INTER_AREA if side >= SIDE else cv2.INTER_LINEAR
    return cv2.resize(np.ascontiguousarray(win), (SIDE, SIDE), interpolation=inter)


class RedCellSizer:
    """The trained regressor's forward pass in numpy (weights: name -> float32 array, as saved
    from `wbc_batch.train.red_cells.SizerNet`)."""

    def __init__(self, weights: dict):
        self.layers = []
        for conv, norm, stride in layer_names():
            self.layers.append((np.asarray(weights[conv + ".weight"], np.float32), stride,
                                np.asarray(weights[norm + ".weight"], np.float32),
                                np.asarray(weights[norm + ".bias"], np.float32)))
        self.head_w = np.asarray(weights["head.weight"], np.float32)
        self.head_b = np.asarray(weights["head.bias"], np.float32)

    @classmethod
    def load(cls, path: Path) -> "RedCellSizer":
        """From a safetensors file (nothing is unpickled); ValueError naming it when unreadable."""
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        try:
            weights = load_file(str(path))
        except (SafetensorError, OSError) as exc:
            raise ValueError(f"cannot read model file {path}: {exc}") from exc
        try:
            return cls(weights)
        except KeyError as exc:
            raise ValueError(f"model file {path} does not hold the red-cell sizer's {exc}") from None

    def log_sizes(self, batch: np.ndarray) -> np.ndarray:
        """(N,) log red-cell sizes, in SIDE-px windows, of a float32 (N, 3, SIDE, SIDE) batch."""
        x = batch
        for w, stride, gamma, beta in self.layers:
            x = _relu(_group_norm(_conv3x3(x, w, stride), gamma, beta))
        return x.mean(axis=(2, 3)) @ self.head_w.T[:, 0] + self.head_b[0]


def _conv3x3(x: np.ndarray, w: np.ndarray, stride: int) -> np.ndarray:
    """A 3x3 convolution with padding 1 and no bias, as torch's Conv2d (im2col and one matmul)."""
    n, c, h, wd = x.shape
    p = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    ho, wo = (h - 1) // stride + 1, (wd - 1) // stride + 1
    cols = np.empty((n, c, 3, 3, ho, wo), np.float32)
    for i in range(3):
        for j in range(3):
            cols[:, :, i, j] = p[:, :, i:i + stride * ho:stride, j:j + stride * wo:stride]
    out = np.tensordot(w.reshape(w.shape[0], -1), cols.reshape(n, c * 9, ho * wo), axes=([1], [1]))
    return out.transpose(1, 0, 2).reshape(n, w.shape[0], ho, wo)


def _group_norm(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    n, c, h, w = x.shape
    g = x.reshape(n, GROUPS, -1)
    g = (g - g.mean(axis=2, keepdims=True)) / np.sqrt(g.var(axis=2, keepdims=True) + eps)
    return g.reshape(n, c, h, w) * gamma[None, :, None, None] + beta[None, :, None, None]


def _relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0, out=x)


@functools.lru_cache(maxsize=1)
def shipped_sizer() -> RedCellSizer:
    """The sizer shipped with the package, loaded once per process.

    :raises BundleError: the file is missing or damaged (with how to reinstall it)."""
    from .bundle import BundleError, reinstall_advice

    try:
        return RedCellSizer.load(SHIPPED)
    except ValueError as exc:
        raise BundleError(f"{exc}; {reinstall_advice()}") from None


def sizer_of(bundle) -> RedCellSizer:
    """The bundle's sizer (`ModelBundle.red_cell_sizer`), or the package's for a bundle object
    without one (a third party's)."""
    return getattr(bundle, "red_cell_sizer", None) or shipped_sizer()


def barred_diameter(diameter: float, rbc: Optional[float]) -> float:
    """`diameter` (a WBC size estimate, px), or `WBC_OVER_RBC` red cells' size `rbc` where the
    estimate is under `BAR` of it: the estimate then measured red cells or smaller things, as in
    a field without a WBC, and would enlarge the field until red cells pass for WBCs."""
    if rbc is not None and diameter < BAR * rbc:
        return WBC_OVER_RBC * rbc
    return diameter


def windows(h: int, w: int, side: int, grid: int = GRID) -> list:
    """Top-left corners of up to grid x grid square windows `side` px across, spread evenly
    over an h x w field (one along a side the window spans)."""
    def starts(n: int) -> list:
        k = 1 if n <= side else grid
        return sorted({round(i * (n - side) / max(k - 1, 1)) for i in range(k)})

    return [(x, y) for y in starts(h) for x in starts(w)]


def red_cell_size(rgb: np.ndarray, sizer: RedCellSizer) -> Optional[float]:
    """The typical red cell's size, sqrt(w h) of its box in original px, of a uint8 RGB field;
    None for a field under 2 x `MIN_SIZE` px a side, too small to frame red cells in."""
    h, w = rgb.shape[:2]
    short = min(h, w)
    if short < 2 * MIN_SIZE:
        return None
    size = _median_size(rgb, sizer, short) * short / SIDE
    side = int(round(min(short, max(size * SIDE / AIM, SIDE / 4))))
    return _median_size(rgb, sizer, side) * side / SIDE


def _median_size(rgb: np.ndarray, sizer: RedCellSizer, side: int) -> float:
    """The median answer, in SIDE-px windows, over the field's windows `side` px across."""
    h, w = rgb.shape[:2]
    batch = np.stack([standardise(shrink(rgb, x, y, side)) for x, y in windows(h, w, side)])
    return float(np.exp(np.median(sizer.log_sizes(batch))))
