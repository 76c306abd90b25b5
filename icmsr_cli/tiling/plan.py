"""Tile plans and blend windows: pure functions shared by the VAE encoder, UNet and VAE decoder.

Spans are half-open [start, end) intervals along one axis, in latent pixels unless scaled.
Tiles are spaced evenly (no sliver at the edge) and all have one shape, so a stage can batch
them. Blend windows ramp with a raised cosine across the *whole* overlap, and
are normalised by their sum, so they form a partition of unity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

Span = tuple[int, int]


def plan_spans(length: int, tile: int, overlap: int, least: int = 0) -> list[Span]:
    """Evenly spaced spans of one size covering [0, length), neighbours overlapping by >= `overlap`.

    There are as many spans as tiles of size `tile` need, and each is as small as that count allows
    (rounded up to a multiple of 8, never below `least`): a tile larger than that would only widen
    the overlaps, which every stage pays for in pixels run twice. With 80-px tiles overlapping by
    10, a 96-px side gets two spans of 56 rather than two of 80.
    """
    if tile <= 0 or not 0 <= overlap < tile:
        raise ValueError(f"need 0 <= overlap < tile, got tile={tile}, overlap={overlap}")
    if length <= tile:
        return [(0, length)]
    n = math.ceil((length - overlap) / (tile - overlap))
    # n spans of `size` leave neighbours `overlap` apart when n * size - (n - 1) * overlap >= length
    size = min(tile, max(least, -(-(math.ceil((length - overlap) / n) + overlap) // 8) * 8))
    return [(s, s + size) for s in (round(i * (length - size) / (n - 1)) for i in range(n))]


def ownership(spans: list[Span]) -> list[Span]:
    """A partition of the axis, one part per span, split at the middle of each overlap.

    Used to count every pixel exactly once when merging per-tile statistics.
    """
    cuts = [0] + [(spans[i + 1][0] + spans[i][1]) // 2 for i in range(len(spans) - 1)] + [spans[-1][1]]
    return [(cuts[i], cuts[i + 1]) for i in range(len(spans))]


def _ramp(k: int) -> torch.Tensor:
    """sin^2 over k pixel centres: rises from ~0 to ~1 and sums to 1 with its mirror image."""
    t = (torch.arange(k, dtype=torch.float64) + 0.5) / k
    return torch.sin(t * math.pi / 2) ** 2


def window(spans: list[Span], index: int) -> torch.Tensor:
    """1-D blend weights of span `index`: ramps over the overlaps with its neighbours, 1 elsewhere."""
    start, end = spans[index]
    w = torch.ones(end - start, dtype=torch.float64)
    if index > 0 and spans[index - 1][1] > start:
        k = min(spans[index - 1][1], end) - start
        w[:k] *= _ramp(k)
    if index + 1 < len(spans) and spans[index + 1][0] < end:
        k = end - max(spans[index + 1][0], start)
        w[end - start - k :] *= _ramp(k).flip(0)
    return w


@dataclass(frozen=True)
class Tile:
    """One tile of a 2-D plan. Boxes are (y0, y1, x0, x1) in the stage's input coordinates."""

    core: tuple[int, int, int, int]  # the planned span: what this tile contributes to the output
    own: tuple[int, int, int, int]  # its part of a partition of the image (for statistics)
    weight: torch.Tensor  # blend window over `core`, float64, (y1 - y0, x1 - x0)

    def padded(self, pad: int, height: int, width: int) -> tuple[int, int, int, int]:
        """`core` grown by `pad` of context on each side, clipped to the image."""
        y0, y1, x0, x1 = self.core
        return (max(0, y0 - pad), min(height, y1 + pad), max(0, x0 - pad), min(width, x1 + pad))


def plan_tiles(height: int, width: int, tile: int, overlap: int, unit: int = 1, least: int = 0) -> list[Tile]:
    """The 2-D plan over a (height, width) latent grid, with boxes and windows in units of
    `unit` pixels per latent pixel (8 for image space). The order is the same for every unit.
    All tiles have one shape (a stage can batch them), each side sized by plan_spans."""
    ys, xs = plan_spans(height, tile, overlap, least), plan_spans(width, tile, overlap, least)
    # ownership is cut on the latent grid, so it maps exactly onto every VAE feature map
    oys, oxs = ([(a * unit, b * unit) for a, b in ownership(spans)] for spans in (ys, xs))
    ys, xs = [(a * unit, b * unit) for a, b in ys], [(a * unit, b * unit) for a, b in xs]
    wys, wxs = [window(ys, i) for i in range(len(ys))], [window(xs, j) for j in range(len(xs))]
    return [
        Tile((*ys[i], *xs[j]), (*oys[i], *oxs[j]), wys[i][:, None] * wxs[j][None, :])
        for i in range(len(ys))
        for j in range(len(xs))
    ]


def auto_tile_size(available_bytes: int, bytes_per_latent_px: float, *, largest: int = 256, smallest: int = 16) -> int:
    """The largest tile (a multiple of 8) whose working set fits a quarter of the available memory."""
    budget = available_bytes / 4
    side = int(math.sqrt(max(budget, 0) / bytes_per_latent_px)) // 8 * 8
    return max(smallest, min(largest, side))


#: slack on a working-set figure (the allocator's, an estimate's) before an image runs whole
WHOLE_MARGIN = 1.25


def fits_whole(height: int, width: int, free_bytes: float, bytes_per_px: float) -> bool:
    """Whether an image's working set, `bytes_per_px` per image pixel with the margin, fits in `free_bytes`."""
    return height * width * bytes_per_px * WHOLE_MARGIN <= free_bytes
