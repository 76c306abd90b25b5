"""The VAE encoder and decoder run tile by tile with GroupNorm statistics shared by all tiles.

A network is flattened into a list of ops; GroupNorms split it into segments. All tiles advance
one segment at a time: each tile's activation is parked between segments (on the CPU when the
compute device is a GPU, so GPU memory holds one batch of tiles), and at every GroupNorm the
per-tile statistics, taken over the tile's own part of a partition of the image, are pooled
into the image's mean and total variance (within-tile plus between-tile terms). Tiles therefore
share one tone, and a single tile covering the image reproduces the untiled network.
Tiles carry extra context (`pad`) for the convolutions' receptive field; outputs are blended
with the planner's windows. Attention in the mid-block sees one tile at a time.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from ..io.atomic import is_no_space, no_space_error
from ..model.attention import attend
from ..model.norms import normalize
from .plan import Tile

Progress = Callable[[int, int], None]


@dataclass
class _Op:
    kind: str  # module | norm | save | add | attn
    module: nn.Module | None = None
    act: bool = False  # SiLU after the norm
    scale: float = 1.0  # divisor of the residual sum


def _resnet_ops(r) -> list[_Op]:
    return [
        _Op("save"),
        _Op("norm", r.norm1, act=True),
        _Op("module", r.conv1),
        _Op("norm", r.norm2, act=True),
        _Op("module", r.conv2),
        _Op("add", r.conv_shortcut, scale=r.output_scale_factor),
    ]


def _mid_ops(mid) -> list[_Op]:
    ops = _resnet_ops(mid.resnets[0])
    for attn, resnet in zip(mid.attentions, mid.resnets[1:]):
        if attn is not None:
            ops += [_Op("save"), _Op("norm", attn.group_norm), _Op("attn", attn), _Op("add", None, scale=attn.rescale_output_factor)]
        ops += _resnet_ops(resnet)
    return ops


def encoder_ops(vae) -> list[_Op]:
    """AutoencoderKL.encode up to the posterior moments (encoder, then quant_conv)."""
    enc = vae.encoder
    ops = [_Op("module", enc.conv_in)]
    for block in enc.down_blocks:
        for r in block.resnets:
            ops += _resnet_ops(r)
        ops += [_Op("module", d) for d in (block.downsamplers or [])]
    ops += _mid_ops(enc.mid_block)
    ops += [_Op("norm", enc.conv_norm_out, act=True), _Op("module", enc.conv_out)]
    if getattr(vae, "quant_conv", None) is not None:
        ops.append(_Op("module", vae.quant_conv))
    return ops


def decoder_ops(vae) -> list[_Op]:
    """AutoencoderKL.decode: post_quant_conv, then the decoder."""
    dec = vae.decoder
    ops = [_Op("module", vae.post_quant_conv)] if getattr(vae, "post_quant_conv", None) is not None else []
    ops.append(_Op("module", dec.conv_in))
    ops += _mid_ops(dec.mid_block)
    for block in dec.up_blocks:
        for r in block.resnets:
            ops += _resnet_ops(r)
        ops += [_Op("module", u) for u in (block.upsamplers or [])]
    ops += [_Op("norm", dec.conv_norm_out, act=True), _Op("module", dec.conv_out)]
    return ops


@dataclass
class _Parked:
    tensor: torch.Tensor | None  # in memory (on the tier's device), or None when in a file
    tier: int  # index into Parking.tiers; -1 for a file
    size: int
    path: str | None = None
    shape: tuple = ()
    dtype: torch.dtype | None = None


class Parking:
    """Where tile activations wait between segments: in memory tiers tried in order (the compute
    device first while it has room, then host RAM), each up to its byte budget, then files.

    The parked activations of all tiles grow with the image (tens of channels per pixel). Staying
    on the GPU saves two copies per tile and segment; beyond its room they go to host memory, and
    beyond that to a temporary folder and the page cache, which keeps the resident memory of an 8K
    run bounded; reading a batch back costs sequential disk traffic.
    """

    def __init__(self, tiers: list[tuple[torch.device, float]]):
        self.tiers = tiers
        self.used = [0] * len(tiers)
        self._folder = None
        self._count = 0

    def put(self, t: torch.Tensor) -> _Parked:
        size = t.numel() * t.element_size()
        for index, (device, budget) in enumerate(self.tiers):
            if self.used[index] + size <= budget:
                self.used[index] += size
                kept = t.to(device)
                return _Parked(kept.clone() if kept._base is not None else kept, index, size)  # a view would keep its whole batch alive
        if self._folder is None:
            self._folder = tempfile.TemporaryDirectory(prefix="icmsr-tiles-")
        self._count += 1
        path = os.path.join(self._folder.name, f"{self._count}.bin")
        try:
            with open(path, "wb") as f:  # not ndarray.tofile: its short write carries no errno
                f.write(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().data)
        except OSError as exc:
            if is_no_space(exc):  # the folder goes when the run ends (close), whatever happened
                raise no_space_error(Path(self._folder.name), size) from None
            raise
        return _Parked(None, -1, size, path, tuple(t.shape), t.dtype)

    def get(self, handle: _Parked) -> torch.Tensor:
        """The parked tensor (on its tier's device, or the CPU from a file); its room is freed."""
        if handle.tier >= 0:
            self.used[handle.tier] -= handle.size
            return handle.tensor
        data = torch.from_numpy(np.fromfile(handle.path, dtype=np.uint8)).view(handle.dtype).view(handle.shape)
        os.unlink(handle.path)
        return data

    def close(self) -> None:
        if self._folder is not None:
            self._folder.cleanup()


@dataclass
class _State:
    x: _Parked | None  # the tile's activation, between segments
    saved: _Parked | None = None  # the residual branch's input, while a block is open


def _acc(dtype: torch.dtype) -> torch.dtype:
    """Statistics and blending run in float32 at least (float64 stays float64)."""
    return torch.promote_types(dtype, torch.float32)


def _group_stats(x: torch.Tensor, groups: int, own: tuple[int, int, int, int]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Mean and (population) variance per group over the owned region of one tile, in float64
    (merging many tiles' statistics in float32 would lose the between-tile variance term)."""
    y0, y1, x0, x1 = own
    # (groups, channels per group, h, w): a view in either memory layout (a reshape to (groups, -1)
    # copied every channels-last activation first)
    part = x[:, y0:y1, x0:x1].to(_acc(x.dtype)).unflatten(0, (groups, -1))
    var, mean = torch.var_mean(part, dim=(1, 2, 3), unbiased=False)
    if x.device.type == "mps":  # MPS has no float64: merge these few numbers on the CPU, exactly
        mean, var = mean.cpu(), var.cpu()
    return mean.double(), var.double(), part[0].numel()


def pool_stats(parts: list[tuple[torch.Tensor, torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled mean and total variance: sum n_i (var_i + (mean_i - mean)^2) / N."""
    n = sum(p[2] for p in parts)
    mean = sum(p[0] * p[2] for p in parts) / n
    var = sum(p[2] * (p[1] + (p[0] - mean) ** 2) for p in parts) / n
    return mean, var


def run_tiled(
    ops: list[_Op],
    x: torch.Tensor,
    in_tiles: list[Tile],
    out_tiles: list[Tile],
    *,
    pad: int,
    device: torch.device,
    dtype: torch.dtype,
    batch: int = 4,
    progress: Progress | None = None,
    park: list[tuple[torch.device, float]] | None = None,
    between_segments: Callable[[], None] | None = None,
) -> torch.Tensor:
    """Run `ops` over x (1, C, H, W) tile by tile. `in_tiles` are boxes in x's pixels (grown by
    `pad` of context), `out_tiles` the same tiles in output pixels with their blend windows.
    Waiting tiles are kept in the memory tiers of `park` ((device, byte budget), in order; default:
    host memory without limit), then in temporary files. `between_segments` runs when all tiles
    have passed a segment (the caller hands freed host memory back there).
    Returns the blended output (float32 at least) on the CPU."""
    if x.shape[0] != 1:
        raise ValueError("tiled VAE runs one image at a time")
    parking = Parking(park if park is not None else [(torch.device("cpu"), float("inf"))])
    try:
        return _run(ops, x, in_tiles, out_tiles, parking, pad=pad, device=device, dtype=dtype, batch=batch, progress=progress,
                    between_segments=between_segments)
    finally:
        parking.close()


def _run(ops, x, in_tiles, out_tiles, park: Parking, *, pad, device, dtype, batch, progress, between_segments) -> torch.Tensor:
    _, _, height, width = x.shape
    boxes = [t.padded(pad, height, width) for t in in_tiles]
    states = [_State(park.put(x[:, :, y0:y1, x0:x1])) for y0, y1, x0, x1 in boxes]
    segments: list[list[_Op]] = [[]]
    for op in ops:
        if op.kind == "norm":
            segments.append([])
        segments[-1].append(op)
    batches = _batches([tuple(b[1] - b[0] for b in (box[:2], box[2:])) for box in boxes], batch)
    total, done = len(segments) * len(states), 0

    # One batch holds every tile: none waits for another, so its activations stay where they are
    # between segments instead of being parked (two copies per segment, and files beyond the host
    # budget: a single 1024x768 tile ran 1.9x slower than the untiled decoder on the CPU).
    carry = None
    pooled = None
    for index, segment in enumerate(segments):
        next_norm = segments[index + 1][0].module if index + 1 < len(segments) else None
        collected = []
        for members in batches:
            if carry is not None:
                (h, saved), carry = carry, None
            else:
                h = torch.cat([_take(park, states[i], "x") for i in members]).to(device, dtype, non_blocking=True)
                saved = None
                if states[members[0]].saved is not None:
                    saved = torch.cat([_take(park, states[i], "saved") for i in members]).to(device, dtype, non_blocking=True)
            for op in segment:
                if op.kind == "norm":
                    h = normalize(h, pooled[0], pooled[1], op.module, op.act)
                elif op.kind == "module":
                    h = op.module(h)
                elif op.kind == "save":
                    saved = h
                elif op.kind == "add":
                    h = (op.module(saved) if op.module is not None else saved) + h
                    h = h if op.scale == 1 else h / op.scale  # x / 1 is x: a pass saved
                    saved = None
                elif op.kind == "attn":
                    h = attend(op.module, h)
            for k, i in enumerate(members):
                if next_norm is not None:
                    own = _own_in_feature(in_tiles[i].own, boxes[i], h.shape[-2:])
                    collected.append(_group_stats(h[k], next_norm.num_groups, own))
            if len(batches) == 1 and next_norm is not None:
                carry = (h, saved)
            else:
                for k, i in enumerate(members):
                    states[i].x = park.put(h[k : k + 1])
                    states[i].saved = park.put(saved[k : k + 1]) if saved is not None else None
            del h, saved
            done += len(members)
            if progress:
                progress(done, total)
        if next_norm is not None:
            pooled = pool_stats(collected)
        if between_segments:
            between_segments()

    # blended on the host one tile at a time, divided in place: one whole-image copy, however many tiles
    scale = out_tiles[-1].core[1] / in_tiles[-1].core[1]  # output pixels per input pixel
    acc = _acc(dtype)
    out = norm = None
    for tile, box, state in zip(out_tiles, boxes, states):
        part = _take(park, state, "x")
        if out is None:
            out = torch.zeros(1, part.shape[1], round(height * scale), round(width * scale), dtype=acc)
            norm = torch.zeros(1, 1, out.shape[2], out.shape[3], dtype=acc)
        cy0, cy1, cx0, cx1 = tile.core
        oy, ox = round(box[0] * scale), round(box[2] * scale)
        w = tile.weight.to(acc)[None, None]
        out[:, :, cy0:cy1, cx0:cx1] += part[:, :, cy0 - oy : cy1 - oy, cx0 - ox : cx1 - ox].to("cpu", acc) * w
        norm[:, :, cy0:cy1, cx0:cx1] += w
        del part
    return out.div_(norm)


def _take(park: Parking, state: _State, field: str) -> torch.Tensor:
    """Fetch a parked tensor and drop the state's hold on it."""
    handle = getattr(state, field)
    setattr(state, field, None)
    return park.get(handle)


def _own_in_feature(own, box, feat_hw) -> tuple[int, int, int, int]:
    """A tile's owned box (x's pixels) in the pixels of its current feature map (exact: every
    box edge lies on the 8-pixel grid the feature maps are resampled on)."""
    y0, y1, x0, x1 = box
    fy, fx = feat_hw[0] / (y1 - y0), feat_hw[1] / (x1 - x0)
    return (round((own[0] - y0) * fy), round((own[1] - y0) * fy), round((own[2] - x0) * fx), round((own[3] - x0) * fx))


def _batches(shapes: list[tuple[int, int]], size: int) -> list[list[int]]:
    """Indices of equally shaped tiles, in chunks of `size` (border tiles can be smaller)."""
    by_shape: dict[tuple, list[int]] = {}
    for i, shape in enumerate(shapes):
        by_shape.setdefault(shape, []).append(i)
    return [group[i : i + size] for group in by_shape.values() for i in range(0, len(group), size)]
