"""The convolutional blocks the UNet and the VAE share, with diffusers' parameter names and its
arithmetic, op for op (tests/test_networks.py compares them with diffusers on random weights).

The attribute names are part of the contract: LoRA targets, the merged-weights cache, the fused
GroupNorm swap (norms.py) and the tiled VAE (tiling/vae.py) all find modules by them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ResnetBlock2D(nn.Module):
    """GroupNorm, SiLU, conv, (+ time embedding), GroupNorm, SiLU, conv; plus the input (through a
    1x1 conv when the width changes), divided by `output_scale_factor`."""

    def __init__(self, in_channels: int, out_channels: int, *, temb_channels: int | None, groups: int, eps: float,
                 output_scale_factor: float = 1.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps, affine=True)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels) if temb_channels else None
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps, affine=True)
        self.dropout = nn.Dropout(0.0)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nonlinearity = nn.SiLU()
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        self.output_scale_factor = output_scale_factor

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        # The sums go in place into the conv outputs, and the division by a factor of 1 (every
        # resnet of SD's) is skipped: h + x and x + h are the same floats, x / 1 is x, and each
        # pass skipped is a full read and write of the activation (diffusers' division was 2.5% of
        # a 512^2 run on the CPU).
        h = self.conv1(self.nonlinearity(self.norm1(x)))
        if self.time_emb_proj is not None and temb is not None:
            # F.silu, not self.nonlinearity (diffusers shares the module; the same function): the
            # module then follows the two norms only, and norms.fuse_group_norms can absorb it
            h += self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(self.nonlinearity(self.norm2(h))))
        h += self.conv_shortcut(x) if self.conv_shortcut is not None else x
        return h if self.output_scale_factor == 1 else h / self.output_scale_factor


class Downsample2D(nn.Module):
    """A stride-2 3x3 conv; with `padding=0` the input is first padded by one on the right and
    bottom (the VAE encoder's asymmetric padding)."""

    def __init__(self, channels: int, *, padding: int):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1), mode="constant", value=0)
        return self.conv(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour 2x (or to `size`), then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        if x.numel() * 4 > 2**31:  # the channels-last nearest kernel fails past 2^31 output elements (pytorch#141831)
            x = x.contiguous()
        x = F.interpolate(x, scale_factor=2.0, mode="nearest") if size is None else F.interpolate(x, size=size, mode="nearest")
        return self.conv(x)
