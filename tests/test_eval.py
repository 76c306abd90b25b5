"""`icmsr eval`: PSNR/SSIM on Y exactly as the papers' tables (pyiqa, test_y_channel=True,
color_space='ycbcr'), pairing by stem, one line per bad pair, NDJSON.

The reference numbers are computed here independently: the Y conversion as a matrix product with the
published BT.601 constants and SSIM with torch's conv2d over a 2-D Gaussian window built the way
MATLAB's fspecial builds it, in float64, as pyiqa does. Images go through real PNG encoders.
"""

from __future__ import annotations

import json
import math

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from icmsr_cli.scoring import metrics
from icmsr_cli.cli import app
from icmsr_cli.scoring.evaluation import pair_files


def run(*args):
    return CliRunner().invoke(app, list(map(str, args)))


def reference_y(rgb01: np.ndarray) -> torch.Tensor:
    """BT.601 Y with the studio offset, RGB in [0, 1] -> [0, 1], N x 1 x H x W float64."""
    m = torch.tensor([65.481, 128.553, 24.966], dtype=torch.float64)
    x = torch.from_numpy(rgb01.astype(np.float64))
    return ((x @ m + 16.0) / 255.0)[None, None]


def reference_psnr(sr01, ref01, border=0) -> float:
    a, b = reference_y(sr01), reference_y(ref01)
    if border:
        a, b = a[..., border:-border, border:-border], b[..., border:-border, border:-border]
    return float(10 * torch.log10(1.0 / (torch.mean((a - b) ** 2) + 1e-8)))


def reference_ssim(sr01, ref01, border=0) -> float:
    a, b = (reference_y(sr01) * 255).round(), (reference_y(ref01) * 255).round()
    if border:
        a, b = a[..., border:-border, border:-border], b[..., border:-border, border:-border]
    yy, xx = np.mgrid[-5:6, -5:6]
    h = np.exp(-(xx * xx + yy * yy) / (2 * 1.5 * 1.5))
    h[h < np.finfo(h.dtype).eps * h.max()] = 0
    win = torch.from_numpy(h / h.sum())[None, None]
    f = lambda t: F.conv2d(t, win)  # 'valid'
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mu1, mu2 = f(a), f(b)
    s1, s2, s12 = f(a * a) - mu1 ** 2, f(b * b) - mu2 ** 2, f(a * b) - mu1 * mu2
    cs = torch.relu((2 * s12 + c2) / (s1 + s2 + c2))
    return float((((2 * mu1 * mu2 + c1) / (mu1 ** 2 + mu2 ** 2 + c1)) * cs).mean())


def pair_of_photos(h: int, w: int, seed: int, bits: int = 8):
    rng = np.random.default_rng(seed)
    top = 2 ** bits - 1
    ref = cv2.GaussianBlur(rng.uniform(0, top, (h, w, 3)), (0, 0), 2.0)
    ref = np.clip((ref - ref.min()) / (ref.max() - ref.min()) * top, 0, top)
    sr = np.clip(cv2.GaussianBlur(ref, (0, 0), 0.8) + rng.normal(0, top / 60, ref.shape), 0, top)
    dtype = np.uint8 if bits == 8 else np.uint16
    return sr.round().astype(dtype), ref.round().astype(dtype)


def write_rgb(path, rgb):
    assert cv2.imwrite(str(path), np.ascontiguousarray(rgb[..., ::-1]))


def eval_json(*args):
    result = run("eval", *args, "--json")
    lines = [json.loads(line) for line in result.stdout.strip().splitlines()]
    return result, lines


