"""PSNR and SSIM on the Y channel, as the super-resolution papers' tables compute them.

The definitions are pyiqa's with `test_y_channel=True, color_space='ycbcr'` (what OSEDiff's and
most one-step SR papers' evaluation scripts call):
- Y is BT.601 luma with the studio offset, from RGB in [0, 1]:
  Y = (65.481 R + 128.553 G + 24.966 B + 16) / 255, so Y lies in [16/255, 235/255].
- PSNR: 10 log10(1 / (mean((Y1 - Y2)^2) + 1e-8)) on Y in [0, 1], not rounded (identical images: 80 dB).
- SSIM: on Y * 255 rounded to integers (as MATLAB's uint8 images), in float64, with the 11x11
  Gaussian window of sigma 1.5 (MATLAB's fspecial), 'valid' filtering (no padding), C1 = (0.01*255)^2,
  C2 = (0.03*255)^2, the contrast-structure term clipped at 0, averaged over the map; no downsampling.

Pixels arrive as float arrays H x W x C in [0, 1] (images.read_image), C = 1..4: gray is RGB with equal
channels, alpha is ignored (pyiqa converts to RGB). numpy and OpenCV only, so `icmsr eval` never loads torch.
"""

from __future__ import annotations

import math

import numpy as np

Y_WEIGHTS = np.array([65.481, 128.553, 24.966]) / 255.0  # BT.601 studio-swing luma, RGB in [0, 1]
Y_OFFSET = 16.0 / 255.0
PSNR_EPS = 1e-8  # pyiqa's: makes identical images score 10 log10(1e8) = 80 dB instead of infinity
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5


def luma(pixels: np.ndarray) -> np.ndarray:
    """Y in [0, 1] (float64, H x W) of an H x W x C image in [0, 1]; gray (C <= 2) counts as R = G = B."""
    rgb = pixels[..., :3] if pixels.shape[2] >= 3 else np.repeat(pixels[..., :1], 3, axis=2)
    return rgb.astype(np.float64) @ Y_WEIGHTS + Y_OFFSET


def crop(plane: np.ndarray, border: int) -> np.ndarray:
    """Drop `border` pixels on each side (the papers' crop_border, often the scale factor)."""
    if 2 * border >= min(plane.shape):
        raise ValueError(f"{plane.shape[1]}x{plane.shape[0]} has nothing left after cropping {border} pixels on each side")
    return plane[border:-border, border:-border] if border > 0 else plane


def psnr_y(sr: np.ndarray, ref: np.ndarray, *, crop_border: int = 0) -> float:
    a, b = crop(luma(sr), crop_border), crop(luma(ref), crop_border)
    mse = float(np.mean((a - b) ** 2))
    return 10.0 * math.log10(1.0 / (mse + PSNR_EPS))


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> np.ndarray:
    """The 1-D factor of MATLAB's fspecial('gaussian', size, sigma), normalised to sum 1.

    fspecial's 2-D kernel is exp(-(x^2+y^2)/2s^2)/sum, which equals the outer product of this vector
    with itself (its cut-off of values under eps*max removes nothing at 11 and 1.5)."""
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    g = np.exp(-(x * x) / (2.0 * sigma * sigma))
    return g / g.sum()


def ssim_y(sr: np.ndarray, ref: np.ndarray, *, crop_border: int = 0) -> float:
    import cv2

    x = np.round(crop(luma(sr), crop_border) * 255.0)
    y = np.round(crop(luma(ref), crop_border) * 255.0)
    if min(x.shape) < SSIM_WINDOW:
        raise ValueError(f"{x.shape[1]}x{x.shape[0]} after cropping is smaller than the {SSIM_WINDOW}x{SSIM_WINDOW} SSIM window")
    g = gaussian_window()
    h = SSIM_WINDOW // 2

    def blur(plane: np.ndarray) -> np.ndarray:  # 'valid' filtering: the border OpenCV fills is cut away
        return cv2.sepFilter2D(plane, cv2.CV_64F, g, g, borderType=cv2.BORDER_REFLECT)[h:-h, h:-h]

    c1, c2 = (0.01 * 255.0) ** 2, (0.03 * 255.0) ** 2
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x * mu_x
    var_y = blur(y * y) - mu_y * mu_y
    cov = blur(x * y) - mu_x * mu_y
    cs = np.maximum((2.0 * cov + c2) / (var_x + var_y + c2), 0.0)
    return float(np.mean((2.0 * mu_x * mu_y + c1) / (mu_x * mu_x + mu_y * mu_y + c1) * cs))
