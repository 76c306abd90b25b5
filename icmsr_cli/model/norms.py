"""GroupNorm (+SiLU) for the VAE and the UNet through Triton kernels on CUDA, eager PyTorch elsewhere.

Why: on an H100 the untiled 2048^2 graph spent 334 of 829 ms in GroupNorm, 302 ms of it in
PyTorch's RowwiseMoments kernel. That kernel gives each (sample, group) row one thread block, so a
VAE norm at full resolution (32 rows of millions of elements) keeps 32 of 132 SMs busy and reads at
a few percent of the memory bandwidth (issue 10's profile). Here the statistics are reduced in
chunks of a row by many programs, the chunks' moments pooled per row by a small kernel (the
pooling the tiled VAE uses across tiles), and normalisation, affine and SiLU are one elementwise
pass: the SiLU that followed as its own kernel and its own full-size tensor is gone.

Both layouts run fused: contiguous (N, C, H, W), where a (sample, group) row is one run of
memory, and channels-last (N, H, W, C in memory), where every pixel holds all its channels side
by side: there a program reduces a block of whole pixels for all groups at once, so each load is
one contiguous run. Which layout the pipeline runs is measured per device (devices.py).

The numbers are GroupNorm's: float32 statistics (two passes per chunk, so no cancellation),
y = x * (rstd * gamma) + (beta - mean * rstd * gamma), as PyTorch's own kernels compute it; the
output is rounded once, to the input's dtype. tests/test_norms.py checks the kernels against
eager GroupNorm under Triton's interpreter on the CPU.

`fuse_group_norms(model)` swaps the GroupNorms of the VAE or the UNet for `FusedGroupNorm` (same
parameters, same names, so state dicts and the merged-weights cache are untouched) and drops the
SiLU modules the fused ones absorb. The UNet's norms run at latent resolution, on 320-2560
channels; the same RowwiseMoments kernel gives each of their 32 rows one thread block. The tiled VAE normalises with pooled statistics through `normalize`.
"""

from __future__ import annotations

import logging
import os
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from .devices import is_out_of_memory

logger = logging.getLogger(__name__)

#: elements of a row one statistics program reduces; rows shorter than this take one program
_CHUNK = 16384
#: elements per program step (statistics) and per program (normalisation)
_BLOCK = 2048
#: chunks per step when a row's chunk moments are merged
_SPLIT_BLOCK = 1024

_kernels = None  # the compiled-on-demand Triton functions, built on first use
_failed: BaseException | None = None  # set when Triton could not compile or run here: eager from then on


def interpreted() -> bool:
    """Triton's interpreter runs the kernels on CPU tensors with numpy (tests; never fast)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def fused_available(device: torch.device) -> bool:
    """Whether the Triton kernels can run on `device`: CUDA with Triton importable (CUDA builds of
    torch install it), or the CPU under Triton's interpreter."""
    if _failed is not None or not (device.type == "cuda" or (device.type == "cpu" and interpreted())):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


