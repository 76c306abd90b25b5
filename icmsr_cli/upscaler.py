"""The Python entry point and one image through the model: exact output size, the 512-px minimum,
gray, alpha and bit depth. `load_upscaler` resolves weights by model name and loads once;
`Upscaler` then upscales many images.

torch is imported where the model runs, so options and a resumed batch with nothing left to do
stay light."""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from .choices import COLOR_FIXES, LEAST_TILE
from .errors import ImageError
from .io.images import Picture, picture_from_pil, picture_to_pil, quantise, resize_planes, unquantised
from .io.metadata import exif_with_size

if TYPE_CHECKING:
    import torch

    from .model.graph import OneStepSR, Progress
    from .weights.hub import Notify

# ITU-R 601 luma, as Pillow's convert("L"): gray inputs come back gray
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
# host memory an upscale holds per pixel at the larger of the output and the model's size: a few
# whole-image float32 RGB copies (model input, blended output, colour fix) and the quantised
# output; measured peak RSS grew 176 MB from 2048^2 to 3072^2 outputs, 34 bytes per pixel (BENCHMARKS.md)
HOST_BYTES_PER_PIXEL = 36


@dataclass(frozen=True)
class UpscaleOptions:
    scale: float = 4.0  # output size is (round(W*scale), round(H*scale))
    color_fix: str = "adain"  # adain | wavelet | none, applied to the whole image
    min_side: int = 512  # short side the model runs at, at least (its training crop)
    tile: int | str | None = "auto"  # latent tile size for all stages, None: whole image, "auto": from free memory

    def __post_init__(self) -> None:
        # checked here, as the CLI checks its flags: a tile of "off", 0 or 8.5 failed deep in the
        # model with torch's words ("'>=' not supported", "must be tuple of ints"), and 3 ran
        if not (_is_number(self.scale) and self.scale > 0 and np.isfinite(self.scale)):
            raise ValueError(f"scale must be a positive number, got {self.scale!r}")
        if self.color_fix not in COLOR_FIXES:
            raise ValueError(f"colour fix must be one of {', '.join(COLOR_FIXES)}, got {self.color_fix!r}")
        if not (self.tile is None or self.tile == "auto" or (_is_number(self.tile, whole=True) and self.tile >= LEAST_TILE)):
            raise ValueError(f"tile must be 'auto', None (the whole image at once) or a latent tile size of at least {LEAST_TILE}, "
                             f"got {self.tile!r}")
        if not (_is_number(self.min_side, whole=True) and self.min_side >= 1):
            raise ValueError(f"min_side must be a whole number of pixels, at least 1, got {self.min_side!r}")


def _is_number(value, *, whole: bool = False) -> bool:
    """A real number (an integer with `whole`), numpy's included, and not a bool."""
    kind = numbers.Integral if whole else numbers.Real
    return isinstance(value, kind) and not isinstance(value, (bool, np.bool_))


def output_size(size: tuple[int, int], scale: float) -> tuple[int, int]:
    """(round(W*s), round(H*s)) exactly: what the user asked for, never a multiple-of-8 compromise."""
    w, h = size
    out = (round(w * scale), round(h * scale))
    if min(out) < 1:
        raise ImageError(f"{w}x{h} at scale {scale} gives an empty {out[0]}x{out[1]} output")
    return out


def processing_size(out: tuple[int, int], min_side: int) -> tuple[int, int]:
    """The size the model runs at: `out`, or `out` enlarged so its short side is `min_side`."""
    short = min(out)
    if short >= min_side:
        return out
    f = min_side / short
    return tuple(min_side if side == short else max(min_side, round(side * f)) for side in out)


