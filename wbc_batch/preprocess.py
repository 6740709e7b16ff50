"""Pixel preprocessing shared by run time and training, so both see identical inputs.

Normalisation is per image (segmenter) or per crop (classifier): each channel is centred on its
own mean and scaled by its own standard deviation. A smear from another lab with a bluer stain or
a darker lamp therefore reaches the networks with the same statistics as ours; what is left to
learn is the relative colour and texture, which is what distinguishes the cells.
"""

from __future__ import annotations

import cv2
import numpy as np

EPS = 1.0


def grey(rgb: np.ndarray) -> np.ndarray:
    """A uint8 RGB image in grey: its luminance in all three channels. Training's grey crops
    and patches (`train.augment.photometric`) and the flagged cells' grey crops of
    `--grey-unusual` and `--blend-unusual` are made by it."""
    return cv2.cvtColor(cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY),
                        cv2.COLOR_GRAY2RGB)


def channel_stats(rgb: np.ndarray, max_pixels: int = 1 << 18, exclude=None) -> tuple:
    """Per-channel mean and std of a uint8 RGB image, from a subsample for large images;
    without the pixels of the bool mask `exclude` (a frame filled with glass) when it leaves
    any."""
    h, w = rgb.shape[:2]
    step = max(1, int(np.sqrt(h * w / max_pixels)))
    sub = rgb[::step, ::step]
    if exclude is not None and not exclude[::step, ::step].all():
        sub = sub[~exclude[::step, ::step]]
    sub = sub.reshape(-1, 3).astype(np.float32)
    return sub.mean(axis=0), sub.std(axis=0)


def normalize(rgb: np.ndarray, stats: tuple | None = None) -> np.ndarray:
    """uint8 (H, W, 3) RGB -> float32 (3, H, W), standardised per channel."""
    mean, std = stats if stats is not None else channel_stats(rgb)
    x = (rgb.astype(np.float32) - mean) / (std + EPS)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def resize(rgb: np.ndarray, scale: float) -> np.ndarray:
    """Resize by `scale` (area averaging when shrinking, bilinear when enlarging)."""
    if abs(scale - 1.0) < 1e-3:
        return rgb
    h, w = rgb.shape[:2]
    size = (max(1, int(round(w * scale))), max(1, int(round(h * scale))))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    return cv2.resize(rgb, size, interpolation=interp)


def pad_to_multiple(x: np.ndarray, multiple: int = 32) -> tuple:
    """Reflect-pad a (C, H, W) array at the bottom/right to multiples of `multiple`.

    Returns (padded, (H, W)) so the caller can crop the result back."""
    c, h, w = x.shape
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph or pw:
        mode = "reflect" if (h > ph and w > pw) else "edge"
        x = np.pad(x, ((0, 0), (0, ph), (0, pw)), mode=mode)
    return x, (h, w)


def square_box(x: int, y: int, w: int, h: int, margin: float) -> tuple:
    """The square crop window (x0, y0, side) centred on a cell's bounding box.

    side = margin * max(w, h); the window may extend outside the image (see `crop_square`)."""
    side = max(2, int(round(margin * max(w, h))))
    cx, cy = x + w / 2.0, y + h / 2.0
    return int(round(cx - side / 2.0)), int(round(cy - side / 2.0)), side


def crop_square(rgb: np.ndarray, x0: int, y0: int, side: int, size: int) -> np.ndarray:
    """Cut the square window (x0, y0, side) out of `rgb`, reflecting at the borders, and resize
    it to (size, size). This is the one way classifier crops are made, at run time and in training."""
    h, w = rgb.shape[:2]
    x1, y1 = x0 + side, y0 + side
    cx0, cy0, cx1, cy1 = max(0, x0), max(0, y0), min(w, x1), min(h, y1)
    patch = rgb[cy0:cy1, cx0:cx1]
    pads = (cy0 - y0, y1 - cy1, cx0 - x0, x1 - cx1)
    if any(pads):
        border = cv2.BORDER_REFLECT_101 if min(patch.shape[:2]) > 1 else cv2.BORDER_REPLICATE
        patch = cv2.copyMakeBorder(patch, *pads, border)
    interp = cv2.INTER_AREA if side > size else cv2.INTER_LINEAR
    return cv2.resize(patch, (size, size), interpolation=interp)


def cell_crop(rgb: np.ndarray, box: tuple, margin: float, size: int) -> np.ndarray:
    """The classifier's input for a cell with bounding box (x, y, w, h): uint8 (size, size, 3)."""
    x0, y0, side = square_box(*box, margin)
    return crop_square(rgb, x0, y0, side, size)


def normalize_crops(crops: list) -> np.ndarray:
    """A list of uint8 (S, S, 3) crops -> float32 (N, 3, S, S), each standardised on its own."""
    if not crops:
        return np.zeros((0, 3, 1, 1), np.float32)
    x = np.stack(crops).astype(np.float32)
    mean = x.mean(axis=(1, 2), keepdims=True)
    std = x.std(axis=(1, 2), keepdims=True)
    return np.ascontiguousarray(((x - mean) / (std + EPS)).transpose(0, 3, 1, 2))
