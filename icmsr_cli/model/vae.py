"""SD's VAE (diffusers' AutoencoderKL with DownEncoderBlock2D/UpDecoderBlock2D), with its parameter
names and arithmetic. `encode` gives the posterior's mode (its mean), `decode` the image; the
latent scaling constant is graph.py's."""

from __future__ import annotations

import torch
from torch import nn

from .attention import attend
from .blocks import Downsample2D, ResnetBlock2D, Upsample2D
from .devices import layout_of
from .folders import FromFolder, check_config

#: the config values this module implements (a key's absence means diffusers' default: this value)
_REQUIRED = {
    "act_fn": "silu",
    "scaling_factor": 0.18215,  # graph.LATENT_SCALE: a VAE with another (SDXL's, SD3's) is another model
    "shift_factor": None,
    "latents_mean": None,
    "latents_std": None,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "mid_block_add_attention": True,
}
_EPS = 1e-6  # every norm of the VAE


class Attention(nn.Module):
    """The mid-block's self-attention over all pixels: GroupNorm, q/k/v, attention (attention.py's
    route), output projection, plus the input."""

    def __init__(self, channels: int, *, groups: int):
        super().__init__()
        self.heads = 1  # diffusers: channels // attention_head_dim, with attention_head_dim = channels
        self.scale = channels**-0.5
        self.group_norm = nn.GroupNorm(groups, channels, eps=_EPS, affine=True)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels), nn.Dropout(0.0)])
        self.rescale_output_factor = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        # as diffusers norms it: over (B, C, H*W); an eager GroupNorm hands back contiguous whatever it is given
        y = self.group_norm(x.reshape(b, c, h * w)).view(b, c, h, w).contiguous(memory_format=layout_of(x))
        # not in place: attend's (B, C, H, W) view of its (B, H*W, C) result can carry a batch stride
        # that CPU GroupNorm does not take for channels-last, and the sum is a fresh, dense tensor.
        # No division by a factor of 1: the same floats (blocks.ResnetBlock2D says why).
        out = attend(self, y) + x
        return out if self.rescale_output_factor == 1 else out / self.rescale_output_factor


class MidBlock(nn.Module):
    def __init__(self, channels: int, *, groups: int):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(channels, channels, temb_channels=None, groups=groups, eps=_EPS) for _ in range(2)])
        self.attentions = nn.ModuleList([Attention(channels, groups=groups)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        for attn, resnet in zip(self.attentions, self.resnets[1:]):
            x = resnet(attn(x) if attn is not None else x)  # None: a config without the attention (diffusers allows it)
        return x


class CoderBlock(nn.Module):
    """DownEncoderBlock2D (a Downsample2D as `downsamplers`) or UpDecoderBlock2D (an Upsample2D as
    `upsamplers`): resnets at one width, then the resampling unless the block is the last."""

    def __init__(self, in_channels: int, out_channels: int, *, layers: int, groups: int, resample: str | None):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, temb_channels=None, groups=groups, eps=_EPS) for i in range(layers)]
        )
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels, padding=0)]) if resample == "down" else None
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if resample == "up" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        for resample in [*(self.downsamplers or ()), *(self.upsamplers or ())]:
            x = resample(x)
        return x


class Encoder(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        widths, groups, layers = config["block_out_channels"], config.get("norm_num_groups", 32), config.get("layers_per_block", 2)
        self.conv_in = nn.Conv2d(config.get("in_channels", 3), widths[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            CoderBlock(widths[max(i - 1, 0)], w, layers=layers, groups=groups, resample="down" if i < len(widths) - 1 else None) for i, w in enumerate(widths)
        )
        self.mid_block = MidBlock(widths[-1], groups=groups)
        self.conv_norm_out = nn.GroupNorm(groups, widths[-1], eps=_EPS)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(widths[-1], 2 * config.get("latent_channels", 4), 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return self.conv_out(self.conv_act(self.conv_norm_out(self.mid_block(x))))


class Decoder(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        widths, groups, layers = config["block_out_channels"], config.get("norm_num_groups", 32), config.get("layers_per_block", 2)
        up = list(reversed(widths))
        self.conv_in = nn.Conv2d(config.get("latent_channels", 4), widths[-1], 3, padding=1)
        self.mid_block = MidBlock(widths[-1], groups=groups)
        self.up_blocks = nn.ModuleList(
            CoderBlock(up[max(i - 1, 0)], w, layers=layers + 1, groups=groups, resample="up" if i < len(up) - 1 else None) for i, w in enumerate(up)
        )
        self.conv_norm_out = nn.GroupNorm(groups, widths[0], eps=_EPS)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(widths[0], config.get("out_channels", 3), 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(self.conv_act(self.conv_norm_out(x)))


class AutoencoderKL(FromFolder, nn.Module):
    """SD-2.1-base's VAE from its diffusers config (block types checked)."""

    def __init__(self, config: dict):
        super().__init__()
        check_config(config, "VAE config", {
            **_REQUIRED,
            "down_block_types": ["DownEncoderBlock2D"] * len(config["block_out_channels"]),
            "up_block_types": ["UpDecoderBlock2D"] * len(config["block_out_channels"]),
        })
        latent = config.get("latent_channels", 4)
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * latent, 2 * latent, 1)
        self.post_quant_conv = nn.Conv2d(latent, latent, 1)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The posterior's mode: the mean half of the moments."""
        moments = self.quant_conv(self.encoder(x))
        return moments[:, : moments.shape[1] // 2]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))
