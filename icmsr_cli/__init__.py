"""icmsr: one-step diffusion super-resolution (ICM-SR / OSEDiff on SD-2.1-base).

    from icmsr_cli import load_upscaler
    up = load_upscaler()                      # default model, downloaded on first use
    big = up.upscale(PIL.Image.open("in.png"))  # 4x, exact size, colour-fixed
"""

from __future__ import annotations

from .errors import (
    CheckpointError,
    IcmsrError,
    ImageError,
    IntegrityError,
    ModelNotFoundError,
    NumericalError,
    SetupError,
)
from .images import Picture, read_image, write_image
from .pipeline import OneStepSR, load_pipeline
from .upscale import UpscaleOptions, output_size, upscale_image, upscale_picture
from .upscaler import Upscaler, load_upscaler

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "IcmsrError",
    "ImageError",
    "IntegrityError",
    "ModelNotFoundError",
    "NumericalError",
    "OneStepSR",
    "Picture",
    "SetupError",
    "UpscaleOptions",
    "Upscaler",
    "__version__",
    "load_pipeline",
    "load_upscaler",
    "output_size",
    "read_image",
    "upscale_image",
    "upscale_picture",
    "write_image",
]
