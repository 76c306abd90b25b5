"""TIFF outputs: exact samples as libtiff (through OpenCV) and Pillow decode them, ICC profile and
EXIF (a camera's, with its sub-directories) kept, 16-bit gray + alpha widened to what readers take."""

from __future__ import annotations

import io
import struct

import cv2
import numpy as np
import pytest
from PIL import Image

from icmsr_cli.errors import ImageError
from icmsr_cli.io import tiff
from icmsr_cli.io.images import Picture, encode_image, fit_to_format, read_image


def _exif() -> bytes:
    exif = Image.Exif()
    exif[0x010F] = "TestCam"
    exif[0x0100] = 7  # a TIFF source's own width, carried in its EXIF view: must not replace the output's
    exif[0x0112] = 6  # an orientation: applied at read, so never written (a reader would turn the image again)
    # the Exif sub-directory (Pillow 10 drops one made by get_ifd), with its Interop directory within
    exif[0x8769] = {0x9003: "2020:01:02 03:04:05", 0xA005: {0x0001: "R98"}}
    return exif.tobytes()


def _decoded(data: bytes, channels: int) -> np.ndarray:
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    assert arr is not None, "libtiff could not decode the file"
    if arr.dtype == np.uint8 and channels == 4:
        # OpenCV reads 8-bit RGBA through libtiff's RGBA interface, which premultiplies unassociated
        # alpha (Pillow's own RGBA TIFFs come back so too): Pillow's decoder is the check here
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im)
    return arr[..., None] if arr.ndim == 2 else arr[..., [2, 1, 0, 3][:channels]]


