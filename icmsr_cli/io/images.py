"""Images in and out: decoding to float planes, bicubic resizing, encoding, atomic writes.

Pixels travel as float32 arrays H x W x C in [0, 1] with C = 1 (gray), 2 (gray + alpha),
3 (RGB) or 4 (RGBA), together with the source bit depth and metadata to carry to the output.
"""

from __future__ import annotations

import io
import os
import stat
import struct
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image

from . import atomic, metadata
from .png import COLOUR_KEYS, encode_png, pixel_chunks
from .tiff import encode_tiff, samples_of, tags_of
from ..choices import DEFAULT_MAX_PIXELS
from ..errors import DiskFullError, ImageError


@dataclass(frozen=True)
class Picture:
    pixels: np.ndarray  # H x W x C float32 in [0, 1], or integers at bit_depth once quantised (see quantised)
    bit_depth: int = 8  # 8 or 16: the precision the output is rounded to
    info: dict = field(default_factory=dict)  # icc_profile / exif / xmp bytes, a PNG's text {key: value}, to keep in the output
    format: str | None = None  # the source file's Pillow format name, when read from a file
    frames: int = 1  # frames or pages in the source (animated PNG/WebP/GIF, multi-page TIFF); the first is read
    clipped: float = 0.0  # share of the source's values outside the range read (float or 32-bit samples), cut to it
    notes: tuple[str, ...] = ()  # what reading had to change that the user should hear of

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
    info = {**{k: image.info[k] for k in ("icc_profile", "exif") if image.info.get(k)}, **_resolution(image)}
    mode = image.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        # 16-bit grayscale (Pillow opens 16-bit gray PNG/TIFF as I;16 or I), 32-bit integer or float
        # samples: read as 0-65535, or 0-1 for floats; what lies outside is cut, and counted
        raw = np.asarray(image)
        if mode == "I" and image.format == "TIFF" and [int(np.atleast_1d(image.tag_v2.get(t, d))[0]) for t, d in ((258, 1), (339, 1))] == [32, 1]:
            # unsigned 32-bit samples, which Pillow holds as signed: 2^31 and up read as negative,
            # cut to black where the note said they were cut to white
            raw = raw.view(np.uint32)
        arr = raw.astype(np.float64) / (1.0 if mode == "F" else 65535.0)
        outside = float(np.count_nonzero((arr < 0) | (arr > 1))) / max(arr.size, 1)
        planes = [np.clip(arr, 0, 1).astype(np.float32)]
        if image.info.get("transparency") is not None:  # a PNG's tRNS: one gray value stands for transparent
            planes.append((raw != image.info["transparency"]).astype(np.float32))
        return Picture(np.stack(planes, axis=2), 16, info, clipped=outside)
    if mode == "CMYK":
        image = _cmyk_to_srgb(image, info.pop("icc_profile", None))  # the profile describes inks, not the RGB made from them
    if mode in ("L", "RGB") and image.info.get("transparency") is not None:
        image = image.convert("LA" if mode == "L" else "RGBA")  # a PNG's tRNS colour key as alpha
    elif mode not in ("L", "LA", "RGB", "RGBA"):
        # Pillow's alpha modes end in A or a (LA, La, PA, RGBa); the A of LAB is the a* axis
        has_alpha = mode.endswith(("A", "a")) or "transparency" in image.info
        gray = mode in ("1", "La")
        image = image.convert(("LA" if has_alpha else "L") if gray else ("RGBA" if has_alpha else "RGB"))
    arr = np.asarray(image, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[..., None]
    return Picture(arr.astype(np.float32) / 255.0, 8, info)


def _resolution(image: Image.Image) -> dict:
    """{"dpi": (x, y)} where the file states its pixels per inch (JPEG's JFIF or EXIF, PNG's pHYs,
    TIFF's and BMP's own fields), else nothing. Kept as it was: the enlargement prints larger at the
    same density, the way the EXIF block the outputs carry already says it."""
    dpi = image.info.get("dpi")
    try:
        x, y = (float(v) for v in dpi)
    except (TypeError, ValueError):
        return {}
    return {"dpi": (x, y)} if 0 < x < 1e6 and 0 < y < 1e6 else {}


def _cmyk_to_srgb(image: Image.Image, icc: bytes | None) -> Image.Image:
    """CMYK through its own ICC profile to sRGB, relative colorimetric: the colours the profile
    says its press prints, paper white to white. (Perceptual from a v2 press profile to LittleCMS's
    v4 sRGB rescales black and tinted it blue in a test.) Without a usable profile, Pillow's plain
    R = (1 - C)(1 - K) conversion, the only guess there is; its inks are far from any press's
    (pure cyan comes out 0,255,255 where a press prints about 0,160,220)."""
    try:
        from PIL import ImageCms  # Pillow's LittleCMS binding: in every wheel, optional in a source build
    except ImportError:
        icc = None
    if icc:
        try:
            return ImageCms.profileToProfile(image, ImageCms.ImageCmsProfile(io.BytesIO(icc)), ImageCms.createProfile("sRGB"),
                                             renderingIntent=1, outputMode="RGB")
        except (ImageCms.PyCMSError, OSError, ValueError):  # a damaged profile, or one not for CMYK: the plain guess
            pass
    return image.convert("RGB")


# what folders yield: the formats icmsr writes (.jfif: how browsers on Windows save JPEGs), then
# photo formats it only reads (their outputs default to PNG; an iPhone's HEIC needs pillow-heif)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".jfif", ".jpe", ".webp", ".tif", ".tiff", ".bmp", ".gif", ".avif", ".heic", ".heif")
#: EXIF orientation -> the Pillow transpose that undoes it (ImageOps.exif_transpose's table)
_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
              5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}
_ORIENT = {  # EXIF orientation -> numpy ops that undo it (as _TRANSPOSE does)
    2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
    5: lambda a: a.swapaxes(0, 1), 6: lambda a: np.rot90(a, -1), 7: lambda a: a[::-1, ::-1].swapaxes(0, 1), 8: lambda a: np.rot90(a, 1),
}