@pytest.mark.parametrize("bits,h,w,border", [(8, 37, 53, 0), (8, 64, 41, 4), (16, 45, 30, 2)])
def test_psnr_and_ssim_equal_the_papers_definition(tmp_path, bits, h, w, border):
    """Odd sizes, a crop border and a 16-bit pair, through real PNG files and the CLI's JSON."""
    sr, ref = pair_of_photos(h, w, seed=bits + h, bits=bits)
    write_rgb(tmp_path / "sr.png", sr)
    write_rgb(tmp_path / "ref.png", ref)
    result, lines = eval_json(tmp_path / "sr.png", "--ref", tmp_path / "ref.png", "--crop-border", border)
    assert result.exit_code == 0, result.output
    top = 2 ** bits - 1
    want_psnr = reference_psnr(sr / top, ref / top, border)
    want_ssim = reference_ssim(sr / top, ref / top, border)
    assert 15 < want_psnr < 45 and 0.3 < want_ssim < 0.999  # a realistic regime, not a degenerate one
    # pixels travel as float32 v/max (as pyiqa's ToTensor gives them): ~1e-6 dB from the exact values;
    # a wrong constant moves PSNR by 1e-3 or more
    assert lines[0]["psnr"] == pytest.approx(want_psnr, abs=2e-5)
    assert lines[0]["ssim"] == pytest.approx(want_ssim, abs=1e-7)
    assert lines[-1] == {"mean": {"psnr": lines[0]["psnr"], "ssim": lines[0]["ssim"]}, "count": 1}


def test_flat_gray_images_give_the_closed_form():
    """Gray a against gray b: Y*255 = 219 v/255 + 16, so PSNR and SSIM have closed forms that pin
    the luma scale (219), the offset (16), the rounding before SSIM, C1 and pyiqa's 1e-8."""
    a, b = 100, 110
    sr, ref = np.full((20, 20, 1), a / 255, np.float32), np.full((20, 20, 1), b / 255, np.float32)
    assert metrics.psnr_y(sr, ref) == pytest.approx(-10 * math.log10((219 * (a - b) / 255 / 255) ** 2 + 1e-8), abs=2e-5)
    ya, yb = round(219 * a / 255 + 16), round(219 * b / 255 + 16)  # 102 and 110: rounding matters here
    c1 = (0.01 * 255) ** 2
    assert metrics.ssim_y(sr, ref) == pytest.approx((2 * ya * yb + c1) / (ya ** 2 + yb ** 2 + c1), abs=1e-12)
    assert metrics.psnr_y(sr, sr) == pytest.approx(80.0) and metrics.ssim_y(sr, sr) == pytest.approx(1.0)


def test_alpha_is_ignored_and_gray_counts_as_rgb():
    sr, ref = pair_of_photos(24, 24, seed=3)
    alpha = np.full((24, 24, 1), 0.25, np.float32)
    rgb = (sr / 255).astype(np.float32)
    rgba = np.concatenate([rgb, alpha], axis=2)
    assert metrics.psnr_y(rgba, ref / 255) == metrics.psnr_y(rgb, ref / 255)
    gray = (ref[..., :1] / 255).astype(np.float32)
    assert metrics.ssim_y(gray, gray * 0.9) == pytest.approx(metrics.ssim_y(np.repeat(gray, 3, 2), np.repeat(gray * 0.9, 3, 2)))


def test_folders_pair_by_stem_and_bad_pairs_are_one_line_each(tmp_path):
    srd, hrd = tmp_path / "sr", tmp_path / "hr"
    srd.mkdir(), hrd.mkdir()
    for i in range(3):
        sr, ref = pair_of_photos(32, 32, seed=i)
        write_rgb(hrd / f"{i:04d}.png", ref)
        write_rgb(srd / f"{i:04d}_x4.png", sr)
    write_rgb(hrd / "0003.png", ref)  # no SR partner
    write_rgb(srd / "0004_x4.png", ref)  # no reference partner
    write_rgb(hrd / "0005.png", ref)
    write_rgb(srd / "0005.png", ref[:30])  # size mismatch
    (hrd / "0006.png").write_bytes(b"not a png")
    write_rgb(srd / "0006.png", ref)  # unreadable reference
    result, lines = eval_json(srd, "--ref", hrd)
    assert result.exit_code == 1
    scored = [l for l in lines if "psnr" in l]
    assert [l["sr"] for l in scored] == [str(srd / f"{i:04d}_x4.png") for i in range(3)]
    assert [l["ref"] for l in scored] == [str(hrd / f"{i:04d}.png") for i in range(3)]
    errors = [l for l in lines if "error" in l]
    # every failure is a line, unpaired files too (they were on stderr alone)
    assert {(l["sr"], l["ref"]) for l in errors} == {(str(srd / "0005.png"), str(hrd / "0005.png")), (str(srd / "0006.png"), str(hrd / "0006.png")),
                                                     (str(srd / "0004_x4.png"), None), (None, str(hrd / "0003.png"))}
    assert lines[-1]["count"] == 3
    assert lines[-1]["mean"]["psnr"] == pytest.approx(np.mean([l["psnr"] for l in scored]))
    stderr = [l for l in result.stderr.splitlines() if l.startswith("error:")]
    assert len(stderr) == 4 and "Traceback" not in result.output
    assert any("0003.png: no SR image" in l for l in stderr)
    assert any("0004_x4.png: no reference named" in l for l in stderr)
    assert any("30x32" not in l and "32x30, but the reference" in l for l in stderr)
    assert any("0006.png: cannot read image" in l for l in stderr)


