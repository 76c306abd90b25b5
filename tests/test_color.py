"""Colour fixes against their formulas, written out independently in numpy."""

from __future__ import annotations

import numpy as np
import torch

from icmsr_cli.model.color import adain_color_fix, apply_color_fix, wavelet_blur, wavelet_color_fix


def _np_blur(img: np.ndarray) -> np.ndarray:
    """Five dilated passes of [1,2,1]^T[1,2,1]/16 with edge (replicate) padding, by explicit sums."""
    k = np.array([1.0, 2.0, 1.0])
    k2 = np.outer(k, k) / 16
    for level in range(5):
        d = 2**level
        p = np.pad(img, ((0, 0), (d, d), (d, d)), mode="edge")
        h, w = img.shape[1:]
        img = sum(k2[i, j] * p[:, i * d : i * d + h, j * d : j * d + w] for i in range(3) for j in range(3))
    return img


def _rand(seed, shape=(3, 23, 41)):
    return np.random.default_rng(seed).random(shape)


def test_adain_matches_formula():
    y, x = _rand(0), _rand(1) * 0.3 + 0.2
    out = adain_color_fix(torch.from_numpy(y)[None], torch.from_numpy(x)[None])[0].numpy()
    ys = y.reshape(3, -1)
    xs = x.reshape(3, -1)
    std = lambda a: np.sqrt(a.var(axis=1, ddof=1) + 1e-5)[:, None, None]  # unbiased var + 1e-5
    expected = (y - ys.mean(1)[:, None, None]) / std(ys) * std(xs) + xs.mean(1)[:, None, None]
    np.testing.assert_allclose(out, expected, rtol=1e-10, atol=1e-12)


def test_wavelet_blur_matches_formula_and_keeps_constants():
    x = _rand(2)
    np.testing.assert_allclose(wavelet_blur(torch.from_numpy(x)[None])[0].numpy(), _np_blur(x), atol=1e-12)
    flat = torch.full((1, 3, 9, 13), 0.37, dtype=torch.float64)
    torch.testing.assert_close(wavelet_blur(flat), flat)


def test_wavelet_fix_is_high_of_y_plus_low_of_x():
    y, x = _rand(3), _rand(4)
    out = wavelet_color_fix(torch.from_numpy(y)[None], torch.from_numpy(x)[None])[0].numpy()
    np.testing.assert_allclose(out, y - _np_blur(y) + _np_blur(x), atol=1e-12)


def test_apply_runs_in_float32_and_none_is_identity():
    y = torch.rand(1, 3, 16, 16, dtype=torch.bfloat16)
    x = torch.rand(1, 3, 16, 16)
    assert apply_color_fix("adain", y, x).dtype == torch.float32
    assert apply_color_fix("none", y, x) is y


def test_adain_in_place_is_bitwise_the_pure_result():
    torch.manual_seed(5)
    y, x = torch.rand(1, 3, 40, 30), torch.rand(1, 3, 40, 30)
    expected = adain_color_fix(y, x)
    work = y.clone()
    out = adain_color_fix(work, x, inplace=True)
    assert out.data_ptr() == work.data_ptr() and torch.equal(out, expected)
