"""Nothing lost in the field: collisions, output inside input, formats that cannot hold an image,
a full disk, an unusable cache, signals, failures that must not stop or double, odd file names.
Real files through real encoders; a real small filesystem where the disk must fill."""

from __future__ import annotations

import io
import json
import os
import signal
import stat
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import ExifTags, Image, ImageOps
from typer.testing import CliRunner

from conftest import photo_like
from icmsr_cli.cli import app
from icmsr_cli.errors import SetupError


@pytest.fixture
def model(tiny_base, tiny_lora):
    return ["--base", str(tiny_base), "--lora", str(tiny_lora), "--tile", "off"]


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def errors(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def _cli(*args):
    return [sys.executable, "-m", "icmsr_cli", *map(str, args)]


# ------------------------------------------------------------------------------ files and folders


def test_same_name_from_two_folders_is_refused_naming_both(tmp_path, model):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        Image.fromarray(photo_like(16, 16, seed=ord(folder))).save(tmp_path / folder / "x.png")
    out = tmp_path / "out"
    result = invoke("upscale", tmp_path / "a" / "x.png", tmp_path / "b" / "x.png", "-o", out, *model)
    assert result.exit_code == 2
    assert errors(result) == [f"error: {tmp_path / 'a' / 'x.png'} and {tmp_path / 'b' / 'x.png'} would both be written to "
                              f"{out / 'x.png'}; upscale them into separate output folders"]
    assert not out.exists() or not list(out.iterdir())
    # the same through a glob over two folders, and through --format making a.png and a.jpg one output
    Image.fromarray(photo_like(16, 16)).save(tmp_path / "a" / "x.jpg")
    assert invoke("upscale", str(tmp_path / "*" / "x.png"), "-o", out, *model).exit_code == 2
    assert invoke("upscale", tmp_path / "a", "-o", out, "--format", "png", *model).exit_code == 2
    assert not out.exists() or not list(out.iterdir())


def test_output_folder_inside_the_input_is_not_read_back(tmp_path, model):
    src = tmp_path / "photos"
    src.mkdir()
    Image.fromarray(photo_like(16, 16)).save(src / "one.png")
    out = src / "big"
    args = ["upscale", src, "-r", "-o", out, "-s", "2", "--json", *model]
    first = invoke(*args)
    assert first.exit_code == 0, first.output
    rerun = invoke(*args)
    assert rerun.exit_code == 0, rerun.output
    records = [json.loads(line) for line in rerun.stdout.splitlines()]
    assert [(Path(r["input"]).name, r["status"]) for r in records] == [("one.png", "skipped")]
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == [Path("one.png")]
    same = invoke("upscale", src, "-o", src, *model)
    assert same.exit_code == 2 and "is an input folder" in same.stderr


@pytest.mark.skipif(os.name == "nt", reason="named pipes and /dev are POSIX")
def test_a_device_named_as_input_is_refused_before_the_model(tmp_path):
    """`icmsr upscale /dev/zero` (or a disk, /dev/sda) read the device whole: memory filled until
    the system killed the run. Refused at once, before the model loads (the --base here does not
    exist); the subprocess's memory is capped, so that the old code fails rather than fills this
    machine's."""
    import resource

    def capped():
        resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))

    proc = subprocess.run(_cli("upscale", "/dev/zero", "-o", tmp_path / "out.png", "--base", tmp_path / "no-model"),
                          capture_output=True, text=True, timeout=120, preexec_fn=capped)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == ["error: /dev/zero: is a device, not an image file"], proc.stderr


def test_an_output_too_large_for_memory_is_refused_before_the_model_loads(tmp_path):
    """`--scale 1e5` was refused for memory (upscaler.check_host_memory) only once the model had
    loaded (half a minute on a CPU, for a full-size model) and the model was ready. It is refused
    as the file is read: the --base here does not exist, and is never looked at."""
    src = tmp_path / "small.png"
    Image.fromarray(photo_like(40, 30)).save(src)
    proc = subprocess.run(_cli("upscale", src, "-o", tmp_path / "out.png", "-s", "1e5", "--base", tmp_path / "no-model"),
                          capture_output=True, text=True, timeout=120)
    [line] = proc.stderr.splitlines()
    assert proc.returncode == 1 and line.startswith(f"error: {src}: a 4000000x3000000 output needs about "), proc.stderr
    assert line.endswith(" GB is available; use a smaller --scale")


@pytest.mark.skipif(os.name == "nt", reason="Pillow links libtiff into itself on Windows, out of reach")
@pytest.mark.parametrize("compression", ["tiff_lzw", "tiff_deflate"])
def test_a_damaged_tiff_fails_in_one_line_without_libtiffs_own(tmp_path, compression):
    """Pillow's libtiff printed its own lines first ("tempfile.tif: Using code not yet in table.",
    naming no file of the user's; "ZIPDecode: Decoding error at scanline 0, ..."), and the error
    then said "decoder error -2". One line now, naming the file and what is wrong with it."""
    buf = io.BytesIO()
    Image.fromarray(photo_like(64, 64)).save(buf, "TIFF", compression=compression)
    data = bytearray(buf.getvalue())
    data[8:4008] = b"\xff" * 4000  # the strip's compressed bytes (Pillow puts the directory after them)
    src = tmp_path / "scan.tif"
    src.write_bytes(data)
    proc = subprocess.run(_cli("upscale", src, "-o", tmp_path / "out.png", "--base", tmp_path / "no-model"),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr.splitlines() == [f"error: {src}: cannot read image (damaged or truncated data)"], proc.stderr


@pytest.mark.skipif(os.name == "nt", reason="named pipes and /dev are POSIX")
@pytest.mark.parametrize("kind", ["stdin", "pipe", "file"])
def test_an_input_larger_than_any_image_within_the_pixel_limit_is_refused(tmp_path, model, kind):
    """`cat /dev/zero | icmsr upscale -` (or an endless download through bash's <(curl ...)) was
    read until memory ran out, and a file was read whole however large. A stream is read up to the
    most bytes an image within --max-pixels needs (images.byte_limit) and refused there; a larger
    file is refused unread. Memory is capped, so that the old code fails rather than fills this
    machine's."""
    import resource

    from icmsr_cli.io.images import byte_limit

    def capped():
        resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))

    limit, writer, stdin = byte_limit(1000), None, subprocess.DEVNULL
    if kind == "stdin":
        source, name, stdin = "-", "<stdin>", open("/dev/zero", "rb")
    elif kind == "pipe":
        source = name = tmp_path / "download"
        os.mkfifo(source)
        writer = subprocess.Popen(["sh", "-c", f"cat /dev/zero > '{source}'"], stderr=subprocess.DEVNULL)
    else:
        source = name = tmp_path / "huge.tif"
        with open(source, "wb") as f:
            f.truncate(limit + 1)  # sparse: no disk taken
    try:
        proc = subprocess.run(_cli("upscale", source, "-o", tmp_path / "out.png", "--max-pixels", 1000, *model),
                              stdin=stdin, capture_output=True, text=True, timeout=300, preexec_fn=capped)
    finally:
        if writer is not None:
            writer.kill()
            writer.wait()
        if stdin is not subprocess.DEVNULL:
            stdin.close()
    assert proc.returncode == 1 and errors(proc) == [
        f"error: {name}: over {limit:,} bytes, more than any image within the pixel limit (1,000) needs; raise --max-pixels to allow it"], proc.stderr
    assert not (tmp_path / "out.png").exists()


def test_devices_pipes_and_dev_paths_are_refused_as_outputs(tmp_path, model):
    """-o on a named pipe said "exists, skipped" (and with --overwrite replaced the pipe by a
    file); -o /dev/null --format png wrote /dev/null.png; -o /dev/stdout with its output in a file
    and --overwrite replaced /dev/stdout itself when run as root. Each is refused before any work,
    pointing to -o -. /dev/shm, a RAM file system, stays a place for files."""
    from icmsr_cli.io import batch

    src = tmp_path / "in.png"
    Image.fromarray(photo_like(8, 8)).save(src)
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    for output in (pipe, "/dev/null"):
        result = invoke("upscale", src, "-o", output, "--overwrite", *model)
        assert result.exit_code == 2, result.output
        assert errors(result) == [f"error: {output}: is a device or a pipe, not a file or folder; "
                                  "to discard the image or pipe it on, use -o - and redirect standard output"]
    assert stat.S_ISFIFO(os.stat(pipe).st_mode)
    for output in ("/dev/stdout", "/dev/icmsr-test.png", "/proc/icmsr/x.png"):
        with pytest.raises(SetupError, match="which holds devices, not image files"):
            batch.plan([str(src)], output)
    if Path("/dev/shm").is_dir():
        jobs, _ = batch.plan([str(src)], "/dev/shm/icmsr-test.png")
        assert [job.target for job in jobs] == [Path("/dev/shm/icmsr-test.png")]


@pytest.mark.parametrize("mode, bits", [("RGBA", 8), ("LA", 8), ("RGBA", 16)])
def test_an_alpha_channel_opaque_everywhere_does_not_keep_a_photo_from_jpeg(tmp_path, mode, bits):
    """Screenshots and many editors' PNG exports carry an alpha channel that is opaque everywhere:
    --format jpg refused each as "has an alpha channel, which JPEG cannot store", though the alpha
    held nothing to lose. It is left out; one transparent pixel is still refused."""
    from icmsr_cli.errors import ImageError
    from icmsr_cli.io import batch
    from icmsr_cli.io.images import fit_to_format, read_image

    top = 2**bits - 1
    rgb = photo_like(20, 14).astype(np.uint16) * (257 if bits == 16 else 1)
    samples = np.dstack([rgb[..., :1] if mode == "LA" else rgb, np.full((14, 20), top, rgb.dtype)])
    src = tmp_path / "shot.png"
    if bits == 16:
        cv2.imwrite(str(src), samples[..., [2, 1, 0, 3]])
    else:
        Image.fromarray(samples.astype(np.uint8).squeeze(), mode).save(src)
    jobs, _ = batch.plan([str(src)], f"{tmp_path / 'out'}/", fmt="jpg")
    [result] = batch.run(batch.Reader(jobs, batch.BatchSettings()), lambda picture: picture)
    assert result.status == "done", result.error
    with Image.open(tmp_path / "out" / "shot.jpg") as im:
        assert im.mode == ("L" if mode == "LA" else "RGB")
        error = np.abs(np.asarray(im, np.float64) - samples[..., :-1].squeeze() / (257 if bits == 16 else 1))
        assert error.mean() < 6, error.mean()  # the picture itself, as JPEG keeps a busy 20x14 one (3.2 levels)
    picture = read_image(src)
    pixels = picture.pixels.copy()
    pixels[3, 5, -1] = 1 - 1 / top  # one pixel not quite opaque
    with pytest.raises(ImageError, match="has an alpha channel, which JPEG cannot store"):
        fit_to_format(picture.with_pixels(pixels), "JPEG")


