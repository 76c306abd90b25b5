"""Colour fixes: pull the generated image's colours back to the (upsampled) input's.

Pure functions on float tensors of shape (B, C, H, W) in [0, 1]. The statistics are taken over
the whole image, so callers pass the whole stitched image, never a tile.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..choices import COLOR_FIXES

# StableSR's constant: std = sqrt(unbiased var + 1e-5), which keeps flat images finite.
_ADAIN_EPS = 1e-5
_WAVELET_LEVELS = 5


def _mean_std(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    flat = x.flatten(2)
    mean = flat.mean(dim=2)[..., None, None]
    std = (flat.var(dim=2, unbiased=True) + _ADAIN_EPS).sqrt()[..., None, None]
    return mean, std


def adain_color_fix(y: torch.Tensor, x: torch.Tensor, *, inplace: bool = False) -> torch.Tensor:
    """Per channel: (y - mean(y)) / std(y) * std(x) + mean(x). `inplace` overwrites y (a large
    image's caller saves a whole-image copy per step); the arithmetic is the same."""
    y_mean, y_std = _mean_std(y)
    x_mean, x_std = _mean_std(x)
    if inplace:
        return y.sub_(y_mean).div_(y_std).mul_(x_std).add_(x_mean)
    return (y - y_mean) / y_std * x_std + x_mean


def wavelet_blur(x: torch.Tensor) -> torch.Tensor:
    """B: five depthwise passes of [1,2,1]^T[1,2,1]/16 with dilations 1..16 and replicate padding."""
    k1 = torch.tensor([1.0, 2.0, 1.0], dtype=x.dtype, device=x.device)
    kernel = (torch.outer(k1, k1) / 16).expand(x.shape[1], 1, 3, 3)
    for level in range(_WAVELET_LEVELS):
        d = 2**level
        x = F.conv2d(F.pad(x, (d, d, d, d), mode="replicate"), kernel, groups=x.shape[1], dilation=d)
    return x


def wavelet_color_fix(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Keep y's high frequencies, take x's low ones: (y - B(y)) + B(x)."""
    return y - wavelet_blur(y) + wavelet_blur(x)


def apply_color_fix(name: str, y: torch.Tensor, x: torch.Tensor, *, inplace: bool = False) -> torch.Tensor:
    """Colour-fix y against x in float32 (bf16 statistics would shift the tone); `inplace` lets
    adain overwrite y when y is float32 already."""
    if name == "none":
        return y
    y32, x32 = y.float(), x.float()
    if name == "adain":
        return adain_color_fix(y32, x32, inplace=inplace)
    if name == "wavelet":
        return wavelet_color_fix(y32, x32)
    raise ValueError(f"unknown colour fix {name!r}; choose one of {', '.join(COLOR_FIXES)}")
