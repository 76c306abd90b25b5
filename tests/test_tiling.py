"""Tiling: the planner and windows as pure functions, the statistics merge, and the whole tiled
pipeline against the untiled one with pointwise stand-ins for the UNet and VAE convolutions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from icmsr_cli.errors import ResourceError
from icmsr_cli.model.devices import tiles_per_call
from icmsr_cli.model.graph import unet_plan, vae_plan
from icmsr_cli.model.loading import load_pipeline
from icmsr_cli.tiling.vae import pool_stats
from icmsr_cli.tiling.plan import auto_tile_size, ownership, plan_spans, plan_tiles, window


@pytest.mark.parametrize("length,tile,overlap", [(100, 32, 8), (33, 32, 8), (257, 64, 16), (64, 64, 8), (20, 32, 8), (1000, 96, 24), (96, 80, 10), (512, 256, 64)])
def test_spans_are_even_one_size_and_cover(length, tile, overlap):
    spans = plan_spans(length, tile, overlap)
    assert spans[0][0] == 0 and spans[-1][1] == length
    size = spans[0][1] - spans[0][0]
    assert all(e - s == size for s, e in spans)  # no sliver: every tile the same size
    if length <= tile:
        assert spans == [(0, length)]
    else:
        # as many tiles as `tile` needs, each the smallest multiple of 8 that covers with the overlap
        assert len(spans) == math.ceil((length - overlap) / (tile - overlap))
        assert size <= tile and (size % 8 == 0 or size == tile)
        n = len(spans)
        assert n * (size - 8) - (n - 1) * overlap < length  # 8 less would not cover
    starts = [s for s, _ in spans]
    steps = np.diff(starts)
    assert len(steps) == 0 or steps.max() - steps.min() <= 1  # evenly spaced
    assert all(spans[i][1] - spans[i + 1][0] >= overlap for i in range(len(spans) - 1))
    own = ownership(spans)
    assert own[0][0] == 0 and own[-1][1] == length and all(own[i][1] == own[i + 1][0] for i in range(len(own) - 1))
    assert all(s <= a < b <= e for (s, e), (a, b) in zip(spans, own))


def test_tiles_shrink_to_the_count_they_need_and_unet_tiles_stay_at_least_64():
    assert plan_spans(96, 80, 10) == [(0, 56), (40, 96)]  # two tiles of 80 would overlap by 64
    assert plan_spans(512, 256, 32) == [(0, 192), (160, 352), (320, 512)]
    assert plan_spans(96, 80, 20, least=64) == [(0, 64), (32, 96)]
    # the stages' plans: the VAE's shrink freely (shared statistics), the UNet's not below 64 ...
    assert {t.core[1] - t.core[0] for t in vae_plan(96, 96, 80)} == {56}
    assert {t.core[1] - t.core[0] for t in unet_plan(96, 96, 80)} == {64}
    # ... unless the tile asked for is smaller
    assert {t.core[1] - t.core[0] for t in unet_plan(96, 96, 32)} == {32}
    assert vae_plan(96, 96, 80, unit=8)[-1].core == (320, 768, 320, 768)


def test_windows_are_a_partition_of_unity_that_hands_over_across_the_whole_overlap():
    spans = plan_spans(200, 64, 24)
    total = np.zeros(200)
    ws = [window(spans, i).numpy() for i in range(len(spans))]
    for (s, e), w in zip(spans, ws):
        total[s:e] += w
    np.testing.assert_allclose(total, 1.0, atol=1e-12)  # equal overlaps: the raw windows already sum to 1
    (s0, _), (s1, _) = spans[0], spans[1]
    left = ws[0][s1 - s0 :]  # the first tile's weight across its overlap with the second
    assert left[0] > 0.99 and left[-1] < 0.01 and np.all(np.diff(left) < 0)
    # a hand-over spread over the overlap, not a near-hard switch (Gaussian sigma=0.1T would fail)
    assert ((left > 0.1) & (left < 0.9)).sum() >= 0.6 * len(left)


def test_plan_tiles_units_keep_order_and_scale():
    a, b = plan_tiles(40, 70, 16, 4), plan_tiles(40, 70, 16, 4, unit=8)
    assert len(a) == len(b) == len(plan_spans(40, 16, 4)) * len(plan_spans(70, 16, 4))
    for ta, tb in zip(a, b):
        assert tuple(v * 8 for v in ta.core) == tb.core and tuple(v * 8 for v in ta.own) == tb.own
        assert tb.weight.shape == (tb.core[1] - tb.core[0], tb.core[3] - tb.core[2])


def test_pool_stats_includes_the_between_tile_term():
    torch.manual_seed(0)
    parts = [torch.randn(2, 50, dtype=torch.float64) + 3, torch.randn(2, 80, dtype=torch.float64) - 1, torch.randn(2, 7, dtype=torch.float64)]
    stats = [(p.mean(1), p.var(1, unbiased=False), p.shape[1]) for p in parts]
    mean, var = pool_stats(stats)
    whole = torch.cat(parts, 1)
    torch.testing.assert_close(mean, whole.mean(1))
    torch.testing.assert_close(var, whole.var(1, unbiased=False))
    naive = sum(s[1] * s[2] for s in stats) / sum(s[2] for s in stats)  # mean of variances
    assert (var - naive).abs().min() > 0.5


def test_auto_tile_size():
    assert auto_tile_size(64 * 2**30, 200_000) == 256
    assert auto_tile_size(1 * 2**30, 200_000) == 32
    assert auto_tile_size(0, 200_000) == 16
    assert auto_tile_size(8 * 2**30, 200_000) % 8 == 0


# ------------------------------------------------------------------- pointwise model stand-ins


class PointwiseUNet(nn.Module):
    """eps depends on the latent pixel alone: tiling must not change it at all."""

    def __init__(self):
        super().__init__()
        self.mix = nn.Conv2d(4, 4, 1)

    def forward(self, z, t, encoder_hidden_states):
        return torch.tanh(self.mix(z)) + 0.1 * encoder_hidden_states.mean()


def _pointwise_vae(vae):
    """The tiny VAE with every 3x3 conv made 1x1 (downsamplers 2x2, stride 2) and no attention:
    each output pixel depends on its own 8x8 block and on the GroupNorm statistics only."""
    for name, module in list(vae.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Conv2d) and child.kernel_size != (1, 1):
                torch.manual_seed(hash(f"{name}.{child_name}") % 2**31)
                # 1x1, or 2x2 for the stride-2 downsamplers (after their (0,1,0,1) pad: same output size)
                k = 2 if child.stride == (2, 2) else 1
                setattr(module, child_name, nn.Conv2d(child.in_channels, child.out_channels, k, stride=child.stride))
    for mid in (vae.encoder.mid_block, vae.decoder.mid_block):
        mid.attentions = nn.ModuleList([None] * len(mid.attentions))
    return vae.eval()


@pytest.fixture(scope="module")
def pointwise_pipe(tiny_base, tiny_lora):
    # float64, so the comparison measures the tiling and not float32 rounding through ~30 norms
    pipe = load_pipeline(tiny_base, tiny_lora, device=torch.device("cpu"), dtype=torch.float64)
    torch.manual_seed(0)
    pipe.unet = PointwiseUNet().double().eval()
    pipe.vae = _pointwise_vae(pipe.vae).double()
    return pipe


@pytest.mark.parametrize("size", [(72, 136), (129, 77), (200, 264), (64, 64)])
@pytest.mark.parametrize("tile", [8, 16, 24])
def test_tiled_equals_untiled_for_pointwise_models(pointwise_pipe, size, tile):
    torch.manual_seed(1)
    x = torch.rand(1, 3, *size, dtype=torch.float64)
    whole = pointwise_pipe(x, "none", None)
    tiled = pointwise_pipe(x, "none", tile)
    assert tiled.shape == whole.shape == x.shape
    assert (tiled - whole).abs().max() < 1e-5
    assert whole.std() > 0.02  # the stand-ins do produce an image


def test_a_tile_that_covers_the_image_runs_it_whole(pointwise_pipe, monkeypatch):
    """--tile 128 on a 512x512 output is the whole image: it must not pay the tiled path's passes."""
    torch.manual_seed(5)
    x = torch.rand(1, 3, 72, 136, dtype=torch.float64)  # a 9x17 latent
    whole = pointwise_pipe(x, "none", None)

    def tiled(*args):
        raise AssertionError("took the tiled path")

    for stage in ("encode_tiled", "denoise_tiled", "decode_tiled"):
        monkeypatch.setattr(pointwise_pipe, stage, tiled)
    assert torch.equal(pointwise_pipe(x, "none", 17), whole)
    assert torch.equal(pointwise_pipe(x, "none", 64), whole)
    with pytest.raises(AssertionError, match="tiled path"):
        pointwise_pipe(x, "none", 16)  # one side needs two tiles