@pytest.mark.parametrize("fmt", ["png", "jpg", "webp", "tiff", "bmp"])
@pytest.mark.parametrize("mode", ["LA", "RGBA"])
def test_alpha_images_to_every_format(tmp_path, model, fmt, mode):
    rgb = photo_like(20, 14)
    alpha = np.linspace(0, 255, 20 * 14).reshape(14, 20).astype(np.uint8)
    image = Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
    src = tmp_path / "in.png"
    (image.convert("LA") if mode == "LA" else image).save(src)
    out = tmp_path / "out"
    result = invoke("upscale", src, "-o", f"{out}/", "--format", fmt, "-s", "2", *model)
    target = out / f"in.{fmt}"
    assert "Traceback" not in result.output
    if fmt == "jpg":  # JPEG cannot hold alpha: refused with the reason, before the model loaded
        assert result.exit_code == 1
        assert errors(result) == [f"error: {src}: has an alpha channel, which JPEG cannot store; use --format png, webp or tiff"]
        assert "model ready" not in result.stderr and "->" not in result.stderr
        assert not target.exists()
        return
    assert result.exit_code == 0, result.output
    with Image.open(target) as im:
        assert im.size == (40, 28) and "A" in im.mode
        got_alpha = np.asarray(im.convert("RGBA"))[..., 3]
    expected = np.asarray(Image.fromarray(alpha).resize((40, 28), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(got_alpha, expected)
    if fmt == "bmp" and mode == "LA":
        assert result.stderr.count("BMP cannot store gray with alpha") == 1


def test_stdout_honours_format_and_defaults_to_the_input_format(tmp_path, tiny_base, tiny_lora):
    src = tmp_path / "in.jpg"
    Image.fromarray(photo_like(16, 12)).save(src)
    base = _cli("upscale", src, "-o", "-", "--base", tiny_base, "--lora", tiny_lora, "--tile", "off")
    for extra, expected in (([], "JPEG"), (["--format", "png"], "PNG"), (["--format", "webp"], "WEBP")):
        proc = subprocess.run(base + extra, capture_output=True, timeout=300)
        assert proc.returncode == 0, proc.stderr.decode()
        with Image.open(io.BytesIO(proc.stdout)) as im:
            assert im.format == expected and im.size == (64, 48)


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _with_exif(png: bytes, orientation: int) -> bytes:
    """The PNG with an eXIf chunk holding the orientation and a camera make, inserted after IHDR."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    exif[0x010F] = "TestCam"
    raw = exif.tobytes()
    raw = raw[6:] if raw.startswith(b"Exif\0\0") else raw
    ihdr_end = 8 + 4 + 4 + 13 + 4
    return png[:ihdr_end] + _png_chunk(b"eXIf", raw) + png[ihdr_end:]


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_same_geometry_in_8_and_16_bit(orientation):
    from icmsr_cli.io.images import read_image

    rgb = (np.arange(7 * 12 * 3).reshape(7, 12, 3) % 251).astype(np.uint8)  # no symmetry to hide a wrong turn
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    eight = read_image(_with_exif(buf.getvalue(), orientation))
    ok, png16 = cv2.imencode(".png", (rgb.astype(np.uint16) * 257)[..., ::-1])
    sixteen = read_image(_with_exif(png16.tobytes(), orientation))
    assert sixteen.bit_depth == 16 and eight.bit_depth == 8
    assert eight.pixels.shape == sixteen.pixels.shape
    np.testing.assert_allclose(eight.pixels, sixteen.pixels, atol=1e-6)
    for picture in (eight, sixteen):  # the EXIF goes on, its orientation done
        kept = Image.Exif()
        kept.load(picture.info.get("exif", b""))
        assert kept.get(0x010F) == "TestCam" and kept.get(0x0112, 1) == 1
    upright = np.asarray(Image.open(io.BytesIO(_with_exif(buf.getvalue(), orientation))).transpose(
        {2: 0, 3: 3, 4: 1, 5: 5, 6: 4, 7: 6, 8: 2}[orientation]) if orientation > 1 else Image.fromarray(rgb))
    np.testing.assert_array_equal(np.rint(eight.pixels * 255).astype(np.uint8), upright)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_a_tiffs_orientation_is_applied_once(orientation):
    """Pillow 10.0 turned a TIFF by its Orientation tag when it loaded it, and exif_transpose turned
    it again: every oriented TIFF came out turned twice (the floor is now 10.1). The TIFF tag gives
    the geometry an EXIF block's orientation gives a PNG, at 8 and 16 bits."""
    from icmsr_cli.io.images import read_image

    rgb = (np.arange(7 * 12 * 3).reshape(7, 12, 3) % 251).astype(np.uint8)
    png = io.BytesIO()
    Image.fromarray(rgb).save(png, format="PNG")
    expected = read_image(_with_exif(png.getvalue(), orientation)).pixels
    for image in (Image.fromarray(rgb), Image.fromarray(rgb[..., 0].astype(np.uint16) * 257).convert("I;16")):
        tif = io.BytesIO()
        image.save(tif, format="TIFF", tiffinfo={0x0112: orientation})
        picture = read_image(tif.getvalue())
        assert picture.pixels.shape[:2] == expected.shape[:2], (image.mode, orientation)
        np.testing.assert_allclose(picture.pixels[..., 0], expected[..., 0], atol=1e-6)


def _png_by_hand(samples: np.ndarray, colour_type: int, trns: bytes | None = None) -> bytes:
    """An 8- or 16-bit PNG written by hand (filter 0 on each row, an optional tRNS chunk): an
    encoder independent of ours, Pillow's and OpenCV's."""
    h, w = samples.shape[:2]
    depth = samples.dtype.itemsize * 8
    rows = samples.astype(">u2" if depth == 16 else np.uint8).reshape(h, -1).view(np.uint8)
    raw = np.concatenate([np.zeros((h, 1), np.uint8), rows], axis=1).tobytes()
    ihdr = struct.pack(">IIBBBBB", w, h, depth, colour_type, 0, 0, 0)
    extra = _png_chunk(b"tRNS", trns) if trns is not None else b""
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + extra + _png_chunk(b"IDAT", zlib.compress(raw))
            + _png_chunk(b"IEND", b""))


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
@pytest.mark.parametrize("channels", [1, 3])
def test_png_transparency_key_becomes_alpha(dtype, channels):
    """A gray or RGB PNG may mark one colour transparent (tRNS) instead of carrying alpha; it was
    read as opaque, and every keyed pixel came out solid."""
    from icmsr_cli.io.images import read_image

    top = np.iinfo(dtype).max
    rng = np.random.default_rng(channels)
    samples = rng.integers(1, top, (6, 8, channels), dtype=dtype)
    key = np.zeros(channels, dtype)
    keyed = rng.random((6, 8)) < 0.3
    samples[keyed] = key
    picture = read_image(_png_by_hand(samples, 0 if channels == 1 else 2, struct.pack(f">{channels}H", *key)))
    assert picture.pixels.shape == (6, 8, channels + 1) and picture.bit_depth == (16 if dtype == np.uint16 else 8)
    np.testing.assert_array_equal(picture.pixels[..., -1], (~keyed).astype(np.float32))
    np.testing.assert_allclose(picture.pixels[..., :channels], samples / top, atol=1e-7)


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_a_low_bit_gray_pngs_transparency_key_becomes_alpha(bits):
    """optipng and pngcrush store gray icons at 1, 2 or 4 bits with one value transparent (tRNS).
    Pillow compared that key, at the file's depth, with samples already widened to 8 bits: at 2
    and 4 bits nothing matched, and every transparent pixel came out opaque."""
    from icmsr_cli.io.images import read_image

    top = 2**bits - 1
    values = np.random.default_rng(bits).integers(0, top + 1, (5, 8))
    key = top // 2
    packed = np.packbits(np.unpackbits(values.astype(np.uint8)[..., None], axis=2)[..., 8 - bits:].reshape(5, -1), axis=1)
    raw = np.concatenate([np.zeros((5, 1), np.uint8), packed], axis=1).tobytes()
    data = (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 8, 5, bits, 0, 0, 0, 0))
            + _png_chunk(b"tRNS", struct.pack(">H", key)) + _png_chunk(b"IDAT", zlib.compress(raw)) + _png_chunk(b"IEND", b""))
    picture = read_image(data, name="icon.png")
    assert picture.pixels.shape == (5, 8, 2) and (values == key).any()
    np.testing.assert_array_equal(picture.pixels[..., 1], (values != key).astype(np.float32))
    np.testing.assert_array_equal(np.rint(picture.pixels[..., 0] * 255), values * (255 // top))


def test_16bit_gray_alpha_png_keeps_its_16_bits_and_stays_gray(tmp_path, model):
    from icmsr_cli.io.images import read_image

    rng = np.random.default_rng(7)
    ga = rng.integers(0, 65536, (9, 11, 2), dtype=np.uint16)  # not multiples of 257: 8 bits would lose them
    picture = read_image(_png_by_hand(ga, 4))
    assert picture.bit_depth == 16 and picture.pixels.shape == (9, 11, 2)
    np.testing.assert_array_equal(np.rint(picture.pixels * 65535).astype(np.uint16), ga)
    (tmp_path / "ga16.png").write_bytes(_png_by_hand(ga, 4))
    result = invoke("upscale", tmp_path / "ga16.png", "-o", tmp_path / "out.png", "-s", "2", *model)
    assert result.exit_code == 0, result.output
    out = (tmp_path / "out.png").read_bytes()
    assert out[24:26] == bytes([16, 4])  # IHDR: still 16-bit gray + alpha
    expected = Image.fromarray(ga[..., 1].astype(np.float32) / 65535).resize((22, 18), Image.Resampling.BICUBIC)
    got = cv2.imdecode(np.frombuffer(out, np.uint8), cv2.IMREAD_UNCHANGED)[..., 3]
    np.testing.assert_allclose(got / 65535, np.clip(np.asarray(expected), 0, 1), atol=1 / 65535)


def _cmyk_press_profile(corner_lab) -> bytes:
    """A minimal ICC v2 CMYK profile, built by hand: its A2B0 (lut8, 2 grid points a channel)
    maps each of the 16 CMYK corners to the Lab that corner_lab(c, m, y, k) gives (0 or 1 each)."""
    def s15(*values):
        return b"".join(struct.pack(">i", round(v * 65536)) for v in values)

    ramp, ident = bytes(range(256)), s15(1, 0, 0, 0, 1, 0, 0, 0, 1)
    clut = b"".join(bytes([round(L * 2.55), round(a) + 128, round(b) + 128])
                    for L, a, b in (corner_lab(*divmod(i, 8)[0:1], *((i >> s) & 1 for s in (2, 1, 0))) for i in range(16)))
    desc = b"test press\0"
    tags = [(b"desc", b"desc" + bytes(4) + struct.pack(">I", len(desc)) + desc + bytes(78)),
            (b"wtpt", b"XYZ " + bytes(4) + s15(0.9642, 1.0, 0.8249)),
            (b"A2B0", b"mft1" + bytes(4) + bytes([4, 3, 2, 0]) + ident + ramp * 4 + clut + ramp * 3),
            (b"B2A0", b"mft1" + bytes(4) + bytes([3, 4, 2, 0]) + ident + ramp * 3 + bytes(32) + ramp * 4)]
    start = 128 + 4 + 12 * len(tags)
    table, body = b"", b""
    for sig, data in tags:
        table += sig + struct.pack(">II", start + len(body), len(data))
        body += data + bytes(-len(data) % 4)
    header = (struct.pack(">I", start + len(body)) + bytes(4) + struct.pack(">I", 0x02100000) + b"prtrCMYKLab "
              + struct.pack(">6H", 2026, 1, 1, 0, 0, 0) + b"acsp" + bytes(28) + s15(0.9642, 1.0, 0.8249) + bytes(48))
    return header + struct.pack(">I", len(tags)) + table + body


def _lab_to_srgb(lab) -> np.ndarray:
    """CIE Lab (D50, the ICC connection space) to 8-bit sRGB by the published formulas: Lab ->
    XYZ, Bradford D50 -> D65, the sRGB matrix and transfer curve."""
    L, a, b = np.asarray(lab, np.float64).T
    fy = (L + 16) / 116
    f = np.stack([fy + a / 500, fy, fy - b / 200], axis=-1)
    xyz = np.where(f > 6 / 29, f ** 3, 3 * (6 / 29) ** 2 * (f - 4 / 29)) * [0.9642, 1.0, 0.8249]
    bradford = np.array([[0.9555766, -0.0230393, 0.0631636], [-0.0282895, 1.0099416, 0.0210077], [0.0122982, -0.0204830, 1.3299098]])
    to_rgb = np.array([[3.2404542, -1.5371385, -0.4985314], [-0.9692660, 1.8760108, 0.0415560], [0.0556434, -0.2040259, 1.0572252]])
    lin = np.clip(xyz @ bradford.T @ to_rgb.T, 0, 1)
    return np.where(lin <= 0.0031308, 12.92 * lin, 1.055 * lin ** (1 / 2.4) - 0.055) * 255


@pytest.mark.parametrize("fmt", ["JPEG", "TIFF"])
def test_cmyk_goes_to_rgb_through_its_own_profile(fmt):
    """A CMYK file (print-ready photos, stock images) carries the ICC profile of its press, and
    its inks are not the ideal ones: the plain conversion made pure cyan 0,255,255 where this
    press prints a dull blue-green, and the profile itself was dropped."""
    from icmsr_cli.io.images import read_image

    inks = {"paper": (100, 0, 0), "c": (58, -30, -45), "m": (50, 70, -5), "y": (90, -5, 85), "k": (20, 0, 0)}
    def corner(c, m, y, k):  # other corners: the inks' lightness multiplies, their hue averages
        on = [inks[n] for n, v in zip("cmyk", (c, m, y, k)) if v] or [inks["paper"]]
        return (100 * np.prod([p[0] / 100 for p in on]), np.mean([p[1] for p in on]), np.mean([p[2] for p in on]))

    profile = _cmyk_press_profile(corner)
    patches = [(0, 0, 0, 0), (255, 0, 0, 0), (0, 255, 0, 0), (0, 0, 255, 0), (0, 0, 0, 255)]
    cmyk = np.repeat(np.array(patches, np.uint8)[None], 16, axis=0).repeat(16, axis=0).repeat(16, axis=1)  # 16 x 80, JPEG-block aligned
    for icc, expected in [(profile, _lab_to_srgb([inks[n] for n in ("paper", "c", "m", "y", "k")])),
                          (profile[:200], np.array([[255, 255, 255], [0, 255, 255], [255, 0, 255], [255, 255, 0], [0, 0, 0]]))]:
        buf = io.BytesIO()  # ^ a damaged profile: the plain conversion, no error
        Image.fromarray(cmyk, "CMYK").save(buf, fmt, icc_profile=icc, **({"quality": 100} if fmt == "JPEG" else {}))
        picture = read_image(buf.getvalue())
        got = picture.pixels[8, 8::16] * 255
        np.testing.assert_allclose(got, expected, atol=3)
        assert "icc_profile" not in picture.info  # the output is sRGB, which needs no profile
    assert np.abs(_lab_to_srgb([inks["c"]]) - [0, 255, 255]).max() > 60  # the test tells the two apart


def _tiff_by_hand(samples: np.ndarray, photometric: int, compression: int = 1) -> bytes:
    """An uncompressed one-strip little-endian TIFF of 16-bit samples (H x W x C), as no writer
    here makes for CMYK."""
    h, w, c = samples.shape
    raw = samples.astype("<u2").tobytes()
    ifd_at = 8 + len(raw)
    bits_at = ifd_at + 2 + 12 * 10 + 4
    entries = [(256, 3, 1, w), (257, 3, 1, h), (258, 3, c, bits_at), (259, 3, 1, compression), (262, 3, 1, photometric),
               (273, 4, 1, 8), (277, 3, 1, c), (278, 3, 1, h), (279, 4, 1, len(raw)), (284, 3, 1, 1)]
    ifd = struct.pack("<H", len(entries)) + b"".join(
        struct.pack("<HHIHH", tag, kind, n, value, 0) if kind == 3 and n == 1 else struct.pack("<HHII", tag, kind, n, value)
        for tag, kind, n, value in entries)
    return b"II*\0" + struct.pack("<I", ifd_at) + raw + ifd + struct.pack("<I", 0) + struct.pack(f"<{c}H", *[16] * c)


def test_a_16_bit_cmyk_tiff_is_read_at_8_bits_and_said(tmp_path, model):
    """16-bit CMYK TIFF failed ("cannot decode this 16-bit image"): it was sent to OpenCV, whose
    libtiff cannot read it, and OpenCV printed three lines of its own errors. Pillow reads it at
    8 bits, which is now said; OpenCV's own logging stays quiet when it fails elsewhere."""
    from icmsr_cli.io.images import read_image

    cmyk = np.zeros((4, 6, 4), np.uint16)
    cmyk[:, :3] = (65535, 0, 0, 0)  # cyan
    cmyk[:, 3:] = (0, 0, 0, 32896)  # half black
    picture = read_image(_tiff_by_hand(cmyk, 5))
    assert picture.pixels.shape == (4, 6, 3) and picture.bit_depth == 8
    np.testing.assert_allclose(picture.pixels[0, [0, 5]] * 255, [[0, 255, 255], [127, 127, 127]], atol=1)  # no profile: the plain conversion
    assert picture.notes == ("16-bit CMYK is read at 8 bits per channel, so the output is 8-bit",)

    (tmp_path / "broken.tif").write_bytes(_tiff_by_hand(np.full((4, 6, 3), 9000, np.uint16), 2, compression=5))  # not LZW data
    (tmp_path / "cmyk.tif").write_bytes(_tiff_by_hand(cmyk, 5))
    proc = subprocess.run(_cli("upscale", tmp_path / "broken.tif", tmp_path / "cmyk.tif", "-o", tmp_path / "out", *model),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if not line.startswith("model ready")]
    assert lines[:2] == [f"error: {tmp_path / 'broken.tif'}: cannot decode this 16-bit image",  # and no OpenCV lines
                         f"note: {tmp_path / 'cmyk.tif'}: 16-bit CMYK is read at 8 bits per channel, so the output is 8-bit"], proc.stderr
    assert len(lines) == 4 and lines[2].startswith(f"{tmp_path / 'cmyk.tif'} -> {tmp_path / 'out' / 'cmyk.tif'} (24x16, ")
    assert lines[3] == "1 done, 0 skipped, 1 failed"


def test_an_output_too_large_for_its_format_is_refused_before_the_model(tmp_path, model):
    """A 4200x130 WebP at x4 (16800x520) ran the whole upscale (2.5 minutes with the tiny model on
    two cores, hours with the real one) and then failed in libwebp, whose limit is 16383 px a side."""
    from icmsr_cli.errors import ImageError
    from icmsr_cli.io.images import check_output_size

    Image.fromarray(photo_like(4200, 130)).save(tmp_path / "wide.webp", lossless=True)
    Image.fromarray(photo_like(16400, 8)).save(tmp_path / "long.jpg")
    started = time.perf_counter()
    result = invoke("upscale", tmp_path / "wide.webp", tmp_path / "long.jpg", "-o", tmp_path / "out", *model)
    assert result.exit_code == 1
    assert errors(result) == [
        f"error: {tmp_path / 'wide.webp'}: a 16800x520 output is too large for WEBP (at most 16383 px a side); use --format png or tiff, or a smaller --scale",
        f"error: {tmp_path / 'long.jpg'}: a 65600x32 output is too large for JPEG (at most 65500 px a side); use --format png or tiff, or a smaller --scale"]
    assert time.perf_counter() - started < 60 and not list((tmp_path / "out").rglob("*.*"))
    check_output_size("BMP", (30000, 30000), 3)  # 2.7 GB fits BMP's 32-bit sizes; with alpha, 3.6 GB too
    check_output_size("BMP", (30000, 30000), 2)
    with pytest.raises(ImageError, match="too large for BMP"):
        check_output_size("BMP", (34000, 34000), 4)  # 4.6 GB
    check_output_size("PNG", (100000, 100000), 3)


def test_heic_photos_say_what_reads_them_and_avif_is_not_taken_for_heic():
    """An iPhone's HEIC photo failed as "not a recognised image format". AVIF files, which are HEIF
    too and list HEIF's mif1 brand, must not be sent the HEIC advice."""
    import importlib.util

    from PIL import features

    from icmsr_cli.errors import ImageError
    from icmsr_cli.io.images import read_image

    heic = b"\0\0\0\x1cftypheic\0\0\0\0mif1heicmiaf" + bytes(64)  # an iPhone file's opening box, then nothing
    if importlib.util.find_spec("pillow_heif") is None:
        with pytest.raises(ImageError, match=r"^photo.heic: HEIC/HEIF photos need the pillow-heif package \(pip install pillow-heif\)"):
            read_image(heic, name="photo.heic")
    buf = io.BytesIO()
    rgb = np.zeros((16, 24, 3), np.uint8)
    rgb[:, 12:] = (30, 160, 220)
    if features.check("avif"):
        Image.fromarray(rgb).save(buf, "AVIF", quality=100)
        assert buf.getvalue()[4:12] == b"ftypavif" and b"mif1" in buf.getvalue()[:32]
        np.testing.assert_allclose(read_image(buf.getvalue()).pixels[8, 20] * 255, (30, 160, 220), atol=8)
    else:  # Pillow before 11.3
        with pytest.raises(ImageError, match="cannot read AVIF; Pillow 11.3 or later can"):
            read_image(b"\0\0\0\x20ftypavif\0\0\0\0avifmif1miafMA1B" + bytes(64), name="photo.avif")


def test_a_cielab_tiff_is_colour_without_alpha():
    """Pillow opens a CIELab TIFF as mode LAB; the A of its name was read as alpha, so the output
    gained an opaque alpha channel and a JPEG output was refused for "an alpha channel"."""
    from icmsr_cli.io.images import read_image

    labs = [(100, 0, 0), (58, -30, -45), (50, 70, -5), (90, -5, 85), (20, 0, 0)]
    samples = np.array([[(round(L * 2.55), a & 0xFF, b & 0xFF) for L, a, b in labs]], np.uint8)  # a*, b* signed
    buf = io.BytesIO()
    Image.fromarray(samples, "LAB").save(buf, "TIFF")
    picture = read_image(buf.getvalue())
    assert picture.pixels.shape == (1, 5, 3)
    stored = [(L8 / 2.55, a, b) for L8, (_, a, b) in zip(samples[0, :, 0], labs)]  # L* as the file holds it
    np.testing.assert_allclose(picture.pixels[0] * 255, _lab_to_srgb(stored), atol=2.5)


@pytest.mark.parametrize("bits", [8, 16])
def test_png_text_chunks_reach_the_png_output(tmp_path, model, bits):
    """Captions, XMP, and the prompt and workflow Stable Diffusion front ends store in text chunks
    were dropped: an upscaled generation lost how it was made."""
    from PIL import PngImagePlugin

    text = {
        "parameters": "a cat on a mat\nSteps: 20, Sampler: Euler a, CFG scale: 7",  # tEXt, as AUTOMATIC1111 writes it
        "workflow": json.dumps({"nodes": [{"id": i, "type": "KSampler"} for i in range(300)]}),  # long: compressed
        "XML:com.adobe.xmp": "<x:xmpmeta xmlns:x='adobe:ns:meta/'>Zoë ✓</x:xmpmeta>",  # iTXt, UTF-8
    }
    meta = PngImagePlugin.PngInfo()
    meta.add_text("parameters", text["parameters"])
    meta.add_text("workflow", text["workflow"], zip=True)
    meta.add_itxt("XML:com.adobe.xmp", text["XML:com.adobe.xmp"])
    src = tmp_path / "gen.png"
    rgb = photo_like(20, 14)
    if bits == 16:
        png = _png_by_hand(rgb.astype(np.uint16) * 257, 2)
        iend = png.rindex(b"IEND") - 4
        chunks = [_png_chunk(b"tEXt", b"parameters\0" + text["parameters"].encode("latin-1")),
                  _png_chunk(b"zTXt", b"workflow\0\0" + zlib.compress(text["workflow"].encode("latin-1"))),
                  _png_chunk(b"iTXt", b"XML:com.adobe.xmp\0\0\0\0\0" + text["XML:com.adobe.xmp"].encode())]
        src.write_bytes(png[:iend] + b"".join(chunks) + png[iend:])  # after the image data, where PNG allows them too
    else:
        Image.fromarray(rgb).save(src, pnginfo=meta)
    result = invoke("upscale", src, "-o", tmp_path / "out.png", "-s", "2", *model)
    assert result.exit_code == 0, result.output
    with Image.open(tmp_path / "out.png") as im:
        im.load()
        assert im.size == (40, 28) and dict(im.text) == text
    # other formats have no place for them: said (once a run), as every other loss is
    result = invoke("upscale", src, "-o", tmp_path / "out.jpg", "-s", "2", *model)
    assert result.exit_code == 0, result.output
    assert "note: JPEG has no place for a PNG's text chunks (captions, prompts, workflows); left out (png keeps them)" in result.stderr


def test_writes_are_synced_before_the_rename(tmp_path, monkeypatch):
    from icmsr_cli.io import atomic

    synced, renamed = [], []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (renamed.append((str(a), str(b), list(synced))), real_replace(a, b))[1])
    target = tmp_path / "out.png"
    atomic.write_bytes(b"data", target)
    assert target.read_bytes() == b"data"
    (tmp_name, dest, synced_before), = renamed
    assert dest == str(target) and tmp_name in synced_before, "the file must reach the disk before it is renamed"
    assert synced[-1] == str(tmp_path), "the folder is synced after the rename"
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]


