"""Crop geometry and normalisation shared by run time and training."""

import numpy as np

from wbc_batch.preprocess import (cell_crop, crop_square, normalize, normalize_crops,
                                  pad_to_multiple, square_box)


def test_square_box_is_centred_and_scaled():
    x0, y0, side = square_box(100, 50, 40, 20, 1.5)
    assert side == 60 and (x0 + side / 2, y0 + side / 2) == (120, 60)


def test_crop_square_reflects_outside_the_image():
    img = np.arange(10 * 10 * 3, dtype=np.uint8).reshape(10, 10, 3)
    out = crop_square(img, -5, -5, 10, 10)
    assert out.shape == (10, 10, 3)
    assert (out[5:, 5:] == img[:5, :5]).all()


def test_cell_crop_size_and_dtype():
    img = np.random.default_rng(0).integers(0, 255, (50, 80, 3), dtype=np.uint8)
    crop = cell_crop(img, (70, 40, 20, 20), 1.3, 96)
    assert crop.shape == (96, 96, 3) and crop.dtype == np.uint8


def test_normalisation_removes_colour_casts():
    rng = np.random.default_rng(1)
    img = rng.integers(60, 200, (32, 32, 3)).astype(np.uint8)
    cast = np.clip(img.astype(int) * [1.2, 0.8, 1.0] + [10, -20, 30], 0, 255).astype(np.uint8)
    a, b = normalize(img), normalize(cast)
    assert np.abs(a - b).max() < 0.1
    c = normalize_crops([img, cast])
    assert c.shape == (2, 3, 32, 32) and np.abs(c[0] - c[1]).max() < 0.1


def test_pad_to_multiple():
    x, (h, w) = pad_to_multiple(np.zeros((3, 33, 70), np.float32), 32)
    assert x.shape == (3, 64, 96) and (h, w) == (33, 70)
    one, _ = pad_to_multiple(np.zeros((3, 1, 1), np.float32), 32)
    assert one.shape == (3, 32, 32)
