"""PNG encoding on all cores: strips of rows filtered and deflated in parallel, joined into one file.

Why: Pillow's and OpenCV's PNG writers filter and deflate on one thread. A 2048^2 RGB output
took 0.3-0.5 s at zlib level 1 on a 2-core CPU (2.1 s at Pillow's default level 6 on issue 10's
H100 host), longer than the model takes for it on a GPU, and the per-file time runs from the
model's start to the file. A PNG filter looks no further back than the row above, and a deflate
stream cut at a flush point can be joined to another one (what pigz does), so each strip of rows
is filtered and compressed on its own thread and the pieces become one zlib stream, one IDAT
chunk per strip. The Adler-32 of the whole is combined from the strips' own.

Every row takes the Up filter (the row minus the row above, a byte at a time): one vectorised
subtraction. libpng's and Pillow's per-row adaptive choice (Paeth on nearly every row of a
photograph) costs more than the deflate itself at level 1, for files that were 1% larger to 4%
smaller at level 1 and 2-9% smaller at level 6 (benchmarks/encode.py, BENCHMARKS.md).
"""

from __future__ import annotations

import os
import struct
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np

SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: PNG colour type by channel count: gray, gray + alpha, RGB, RGBA
_COLOUR_TYPE = {1: 0, 2: 4, 3: 2, 4: 6}
#: the filter byte that starts every row: Up
_UP = 2
#: raw bytes per strip (the last may hold fewer), PNG's and TIFF's (tiff.py): the strips follow from the image alone, so a
#: file's bytes do not depend on the machine's cores; ~1 MB pieces lose nothing measurable to the
#: dictionary each starts afresh, and a 2048^2 RGB image makes 12 of them for the cores to share
STRIP_BYTES = 1 << 20
#: zlib headers (CMF, FLG) by level; FLEVEL only informs, any valid header decodes
_ZLIB_HEADER = {0: b"\x78\x01", 1: b"\x78\x01", 2: b"\x78\x5e", 3: b"\x78\x5e", 4: b"\x78\x5e", 5: b"\x78\x5e", 6: b"\x78\x9c"}
_ADLER_BASE = 65521

#: threads encoding strips, set before the first encode; None: one per CPU. Ranks sharing a
#: machine lower it to their share of the cores (engines/ranks.py)
default_threads: int | None = None

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def cpu_count() -> int:
    """The CPUs this process may run on (a container's or a taskset's limit, not the machine's)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def encode_png(pixels: np.ndarray, *, level: int = 6, icc_profile: bytes | None = None, exif: bytes | None = None,
               text: dict[str, str] | None = None, dpi: tuple[float, float] | None = None,
               colour: dict | None = None) -> bytes:
    """PNG bytes of an H x W x C array (C = 1 gray, 2 gray + alpha, 3 RGB, 4 RGBA; uint8 or uint16
    for 8- or 16-bit samples), deflated at zlib `level` (0-9), strips of ~1 MB in parallel.
    `icc_profile` goes in an iCCP chunk, `exif` (with or without the "Exif\\0\\0" prefix JPEG files
    carry) in an eXIf chunk, `text` in one text chunk per key (see _text_chunk), `dpi` in pHYs,
    `colour` ({"gamma", "chromaticity", "srgb"} as Pillow reads them: COLOUR_KEYS) in gAMA, cHRM and
    sRGB, all before the image data."""
    if pixels.ndim != 3 or pixels.shape[2] not in _COLOUR_TYPE or pixels.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"expected H x W x 1-4 uint8 or uint16 samples, got {pixels.dtype} {pixels.shape}")
    if not 0 <= level <= 9:
        raise ValueError(f"zlib level must be 0-9, got {level}")
    h, w, c = pixels.shape
    depth = pixels.dtype.itemsize * 8
    rows = np.ascontiguousarray(pixels, dtype=">u2" if depth == 16 else np.uint8).view(np.uint8).reshape(h, -1)
    header = struct.pack(">IIBBBBB", w, h, depth, _COLOUR_TYPE[c], 0, 0, 0)
    parts = [SIGNATURE, _chunk(b"IHDR", header)]
    if dpi:  # pHYs: pixels per metre, unit 1
        parts.append(_chunk(b"pHYs", struct.pack(">IIB", *(round(d / 0.0254) for d in dpi), 1)))
    parts += _colour_chunks(colour or {})
    if icc_profile:
        parts.append(_chunk(b"iCCP", b"ICC Profile\0\0" + zlib.compress(icc_profile)))
    if exif:
        parts.append(_chunk(b"eXIf", exif[6:] if exif.startswith(b"Exif\0\0") else exif))
    parts += [chunk for key, value in (text or {}).items() if (chunk := _text_chunk(key, value))]
    parts += _image_data(rows, level)
    parts.append(_chunk(b"IEND", b""))
    return b"".join(parts)


def _image_data(rows: np.ndarray, level: int) -> list[bytes]:
    """The IDAT chunks: strip k's rows filtered and deflated by one task; the first carries the
    zlib header, the last the Adler-32 of all the filtered bytes."""
    h = rows.shape[0]
    strips = max(1, min(h, -(-rows.size // STRIP_BYTES)))
    bounds = [h * k // strips for k in range(strips + 1)]

    def strip(k: int) -> tuple[bytes, int, int, int]:
        a, b = bounds[k], bounds[k + 1]
        raw = _filter_up(rows, a, b)
        deflate = zlib.compressobj(level, zlib.DEFLATED, -15)  # raw deflate: the pieces share one zlib wrapper
        # a sync flush ends the piece on a byte boundary with no final block, so the next piece
        # can follow it; the last one finishes the stream
        data = deflate.compress(raw) + deflate.flush(zlib.Z_FINISH if k == strips - 1 else zlib.Z_SYNC_FLUSH)
        if k == 0:
            data = _ZLIB_HEADER.get(level, b"\x78\xda") + data
        return data, zlib.crc32(data, zlib.crc32(b"IDAT")), zlib.adler32(raw), len(raw)

    pieces = list(encoder_pool().map(strip, range(strips))) if strips > 1 else [strip(0)]
    adler = 1  # the Adler-32 of no bytes
    for _, _, piece_adler, length in pieces:
        adler = adler32_combine(adler, piece_adler, length)
    chunks = []
    for k, (data, crc, _, _) in enumerate(pieces):
        if k == strips - 1:
            tail = struct.pack(">I", adler)
            data, crc = data + tail, zlib.crc32(tail, crc)
        chunks.append(struct.pack(">I", len(data)) + b"IDAT" + data + struct.pack(">I", crc))
    return chunks


#: what Pillow's PNG reader names a file's gAMA, cHRM and sRGB chunks in .info: how a viewer
#: without a colour profile turns its samples into colours (a gAMA of 1.0 or 1/1.8 shows darker
#: or lighter than the sRGB guess); Pillow's writer drops them
COLOUR_KEYS = ("gamma", "chromaticity", "srgb")


def _colour_chunks(colour: dict) -> list[bytes]:
    """gAMA, cHRM and sRGB as the source had them (values in units of 1/100000, as stored)."""
    chunks = []
    if colour.get("chromaticity") is not None:
        chunks.append(_chunk(b"cHRM", struct.pack(">8I", *(round(v * 100000) for v in colour["chromaticity"]))))
    if colour.get("gamma") is not None:
        chunks.append(_chunk(b"gAMA", struct.pack(">I", round(colour["gamma"] * 100000))))
    if colour.get("srgb") is not None:
        chunks.append(_chunk(b"sRGB", bytes([int(colour["srgb"])])))
    return chunks


def _filter_up(rows: np.ndarray, a: int, b: int) -> bytes:
    """Rows a..b, each as its filter byte and its bytes minus the row above's (modulo 256; the
    image's first row has zeros above it)."""
    out = np.empty((b - a, rows.shape[1] + 1), dtype=np.uint8)
    out[:, 0] = _UP
    if a == 0:
        out[0, 1:] = rows[0]
        np.subtract(rows[1:b], rows[: b - 1], out=out[1:, 1:])
    else:
        np.subtract(rows[a:b], rows[a - 1 : b - 1], out=out[:, 1:])
    return out.tobytes()


