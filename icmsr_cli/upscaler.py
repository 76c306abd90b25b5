"""The Python entry point: resolve weights by model name, load once, upscale many images."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from .devices import resolve_device, resolve_dtype
from .hub import Notify, resolve_weights
from .images import Picture
from .pipeline import OneStepSR, Progress, load_pipeline
from .registry import load_registry
from .upscale import UpscaleOptions, upscale_image, upscale_picture


@dataclass
class Upscaler:
    pipe: OneStepSR
    options: UpscaleOptions = UpscaleOptions()

    def upscale(self, image: Image.Image, **overrides) -> Image.Image:
        """Upscale a Pillow image; keyword overrides replace fields of `options` for this call."""
        return upscale_image(self.pipe, image, _with(self.options, overrides))

    def upscale_picture(self, picture: Picture, **overrides) -> Picture:
        return upscale_picture(self.pipe, picture, _with(self.options, overrides))


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
    (stage, done, total) for tiles; `reuse_freed_memory` keeps glibc's freed memory while a CPU image
    runs whole (process-wide while it runs: for processes that do nothing else; the CLI sets it)."""
    registry = load_registry()
    spec = registry.get(model or registry.default)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    kwargs = {"notify": notify} if notify else {}
    paths = resolve_weights(spec, base=base, lora=lora, fp16=dt != torch.float32, tqdm_class=tqdm_class, **kwargs)
    pipe = load_pipeline(paths.base, paths.lora, device=dev, dtype=dt, prompt=prompt, reuse_freed_memory=reuse_freed_memory,
                         notify=notify, progress=progress)
    return Upscaler(pipe, options)
