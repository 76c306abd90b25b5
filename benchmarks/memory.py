"""Peak memory against output size, with tiling on.

Each size runs in a fresh process set up as the CLI sets itself up (freed memory reused for
images run whole, merged weights mapped from the cache): load a random-weight SD-2.1-layout
model, upscale a random photo-like image by 4 to the output size, and report peak RSS (CPU) or
peak CUDA memory, next to the resident size after loading and the size of the output image's
float buffers.

    python benchmarks/memory.py [--model tiny|full] [--device cpu|cuda] [--tile auto|N] [--sizes 1024,2048,4096]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def rss_now() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def child(model: str, device: str, tile: str, size: int) -> dict:
    import numpy as np
    import torch

    sys.path.insert(0, HERE)
    from _models import random_model

    from icmsr_cli.io.images import Picture
    from icmsr_cli.model.devices import resolve_dtype
    from icmsr_cli.model.loading import load_pipeline
    from icmsr_cli.upscaler import UpscaleOptions, upscale_picture

    base, lora = random_model(model)
    dev = torch.device(device)
    tiles = []
    pipe = load_pipeline(base, lora, device=dev, dtype=resolve_dtype("auto", dev),  # as the CLI picks
                         reuse_freed_memory=True,  # as the CLI runs (it applies to images run whole)
                         progress=lambda stage, done, total: tiles.append((stage, total)))
    loaded_rss = rss_now()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        loaded_cuda = torch.cuda.memory_allocated(dev)
    rng = np.random.default_rng(0)
    lr = size // 4
    picture = Picture(rng.random((lr, lr, 3)).astype(np.float32))
    t0 = time.perf_counter()
    out = upscale_picture(pipe, picture, UpscaleOptions(scale=4, tile=None if tile == "off" else (tile if tile == "auto" else int(tile))))
    seconds = time.perf_counter() - t0
    assert out.pixels.shape == (size, size, 3)
    result = {
        "size": size,
        "seconds": round(seconds, 1),
        "loaded_rss_mb": loaded_rss / 2**20,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "image_buffer_mb": size * size * 3 * 4 / 2**20,
        "tiles": {stage: total for stage, total in tiles},
    }
    if dev.type == "cuda":
        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
        result["loaded_cuda_mb"] = loaded_cuda / 2**20
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny", choices=["tiny", "full"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tile", default="auto")
    ap.add_argument("--sizes", default="1024,2048,4096")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.model, args.device, args.tile, args.child)))
        return
    print(f"model={args.model} device={args.device} tile={args.tile}")
    print("| output | seconds | RSS after load (MB) | peak RSS (MB) | peak - load (MB) | output float buffer (MB) | peak CUDA (MB) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for size in map(int, args.sizes.split(",")):
        cmd = [sys.executable, __file__, "--model", args.model, "--device", args.device, "--tile", args.tile, "--child", str(size)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["killed"])[-1]
            print(f"| {size}^2 | failed: {tail[:120]} | | | | | |")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        cuda = f"{r['peak_cuda_mb']:.0f}" if "peak_cuda_mb" in r else "-"
        print(f"| {size}^2 | {r['seconds']} | {r['loaded_rss_mb']:.0f} | {r['peak_rss_mb']:.0f} | "
              f"{r['peak_rss_mb'] - r['loaded_rss_mb']:.0f} | {r['image_buffer_mb']:.0f} | {cuda} |", flush=True)


if __name__ == "__main__":
    main()