@pytest.fixture
def small_disk(tmp_path):
    """A real 192 KB filesystem (tmpfs), where permitted."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=192k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("mounting a small filesystem needs root")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_disk_stops_the_batch_with_one_line_and_keeps_finished_files(tmp_path, small_disk, model):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(6):  # BMP outputs of 128x128: 49 KB each, uncompressed, so the fourth does not fit
        Image.fromarray(photo_like(64, 64, seed=i)).save(src / f"img{i}.png")
    result = invoke("upscale", src, "-o", small_disk, "-s", "2", "--format", "bmp", *model)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    full = errors(result)
    assert len(full) == 1 and "no space left on the device (needs about" in full[0] and str(small_disk) in full[0]
    assert "not started" in result.stderr  # the batch stopped: later files were not tried
    finished = sorted(small_disk.iterdir())
    assert finished and all(not p.name.startswith(".") for p in finished), "temporary files left behind"
    for path in finished:
        with Image.open(path) as im:
            im.load()
            assert im.size == (128, 128)


def test_full_disk_while_parking_tiles_is_one_line(tmp_path, small_disk, tiny_base, tiny_lora, monkeypatch):
    from icmsr_cli.errors import DiskFullError
    from icmsr_cli.model.loading import load_pipeline

    pipe = load_pipeline(tiny_base, tiny_lora, device=torch.device("cpu"), dtype=torch.float32)
    pipe.park_budget = 0  # every waiting tile goes to a file
    monkeypatch.setenv("TMPDIR", str(small_disk))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    with pytest.raises(DiskFullError, match="no space left on the device"):
        pipe(torch.rand(1, 3, 256, 256), "none", 16)
    assert list(small_disk.iterdir()) == [], "parked tiles must be removed"


def test_merged_cache_on_a_full_disk_warns_and_leaves_nothing(tmp_path, small_disk, tiny_base, tiny_lora, monkeypatch, caplog):
    from icmsr_cli.model.loading import load_pipeline

    from icmsr_cli.model import weight_cache

    monkeypatch.setenv("ICMSR_CACHE_DIR", str(small_disk))
    pipe = load_pipeline(tiny_base, tiny_lora, device=torch.device("cpu"), dtype=torch.float32)
    weight_cache.wait_for_saves()
    assert "could not save the merged-weights cache" in caplog.text and "no space left" in caplog.text
    assert "needs about" in caplog.text  # refused up front: the disk would not hold it
    assert pipe(torch.rand(1, 3, 64, 64), "none", None).shape == (1, 3, 64, 64)
    # the same when the disk fills in the middle of the write: the partial entry is removed
    caplog.clear()
    monkeypatch.setattr(weight_cache, "_SPARE", -(1 << 40))
    load_pipeline(tiny_base, tiny_lora, device=torch.device("cpu"), dtype=torch.float32)
    weight_cache.wait_for_saves()
    assert "no space left on the device" in caplog.text
    leftovers = [p for p in (small_disk / "merged").rglob("*")] if (small_disk / "merged").exists() else []
    assert leftovers == [], leftovers


@pytest.mark.parametrize("kind", ["under a file", "read-only"])
def test_unusable_cache_dir_warns_once_and_runs(tmp_path, model, monkeypatch, kind):
    if kind == "under a file":
        (tmp_path / "file").write_text("x")
        cache = tmp_path / "file" / "cache"
    else:
        cache = tmp_path / "ro"
        cache.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(cache)], capture_output=True).returncode:
            pytest.skip("mounting a read-only filesystem needs root")
    try:
        src = tmp_path / "in.png"
        Image.fromarray(photo_like(16, 16)).save(src)
        result = subprocess.run(_cli("upscale", src, "-o", tmp_path / "out.png", *model), capture_output=True, text=True,
                                env={**os.environ, "ICMSR_CACHE_DIR": str(cache)}, timeout=300)
        assert result.returncode == 0, result.stderr
        assert result.stderr.count("running without caches") == 1 and str(cache) in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
        assert Image.open(tmp_path / "out.png").size == (64, 64)
    finally:
        if kind == "read-only":
            subprocess.run(["umount", "-l", str(cache)], check=False)


def test_sigterm_mid_batch_leaves_whole_files_a_summary_and_a_rerun_finishes(tmp_path, tiny_base, tiny_lora):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    for i in range(8):
        Image.fromarray(photo_like(32, 24, seed=i)).save(src / f"img{i}.png")
    args = _cli("upscale", src, "-o", out, "--base", tiny_base, "--lora", tiny_lora, "--tile", "off")
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and not (out.is_dir() and list(out.glob("*.png"))):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err
    summary = [line for line in err.splitlines() if line.startswith("interrupted:")]
    assert len(summary) == 1 and "not started" in summary[0] and "rerun to resume" in summary[0], err
    finished = sorted(out.iterdir())
    assert 0 < len(finished) < 8
    for path in finished:
        assert not path.name.startswith("."), "temporary file left behind"
        with Image.open(path) as im:
            im.load()
            assert im.size == (128, 96)
    rerun = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{len(finished)} skipped" in rerun.stderr
    assert sorted(p.name for p in out.iterdir()) == [f"img{i}.png" for i in range(8)]


# ------------------------------------------------------------------------------------- errors


def test_nan_in_every_file_is_one_line_each_and_the_batch_goes_on(tmp_path, tiny_base, tiny_ckpt):
    """A model that gives NaN fails each file on its own line, once, with advice that fits fp32."""
    ckpt = {**tiny_ckpt, "state_dict_unet": dict(tiny_ckpt["state_dict_unet"])}
    key = next(k for k in ckpt["state_dict_unet"] if ".lora_B." in k)
    ckpt["state_dict_unet"][key] = torch.full_like(ckpt["state_dict_unet"][key], float("nan"))
    lora = tmp_path / "nan.pkl"
    torch.save(ckpt, lora)
    src = tmp_path / "in"
    src.mkdir()
    for i in range(3):
        Image.fromarray(photo_like(16, 16, seed=i)).save(src / f"{i}.png")
    result = invoke("upscale", src, "-o", tmp_path / "out", "--base", tiny_base, "--lora", lora, "--tile", "off")
    assert result.exit_code == 1
    lines = errors(result)
    assert len(lines) == 3 and all("NaN/Inf in float32" in line for line in lines), lines
    assert sorted(line.removeprefix("error: ").split(": ")[0] for line in lines) == [str(src / f"{i}.png") for i in range(3)], lines
    assert all("--dtype fp32" not in line for line in lines)
    assert "0 done, 0 skipped, 3 failed" in result.stderr


def test_unexpected_exception_is_one_line_with_a_debug_hint(tmp_path, monkeypatch, capsys):
    from icmsr_cli import cli
    from icmsr_cli.io import batch

    def broken(*args, **kwargs):
        raise RuntimeError("something nobody planned for\nsecond line")

    monkeypatch.setattr(batch, "plan", broken)
    monkeypatch.setenv("ICMSR_DEBUG", "")  # --debug below sets it: restored after the test
    args = ["upscale", str(tmp_path / "x.png"), "-o", str(tmp_path / "y.png")]
    with pytest.raises(SystemExit) as exited:
        cli.main(args)
    assert exited.value.code == cli.EXIT_INTERNAL != 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: unexpected RuntimeError: something nobody planned for (this is a bug in icmsr; "
                   "rerun with --debug for the traceback and report it)"]
    with pytest.raises(RuntimeError, match="nobody planned"):
        cli.main(args + ["--debug"])  # anywhere on the line


def test_a_bug_met_on_one_file_fails_that_file_and_the_batch_goes_on(tmp_path, model, monkeypatch, capsys):
    """An exception nobody raised on purpose, met reading or writing one file (a decoder's own
    TypeError on data no fuzz run made), ended the whole batch with exit 3; the rerun skipped the
    finished files and ended at the same file again, so no run ever got past it. It now fails that
    file, said as a bug, and the others are done; --debug still raises it for the traceback."""
    import struct

    from icmsr_cli import cli
    from icmsr_cli.io import batch

    src = tmp_path / "in"
    src.mkdir()
    for name in ("a", "b", "c"):
        Image.fromarray(photo_like(16, 12, seed=ord(name))).save(src / f"{name}.png")
    read, encode = batch.read_image, batch.encode_image

    def read_image(source, **kwargs):
        if kwargs["name"].endswith("a.png"):
            raise TypeError("'NoneType' object is not subscriptable")
        return read(source, **kwargs)

    def encode_image(picture, fmt, name, **kwargs):
        if name.endswith("b.png"):
            raise struct.error("unpack requires a buffer of 4 bytes")
        return encode(picture, fmt, name, **kwargs)

    monkeypatch.setattr(batch, "read_image", read_image)
    monkeypatch.setattr(batch, "encode_image", encode_image)
    monkeypatch.setenv("ICMSR_DEBUG", "")
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exited:
        cli.main(["upscale", str(src), "-o", str(out), "-q", *model])
    assert exited.value.code == 1
    hint = "(this is a bug in icmsr; rerun with --debug for the traceback and report it)"
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {src / 'a.png'}: unexpected TypeError while reading it: 'NoneType' object is not subscriptable {hint}",
        f"error: {src / 'b.png'}: unexpected struct.error while writing its output: unpack requires a buffer of 4 bytes {hint}",
    ]
    assert sorted(p.name for p in out.iterdir()) == ["c.png"]
    with pytest.raises(TypeError, match="not subscriptable"):
        cli.main(["upscale", str(src), "-o", str(out), "-q", "--debug", *model])


# ------------------------------------------------------------------------------------ machines


def test_windows_style_paths_and_non_utf8_names_do_not_crash(tmp_path, model):
    src = tmp_path / "in"
    src.mkdir()
    odd = os.fsdecode(b"caf\xe9 \xff.png")  # Latin-1 bytes: not UTF-8
    Image.fromarray(photo_like(16, 16)).save(src / odd)
    out = tmp_path / "out"
    result = invoke("upscale", src, "-o", out, "--json", *model)
    assert result.exit_code == 0, result.output
    assert (out / odd).is_file()
    assert json.loads(result.stdout.splitlines()[0])["status"] == "done"
    for ref in (r"C:\weights\osediff.pkl", "D:/models/osediff.pkl"):
        bad = invoke("upscale", src / odd, "-o", tmp_path / "o.png", "--base", model[1], "--lora", ref)
        assert bad.exit_code == 2 and "no such file" in bad.stderr and "Traceback" not in bad.output


def test_a_live_process_keeps_its_temporary_a_dead_ones_is_removed(tmp_path):
    """Ranks and concurrent jobs write beside the same targets (caches): one process's cleanup
    must not delete another's write in progress, and a killed run's leftovers still go."""
    import subprocess
    import sys

    from icmsr_cli.io import atomic

    target = tmp_path / "cache.bin"
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = __import__("socket").gethostname()
    try:
        mine = tmp_path / f".cache.bin.{host}~{live.pid}~abc{atomic.TEMP_SUFFIX}"
        gone = tmp_path / f".cache.bin.{host}~{dead.pid}~def{atomic.TEMP_SUFFIX}"
        other_host = tmp_path / f".cache.bin.elsewhere~{dead.pid}~ghi{atomic.TEMP_SUFFIX}"
        for p in (mine, gone, other_host):
            p.write_bytes(b"partial")
        atomic.write_bytes(b"whole", target)
        assert target.read_bytes() == b"whole"
        assert mine.exists() and other_host.exists() and not gone.exists()
    finally:
        live.kill()
        live.wait()


@pytest.mark.parametrize("stem", ["a" * 240, "é" * 120 + "x" * 2])  # 244 and 246 bytes with ".png": names the file system takes
def test_a_long_file_name_is_written_and_its_stale_temporary_found(tmp_path, stem):
    """The temporary beside an output adds about 40 bytes to its name: a photo named with 240
    characters failed "File name too long" after the model had run. The temporary's copy of the
    name is cut short, and a killed run's temporary is still found and removed."""
    from icmsr_cli.io import atomic

    target = tmp_path / f"{stem}.png"
    atomic.write_bytes(b"first", target)
    assert target.read_bytes() == b"first"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"{atomic.temp_prefix(target)}{__import__('socket').gethostname()}~{dead.pid}~abcdefgh{atomic.TEMP_SUFFIX}"
    stale.write_bytes(b"partial")
    atomic.write_bytes(b"whole", target)
    assert target.read_bytes() == b"whole"
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]


