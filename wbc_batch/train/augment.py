"""Photometric augmentation for robustness to other labs' stains, lamps, cameras and focus.

All functions take and return uint8 RGB arrays and draw from a numpy Generator, so training is
seeded. Geometric augmentation (scale, rotation, flips) happens where patches are cut.
"""

from __future__ import annotations

import cv2
import numpy as np

from ..preprocess import grey
from ..stain import optical_density, stain_axes

#: default colour distrust: chance of a grey image, hue range (OpenCV units), saturation range
GRAY_P, HUE, SAT = 0.1, 12, 0.4
#: colour settings that distrust colour more (`train classifier|segmenter --strong-colour`)
STRONG_COLOUR = {"gray_p": 0.3, "hue": 20, "sat": 0.5}


def colour_settings(cfg) -> dict:
    """`photometric`'s colour arguments (gray_p, hue, sat, od_p) from a training config holding them."""
    return {k: getattr(cfg, k) for k in ("gray_p", "hue", "sat", "od_p")}


def stain_jitter(rgb: np.ndarray, rng: np.random.Generator, strength: float = 1.0) -> np.ndarray:
    """Random colour mixing matrix near identity, per-channel gain and offset, and gamma."""
    m = np.eye(3, dtype=np.float32) * rng.uniform(1 - 0.25 * strength, 1 + 0.25 * strength, 3)
    m += rng.normal(0, 0.08 * strength, (3, 3)).astype(np.float32) * (1 - np.eye(3, dtype=np.float32))
    bias = rng.normal(0, 18 * strength, 3).astype(np.float32)
    out = cv2.transform(rgb.astype(np.float32), np.hstack([m, bias[:, None]]))
    out = np.clip(out, 0, 255)
    gamma = float(np.exp(rng.normal(0, 0.25 * strength)))
    out = 255.0 * (out / 255.0) ** gamma
    # contrast around the mean
    c = float(np.exp(rng.normal(0, 0.2 * strength)))
    mean = out.reshape(-1, 3).mean(axis=0)
    out = (out - mean) * c + mean
    return np.clip(out, 0, 255).astype(np.uint8)


def od_stain(rgb: np.ndarray, rng: np.random.Generator, amount: float = 0.3, shift: float = 0.05,
             turn: float = 0.12) -> np.ndarray:
    """Another staining of the same smear: each of the crop's two stains (`stain_axes`) gets
    more or less dye (x 1 +- `amount`, + +-`shift` optical density) and a slightly different
    colour (its direction moved by about `turn`), the way H&E augmentation does it for
    histology (Tellez et al. 2018), but with the stains estimated per crop. A per-channel gain
    in intensity (what `stain_jitter` does) cannot make a thinner eosin or a redder azure; this
    can. Crops without two stains come back unchanged."""
    od = optical_density(rgb)
    basis = stain_axes(od)
    if basis is None:
        return rgb
    conc = od.reshape(-1, 3) @ np.linalg.inv(basis)
    conc[:, :2] = conc[:, :2] * rng.uniform(1 - amount, 1 + amount, 2) + rng.uniform(-shift, shift, 2)
    moved = basis.copy()
    moved[:2] = np.clip(moved[:2] + rng.normal(0, turn, (2, 3)), 0.0, None)
    moved[:2] /= np.maximum(np.linalg.norm(moved[:2], axis=1, keepdims=True), 1e-6)
    out = 256.0 * np.exp(-(conc @ moved)) - 1.0
    return np.clip(out, 0, 255).reshape(rgb.shape).astype(np.uint8)


def hue_saturation(rgb: np.ndarray, rng: np.random.Generator, hue: int = HUE,
                   sat: float = SAT) -> np.ndarray:
    """Hue shifted by up to +-`hue` OpenCV units (2 degrees each), saturation scaled by 1 +- `sat`."""
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV).astype(np.int16)
    hsv[..., 0] = (hsv[..., 0] + int(rng.integers(-hue, hue + 1))) % 180
    hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(1 - sat, 1 + sat), 0, 255)
    return cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB)


def blur_noise(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Defocus blur, sensor noise and JPEG artefacts, each with some probability."""
    out = rgb
    if rng.random() < 0.35:
        sigma = rng.uniform(0.4, 2.0)
        out = cv2.GaussianBlur(out, (0, 0), sigma)
    if rng.random() < 0.3:
        noise = rng.normal(0, rng.uniform(2, 9), out.shape).astype(np.float32)
        out = np.clip(out.astype(np.float32) + noise, 0, 255).astype(np.uint8)
    if rng.random() < 0.25:
        q = int(rng.integers(35, 90))
        ok, buf = cv2.imencode(".jpg", out, [cv2.IMWRITE_JPEG_QUALITY, q])
        if ok:
            out = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    return out


def photometric(rgb: np.ndarray, rng: np.random.Generator, gray_p: float = GRAY_P, hue: int = HUE,
                sat: float = SAT, od_p: float = 0.0) -> np.ndarray:
    """The full photometric chain used for both networks. `gray_p` (the chance of a grey
    image), `hue` and `sat` (see `hue_saturation`) set how far colour itself is distrusted;
    `od_p` is the chance of restaining the image first (`od_stain`). With `od_p` 0 no random
    number is drawn for it, so recipes without it train exactly as before it existed."""
    out = od_stain(rgb, rng) if od_p > 0 and rng.random() < od_p else rgb
    out = stain_jitter(out, rng)
    if rng.random() < 0.5:
        out = hue_saturation(out, rng, hue, sat)
    if rng.random() < gray_p:
        out = grey(out)
    return blur_noise(out, rng)


def affine(center: tuple, scale: float, angle_deg: float, flip: bool, out_size: int) -> np.ndarray:
    """2x3 matrix mapping source pixels to an (out_size x out_size) patch centred on `center`."""
    a = np.deg2rad(angle_deg)
    c, s = np.cos(a) * scale, np.sin(a) * scale
    m = np.array([[c, -s], [s, c]], np.float64)
    if flip:
        m = m @ np.array([[-1, 0], [0, 1]], np.float64)
    t = np.array([out_size / 2.0, out_size / 2.0]) - m @ np.asarray(center, np.float64)
    return np.hstack([m, t[:, None]])
