"""SD-2.1-base's UNet (diffusers' UNet2DConditionModel with CrossAttnDownBlock2D/DownBlock2D,
UNetMidBlock2DCrossAttn, UpBlock2D/CrossAttnUpBlock2D and linear-projection transformers), with
its parameter names and arithmetic, built from its diffusers config.

Unlike diffusers' Transformer2DModel, whose output is `.contiguous()` whatever it is given, a
transformer here hands back its input's memory layout: in a channels-last UNet the convolutions
after it then see channels-last activations against channels-last weights (devices.py says why).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SetupError
from .blocks import Downsample2D, ResnetBlock2D, Upsample2D
from .devices import layout_of
from .folders import FromFolder, check_config

#: the config values this module implements (a key's absence means diffusers' default: this value)
_REQUIRED = {
    "act_fn": "silu",
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "use_linear_projection": True,
    "only_cross_attention": False,
    "dual_cross_attention": False,
    "class_embed_type": None,
    "addition_embed_type": None,
    "num_class_embeds": None,
    "encoder_hid_dim": None,
    "time_embedding_type": "positional",
    "time_cond_proj_dim": None,
    "timestep_post_act": None,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "transformer_layers_per_block": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "attention_type": "default",
    "cross_attention_norm": None,
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
}
_TRANSFORMER_EPS = 1e-6  # the transformers' GroupNorm
_LAYER_EPS = 1e-5  # the transformer blocks' LayerNorms


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of timesteps (N,) as diffusers' Timesteps(dim, flip_sin_to_cos=True,
    downscale_freq_shift=0): [cos, sin] of t * 10000^(-i/half), float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(0, half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedding(nn.Module):
    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class CrossAttention(nn.Module):
    """Multi-head attention on (B, N, C), keys and values from `context` when given; SDPA."""

    def __init__(self, dim: int, heads: int, *, context_dim: int | None = None):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Dropout(0.0)])

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        b = x.shape[0]
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        head_dim = k.shape[-1] // self.heads
        q, k, v = (t.view(b, -1, self.heads, head_dim).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(b, -1, self.heads * head_dim).to(q.dtype)
        return self.to_out[1](self.to_out[0](out))


class GEGLU(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, 4 * dim), nn.Dropout(0.0), nn.Linear(4 * dim, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, context_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=_LAYER_EPS)
        self.attn1 = CrossAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=_LAYER_EPS)
        self.attn2 = CrossAttention(dim, heads, context_dim=context_dim)
        self.norm3 = nn.LayerNorm(dim, eps=_LAYER_EPS)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class Transformer2DModel(nn.Module):
    """GroupNorm, linear projection in, one transformer block over the pixels, projection out,
    plus the input; handed back in the input's memory layout."""

    def __init__(self, channels: int, heads: int, *, context_dim: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=_TRANSFORMER_EPS, affine=True)
        self.proj_in = nn.Linear(channels, channels)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(channels, heads, context_dim)])
        self.proj_out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x).permute(0, 2, 3, 1).reshape(b, h * w, c)
        y = self.proj_in(y)
        for block in self.transformer_blocks:
            y = block(y, context)
        y = self.proj_out(y).reshape(b, h, w, c).permute(0, 3, 1, 2).contiguous(memory_format=layout_of(x))
        return y + x


class DownBlock(nn.Module):
    """CrossAttnDownBlock2D (with `heads`) or DownBlock2D (without): resnets (each followed by a
    transformer), then an optional stride-2 conv; hands back every stage's output for the skips."""

    def __init__(self, in_channels: int, out_channels: int, *, layers: int, temb: int, groups: int, eps: float,
                 heads: int | None, context_dim: int, downsample: bool, padding: int):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, temb_channels=temb, groups=groups, eps=eps) for i in range(layers)
        )
        if heads:
            self.attentions = nn.ModuleList(Transformer2DModel(out_channels, heads, context_dim=context_dim, groups=groups) for _ in range(layers))
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels, padding=padding)]) if downsample else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        skips = []
        attentions = getattr(self, "attentions", [None] * len(self.resnets))
        for resnet, attn in zip(self.resnets, attentions):
            x = resnet(x, temb)
            if attn is not None:
                x = attn(x, context)
            skips.append(x)
        for down in self.downsamplers or ():
            x = down(x)
            skips.append(x)
        return x, skips


class UpBlock(nn.Module):
    """CrossAttnUpBlock2D (with `heads`) or UpBlock2D: each resnet takes the previous output with
    one skip concatenated, then an optional nearest-2x and conv."""

    def __init__(self, in_channels: int, prev_channels: int, out_channels: int, *, layers: int, temb: int, groups: int,
                 eps: float, heads: int | None, context_dim: int, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D((prev_channels if i == 0 else out_channels) + (in_channels if i == layers - 1 else out_channels),
                          out_channels, temb_channels=temb, groups=groups, eps=eps)
            for i in range(layers)
        )
        if heads:
            self.attentions = nn.ModuleList(Transformer2DModel(out_channels, heads, context_dim=context_dim, groups=groups) for _ in range(layers))
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if upsample else None

    def forward(self, x: torch.Tensor, skips: list[torch.Tensor], temb: torch.Tensor, context: torch.Tensor,
                size: tuple[int, int] | None) -> torch.Tensor:
        attentions = getattr(self, "attentions", [None] * len(self.resnets))
        for resnet, attn in zip(self.resnets, attentions):
            x = resnet(torch.cat([x, skips.pop()], dim=1), temb)
            if attn is not None:
                x = attn(x, context)
        for up in self.upsamplers or ():
            x = up(x, size)
        return x


