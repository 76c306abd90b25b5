"""The parallel PNG writer (io/png.py): what real decoders read back from it, bit for bit."""

from __future__ import annotations

import io
import struct
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image

from conftest import photo_like
from icmsr_cli.io import png
from icmsr_cli.io.images import Picture, encode_image


def _chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """(type, payload) of every chunk, each CRC checked."""
    assert data[:8] == png.SIGNATURE
    out, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, payload = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + payload), f"bad CRC in {kind!r}"
        out.append((kind, payload))
        pos += 12 + length
    return out


def _cv2_samples(data: bytes, channels: int) -> np.ndarray:
    back = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    back = back[..., None] if back.ndim == 2 else back
    if channels == 1:
        return back
    return back[..., [0, 3]] if channels == 2 else back[..., [2, 1, 0, 3][:channels]]  # OpenCV: GA as BGRA


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_every_mode_and_depth_decodes_to_the_same_samples(dtype, channels, monkeypatch):
    """Odd sizes, full-range samples, strips of uneven row counts (one, several, one per row):
    libpng (through OpenCV) and Pillow read back exactly the samples written, at their depth."""
    top = np.iinfo(dtype).max
    rng = np.random.default_rng(channels)
    pixels = rng.integers(0, top, (61, 37, channels), endpoint=True).astype(dtype)
    pixels[0, 0], pixels[-1, -1] = 0, top
    for strip_bytes, strips in ((1 << 30, 1), (pixels.nbytes // 4 + 1, 4), (1, 61)):
        monkeypatch.setattr(png, "STRIP_BYTES", strip_bytes)
        data = png.encode_png(pixels, level=1)
        idat = [payload for kind, payload in _chunks(data) if kind == b"IDAT"]
        assert len(idat) == strips
        zlib.decompress(b"".join(idat))  # one zlib stream: the joined pieces and their combined Adler-32 check out
        assert np.array_equal(_cv2_samples(data, channels), pixels)
        with Image.open(io.BytesIO(data)) as im:
            if dtype == np.uint8 or channels == 1:  # Pillow reads 16-bit colour as 8 bits
                arr = np.asarray(im).reshape(pixels.shape)
                assert np.array_equal(arr, pixels if dtype == np.uint8 else pixels.astype(np.int32))


def test_strip_count_changes_bytes_not_pixels(monkeypatch):
    pixels = photo_like(300, 200)
    monkeypatch.setattr(png, "STRIP_BYTES", 1 << 30)
    one = png.encode_png(pixels)
    monkeypatch.setattr(png, "STRIP_BYTES", 20000)
    many = png.encode_png(pixels)
    assert one != many and np.array_equal(_cv2_samples(one, 3), _cv2_samples(many, 3))


def test_adler32_combine_equals_zlib_over_the_whole():
    rng = np.random.default_rng(0)
    a, b = rng.bytes(70000), rng.bytes(131071)  # longer than Adler's modulus, so its wrap-round counts
    assert png.adler32_combine(zlib.adler32(a), zlib.adler32(b), len(b)) == zlib.adler32(a + b)
    assert png.adler32_combine(1, zlib.adler32(b), len(b)) == zlib.adler32(b)


def test_level_reaches_zlib():
    """0 stores (larger than the raw samples), 9 compresses a photo at least as well as 1."""
    pixels = photo_like(256, 128)
    stored, fast, small = (len(png.encode_png(pixels, level=lv)) for lv in (0, 1, 9))
    assert stored > pixels.size > fast >= small


@pytest.mark.parametrize("bit_depth", [8, 16])
def test_png_output_keeps_icc_and_exif_at_both_depths(bit_depth):
    """16-bit colour went out through OpenCV, which dropped the ICC profile."""
    icc = bytes(range(256)) * 2
    exif = Image.Exif()
    exif[0x010F] = "TestCam"
    picture = Picture(photo_like(40, 30).astype(np.float32) / 255, bit_depth, {"icc_profile": icc, "exif": exif.tobytes()})
    data = encode_image(picture, "PNG")
    with Image.open(io.BytesIO(data)) as im:
        assert im.info.get("icc_profile") == icc
        assert im.getexif().get(0x010F) == "TestCam"
    samples = _cv2_samples(data, 3)
    assert samples.dtype == (np.uint16 if bit_depth == 16 else np.uint8)
    top = 65535 if bit_depth == 16 else 255
    assert np.array_equal(samples, np.rint(picture.pixels * top))


def test_exif_with_the_jpeg_prefix_is_stored_without_it():
    exif = Image.Exif()
    exif[0x010F] = "TestCam"
    raw = exif.tobytes()
    data = png.encode_png(photo_like(8, 8), exif=b"Exif\0\0" + raw)
    assert dict(_chunks(data))[b"eXIf"] == raw


def test_bad_input_is_refused():
    with pytest.raises(ValueError):
        png.encode_png(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError):
        png.encode_png(np.zeros((4, 4, 5), np.uint8))
    with pytest.raises(ValueError):
        png.encode_png(np.zeros((4, 4, 3), np.uint8), level=10)


def test_ranks_sharing_a_machine_share_the_png_writers_cores_too(monkeypatch):
    """Each of a machine's ranks takes its share of the cores for torch and for PNG strips, not
    every core each (eight ranks on 16 cores would run 128 encoding threads); the files do not
    depend on it: strips follow from the image alone."""
    import torch

    from icmsr_cli.engines.ranks import Ranks

    monkeypatch.setattr(png, "default_threads", None)
    monkeypatch.setattr(png, "cpu_count", lambda: 16)
    threads = torch.get_num_threads()
    try:
        Ranks(rank=1, world=4, local_rank=1, local_world=4).share_cpu()
        assert png.default_threads == 4 and torch.get_num_threads() == 4
    finally:
        torch.set_num_threads(threads)
    monkeypatch.setattr(png, "STRIP_BYTES", 1000)
    shared = png.encode_png(photo_like(64, 64))
    monkeypatch.setattr(png, "default_threads", None)
    assert png.encode_png(photo_like(64, 64)) == shared


def test_text_keys_png_cannot_hold_are_left_out():
    """Keywords are 1-79 Latin-1 characters; a chunk with any other would make a file readers refuse."""
    data = png.encode_png(photo_like(8, 8), text={"ok": "kept", "": "empty", "k" * 80: "long", "ключ": "cyrillic"})
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        assert dict(im.text) == {"ok": "kept"}
