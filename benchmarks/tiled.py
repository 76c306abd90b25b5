"""What tiling costs: the tiled graph against the untiled one, per stage, on the same image.

Issue 10 asks the tiled path to cost at most 1.3x the untiled one per pixel. Tiles pay for their
overlaps and for the context each VAE tile carries, so the script prints, per stage, the pixels
the tiles run through per pixel of the image (a property of the plan alone) next to the measured
time ratio: where the two agree, only smaller overlaps or larger tiles can lower the cost; where
the time ratio is higher, the tiled code itself is slow.

    python benchmarks/tiled.py [--device cpu|cuda] [--model full|tiny] [--sizes 1024x768] [--tiles 80,auto] [--batches 4,1]

Sizes are output sizes (the graph runs at the output size); `auto` is the tile `--tile auto` picks
for the image when it must tile (a call's batch of tiles fits a quarter of the free memory).
`--batches` compares tiles per model call: a batch fills a GPU at small tiles, but for the same
memory it means smaller tiles, which overlap more (on the CPU one per call measured faster).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _models import random_model  # noqa: E402

from icmsr_cli.model.devices import resolve_dtype  # noqa: E402
from icmsr_cli.model.graph import DECODER_PAD, ENCODER_PAD, VAE_FACTOR, unet_plan, vae_plan  # noqa: E402
from icmsr_cli.model.loading import load_pipeline  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def stage_times(pipe, x: torch.Tensor, tile: int | None, repeats: int) -> dict[str, float]:
    """Median seconds of each stage after one warm-up, whole (tile None) or tiled."""
    runs: dict[str, list[float]] = {"encode": [], "unet": [], "decode": []}
    for i in range(repeats + 1):
        sync(pipe.device)
        t0 = time.perf_counter()
        z = pipe.encode(x) if tile is None else pipe.encode_tiled(x, tile)
        sync(pipe.device)
        t1 = time.perf_counter()
        x0 = pipe.denoise(z) if tile is None else pipe.denoise_tiled(z, tile)
        sync(pipe.device)
        t2 = time.perf_counter()
        y = pipe.decode(x0) if tile is None else pipe.decode_tiled(x0, tile)
        sync(pipe.device)
        t3 = time.perf_counter()
        del z, x0, y
        if i:  # the first run warms caches and kernels up
            for name, seconds in zip(runs, (t1 - t0, t2 - t1, t3 - t2)):
                runs[name].append(seconds)
    return {name: statistics.median(v) for name, v in runs.items()}


def plan_pixels(h: int, w: int, tile: int) -> dict[str, float]:
    """Pixels each stage's tiles run through, per latent pixel of the image (1.0 = no redundancy)."""
    plans = {"vae": vae_plan(h, w, tile), "unet": unet_plan(h, w, tile)}
    out = {}
    for stage, tiles, pad in (("encode", plans["vae"], ENCODER_PAD // VAE_FACTOR), ("unet", plans["unet"], 0), ("decode", plans["vae"], DECODER_PAD)):
        total = 0
        for t in tiles:
            y0, y1, x0, x1 = t.padded(pad, h, w)
            total += (y1 - y0) * (x1 - x0)
        out[stage] = total / (h * w)
    out["tiles"] = (len(plans["vae"]), len(plans["unet"]))
    out["shape"] = (plans["vae"][0].core[1] - plans["vae"][0].core[0], plans["vae"][0].core[3] - plans["vae"][0].core[2])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default="full", choices=["full", "tiny"])
    ap.add_argument("--sizes", default="1024x768", help="output sizes, WxH, comma-separated, multiples of 8")
    ap.add_argument("--tiles", default="80,auto", help="latent tile sizes, comma-separated; auto: what --tile auto tiles with")
    ap.add_argument("--batches", help="tiles per model call to compare, comma-separated (default: the device's)")
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    device = torch.device(args.device)
    base, lora = random_model(args.model)
    pipe = load_pipeline(base, lora, device=device, dtype=resolve_dtype("auto", device))
    batches = [int(b) for b in args.batches.split(",")] if args.batches else [pipe.tile_batch]
    print(f"{device} {torch.cuda.get_device_name(device) if device.type == 'cuda' else ''} {args.model} model, "
          f"{str(pipe.dtype).removeprefix('torch.')}")
    torch.manual_seed(0)
    for size in args.sizes.split(","):
        w, h = (int(v) for v in size.split("x"))
        x = torch.rand(1, 3, h, w)
        whole = stage_times(pipe, x, None, args.repeats)
        total_whole = sum(whole.values())
        print(f"\n{w}x{h} whole: " + ", ".join(f"{k} {v:.2f} s" for k, v in whole.items()) + f"; total {total_whole:.2f} s")
        for batch in batches:
            pipe.tile_batch = batch
            for word in args.tiles.split(","):
                tile = pipe.largest_tile() if word == "auto" else int(word)  # auto's tile depends on the batch
                tiled = stage_times(pipe, x, tile, args.repeats)
                px = plan_pixels(h // VAE_FACTOR, w // VAE_FACTOR, tile)
                print(f"  tile {tile}, {batch} per call (tiles {px['tiles'][0]} VAE / {px['tiles'][1]} UNet, VAE tile "
                      f"{px['shape'][0]}x{px['shape'][1]}): total {sum(tiled.values()):.2f} s = {sum(tiled.values()) / total_whole:.2f}x whole")
                for stage in whole:
                    print(f"    {stage:6s} {tiled[stage]:7.2f} s = {tiled[stage] / whole[stage]:.2f}x whole; plan runs {px[stage]:.2f}x the pixels")

if __name__ == "__main__":
    main()
