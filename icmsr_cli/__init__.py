"""icmsr: one-step diffusion super-resolution (ICM-SR / OSEDiff on SD-2.1-base).

    from icmsr_cli import load_upscaler
    up = load_upscaler()                      # default model, downloaded on first use
    big = up.upscale(PIL.Image.open("in.png"))  # 4x, exact size, colour-fixed

Names are imported on first use, so `import icmsr_cli` (and the CLI's light commands) do not
pay for torch.
"""

from __future__ import annotations

from importlib import import_module

from .errors import (
    CheckpointError,
    DiskFullError,
    IcmsrError,
    ImageError,
    IntegrityError,
    ModelNotFoundError,
    NumericalError,
    RanksLostError,
    ResourceError,
    SetupError,
)

__version__ = "0.1.0"

_LAZY = {  # public name -> module that defines it; everything else is internal and may change
    "Upscaler": "upscaler", "load_upscaler": "upscaler", "UpscaleOptions": "upscaler",
    "Picture": "io.images", "read_image": "io.images", "write_image": "io.images",
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CheckpointError",
    "DiskFullError",
    "IcmsrError",
    "ImageError",
    "IntegrityError",
    "ModelNotFoundError",
    "NumericalError",
    "RanksLostError",
    "ResourceError",
    "SetupError",
    "__version__",
    *_LAZY,
]
