"""The public Python API as the README shows it, on the tiny model: nothing else is promised."""

from __future__ import annotations

import re

import cv2
import numpy as np
import pytest
from PIL import Image

import icmsr_cli
from conftest import photo_like


def test_public_names_are_the_documented_ones():
    assert {n for n in icmsr_cli.__all__ if not n.endswith("Error")} == {
        "Upscaler", "load_upscaler", "UpscaleOptions", "Picture", "read_image", "write_image", "__version__"}
    for name in icmsr_cli.__all__:
        assert getattr(icmsr_cli, name) is not None


def test_readme_example_runs(tmp_path, tiny_base, tiny_lora):
    from icmsr_cli import UpscaleOptions, load_upscaler, read_image, write_image

    Image.fromarray(photo_like(40, 30)).save(tmp_path / "in.png")
    scan = (photo_like(24, 20, seed=2).astype(np.uint16) * 257)[..., ::-1]
    cv2.imwrite(str(tmp_path / "scan16.tif"), np.ascontiguousarray(scan))

    up = load_upscaler(base=str(tiny_base), lora=str(tiny_lora))
    assert up.upscale(Image.open(tmp_path / "in.png")).size == (160, 120)
    assert up.upscale(Image.open(tmp_path / "in.png"), scale=2, color_fix="wavelet").size == (80, 60)
    pixels = photo_like(40, 30).astype(np.float32) / 255
    with pytest.raises(TypeError, match="not ndarray; for arrays use upscale_picture"):  # was an AttributeError on .info
        up.upscale(pixels)
    assert up.upscale_picture(icmsr_cli.Picture(pixels), scale=2).size == (80, 60)

    notes = []
    up = load_upscaler(base=str(tiny_base), lora=str(tiny_lora), options=UpscaleOptions(scale=2, tile=64), notify=notes.append)
    write_image(up.upscale_picture(read_image(tmp_path / "scan16.tif")), tmp_path / "scan16_x2.tif")
    out = cv2.imread(str(tmp_path / "scan16_x2.tif"), cv2.IMREAD_UNCHANGED)
    assert out.dtype == np.uint16 and out.shape == (40, 48, 3)


def test_integer_arrays_are_samples_not_floats(tiny_base, tiny_lora):
    """`upscale` pointed array users to upscale_picture(Picture(pixels)); a uint8 array from OpenCV
    or numpy was taken for floats in [0, 1] and clipped, so it came out nearly black and white.
    uint8 and uint16 samples now give what their float planes give; other layouts say what fits."""
    from icmsr_cli import Picture, load_upscaler

    up = load_upscaler(base=str(tiny_base), lora=str(tiny_lora))
    rgb = photo_like(24, 20)
    for samples, top, bits in ((rgb, 255, 8), (rgb.astype(np.uint16) * 257, 65535, 16)):
        from_floats = up.upscale_picture(Picture(samples.astype(np.float32) / top, bits), scale=2)
        from_samples = up.upscale_picture(Picture(samples, bits), scale=2)
        np.testing.assert_array_equal(from_samples.pixels, from_floats.pixels)
    for bad, why in ((rgb[..., 0], "H x W x C"), (rgb.astype(np.int32), "uint8 or uint16")):
        with pytest.raises(ValueError, match=why):
            up.upscale_picture(Picture(bad))


def test_floats_past_the_unit_range_are_cut_not_wrapped(tiny_base, tiny_lora):
    """Float planes a little past [0, 1] (a resize's overshoot, a colour conversion's rounding)
    wrapped around in the 8-bit resize: 1.002 became 0, so white came out black, -0.003 white.
    They now give what the values cut to [0, 1] give, at 8 and 16 bits; NaN is refused."""
    from icmsr_cli import Picture, load_upscaler

    up = load_upscaler(base=str(tiny_base), lora=str(tiny_lora))
    inside = photo_like(24, 20).astype(np.float32) / 255
    past = inside.copy()
    past[inside >= 250 / 255] = 1.002
    past[inside <= 5 / 255] = -0.003
    assert (past > 1).any() and (past < 0).any()
    for bits in (8, 16):
        cut = up.upscale_picture(Picture(np.clip(past, 0, 1), bits), scale=2)
        np.testing.assert_array_equal(up.upscale_picture(Picture(past, bits), scale=2).pixels, cut.pixels)
    past[3, 4, 1] = np.nan
    with pytest.raises(ValueError, match="must be finite; 1 are NaN or infinite"):
        up.upscale_picture(Picture(past))