def read_image(source: str | Path | bytes, *, name: str | None = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> Picture:
    """Decode an image file (or its bytes) fully, EXIF orientation applied.

    16-bit colour or gray + alpha PNG and 16-bit colour TIFF, which Pillow would cut to 8 bits
    (a 16-bit gray + alpha PNG even to RGBA), are decoded with OpenCV; Pillow still supplies
    the metadata. Every failure is an ImageError naming the file and the reason.
    """
    name = name or str(source)
    limit = byte_limit(max_pixels)
    try:
        if isinstance(source, bytes):
            data = source
        elif stat.S_ISCHR(mode := (found := os.stat(source)).st_mode) or stat.S_ISBLK(mode):
            # read whole, /dev/zero or a disk (/dev/sda) filled the memory until the system killed the run
            raise ImageError(f"{name}: is a device, not an image file")
        elif stat.S_ISFIFO(mode):  # a pipe (bash's <(curl ...)): read as it comes, up to the limit
            fd = os.open(source, os.O_RDONLY)
            try:
                data = read_upto(fd, limit)
            finally:
                os.close(fd)
        elif found.st_size > limit:  # refused unread: a 20 GB file was read whole first
            raise _over_limit(name, limit, max_pixels)
        else:
            data = Path(source).read_bytes()
    except FileNotFoundError:
        raise ImageError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise ImageError(f"{name}: is a directory") from None
    except OSError as exc:
        raise ImageError(f"{name}: cannot read ({exc.strerror})") from None
    if not data:
        raise ImageError(f"{name}: cannot read image (empty file)")
    if len(data) > limit:
        raise _over_limit(name, limit, max_pixels)
    if Path(name).suffix.lower() in _CAMERA_RAW:
        raise ImageError(f"{name}: {_RAW_ADVICE}")
    _register_heif_reader(data, name)
    try:
        # the limit is checked here, from the header, so a bomb is refused before any decoding
        previous_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        with Image.open(io.BytesIO(data)) as image:
            w, h = image.size
            if w * h > max_pixels:
                raise ImageError(f"{name}: {w}x{h} is {w * h:,} pixels, over the limit of {max_pixels:,}; raise --max-pixels to allow it")
            if image.format == "TIFF" and (_DNG_VERSION in image.tag_v2 or int(image.tag_v2.get(_NEW_SUBFILE_TYPE, 0)) & 1):
                # the first image of a raw file (DNG, NEF, ARW) is its small preview: upscaled in silence
                raise ImageError(f"{name}: its first image is a reduced-size preview ({w}x{h}), as in camera raw files; {_RAW_ADVICE}")
            frames = _frame_count(data)
            if image.format == "TIFF" and image.tag_v2.get(_PLANAR) == 2 and (picture := _read_tiff_samples(data, name, max_pixels)):
                # stored plane by plane: Pillow cuts 16 bits to 8 and reads 8-bit gray + alpha with its alpha all 0
                # (a transparent picture), or fails to unpack it, and OpenCV misplaces the planes, all without a word
                return replace(picture, frames=frames)
            damaged = _exif_read(image)
            turned = image.getexif().get(0x0112, 1) in _ORIENT  # from EXIF, or XMP where EXIF says nothing
            if image.format == "TIFF":  # its orientation is a layout tag, and its camera tags are its own
                exif, damaged = _tiff_exif(image, damaged)
            picture = _read_16bit_color(image, data, name) if _is_16bit_color(image, data) else None
            if picture is None:
                image.load()
                _widen_png_gray_key(image, data)
                picture = replace(picture_from_pil(_upright(image)), notes=_narrowed(image, data))
                if image.format == "BMP" and image.mode == "RGB" and (alpha := _bmp_alpha(data)) is not None:
                    picture = picture.with_pixels(np.concatenate([picture.pixels, alpha[..., None] / np.float32(255)], axis=2))
                if image.format == "TIFF" and image.mode.startswith("I;16") and image.tag_v2.get(262) == 0:
                    # WhiteIsZero: Pillow inverts it at 8 bits but hands 16-bit samples over as stored
                    picture = picture.with_pixels(1 - picture.pixels)
            picture = replace(picture, notes=(*picture.notes, *damaged))
            text = metadata.png_text(image)
            xmp = metadata.xmp(image, text)
            if image.format != "TIFF":  # the block as it came: turned upright in place, so a MakerNote's offsets hold
                block = image.info.get("exif") or (metadata.raw_profile_exif(text) if not damaged else None)
                exif = {"exif": metadata.exif_upright(block) if turned else block} if block else {}
            xmp = metadata.xmp_upright(xmp) if xmp else None  # the pixels are upright now, whatever it said
            colour = {k: image.info[k] for k in COLOUR_KEYS if image.format == "PNG" and image.info.get(k) is not None}
            info = {**{k: v for k, v in picture.info.items() if k != "exif"}, **exif, **({"text": text} if text else {}), **({"xmp": xmp} if xmp else {}),
                    **colour,
                    **({"webp_lossless": True} if image.format == "WEBP" and _webp_lossless(data) else {})}
            # a multi-picture JPEG (Fujifilm, Nikon and Sony cameras, HDR gain maps) is a JPEG to write
            # and to name: as "MPO" its -o - output was a PNG and its XMP was left out
            fmt = "JPEG" if image.format == "MPO" else image.format
            return replace(picture, info=info, format=fmt, frames=frames)
    except ImageError:
        raise
    except Image.UnidentifiedImageError:
        if picture := _read_tiff_samples(data, name, max_pixels) or _read_float_color_tiff(data, name, max_pixels):
            return picture
        if _brands(data) & _AVIF_BRANDS:
            raise ImageError(f"{name}: this Pillow {Image.__version__} cannot read AVIF; Pillow 11.3 or later can") from None
        if layout := _unreadable_tiff(data):
            raise ImageError(f"{name}: cannot read this kind of TIFF ({layout}); "
                             "icmsr reads 8- and 16-bit gray, gray + alpha, RGB and RGBA, CMYK, and 32-bit float RGB") from None
        raise ImageError(f"{name}: cannot read image (not a recognised image format)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        # a TIFF Pillow opens but cannot unpack (8-bit planes with premultiplied alpha, gray + alpha
        # or two extras: "unknown raw mode")
        if picture := _read_tiff_samples(data, name, max_pixels):
            return picture
        # of a damaged strip Pillow's libtiff reader says only "decoder error -2" (Pillow 10: "-2")
        code = str(exc).removeprefix("decoder error ")
        why = "damaged or truncated data" if code.startswith("-") and code[1:].isdigit() else exc
        raise ImageError(f"{name}: cannot read image ({why})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = previous_limit


def _widen_png_gray_key(image: Image.Image, data: bytes) -> None:
    """A 2- or 4-bit gray PNG's transparent value (tRNS) at the 8 bits Pillow widens its samples
    to: Pillow compares the key, at the file's depth, with the widened samples, so nothing matched
    and every transparent pixel came out opaque (optipng and pngcrush make such files of gray
    icons). A key already widened (above the file's largest value) is left as it is."""
    if image.format != "PNG":
        return
    bits, key = data[24], image.info.get("transparency")  # IHDR: bit depth, then colour type (0: gray)
    if data[25] == 0 and bits in (2, 4) and isinstance(key, int) and key < 2**bits:
        image.info["transparency"] = key * (255 // (2**bits - 1))


def _bmp_alpha(data: bytes) -> np.ndarray | None:
    """The fourth byte of a 32-bit BMP stored without bit masks (BI_RGB), as alpha. The format
    calls that byte unused and Pillow reads such files as RGB, but Pillow's own writer (and
    others) store RGBA so, and browsers show it as alpha wherever it is not zero throughout:
    every transparent pixel of such a logo came out opaque. None where it is zero throughout, or
    the file is no such BMP."""
    if len(data) < 54 or data[:2] != b"BM" or int.from_bytes(data[14:18], "little") < 40:  # BITMAPINFOHEADER or later
        return None
    width, height = struct.unpack_from("<ii", data, 18)
    bits, compression = struct.unpack_from("<HI", data, 28)
    offset, rows = int.from_bytes(data[10:14], "little"), abs(height)
    if bits != 32 or compression != 0 or width <= 0 or offset + width * rows * 4 > len(data):
        return None
    alpha = np.frombuffer(data, np.uint8, width * rows * 4, offset).reshape(rows, width, 4)[..., 3]
    if not alpha.any():
        return None
    return alpha[::-1] if height > 0 else alpha  # rows run bottom-up unless the height is negative


def _webp_lossless(data: bytes) -> bool:
    """Whether a WebP file's (first) image is coded lossless (a VP8L chunk, not VP8): a lossless
    source is written back lossless, not at quality 95. RIFF chunks: fourcc, little-endian size,
    payload padded to even; an animation's first frame (ANMF) holds its chunks after 16 bytes."""
    at, end = 12, len(data)
    while at + 8 <= end:
        kind, size = data[at : at + 4], int.from_bytes(data[at + 4 : at + 8], "little")
        if kind in (b"VP8L", b"VP8 "):
            return kind == b"VP8L"
        if kind == b"ANMF":
            at, end = at + 8 + 16, min(end, at + 8 + size)
            continue
        at += 8 + size + (size & 1)
    return False


_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"}
_AVIF_BRANDS = {b"avif", b"avis"}


def _brands(data: bytes) -> set[bytes]:
    """The brands an ISO base media file (HEIF, AVIF) declares in its leading ftyp box: the major
    one and the compatible ones (the 4 bytes between are a version); empty for other files."""
    if data[4:8] != b"ftyp":
        return set()
    box = data[8 : min(int.from_bytes(data[:4], "big"), 512)]
    return {box[:4], *(box[i : i + 4] for i in range(8, len(box) - 3, 4))}


def _register_heif_reader(data: bytes, name: str) -> None:
    """HEIC/HEIF (an iPhone's photos) is read through pillow-heif where the user has installed it
    (its wheels carry libheif, LGPL, and x265, GPL, so it is never a dependency); where not, the
    error says what to do instead of "not a recognised image format". AVIF, also HEIF, is Pillow's own."""
    brands = _brands(data)
    if not brands & _HEIF_BRANDS or brands & _AVIF_BRANDS:
        return
    try:
        import pillow_heif
    except ImportError:
        raise ImageError(f"{name}: HEIC/HEIF photos need the pillow-heif package (pip install pillow-heif), "
                         "or convert them to JPEG or PNG first") from None
    pillow_heif.register_heif_opener()


_CV2_MAX_WIDTH = 1 << 20  # OpenCV's CV_IO_MAX_IMAGE_WIDTH


def _cv2_decode(data: bytes) -> np.ndarray | None:
    """OpenCV's decode of `data` as stored; None where it cannot, including what it refuses by
    assertion rather than by returning None (a width over its 2^20-pixel limit raised cv2.error)."""
    import cv2

    try:
        return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error:
        return None


def _read_float_color_tiff(data: bytes, name: str, max_pixels: int) -> Picture | None:
    """A colour TIFF of float samples (an HDR merge, scientific data: IEEE float, or LogLuv as
    OpenCV before 4.9 wrote float images), which Pillow cannot open, decoded by OpenCV: values
    outside 0-1 are cut, and counted, as for float gray; the output is 16-bit. The size limit is
    checked from the tags first. None when it is no such file (OpenCV gives no float colour)."""
    tags = tags_of(data)
    if not _within_limit(tags, name, max_pixels):
        return None
    arr = _cv2_decode(data)
    if arr is None or arr.dtype.kind != "f" or arr.ndim != 3 or arr.shape[2] not in (3, 4):
        return None
    arr = arr[..., [2, 1, 0, 3][: arr.shape[2]]].astype(np.float32)  # BGR(A) -> RGB(A)
    outside = float(np.count_nonzero(~((arr >= 0) & (arr <= 1)))) / max(arr.size, 1)  # NaN counts as outside
    info = {"icc_profile": tags[34675]} if tags.get(34675) else {}
    return Picture(np.ascontiguousarray(np.clip(np.nan_to_num(arr), 0, 1)), 16, info, format="TIFF", clipped=outside)


def byte_limit(max_pixels: int) -> int:
    """The most bytes an input may hold: 16 a pixel within the pixel limit (32-bit float RGBA stored
    raw, the widest sample any reader here takes) and 64 MiB for metadata, layers and later pages.
    Past it a file or stream is no image the run would take; a pipe from /dev/zero, or an endless
    download on standard input, was read until the system killed the run."""
    return 16 * max_pixels + (64 << 20)


def read_upto(fd: int, limit: int) -> bytes:
    """A stream's bytes to its end, or its first limit + 1 where it goes on (read_image refuses those)."""
    chunks, size = [], 0
    while size <= limit and (chunk := os.read(fd, min(1 << 20, limit + 1 - size))):
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _over_limit(name: str, limit: int, max_pixels: int) -> ImageError:
    return ImageError(f"{name}: over {limit:,} bytes, more than any image within the pixel limit ({max_pixels:,}) needs; "
                      "raise --max-pixels to allow it")


def _upright(image: Image.Image) -> Image.Image:
    """The image turned as its orientation (EXIF's, else XMP's) says. ImageOps.exif_transpose turns
    it the same way and then re-serialises the EXIF block, which failed on a damaged one (a WebP
    whose EXIF Pillow had read with a warning: struct.error, the file lost); the block goes out as
    it came instead (metadata.exif_upright)."""
    method = _TRANSPOSE.get(image.getexif().get(0x0112, 1))
    return image.transpose(method) if method is not None else image


def _frame_count(data: bytes) -> int:
    """Frames or pages of a file, counted on an Image of its own: counting parses every page's
    directory, and a damaged later page (Pillow: TypeError "Missing dimensions") failed the whole
    file and left the open image on that page. The first page is read all the same."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return getattr(image, "n_frames", 1)
    except Exception:  # noqa: BLE001 - only a count for a note: whatever a damaged page raises, it is one page
        return 1


def _within_limit(tags: dict, name: str, max_pixels: int) -> bool:
    """Whether a TIFF's directory gives its size, refusing one over the limit before any decoding."""
    try:
        w, h = int(tags[256]), int(tags[257])
    except (KeyError, ValueError, TypeError):
        return False
    if w * h > max_pixels:
        raise ImageError(f"{name}: {w}x{h} is {w * h:,} pixels, over the limit of {max_pixels:,}; raise --max-pixels to allow it")
    return True


def _read_tiff_samples(data: bytes, name: str, max_pixels: int) -> Picture | None:
    """An 8- or 16-bit gray or colour TIFF stored plane by plane, or with more samples a pixel than
    Pillow and OpenCV take (16-bit gray + alpha, as GIMP and Photoshop save 16-bit gray with
    transparency; colour with two extra channels), read through tiff.samples_of; its extras as at
    every other depth (_extra_samples), its orientation applied, its ICC profile, camera tags, XMP
    and dpi kept. None for other files."""
    tags = tags_of(data)
    photometric = int(tags.get(262, -1))
    colour = {0: 1, 1: 1, 2: 3}.get(photometric)
    planar = tags.get(_PLANAR) == 2
    if colour is None or (int(tags.get(277, 1)) <= colour and not planar) or not _within_limit(tags, name, max_pixels):
        return None
    arr = samples_of(tags, data)
    if arr is None:
        return None
    bits = arr.dtype.itemsize * 8
    pixels = arr.astype(np.float32) / np.float32(2**bits - 1)
    if photometric == 0:  # WhiteIsZero
        pixels[..., 0] = 1 - pixels[..., 0]
    pixels = _extra_samples(pixels, tags.get(_EXTRA_SAMPLES), colour)
    if int(tags.get(274, 1)) in _ORIENT:
        pixels = np.ascontiguousarray(_ORIENT[int(tags[274])](pixels))
    camera, notes = Image.Exif(), ()
    try:
        camera.load(data)  # a TIFF file is laid out as an EXIF block is: its directories, sub-directories and all
        exif = metadata.tiff_exif(camera)
    except _EXIF_ERRORS:
        exif, notes = None, (_DAMAGED_EXIF,)
    xmp = metadata.packet_bytes(tags.get(metadata.XMP_TIFF_TAG))
    info = {**({"icc_profile": tags[34675]} if tags.get(34675) else {}), **({"exif": exif} if exif else {}),
            **({"xmp": metadata.xmp_upright(xmp)} if xmp else {}), **_tiff_dpi(tags)}
    return Picture(pixels, bits, info, format="TIFF", notes=notes)


def _tiff_dpi(tags: dict) -> dict:
    """{"dpi": (x, y)} from a TIFF's resolution tags (unit 2 inch, 3 centimetre), as Pillow gives it."""
    try:
        x, y = float(tags[282]), float(tags[283])
    except (KeyError, ValueError, TypeError, ZeroDivisionError):
        return {}
    per_inch = {2: 1.0, 3: 2.54}.get(int(tags.get(296, 2)))
    return {"dpi": (x * per_inch, y * per_inch)} if per_inch and 0 < x < 1e6 and 0 < y < 1e6 else {}


_SAMPLE_FORMATS = {1: "unsigned", 2: "signed", 3: "float"}
_PHOTOMETRICS = {0: "gray", 1: "gray", 2: "RGB", 3: "palette", 4: "mask", 5: "CMYK", 6: "YCbCr", 8: "CIELab"}


def _unreadable_tiff(data: bytes) -> str | None:
    """What a TIFF that no reader here takes holds ("16-bit unsigned gray, 2 samples per pixel"):
    "not a recognised image format" sent users looking for a damaged file."""
    tags = tags_of(data)
    if 258 not in tags:
        return None
    bits = np.atleast_1d(tags[258])
    kind = _SAMPLE_FORMATS.get(int(np.atleast_1d(tags.get(339, 1))[0]), "other")
    colour = _PHOTOMETRICS.get(int(tags.get(262, -1)), "unknown colour")
    layout = ", stored plane by plane" if tags.get(284) == 2 else ""
    return f"{int(bits[0])}-bit {kind} {colour}, {int(tags.get(277, 1))} samples per pixel{layout}"


def _is_16bit_color(image: Image.Image, data: bytes) -> bool:
    if image.format == "PNG":  # IHDR: bit depth at byte 24, colour type (2 RGB, 4 GA, 6 RGBA) at 25
        return data[24] == 16 and data[25] in (2, 4, 6)
    if image.format == "TIFF":  # not CMYK (photometric 5): OpenCV's libtiff cannot read it at 16 bits
        bits = image.tag_v2.get(258)
        return isinstance(bits, tuple) and len(bits) >= 3 and bits[0] == 16 and image.mode != "CMYK"
    return False


def _narrowed(image: Image.Image, data: bytes) -> tuple[str, ...]:
    """A note when Pillow, the one reader here that decodes it, reads 16 bits at 8: a 16-bit CMYK
    TIFF, or 16-bit colour that OpenCV could not decode (_read_16bit_color; Pillow's libtiff reads
    zstd and LZMA TIFFs, which were refused)."""
    bits = image.tag_v2.get(258) if image.format == "TIFF" else None
    if image.mode == "CMYK" and isinstance(bits, tuple) and bits[0] == 16:
        return ("16-bit CMYK is read at 8 bits per channel, so the output is 8-bit",)
    if _is_16bit_color(image, data) and (why := _beyond_opencv(image)):
        return (f"16-bit colour with {why} is read at 8 bits per channel, so the output is 8-bit",)
    return ()


#: TIFF compressions Pillow's libtiff decodes and OpenCV's does not (GDAL writes both)
_BEYOND_OPENCV = {34925: "LZMA", 50000: "zstd"}


def _beyond_opencv(image: Image.Image) -> str | None:
    """Why OpenCV, the 16-bit colour reader here, cannot read a file Pillow reads (at 8 bits), if so."""
    if image.width > _CV2_MAX_WIDTH:
        return f"rows over OpenCV's {_CV2_MAX_WIDTH:,} pixels"
    if image.format == "TIFF" and (kind := _BEYOND_OPENCV.get(image.tag_v2.get(259))):
        return f"{kind} compression, which OpenCV does not decode,"
    return None


#: camera raw files: sensor data to develop, not pictures; those built on TIFF open as their preview
_CAMERA_RAW = (".dng", ".nef", ".nrw", ".cr2", ".cr3", ".crw", ".arw", ".srf", ".sr2", ".orf", ".rw2", ".raf", ".pef",
               ".srw", ".rwl", ".3fr", ".iiq", ".erf", ".kdc", ".mrw", ".x3f")
_RAW_ADVICE = ("icmsr reads developed pictures, not camera raw data: export it as a 16-bit TIFF or PNG first "
               "(darktable, RawTherapee, Lightroom)")
_DNG_VERSION, _NEW_SUBFILE_TYPE = 50706, 254


#: what Pillow raises on a damaged EXIF block or TIFF directory, one that does not parse or one it
#: cannot write back (AttributeError: a text tag stored as a number, which its writer tries to
#: .encode()), and the note that leaves it out
_EXIF_ERRORS = (SyntaxError, ValueError, TypeError, KeyError, IndexError, AttributeError, OSError, struct.error)
_DAMAGED_EXIF = "its EXIF block is damaged; it is left out"


def _exif_read(image: Image.Image) -> tuple[str, ...]:
    """Reads (and caches) the EXIF while the file is open (Pillow 10.0 lost a multi-page TIFF's
    after load()). A damaged block is left out, with a note: Pillow's parse of it failed the whole
    PNG or WebP ("cannot read image (not a TIFF file ...)"), whose pixels are fine. Pillow's JPEG
    reader hides such a block instead (an empty getexif()) and passes it on, and our TIFF writer's
    parse of it failed after the model had run: it is parsed here on its own."""
    if image.format == "PNG":
        # its eXIf chunk may follow the pixels, so getexif() loads them: an error there (a chunk
        # cut short after the pixels) is the file's, not the EXIF's; taken for the EXIF's, it left
        # the text chunks unread and Pillow's text property failed on an assert
        image.load()
    try:
        image.getexif()
        if block := image.info.get("exif"):
            Image.Exif().load(block)
        return ()
    except _EXIF_ERRORS:
        image.info.pop("exif", None)
        image.getexif()  # Pillow marks the block read before parsing it: an empty one from here on
        return (_DAMAGED_EXIF,)


def _tiff_exif(image: Image.Image, notes: tuple[str, ...]) -> tuple[dict, tuple[str, ...]]:
    """{"exif": block} of a TIFF's photo tags (metadata.tiff_exif), read while the file is open;
    a directory that does not parse or serialise is left out, with a note."""
    if notes:  # _exif_read found the main directory damaged
        return {}, notes
    try:
        block = metadata.tiff_exif(image.getexif())
    except _EXIF_ERRORS:
        return {}, (_DAMAGED_EXIF,)
    return ({"exif": block} if block else {}), ()


def _read_16bit_color(image: Image.Image, data: bytes, name: str) -> Picture | None:
    """16-bit colour PNG or TIFF at 16 bits, through OpenCV; None where OpenCV cannot read what
    Pillow can (then Pillow reads it at 8 bits, with a note: _narrowed). A damaged file stays an
    error: Pillow's libtiff would print its own lines before failing too."""
    pixels_only = pixel_chunks(data) if image.format == "PNG" else data
    arr = _cv2_decode(pixels_only)
    if arr is None or arr.dtype != np.uint16 or arr.ndim != 3:
        if _beyond_opencv(image):
            return None
        raise ImageError(f"{name}: cannot decode this 16-bit image")
    if image.format == "PNG" and data[25] == 4:  # OpenCV expands gray + alpha to BGRA, gray thrice
        arr = arr[..., [0, 3]]
    else:
        arr = arr[..., [2, 1, 0, 3][: arr.shape[2]]]  # BGR(A) -> RGB(A)
    orientation = image.getexif().get(0x0112, 1)
    if orientation in _ORIENT:
        arr = _ORIENT[orientation](arr)
    info = {**{k: image.info[k] for k in ("icc_profile",) if image.info.get(k)}, **_resolution(image)}  # EXIF: read_image's
    pixels = np.ascontiguousarray(arr).astype(np.float32) / 65535.0
    if image.format == "TIFF":
        pixels = _extra_samples(pixels, image.tag_v2.get(_EXTRA_SAMPLES))
    return Picture(pixels, 16, info)


_EXTRA_SAMPLES, _PLANAR = 338, 284
_UNSPECIFIED, _ASSOCIATED = 0, 1


def _extra_samples(pixels: np.ndarray, kinds, colour: int = 3) -> np.ndarray:
    """A 16-bit TIFF's samples after its `colour` ones, as Pillow treats them at 8 bits: an extra
    of unspecified meaning (Photoshop's saved selections and masks) is not transparency and is
    dropped; premultiplied (associated) alpha is divided out; extras after the first are dropped.
    OpenCV took either as plain alpha, so a mask made the picture transparent. Undeclared extras
    are alpha, as Pillow reads them."""
    if pixels.shape[2] <= colour:
        return pixels
    kind = int(np.atleast_1d(kinds)[0]) if kinds is not None and np.size(kinds) else None
    if kind == _UNSPECIFIED:
        return np.ascontiguousarray(pixels[..., :colour])
    pixels = np.ascontiguousarray(pixels[..., : colour + 1])
    if kind == _ASSOCIATED:
        alpha = pixels[..., colour:]
        with np.errstate(divide="ignore", invalid="ignore"):
            pixels[..., :colour] = np.where(alpha > 0, np.clip(pixels[..., :colour] / alpha, 0, 1), 0)
    return pixels


# ------------------------------------------------------------------------------------ resizing


def resize_planes(pixels: np.ndarray, size: tuple[int, int], *, exact_8bit: bool, as_bytes: bool = False) -> np.ndarray:
    """Bicubic resize of every channel to size (W, H) with Pillow, as the reference inference does.
    (Pillow picks the mode from the dtype: uint8 -> L, float32 -> F.)

    With `exact_8bit` the channels are 8-bit values and are resized as 8-bit images, which gives
    Pillow's RGB result bit for bit; otherwise they are resized in float (mode F), unclipped.
    `as_bytes` (with `exact_8bit`) returns those 8-bit values as uint8 rather than float32 k / 255:
    the model's input then crosses to the device as a quarter of the bytes and becomes float there
    (graph.unit_float), and the host skips a conversion that took longer than the resize.
    """
    if exact_8bit and pixels.shape[2] == 3:  # one RGB pass: the same bytes as three L passes, in 60% of the time
        rgb = Image.fromarray(np.rint(pixels * 255).astype(np.uint8))
        out = np.array(rgb.resize(size, Image.Resampling.BICUBIC))  # writable: torch warns on Pillow's read-only view
    elif exact_8bit:
        planes = [Image.fromarray(np.rint(pixels[..., c] * 255).astype(np.uint8)) for c in range(pixels.shape[2])]
        out = np.stack([np.asarray(plane.resize(size, Image.Resampling.BICUBIC)) for plane in planes], axis=2)
    else:
        planes = [Image.fromarray(np.ascontiguousarray(pixels[..., c], dtype=np.float32)) for c in range(pixels.shape[2])]
        return np.stack([np.asarray(plane.resize(size, Image.Resampling.BICUBIC), dtype=np.float32) for plane in planes], axis=2)
    return out if as_bytes else out.astype(np.float32) / np.float32(255)


# ------------------------------------------------------------------------------------ encoding


def quantise(pixels: np.ndarray, bit_depth: int) -> np.ndarray:
    """Float planes in [0, 1] to integers at `bit_depth`: clamp, scale, round half to even (the
    reference truncates; rounding is closer). upscale.quantise_on_device is the same on torch."""
    if pixels.dtype.kind in "ui":
        return pixels
    scale, dtype = (65535, np.uint16) if bit_depth == 16 else (255, np.uint8)
    return np.rint(np.clip(pixels, 0, 1) * scale).astype(dtype)


def unquantised(pixels: np.ndarray) -> np.ndarray:
    """quantise undone for the model path: uint8 or uint16 samples (an array from OpenCV or numpy,
    or a result upscaled again) as float planes in [0, 1]; floats cut to [0, 1]. A uint8 array was
    taken for floats and clipped, so it came out nearly black and white. Checks the layout too.

    Floats a little past [0, 1] (a resize's overshoot, a colour conversion's rounding) wrapped
    around in the 8-bit resize: 1.002 became 0, white became black. NaN or infinity is refused:
    no value stands for it."""
    if pixels.ndim != 3 or not 1 <= pixels.shape[2] <= 4:
        raise ValueError(f"a Picture's pixels are H x W x C with C = 1 (gray), 2 (gray + alpha), 3 (RGB) or 4 (RGBA), got shape {pixels.shape}")
    if pixels.dtype.kind == "f":
        if not pixels.size:
            return pixels
        lo, hi = pixels.min(), pixels.max()  # NaN in the array makes them NaN
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise ValueError(f"a Picture's float pixels must be finite; {np.count_nonzero(~np.isfinite(pixels)):,} are NaN or infinite")
        return np.clip(pixels, 0, 1) if lo < 0 or hi > 1 else pixels
    if pixels.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"a Picture's pixels are floats in [0, 1], or uint8 or uint16 samples, got {pixels.dtype}")
    return pixels.astype(np.float32) / (255.0 if pixels.dtype == np.uint8 else 65535.0)


def _at_depth(picture: Picture, bit_depth: int) -> np.ndarray:
    """The picture's integers at `bit_depth` (only float pictures change depth)."""
    if picture.pixels.dtype.kind in "ui" and picture.pixels.dtype.itemsize * 8 != bit_depth:
        raise ValueError(f"a picture quantised to {picture.pixels.dtype} cannot be written at {bit_depth} bits")
    return quantise(picture.pixels, bit_depth)


def picture_to_pil(picture: Picture) -> Image.Image:
    """The picture at 8 bits, or 16 for gray, as a Pillow image."""
    channels = picture.pixels.shape[2]
    if picture.bit_depth == 16 and channels == 1:
        return Image.fromarray(_at_depth(picture, 16)[..., 0])  # I;16
    arr = _at_depth(picture, 8)
    return Image.fromarray(arr[..., 0] if channels == 1 else arr)  # L, LA, RGB or RGBA by shape


#: the Pillow formats icmsr writes; an input in any other is written as PNG
WRITABLE_FORMATS = ("PNG", "JPEG", "WEBP", "TIFF", "BMP")


def format_for(path: str | Path) -> str:
    """Pillow format name from a file name's suffix."""
    fmt = Image.registered_extensions().get(Path(path).suffix.lower())
    if fmt not in WRITABLE_FORMATS:
        raise ImageError(f"{path}: cannot write {Path(path).suffix or 'files without a suffix'}; use .png, .jpg, .webp, .tiff or .bmp")
    return fmt


def fit_to_format(picture: Picture, fmt: str, name: str = "output") -> tuple[Picture, list[str]]:
    """What `fmt` can hold of `picture`, with a note for each conversion. Losing the alpha channel
    is refused (ImageError) rather than done: callers check inputs with this before any model work."""
    notes = []
    if fmt == "JPEG" and picture.has_alpha:
        if not _opaque(picture):
            raise ImageError(f"{name}: has an alpha channel, which JPEG cannot store; use --format png, webp or tiff")
        # opaque everywhere (screenshots, many editors' PNG exports): the alpha holds nothing to lose
        picture = picture.with_pixels(picture.pixels[..., :-1])
    if picture.bit_depth == 16 and fmt not in ("PNG", "TIFF"):
        picture = replace(picture, bit_depth=8)
        notes.append(f"{fmt} holds 8 bits per channel: 16-bit images are written with 8")
    if fmt == "BMP" and picture.pixels.shape[2] == 2:  # Pillow's BMP writer has no gray + alpha mode
        picture = _gray_alpha_as_rgba(picture)
        notes.append("BMP cannot store gray with alpha: such images are written as RGBA")
    if fmt == "WEBP" and picture.is_gray:  # WebP has no gray: Pillow's writer makes it RGB(A)
        picture = _without_gray_profile(picture)
    if fmt == "TIFF" and picture.bit_depth == 16 and picture.pixels.shape[2] == 2:  # neither Pillow nor OpenCV reads it back
        picture = _gray_alpha_as_rgba(picture)
        notes.append("16-bit gray with alpha is written to TIFF as 16-bit RGBA, which readers take")
    if fmt == "JPEG":  # one marker segment each: Pillow refused a longer EXIF after the model had run
        for key, what, room in (("exif", "EXIF", _JPEG_SEGMENT), ("xmp", "XMP", _JPEG_SEGMENT - len(metadata.XMP_JPEG_PREFIX))):
            if len(picture.info.get(key) or b"") > room:
                notes.append(f"{name}: its {what} ({round(len(picture.info[key]) / 1024)} KB) is more than a JPEG holds "
                             f"({round(room / 1024)} KB); it is left out (png, webp and tiff keep it)")
                picture = replace(picture, info={k: v for k, v in picture.info.items() if k != key})
    gamma = picture.info.get("gamma")
    described = picture.info.get("srgb") is not None or picture.info.get("icc_profile")  # either overrides a gAMA
    if fmt != "PNG" and gamma and abs(gamma - 1 / 2.2) > 0.01 and not described:
        # other formats have no gAMA; viewers then take the samples as sRGB's (about 1/2.2)
        notes.append(f"{name}: {fmt} has no place for its PNG gamma ({gamma:g}); left out, so it shows as sRGB would (png keeps it)")
    if fmt != "PNG" and picture.info.get("text"):  # prompts and workflows of Stable Diffusion front ends live there
        notes.append(f"{fmt} has no place for a PNG's text chunks (captions, prompts, workflows); left out (png keeps them)")
    if fmt == "BMP":  # no place for any of them: said, as every other format keeps them
        lost = [what for key, what in (("icc_profile", "colour profile"), ("exif", "EXIF"), ("xmp", "XMP")) if picture.info.get(key)]
        if lost:
            notes.append(f"{name}: BMP cannot hold its {' or '.join(lost)}; left out"
                         f"{' (its colours then show as sRGB)' if 'colour profile' in lost else ''}; png, jpg, webp and tiff keep them")
    return picture, notes


_JPEG_SEGMENT = 65533  # an APP segment's bytes after its length field (Pillow's MAX_BYTES_IN_MARKER)


#: the largest side each format's encoder takes (libwebp's WEBP_MAX_DIMENSION, libjpeg's JPEG_MAX_DIMENSION)
_MAX_SIDE = {"WEBP": 16383, "JPEG": 65500}


def check_output_size(fmt: str, size: tuple[int, int], channels: int, name: str = "output") -> None:
    """Refuse, before any model work, an output its format cannot hold: the encoder failed on it
    after the whole upscale had run (minutes on a GPU, hours on a CPU)."""
    w, h = size
    limit = _MAX_SIDE.get(fmt)
    if limit and max(w, h) > limit:
        raise ImageError(f"{name}: a {w}x{h} output is too large for {fmt} (at most {limit} px a side); "
                         "use --format png or tiff, or a smaller --scale")
    bits = {1: 8, 2: 32, 3: 24, 4: 32}[channels]  # what BMP writes: gray, gray + alpha as RGBA, RGB, RGBA
    if fmt == "BMP" and (w * bits + 31) // 32 * 4 * h + 138 > 2**32 - 1:  # its sizes are 32-bit fields
        raise ImageError(f"{name}: a {w}x{h} output is too large for BMP (4 GB at most); use --format png or tiff")


def _opaque(picture: Picture) -> bool:
    """Whether every alpha sample is written as full opacity at the picture's bit depth."""
    alpha = picture.pixels[..., -1]
    if alpha.dtype.kind in "ui":  # quantised: integers at the bit depth
        return bool((alpha == 2**picture.bit_depth - 1).all())
    return bool((alpha >= 1 - 0.5 / (2**picture.bit_depth - 1)).all())


def _gray_alpha_as_rgba(picture: Picture) -> Picture:
    gray, alpha = picture.pixels[..., :1], picture.pixels[..., 1:]
    return _without_gray_profile(picture.with_pixels(np.concatenate([gray, gray, gray, alpha], axis=2)))


def _without_gray_profile(picture: Picture) -> Picture:
    """The picture without a gray colour profile, for a file that stores gray as RGB: the profile
    cannot describe RGB samples, and readers reject it there or ignore it (Photoshop: "the
    embedded profile does not match")."""
    if (picture.info.get("icc_profile") or b"")[16:20] != b"GRAY":  # the profile header's colour space
        return picture
    return replace(picture, info={k: v for k, v in picture.info.items() if k != "icc_profile"})


def encode_image(picture: Picture, fmt: str, name: str = "output", *, png_compression: int = 6) -> bytes:
    """Encode to PNG/JPEG/WEBP/TIFF/BMP bytes, keeping ICC, EXIF and XMP (metadata.py) where the format can hold them.

    PNG at any depth goes through png.encode_png (all cores, zlib level `png_compression`), TIFF
    through tiff.encode_tiff (all cores), BMP with alpha as a BMP with an alpha mask; other
    conversions are those of fit_to_format.
    """
    picture, _ = fit_to_format(picture, fmt, name)
    if picture.info.get("exif"):  # the source's block, which gave the source's size
        picture = replace(picture, info={**picture.info, "exif": metadata.exif_with_size(picture.info["exif"], picture.size)})
    if fmt == "PNG":
        info = picture.info
        return encode_png(_at_depth(picture, picture.bit_depth), level=png_compression, icc_profile=info.get("icc_profile"),
                          exif=info.get("exif"), text=metadata.png_text_with_xmp(info), dpi=info.get("dpi"),
                          colour={k: info[k] for k in COLOUR_KEYS if k in info})
    if fmt == "BMP" and picture.has_alpha:
        return _bmp_with_alpha(_at_depth(picture, 8), picture.info.get("dpi"))
    if fmt == "TIFF":  # Pillow cannot write 16-bit colour TIFF, nor a camera's EXIF through libtiff; OpenCV no metadata
        info = picture.info
        try:
            return encode_tiff(_at_depth(picture, picture.bit_depth), icc_profile=info.get("icc_profile"), exif=info.get("exif"),
                               xmp=info.get("xmp"), dpi=info.get("dpi"))
        except (ValueError, TypeError, SyntaxError, struct.error) as exc:  # an EXIF block Pillow's directory writer cannot parse or lay out
            raise ImageError(f"{name}: cannot encode as TIFF ({exc})") from None
    image = picture_to_pil(picture)
    out = io.BytesIO()
    try:
        image.save(out, format=fmt, **_save_options(fmt, picture.info))
    except (OSError, ValueError) as exc:
        raise ImageError(f"{name}: cannot encode as {fmt} ({exc})") from None
    if fmt == "JPEG" and picture.info.get("xmp"):
        return metadata.jpeg_with_xmp(out.getvalue(), picture.info["xmp"])
    return out.getvalue()


def _bmp_with_alpha(rgba: np.ndarray, dpi: tuple[float, float] | None = None) -> bytes:
    """A 32-bit BMP whose header names the alpha mask (BITMAPV4HEADER, BI_BITFIELDS). Pillow's
    RGBA BMP has no mask and OpenCV's before 5.0 neither, so readers (Pillow and OpenCV among them)
    dropped the alpha channel."""
    h, w = rgba.shape[:2]
    pixels = np.ascontiguousarray(rgba[::-1, :, [2, 1, 0, 3]]).tobytes()  # bottom-up BGRA rows
    header_size, offset = 108, 14 + 108
    per_metre = [round(d / 0.0254) for d in dpi] if dpi else (2835, 2835)  # 72 dpi, as Pillow writes without one
    info = struct.pack("<IiiHHIIiiII", header_size, w, h, 1, 32, 3, len(pixels), *per_metre, 0, 0)
    info += struct.pack("<IIII", 0x00FF0000, 0x0000FF00, 0x000000FF, 0xFF000000)  # R, G, B, A masks
    info += struct.pack("<I", 0x73524742) + bytes(36) + bytes(12)  # sRGB, no endpoints, no gamma
    return b"BM" + struct.pack("<IHHI", offset + len(pixels), 0, 0, offset) + info + pixels


def write_bytes(data: bytes, path: str | Path) -> None:
    """Write an encoded output atomically and durably (atomic.py); a failure names the file."""
    try:
        atomic.write_bytes(data, path)
    except DiskFullError:
        raise  # a full disk fails every later file too: the batch stops on it
    except OSError as exc:
        folder = Path(path).parent
        if not folder.is_dir():  # "(No such file or directory)" named neither the folder nor that it was the folder
            why = "is a file, not a folder" if folder.exists() else "does not exist"
            raise ImageError(f"{path}: cannot write: its folder {folder} {why}") from None
        raise ImageError(f"{path}: cannot write ({exc.strerror or exc})") from None


def write_image(picture: Picture, path: str | Path) -> None:
    """Encode by the suffix's format and write atomically."""
    write_bytes(encode_image(picture, format_for(path), str(path)), path)


def _save_options(fmt: str, info: dict) -> dict:
    keep = {"JPEG": ("icc_profile", "exif", "dpi"), "WEBP": ("icc_profile", "exif", "xmp"), "BMP": ("dpi",)}  # WebP has no dpi field
    options = {k: v for k, v in info.items() if k in keep.get(fmt, ())}
    if fmt == "JPEG":
        options.update(quality=95, subsampling=0)
    elif fmt == "WEBP":
        options.update({"lossless": True} if info.get("webp_lossless") else {"quality": 95})  # a lossless source stays so
    return options