@dataclass(frozen=True)
class Prepared:
    """A picture made ready for the model: everything of an upscale that needs no model (the
    sizes, the bicubic enlargement to the size the model runs at, the alpha plane at the output
    size). `prepare_picture` makes one and `upscale_prepared` finishes it; a batch prepares the
    next file in its reader thread while the model works on this one (io/batch.py)."""

    picture: Picture  # the input; its metadata and bit depth go to the output
    options: UpscaleOptions
    out: tuple[int, int]  # output size (W, H)
    run_at: tuple[int, int]  # the size the model runs at (W, H)
    x: np.ndarray  # H x W x 3: the model's input at run_at, uint8 from 8-bit sources (k / 255), else float32
    alpha: np.ndarray  # H x W x (0 or 1) float32: alpha at the output size


def prepare_picture(picture: Picture, options: UpscaleOptions = UpscaleOptions()) -> Prepared:
    """The model-free first half of an upscale (see Prepared); raises ImageError for an empty output."""
    picture = picture.with_pixels(unquantised(picture.pixels))
    out = output_size(picture.size, options.scale)
    run_at = processing_size(out, options.min_side)
    check_host_memory(out, run_at)
    n_color = 1 if picture.is_gray else 3
    color, alpha = picture.pixels[..., :n_color], picture.pixels[..., n_color:]
    exact_8bit = picture.bit_depth == 8
    x = resize_planes(color, run_at, exact_8bit=exact_8bit, as_bytes=exact_8bit)
    if n_color == 1:
        x = np.repeat(x, 3, axis=2)
    alpha = np.clip(resize_planes(alpha, out, exact_8bit=exact_8bit), 0, 1) if alpha.shape[2] else alpha
    return Prepared(picture, options, out, run_at, x, alpha)


def check_host_memory(out: tuple[int, int], run_at: tuple[int, int]) -> None:
    """Refuse, before any allocation, an output whose whole-image buffers cannot fit in the memory
    available: past it Linux's out-of-memory killer ends the process with no word (a 40x30 image at
    --scale 1000 did: a 40000x30000 output)."""
    import torch

    from .model import devices

    need = max(out[0] * out[1], run_at[0] * run_at[1]) * HOST_BYTES_PER_PIXEL
    have = devices.available_memory(torch.device("cpu"))
    if need > have:
        raise ImageError(f"a {out[0]}x{out[1]} output needs about {need / 2**30:,.1f} GB of memory, "
                         f"{have / 2**30:.1f} GB is available; use a smaller --scale")


def upscale_prepared(pipe: OneStepSR, prepared: Prepared) -> Picture:
    """The model and the output: the colour through the model at run_at, then to the output size;
    8-bit colour at the model's own size comes back quantised (uint8 pixels), the rest as float."""
    import torch

    picture, options, out, alpha = prepared.picture, prepared.options, prepared.out, prepared.alpha
    y = pipe(torch.from_numpy(prepared.x).permute(2, 0, 1)[None], options.color_fix, options.tile)
    if prepared.run_at == out and not picture.is_gray and picture.bit_depth == 8:
        # the common case stays on the device until it is uint8: one small transfer back
        rgb = quantise_on_device(y[0].permute(1, 2, 0)).cpu().numpy()
        return picture.with_pixels(np.concatenate([rgb, quantise(alpha, 8)], axis=2) if alpha.shape[2] else rgb)
    y = y[0].permute(1, 2, 0).cpu().numpy()
    if prepared.run_at != out:
        y = np.clip(resize_planes(y, out, exact_8bit=False), 0, 1)
    if picture.is_gray:
        y = (y @ _LUMA)[..., None]
    if alpha.shape[2]:
        y = np.concatenate([y, alpha], axis=2)
    return picture.with_pixels(y.astype(np.float32))


def upscale_picture(pipe: OneStepSR, picture: Picture, options: UpscaleOptions = UpscaleOptions()) -> Picture:
    """Upscale one picture; the colour goes through the model, alpha is resized bicubic alongside."""
    return upscale_prepared(pipe, prepare_picture(picture, options))