def test_a_disk_filling_inside_torch_save_is_a_full_disk(tmp_path):
    """torch's zip writer, closing an archive after a record's write failed for space, raises a
    RuntimeError about its position with the OSError only as its context: that is a full disk too
    (a one-line DiskFullError, the temporary removed), not an unexplained error. The merged-weights
    cache hit it in a thread, which printed a traceback."""
    import errno

    from icmsr_cli.errors import DiskFullError
    from icmsr_cli.io import atomic

    class FullDisk(io.RawIOBase):  # a file on a disk with `room` bytes left
        def __init__(self, room):
            self.room, self.pos = room, 0

        def writable(self):
            return True

        def write(self, b):
            if self.pos + len(b) > self.room:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.pos += len(b)
            return len(b)

        def tell(self):
            return self.pos

    target = tmp_path / "weights.pt"
    with pytest.raises(DiskFullError, match="no space left on the device"):
        with atomic.replacing(target) as tmp:
            tmp.write_bytes(b"partial")
            torch.save({"w": torch.zeros(100_000)}, FullDisk(100_000))
    assert list(tmp_path.iterdir()) == []


#: the XMP standard's identifier of its JPEG APP1 segment: a namespace name, never fetched
XMP_APP1_ID = b"http://ns.adobe.com/xap/1.0/\0"
XMP = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF><rdf:Description xmp:Rating="4" dc:subject="harbour, Zo\xc3\xab"/></rdf:RDF></x:xmpmeta>'


