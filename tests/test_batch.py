"""Folders, pipes and every kind of image, with real files through real encoders and decoders."""

from __future__ import annotations

import io
import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image, features
from typer.testing import CliRunner

from conftest import photo_like
from icmsr_cli.cli import app


def _png_bomb(path: Path, w: int = 60000, h: int = 60000) -> None:
    """A small, valid-looking PNG whose header claims w x h pixels."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b""))


def _truncated(path: Path, fmt: str) -> None:
    buf = io.BytesIO()
    Image.fromarray(photo_like(64, 48, seed=9)).save(buf, format=fmt)
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])


@pytest.fixture
def mixed(tmp_path):
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    rgb = photo_like(30, 20, seed=1)
    Image.fromarray(rgb).save(src / "rgb.png")
    Image.fromarray(np.dstack([rgb, np.linspace(0, 255, 30 * 20).reshape(20, 30).astype(np.uint8)])).save(src / "rgba.png")
    Image.fromarray(rgb).convert("L").save(src / "gray.png")
    Image.fromarray((np.linspace(0, 65535, 30 * 20).reshape(20, 30)).astype(np.uint16)).save(src / "gray16.png")
    cv2.imwrite(str(src / "rgb16.png"), (rgb.astype(np.uint16) * 257 + 3)[..., ::-1])
    Image.fromarray(rgb).convert("CMYK").save(src / "cmyk.jpg")
    Image.fromarray(rgb).save(src / "sub" / "nested.webp")
    Image.fromarray(rgb).save(src / "photo.tiff")
    Image.fromarray(rgb).save(src / "pic.bmp")
    Image.fromarray(rgb).save(src / ".hidden.png")
    (src / "notes.txt").write_text("not an image, and not named like one")
    (src / "empty.png").write_bytes(b"")
    (src / "text.jpg").write_text("hello, I am text")
    _truncated(src / "trunc.png", "PNG")
    _truncated(src / "trunc.jpg", "JPEG")
    _png_bomb(src / "bomb.png")
    return src


GOOD = {  # name: (mode, bit depth) expected of the output
    "rgb.png": ("RGB", 8), "rgba.png": ("RGBA", 8), "gray.png": ("L", 8), "gray16.png": ("I;16", 16),
    "rgb16.png": ("RGB", 16), "cmyk.jpg": ("RGB", 8), "sub/nested.webp": ("RGB", 8), "photo.tiff": ("RGB", 8), "pic.bmp": ("RGB", 8),
}
BROKEN = {"empty.png": "empty file", "text.jpg": "not a recognised image format", "trunc.png": "truncated",
          "trunc.jpg": "truncated", "bomb.png": "over the limit"}


def _mode_and_depth(path: Path) -> tuple[str, int]:
    arr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    with Image.open(path) as im:
        if arr is not None and arr.dtype == np.uint16 and arr.ndim == 3:
            return "RGB", 16
        if arr is not None and arr.dtype == np.uint16:  # Pillow before 10.1 opens 16-bit gray as "I"
            return "I;16", 16
        return im.mode, 16 if im.mode.startswith("I;16") else 8


def test_mixed_folder(tmp_path, mixed, tiny_base, tiny_lora):
    out = tmp_path / "out"
    args = ["upscale", str(mixed), "-r", "-o", str(out), "-s", "2", "--base", str(tiny_base), "--lora", str(tiny_lora), "--tile", "off", "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output
    for name, (mode, depth) in GOOD.items():
        path = out / name
        assert path.is_file(), name
        assert Image.open(path).size == (60, 40), name
        assert _mode_and_depth(path) == (mode, depth), name
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    for name, reason in BROKEN.items():
        assert not (out / name).exists()
        assert any(f"{mixed / name}:" in line and reason in line.lower() for line in errors), (name, errors)
    assert len(errors) == len(BROKEN)
    assert not (out / ".hidden.png").exists() and not (out / "notes.txt").exists()
    assert "hidden" not in result.stderr and "notes.txt" not in result.stderr
    assert not [p for p in out.rglob("*") if p.name.startswith(".")], "temporary files left behind"
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert sorted(r["status"] for r in records) == ["done"] * len(GOOD) + ["failed"] * len(BROKEN)
    assert all(r["output_size"] == [60, 40] for r in records if r["status"] == "done")

    # 16-bit stays 16-bit in value, not just in container: the gradient keeps fine steps
    g16 = np.asarray(Image.open(out / "gray16.png"), dtype=np.int64)
    assert len(np.unique(g16)) > 256
    # alpha is the input alpha resized bicubic as an 8-bit plane (Pillow), untouched by the model
    alpha = np.asarray(Image.open(out / "rgba.png"))[..., 3]
    source_alpha = np.asarray(Image.open(mixed / "rgba.png"))[..., 3]
    np.testing.assert_array_equal(alpha, np.asarray(Image.fromarray(source_alpha).resize((60, 40), Image.Resampling.BICUBIC)))

    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    rerun = CliRunner().invoke(app, args[:-1])
    assert rerun.exit_code == 1
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before, "a rerun must not rewrite finished outputs"
    assert f"{len(GOOD)} skipped" in rerun.stderr


def test_inputs_in_formats_icmsr_only_reads_become_pngs_in_an_output_folder(tmp_path):
    """A GIF, an AVIF or an iPhone's HEIC mirrored into an output folder kept its name there, which
    icmsr cannot write: each such file failed (a shell glob of *.HEIC failed them all), and folders
    skipped GIF, AVIF and .jfif (JPEGs as Windows browsers save them) in silence. They are PNGs now, as on standard output; a file without a
    suffix too. Two inputs that would make one PNG are still refused, naming both."""
    from icmsr_cli.errors import SetupError
    from icmsr_cli.io import batch

    src = tmp_path / "in"
    src.mkdir()
    pixels = photo_like(12, 8)
    Image.fromarray(pixels).save(src / "anim.gif")
    avif = features.check("avif")  # Pillow writes and reads AVIF from 11.3
    if avif:
        Image.fromarray(pixels).save(src / "shot.avif", quality=100)
    Image.fromarray(pixels).save(src / "kept.png")
    Image.fromarray(pixels).save(src / "download.jfif", "JPEG", quality=100)  # a JPEG as Windows browsers name it
    Image.fromarray(pixels).save(tmp_path / "scan", format="PNG")  # a name with no suffix
    (src / "IMG_0001.HEIC").write_bytes(b"\0\0\0\x1cftypheic\0\0\0\0mif1heicmiaf" + bytes(64))
    jobs, missing = batch.plan([str(src), str(tmp_path / "scan")], str(tmp_path / "out"))
    assert {j.target.name for j in jobs} == {"anim.png", "kept.png", "scan.png", "IMG_0001.png", "download.jfif",
                                             *(["shot.png"] if avif else [])} and not missing
    results = {r.job.target.name: r for r in batch.run(batch.Reader(jobs, batch.BatchSettings()), lambda picture: picture)}
    for name in ("anim.png", "scan.png", "kept.png"):
        assert results[name].status == "done"
        with Image.open(tmp_path / "out" / name) as im:
            assert im.format == "PNG" and np.array_equal(np.asarray(im.convert("RGB")), pixels)
    assert not avif or results["shot.png"].status == "done"
    with Image.open(tmp_path / "out" / "download.jfif") as im:
        assert im.format == "JPEG" and results["download.jfif"].status == "done"
    assert "pillow-heif" in results["IMG_0001.png"].error  # read where it is installed, and said where not
    # beside an input of that PNG's name, the suffix is kept (the folder ran before GIFs were taken)
    Image.fromarray(pixels).save(src / "anim.png")
    jobs, _ = batch.plan([str(src)], str(tmp_path / "out"))
    assert {j.name.rsplit("/", 1)[1]: j.target.name for j in jobs if j.name.endswith(("anim.gif", "anim.png"))} == {
        "anim.gif": "anim.gif.png", "anim.png": "anim.png"}
    # --format still rules, and collisions are refused before any work
    jobs, _ = batch.plan([str(src / "anim.gif")], str(tmp_path / "out") + "/", fmt="webp")
    assert [j.target for j in jobs] == [tmp_path / "out" / "anim.webp"]
    with pytest.raises(SetupError, match="anim.gif and .*anim.png would both be written to"):
        batch.plan([str(src)], str(tmp_path / "out"), fmt="png")


def test_a_file_reached_through_a_link_keeps_its_own_place_in_the_output_tree(tmp_path):
    """With -r, a link sorted before its target (Best/x.png -> ../raw/x.png) was taken and the
    real file dropped as a repeat: raw/x.png was missing from the mirrored tree. The file is still
    taken once, under its own name; a link to a file outside the inputs is a file like any other."""
    from icmsr_cli.io import batch

    src = tmp_path / "photos"
    (src / "raw").mkdir(parents=True)
    (src / "Best").mkdir()
    Image.fromarray(photo_like(8, 8)).save(src / "raw" / "x.png")
    Image.fromarray(photo_like(8, 8)).save(tmp_path / "elsewhere.png")
    (src / "Best" / "x.png").symlink_to("../raw/x.png")
    (src / "Best" / "y.png").symlink_to(tmp_path / "elsewhere.png")
    (src / "Best" / "up").symlink_to("..")  # a loop, not followed
    jobs, missing = batch.plan([str(src)], str(tmp_path / "out"), recursive=True)
    assert [j.key for j in jobs] == ["Best/y.png", "raw/x.png"] and not missing


def test_an_output_folder_this_user_cannot_write_is_refused_up_front():
    """Checked with the permissions the writes will run under: as root the test takes another
    user's (nobody's) for the check, since root may write anywhere (in a folder of the system's
    temporary one, which pytest's own are closed to other users)."""
    import shutil
    import tempfile

    from icmsr_cli.errors import SetupError
    from icmsr_cli.io import batch

    top = Path(tempfile.mkdtemp(prefix="icmsr-perm-"))
    locked, free = top / "locked", top / "free"
    locked.mkdir(), free.mkdir()
    top.chmod(0o755)
    locked.chmod(0o555)
    free.chmod(0o777)
    jobs = [batch.Job(None, free / "deep" / "a.png", "a"), batch.Job(None, locked / "deep" / "b.png", "b")]
    root = os.geteuid() == 0
    if root:
        os.seteuid(65534)
    try:
        batch.check_writable(jobs[:1])
        with pytest.raises(SetupError) as caught:
            batch.check_writable(jobs)
    finally:
        if root:
            os.seteuid(0)
        shutil.rmtree(top, ignore_errors=True)
    assert str(caught.value) == f"{locked / 'deep' / 'b.png'}: cannot be written: {locked} is not writable by this user"


def test_metadata_orientation_and_format(tmp_path, tiny_base, tiny_lora):
    src = tmp_path / "portrait.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown rotated 90 degrees clockwise
    exif[0x010F] = "TestCam"
    icc = b"\0" * 128  # opaque bytes: Pillow carries ICC profiles without parsing them
    Image.fromarray(photo_like(40, 20)).save(src, exif=exif.tobytes(), icc_profile=icc)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["upscale", str(src), "-o", str(out) + "/", "--format", "png", "-s", "1.5",
                                      "--base", str(tiny_base), "--lora", str(tiny_lora), "--tile", "off"])
    assert result.exit_code == 0, result.output
    with Image.open(out / "portrait.png") as im:
        assert im.size == (30, 60)  # orientation applied before scaling: 20x40 upright
        assert im.info.get("icc_profile") == icc
        kept = im.getexif()
        assert kept.get(0x010F) == "TestCam" and kept.get(0x0112, 1) == 1