def quantise_on_device(y: torch.Tensor) -> torch.Tensor:
    """images.quantise to 8 bits on torch, where y lives: the same float32 ops (clamp, scale, round
    half to even), so the same integers as the CPU path."""
    import torch

    # one float copy at most; rows made contiguous where y lives (y is a view of (C, H, W) memory),
    # so the encoder gets H x W x C bytes as they come off the device
    return y.float().clamp(0, 1).mul_(255).round_().to(torch.uint8).contiguous()


def upscale_image(pipe: OneStepSR, image: Image.Image, options: UpscaleOptions = UpscaleOptions()) -> Image.Image:
    """Pillow in, Pillow out (8-bit modes and 16-bit gray; use upscale_picture for 16-bit colour).
    The output's .info holds the input's ICC profile, EXIF (its size the output's) and dpi, as
    Image.open gives them: save() takes some from there (PNG the profile), the rest when passed."""
    picture = upscale_picture(pipe, picture_from_pil(image), options)
    out = picture_to_pil(picture)
    info = picture.info
    out.info.update({k: info[k] for k in ("icc_profile", "dpi") if info.get(k)})
    if info.get("exif"):
        out.info["exif"] = exif_with_size(info["exif"], out.size)
    return out


@dataclass
class Upscaler:
    pipe: OneStepSR
    options: UpscaleOptions = UpscaleOptions()

    def upscale(self, image: Image.Image, **overrides) -> Image.Image:
        """Upscale a Pillow image; keyword overrides replace fields of `options` for this call."""
        if not isinstance(image, Image.Image):  # an array failed deep inside, on a missing .info
            raise TypeError(f"upscale takes a PIL.Image.Image, not {type(image).__name__}; "
                            "for arrays use upscale_picture(Picture(pixels)): H x W x C, floats in [0, 1] or uint8/uint16 samples")
        return upscale_image(self.pipe, image, _with(self.options, overrides))

    def upscale_picture(self, picture: Picture, **overrides) -> Picture:
        return upscale_picture(self.pipe, picture, _with(self.options, overrides))

    def prepare(self, picture: Picture, **overrides) -> Prepared:
        """The model-free half of upscale_picture (any thread); finish it with upscale_prepared."""
        return prepare_picture(picture, _with(self.options, overrides))

    def upscale_prepared(self, prepared: Prepared) -> Picture:
        return upscale_prepared(self.pipe, prepared)


def _with(options: UpscaleOptions, overrides: dict) -> UpscaleOptions:
    return UpscaleOptions(**{**options.__dict__, **overrides}) if overrides else options


def load_upscaler(
    model: str | None = None,
    *,
    base: str | None = None,
    lora: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    prompt: str = "",
    options: UpscaleOptions = UpscaleOptions(),
    reuse_freed_memory: bool = False,
    notify: Notify | None = None,
    progress: Progress | None = None,
    tqdm_class=None,
) -> Upscaler:
    """Load a registry model (or --base/--lora overrides) onto a device, ready to upscale.

    `notify` gets one-line notes (downloads, out-of-memory retries, fp16 fallbacks), `progress`
    (stage, done, total) for tiles; `reuse_freed_memory` tunes glibc for a process that does nothing
    else (the CLI sets it): freed memory kept while a CPU image runs whole, large blocks mapped once an
    image runs in tiles (process-wide; see model/devices.py)."""
    import torch

    from .model.devices import resolve_device, resolve_dtype
    from .model.loading import load_pipeline
    from .weights.hub import resolve_weights
    from .weights.registry import load_registry

    registry = load_registry()
    spec = registry.get(model or registry.default)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    kwargs = {"notify": notify} if notify else {}
    paths = resolve_weights(spec, base=base, lora=lora, fp16=dt != torch.float32, tqdm_class=tqdm_class, **kwargs)
    pipe = load_pipeline(paths.base, paths.lora, device=dev, dtype=dt, prompt=prompt, reuse_freed_memory=reuse_freed_memory,
                         notify=notify, progress=progress)
    return Upscaler(pipe, options)