def _with_xmp(fmt: str) -> bytes:
    """A small image holding the XMP packet where its format keeps it, each written by hand or by
    Pillow (not by our writers)."""
    rgb = Image.fromarray(photo_like(12, 8))
    buf = io.BytesIO()
    if fmt == "PNG":
        from PIL import PngImagePlugin

        meta = PngImagePlugin.PngInfo()
        meta.add_itxt("XML:com.adobe.xmp", XMP.decode())
        rgb.save(buf, "PNG", pnginfo=meta)
    elif fmt == "JPEG":
        rgb.save(buf, "JPEG")
        jpeg = buf.getvalue()
        payload = XMP_APP1_ID + XMP
        return jpeg[:2] + b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload + jpeg[2:]
    elif fmt == "WEBP":
        rgb.save(buf, "WEBP", xmp=XMP, lossless=True)
    else:
        from PIL import TiffImagePlugin

        tags = TiffImagePlugin.ImageFileDirectory_v2()
        tags[700] = XMP
        tags.tagtype[700] = 1
        rgb.save(buf, "TIFF", tiffinfo=tags)
    return buf.getvalue()


@pytest.mark.parametrize("source", ["PNG", "JPEG", "WEBP", "TIFF"])
def test_xmp_goes_from_every_format_to_every_format(source):
    """Ratings, keywords and captions (XMP) were dropped by every output but PNG-to-PNG."""
    from icmsr_cli.io.images import encode_image, read_image

    picture = read_image(_with_xmp(source))
    assert picture.info.get("xmp") == XMP
    for target in ("PNG", "JPEG", "WEBP", "TIFF"):
        data = encode_image(picture, target)
        with Image.open(io.BytesIO(data)) as im:  # read back by Pillow's own XMP readers
            im.load()
            if target == "JPEG":
                kept = [c for m, c in im.applist if m == "APP1" and c.startswith(XMP_APP1_ID)]
                assert kept == [XMP_APP1_ID + XMP], target
            elif target == "PNG":
                assert im.text.get("XML:com.adobe.xmp") == XMP.decode(), target
            elif target == "WEBP":
                assert im.info.get("xmp") == XMP, target
            else:
                assert bytes(im.tag_v2.get(700)) == XMP, target
        assert read_image(data).info.get("xmp") == XMP, (source, target)