@pytest.mark.parametrize("bits", [8, 16])
@pytest.mark.parametrize("channels", [1, 3, 4])
@pytest.mark.parametrize("height", [5, 400])  # one strip; several (each ~1 MB)
def test_tiff_keeps_samples_icc_and_exif(bits, channels, height):
    """16-bit colour TIFF went out through OpenCV, which dropped the ICC profile and EXIF; 8-bit
    TIFF through Pillow and libtiff, which failed on an EXIF with sub-directories (every camera's)."""
    rng = np.random.default_rng(channels * height)
    top = 65535 if bits == 16 else 255
    samples = rng.integers(0, top + 1, (height, 1400, channels)).astype(np.uint16 if bits == 16 else np.uint8)
    icc = bytes(range(256)) * 3
    picture = Picture(samples.astype(np.float32) / top, bits, {"icc_profile": icc, "exif": _exif()})
    data = encode_image(picture, "TIFF")
    np.testing.assert_array_equal(_decoded(data, channels), samples)
    back = read_image(data)
    assert back.bit_depth == bits and back.pixels.shape == samples.shape
    np.testing.assert_array_equal(np.rint(back.pixels * top), samples)
    with Image.open(io.BytesIO(data)) as im:
        assert im.info.get("icc_profile") == icc
        exif = im.getexif()
        assert exif.get(0x010F) == "TestCam" and exif.get(0x0100) == 1400 and 0x0112 not in exif
        assert exif.get_ifd(0x8769).get(0x9003) == "2020:01:02 03:04:05"
        assert exif.get_ifd(0xA005) == {0x0001: "R98"}  # its pointer was the block's offset, into the pixels
        assert len(im.tag_v2[273]) == (1 if height == 5 else -(-samples.nbytes // (1 << 20)))  # strip offsets


def test_16bit_gray_alpha_to_tiff_is_16bit_rgba_with_a_note():
    """It went out as 8-bit gray + alpha, silently: half its bits lost."""
    rng = np.random.default_rng(3)
    ga = rng.integers(0, 65536, (6, 9, 2), dtype=np.uint16)
    picture = Picture(ga.astype(np.float32) / 65535, 16)
    _, notes = fit_to_format(picture, "TIFF")
    assert notes == ["16-bit gray with alpha is written to TIFF as 16-bit RGBA, which readers take"]
    got = _decoded(encode_image(picture, "TIFF"), 4)
    np.testing.assert_array_equal(got, ga[..., [0, 0, 0, 1]])


def _gray_icc() -> bytes:
    """A minimal ICC v2 gray display profile (gamma 2.2), which lcms parses: header, desc, wtpt, kTRC."""
    def s15(v):
        return struct.pack(">i", round(v * 65536))

    desc_text = b"Gray 2.2\0"
    desc = b"desc" + bytes(4) + struct.pack(">I", len(desc_text)) + desc_text + bytes(78)
    tags = [(b"desc", desc + bytes(-len(desc) % 4)), (b"wtpt", b"XYZ " + bytes(4) + s15(0.9642) + s15(1.0) + s15(0.8249)),
            (b"kTRC", b"curv" + bytes(4) + struct.pack(">IH", 1, 0x0233) + bytes(2))]
    offset = 128 + 4 + 12 * len(tags)
    table, body = struct.pack(">I", len(tags)), b""
    for sig, data in tags:
        table += sig + struct.pack(">II", offset + len(body), len(data))
        body += data
    header = (struct.pack(">I", offset + len(body)) + bytes(4) + struct.pack(">I", 0x02100000) + b"mntrGRAYXYZ " + bytes(12)
              + b"acsp" + bytes(28) + s15(0.9642) + s15(1.0) + s15(0.8249) + bytes(48))
    return header + table + body


def test_gray_written_as_rgb_leaves_a_gray_profile_out():
    """16-bit gray + alpha goes to TIFF as RGBA, and WebP, which has no gray, takes gray as RGB;
    the gray colour profile went with them, into an RGB file it cannot describe (Photoshop: "the
    embedded profile does not match"; other readers reject or ignore it). Where gray stays gray,
    the profile stays."""
    from PIL import ImageCms

    gray = _gray_icc()
    assert ImageCms.ImageCmsProfile(io.BytesIO(gray)).profile.xcolor_space == "GRAY"  # a profile lcms takes
    ga = np.random.default_rng(5).integers(0, 65536, (6, 9, 2), dtype=np.uint16)
    picture = Picture(ga.astype(np.float32) / 65535, 16, {"icc_profile": gray})
    back = read_image(encode_image(picture, "TIFF"))
    assert back.pixels.shape[2] == 4 and "icc_profile" not in back.info
    assert read_image(encode_image(Picture(ga[..., :1].astype(np.float32) / 65535, 16, {"icc_profile": gray}), "TIFF")).info["icc_profile"] == gray
    for channels in (1, 2):
        with Image.open(io.BytesIO(encode_image(Picture(ga[..., :channels] / 65535, 8, {"icc_profile": gray}), "WEBP"))) as im:
            assert im.mode in ("RGB", "RGBA") and "icc_profile" not in im.info


def test_a_tiff_past_what_32_bit_offsets_reach_is_refused_in_words(monkeypatch):
    """A TIFF's offsets are 32-bit: an output whose compressed samples passed 4 GB failed in
    Pillow's directory writer as "cannot encode as TIFF (argument out of range)". It says what is
    wrong and what to do. (The limit is lowered here; 4 GB of samples is no unit test.)"""
    picture = Picture(np.random.default_rng(0).random((64, 64, 3), dtype=np.float32), 8, {})
    size = len(encode_image(picture, "TIFF"))
    monkeypatch.setattr(tiff, "ADDRESSABLE", size - 2000 + 2**16)
    with pytest.raises(ImageError, match=r"^big\.tif: cannot encode as TIFF \(its compressed samples take 0\.0 GB, past the 0\.0 GB "
                                         r"a TIFF's 32-bit offsets reach; use --format png\)$"):
        encode_image(picture, "TIFF", "big.tif")
    monkeypatch.setattr(tiff, "ADDRESSABLE", size + 2**16)
    assert len(encode_image(picture, "TIFF")) == size


def test_8bit_gray_alpha_tiff_reads_back():
    ga = np.random.default_rng(4).integers(0, 256, (7, 5, 2), dtype=np.uint8)
    back = read_image(encode_image(Picture(ga.astype(np.float32) / 255, 8), "TIFF"))
    assert back.bit_depth == 8
    np.testing.assert_array_equal(np.rint(back.pixels * 255), ga)


def test_a_camera_jpeg_to_tiff_keeps_its_exif(tmp_path, tiny_base, tiny_lora):
    """It stopped the whole run: "unexpected RuntimeError: Error setting from dictionary" (exit 3)."""
    from typer.testing import CliRunner

    from conftest import photo_like
    from icmsr_cli.cli import app

    Image.fromarray(photo_like(24, 16)).save(tmp_path / "cam.jpg", exif=_exif())
    result = CliRunner().invoke(app, ["upscale", str(tmp_path / "cam.jpg"), "-o", str(tmp_path / "cam.tiff"), "-s", "2",
                                      "--base", str(tiny_base), "--lora", str(tiny_lora), "--tile", "off"])
    assert result.exit_code == 0, result.output
    with Image.open(tmp_path / "cam.tiff") as im:
        assert im.size == (32, 48) and im.mode == "RGB"  # upright: the EXIF's orientation 6 applied
        assert im.getexif().get(0x010F) == "TestCam"
        assert im.getexif().get_ifd(0x8769).get(0x9003) == "2020:01:02 03:04:05"


@pytest.mark.parametrize("bits", [8, 16])
def test_a_tiff_sources_camera_tags_reach_every_output(bits):
    """A TIFF keeps make, model, dates, copyright and its Exif and GPS directories among its own
    tags, not in an EXIF block; every output of a TIFF source lost them. They now go on as the
    output's EXIF block, and the TIFF's layout, orientation (applied) and Photoshop's resources
    do not."""
    exif = Image.Exif()
    exif.update({0x010F: "ScanCam", 0x0110: "Model 9", 0x8298: "(c) Someone", 0x0132: "2021:02:03 04:05:06"})
    # the Interop directory only where icmsr's writer makes the source: Pillow's drops the whole block for it
    exif[0x8769] = {0x9003: "2020:01:02 03:04:05", 0x829A: (1, 250), **({0xA005: {0x0001: "R98"}} if bits == 16 else {})}
    exif[0x8825] = {0x0001: "N", 0x0002: (52.0, 31.0, 12.5)}
    samples = (np.arange(12 * 20 * 3).reshape(12, 20, 3) % 251).astype(np.uint8)
    if bits == 8:
        buf = io.BytesIO()
        exif.update({0x0112: 6, 34377: b"8BIM" + bytes(40)})  # Pillow's writer takes tiffinfo or exif, not both
        Image.fromarray(samples).save(buf, "TIFF", exif=exif.tobytes())
        data = buf.getvalue()
    else:  # icmsr's own writer puts the block's tags in the file's directory, as Pillow's does
        data = tiff.encode_tiff(samples.astype(np.uint16) * 257, exif=exif.tobytes())
    with Image.open(io.BytesIO(data)) as im:
        exposure = im.getexif().get_ifd(0x8769)[0x829A]  # as Pillow reads the source
    picture = read_image(data)
    assert picture.size == ((12, 20) if bits == 8 else (20, 12))  # the 8-bit file's orientation applied
    for target in ("JPEG", "PNG", "WEBP", "TIFF"):
        with Image.open(io.BytesIO(encode_image(picture, target))) as im:
            out = im.getexif()
            assert (out.get(0x010F), out.get(0x0110), out.get(0x8298), out.get(0x0132)) == (
                "ScanCam", "Model 9", "(c) Someone", "2021:02:03 04:05:06"), target
            assert out.get_ifd(0x8769).get(0x9003) == "2020:01:02 03:04:05" and out.get_ifd(0x8769).get(0x829A) == exposure, target
            if bits == 16:
                assert out.get_ifd(0xA005).get(0x0001) == "R98", target
            assert out.get_ifd(0x8825).get(0x0001) == "N" and out.get_ifd(0x8825).get(0x0002) == (52.0, 31.0, 12.5), target
            assert out.get(0x0112) is None and 34377 not in out, target
            if target != "TIFF":  # the TIFF's own layout tags are its own, checked by the tests above
                assert not set(out) & {256, 257, 258, 259, 262, 273, 277, 278, 279}, target


def test_utf8_in_text_tags_survives_the_tiff_writer():
    """Cameras and editors put UTF-8 in EXIF's text tags (an artist "Jörg", a lens "Café 50mm");
    Pillow reads them as Latin-1 and writes them as ASCII, so a TIFF output, or any output of a
    TIFF source, said "J??rg". The bytes now go out as they came in."""
    artist, lens = "Jörg Müller".encode() + b"\0", "Café 50mm".encode() + b"\0"
    exif_ifd = 8 + 2 + 2 * 12 + 4  # IFD0: Artist, the Exif IFD's pointer; then the Exif IFD: LensModel; then the strings
    strings = exif_ifd + 2 + 12 + 4
    block = (b"II*\0" + struct.pack("<I", 8)
             + struct.pack("<HHHII", 2, 0x013B, 2, len(artist), strings) + struct.pack("<HHII", 0x8769, 4, 1, exif_ifd) + bytes(4)
             + struct.pack("<HHHII", 1, 0xA434, 2, len(lens), strings + len(artist)) + bytes(4) + artist + lens)
    buf = io.BytesIO()
    Image.fromarray(np.zeros((6, 8, 3), np.uint8)).save(buf, "JPEG", exif=b"Exif\0\0" + block)
    tif = encode_image(read_image(buf.getvalue()), "TIFF")
    png = encode_image(read_image(tif), "PNG")  # a TIFF source's tags, as the output's EXIF block
    for data in (tif, png):
        with Image.open(io.BytesIO(data)) as im:
            out = im.getexif()
            assert out[0x013B].encode("latin-1") + b"\0" == artist
            assert out.get_ifd(0x8769)[0xA434].encode("latin-1") + b"\0" == lens


def test_bad_input_is_refused():
    for bad in (np.zeros((4, 4, 3), np.float32), np.zeros((4, 4, 2), np.uint16), np.zeros((4, 4), np.uint16),
                np.zeros((4, 4, 5), np.uint8)):
        with pytest.raises(ValueError):
            tiff.encode_tiff(bad)


def _planar_tiff(samples: np.ndarray, *, order: str, rows_per_strip: int, deflate: bool, photometric: int = 2,
                 planar: bool = True, extra: int | None = 2, predictor: bool = False, signed: bool = False, bits: int = 16,
                 xz: bool = False, orientation: int | None = None) -> bytes:
    """A 16-bit (or `bits`-bit) TIFF stored plane by plane (PlanarConfiguration 2; one plane is just gray), or
    interleaved (`planar` False), built by hand from the TIFF 6.0 layout: every plane's strips, in
    plane order, then one tag directory. Samples after the colour ones are ExtraSamples of kind
    `extra`; `predictor` stores each sample as its difference from the same sample of the pixel to
    its left (horizontal differencing, modulo 2^bits)."""
    import lzma
    import struct
    import zlib

    h, w, c = samples.shape
    dtype = {8: np.uint8, 16: np.uint16, 32: np.uint32}[bits]
    body, offsets, counts = b"", [], []
    for p in range(c if planar else 1):
        for y in range(0, h, rows_per_strip):
            rows = (samples[y : y + rows_per_strip, :, p] if planar else samples[y : y + rows_per_strip]).astype(dtype)
            if predictor:
                rows = np.concatenate([rows[:, :1], rows[:, 1:] - rows[:, :-1]], axis=1)  # unsigned: wraps
            strip = rows.astype(order + f"u{bits // 8}").tobytes()
            strip = zlib.compress(strip) if deflate else lzma.compress(strip) if xz else strip
            offsets.append(8 + len(body))
            counts.append(len(strip))
            body += strip + bytes(len(strip) % 2)
    entries = [(256, 4, [w]), (257, 4, [h]), (258, 3, [bits] * c), (259, 3, [8 if deflate else 34925 if xz else 1]), (262, 3, [photometric]),
               (273, 4, offsets), (277, 3, [c]), (278, 4, [rows_per_strip]), (279, 4, counts), (284, 3, [2 if c > 1 and planar else 1])]
    colour = 3 if photometric == 2 else 1
    if c > colour and extra is not None:
        entries.append((338, 3, [extra] * (c - colour)))  # 2: unassociated alpha
    if predictor:
        entries.append((317, 3, [2]))
    if signed:
        entries.append((339, 3, [2] * c))
    if orientation is not None:
        entries.append((274, 3, [orientation]))
    entries.sort()
    at = 8 + len(body)
    extra_at, head, tail = at + 2 + 12 * len(entries) + 4, struct.pack(order + "H", len(entries)), b""
    for tag, kind, values in entries:
        packed = struct.pack(order + ("H" if kind == 3 else "I") * len(values), *values)
        if len(packed) <= 4:
            head += struct.pack(order + "HHI", tag, kind, len(values)) + packed.ljust(4, b"\0")
        else:
            head += struct.pack(order + "HHII", tag, kind, len(values), extra_at + len(tail))
            tail += packed
    return (b"II*\0" if order == "<" else b"MM\0*") + struct.pack(order + "I", at) + body + head + bytes(4) + tail


@pytest.mark.parametrize("order, rows, deflate, channels", [("<", 40, False, 3), (">", 7, True, 3), ("<", 16, True, 4)])
def test_16bit_tiff_stored_plane_by_plane_reads_exactly(order, rows, deflate, channels):
    """Photoshop's "Per Channel" TIFF: OpenCV read the second and third planes from the wrong places,
    so a 16-bit file came out in wrong colours without an error (Pillow would cut it to 8 bits)."""
    rng = np.random.default_rng(rows)
    samples = rng.integers(0, 65536, (40, 24, channels), dtype=np.uint16)
    picture = read_image(_planar_tiff(samples, order=order, rows_per_strip=rows, deflate=deflate))
    assert picture.bit_depth == 16 and picture.pixels.shape == samples.shape
    np.testing.assert_array_equal(np.round(picture.pixels * 65535).astype(np.uint16), samples)


def test_16bit_white_is_zero_gray_tiff_is_inverted():
    """PhotometricInterpretation 0 (WhiteIsZero): Pillow inverts it at 8 bits only; 16-bit scans
    came out as negatives."""
    samples = np.random.default_rng(0).integers(0, 65536, (6, 10, 1), dtype=np.uint16)
    picture = read_image(_planar_tiff(samples, order="<", rows_per_strip=6, deflate=False, photometric=0))
    np.testing.assert_array_equal(np.round(picture.pixels * 65535).astype(np.uint16), 65535 - samples)


@pytest.mark.parametrize("planar", [False, True])
def test_a_16bit_tiffs_extra_channel_is_transparency_only_when_it_says_so(planar):
    """Photoshop saves a selection or mask as an extra sample of unspecified meaning: Pillow drops it
    at 8 bits, but OpenCV took it as alpha at 16, so the picture came out transparent where the mask
    was dark. Premultiplied (associated) alpha is divided out, as Pillow does at 8 bits."""
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 65536, (12, 10, 3), dtype=np.uint16)
    alpha = rng.integers(1, 65536, (12, 10, 1), dtype=np.uint16)
    mask = np.concatenate([rgb, alpha], axis=2)
    picture = read_image(_planar_tiff(mask, order="<", rows_per_strip=5, deflate=True, planar=planar, extra=0))
    assert picture.pixels.shape == (12, 10, 3)
    np.testing.assert_array_equal(np.round(picture.pixels * 65535).astype(np.uint16), rgb)
    for declared in (2, None):  # unassociated, or not declared at all (Pillow takes that as alpha too): as stored
        picture = read_image(_planar_tiff(mask, order=">", rows_per_strip=5, deflate=False, planar=planar, extra=declared))
        np.testing.assert_array_equal(np.round(picture.pixels * 65535).astype(np.uint16), mask)
    premultiplied = np.concatenate([np.round(rgb * (alpha / 65535)).astype(np.uint16), alpha], axis=2)
    picture = read_image(_planar_tiff(premultiplied, order="<", rows_per_strip=12, deflate=False, planar=planar, extra=1))
    np.testing.assert_array_equal(np.round(picture.pixels[..., 3] * 65535).astype(np.uint16), alpha[..., 0])
    expected = np.clip(premultiplied[..., :3] / alpha.astype(np.float64), 0, 1)  # what the file holds, divided out
    np.testing.assert_allclose(picture.pixels[..., :3], expected, atol=1e-6)


def test_a_tiff_no_reader_takes_says_what_it_holds():
    """"not a recognised image format" for a valid TIFF sent users looking for a damaged file; the
    error now names the layout (16-bit signed gray with alpha: neither Pillow nor OpenCV reads it)."""
    samples = np.random.default_rng(2).integers(0, 65536, (6, 10, 2), dtype=np.uint16)
    with pytest.raises(ImageError, match=r"^la\.tif: cannot read this kind of TIFF \(16-bit signed gray, 2 samples per pixel\); "
                                         r"icmsr reads 8- and 16-bit gray, gray \+ alpha, RGB and RGBA, CMYK, and 32-bit float RGB$"):
        read_image(_planar_tiff(samples, order="<", rows_per_strip=6, deflate=False, photometric=1, planar=False, signed=True),
                   name="la.tif")
    with pytest.raises(ImageError, match=r"^junk\.tif: cannot read image \(not a recognised image format\)$"):
        read_image(b"II*\0" + struct.pack("<IH", 8, 0) + bytes(4), name="junk.tif")  # a directory with no tags


@pytest.mark.parametrize("order, planar, predictor, deflate", [("<", False, False, False), (">", False, True, True),
                                                              ("<", False, True, False), (">", True, True, True)])
def test_16bit_gray_alpha_and_colour_with_two_extras_read_exactly(order, planar, predictor, deflate):
    """GIMP and Photoshop save 16-bit gray with transparency as a gray + alpha TIFF, and Photoshop
    keeps a saved selection beside an alpha channel as a second extra: neither Pillow nor OpenCV
    opens either, so each was refused. Exact samples, whatever the byte order, storage order or
    horizontal differencing; WhiteIsZero inverted; the extras as at every other depth."""
    rng = np.random.default_rng(7)
    gray_alpha = rng.integers(0, 65536, (13, 11, 2), dtype=np.uint16)
    for photometric, expected in ((1, gray_alpha), (0, np.dstack([65535 - gray_alpha[..., 0], gray_alpha[..., 1]]))):
        picture = read_image(_planar_tiff(gray_alpha, order=order, rows_per_strip=5, deflate=deflate, photometric=photometric,
                                          planar=planar, predictor=predictor))
        assert picture.bit_depth == 16 and picture.format == "TIFF"
        np.testing.assert_array_equal(np.round(picture.pixels * 65535).astype(np.uint16), expected)
    picture = read_image(_planar_tiff(gray_alpha, order=order, rows_per_strip=13, deflate=deflate, photometric=1, planar=planar,
                                      predictor=predictor, extra=0))  # a mask, not transparency
    np.testing.assert_array_equal(np.round(picture.pixels * 65535).astype(np.uint16), gray_alpha[..., :1])
    five = rng.integers(0, 65536, (9, 7, 5), dtype=np.uint16)  # RGB, alpha, a saved selection
    picture = read_image(_planar_tiff(five, order=order, rows_per_strip=4, deflate=deflate, planar=planar, predictor=predictor))
    np.testing.assert_array_equal(np.round(picture.pixels * 65535).astype(np.uint16), five[..., :4])


@pytest.mark.parametrize("order, predictor, deflate", [("<", False, False), (">", True, True)])
def test_8bit_tiffs_stored_plane_by_plane_with_extras_read_exactly(order, predictor, deflate):
    """Photoshop's "Per Channel" order at 8 bits: Pillow opens gray + alpha, premultiplied alpha
    and colour with two extras stored so, then fails to unpack them ("cannot read image (unknown
    raw mode for given image mode)"), and refused colour with a saved selection. They are read as
    their 16-bit counterparts are: exact samples, the extras as at every other depth."""
    rng = np.random.default_rng(8)

    def read(samples, extra):
        picture = read_image(_planar_tiff(samples, order=order, rows_per_strip=5, deflate=deflate, photometric=1 if samples.shape[2] == 2 else 2,
                                          extra=extra, predictor=predictor, bits=8), name="scan.tif")
        assert picture.bit_depth == 8 and picture.format == "TIFF"
        return picture.pixels

    def as_samples(pixels):
        return np.round(pixels * 255).astype(np.uint8)

    gray_alpha = rng.integers(0, 256, (11, 9, 2), dtype=np.uint8)
    np.testing.assert_array_equal(as_samples(read(gray_alpha, 2)), gray_alpha)
    rgb_mask = rng.integers(0, 256, (11, 9, 4), dtype=np.uint8)
    np.testing.assert_array_equal(as_samples(read(rgb_mask, 0)), rgb_mask[..., :3])  # a saved selection, not transparency
    five = rng.integers(0, 256, (11, 9, 5), dtype=np.uint8)  # RGB, alpha, a saved selection
    np.testing.assert_array_equal(as_samples(read(five, 2)), five[..., :4])
    alpha = rng.integers(1, 256, (11, 9, 1), dtype=np.uint8)
    premultiplied = np.concatenate([np.round(rgb_mask[..., :3] * (alpha / 255)).astype(np.uint8), alpha], axis=2)
    pixels = read(premultiplied, 1)
    np.testing.assert_array_equal(as_samples(pixels[..., 3:]), alpha)
    np.testing.assert_allclose(pixels[..., :3], np.clip(premultiplied[..., :3] / alpha.astype(np.float64), 0, 1), atol=1e-6)


@pytest.mark.parametrize("tag, value", [(254, 1), (50706, b"\x01\x04\x00\x00")])
def test_a_raw_files_preview_is_not_taken_for_the_picture(tag, value):
    """A camera raw file built on TIFF (DNG, NEF, ARW) opened as its first image, the small
    preview, and was upscaled from it in silence: a 12 MP photo came out as a 4x 256-px
    thumbnail. A reduced-size first image, or a DNG, is refused, and so is a raw file by name."""
    from PIL import TiffImagePlugin

    info = TiffImagePlugin.ImageFileDirectory_v2()
    info[tag] = value
    if tag == 50706:
        info.tagtype[tag] = 7  # the four version bytes (DNG writes them as BYTE, which Pillow writes one at a time)
    buf = io.BytesIO()
    Image.fromarray(np.zeros((16, 24, 3), np.uint8)).save(buf, "TIFF", tiffinfo=info)
    with pytest.raises(ImageError, match=r"^raw\.tif: (its first image is a reduced-size preview \(24x16\), as in camera raw files; )?"
                                         r"icmsr reads developed pictures, not camera raw data: export it as a 16-bit TIFF or PNG first"):
        read_image(buf.getvalue(), name="raw.tif")
    plain = io.BytesIO()
    Image.fromarray(np.zeros((16, 24, 3), np.uint8)).save(plain, "TIFF")
    assert read_image(plain.getvalue(), name="plain.tif").pixels.shape == (16, 24, 3)
    with pytest.raises(ImageError, match=r"^IMG_0001\.NEF: icmsr reads developed pictures, not camera raw data"):
        read_image(plain.getvalue(), name="IMG_0001.NEF")


def test_a_damaged_later_page_does_not_lose_the_first():
    """Counting a TIFF's pages parses each page's directory: a second page without its width
    raised TypeError ("Missing dimensions"), which ended the whole batch as "a bug in icmsr"
    (found by fuzzing). The first page is read."""
    from conftest import photo_like

    first = photo_like(12, 8)
    buf = io.BytesIO()
    Image.fromarray(first).save(buf, "TIFF", save_all=True, append_images=[Image.fromarray(photo_like(6, 4, seed=1))])
    data = bytearray(buf.getvalue())
    order = "<" if data[:2] == b"II" else ">"
    at = struct.unpack_from(order + "I", data, 4)[0]
    at = struct.unpack_from(order + "I", data, at + 2 + 12 * struct.unpack_from(order + "H", data, at)[0])[0]  # the second page's
    for k in range(struct.unpack_from(order + "H", data, at)[0]):
        if struct.unpack_from(order + "H", data, at + 2 + 12 * k)[0] == 256:  # ImageWidth, renamed to a private tag
            struct.pack_into(order + "H", data, at + 2 + 12 * k, 0xFFF0)
    picture = read_image(bytes(data), name="scan.tif")
    np.testing.assert_array_equal(np.round(picture.pixels * 255).astype(np.uint8), first)


def test_a_layout_tag_of_the_wrong_type_is_an_unreadable_file_not_a_crash():
    """A TIFF whose PhotometricInterpretation is stored as text (a damaged file): Pillow will not
    open it, and the readers that look at such files next failed on int('\\x02') with ValueError,
    which ended the whole batch as "a bug in icmsr" (found by fuzzing). It is one file that
    cannot be read, saying what it holds."""
    from conftest import photo_like

    buf = io.BytesIO()
    Image.fromarray(photo_like(12, 8)).save(buf, "TIFF")
    data = bytearray(buf.getvalue())
    order = "<" if data[:2] == b"II" else ">"
    at = struct.unpack_from(order + "I", data, 4)[0]
    for k in range(struct.unpack_from(order + "H", data, at)[0]):
        entry = at + 2 + 12 * k
        if struct.unpack_from(order + "H", data, entry)[0] == 262:
            struct.pack_into(order + "H", data, entry + 2, 2)  # SHORT -> ASCII: its value reads as "\x02"
    with pytest.raises(ImageError, match=r"^scan\.tif: cannot read this kind of TIFF \(8-bit unsigned unknown colour, 3 samples per pixel\)"):
        read_image(bytes(data), name="scan.tif")


def test_unsigned_32_bit_gray_over_half_its_range_is_white_not_black():
    """32-bit integer samples are read as 0-65535 and what lies above is cut, with a note; but
    Pillow holds unsigned 32-bit samples as signed, so values of 2^31 and up read as negative and
    were cut to black, under a note saying they were cut to the range's top."""
    values = np.array([[0, 30000, 65535, 2**31 - 1, 2**31, 2**32 - 1]], np.uint32)[..., None]
    data = _planar_tiff(values, order="<", rows_per_strip=1, deflate=False, photometric=1, planar=False, bits=32)
    picture = read_image(data, name="counts.tif")
    np.testing.assert_allclose(picture.pixels[0, :, 0], [0, 30000 / 65535, 1, 1, 1, 1], rtol=1e-6)
    assert picture.bit_depth == 16 and picture.clipped == pytest.approx(3 / 6)


def test_unsigned_32_bit_gray_turned_upright_keeps_its_top_half_white():
    """The same samples in a file whose orientation turns them. Pillow turns a TIFF as it loads it,
    before the unsigned reading: a turn made afterwards, on a copy without the file's format and
    tags, would skip that reading and send 2^31 and up to black again."""
    values = np.array([[0, 30000, 65535, 2**31 - 1, 2**31, 2**32 - 1]], np.uint32)[..., None]
    data = _planar_tiff(values, order="<", rows_per_strip=1, deflate=False, photometric=1, planar=False, bits=32, orientation=3)
    picture = read_image(data, name="counts.tif")
    np.testing.assert_allclose(picture.pixels[0, :, 0], [1, 1, 1, 1, 30000 / 65535, 0], rtol=1e-6)
    assert picture.clipped == pytest.approx(3 / 6)


def test_a_16_bit_tiff_opencv_cannot_decode_is_read_at_8_bits_and_said():
    """An LZMA (or zstd) TIFF, as GDAL writes: OpenCV's libtiff decodes neither, and 16-bit colour
    is read through OpenCV, so the file was refused ("cannot decode this 16-bit image") though
    Pillow's libtiff reads it, at 8 bits. It is now read so, and said."""
    from conftest import photo_like

    rgba = np.dstack([photo_like(12, 8), np.linspace(0, 255, 96).reshape(8, 12)]).astype(np.uint16) * 257
    data = _planar_tiff(rgba, order="<", rows_per_strip=8, deflate=False, planar=False, xz=True)
    picture = read_image(data, name="gdal.tif")
    assert picture.bit_depth == 8 and picture.notes == (
        "16-bit colour with LZMA compression, which OpenCV does not decode, is read at 8 bits per channel, so the output is 8-bit",)
    np.testing.assert_array_equal(np.rint(picture.pixels * 255), rgba >> 8)
