"""TIFF encoding, 8 or 16 bits, with the source's ICC profile and EXIF, strips deflated on all cores;
and the 8- and 16-bit TIFF layouts neither Pillow nor OpenCV reads right: planes, gray + alpha (samples_of, at the end).

Why: Pillow cannot write 16-bit colour TIFF, and OpenCV, which can, has no way to embed
metadata, so a 16-bit scan or raw development lost its colour profile (its colours then display
wrong) and its EXIF on the way through. At 8 bits Pillow's libtiff writer failed outright on an
EXIF with sub-directories, which is every camera's ("Error setting from dictionary"). Here the
samples go in strips of rows, each deflated on its own (a TIFF strip is its own zlib stream)
after horizontal differencing (predictor 2), and Pillow's own tag-directory writer, in Python,
lays out the tags, EXIF (its sub-directories included) as Pillow merges it into its TIFFs.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image, TiffImagePlugin, TiffTags

from .metadata import as_written, directory
from .png import STRIP_BYTES, encoder_pool

#: TIFF tags written here (baseline TIFF 6.0, XMLPacket and the ICC tag)
_WIDTH, _LENGTH, _BITS, _COMPRESSION, _PHOTOMETRIC = 256, 257, 258, 259, 262
_STRIP_OFFSETS, _SAMPLES, _ROWS_PER_STRIP, _STRIP_BYTE_COUNTS = 273, 277, 278, 279
_PLANAR, _PREDICTOR, _XMP, _EXTRA_SAMPLES, _ICC = 284, 317, 700, 338, 34675
_ADOBE_DEFLATE, _HORIZONTAL, _UNASSOCIATED_ALPHA = 8, 2, 2
_X_RESOLUTION, _Y_RESOLUTION, _RESOLUTION_UNIT, _INCH = 282, 283, 296, 2
#: the strip offsets go into Pillow's directory writer under this unused tag and are renamed in its
#: output: Pillow moves real strip offsets to after the directory, and before 10.x refuses more than one.
#: Orientation (274), the one tag between, is never written (orientation is applied at read).
_OFFSETS_STAND_IN = 275
_ORIENTATION = 274
#: tags that describe the file's own layout (and orientation, already applied): an EXIF block's
#: copies (a TIFF source's) must not replace ours
_LAYOUT = {_WIDTH, _LENGTH, _BITS, _COMPRESSION, _PHOTOMETRIC, _STRIP_OFFSETS, _SAMPLES, _ROWS_PER_STRIP,
           _STRIP_BYTE_COUNTS, _PLANAR, _PREDICTOR, _EXTRA_SAMPLES, _OFFSETS_STAND_IN, _ORIENTATION, 322, 323, 324, 325,
           339, 0x0201, 0x0202}


#: the last byte a classic TIFF's 32-bit offsets reach (BigTIFF, past it, few readers take)
ADDRESSABLE = 2**32 - 1


def encode_tiff(pixels: np.ndarray, *, level: int = 1, icc_profile: bytes | None = None, exif: bytes | None = None,
                xmp: bytes | None = None, dpi: tuple[float, float] | None = None) -> bytes:
    """Little-endian TIFF bytes of an H x W x C array: uint8 with C = 1 gray, 2 gray + alpha, 3 RGB,
    4 RGBA, or uint16 with C = 1, 3 or 4 (16-bit gray + alpha neither Pillow nor OpenCV reads
    back); alpha unassociated. Deflated at zlib `level`, with `icc_profile`, `exif` (bytes, with
    or without the "Exif\\0\\0" prefix), `xmp` (the XMLPacket tag) and `dpi` kept. Level 1: a 2048^2 16-bit RGB photo in 0.17 s and
    8.8 MB on 2 cores, where levels 3-6 took 2-3x longer for about 2% less, and OpenCV's LZW
    0.31 s and 9.9 MB (benchmarks/encode.py)."""
    depth = pixels.dtype.itemsize * 8 if pixels.dtype in (np.uint8, np.uint16) else 0
    if pixels.ndim != 3 or not depth or pixels.shape[2] not in ((1, 2, 3, 4) if depth == 8 else (1, 3, 4)):
        raise ValueError(f"expected H x W x 1-4 uint8 or 1, 3 or 4 uint16 samples, got {pixels.dtype} {pixels.shape}")
    h, w, c = pixels.shape
    row_bytes = w * c * depth // 8
    rows_per_strip = max(1, min(h, STRIP_BYTES // row_bytes))
    samples = np.ascontiguousarray(pixels, dtype="<u2" if depth == 16 else np.uint8).reshape(h, w * c)

    def strip(a: int) -> bytes:
        rows = samples[a : a + rows_per_strip]
        diff = rows.copy()
        np.subtract(rows[:, c:], rows[:, :-c], out=diff[:, c:])  # predictor 2: each sample minus its left neighbour, modulo 2^depth
        return zlib.compress(diff.tobytes(), level)

    starts = range(0, h, rows_per_strip)
    strips = list(encoder_pool().map(strip, starts)) if len(starts) > 1 else [strip(0)]
    # the strips come first, at offsets known now, and the directory after them
    offsets, position = [], 8
    for data in strips:
        offsets.append(position)
        position += len(data)
    padding = position & 1  # the directory starts on a word boundary
    position += padding
    # the directory and what it points to (the metadata blocks, and well under 64 KiB more) follow the
    # samples; past what 32-bit offsets reach, Pillow's directory writer failed with "argument out of range"
    if position + sum(len(b) for b in (icc_profile, exif, xmp) if b) + 2**16 > ADDRESSABLE:
        raise ValueError(f"its compressed samples take {position / 1e9:.1f} GB, past the {ADDRESSABLE / 1e9:.1f} GB a TIFF's "
                         "32-bit offsets reach; use --format png")

    ifd = TiffImagePlugin.ImageFileDirectory_v2()
    if exif:
        _merge_exif(ifd, exif)
    if icc_profile:
        ifd[_ICC] = icc_profile
        ifd.tagtype[_ICC] = TiffTags.UNDEFINED
    if xmp:
        ifd[_XMP] = xmp
        ifd.tagtype[_XMP] = TiffTags.BYTE
    for tag, value, kind in (
        (_WIDTH, w, TiffTags.LONG), (_LENGTH, h, TiffTags.LONG), (_BITS, (depth,) * c, TiffTags.SHORT),
        (_COMPRESSION, _ADOBE_DEFLATE, TiffTags.SHORT), (_PHOTOMETRIC, 1 if c <= 2 else 2, TiffTags.SHORT),
        (_OFFSETS_STAND_IN, tuple(offsets), TiffTags.LONG), (_SAMPLES, c, TiffTags.SHORT),
        (_ROWS_PER_STRIP, rows_per_strip, TiffTags.LONG), (_STRIP_BYTE_COUNTS, tuple(map(len, strips)), TiffTags.LONG),
        (_PLANAR, 1, TiffTags.SHORT), (_PREDICTOR, _HORIZONTAL, TiffTags.SHORT),
    ) + (((_EXTRA_SAMPLES, _UNASSOCIATED_ALPHA, TiffTags.SHORT),) if c in (2, 4) else ()) + (
        ((_X_RESOLUTION, dpi[0], TiffTags.RATIONAL), (_Y_RESOLUTION, dpi[1], TiffTags.RATIONAL), (_RESOLUTION_UNIT, _INCH, TiffTags.SHORT))
        if dpi else ()  # after the EXIF block's, which a camera's says 72 in
    ):
        ifd[tag] = value
        ifd.tagtype[tag] = kind
    directory = _renamed(ifd.tobytes(position), _OFFSETS_STAND_IN, _STRIP_OFFSETS)
    return b"II*\x00" + struct.pack("<I", position) + b"".join(strips) + b"\x00" * padding + directory


def _renamed(directory: bytes, old: int, new: int) -> bytes:
    """The directory with entry `old`'s tag number changed to `new` (no tag lies between them)."""
    count = struct.unpack_from("<H", directory)[0]
    for k in range(count):
        at = 2 + 12 * k
        if struct.unpack_from("<H", directory, at)[0] == old:
            return directory[:at] + struct.pack("<H", new) + directory[at + 2 :]
    raise AssertionError(f"tag {old} not in the directory")


