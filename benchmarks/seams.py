"""Seam measurement: tiled vs untiled output of a random-weight SD-2.1-layout model.

For each VAE stage, our tiling (shared GroupNorm statistics, context padding, blend windows) is
compared with a naive variant in which every tile normalises with its own statistics (what
diffusers' enable_tiling does), using the same tiles and windows. Reports PSNR against the
untiled result and the seam-band excess: mean |tiled - untiled| inside the blend bands divided
by the mean elsewhere (1.0 means no seam).

    python benchmarks/seams.py [--model tiny|full] [--size 768x512] [--tile 32]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from _models import random_model  # noqa: E402

from icmsr_cli.model.graph import DECODER_PAD, ENCODER_PAD, LATENT_SCALE, VAE_OVERLAP, UNET_OVERLAP, unet_plan, vae_plan  # noqa: E402
from icmsr_cli.model.loading import load_pipeline  # noqa: E402


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    peak = float(b.max() - b.min())
    mse = float(((a - b) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(peak**2 / mse)


def band_mask(tiles, shape) -> torch.Tensor:
    """Pixels covered by more than one tile: the blend bands."""
    count = torch.zeros(shape)
    for t in tiles:
        y0, y1, x0, x1 = t.core
        count[y0:y1, x0:x1] += 1
    return count > 1


def seam_excess(a: torch.Tensor, b: torch.Tensor, band: torch.Tensor) -> float:
    diff = (a - b).abs().mean(dim=(0, 1))
    return float(diff[band].mean() / diff[~band].mean())


def naive(fn, x, in_tiles, out_tiles, pad, out_shape):
    """Each padded tile through the module on its own (own GroupNorm statistics), same windows."""
    out = torch.zeros(out_shape)
    norm = torch.zeros(out_shape[-2:])
    h, w = x.shape[-2:]
    scale = out_tiles[-1].core[1] / in_tiles[-1].core[1]
    for ti, to in zip(in_tiles, out_tiles):
        y0, y1, x0, x1 = ti.padded(pad, h, w)
        part = fn(x[:, :, y0:y1, x0:x1]).float()
        cy0, cy1, cx0, cx1 = to.core
        oy, ox = round(y0 * scale), round(x0 * scale)
        out[:, :, cy0:cy1, cx0:cx1] += part[:, :, cy0 - oy : cy1 - oy, cx0 - ox : cx1 - ox] * to.weight.float()
        norm[cy0:cy1, cx0:cx1] += to.weight.float()
    return out / norm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny", choices=["tiny", "full"])
    ap.add_argument("--size", default="768x512", help="image WxH, multiples of 8")
    ap.add_argument("--tile", type=int, default=32, help="latent tile size")
    args = ap.parse_args()
    w, h = map(int, args.size.split("x"))
    base, lora = random_model(args.model)
    pipe = load_pipeline(base, lora, device=torch.device("cpu"), dtype=torch.float32)
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    from conftest import photo_like

    x = torch.from_numpy(photo_like(w, h, seed=7).astype(np.float32) / 255).permute(2, 0, 1)[None]
    hl, wl, t = h // 8, w // 8, args.tile
    vo = t // VAE_OVERLAP
    rows = []
    t0 = time.perf_counter()
    with torch.no_grad():
        # encoder: latents compared in latent space
        z = pipe.encode(x)
        z_ours = pipe.encode_tiled(x, t)
        enc = lambda crop: pipe.vae.encode(crop * 2 - 1) * LATENT_SCALE
        z_naive = naive(enc, x, vae_plan(hl, wl, t, unit=8), vae_plan(hl, wl, t), ENCODER_PAD, z.shape)
        band = band_mask(vae_plan(hl, wl, t), (hl, wl))
        rows.append(("VAE encoder", z_ours, z_naive, z, band))
        # decoder: from the untiled x0, images compared in [0, 1]
        x0 = pipe.denoise(z)
        y = pipe.decode(x0)
        y_ours = pipe.decode_tiled(x0, t)
        dec = lambda crop: pipe.vae.decode(crop / LATENT_SCALE).clamp(-1, 1) * 0.5 + 0.5
        y_naive = naive(dec, x0, vae_plan(hl, wl, t), vae_plan(hl, wl, t, unit=8), DECODER_PAD, y.shape)
        band = band_mask(vae_plan(hl, wl, t, unit=8), (h, w))
        rows.append(("VAE decoder", y_ours, y_naive, y, band))
        # UNet: x0 from blended eps (the UNet's own GroupNorms stay per tile in both variants)
        x0_tiled = pipe.denoise_tiled(z, t)
        band = band_mask(unet_plan(hl, wl, t), (hl, wl))
        rows.append(("UNet (eps blended)", x0_tiled, None, x0, band))
        # end to end, all three stages tiled
        full = pipe(x, "adain", None)
        tiled = pipe(x, "adain", t)
        rows.append(("end to end", tiled, None, full, band_mask(vae_plan(hl, wl, t, unit=8), (h, w))))
    print(f"model={args.model} size={w}x{h} tile={t} latent px (VAE overlap {vo}, UNet overlap {t // UNET_OVERLAP}); "
          f"encoder pad {ENCODER_PAD} px, decoder pad {DECODER_PAD} latent px; {time.perf_counter() - t0:.0f} s")
    print("| stage | ours PSNR (dB) | ours seam excess | naive PSNR (dB) | naive seam excess |")
    print("| --- | --- | --- | --- | --- |")
    for name, ours, nv, ref, band in rows:
        cells = [f"{psnr(ours, ref):.1f}", f"{seam_excess(ours, ref, band):.2f}"]
        cells += [f"{psnr(nv, ref):.1f}", f"{seam_excess(nv, ref, band):.2f}"] if nv is not None else ["-", "-"]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
