"""The one-step model on tensors: encode -> UNet at t=999 -> x0 -> decode -> colour fix, whole or
in tiles, with the per-stage fp16 fallback and the out-of-memory retries. loading.py builds it."""

from __future__ import annotations

import logging
import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from ..errors import NumericalError, ResourceError, SetupError
from ..tiling.plan import Tile, auto_tile_size, fits_whole, plan_tiles
from ..tiling.vae import decoder_ops, encoder_ops, run_tiled
from .color import apply_color_fix
from .devices import available_memory, freed_memory_reused, is_out_of_memory, large_blocks_mapped, release_freed_memory

logger = logging.getLogger(__name__)

#: SD's latent scaling constant: z = E(2x-1).mode() * LATENT_SCALE
LATENT_SCALE = 0.18215
#: the single UNet step runs at the last training timestep
TIMESTEP = 999
#: the merged weights are built (and cached) channels-last; load_pipeline converts per device
MEMORY_FORMAT = torch.channels_last
#: the VAE downsamples by 8; inputs are reflect-padded to a multiple of it
VAE_FACTOR = 8


def alphas_cumprod(scheduler_config: dict) -> torch.Tensor:
    """Scaled-linear schedule in float64: betas = linspace(sqrt(b0), sqrt(b1), T)**2, cumprod(1 - betas)."""
    if scheduler_config.get("beta_schedule", "scaled_linear") != "scaled_linear":
        raise SetupError(f"base model scheduler uses {scheduler_config['beta_schedule']!r}; SD-2.1-base's scaled_linear is required")
    if scheduler_config.get("prediction_type", "epsilon") != "epsilon":
        raise SetupError(
            f"base model predicts {scheduler_config['prediction_type']!r}; the one-step upscaler needs an epsilon model (SD-2.1-base, not SD-2.1 768)"
        )
    b0 = scheduler_config.get("beta_start", 0.00085)
    b1 = scheduler_config.get("beta_end", 0.012)
    steps = scheduler_config.get("num_train_timesteps", 1000)
    betas = torch.linspace(math.sqrt(b0), math.sqrt(b1), steps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def unit_float(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Samples in [0, 1] as `dtype`; uint8 k becomes k / 255 rounded in float32, as numpy's float32
    division gives it on the host (io/images.resize_planes). The CPU divides (PyTorch divides
    float32 by a scalar exactly there, on all cores: 0.11 s for a 4096^2 image against numpy's
    0.45 s); other devices look the values up in a table, because CUDA divides by a scalar as a
    multiplication by its reciprocal, one unit in the last place off for half of the 256 values."""
    if x.dtype != torch.uint8:
        return x.to(dtype)
    if x.device.type == "cpu":
        return x.to(torch.float32).div_(255).to(dtype)
    table = (torch.arange(256, dtype=torch.float32) / 255).to(x.device, dtype)
    return table[x.to(torch.int32)]


def pad_to_multiple(x: torch.Tensor, multiple: int = VAE_FACTOR) -> torch.Tensor:
    """Reflect-pad the bottom and right edges up to a multiple (never stretch the image)."""
    h, w = x.shape[-2:]
    ph, pw = -h % multiple, -w % multiple
    if ph == 0 and pw == 0:
        return x
    # reflect needs the pad to be smaller than the side; tiny images fall back to replicate
    mode = "reflect" if ph < h and pw < w else "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode)


#: tiles overlap by a quarter (UNet) or an eighth (VAE, which also gets context padding) of their size
UNET_OVERLAP, VAE_OVERLAP = 4, 8
#: the smallest UNet tile the planner shrinks to: SD-2.1-base's training size in latent pixels
UNET_LEAST = 64
#: receptive-field context around each VAE tile: image pixels for the encoder, latent pixels for the decoder
ENCODER_PAD, DECODER_PAD = 64, 12
#: tile sizes are halved after an out-of-memory error down to this many latent pixels
MIN_TILE = 16
# working set of one tile per latent pixel: the decoder's last level holds ~6 float32 maps of
# 128 channels at 8x8 image pixels per latent pixel
_BYTES_PER_LATENT_PX = 64 * 128 * 6 * 4


def vae_plan(height: int, width: int, tile: int, unit: int = 1) -> list[Tile]:
    """The VAE encoder's and decoder's tiles over a (height, width) latent, in units of `unit` pixels."""
    return plan_tiles(height, width, tile, tile // VAE_OVERLAP, unit=unit)


def unet_plan(height: int, width: int, tile: int) -> list[Tile]:
    """The UNet's tiles over a (height, width) latent. Each UNet tile normalises with its own
    GroupNorm statistics, so its tiles are not shrunk below the 64x64 latents SD-2.1-base was
    trained on (unless asked for smaller ones)."""
    return plan_tiles(height, width, tile, tile // UNET_OVERLAP, least=min(tile, UNET_LEAST))


Progress = Callable[[str, int, int], None]  # (stage, done, total)


@dataclass
class OneStepSR:
    """ICM-SR / OSEDiff inference graph on float tensors in [0, 1], with merged LoRA weights."""

    vae: torch.nn.Module
    unet: torch.nn.Module
    prompt_embeds: torch.Tensor  # (1, 77, D) text-encoder output [0]
    alpha_t: float  # alphas_cumprod[999]
    device: torch.device
    dtype: torch.dtype
    tile_batch: int = 4  # tiles per model call (load_pipeline: devices.tiles_per_call)
    memory_format: torch.memory_format = MEMORY_FORMAT  # activations' layout; the weights' matches (load_pipeline)
    stage_dtypes: dict[str, torch.dtype] = field(default_factory=dict)  # stages moved to float32 after an fp16 overflow
    # glibc tuned for a process that only upscales (the CLI asks for it): CPU whole-image runs inside
    # devices.freed_memory_reused, and large blocks mapped for tiled runs (devices.large_blocks_mapped)
    reuse_freed_memory: bool = False
    park_budget: float | None = None  # host bytes for waiting VAE tiles before files; None: see _parking
    progress: Progress | None = None  # told about each stage's tiles done (a whole image: one step a stage)
    _measured_bytes: float | None = field(default=None, repr=False)  # see _bytes_per_latent_px
    notify: Callable[[str], None] = logger.warning  # one-line notes (out-of-memory retries)

    # ----------------------------------------------------------------------------- whole image

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """z = E(2x - 1).mode() * 0.18215 (the posterior mode keeps runs reproducible)."""
        x = (x.to(self.device, self.dtype_of("encode")) * 2 - 1).contiguous(memory_format=self.memory_format)
        return self.vae.encode(x) * LATENT_SCALE

    @torch.no_grad()
    def eps(self, z: torch.Tensor) -> torch.Tensor:
        """One UNet call at t=999 with the prompt embedding."""
        dtype = self.dtype_of("unet")
        c = self.prompt_embeds.to(self.device, dtype).expand(z.shape[0], -1, -1)
        t = torch.full((z.shape[0],), TIMESTEP, device=self.device, dtype=torch.long)
        z = z.to(self.device, dtype).contiguous(memory_format=self.memory_format)
        return self.unet(z, t, encoder_hidden_states=c)

    def x0(self, z: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x0 = (z - sqrt(1-a) eps) / sqrt(a), in float32: the 1/sqrt(a) ~ 14.6x gain would
        magnify bf16 rounding."""
        a, acc = self.alpha_t, torch.promote_types(self.dtype, torch.float32)
        return (z.to(acc) - math.sqrt(1 - a) * eps.to(acc)) / math.sqrt(a)

    @torch.no_grad()
    def denoise(self, z: torch.Tensor) -> torch.Tensor:
        return self.x0(z, self.eps(z)).to(self.dtype)

    @torch.no_grad()
    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """y = clamp(D(x0 / 0.18215), -1, 1) * 0.5 + 0.5, returned in float32."""
        y = self.vae.decode((x0 / LATENT_SCALE).to(self.device, self.dtype_of("decode")))
        return y.to(torch.promote_types(y.dtype, torch.float32)).clamp(-1, 1) * 0.5 + 0.5

    # ----------------------------------------------------------------------------------- tiled

    @torch.no_grad()
    def encode_tiled(self, x: torch.Tensor, tile: int) -> torch.Tensor:
        h, w = x.shape[-2] // VAE_FACTOR, x.shape[-1] // VAE_FACTOR
        moments = run_tiled(
            encoder_ops(self.vae), x.mul(2).sub_(1),  # one whole-image copy, not two
            vae_plan(h, w, tile, unit=VAE_FACTOR), vae_plan(h, w, tile),
            pad=ENCODER_PAD, device=self.device, dtype=self.dtype_of("encode"), batch=self.tile_batch, progress=self._stage("encode"),
            park=self._parking(tile), between_segments=release_freed_memory,
        )
        return moments[:, : moments.shape[1] // 2] * LATENT_SCALE  # the posterior mode is its mean

    @torch.no_grad()
    def denoise_tiled(self, z: torch.Tensor, tile: int) -> torch.Tensor:
        """eps blended across tiles with the planner's windows, then x0 on the whole latent."""
        tiles = unet_plan(z.shape[-2], z.shape[-1], tile)
        acc = torch.promote_types(self.dtype, torch.float32)
        eps = torch.zeros(z.shape, dtype=acc, device=z.device)
        total = torch.zeros((1, 1, *z.shape[-2:]), dtype=acc, device=z.device)
        report = self._stage("unet")
        for start in range(0, len(tiles), self.tile_batch):
            chunk = tiles[start : start + self.tile_batch]
            # all tiles have the same size, so a chunk is one batched UNet call
            crops = torch.cat([z[:, :, y0:y1, x0:x1] for y0, y1, x0, x1 in (t.core for t in chunk)])
            out = self.eps(crops).to(z.device, acc)
            for k, t in enumerate(chunk):
                y0, y1, x0, x1 = t.core
                wgt = t.weight.to(z.device, acc)
                eps[:, :, y0:y1, x0:x1] += out[k : k + 1] * wgt
                total[:, :, y0:y1, x0:x1] += wgt
            if report:
                report(start + len(chunk), len(tiles))
        return self.x0(z, eps / total)

    @torch.no_grad()
    def decode_tiled(self, x0: torch.Tensor, tile: int) -> torch.Tensor:
        h, w = x0.shape[-2:]
        y = run_tiled(
            decoder_ops(self.vae), x0 / LATENT_SCALE,
            vae_plan(h, w, tile), vae_plan(h, w, tile, unit=VAE_FACTOR),
            pad=DECODER_PAD, device=self.device, dtype=self.dtype_of("decode"), batch=self.tile_batch, progress=self._stage("decode"),
            park=self._parking(tile), between_segments=release_freed_memory,
        )
        return y.clamp_(-1, 1).mul_(0.5).add_(0.5)

    def _parking(self, tile: int) -> list[tuple[torch.device, float]]:
        """Memory tiers for waiting VAE tiles, then files: on a GPU its free memory beyond what the
        working tile batch needs (twice over, for the allocator's slack), then host memory: up to
        1 GiB (or a third of free RAM), the rest in files; writes land in the page cache, so spilling
        costs little while keeping RSS flat."""
        cpu = torch.device("cpu")
        host = self.park_budget if self.park_budget is not None else min(2**30, available_memory(cpu) / 3)
        tiers = [(cpu, host)]
        if self.device.type != "cpu":
            working = self.tile_batch * self._bytes_per_latent_px() * (tile + 2 * DECODER_PAD) ** 2
            room = available_memory(self.device) - 2 * working
            tiers.insert(0, (self.device, max(0.0, room)))
        return tiers

    def _stage(self, name: str):
        return (lambda done, total: self.progress(name, done, total)) if self.progress else None

    # ------------------------------------------------------------------------------- the graph

    def auto_tile(self, height: int, width: int) -> int | None:
        """Latent tile size for an image of height x width pixels; None runs it whole. On a GPU the
        whole image runs whenever its measured working set fits in free memory; on the CPU whenever
        an estimate of it fits half the available RAM (BENCHMARKS.md, memory tables). Larger images
        get largest_tile()."""
        free = available_memory(self.device)
        # The CPU keeps half its RAM for the rest of the machine. Tiles cost overlap and the
        # shared-statistics passes: full model, 1024x768 output, this 2-core machine, one process:
        # whole 63-73 s, 80-px tiles 110 s (337 s and 11.6 GB peak RSS through the CLI in the
        # ninth session, with larger overlaps and batches of 4).
        share = free / 2 if self.device.type == "cpu" else free
        if fits_whole(height, width, share, self._bytes_per_latent_px() / VAE_FACTOR**2):
            return None
        return self.largest_tile(free)

    def largest_tile(self, free: float | None = None) -> int:
        """The latent tile `auto` takes when it must tile: the largest whose model call
        (tile_batch tiles) fits a quarter of `free` bytes (default: the device's free memory)."""
        free = available_memory(self.device) if free is None else free
        return auto_tile_size(free, self._bytes_per_latent_px() * self.tile_batch)

    def _bytes_per_latent_px(self) -> float:
        """Peak device memory per latent pixel of a whole-image run, measured once on a 512x512
        probe (the stages are linear in the pixel count: the VAE attention runs through SDPA's
        memory-efficient kernels). The CPU figure is the estimate its tile sizes were tuned with."""
        if self._measured_bytes is None:
            if self.device.type != "cuda":
                self._measured_bytes = float(_BYTES_PER_LATENT_PX)
            else:
                probe = torch.zeros(1, 3, 512, 512)
                torch.cuda.synchronize(self.device)
                torch.cuda.reset_peak_memory_stats(self.device)
                before = torch.cuda.memory_allocated(self.device)
                progress, self.progress = self.progress, None  # the probe is no stage of the user's image
                try:
                    with torch.no_grad():
                        self._graph(probe, None)
                finally:
                    self.progress = progress
                peak = torch.cuda.max_memory_allocated(self.device) - before
                self._measured_bytes = peak / (512 // VAE_FACTOR) ** 2
        return self._measured_bytes

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, color_fix: str = "adain", tile: int | str | None = None) -> torch.Tensor:
        """Run the graph on x (1, 3, H, W) at the output size: floats in [0, 1], or uint8 samples k
        (read as k / 255, see unit_float); returns float32 in [0, 1].

        `tile`: latent tile size for all three stages, None for the whole image, or "auto".
        Out of memory, the tile size is halved (down to MIN_TILE) and the image run again.
        """
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected a (B, 3, H, W) tensor, got shape {tuple(x.shape)}")
        h, w = x.shape[-2:]
        padded = (h + -h % VAE_FACTOR, w + -w % VAE_FACTOR)  # what pad_to_multiple makes of it
        side = max(padded)
        if tile == "auto":
            tile = self.auto_tile(*padded)
        elif tile is not None and tile >= side // VAE_FACTOR:
            # one tile covering the image is the image: the whole path gives the same numbers
            # without the shared-statistics passes (1.3x the time with the full model on the CPU)
            tile = None
        acc = torch.promote_types(self.dtype, torch.float32)
        while True:
            try:
                # whole, the input crosses to the device once (8-bit samples as bytes) and the
                # colour fix finds it there; tiles take their crops from the host copy
                src = pad_to_multiple(unit_float(x.to(self.device) if tile is None else x, acc))
                reuse = self.reuse_freed_memory and tile is None and self.device.type == "cpu"
                with freed_memory_reused() if reuse else nullcontext():
                    y = self._graph(src, tile)
                break
            except (torch.OutOfMemoryError, MemoryError, RuntimeError) as exc:
                if not is_out_of_memory(exc):
                    raise
                smaller = (tile or side // VAE_FACTOR) // 2 // 8 * 8
                if smaller < MIN_TILE:
                    # (an image too small to tile, run whole, said "even with None-pixel tiles")
                    advice = "free memory or use a smaller --scale" if self.device.type == "cpu" else "free memory or use the CPU"
                    raise ResourceError(f"out of memory on {self.device} even with {_how(tile)}; {advice}") from exc
                self.notify(f"out of memory on {self.device} with {_how(tile)}; retrying with {smaller}-pixel tiles")
                tile, src = smaller, None  # the device copy goes with the rest
                _release(self.device)
        if not bool(torch.isfinite(y).all()):
            raise NumericalError(f"the model produced NaN/Inf in {str(self.dtype).removeprefix('torch.')} on {self.device}; {_nan_advice(self.dtype)}")
        y = apply_color_fix(color_fix, y, src.to(y.device), inplace=True)  # y is ours: no whole-image copies
        return y.clamp_(0, 1)[..., :h, :w]

    def _graph(self, x: torch.Tensor, tile: int | None) -> torch.Tensor:
        if tile is None:
            # one step per stage: a whole image on the CPU takes a minute or more, and says where it is
            z = self._whole("encode", lambda: self.encode(x))
            x0 = self._whole("unet", lambda: self.denoise(z))
            return self._whole("decode", lambda: self.decode(x0))
        if self.reuse_freed_memory:
            large_blocks_mapped()  # host memory of a tiled run stays flat in the image size
        z = self._finite("encode", lambda: self.encode_tiled(x, tile))
        release_freed_memory()  # the heap kept what the tiles freed: see release_freed_memory
        x0 = self._finite("unet", lambda: self.denoise_tiled(z, tile))
        release_freed_memory()
        return self._finite("decode", lambda: self.decode_tiled(x0, tile))

    def _whole(self, stage: str, run: Callable[[], torch.Tensor]) -> torch.Tensor:
        report = self._stage(stage)
        if report:
            report(0, 1)
        out = self._finite(stage, run)
        if report:
            report(1, 1)
        return out

    def dtype_of(self, stage: str) -> torch.dtype:
        """The dtype a stage (encode, unet, decode) runs in: the pipeline's, or float32 after an fp16 overflow."""
        return self.stage_dtypes.get(stage, self.dtype)

    def _finite(self, stage: str, run: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Run a stage; if fp16 overflowed in it (NaN/Inf out), move that stage to float32 and run it again."""
        out = run()
        if not bool(torch.isfinite(out).all()) and self._upcast(stage):
            out = run()
        return out

    def _upcast(self, stage: str) -> bool:
        """fp16's range (65504) is too small for some activations of SD's VAE (diffusers marks it
        force_upcast) and, with some weights, the UNet; bf16 and float32 are not. Rather than run
        every image in float32, switch only the stage that overflowed, once, and say so. False when
        there is nothing to switch (not fp16, or already switched)."""
        if self.dtype != torch.float16 or stage in self.stage_dtypes:
            return False
        self.notify(f"{_STAGE_NAMES[stage]} overflowed in fp16; running it in fp32 from now on")
        self.stage_dtypes[stage] = torch.float32
        for module in self._stage_modules(stage):
            module.float()
        return True

    def _stage_modules(self, stage: str) -> list[torch.nn.Module]:
        if stage == "unet":
            return [self.unet]
        names = ("encoder", "quant_conv") if stage == "encode" else ("post_quant_conv", "decoder")
        return [m for m in (getattr(self.vae, n, None) for n in names) if m is not None]


_STAGE_NAMES = {"encode": "the VAE encoder", "unet": "the UNet", "decode": "the VAE decoder"}


def _how(tile: int | None) -> str:
    return f"{tile}-pixel tiles" if tile else "the whole image"


def _nan_advice(dtype: torch.dtype) -> str:
    if dtype == torch.float16:
        return "rerun with --dtype bf16 (GPUs from Ampere on) or fp32"
    if dtype == torch.bfloat16:
        return "rerun with --dtype fp32"
    return "the weights or the input hold NaN/Inf, or the weights do not belong to this model"


def _release(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