@pytest.mark.parametrize("source, channels, bits", [("PNG", 3, 8), ("PNG", 3, 16), ("JPEG", 3, 8), ("TIFF", 4, 8), ("TIFF", 3, 16), ("BMP", 3, 8)])
def test_dpi_goes_from_every_format_to_every_format(source, channels, bits):
    """A 300 dpi scan came out at no stated density (viewers and printers then assume 72 or 96):
    every writer dropped it. The density is kept as it was, as the EXIF block the outputs carry
    already kept it, and read back by Pillow and OpenCV's libtiff alike."""
    from icmsr_cli.io.images import Picture, encode_image, read_image

    samples = photo_like(20, 12)[..., :channels] if channels == 3 else np.dstack([photo_like(20, 12), np.full((12, 20), 200, np.uint8)])
    if bits == 16:  # through icmsr's own writers, the only ones here for 16-bit colour
        data = encode_image(Picture(samples.astype(np.float32) / 255, 16, {"dpi": (300.0, 150.0)}), source)
    else:
        buf = io.BytesIO()
        Image.fromarray(samples).save(buf, source, dpi=(300, 150))
        data = buf.getvalue()
    picture = read_image(data)
    assert picture.info["dpi"] == pytest.approx((300, 150), abs=0.03), source  # pHYs counts whole pixels per metre
    for target in ("PNG", "JPEG", "TIFF", "BMP"):
        if target == "JPEG" and channels == 4:
            continue
        with Image.open(io.BytesIO(encode_image(picture, target))) as im:
            assert im.info.get("dpi") == pytest.approx((300, 150), abs=0.03), (source, bits, target)
    tiff = encode_image(picture, "TIFF")
    assert cv2.imdecode(np.frombuffer(tiff, np.uint8), cv2.IMREAD_UNCHANGED) is not None  # the tags keep the file readable


def _camera_exif(order: str, orientation: int | None = None, orientation_type: int = 3) -> bytes:
    """An EXIF block laid out as a camera writes it, by hand: IFD0 (Make, the orientation if given,
    the Exif IFD's pointer), the Exif IFD (PixelX/YDimension as SHORTs, a MakerNote whose bytes
    hold offsets), the MakerNote's bytes, then IFD1 with its thumbnail's place."""
    e = "<" if order == "II" else ">"
    n0 = 2 if orientation is None else 3
    ifd0 = 8
    exif_ifd = ifd0 + 2 + n0 * 12 + 4
    maker_at = exif_ifd + 2 + 3 * 12 + 4
    ifd1 = maker_at + 16
    block = order.encode() + struct.pack(e + "HI", 42, ifd0)
    block += struct.pack(e + "H", n0) + struct.pack(e + "HHI4s", 0x010F, 2, 4, b"Cam\0")
    if orientation is not None:
        block += struct.pack(e + "HHIHH", 0x0112, 3, 1, orientation, 0) if orientation_type == 3 else struct.pack(e + "HHII", 0x0112, 4, 1, orientation)
    block += struct.pack(e + "HHII", 0x8769, 4, 1, exif_ifd) + struct.pack(e + "I", ifd1)
    block += struct.pack(e + "H", 3) + struct.pack(e + "HHIHH", 0xA002, 3, 1, 24, 0) + struct.pack(e + "HHIHH", 0xA003, 3, 1, 16, 0)
    block += struct.pack(e + "HHII", 0x927C, 7, 16, maker_at) + struct.pack(e + "I", 0)
    block += struct.pack(e + "IIII", maker_at, 0xDEADBEEF, ifd0, exif_ifd)  # offsets a rewrite would break
    thumb_at = ifd1 + 2 + 2 * 12 + 4
    block += struct.pack(e + "H", 2) + struct.pack(e + "HHII", 0x0201, 4, 1, thumb_at) + struct.pack(e + "HHII", 0x0202, 4, 1, 4)
    return block + struct.pack(e + "I", 0) + b"\xff\xd8\xff\xd9"  # IFD1, then its (empty) JPEG thumbnail


@pytest.mark.parametrize("order", ["II", "MM"])
def test_exif_pixel_dimensions_give_the_output_size(order):
    """The EXIF block copied to the output still gave the input's PixelX/YDimension, so tools
    that show it (exiftool's ExifImageWidth) gave a 4x upscale the photo's old size. The two
    entries are patched in place, the rest byte for byte: a MakerNote's inner offsets survive."""
    from icmsr_cli.io.images import encode_image, read_image
    from icmsr_cli.io.metadata import exif_with_size

    block = _camera_exif(order)
    buf = io.BytesIO()
    Image.fromarray(photo_like(24, 16)).save(buf, "JPEG", exif=b"Exif\0\0" + block)
    picture = read_image(buf.getvalue())
    output = picture.with_pixels(np.zeros((64, 96, 3), np.float32))
    for target in ("JPEG", "PNG", "WEBP", "TIFF"):
        with Image.open(io.BytesIO(encode_image(output, target))) as im:
            exif = im.getexif()
            assert (exif.get_ifd(0x8769).get(0xA002), exif.get_ifd(0x8769).get(0xA003)) == (96, 64), target
            assert exif.get(0x010F) == "Cam", target
    patched = exif_with_size(block, (96, 64))
    changed = [i for i in range(len(block)) if block[i] != patched[i]]
    assert len(patched) == len(block) and all(42 <= i < 42 + 24 for i in changed)  # the two entries' value fields only
    # a size a SHORT cannot hold widens that entry to a LONG, in place
    wide = exif_with_size(b"Exif\0\0" + block, (70000, 64))
    parsed = Image.Exif()
    parsed.load(wide)
    assert parsed.get_ifd(0x8769)[0xA002] == 70000 and parsed.get_ifd(0x8769)[0xA003] == 64
    assert wide[6 + 42 + 24 :] == block[42 + 24 :]
    assert exif_with_size(b"Exif\0\0garbage", (96, 64)) == b"Exif\0\0garbage"  # what does not parse is kept as it was


@pytest.mark.parametrize("order, orientation_type", [("II", 3), ("MM", 3), ("MM", 4)])  # SHORT, as the standard has it, or LONG
def test_a_photo_turned_upright_keeps_its_exif_byte_for_byte(order, orientation_type):
    """Where the orientation was applied, Pillow's exif_transpose rewrote the whole EXIF block (and
    the 16-bit path every block), moving a MakerNote away from what its inner offsets count on:
    a portrait from a Canon lost its lens and shot data to readers. The orientation is now set to 1
    in place, and the thumbnail's directory (the thumbnail still lies the old way) unlinked."""
    from icmsr_cli.io.images import encode_image, read_image

    block = _camera_exif(order, orientation=6, orientation_type=orientation_type)
    jpeg = io.BytesIO()
    Image.fromarray(photo_like(24, 16)).save(jpeg, "JPEG", exif=b"Exif\0\0" + block)
    ok, png16 = cv2.imencode(".png", photo_like(24, 16).astype(np.uint16) * 257)
    for data in (jpeg.getvalue(), _png_with_chunks(png16.tobytes(), (b"eXIf", block))):
        picture = read_image(data)
        assert picture.size == (16, 24)  # turned upright
        kept = picture.info["exif"].removeprefix(b"Exif\0\0")
        assert len(kept) == len(block)
        # the orientation's value (IFD0's second entry) and the link to IFD1, nothing else
        assert {i for i in range(len(block)) if block[i] != kept[i]} <= {30, 31, 32, 33, 46, 47, 48, 49}
        parsed, original = Image.Exif(), Image.Exif()
        parsed.load(kept)
        original.load(block)
        assert parsed[0x0112] == 1 and parsed[0x010F] == "Cam" and parsed.get_ifd(0x8769)[0x927C] == block[92:108]
        assert original.get_ifd(ExifTags.IFD.IFD1) and not parsed.get_ifd(ExifTags.IFD.IFD1)  # the thumbnail unlinked
        for target in ("JPEG", "PNG", "WEBP"):
            with Image.open(io.BytesIO(encode_image(picture, target))) as im:
                assert ImageOps.exif_transpose(im).size == im.size == (16, 24), target  # upright to every reader
                assert im.getexif().get_ifd(0x8769)[0x927C] == parsed.get_ifd(0x8769)[0x927C], target


def test_xmp_orientation_says_upright_once_applied():
    """A photo from Lightroom or Photoshop says its orientation in XMP too (tiff:Orientation). The
    output, already upright, still said 6 there, so Photoshop, and Pillow where EXIF says nothing,
    turned it again; icmsr itself did on a second pass."""
    from icmsr_cli.io.images import encode_image, read_image

    attribute = b'<rdf:Description rdf:about="" xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/>'
    element = b'<rdf:Description rdf:about=""><tiff:Orientation>6</tiff:Orientation></rdf:Description>'
    for description, exif_orientation in ((attribute, 6), (element, None)):
        packet = (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#" '
                  b'xmlns:tiff="http://ns.adobe.com/tiff/1.0/">' + description + b"</rdf:RDF></x:xmpmeta>")
        exif = Image.Exif()
        if exif_orientation:
            exif[0x0112] = exif_orientation
        buf = io.BytesIO()
        Image.fromarray(photo_like(24, 16)).save(buf, "PNG", exif=exif.tobytes(), pnginfo=_xmp_text(packet))
        picture = read_image(buf.getvalue())
        assert picture.size == (16, 24)
        assert picture.info["xmp"] == packet.replace(b"6", b"1")
        for target in ("JPEG", "PNG", "WEBP", "TIFF"):
            data = encode_image(picture, target)
            with Image.open(io.BytesIO(data)) as im:
                assert ImageOps.exif_transpose(im).size == im.size == (16, 24), (description, target)
            assert read_image(data).size == (16, 24), (description, target)


