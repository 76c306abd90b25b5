"""Images in and out: decoding to float planes, bicubic resizing, encoding, atomic writes.

Pixels travel as float32 arrays H x W x C in [0, 1] with C = 1 (gray), 2 (gray + alpha),
3 (RGB) or 4 (RGBA), together with the source bit depth and metadata to carry to the output.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from .errors import ImageError

_UMASK = os.umask(0)
os.umask(_UMASK)


@dataclass(frozen=True)
class Picture:
    pixels: np.ndarray  # H x W x C float32 in [0, 1]
    bit_depth: int = 8  # 8 or 16: the precision the output is rounded to
    info: dict = field(default_factory=dict)  # icc_profile / exif bytes to keep in the output

    @property
    def size(self) -> tuple[int, int]:
        return self.pixels.shape[1], self.pixels.shape[0]

    @property
    def has_alpha(self) -> bool:
        return self.pixels.shape[2] in (2, 4)

    @property
    def is_gray(self) -> bool:
        return self.pixels.shape[2] in (1, 2)

    def with_pixels(self, pixels: np.ndarray) -> Picture:
        return replace(self, pixels=pixels)


# ------------------------------------------------------------------------------------ decoding


def picture_from_pil(image: Image.Image) -> Picture:
    """Convert any Pillow image to planes: palette/CMYK/YCbCr go to RGB(A), 16-bit stays 16-bit."""
    info = {k: image.info[k] for k in ("icc_profile", "exif") if image.info.get(k)}
    mode = image.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit grayscale (Pillow opens 16-bit gray PNG/TIFF as I;16 or I)
        arr = np.asarray(image, dtype=np.float64)
        return Picture((np.clip(arr, 0, 65535) / 65535.0).astype(np.float32)[..., None], 16, info)
    if mode == "F":
        return Picture(np.clip(np.asarray(image, dtype=np.float32), 0, 1)[..., None], 16, info)
    if mode == "CMYK":
        info.pop("icc_profile", None)  # a CMYK profile does not describe the RGB output
    if mode not in ("L", "LA", "RGB", "RGBA"):
        has_alpha = "A" in mode or "a" in mode or "transparency" in image.info
        gray = mode in ("1", "La")
        image = image.convert(("LA" if has_alpha else "L") if gray else ("RGBA" if has_alpha else "RGB"))
    arr = np.asarray(image, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[..., None]
    return Picture(arr.astype(np.float32) / 255.0, 8, info)


def read_image(path: str | Path, *, max_pixels: int | None = None) -> Picture:
    """Read an image file fully (EXIF orientation applied); ImageError names the file and reason."""
    path = Path(path)
    if max_pixels is not None:
        Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with Image.open(path) as image:
            image.load()
            image = ImageOps.exif_transpose(image)
            picture = picture_from_pil(image)
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ImageError(f"{path}: is a directory") from None
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{path}: too large ({exc}); raise --max-pixels to allow it") from None
    except Image.UnidentifiedImageError:
        reason = "empty file" if path.stat().st_size == 0 else "not a recognised image format"
        raise ImageError(f"{path}: cannot read image ({reason})") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{path}: cannot read image ({exc})") from None
    return picture


# ------------------------------------------------------------------------------------ resizing


def resize_planes(pixels: np.ndarray, size: tuple[int, int], *, exact_8bit: bool) -> np.ndarray:
    """Bicubic resize of every channel to size (W, H) with Pillow, as the reference inference does.

    With `exact_8bit` the channels are 8-bit values and are resized as 8-bit images, which gives
    Pillow's RGB result bit for bit; otherwise they are resized in float (mode F), unclipped.
    """
    out = []
    for c in range(pixels.shape[2]):
        if exact_8bit:
            plane = Image.fromarray(np.rint(pixels[..., c] * 255).astype(np.uint8), mode="L")
            out.append(np.asarray(plane.resize(size, Image.Resampling.BICUBIC), dtype=np.float32) / 255.0)
        else:
            plane = Image.fromarray(np.ascontiguousarray(pixels[..., c], dtype=np.float32), mode="F")
            out.append(np.asarray(plane.resize(size, Image.Resampling.BICUBIC), dtype=np.float32))
    return np.stack(out, axis=2)


# ------------------------------------------------------------------------------------ encoding


def picture_to_pil(picture: Picture) -> Image.Image:
    """Round the planes to the picture's bit depth (round, not truncate) and build a Pillow image."""
    px = np.clip(picture.pixels, 0, 1)
    channels = px.shape[2]
    if picture.bit_depth == 16 and channels == 1:
        return Image.fromarray(np.rint(px[..., 0] * 65535).astype(np.uint16), mode="I;16")
    if picture.bit_depth == 16:
        raise ImageError("16-bit colour images are written through write_image, not Pillow")
    arr = np.rint(px * 255).astype(np.uint8)
    mode = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[channels]
    return Image.fromarray(arr[..., 0] if channels == 1 else arr, mode=mode)


def write_image(picture: Picture, path: str | Path) -> None:
    """Write atomically: a temporary file in the target folder, renamed into place when complete."""
    path = Path(path)
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise ImageError(f"{path}: unknown image format {path.suffix!r}")
    image = picture_to_pil(picture)
    if fmt == "JPEG" and image.mode in ("LA", "RGBA"):
        raise ImageError(f"{path}: JPEG cannot store the alpha channel; write PNG, WebP or TIFF")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs get the usual permissions
        with os.fdopen(fd, "wb") as f:
            image.save(f, format=fmt, **_save_options(fmt, picture.info))
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise ImageError(f"{path}: cannot write ({exc})") from None
        raise


def _save_options(fmt: str, info: dict) -> dict:
    options = {k: v for k, v in info.items() if k in ("icc_profile", "exif")}
    if fmt == "JPEG":
        options.update(quality=95, subsampling=0)
    elif fmt == "WEBP":
        options.update(quality=95)
    return options