def test_output_never_overwrites_input(tmp_path, tiny_base, tiny_lora):
    src = tmp_path / "same.png"
    Image.fromarray(photo_like(16, 16)).save(src)
    before = src.read_bytes()
    result = CliRunner().invoke(app, ["upscale", str(src), "-o", str(src), "--overwrite", "--base", str(tiny_base), "--lora", str(tiny_lora)])
    assert result.exit_code == 1 and "would overwrite the input" in result.stderr
    assert src.read_bytes() == before


def _cli(*args):
    return [sys.executable, "-m", "icmsr_cli", *map(str, args)]


def test_pipe_stdin_to_stdout(tmp_path, tiny_base, tiny_lora):
    src = tmp_path / "in.png"
    Image.fromarray(photo_like(24, 18)).save(src)
    cmd = f"cat {src} | {' '.join(_cli('upscale', '-', '-o', '-', '--base', tiny_base, '--lora', tiny_lora, '--tile', 'off'))} > {tmp_path / 'out.png'}"
    proc = subprocess.run(cmd, shell=True, capture_output=True, env={**os.environ}, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()
    data = (tmp_path / "out.png").read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        assert im.size == (96, 72) and im.format == "PNG"
    # nothing but the image: the PNG ends exactly at the IEND chunk
    assert data.endswith(b"IEND\xaeB`\x82")


def test_sigterm_while_standard_input_is_still_coming_exits_at_once(tmp_path, tiny_base, tiny_lora):
    """`slow-producer | icmsr upscale - -o out.png`, stopped: the exit waited for the producer to
    finish (the read of the pipe held the reader thread, which the exit joined)."""
    proc = subprocess.Popen(_cli("upscale", "-", "-o", tmp_path / "out.png", "--base", tiny_base, "--lora", tiny_lora,
                                 "--tile", "off"), stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ready = proc.stderr.readline().decode()  # "model ready ...": the read of the open pipe is under way
    assert "model ready" in ready, ready
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(timeout=20)
    finally:
        proc.stdin.close()
    stderr = proc.stderr.read().decode()
    assert code == 143, stderr
    assert "interrupted" in stderr and "Fatal" not in stderr and "Traceback" not in stderr, stderr
    assert not (tmp_path / "out.png").exists()


def test_a_pipe_named_as_input_is_awaited_while_the_model_loads(tmp_path, tiny_base, tiny_lora):
    """bash's `<(curl -s URL)` hands icmsr a pipe by name (/dev/fd/63). The model waits for an
    input that reads, so that unreadable files fail before it loads; a pipe's bytes come when its
    producer sends them, and the model waited for the whole download before loading."""
    import select

    fifo = tmp_path / "download.png"
    os.mkfifo(fifo)
    proc = subprocess.Popen(_cli("upscale", fifo, "-o", tmp_path / "out.png", "--base", tiny_base, "--lora", tiny_lora, "--tile", "off"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        said = select.select([proc.stderr], [], [], 90)[0]
        assert said, "nothing was said while the pipe had no writer: the model waited for it"
        assert "model ready" in proc.stderr.readline().decode()
        data = io.BytesIO()
        Image.fromarray(photo_like(16, 12)).save(data, "PNG")
        with open(fifo, "wb") as producer:
            producer.write(data.getvalue())
        assert proc.wait(timeout=120) == 0, proc.stderr.read().decode()
        assert Image.open(tmp_path / "out.png").size == (64, 48)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_killed_batch_leaves_no_partial_file_and_rerun_completes(tmp_path, tiny_base, tiny_lora):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    for i in range(8):
        Image.fromarray(photo_like(32, 24, seed=i)).save(src / f"img{i}.png")
    args = _cli("upscale", src, "-o", out, "--base", tiny_base, "--lora", tiny_lora, "--tile", "off", "-q")
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while time.time() < deadline and not (out.is_dir() and list(out.glob("*.png"))):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = sorted(out.glob("*.png"))
    assert 0 < len(finished) < 8, "the kill should land mid-batch"
    for path in finished:  # every visible output is a complete image
        with Image.open(path) as im:
            im.load()
            assert im.size == (128, 96)
    rerun = subprocess.run(args, capture_output=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr.decode()
    assert sorted(p.name for p in out.iterdir()) == [f"img{i}.png" for i in range(8)], "no temporaries may remain"


def test_writer_threads_keep_job_order_and_the_same_files(tmp_path, tiny_base, tiny_lora):
    """Encoding and writing overlap the model in writer threads: results still come in job order,
    each file equals the one-writer run's pixels, and --png-compression changes bytes, not pixels."""
    import torch

    from icmsr_cli.io import batch
    from icmsr_cli.model.loading import load_pipeline
    from icmsr_cli.upscaler import UpscaleOptions, upscale_picture

    src = tmp_path / "in"
    src.mkdir()
    for i in range(5):
        Image.fromarray(photo_like(24 + i, 16, seed=i)).save(src / f"{i}.png")
    pipe = load_pipeline(tiny_base, tiny_lora, device=torch.device("cpu"), dtype=torch.float32)
    upscale = lambda picture: upscale_picture(pipe, picture, UpscaleOptions(scale=2, min_side=16, tile=None))  # noqa: E731
    outputs = {}
    for writers, level in ((1, 9), (3, 1)):
        jobs, _ = batch.plan([str(src)], str(tmp_path / f"out{writers}"))
        settings = batch.BatchSettings(writers=writers, png_compression=level)
        results = list(batch.run(batch.Reader(jobs, settings), upscale))
        assert [r.job for r in results] == jobs and all(r.status == "done" for r in results)
        outputs[writers] = {j.target.name: j.target for j in jobs}
    for name, path in outputs[1].items():
        np.testing.assert_array_equal(np.asarray(Image.open(path)), np.asarray(Image.open(outputs[3][name])))
    # the level reaches the encoder: the zlib header's FLEVEL says it (level 9 "maximum", level 1
    # "fastest"); the sizes of tiny noisy images tell levels 1 and 9 apart by a few bytes either way
    zlib_header = lambda path: path.read_bytes().split(b"IDAT", 1)[1][:2]  # noqa: E731
    assert {zlib_header(p) for p in outputs[1].values()} == {b"\x78\xda"}
    assert {zlib_header(p) for p in outputs[3].values()} == {b"\x78\x01"}


def test_prepared_in_the_reader_thread_gives_the_same_files_and_names_a_failure(tmp_path, tiny_base, tiny_lora):
    """With `prepare` (the CLI passes it on a GPU) the resize to the model's size runs in the reader
    thread, overlapping the model's work on the file before; the files equal the plain run's. A
    file that fails there (an empty output size) fails alone, on a line that names it."""
    import threading

    import torch

    from icmsr_cli.io import batch
    from icmsr_cli.model.loading import load_pipeline
    from icmsr_cli.upscaler import Upscaler, UpscaleOptions

    src = tmp_path / "in"
    src.mkdir()
    for i in range(3):
        Image.fromarray(photo_like(24 + 4 * i, 20, seed=i)).save(src / f"{i}.png")
    Image.fromarray(photo_like(1, 1, seed=5)).save(src / "dot.png")  # 1x1 at scale 0.4: no pixels
    up = Upscaler(load_pipeline(tiny_base, tiny_lora, device=torch.device("cpu"), dtype=torch.float32),
                  UpscaleOptions(scale=0.4, min_side=16, tile=None))
    threads = []

    def prepare(picture):
        threads.append(threading.current_thread().name)
        return up.prepare(picture)

    runs = {}
    for name, upscale, ahead in (("plain", up.upscale_picture, None), ("ahead", up.upscale_prepared, prepare)):
        jobs, _ = batch.plan([str(src)], str(tmp_path / name))
        runs[name] = {r.job.source.name: r for r in batch.run(batch.Reader(jobs, batch.BatchSettings(), prepare=ahead), upscale)}
    assert len(threads) == 4 and all(t.startswith("icmsr-read") for t in threads), threads
    for name, result in runs["ahead"].items():
        plain = runs["plain"][name]
        assert result.status == plain.status
        if name == "dot.png":
            assert result.status == "failed" and result.error == plain.error
            assert result.error.startswith(f"{src / 'dot.png'}: ") and "empty 0x0 output" in result.error, result.error
        else:
            assert result.status == "done"
            np.testing.assert_array_equal(np.asarray(Image.open(result.job.target)), np.asarray(Image.open(plain.job.target)))


def test_a_thin_strip_says_how_large_its_run_is(tmp_path):
    """DESIGN's 512-px minimum short side turns a 1x300 input at x4 into a 512x153600 run, hours on
    a CPU for a 4x1200 output, with nothing said; now a note gives the run's size. A small image's
    512-px run (quick) says nothing."""
    from functools import partial

    from icmsr_cli.io import batch
    from icmsr_cli.upscaler import output_size, processing_size

    Image.fromarray(photo_like(1, 300)).save(tmp_path / "strip.png")
    Image.fromarray(photo_like(24, 32)).save(tmp_path / "small.png")
    jobs, _ = batch.plan([str(tmp_path / "strip.png"), str(tmp_path / "small.png")], str(tmp_path / "out"))
    settings = batch.BatchSettings(output_size=partial(output_size, scale=4), run_size=partial(processing_size, min_side=512))
    notes = []
    results = list(batch.run(batch.Reader(jobs, settings), lambda picture: picture, notify=notes.append))
    assert [r.status for r in results] == ["done", "done"]
    assert notes == [f"{tmp_path / 'strip.png'}: its 4x1200 output runs through the model at 512x153600, 16384 times its pixels "
                     "(the model's short side is at least 512 px)"]


def test_animated_and_multi_page_inputs_say_that_only_the_first_frame_is_upscaled(tmp_path):
    """A multi-page TIFF, an animated WebP and an animated PNG decode to their first frame: the
    output holds that frame, and a note per file says so, instead of losing the rest in silence."""
    from icmsr_cli.io import batch

    src = tmp_path / "in"
    src.mkdir()
    first, second = photo_like(24, 16, seed=1), photo_like(24, 16, seed=2)
    for name in ("pages.tiff", "anim.webp", "anim.png"):
        Image.fromarray(first).save(src / name, save_all=True, append_images=[Image.fromarray(second)],
                                    **({"lossless": True} if name.endswith(".webp") else {}))
    Image.fromarray(first).save(src / "still.png")
    jobs, missing = batch.plan([str(src)], str(tmp_path / "out"))
    notes = []
    results = list(batch.run(batch.Reader(jobs, batch.BatchSettings()), lambda picture: picture, notify=notes.append))
    assert [r.status for r in results] == ["done"] * 4 and not missing
    assert sorted(notes) == [f"{src / name}: has 2 frames or pages; only the first is upscaled"
                             for name in ("anim.png", "anim.webp", "pages.tiff")]
    with Image.open(tmp_path / "out" / "pages.tiff") as im:
        assert np.array_equal(np.asarray(im.convert("RGB")), first)


def _float_rgb_tiff(rgb: np.ndarray) -> bytes:
    """An uncompressed IEEE-float RGB TIFF written by hand: OpenCV before 4.9 writes float images
    as LogLuv, which holds no negative values, and Pillow writes no float colour at all."""
    h, w, _ = rgb.shape
    pixels = np.ascontiguousarray(rgb, dtype="<f4").tobytes()
    entries = [(256, 4, 1, w), (257, 4, 1, h), (258, 3, 3, None), (259, 3, 1, 1), (262, 3, 1, 2), (273, 4, 1, None),
               (277, 3, 1, 3), (278, 4, 1, h), (279, 4, 1, len(pixels)), (284, 3, 1, 1), (339, 3, 3, None)]
    ifd_size = 2 + 12 * len(entries) + 4
    three_32, three_float, data_at = 8 + ifd_size, 8 + ifd_size + 6, 8 + ifd_size + 12
    values = {258: three_32, 273: data_at, 339: three_float}
    ifd = struct.pack("<H", len(entries))
    for tag, kind, count, value in entries:
        value = values.get(tag, value)
        ifd += struct.pack("<HHI", tag, kind, count) + (struct.pack("<HH", value, 0) if kind == 3 and count == 1 else struct.pack("<I", value))
    ifd += struct.pack("<I", 0)
    return b"II*\0" + struct.pack("<I", 8) + ifd + struct.pack("<3H", 32, 32, 32) + struct.pack("<3H", 3, 3, 3) + pixels


def test_float_and_32_bit_samples_outside_the_range_read_are_counted_and_said(tmp_path):
    """A float TIFF is read as 0-1 and a 32-bit integer one as 0-65535; values beyond are cut, and
    a note per file gives their share instead of clipping in silence. In-range files get no note.
    A colour float TIFF, which Pillow cannot open, was refused as "not a recognised image format"."""
    from icmsr_cli.io import batch

    src = tmp_path / "in"
    src.mkdir()
    ramp = np.linspace(-0.5, 1.5, 16 * 24, dtype=np.float32).reshape(16, 24)  # a quarter below 0, a quarter above 1
    rgb = np.dstack([ramp, ramp[::-1], 1 - ramp])
    Image.fromarray(ramp).save(src / "hdr.tif")
    Image.fromarray(np.clip(ramp, 0, 1)).save(src / "unit.tif")
    Image.fromarray((ramp * 65535).astype(np.int32)).save(src / "wide.tif")
    (src / "hdr_rgb.tif").write_bytes(_float_rgb_tiff(rgb))
    jobs, missing = batch.plan([str(src)], str(tmp_path / "out"))
    notes = []
    results = list(batch.run(batch.Reader(jobs, batch.BatchSettings()), lambda picture: picture, notify=notes.append))
    assert [r.status for r in results] == ["done"] * 4 and not missing, [r.error for r in results]
    assert sorted(notes) == [f"{src / name}: 50% of its values lie outside 0-1 (float samples) or 0-65535 (integer "
                             "samples) and were clipped to that range" for name in ("hdr.tif", "hdr_rgb.tif", "wide.tif")], notes
    with Image.open(tmp_path / "out" / "hdr.tif") as im:
        out = np.asarray(im, dtype=np.float64) / 65535
    np.testing.assert_allclose(out, np.clip(ramp, 0, 1), atol=1 / 65535)
    out = cv2.imread(str(tmp_path / "out" / "hdr_rgb.tif"), cv2.IMREAD_UNCHANGED)
    assert out.dtype == np.uint16
    np.testing.assert_allclose(out[..., ::-1] / 65535, np.clip(rgb, 0, 1), atol=1 / 65535)


def test_a_files_seconds_end_when_its_file_is_written_not_when_the_next_model_call_ends(tmp_path):
    """Per-file seconds (--json, speed.py's per-file figure) run from the model's start to the
    file. Results are collected between model calls; the first file's was stamped then, so it
    counted the second file's model call as well."""
    import time

    from icmsr_cli.io import batch

    src = tmp_path / "in"
    src.mkdir()
    for i in range(2):
        Image.fromarray(photo_like(16, 16, seed=i)).save(src / f"{i}.png")
    jobs, _ = batch.plan([str(src)], str(tmp_path / "out"))
    calls = []

    def upscale(picture):
        calls.append(picture)
        if len(calls) == 2:
            time.sleep(2.0)  # the second file's model call
        return picture

    results = list(batch.run(batch.Reader(jobs, batch.BatchSettings(writers=2)), upscale))
    assert [r.status for r in results] == ["done", "done"]
    assert results[0].seconds < 1.0, results[0].seconds  # a 16x16 PNG is written in milliseconds
    assert results[1].seconds >= 2.0


def test_files_written_after_an_interrupt_are_told(tmp_path):
    """An interrupt while the model works on one file lets the writes in flight finish (a file is
    never left half-written), but their results were never yielded: the summary said "2 done, 2
    not started" with 3 files on disk, and --json lacked the third's line. They go to on_stopped,
    whether the interrupt lands in the batch or in the caller between files (close())."""
    from contextlib import closing

    from icmsr_cli.io import batch

    src = tmp_path / "in"
    src.mkdir()
    for i in range(4):
        Image.fromarray(photo_like(256, 256, seed=i)).save(src / f"{i}.png")
    for where in ("model", "caller"):
        out = tmp_path / where
        jobs, _ = batch.plan([str(src)], str(out))
        calls, told = [], []

        def upscale(picture):
            calls.append(picture)
            if where == "model" and len(calls) == 3:
                raise KeyboardInterrupt
            return picture

        with pytest.raises(KeyboardInterrupt):
            with closing(batch.run(batch.Reader(jobs, batch.BatchSettings(writers=2, png_compression=9)), upscale,
                                   on_stopped=told.append)) as results:
                for result in results:
                    told.append(result)
                    if where == "caller" and len(calls) == 3:
                        raise KeyboardInterrupt
        written = sorted(p.name for p in out.iterdir())
        assert sorted(r.job.target.name for r in told if r.status == "done") == written, where
        assert len(written) >= 2 and len(told) == len(set(r.job.target for r in told)), where


def test_the_first_file_is_read_while_the_model_loads(tmp_path, tiny_base, tiny_lora, monkeypatch):
    """Both of issue 10's single-process bars count startup; the first file's decode (and, on a GPU,
    its resize) followed the model's loading. Now the reader starts first: the load below waits
    for the read to have happened, which it never did before the load returned."""
    import threading

    from icmsr_cli import upscaler
    from icmsr_cli.io import batch

    read, seen_during_load = threading.Event(), []
    real_read, real_load = batch.read_image, upscaler.load_upscaler

    def reading(*args, **kwargs):
        read.set()
        return real_read(*args, **kwargs)

    def loading(*args, **kwargs):
        seen_during_load.append(read.wait(timeout=20))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(batch, "read_image", reading)
    monkeypatch.setattr(upscaler, "load_upscaler", loading)
    src = tmp_path / "in.png"
    Image.fromarray(photo_like(16, 12)).save(src)
    result = CliRunner().invoke(app, ["upscale", str(src), "-o", str(tmp_path / "out.png"), "--base", str(tiny_base),
                                      "--lora", str(tiny_lora), "--tile", "off"])
    assert result.exit_code == 0, result.output
    assert seen_during_load == [True]
    with Image.open(tmp_path / "out.png") as im:
        assert im.size == (64, 48)


def test_a_damaged_file_says_one_line_and_no_python_warning(tmp_path, tiny_base, tiny_lora):
    """Pillow warns (through Python's warnings, two lines naming its own source file) about some
    damage before it fails; the user gets the one error line that names the file, nothing else."""
    src = tmp_path / "in"
    src.mkdir()
    (src / "bad.tif").write_bytes(b"II*\0" + b"\xff" * 20)  # a TIFF header pointing nowhere
    _truncated(src / "cut.png", "PNG")
    proc = subprocess.run([sys.executable, "-m", "icmsr_cli", "upscale", str(src), "-o", str(tmp_path / "out"), "-q",
                           "--base", str(tiny_base), "--lora", str(tiny_lora), "--tile", "off"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert sorted(proc.stderr.splitlines()) == [
        f"error: {src / 'bad.tif'}: cannot read image (not a recognised image format)",
        f"error: {src / 'cut.png'}: cannot read image (image file is truncated)",
    ], proc.stderr


@pytest.mark.parametrize("kind", ["pipe", "stand-in"])
def test_standard_input_is_read_whole_from_a_pipe_or_a_stand_in(monkeypatch, kind):
    """The reader takes a pipe's bytes from its descriptor (see batch._stdin_bytes), and a stand-in
    with none (a test runner's, a notebook's) through its own read; both give every byte, past
    what one os.read returns."""
    from icmsr_cli.io import batch

    buf = io.BytesIO()
    Image.fromarray(photo_like(700, 600)).save(buf, format="PNG", compress_level=0)  # ~1.3 MB
    data = buf.getvalue()
    if kind == "pipe":
        import threading

        read_end, write_end = os.pipe()
        writer = threading.Thread(target=_write_all, args=(write_end, data))  # a pipe holds far less than the image
        writer.start()
        stdin = io.TextIOWrapper(open(read_end, "rb"))
    else:
        stdin = io.TextIOWrapper(io.BytesIO(data))
    monkeypatch.setattr(sys, "stdin", stdin)
    with batch.Reader([batch.Job(None, None, "<stdin>")], batch.BatchSettings()) as reader:
        picture = reader.next()[1].result()[0]
    if kind == "pipe":
        writer.join()
    assert picture.size == (700, 600) and picture.format == "PNG"
    np.testing.assert_array_equal(np.rint(picture.pixels * 255).astype(np.uint8), photo_like(700, 600))


def _write_all(fd: int, data: bytes) -> None:
    with open(fd, "wb") as w:
        w.write(data)


def test_the_gpu_path_of_the_cli_resizes_in_the_reader_and_writes_the_same_files(tmp_path, tiny_base, tiny_lora, monkeypatch):
    """On a GPU the CLI resizes each image in the reader thread and hands the model a prepared
    input (cli._prepares_ahead); CI has no GPU, so that branch runs here on the CPU, against the
    CPU's own branch: the same files, byte for byte, gray, alpha and 16-bit ones included."""
    import threading

    from icmsr_cli import cli, upscaler

    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(photo_like(256, 256, seed=1)).save(src / "rgb.png")  # 512^2 out: the model's own size, quantised on the device
    Image.fromarray(np.dstack([photo_like(20, 14, seed=2), np.full((14, 20), 200, np.uint8)])).save(src / "rgba.png")
    Image.fromarray(photo_like(18, 12, seed=3)[..., 0]).save(src / "gray.png")
    cv2.imwrite(str(src / "rgb16.png"), (photo_like(16, 16, seed=4).astype(np.uint16) * 257)[..., ::-1])
    threads = []
    real_prepare = upscaler.prepare_picture

    def prepare(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return real_prepare(*args, **kwargs)

    def run(out):
        result = CliRunner().invoke(app, ["upscale", str(src), "-o", str(out), "-s", "2", "--base", str(tiny_base),
                                          "--lora", str(tiny_lora), "--tile", "off"])
        assert result.exit_code == 0, result.output

    run(tmp_path / "cpu")
    monkeypatch.setattr(cli, "_prepares_ahead", lambda device: True)
    monkeypatch.setattr(upscaler, "prepare_picture", prepare)
    run(tmp_path / "gpu")
    assert threads == ["icmsr-read"] * 4
    for name in ("rgb.png", "rgba.png", "gray.png", "rgb16.png"):
        assert (tmp_path / "gpu" / name).read_bytes() == (tmp_path / "cpu" / name).read_bytes(), name


def test_an_output_name_too_long_for_the_file_system_fails_before_the_model(tmp_path):
    """A 252-byte logo.gif beside a logo.png becomes logo.gif.png: 256 bytes, which no common file
    system takes. It failed "File name too long" after the model had run on it; it fails before,
    saying why, and the other files are written."""
    from icmsr_cli.io import batch

    src = tmp_path / "in"
    src.mkdir()
    stem = "a" * 248
    for name in (f"{stem}.gif", f"{stem}.png", "b.png"):
        Image.fromarray(photo_like(16, 16, seed=len(name))).save(src / name)
    jobs, _ = batch.plan([str(src)], str(tmp_path / "out"))
    calls = []

    def upscale(picture):
        calls.append(picture)
        return picture

    results = {Path(r.job.name).name: r for r in batch.run(batch.Reader(jobs, batch.BatchSettings()), upscale)}
    failed = results[f"{stem}.gif"]
    assert failed.status == "failed"
    assert "is 256 bytes, over the 255 its file system allows" in failed.error
    assert results[f"{stem}.png"].status == results["b.png"].status == "done"
    assert len(calls) == 2
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(["b.png", f"{stem}.png"])