def test_imagemagicks_exif_text_chunk_travels_as_exif():
    """ImageMagick 6 keeps a PNG's EXIF in a text chunk ("Raw profile type exif", in hex). Pillow
    reads its orientation, so the picture was turned upright, but the chunk went on to a PNG
    output still saying 6 (Pillow and ImageMagick turned the output again), and JPEG, WebP and
    TIFF outputs had no EXIF at all. It now travels as the EXIF block it is."""
    from PIL import PngImagePlugin

    from icmsr_cli.io.images import encode_image, read_image

    exif = Image.Exif()
    exif[0x0112], exif[0x010F] = 6, "Phone"
    block = exif.tobytes()  # with the "Exif\0\0" prefix, as ImageMagick stores the APP1 payload
    hexed = block.hex()
    meta = PngImagePlugin.PngInfo()
    meta.add_text("Raw profile type exif", f"\nexif\n{len(block):8d}\n" + "\n".join(hexed[i : i + 72] for i in range(0, len(hexed), 72)) + "\n", zip=True)
    meta.add_text("Comment", "kept")
    buf = io.BytesIO()
    Image.fromarray(photo_like(24, 16)).save(buf, "PNG", pnginfo=meta)
    picture = read_image(buf.getvalue())
    assert picture.size == (16, 24) and picture.info["text"] == {"Comment": "kept"}
    for target in ("PNG", "JPEG", "WEBP", "TIFF"):
        with Image.open(io.BytesIO(encode_image(picture, target))) as im:
            assert ImageOps.exif_transpose(im).size == im.size == (16, 24), target
            assert im.getexif().get(0x010F) == "Phone", target


def _xmp_text(packet: bytes):
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_itxt("XML:com.adobe.xmp", packet.decode())
    return info


def _png_with_chunks(data: bytes, *chunks: tuple[bytes, bytes]) -> bytes:
    """The PNG with `chunks` (kind, data) put after its IHDR."""
    made = b"".join(struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body)) for kind, body in chunks)
    return data[:33] + made + data[33:]


def test_a_file_shorter_than_a_png_header_reads():
    """A netpbm bitmap can be 8 bytes; a PNG check that read byte 24 of every file failed it."""
    from icmsr_cli.io.images import read_image

    picture = read_image(b"P1\n2 1\n01\n", name="tiny.pbm")
    np.testing.assert_array_equal(picture.pixels[..., 0], [[1, 0]])  # P1: 1 is black


def _wide_16bit_tiff() -> bytes:
    from icmsr_cli.io.tiff import encode_tiff

    return encode_tiff(np.zeros((1, (1 << 20) + 1, 3), np.uint16))  # one over OpenCV's limit, a tiny file all the same


def _tiff_with_a_number_for_its_description() -> bytes:
    from PIL import TiffImagePlugin

    tags = TiffImagePlugin.ImageFileDirectory_v2()
    tags[270], tags.tagtype[270] = 1.5, 11  # ImageDescription, which is text, stored as a FLOAT
    out = io.BytesIO()
    Image.fromarray(photo_like(8, 6)).save(out, "TIFF", tiffinfo=tags, dpi=(300, 300))
    return out.getvalue()


def _png_cut_short_after_its_pixels() -> bytes:
    out = io.BytesIO()
    Image.fromarray(photo_like(8, 6)).convert("LA").save(out, "PNG")
    data = out.getvalue()
    return data[:-12] + struct.pack(">I", 1000) + b"tEXtComment\0cut off"  # a text chunk 1000 bytes long, the file ends 19 in


@pytest.mark.parametrize("make, expected", [
    (_wide_16bit_tiff, "note: 16-bit colour with rows over OpenCV's 1,048,576 pixels is read at 8 bits per channel, so the output is 8-bit"),
    (_tiff_with_a_number_for_its_description, "note: its EXIF block is damaged; it is left out"),
    (_png_cut_short_after_its_pixels, "cut.png: cannot read image (Truncated File Read)"),
])
def test_files_that_tripped_a_reader_fail_as_files_or_read(make, expected):
    """Found by fuzzing; each raised something other than ImageError, "a bug in icmsr", which ended
    the batch: OpenCV asserted on a row over its limit (cv2.error; Pillow now reads the file at 8
    bits, as where OpenCV returns nothing); Pillow's EXIF writer called .encode() on a number in a
    text tag (AttributeError); a PNG whose last chunk was cut short was taken for damaged EXIF,
    which left its text unread, and Pillow's text property asserted."""
    from icmsr_cli.errors import ImageError
    from icmsr_cli.io.images import read_image

    if expected.startswith("note: "):  # the picture is read, and what was lost said
        picture = read_image(make(), name="file.tif")
        assert picture.notes == (expected.removeprefix("note: "),)
        if make is _tiff_with_a_number_for_its_description:  # the tag spoils the camera tags, not the picture
            assert picture.size == (8, 6) and picture.info["dpi"] == pytest.approx((300, 300)) and "exif" not in picture.info
        return
    with pytest.raises(ImageError) as raised:
        read_image(make(), name=expected.split(":")[0])
    assert str(raised.value) == expected


@pytest.mark.parametrize("kind", ["png8", "png16", "webp", "jpeg"])
def test_a_damaged_exif_block_is_left_out_not_the_picture(kind):
    """Pillow's parse of a damaged EXIF block failed the whole PNG or WebP ("cannot read image (not
    a TIFF file ...)"), whose pixels are fine: the block is now left out, with a note. Pillow's
    JPEG reader hid it and passed it on, and a TIFF output then failed after the model had run
    (SyntaxError, "a bug in icmsr"; found by fuzzing)."""
    from icmsr_cli.io.images import encode_image, read_image

    pixels = photo_like(12, 8)
    garbage = b"\x13\x37" * 30
    if kind == "png16":
        data = _png_with_chunks(cv2.imencode(".png", pixels.astype(np.uint16) * 257)[1].tobytes(), (b"eXIf", garbage))
    else:
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "PNG" if kind == "png8" else "WEBP", lossless=True)
        data = _png_with_chunks(buf.getvalue(), (b"eXIf", garbage)) if kind == "png8" else None
        if kind in ("webp", "jpeg"):
            buf = io.BytesIO()
            Image.fromarray(pixels).save(buf, kind.upper(), lossless=True, quality=100, exif=b"Exif\0\0" + garbage)
            data = buf.getvalue()
    picture = read_image(data, name="shot")
    assert picture.notes == ("its EXIF block is damaged; it is left out",) and "exif" not in picture.info
    assert picture.pixels.shape == (8, 12, 3)
    with Image.open(io.BytesIO(encode_image(picture, "PNG"))) as im:
        assert "exif" not in im.info
    encode_image(picture, "TIFF")


def test_libpng_warnings_stay_off_stderr(tmp_path):
    """OpenCV decodes 16-bit PNGs, and libpng printed its warnings on their metadata chunks
    ("iCCP: known incorrect sRGB profile", "pHYs: duplicate") straight to stderr, past
    OPENCV_LOG_LEVEL, beside icmsr's own lines. OpenCV is given only the chunks of the pixels."""
    data = cv2.imencode(".png", photo_like(12, 8).astype(np.uint16) * 257)[1].tobytes()
    (tmp_path / "dup.png").write_bytes(_png_with_chunks(data, (b"pHYs", bytes(9)), (b"pHYs", bytes(9))))
    code = "import sys; from icmsr_cli.io.images import read_image; p = read_image(sys.argv[1]); print(p.bit_depth, p.pixels.shape)"
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "dup.png")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.split() == ["16", "(8,", "12,", "3)"], done.stderr
    assert done.stderr == ""


def test_exif_or_xmp_too_long_for_a_jpeg_is_left_out_before_the_model_and_said(tmp_path):
    """A PNG whose EXIF outgrew JPEG's one 64 KB segment (long comments, embedded previews) was
    upscaled, then failed at the end ("cannot encode as JPEG (EXIF data is too long)"), the output
    lost for the sake of its metadata; a long XMP was left out without a word. Both are now left
    out of a JPEG with a note, said before the model runs; other formats keep them."""
    from icmsr_cli.io import batch

    exif = Image.Exif()
    exif[0x010F] = "Cam"
    exif[0x8769] = {0x9286: b"ASCII\0\0\0" + b"y" * 70000}  # UserComment (a dict: Pillow 10 writes no get_ifd() edits)
    xmp = b'<x:xmpmeta xmlns:x="adobe:ns:meta/">' + b" " * 70000 + b"</x:xmpmeta>"
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(photo_like(16, 12)).save(src / "long.png", exif=exif, pnginfo=_png_info({"XML:com.adobe.xmp": xmp.decode()}))
    jobs, _ = batch.plan([str(src)], str(tmp_path / "out"), fmt="jpg")
    notes = []
    [result] = batch.run(batch.Reader(jobs, batch.BatchSettings()), lambda picture: (notes.append("model"), picture)[1], notify=notes.append)
    assert result.status == "done", result.error
    assert [n.split(": its ")[1].split(" (")[0] for n in notes[:2]] == ["EXIF", "XMP"] and notes[2] == "model"
    assert all(n.endswith("is more than a JPEG holds (64 KB); it is left out (png, webp and tiff keep it)") for n in notes[:2])
    with Image.open(tmp_path / "out" / "long.jpg") as im:
        assert "exif" not in im.info and im.size == (16, 12)
    jobs, _ = batch.plan([str(src)], str(tmp_path / "png"))
    [result] = batch.run(batch.Reader(jobs, batch.BatchSettings()), lambda picture: picture)
    with Image.open(tmp_path / "png" / "long.png") as im:
        assert im.getexif()[0x010F] == "Cam" and len(im.info["exif"]) > 70000