class MidBlock(nn.Module):
    def __init__(self, channels: int, *, temb: int, groups: int, eps: float, heads: int, context_dim: int, scale: float):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(channels, channels, temb_channels=temb, groups=groups, eps=eps, output_scale_factor=scale) for _ in range(2)
        )
        self.attentions = nn.ModuleList([Transformer2DModel(channels, heads, context_dim=context_dim, groups=groups)])

    def forward(self, x: torch.Tensor, temb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x, temb)
        for attn, resnet in zip(self.attentions, self.resnets[1:]):
            x = resnet(attn(x, context), temb)
        return x


class UNet2DConditionModel(FromFolder, nn.Module):
    """SD-2.1-base's UNet from its diffusers config (block types and options checked)."""

    def __init__(self, config: dict):
        super().__init__()
        widths = list(config["block_out_channels"])
        n = len(widths)
        down_types = list(config.get("down_block_types", ["CrossAttnDownBlock2D"] * (n - 1) + ["DownBlock2D"]))
        up_types = list(config.get("up_block_types", ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (n - 1)))
        layers_per_transformer = config.get("transformer_layers_per_block", 1)
        if isinstance(layers_per_transformer, (list, tuple)) and set(layers_per_transformer) == {1}:
            config = {**config, "transformer_layers_per_block": 1}  # the same, written per block
        check_config(config, "UNet config", _REQUIRED)
        if any(t not in ("CrossAttnDownBlock2D", "DownBlock2D") for t in down_types) or any(t not in ("CrossAttnUpBlock2D", "UpBlock2D") for t in up_types):
            raise SetupError(f"UNet config: block types {down_types} / {up_types} are not supported (icmsr runs SD-2.1-base's layout)")
        # diffusers reads the legacy `attention_head_dim` as the number of heads when num_attention_heads is unset
        heads = config.get("num_attention_heads") or config.get("attention_head_dim", 8)
        heads = list(heads) if isinstance(heads, (list, tuple)) else [heads] * n
        layers, groups, eps = config.get("layers_per_block", 2), config.get("norm_num_groups", 32), config.get("norm_eps", 1e-5)
        context_dim = config.get("cross_attention_dim", 1280)
        temb = widths[0] * 4

        self.conv_in = nn.Conv2d(config.get("in_channels", 4), widths[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(widths[0], temb)
        self.down_blocks = nn.ModuleList(
            DownBlock(widths[max(i - 1, 0)], w, layers=layers, temb=temb, groups=groups, eps=eps,
                      heads=heads[i] if down_types[i] == "CrossAttnDownBlock2D" else None, context_dim=context_dim,
                      downsample=i < n - 1, padding=config.get("downsample_padding", 1))
            for i, w in enumerate(widths)
        )
        self.mid_block = MidBlock(widths[-1], temb=temb, groups=groups, eps=eps, heads=heads[-1], context_dim=context_dim,
                                  scale=config.get("mid_block_scale_factor", 1))
        up, up_heads = list(reversed(widths)), list(reversed(heads))
        self.up_blocks = nn.ModuleList(
            UpBlock(up[min(i + 1, n - 1)], up[max(i - 1, 0)], w, layers=layers + 1, temb=temb, groups=groups, eps=eps,
                    heads=up_heads[i] if up_types[i] == "CrossAttnUpBlock2D" else None, context_dim=context_dim, upsample=i < n - 1)
            for i, w in enumerate(up)
        )
        self.conv_norm_out = nn.GroupNorm(groups, widths[0], eps=eps)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(widths[0], config.get("out_channels", 4), 3, padding=1)

    def forward(self, z: torch.Tensor, t: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        """The noise prediction for latents z (B, 4, h, w) at timesteps t (B,) given the text
        embedding (B, 77, D)."""
        temb = self.time_embedding(timestep_embedding(t.expand(z.shape[0]), self.conv_in.out_channels).to(z.dtype))
        x = self.conv_in(z)
        skips = [x]
        for block in self.down_blocks:
            x, out = block(x, temb, encoder_hidden_states)
            skips += out
        x = self.mid_block(x, temb, encoder_hidden_states)
        odd = any(s % 2 ** (len(self.up_blocks) - 1) for s in z.shape[-2:])
        for block in self.up_blocks:
            here = skips[-len(block.resnets):]
            del skips[-len(block.resnets):]
            # sides that are not multiples of 8: upsample to the skip's size, as diffusers does
            size = tuple(skips[-1].shape[-2:]) if odd and block.upsamplers is not None else None
            x = block(x, here, temb, encoder_hidden_states, size)
        return self.conv_out(self.conv_act(self.conv_norm_out(x)))