def test_progress_names_each_stage_whole_or_tiled(pointwise_pipe, monkeypatch):
    """The CLI's bars hear of every stage: a whole image (a minute or more on the CPU) as one step
    each (it heard nothing, so a bar sat at 0/1), tiles one batch at a time up to all of them."""
    calls = []
    monkeypatch.setattr(pointwise_pipe, "progress", lambda stage, done, total: calls.append((stage, done, total)))
    torch.manual_seed(6)
    x = torch.rand(1, 3, 200, 264, dtype=torch.float64)
    pointwise_pipe(x, "none", None)
    assert calls == [("encode", 0, 1), ("encode", 1, 1), ("unet", 0, 1), ("unet", 1, 1), ("decode", 0, 1), ("decode", 1, 1)]
    calls.clear()
    pointwise_pipe(x, "none", 16)
    stages = [stage for stage, _, _ in calls]
    assert stages == sorted(stages, key=["encode", "unet", "decode"].index) and set(stages) == {"encode", "unet", "decode"}
    for stage in ("encode", "unet", "decode"):
        done = [(d, t) for s, d, t in calls if s == stage]
        assert done[-1][0] == done[-1][1] > 1 and [d for d, _ in done] == sorted(d for d, _ in done), (stage, done)


def test_tiles_parked_in_files_give_the_same_result(pointwise_pipe, tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    torch.manual_seed(3)
    x = torch.rand(1, 3, 96, 160, dtype=torch.float64)
    in_memory = pointwise_pipe(x, "none", 8)
    pointwise_pipe.park_budget = 0  # every waiting tile goes to a temporary file
    try:
        on_disk = pointwise_pipe(x, "none", 8)
    finally:
        pointwise_pipe.park_budget = None
    torch.testing.assert_close(on_disk, in_memory, rtol=0, atol=1e-12)  # layouts may differ, values not
    assert list(tmp_path.iterdir()) == [], "temporary tile files must be removed"


def test_tiles_that_fit_one_batch_wait_for_nothing_and_are_not_parked(pointwise_pipe, monkeypatch):
    """With every tile in one batch no tile waits for another, so activations stay put between the
    norms: only the inputs and outputs pass through parking (the copies made a single 1024x768 tile
    1.9x slower than the untiled decoder). Same numbers as the batch-by-batch run."""
    from icmsr_cli.tiling import vae

    torch.manual_seed(4)
    x = torch.rand(1, 3, 96, 64, dtype=torch.float64)  # a 12x8 latent: 2x1 VAE tiles of 8, both of one shape
    puts = []
    real_put = vae.Parking.put
    monkeypatch.setattr(vae.Parking, "put", lambda self, t: puts.append(t.shape) or real_put(self, t))
    pointwise_pipe.tile_batch = 1
    try:
        one_by_one = pointwise_pipe(x, "none", 8)
        parked_one_by_one, puts[:] = len(puts), []
        pointwise_pipe.tile_batch = 2
        together = pointwise_pipe(x, "none", 8)
    finally:
        pointwise_pipe.tile_batch = 4
    assert len(puts) == 2 * 2 * 2, puts  # encoder and decoder: each tile's input and output
    assert parked_one_by_one > len(puts)
    torch.testing.assert_close(together, one_by_one, rtol=0, atol=1e-12)


def test_one_tile_covering_the_image_is_the_untiled_result(tiny_base, tiny_lora):
    pipe = load_pipeline(tiny_base, tiny_lora, device=torch.device("cpu"), dtype=torch.float64)
    torch.manual_seed(2)
    x = torch.rand(1, 3, 120, 200, dtype=torch.float64)
    torch.testing.assert_close(pipe(x, "adain", 32), pipe(x, "adain", None), rtol=0, atol=1e-6)


def test_out_of_memory_halves_the_tile_then_gives_up(tiny_base, tiny_lora, monkeypatch):
    pipe = load_pipeline(tiny_base, tiny_lora, device=torch.device("cpu"), dtype=torch.float32)
    notes, tried = [], []
    pipe.notify = notes.append
    real = pipe._graph

    def limited(x, tile):
        tried.append(tile)
        if tile is None or tile > 16:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(x, tile)

    monkeypatch.setattr(pipe, "_graph", limited)
    out = pipe(torch.rand(1, 3, 256, 320), "none", None)
    assert out.shape == (1, 3, 256, 320)
    assert tried == [None, 16]
    assert notes == ["out of memory on cpu with the whole image; retrying with 16-pixel tiles"]

    monkeypatch.setattr(pipe, "_graph", lambda x, tile: (_ for _ in ()).throw(RuntimeError("DefaultCPUAllocator: can't allocate memory")))
    with pytest.raises(ResourceError, match="out of memory on cpu even with 16-pixel tiles"):
        pipe(torch.rand(1, 3, 256, 320), "none", 32)
    # an image too small to tile (a 200-px side is 25 latent px: halved, under the least tile) said "None-pixel tiles"
    with pytest.raises(ResourceError, match=r"^out of memory on cpu even with the whole image; free memory or use a smaller --scale$"):
        pipe(torch.rand(1, 3, 120, 200), "none", None)


def test_tiled_vae_through_the_real_layout_matches_untiled(tiny_base, tiny_lora):
    """The VAE's real blocks (3x3 convs, down/upsamplers, mid-block attention, GroupNorm with shared
    statistics) over many tiles, against the untiled encoder and decoder. What remains is the
    attention seeing one tile and the receptive field beyond the context pad. The bounds are
    measured: encoder 0.0037 mean error, decoder 27.7 dB; dropping the between-tile variance
    term gives 0.029 and 24.2 dB, taking one tile's statistics 0.28 and 11 dB."""
    from conftest import photo_like

    pipe = load_pipeline(tiny_base, tiny_lora, device=torch.device("cpu"), dtype=torch.float32)
    x = torch.from_numpy(photo_like(384, 320).astype(np.float32) / 255).permute(2, 0, 1)[None]
    z = pipe.encode(x)
    z_tiled = pipe.encode_tiled(x, 16)  # a 48x40 latent: 4x3 tiles
    assert (z - z_tiled).abs().mean() < 0.008
    y, y_tiled = pipe.decode(z), pipe.decode_tiled(z, 16)
    psnr = 10 * torch.log10(1 / ((y - y_tiled) ** 2).mean())
    assert psnr > 26, psnr


def test_parking_fills_tiers_in_order_then_files_and_gives_back_the_same_tensors(tmp_path, monkeypatch):
    """The device tier is abstract: here two CPU tiers stand for "GPU, then host". Waiting tensors
    go to the first tier while it has room, then the next, then files; room comes back on get."""
    import tempfile

    from icmsr_cli.tiling.vae import Parking

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    cpu = torch.device("cpu")
    park = Parking([(cpu, 2 * 4096), (cpu, 4096)])
    tensors = [torch.randn(1, 4, 16, 16) for _ in range(5)]  # 4096 bytes each
    handles = [park.put(t) for t in tensors]
    assert [h.tier for h in handles] == [0, 0, 1, -1, -1]
    assert park.used == [8192, 4096] and len(list(tmp_path.rglob("*.bin"))) == 2
    back = [park.get(h) for h in handles]
    assert all(torch.equal(a, b) for a, b in zip(tensors, back))
    assert park.used == [0, 0] and not list(tmp_path.rglob("*.bin"))
    again = park.put(tensors[0])
    assert again.tier == 0, "room given back is used again"
    park.close()


def test_parking_tiers_give_the_tiled_result_of_host_memory(pointwise_pipe, monkeypatch):
    from icmsr_cli.tiling import vae

    torch.manual_seed(4)
    x = torch.rand(1, 3, 96, 160, dtype=torch.float64)
    reference = pointwise_pipe(x, "none", 8)
    tiers = []
    real_parking = vae.Parking

    def small_first_tier(given):
        tiers.append(given)
        return real_parking([(torch.device("cpu"), 50_000), *given])

    monkeypatch.setattr(vae, "Parking", small_first_tier)
    torch.testing.assert_close(pointwise_pipe(x, "none", 8), reference, rtol=0, atol=1e-12)
    assert tiers, "the tiled VAE parks its tiles through Parking"


def _bare_pipeline(device: str, bytes_per_latent_px: float | None = None):
    """A OneStepSR with no modules: enough for the tile decisions, which read the device, the
    batch and the working-set figure (given here as a GPU's probe would have measured it)."""
    from icmsr_cli.model.graph import OneStepSR

    dev = torch.device(device)
    return OneStepSR(vae=None, unet=None, prompt_embeds=None, alpha_t=0.0, device=dev, dtype=torch.float32,
                     tile_batch=tiles_per_call(dev), _measured_bytes=bytes_per_latent_px)


@pytest.mark.parametrize("free_gb,expected", [(80, None), (3.2, None), (3.0, "tiled"), (0.5, "tiled")])
def test_gpu_auto_runs_whole_when_the_measured_working_set_fits(monkeypatch, free_gb, expected):
    from icmsr_cli.model import graph

    per_px = 600.0  # bytes per output pixel, as measured on a GPU in bf16
    pipe = _bare_pipeline("cuda", per_px * 64)
    monkeypatch.setattr(graph, "available_memory", lambda device: free_gb * 1e9)
    tile = pipe.auto_tile(2048, 2048)  # 2048^2 * 600 B * 1.25 = 3.1 GB
    if expected is None:
        assert tile is None
    else:
        assert tile is not None and tile % 8 == 0 and 16 <= tile <= 256
        # a call's batch of tiles fits a quarter of the free memory
        assert pipe.tile_batch * tile * tile * 64 * per_px <= free_gb * 1e9 / 4 or tile == 16
    monkeypatch.setattr(graph, "available_memory", lambda device: 80e9)
    assert pipe.auto_tile(4096, 4096) is None  # 12.6 GB: an H100 runs 4096^2 whole


def test_cpu_auto_runs_an_image_whole_while_its_estimated_working_set_fits_half_the_ram(monkeypatch):
    """On the CPU `auto` runs whole while the estimate (196,608 B per latent px, 1.25x) fits half the
    available RAM: with 20.2 GB, images up to ~2.63 Mpx. Tiled, a 1024x768 output took 5.8x the time
    and 1.7x the memory (full model, ninth session); a 4:3 output at the 512-px minimum was cut in two
    for its long side."""
    from icmsr_cli.model import graph

    monkeypatch.setattr(graph, "available_memory", lambda device: 20.2e9)
    pipe = _bare_pipeline("cpu")
    for height, width in ((688, 512), (768, 1024), (1600, 1600)):
        assert pipe.auto_tile(height, width) is None, (height, width)
    # one tile per call with a quarter of the RAM: 160 latent px, where batches of 4 got 80
    assert pipe.auto_tile(1624, 1624) == 160  # 2.64 Mpx
    assert pipe.auto_tile(2048, 2048) == 160 == pipe.largest_tile()