class FusedGroupNorm(nn.GroupNorm):
    """nn.GroupNorm, followed by SiLU when `act`, through the Triton kernels when the input allows
    (contiguous or channels-last, on a device where they run), else eager."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True, act: bool = False, **kw):
        super().__init__(num_groups, num_channels, eps, affine, **kw)
        self.act = act

    @classmethod
    def replacing(cls, norm: nn.GroupNorm, act: bool) -> FusedGroupNorm:
        fused = cls(norm.num_groups, norm.num_channels, norm.eps, norm.affine, act=act, device="meta")
        if norm.affine:  # the same Parameter objects: nothing copied, nothing renamed
            fused.weight, fused.bias = norm.weight, norm.bias
        return fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _runs_fused(x, self.num_groups):
            try:
                return _group_norm(x, self, self.act)
            except Exception as exc:  # noqa: BLE001 - any Triton failure falls back; out of memory does not
                _give_up(exc)
        y = F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        return F.silu(y, inplace=True) if self.act else y

    def extra_repr(self) -> str:
        return super().extra_repr() + (", act=silu" if self.act else "")


def fuse_group_norms(model: nn.Module) -> int:
    """Swap every GroupNorm of the VAE or the UNet (vae.py, unet.py) for a FusedGroupNorm,
    absorbing the SiLU that follows it: both norms of each ResnetBlock2D (its `nonlinearity`
    follows them and nothing else: blocks.py), conv_norm_out with conv_act, and the norms that no
    SiLU follows (the VAE attention's group_norm, the UNet transformers' norm). Returns how many
    were swapped."""
    from .blocks import ResnetBlock2D

    swapped = 0
    for module in list(model.modules()):
        if isinstance(module, ResnetBlock2D) and isinstance(module.nonlinearity, nn.SiLU):
            module.norm1 = FusedGroupNorm.replacing(module.norm1, act=True)
            module.norm2 = FusedGroupNorm.replacing(module.norm2, act=True)
            module.nonlinearity = nn.Identity()
            swapped += 2
        for name in ("group_norm", "norm"):
            if type(getattr(module, name, None)) is nn.GroupNorm:
                setattr(module, name, FusedGroupNorm.replacing(getattr(module, name), act=False))
                swapped += 1
        if type(getattr(module, "conv_norm_out", None)) is nn.GroupNorm and isinstance(getattr(module, "conv_act", None), nn.SiLU):
            module.conv_norm_out = FusedGroupNorm.replacing(module.conv_norm_out, act=True)
            module.conv_act = nn.Identity()
            swapped += 1
    return swapped


def normalize(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, norm: nn.GroupNorm, act: bool) -> torch.Tensor:
    """GroupNorm of x (B, C, H, W) with given per-group statistics (G,) shared by the batch (the
    tiled VAE's pooled ones), then SiLU when `act`; in x's dtype. Fused when `norm` is a
    FusedGroupNorm and x allows; else eager, in place on one float32 working copy."""
    if isinstance(norm, FusedGroupNorm) and _runs_fused(x, None):
        try:
            b = x.shape[0]
            return _normalize(x, mean.expand(b, -1), var.expand(b, -1), norm, act)
        except Exception as exc:  # noqa: BLE001
            _give_up(exc)
    # one pass, y = x * scale + shift per channel, as PyTorch's own GroupNorm and the fused kernels
    # compute it (a copy, then subtract, scale, weight and bias in place, took five); scale and shift
    # from the statistics in float64, where they are (the CPU for MPS, which has no float64)
    c = x.shape[1]
    acc = torch.promote_types(x.dtype, torch.float32)
    per_channel = c // norm.num_groups
    scale = torch.rsqrt(var.double() + norm.eps).repeat_interleave(per_channel)
    shift = -mean.double().repeat_interleave(per_channel) * scale
    if norm.affine:
        weight = norm.weight.to(scale.device).double()
        scale, shift = scale * weight, shift * weight + norm.bias.to(scale.device).double()
    shape = (1, c) + (1,) * (x.ndim - 2)
    y = torch.addcmul(shift.to(x.device, acc).view(shape), x.to(acc), scale.to(x.device, acc).view(shape))
    if act:
        F.silu(y, inplace=True)
    return y.to(x.dtype)


# ------------------------------------------------------------------------------------ Triton


def _layout(x: torch.Tensor) -> str | None:
    """"nchw" for a contiguous tensor, "nhwc" where the channels are the innermost dimension and the
    rest is contiguous around them (channels_last, or its 3-D (B, C, N) view), else None."""
    if x.is_contiguous():
        return "nchw"
    if x.movedim(1, -1).is_contiguous():
        return "nhwc"
    return None


def _runs_fused(x: torch.Tensor, groups: int | None) -> bool:
    """Whether the kernels take x; `groups` when its statistics are to be reduced here (channels-
    last statistics hold a pixel's channels in one block, split by group: powers of two)."""
    layout = _layout(x) if x.ndim >= 3 else None  # (B, C, H, W), or (B, C, H*W) inside vae.Attention
    if layout is None or x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return False
    if layout == "nhwc" and groups is not None:
        c = x.shape[1]
        if not (_pow2(c) and _pow2(groups) and c % groups == 0 and c <= _BLOCK):
            return False
    return fused_available(x.device)


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _give_up(exc: BaseException) -> None:
    if is_out_of_memory(exc):
        raise exc
    global _failed
    _failed = exc
    logger.warning("fused GroupNorm kernels failed here (%s: %s); using PyTorch's from now on", type(exc).__name__, exc)


def _group_norm(x: torch.Tensor, norm: nn.GroupNorm, act: bool) -> torch.Tensor:
    """Three launches and no small torch ops (their launch costs would add up over a VAE's fifty
    norms): partial moments per chunk of each (sample, group) row, their merge into each row's
    scale and shift per channel, then the normalising pass."""
    k = _build()
    b, c = x.shape[:2]
    g = norm.num_groups
    rows = b * g
    row_len = x.numel() // rows
    if _layout(x) == "nchw":
        chunk = min(_CHUNK, row_len)  # elements of one row
        splits = -(-row_len // chunk)  # every chunk holds elements; the last may be short
        partial = torch.empty(2, rows, splits, device=x.device, dtype=torch.float32)
        k.moments[(splits, rows)](x, partial[0], partial[1], row_len, chunk, BLOCK=_BLOCK)
    else:  # a chunk is whole pixels, every group's share of them reduced by one program
        pixels = x.numel() // (b * c)
        per_chunk = min(max(_CHUNK // c, 1), pixels)
        splits = -(-pixels // per_chunk)
        partial = torch.empty(2, rows, splits, device=x.device, dtype=torch.float32)
        k.moments_nhwc[(splits, b)](x, partial[0], partial[1], pixels, per_chunk, splits,
                                    CHANNELS=c, GROUPS=g, PIXELS=max(_BLOCK // c, 1))
        chunk = per_chunk * (c // g)  # elements of one row
    coeffs = torch.empty(2, b * c, device=x.device, dtype=torch.float32)
    weight, bias = (norm.weight, norm.bias) if norm.affine else (partial, partial)  # unread without AFFINE
    k.finalize[(rows,)](partial[0], partial[1], weight, bias, coeffs[0], coeffs[1], splits, chunk, row_len, g, c // g, norm.eps,
                        AFFINE=norm.affine, BLOCK=_SPLIT_BLOCK, CHANNELS=k.next_power_of_2(c // g))
    return _apply(x, coeffs[0], coeffs[1], act)


def _normalize(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, norm: nn.GroupNorm, act: bool) -> torch.Tensor:
    """The normalising pass with given statistics (B, G): y = x * scale + shift per (sample,
    channel), as PyTorch's GroupNorm forms them, in float32."""
    b, c = x.shape[:2]
    g = norm.num_groups
    rstd = torch.rsqrt(var.to(x.device, torch.float32) + norm.eps)  # (B, G)
    scale = rstd.repeat_interleave(c // g, dim=1)  # (B, C)
    shift = -mean.to(x.device, torch.float32).repeat_interleave(c // g, dim=1) * scale
    if norm.affine:
        gamma, beta = norm.weight.to(torch.float32), norm.bias.to(torch.float32)
        shift = shift * gamma + beta
        scale = scale * gamma
    return _apply(x, scale.contiguous(), shift.contiguous(), act)


def _apply(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, act: bool) -> torch.Tensor:
    """y = x * scale + shift per (sample, channel), then SiLU when `act`; y in x's layout."""
    k = _build()
    b, c = x.shape[:2]
    y = torch.empty_like(x)  # keeps the layout (channels-last stays channels-last)
    if _layout(x) == "nchw":
        hw = x.numel() // (b * c)
        k.normalize[(-(-hw // _BLOCK), b * c)](x, y, scale, shift, hw, ACT=act, BLOCK=_BLOCK)
    else:
        size = x.numel() // b
        k.normalize_nhwc[(-(-size // _BLOCK), b)](x, y, scale, shift, size, c, ACT=act, BLOCK=_BLOCK)
    return y


def _build():
    """Define the kernels on first use: importing Triton costs time, and the interpreter is
    chosen when the functions are decorated."""
    global _kernels
    if _kernels is not None:
        return _kernels
    import triton
    import triton.language as tl

    @triton.jit
    def moments(x_ptr, sum_ptr, m2_ptr, row_len, chunk, BLOCK: tl.constexpr):
        # program (split, row): sum and centred sum of squares of one chunk of one row, float32
        split, row = tl.program_id(0), tl.program_id(1)
        start = split * chunk
        end = tl.minimum(start + chunk, row_len)
        base = x_ptr + row.to(tl.int64) * row_len
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for off in range(start, end, BLOCK):
            idx = off + tl.arange(0, BLOCK)
            acc += tl.load(base + idx, mask=idx < end, other=0.0).to(tl.float32)
        total = tl.sum(acc, axis=0)
        mean = total / (end - start).to(tl.float32)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for off in range(start, end, BLOCK):  # second pass: the chunk is still in L2
            idx = off + tl.arange(0, BLOCK)
            d = tl.load(base + idx, mask=idx < end, other=0.0).to(tl.float32) - mean
            acc += tl.where(idx < end, d * d, 0.0)
        out = row * tl.num_programs(0) + split
        tl.store(sum_ptr + out, total)
        tl.store(m2_ptr + out, tl.sum(acc, axis=0))

    @triton.jit
    def moments_nhwc(x_ptr, sum_ptr, m2_ptr, pixels, chunk, splits,
                     CHANNELS: tl.constexpr, GROUPS: tl.constexpr, PIXELS: tl.constexpr):
        # program (split, sample): for every group, the sum and centred sum of squares of one chunk
        # of a channels-last sample's pixels; a load is PIXELS whole pixels, one contiguous run
        split, sample = tl.program_id(0), tl.program_id(1)
        start = split * chunk
        end = tl.minimum(start + chunk, pixels)
        base = x_ptr + sample.to(tl.int64) * pixels * CHANNELS
        channel = tl.arange(0, CHANNELS)[None, :]
        acc = tl.zeros([PIXELS, CHANNELS], dtype=tl.float32)
        for off in range(start, end, PIXELS):
            p = off + tl.arange(0, PIXELS)
            acc += tl.load(base + p[:, None].to(tl.int64) * CHANNELS + channel, mask=(p < end)[:, None], other=0.0).to(tl.float32)
        total = tl.sum(tl.sum(tl.reshape(acc, [PIXELS, GROUPS, CHANNELS // GROUPS]), axis=2), axis=0)  # (GROUPS,)
        mean = total / ((end - start) * (CHANNELS // GROUPS)).to(tl.float32)
        acc3 = tl.zeros([PIXELS, GROUPS, CHANNELS // GROUPS], dtype=tl.float32)
        for off in range(start, end, PIXELS):  # second pass: the chunk is still in L2
            p = off + tl.arange(0, PIXELS)
            v = tl.load(base + p[:, None].to(tl.int64) * CHANNELS + channel, mask=(p < end)[:, None], other=0.0).to(tl.float32)
            d = tl.reshape(v, [PIXELS, GROUPS, CHANNELS // GROUPS]) - mean[None, :, None]
            acc3 += tl.where((p < end)[:, None, None], d * d, 0.0)
        out = (sample * GROUPS + tl.arange(0, GROUPS)) * splits + split
        tl.store(sum_ptr + out, total)
        tl.store(m2_ptr + out, tl.sum(tl.sum(acc3, axis=2), axis=0))

    @triton.jit
    def finalize(sum_ptr, m2_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, splits, chunk, row_len, groups, per_group, eps,
                 AFFINE: tl.constexpr, BLOCK: tl.constexpr, CHANNELS: tl.constexpr):
        # program (row): the row's mean and variance from its chunks' moments (Chan's pooling:
        # sum of m2_i + n_i (mean_i - mean)^2), then scale and shift for each channel of the group
        row = tl.program_id(0)
        base = row * splits
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for off in range(0, splits, BLOCK):
            idx = off + tl.arange(0, BLOCK)
            acc += tl.load(sum_ptr + base + idx, mask=idx < splits, other=0.0)
        mean = tl.sum(acc, axis=0) / row_len
        last = row_len - (splits - 1) * chunk
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for off in range(0, splits, BLOCK):
            idx = off + tl.arange(0, BLOCK)
            inside = idx < splits
            n = tl.where(idx == splits - 1, last, chunk).to(tl.float32)
            d = tl.load(sum_ptr + base + idx, mask=inside, other=0.0) / n - mean
            acc += tl.where(inside, tl.load(m2_ptr + base + idx, mask=inside, other=0.0) + n * d * d, 0.0)
        rstd = tl.rsqrt(tl.sum(acc, axis=0) / row_len + eps)
        group = row % groups
        channel = group * per_group + tl.arange(0, CHANNELS)
        valid = tl.arange(0, CHANNELS) < per_group
        scale = tl.zeros([CHANNELS], dtype=tl.float32) + rstd
        shift = -mean * scale
        if AFFINE:
            gamma = tl.load(w_ptr + channel, mask=valid, other=0.0).to(tl.float32)
            beta = tl.load(b_ptr + channel, mask=valid, other=0.0).to(tl.float32)
            shift = shift * gamma + beta
            scale = scale * gamma
        out = (row // groups) * (groups * per_group) + channel
        tl.store(scale_ptr + out, scale, mask=valid)
        tl.store(shift_ptr + out, shift, mask=valid)

    @triton.jit
    def normalize(x_ptr, y_ptr, scale_ptr, shift_ptr, hw, ACT: tl.constexpr, BLOCK: tl.constexpr):
        # program (block, plane): one block of one (sample, channel) plane
        block, plane = tl.program_id(0), tl.program_id(1)
        idx = block * BLOCK + tl.arange(0, BLOCK)
        mask = idx < hw
        offset = plane.to(tl.int64) * hw + idx
        y = tl.load(x_ptr + offset, mask=mask, other=0.0).to(tl.float32) * tl.load(scale_ptr + plane) + tl.load(shift_ptr + plane)
        if ACT:
            y = y * tl.sigmoid(y)
        tl.store(y_ptr + offset, y.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def normalize_nhwc(x_ptr, y_ptr, scale_ptr, shift_ptr, size, channels, ACT: tl.constexpr, BLOCK: tl.constexpr):
        # program (block, sample): one block of a channels-last sample's elements, whose channel
        # is the position modulo the channel count
        block, sample = tl.program_id(0), tl.program_id(1)
        idx = block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = idx < size
        offset = sample.to(tl.int64) * size + idx
        coeff = sample * channels + (idx % channels).to(tl.int32)
        y = tl.load(x_ptr + offset, mask=mask, other=0.0).to(tl.float32) * tl.load(scale_ptr + coeff, mask=mask, other=0.0) \
            + tl.load(shift_ptr + coeff, mask=mask, other=0.0)
        if ACT:
            y = y * tl.sigmoid(y)
        tl.store(y_ptr + offset, y.to(y_ptr.dtype.element_ty), mask=mask)

    _kernels = SimpleNamespace(moments=moments, moments_nhwc=moments_nhwc, finalize=finalize, normalize=normalize,
                               normalize_nhwc=normalize_nhwc, next_power_of_2=triton.next_power_of_2)
    return _kernels