def adler32_combine(adler1: int, adler2: int, length2: int) -> int:
    """The Adler-32 of A + B from A's, B's and B's length (zlib's adler32_combine, which Python's
    zlib module does not expose)."""
    rem = length2 % _ADLER_BASE
    sum1 = adler1 & 0xFFFF
    sum2 = (rem * sum1) % _ADLER_BASE
    sum1 = (sum1 + (adler2 & 0xFFFF) + _ADLER_BASE - 1) % _ADLER_BASE
    sum2 = (sum2 + (adler1 >> 16) + (adler2 >> 16) + _ADLER_BASE - rem) % _ADLER_BASE
    return sum1 | (sum2 << 16)


def _text_chunk(key: str, value: str) -> bytes | None:
    """tEXt for Latin-1 text, zTXt once it is long (a front end's workflow JSON runs to tens of kB),
    iTXt (UTF-8) for anything else; None for a key PNG cannot hold (1-79 Latin-1 characters)."""
    try:
        keyword = key.encode("latin-1")
    except UnicodeEncodeError:
        return None
    if not 1 <= len(keyword) <= 79 or b"\0" in keyword:
        return None
    compress = len(value) >= 1024
    try:
        raw = value.encode("latin-1")
        return _chunk(b"zTXt", keyword + b"\0\0" + zlib.compress(raw)) if compress else _chunk(b"tEXt", keyword + b"\0" + raw)
    except UnicodeEncodeError:
        raw = value.encode("utf-8")
        body = zlib.compress(raw) if compress else raw
        return _chunk(b"iTXt", keyword + b"\0" + bytes([compress, 0]) + b"\0\0" + body)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))


def encoder_pool() -> ThreadPoolExecutor:
    """One pool for every encode in the process, PNG and TIFF (the batch's writer threads share it); zlib and
    numpy release the GIL while they work, so the strips run in parallel."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=default_threads or cpu_count(), thread_name_prefix="icmsr-png")
        return _pool


#: the chunks that make a PNG's pixels: what OpenCV is given to decode a 16-bit PNG (Pillow reads
#: its metadata). libpng printed its warnings on the rest to stderr, past OPENCV_LOG_LEVEL
#: ("libpng warning: eXIf: invalid", "iCCP: known incorrect sRGB profile").
_PIXEL_CHUNKS = {b"IHDR", b"PLTE", b"tRNS", b"IDAT", b"IEND"}


def pixel_chunks(data: bytes) -> bytes:
    """The PNG with only the chunks its pixels need; the file as it was if it does not parse."""
    if not data.startswith(SIGNATURE):
        return data
    parts, at = [SIGNATURE], len(SIGNATURE)
    while at + 12 <= len(data):
        length, kind = struct.unpack(">I4s", data[at : at + 8])
        end = at + 12 + length
        if end > len(data):
            return data
        if kind in _PIXEL_CHUNKS:
            parts.append(data[at:end])
        at = end
        if kind == b"IEND":
            break
    return b"".join(parts)