def test_when_every_pair_fails_only_the_errors_print(tmp_path):
    """The table of scores is left out when there is nothing in it (it printed its headers alone)."""
    sr, ref = pair_of_photos(32, 32, seed=0)
    write_rgb(tmp_path / "sr.png", sr)
    write_rgb(tmp_path / "ref.png", ref[:30])
    result = run("eval", tmp_path / "sr.png", "--ref", tmp_path / "ref.png")
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [f"error: {tmp_path / 'sr.png'}: 32x32, but the reference {tmp_path / 'ref.png'} is 32x30"]


def test_max_pixels_the_refusal_names_is_an_option_of_eval(tmp_path):
    """An SR image over the pixel limit (an upscale's output passes the default easily: 4x of a
    2400x2400 input) was refused with "raise --max-pixels to allow it", an option eval did not
    have. It has it now, with upscale's meaning."""
    sr, ref = pair_of_photos(32, 32, seed=0)
    write_rgb(tmp_path / "sr.png", sr)
    write_rgb(tmp_path / "ref.png", ref)
    refused = run("eval", tmp_path / "sr.png", "--ref", tmp_path / "ref.png", "--max-pixels", 1000)
    assert refused.exit_code == 1 and refused.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'sr.png'}: 32x32 is 1,024 pixels, over the limit of 1,000; raise --max-pixels to allow it"]
    scored = run("eval", tmp_path / "sr.png", "--ref", tmp_path / "ref.png", "--max-pixels", 1024, "--json")
    assert scored.exit_code == 0 and json.loads(scored.stdout.splitlines()[-1])["count"] == 1, scored.output


def test_pairing_rules(tmp_path):
    srd, hrd = tmp_path / "sr", tmp_path / "hr"
    srd.mkdir(), hrd.mkdir()
    for name in ("0001", "0010", "img"):
        (hrd / f"{name}.png").write_bytes(b"")
    for name in ("0001_x4", "00100_x4", "0010-out", "img.sr", "img_x4", "lone"):
        (srd / f"{name}.png").write_bytes(b"")
    pairs, problems = pair_files(srd, hrd)
    got = {p.sr.stem: p.ref.stem for p in pairs}
    assert got == {"0001_x4": "0001", "0010-out": "0010", "img.sr": "img"}  # 00100_x4 is not 0010's
    assert any("00100_x4.png: no reference named 00100_x4.* or 00100.*" in str(p) for p in problems)
    assert any("img_x4.png: pairs with" in str(p) and "--suffix" in str(p) for p in problems)
    assert str(srd / "lone.png") + ": no reference named lone.*" in map(str, problems)  # not "lone.* or lone.*"
    pairs, problems = pair_files(srd, hrd, suffix="_x4")
    assert {p.sr.stem: p.ref.stem for p in pairs} == {"0001_x4": "0001", "img_x4": "img"}
    assert any("0010-out.png: the name does not end in the suffix" in str(p) for p in problems)


def test_usage_errors_exit_2(tmp_path):
    write_rgb(tmp_path / "a.png", np.zeros((16, 16, 3), np.uint8))
    result = run("eval", tmp_path / "a.png", "--ref", tmp_path / "missing.png")
    assert result.exit_code == 2 and "missing.png: no such reference" in result.stderr
    result = run("eval", tmp_path / "a.png", "--ref", tmp_path / "a.png", "--metrics", "psnr,fid")
    assert result.exit_code == 2 and "unknown metric fid" in result.stderr
    write_rgb(tmp_path / "b.png", np.zeros((16, 16, 3), np.uint8))
    result = run("eval", tmp_path / "a.png", "--ref", tmp_path / "b.png", "--crop-border", "8")
    assert result.exit_code == 1 and "nothing left after cropping 8" in result.stderr