def _merge_exif(ifd: TiffImagePlugin.ImageFileDirectory_v2, exif: bytes) -> None:
    """The EXIF block's main-directory tags into the file's directory and its sub-directories
    (Exif, GPS) as such, as Pillow's TIFF writer does with `exif=`; layout tags are skipped."""
    parsed = Image.Exif()
    parsed.load(exif)  # with or without the "Exif\0\0" prefix
    for tag in parsed:
        if tag not in _LAYOUT:
            ifd[tag] = directory(parsed, tag) if tag in TiffTags.TAGS_V2_GROUPS else as_written(parsed[tag])


# ------------------------------------------------------------------------------------ reading


#: tags whose values the readers here take as whole numbers: the layout, orientation, resolution unit
_WHOLE_NUMBERS = {_WIDTH, _LENGTH, _BITS, _COMPRESSION, _PHOTOMETRIC, _STRIP_OFFSETS, _ORIENTATION, _SAMPLES, _ROWS_PER_STRIP,
                  _STRIP_BYTE_COUNTS, _PLANAR, _RESOLUTION_UNIT, _PREDICTOR, 322, 323, 324, 325, _EXTRA_SAMPLES, 339}


def tags_of(data: bytes) -> dict:
    """A TIFF's first tag directory, read without Pillow's image plugin (which refuses layouts it
    cannot decode); {} for anything else. A tag of another type than its own (a damaged file: a
    width given as text, a profile as numbers) is left out, as if the file had none: the readers
    failed on it with ValueError, which ended the batch as "a bug in icmsr" (found by fuzzing)."""
    if data[:4] not in (b"II*\0", b"MM\0*"):
        return {}
    try:
        tags = TiffImagePlugin.ImageFileDirectory_v2(data[:8])
        stream = io.BytesIO(data)
        stream.seek(tags.next)
        tags.load(stream)
        tags = dict(tags)
    except (KeyError, ValueError, TypeError, OSError, SyntaxError, struct.error):
        return {}
    for tag in _WHOLE_NUMBERS & tags.keys():
        values = tags[tag] if isinstance(tags[tag], tuple) else (tags[tag],)
        if not values or not all(isinstance(v, int) for v in values):
            del tags[tag]
    if _ICC in tags and not isinstance(tags[_ICC], bytes):
        del tags[_ICC]
    return tags