def test_a_bmp_whose_fourth_byte_is_alpha_keeps_it():
    """Pillow writes RGBA as a 32-bit BMP without bit masks, its fourth byte the alpha, which
    browsers show; Pillow reads such a file back as RGB, so every transparent pixel of a logo came
    out opaque. Rows stored top-down (a negative height) too; a fourth byte zero throughout is the
    format's "unused", and the picture stays RGB."""
    from icmsr_cli.io.images import read_image

    rgb = photo_like(8, 6)
    alpha = np.linspace(0, 255, 48).reshape(6, 8).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(out, "BMP")
    bottom_up = out.getvalue()
    offset = int.from_bytes(bottom_up[10:14], "little")
    rows = np.frombuffer(bottom_up[offset:], np.uint8).reshape(6, 8 * 4)
    top_down = bottom_up[:22] + struct.pack("<i", -6) + bottom_up[26:offset] + rows[::-1].tobytes()
    for data in (bottom_up, top_down):
        picture = read_image(data, name="logo.bmp")
        np.testing.assert_array_equal(np.rint(picture.pixels * 255), np.dstack([rgb, alpha]))
    unused = bottom_up[:offset] + np.dstack([rows.reshape(6, 8, 4)[..., :3], np.zeros((6, 8, 1), np.uint8)]).tobytes()
    np.testing.assert_array_equal(np.rint(read_image(unused, name="plain.bmp").pixels * 255), rgb)


def test_what_a_bmp_cannot_hold_is_said():
    """A photo's colour profile (Adobe RGB, Display P3), EXIF and XMP vanished into a BMP without a
    word, and its colours then show as sRGB; every other output format keeps them."""
    from icmsr_cli.io.images import Picture, fit_to_format

    pixels = photo_like(8, 6).astype(np.float32) / 255
    picture = Picture(pixels, 8, {"icc_profile": b"p" * 600, "exif": b"Exif\0\0II*\0", "dpi": (300.0, 300.0)})
    _, notes = fit_to_format(picture, "BMP", "scan.jpg")
    assert notes == ["scan.jpg: BMP cannot hold its colour profile or EXIF; left out (its colours then show as sRGB); "
                     "png, jpg, webp and tiff keep them"]
    _, notes = fit_to_format(Picture(pixels, 8, {"xmp": b"<x/>", "dpi": (300.0, 300.0)}), "BMP", "a.png")
    assert notes == ["a.png: BMP cannot hold its XMP; left out; png, jpg, webp and tiff keep them"]
    assert fit_to_format(Picture(pixels, 8, {"dpi": (300.0, 300.0)}), "BMP", "a.png")[1] == []  # BMP holds the dpi
    for fmt in ("PNG", "JPEG", "WEBP", "TIFF"):
        assert fit_to_format(picture, fmt, "scan.jpg")[1] == []


def _png_info(text: dict[str, str]):
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    for key, value in text.items():
        info.add_itxt(key, value)
    return info


def test_a_lossless_webp_stays_lossless():
    """A lossless WebP (graphics, screenshots, archives) was written back lossy at quality 95; a
    lossy one stays lossy (lossless would make a photo's file several times larger)."""
    from icmsr_cli.io.images import encode_image, read_image

    rgb = photo_like(32, 24)
    for lossless, chunk in ((True, b"VP8L"), (False, b"VP8 ")):
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, "WEBP", **({"lossless": True} if lossless else {"quality": 80}))
        picture = read_image(buf.getvalue())
        out = encode_image(picture, "WEBP")
        assert out[12:16] == chunk, lossless  # a simple file's one image chunk names its coding
        if lossless:
            np.testing.assert_array_equal(read_image(out).pixels, picture.pixels)


def test_xmp_survives_the_cli(tmp_path, model):
    (tmp_path / "in.jpg").write_bytes(_with_xmp("JPEG"))
    result = invoke("upscale", tmp_path / "in.jpg", "-o", tmp_path / "out.jpg", "-s", "2", *model)
    assert result.exit_code == 0, result.output
    from icmsr_cli.io.images import read_image

    assert read_image(tmp_path / "out.jpg").info.get("xmp") == XMP


def test_a_multi_picture_jpeg_is_a_jpeg_with_its_xmp(tmp_path):
    """Fujifilm, Nikon and Sony cameras (a large preview after the photo) and HDR gain-map JPEGs
    write multi-picture JPEGs, which Pillow names "MPO". With -o - the output was a PNG instead of
    the input's format, and every output lost the XMP (ratings, keywords, captions). That the
    other pictures are not upscaled is said once a run: a folder of camera JPEGs said it of each."""
    from icmsr_cli.io import batch

    photo = Image.fromarray(photo_like(24, 16))
    exif = Image.Exif()
    exif[0x010F] = "FUJIFILM"
    src = tmp_path / "DSCF0001.JPG"
    buf = io.BytesIO()
    photo.save(buf, "MPO", save_all=True, append_images=[photo.resize((12, 8))], exif=exif)
    # the XMP segment by hand, first after SOI (Pillow writes none before 11): the pictures' offsets,
    # counted from the MP header that follows, all move with it
    payload = XMP_APP1_ID + XMP
    src.write_bytes(buf.getvalue()[:2] + b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload + buf.getvalue()[2:])
    with Image.open(src) as im:
        assert im.format == "MPO" and im.n_frames == 2  # what Pillow makes of it: the case at hand
    for output in ("-", str(tmp_path / "out.jpg")):
        jobs, _ = batch.plan([str(src)], output)
        notes = []
        [result] = batch.run(batch.Reader(jobs, batch.BatchSettings()), lambda picture: picture, notify=notes.append)
        assert notes == ["multi-picture JPEGs hold more pictures after the photo (a camera's preview, an HDR gain map, "
                         "a stereo pair's other eye); only the photo is upscaled"]  # once a run, not once a photo
        assert result.status == "done", result.error
        data = result.data if output == "-" else Path(output).read_bytes()
        with Image.open(io.BytesIO(data)) as im:
            assert im.format == "JPEG", output
            assert im.getexif()[0x010F] == "FUJIFILM"
            assert [c for m, c in im.applist if m == "APP1" and c.startswith(XMP_APP1_ID)] == [XMP_APP1_ID + XMP], output
    second = tmp_path / "DSCF0002.JPG"
    second.write_bytes(src.read_bytes())
    jobs, _ = batch.plan([str(src), str(second)], f"{tmp_path / 'both'}/")
    notes = []
    results = batch.run(batch.Reader(jobs, batch.BatchSettings()), lambda picture: picture, notify=notes.append)
    assert [r.status for r in results] == ["done", "done"] and len(notes) == 1, notes


@pytest.mark.parametrize("bits", [8, 16])
def test_a_pngs_gamma_chromaticity_and_srgb_chunks_are_kept(tmp_path, bits):
    """A PNG's gAMA, cHRM and sRGB chunks tell viewers without a colour profile how its samples
    become colours (gAMA 1.0 in linear exports, 1/1.8 in old Mac files): every PNG output dropped
    them, so the picture showed darker or lighter than its source. They are kept; an output format
    with no place for a gamma other than sRGB's says it leaves it out."""
    import struct

    from icmsr_cli.io import batch

    samples = photo_like(20, 14).astype(np.uint16) * (257 if bits == 16 else 1)
    samples = samples.astype(np.uint8 if bits == 8 else np.uint16)
    primaries = (31270, 32900, 64000, 33000, 30000, 60000, 15000, 6000)
    (tmp_path / "in").mkdir()
    png = cv2.imencode(".png", samples[..., ::-1])[1].tobytes()
    (tmp_path / "in" / "described.png").write_bytes(_png_with_chunks(
        png, (b"cHRM", struct.pack(">8I", *primaries)), (b"gAMA", struct.pack(">I", 45455)), (b"sRGB", b"\x01")))
    (tmp_path / "in" / "linear.png").write_bytes(_png_with_chunks(png, (b"gAMA", struct.pack(">I", 100000))))
    jobs, _ = batch.plan([str(tmp_path / "in")], str(tmp_path / "out"))
    assert [r.status for r in batch.run(batch.Reader(jobs, batch.BatchSettings()), lambda picture: picture)] == ["done", "done"]
    with Image.open(tmp_path / "out" / "described.png") as im:
        assert im.info["gamma"] == 0.45455 and im.info["srgb"] == 1
        assert im.info["chromaticity"] == tuple(v / 100000 for v in primaries)
    with Image.open(tmp_path / "out" / "linear.png") as im:
        assert im.info["gamma"] == 1.0 and "srgb" not in im.info and "chromaticity" not in im.info
        assert np.array_equal(np.asarray(im)[..., :3] if bits == 8 else cv2.imread(str(tmp_path / "out" / "linear.png"), cv2.IMREAD_UNCHANGED)[..., ::-1], samples)
    jobs, _ = batch.plan([str(tmp_path / "in")], str(tmp_path / "jpg"), fmt="jpg")
    notes = []
    assert [r.status for r in batch.run(batch.Reader(jobs, batch.BatchSettings()), lambda picture: picture, notify=notes.append)] == ["done", "done"]
    assert [n for n in notes if "gamma" in n] == [
        f"{tmp_path / 'in' / 'linear.png'}: JPEG has no place for its PNG gamma (1); left out, so it shows as sRGB would (png keeps it)"]


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_an_exif_block_pillow_cannot_write_back_does_not_lose_the_photo(fmt):
    """A turned photo whose EXIF holds a tag stored with another type than Pillow knows it by
    (T6Options, a LONG, written as text): Pillow reads the block, but its exif_transpose writes
    the block back after turning the picture, and that raised struct.error, which ended the whole
    batch as "a bug in icmsr" (found by fuzzing). The picture is turned; the block goes out as it
    came, its orientation set to 1."""
    from icmsr_cli.io.images import encode_image, read_image

    entries = [(0x0112, 3, 1, struct.pack(">H", 6) + bytes(2)), (0x0125, 2, 4, b"+am\0")]
    block = b"MM\0*" + struct.pack(">IH", 8, len(entries))
    block += b"".join(struct.pack(">HHI", tag, kind, count) + value for tag, kind, count, value in entries) + bytes(4)
    buf = io.BytesIO()
    Image.fromarray(photo_like(24, 16)).save(buf, fmt, exif=b"Exif\0\0" + block if fmt == "JPEG" else block)
    picture = read_image(buf.getvalue(), name="odd-exif")
    assert picture.size == (16, 24)  # turned upright
    kept = picture.info["exif"].removeprefix(b"Exif\0\0")
    assert kept == block.replace(struct.pack(">HHIH", 0x0112, 3, 1, 6), struct.pack(">HHIH", 0x0112, 3, 1, 1))
    assert Image.open(io.BytesIO(encode_image(picture, "PNG"))).getexif()[0x0112] == 1