def test_the_sr_images_as_their_own_reference_are_refused(tmp_path):
    """`icmsr eval out/ --ref out/` (a slip of the folder name) scored every image against itself
    and printed a table of 80 dB and SSIM 1, exit 0."""
    sr = tmp_path / "sr"
    sr.mkdir()
    write_rgb(sr / "0001.png", np.zeros((16, 16, 3), np.uint8))
    for ref in (sr, tmp_path / "." / "sr" / "", sr / "0001.png"):
        target = sr / "0001.png" if ref.suffix else sr
        result = run("eval", target, "--ref", ref)
        assert result.exit_code == 2, result.output
        assert "is the SR " in result.stderr and "--ref takes the reference (ground-truth) images" in result.stderr
    # the image's own folder as --ref, or an empty --ref ("$REF" unset: the current folder), paired it with itself
    result = run("eval", sr / "0001.png", "--ref", sr)
    assert result.exit_code == 1 and result.stderr.strip().splitlines() == [
        f"error: {sr / '0001.png'}: its reference would be the image itself ({sr / '0001.png'}); "
        "--ref takes the reference (ground-truth) images"]
    for args in ((sr / "0001.png", "--ref", ""), ("", "--ref", sr)):
        result = run("eval", *args)
        assert result.exit_code == 2 and "path is empty; name an image or a folder of them" in result.stderr, result.output


def test_a_bug_met_reading_one_pair_fails_that_pair(tmp_path, monkeypatch):
    """As in a batch: an exception nobody raised on purpose, met reading one pair's files, ended
    the whole evaluation (exit 3, no table); it is now that pair's error, said as a bug, and the
    other pairs are scored. --debug still raises it."""
    from icmsr_cli.scoring import evaluation

    sr, ref = tmp_path / "sr", tmp_path / "ref"
    sr.mkdir(), ref.mkdir()
    for name in ("a", "b"):
        write_rgb(sr / f"{name}.png", np.full((16, 16, 3), 100, np.uint8))
        write_rgb(ref / f"{name}.png", np.full((16, 16, 3), 110, np.uint8))
    read = evaluation.read_image

    def read_image(path, **kwargs):
        if path.name == "a.png" and path.parent == ref:
            raise KeyError(274)
        return read(path, **kwargs)

    monkeypatch.setattr(evaluation, "read_image", read_image)
    monkeypatch.setenv("ICMSR_DEBUG", "")
    result = run("eval", sr, "--ref", ref, "--json")
    assert result.exit_code == 1, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert records[0]["error"] == (f"{sr / 'a.png'}: unexpected KeyError while reading it or its reference: 274 "
                                   "(this is a bug in icmsr; rerun with --debug for the traceback and report it)")
    assert "error" not in records[1] and records[1]["psnr"] == pytest.approx(20 * math.log10(255 / (10 * 219 / 255)), abs=1e-3)  # Y moves 219/255 of the step
    with pytest.raises(KeyError):
        CliRunner().invoke(app, ["--debug", "eval", str(sr), "--ref", str(ref)], catch_exceptions=False)


def test_learned_metric_without_pyiqa_says_how_to_install(tmp_path):
    import importlib.util

    if importlib.util.find_spec("pyiqa") is not None:
        pytest.skip("pyiqa is installed here")
    write_rgb(tmp_path / "a.png", np.zeros((16, 16, 3), np.uint8))
    write_rgb(tmp_path / "b.png", np.zeros((16, 16, 3), np.uint8))
    result = run("eval", tmp_path / "a.png", "--ref", tmp_path / "b.png", "--metrics", "psnr,lpips")
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        "error: lpips needs pyiqa, which is not installed: pip install pyiqa (its licence is non-commercial; psnr and ssim need nothing)"]
    assert result.stdout == ""


def test_anticorrelated_structure_is_clipped_at_zero_as_pyiqa_does():
    """An inverted image has negative local covariance: pyiqa clips the contrast-structure term at 0."""
    _, ref = pair_of_photos(40, 40, seed=7)
    sr = 255 - ref
    got = metrics.ssim_y((sr / 255).astype(np.float32), (ref / 255).astype(np.float32))
    assert got == pytest.approx(reference_ssim(sr / 255, ref / 255), abs=1e-7)
    assert 0 <= got < 0.05