def test_a_pillow_image_keeps_its_profile_exif_and_dpi(tiny_base, tiny_lora):
    """`up.upscale(Image.open("photo.jpg"))` came back with an empty .info: the ICC profile (an
    iPhone's Display P3), the EXIF and the dpi were gone, even for callers who pass them on to
    save(). They are in .info as Image.open puts them, the EXIF giving the output's size."""
    import io

    from PIL import ImageCms

    from icmsr_cli import load_upscaler

    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    exif = Image.Exif()
    exif[0x010F] = "Cam"
    exif[0x8769] = {0xA002: 40}  # the Exif IFD as a dict: Pillow 10 writes no get_ifd() edits of a new block
    buf = io.BytesIO()
    Image.fromarray(photo_like(40, 30)).save(buf, "JPEG", icc_profile=icc, exif=exif, dpi=(300, 300))
    up = load_upscaler(base=str(tiny_base), lora=str(tiny_lora))
    big = up.upscale(Image.open(buf), scale=2)
    assert big.info["icc_profile"] == icc and big.info["dpi"] == (300, 300)
    carried = Image.Exif()
    carried.load(big.info["exif"])
    assert carried[0x010F] == "Cam" and carried.get_ifd(0x8769)[0xA002] == 80
    saved = io.BytesIO()
    big.save(saved, "PNG")  # PNG's writer takes the profile from .info, as for an image Pillow opened
    with Image.open(saved) as im:
        assert im.info["icc_profile"] == icc


def test_an_output_too_large_for_memory_is_refused_before_any_allocation(monkeypatch):
    """A tiny input at a huge scale was ended by the kernel's out-of-memory killer with no word
    (40x30 at --scale 1000). Now the whole-image buffers are sized first and refused with one line;
    a size that fits goes on."""
    import pytest
    import torch

    from icmsr_cli.errors import ImageError
    from icmsr_cli.model import devices
    from icmsr_cli.upscaler import HOST_BYTES_PER_PIXEL, UpscaleOptions, prepare_picture

    picture = icmsr_cli.Picture(photo_like(40, 30).astype(np.float32) / 255)
    have = 2400 * 1800 * HOST_BYTES_PER_PIXEL - 1  # just short of a 60x output
    monkeypatch.setattr(devices, "available_memory", lambda device: have if device == torch.device("cpu") else 0)
    with pytest.raises(ImageError, match=r"a 2400x1800 output needs about 0\.1 GB of memory, 0\.1 GB is available; use a smaller --scale"):
        prepare_picture(picture, UpscaleOptions(scale=60))
    assert prepare_picture(picture, UpscaleOptions(scale=59)).x.shape == (1770, 2360, 3)


@pytest.mark.parametrize("field, value", [("tile", 3), ("tile", 0), ("tile", "off"), ("tile", 8.5), ("tile", True),
                                          ("scale", "4"), ("scale", True), ("min_side", 0)])
def test_options_the_cli_would_refuse_are_refused_when_made(field, value):
    """UpscaleOptions(tile="off") (the CLI's word), tile=0 or tile=8.5 failed inside the model with
    torch's words ("'>=' not supported between instances of 'str' and 'int'", "must be tuple of
    ints"), after the encoder had run; tile=3, below the CLI's least, ran. Each is refused as
    the options are made, naming the field."""
    from icmsr_cli import UpscaleOptions

    with pytest.raises(ValueError, match=rf"^{field} must be .*, got {re.escape(repr(value))}$"):
        UpscaleOptions(**{field: value})
    for fine in ({"tile": None}, {"tile": "auto"}, {"tile": 8}, {"scale": 2.5}, {"min_side": 1}):
        UpscaleOptions(**fine)


def test_write_image_into_a_folder_that_is_not_there_says_so(tmp_path):
    """write_image into a missing folder said "cannot write (No such file or directory)", which
    named neither the folder nor that the folder was what was missing."""
    from icmsr_cli import ImageError, Picture, write_image

    picture = Picture(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ImageError, match=rf"^{re.escape(str(tmp_path / 'new' / 'x.png'))}: cannot write: its folder "
                                         rf"{re.escape(str(tmp_path / 'new'))} does not exist$"):
        write_image(picture, tmp_path / "new" / "x.png")
    (tmp_path / "f").write_bytes(b"")
    with pytest.raises(ImageError, match=r": cannot write: its folder .*f is a file, not a folder$"):
        write_image(picture, tmp_path / "f" / "x.png")
    write_image(picture, tmp_path / "x.png")
    assert Image.open(tmp_path / "x.png").size == (4, 4)