def samples_of(tags: dict, data: bytes) -> np.ndarray | None:
    """The samples (H x W x S, uint8 or uint16) of an 8- or 16-bit unsigned TIFF with more than
    one sample per pixel, which Pillow and OpenCV misread or refuse: stored plane by plane
    (Photoshop's "Per Channel" order), or pixel by pixel with a sample count neither takes at 16
    bits (gray + alpha, as GIMP and Photoshop save 16-bit gray with transparency; colour with two
    extra channels). None for any other file.

    Why: at 16 bits OpenCV reads a planar file's second and third planes from the wrong places and
    Pillow cuts it to 8 bits, both without a word; gray + alpha neither opens. At 8 bits Pillow
    cannot unpack planes of gray + alpha, premultiplied alpha or more than one extra ("unknown
    raw mode"). The file's own compressed strips or tiles are handed to Pillow under a new tag
    directory, appended, as one-sample gray: each plane on its own, or all the samples of a row as
    one row S times as wide; whatever libtiff decodes (LZW, deflate, PackBits) is decoded here too.
    Horizontal differencing (predictor 2) of a wide row steps by S samples, so it is undone here
    rather than by libtiff."""
    bits, samples = np.atleast_1d(tags.get(_BITS, 1)), int(tags.get(_SAMPLES, 1))
    unsigned = all(f == 1 for f in np.atleast_1d(tags.get(339, 1)))
    # (some writers give BitsPerSample once for all samples)
    depth = int(bits[0]) if len(bits) in (1, samples) and len(set(bits.tolist())) == 1 else 0
    if samples < 2 or depth not in (8, 16) or not unsigned or _WIDTH not in tags or _LENGTH not in tags:
        return None
    dtype = np.uint8 if depth == 8 else np.uint16
    width, height = int(tags[_WIDTH]), int(tags[_LENGTH])
    tiled = 324 in tags
    offsets, counts = (tags.get(324), tags.get(325)) if tiled else (tags.get(_STRIP_OFFSETS), tags.get(_STRIP_BYTE_COUNTS))
    if offsets is None or counts is None:
        return None
    offsets, counts = np.atleast_1d(offsets), np.atleast_1d(counts)
    predictor = int(tags.get(_PREDICTOR, 1))
    order = "<" if data[:2] == b"II" else ">"
    if tags.get(_PLANAR) == 2:
        if len(offsets) % samples:
            return None
        per_plane = len(offsets) // samples
        parts = [(slice(p * per_plane, (p + 1) * per_plane), width, predictor) for p in range(samples)]
    elif predictor in (1, 2):
        parts = [(slice(None), width * samples, 1)]  # the wide row's differences are undone below
    else:
        return None
    tile_width = int(tags.get(322, 0)) * (1 if tags.get(_PLANAR) == 2 else samples)
    layout = [(322, 4, [tile_width]), (323, 4, [int(tags.get(323, 0))])] if tiled else [(_ROWS_PER_STRIP, 4, [int(tags.get(_ROWS_PER_STRIP, height))])]
    at = len(data) + len(data) % 2  # the new directory's offset (word-aligned), after everything the file holds
    found = []
    for part, wide, kept_predictor in parts:
        entries = [(_WIDTH, 4, [wide]), (_LENGTH, 4, [height]), (_BITS, 3, [depth]), (_COMPRESSION, 3, [int(tags.get(_COMPRESSION, 1))]),
                   (_PHOTOMETRIC, 3, [1]), (_SAMPLES, 3, [1]), (_PLANAR, 3, [1]), (_PREDICTOR, 3, [kept_predictor]),
                   *layout, (324 if tiled else _STRIP_OFFSETS, 4, [int(v) for v in offsets[part]]),
                   (325 if tiled else _STRIP_BYTE_COUNTS, 4, [int(v) for v in counts[part]])]
        rebuilt = data[:4] + struct.pack(order + "I", at) + data[8:] + bytes(at - len(data)) + _directory(sorted(entries), at, order)
        try:
            with Image.open(io.BytesIO(rebuilt)) as plane:
                found.append(np.asarray(plane).astype(dtype))
        except (OSError, ValueError, SyntaxError):
            return None
        if found[-1].shape != (height, wide):
            return None
    if len(found) > 1:
        return np.stack(found, axis=2)
    arr = found[0].reshape(height, width, samples)
    if predictor == 2:  # each row of each strip or tile starts afresh; sums wrap modulo 2^depth as the differences did
        step = int(tags.get(322, width)) if tiled else width
        for x in range(0, width, step):
            np.cumsum(arr[:, x : x + step], axis=1, dtype=dtype, out=arr[:, x : x + step])
    return arr


def _directory(entries: list[tuple[int, int, list[int]]], at: int, order: str) -> bytes:
    """A TIFF tag directory written at offset `at`: (tag, type 3 SHORT or 4 LONG, values), sorted
    by tag; values that do not fit in an entry's 4 bytes follow the directory."""
    head = struct.pack(order + "H", len(entries))
    tail = b""
    extra_at = at + 2 + 12 * len(entries) + 4
    for tag, kind, values in entries:
        packed = struct.pack(order + ("H" if kind == 3 else "I") * len(values), *values)
        if len(packed) <= 4:
            head += struct.pack(order + "HHI", tag, kind, len(values)) + packed.ljust(4, b"\0")
        else:
            head += struct.pack(order + "HHII", tag, kind, len(values), extra_at + len(tail))
            tail += packed
    return head + struct.pack(order + "I", 0) + tail
