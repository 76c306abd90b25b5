"""PNG encoding time and size: icmsr's parallel writer (io/png.py) against Pillow and OpenCV;
then 16-bit RGB TIFF: icmsr's (io/tiff.py) against OpenCV's, the one writer that had it before.

    python benchmarks/encode.py [--size 2048] [--repeats 3]

Two 8-bit RGB images of --size^2: "photo", with a natural image's falling spectrum (smooth
areas, edges at every scale, a little sensor noise), and "noise", uniform random bytes, what a
random-weight model's output looks like to zlib (nothing to compress). Prints the best of
--repeats for each writer (ms) and the file size (MB); every file is decoded back and checked.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from icmsr_cli.io import png, tiff  # noqa: E402


def photo(size: int, seed: int = 0) -> np.ndarray:
    """Random phases under a 1/f^1.5 amplitude spectrum, channels sharing most of their structure:
    Pillow's level-6 PNG of it is ~55% of the raw bytes, as photographs' typically are."""
    rng = np.random.default_rng(seed)
    fy, fx = np.meshgrid(np.fft.fftfreq(size), np.fft.rfftfreq(size), indexing="ij")
    amplitude = np.maximum(np.hypot(fy, fx), 1.0 / size) ** -1.5
    shared = np.exp(2j * np.pi * rng.random(amplitude.shape))
    planes = []
    for _ in range(3):
        own = np.exp(2j * np.pi * rng.random(amplitude.shape))
        field = np.fft.irfft2(amplitude * (0.8 * shared + 0.2 * own), s=(size, size))
        planes.append((field - field.mean()) / (4 * field.std()) + 0.5)
    img = np.stack(planes, axis=2) + rng.normal(0, 0.005, (size, size, 3))
    return np.rint(np.clip(img, 0, 1) * 255).astype(np.uint8)


def writers(threads: int):
    one_thread = ThreadPoolExecutor(max_workers=1)

    def ours(img, level, pool=None):
        png.encoder_pool()  # the process's pool, made once
        saved, png._pool = png._pool, pool or png._pool
        try:
            return png.encode_png(img, level=level)
        finally:
            png._pool = saved

    def pillow(img, level):
        out = io.BytesIO()
        Image.fromarray(img).save(out, format="PNG", compress_level=level)
        return out.getvalue()

    def opencv(img, level):
        ok, buf = cv2.imencode(".png", np.ascontiguousarray(img[..., ::-1]), [cv2.IMWRITE_PNG_COMPRESSION, level])
        assert ok
        return buf.tobytes()

    return {"icmsr, 1 thread": lambda img, lv: ours(img, lv, one_thread), f"icmsr, {threads} threads": ours,
            "Pillow": pillow, "OpenCV": opencv}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--levels", default="1,6", help="zlib levels, comma-separated")
    args = parser.parse_args()
    threads = png.cpu_count()
    print(f"{args.size}^2 RGB, {threads} CPUs; best of {args.repeats}")
    print("| image | level | writer | ms | MB |")
    print("| --- | --- | --- | --- | --- |")
    images = {"photo": photo(args.size), "noise": np.random.default_rng(1).integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)}
    for name, img in images.items():
        for level in map(int, args.levels.split(",")):
            for writer, encode in writers(threads).items():
                best = float("inf")
                for _ in range(args.repeats):
                    t = time.perf_counter()
                    data = encode(img, level)
                    best = min(best, time.perf_counter() - t)
                back = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)[..., ::-1]
                assert np.array_equal(back, img), f"{writer} did not round-trip"
                print(f"| {name} | {level} | {writer} | {best * 1000:.0f} | {len(data) / 1e6:.2f} |", flush=True)
    print(f"\n16-bit RGB TIFF of the photo (x257), {threads} CPUs; best of {args.repeats}")
    print("| writer | ms | MB |")
    print("| --- | --- | --- |")
    deep = images["photo"].astype(np.uint16) * 257
    tiff_writers = {"icmsr (deflate level 1, predictor 2)": lambda img: tiff.encode_tiff16(img),
                    "OpenCV (its default, LZW)": lambda img: cv2.imencode(".tiff", np.ascontiguousarray(img[..., ::-1]))[1].tobytes()}
    for writer, encode in tiff_writers.items():
        best = float("inf")
        for _ in range(args.repeats):
            t = time.perf_counter()
            data = encode(deep)
            best = min(best, time.perf_counter() - t)
        back = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)[..., ::-1]
        assert np.array_equal(back, deep), f"{writer} did not round-trip"
        print(f"| {writer} | {best * 1000:.0f} | {len(data) / 1e6:.2f} |", flush=True)


if __name__ == "__main__":
    main()
