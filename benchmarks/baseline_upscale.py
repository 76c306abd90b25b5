"""The straightforward implementation the speed benchmark compares against: the published
OSEDiff inference written plainly. peft adapters left unmerged, contiguous tensors, the text
encoder loaded and run for every image, one image at a time, no tiling. fp32 on the CPU; on a GPU
fp16, as OSEDiff's test script runs it (`--mixed_precision fp16`: UNet and VAE cast to fp16).

    python benchmarks/baseline_upscale.py BASE_DIR LORA.pkl IN.png OUT.png [--scale 4]
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))


class Baseline:
    def __init__(self, base: str, lora: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        from sd21_factory import add_osediff_adapters

        self.unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet").eval()
        self.vae = AutoencoderKL.from_pretrained(base, subfolder="vae").eval()
        self.tokenizer = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer")
        self.text_encoder = CLIPTextModel.from_pretrained(base, subfolder="text_encoder").eval()
        add_osediff_adapters(self.unet, self.vae, torch.load(lora, map_location="cpu", weights_only=True))
        self.device, self.dtype = torch.device(device), dtype
        self.unet.to(self.device, dtype)
        self.vae.to(self.device, dtype)
        self.text_encoder.to(self.device)
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
        self.a = float(torch.cumprod(1 - betas, 0)[999])

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        ids = self.tokenizer("", max_length=77, padding="max_length", truncation=True, return_tensors="pt").input_ids
        c = self.text_encoder(ids.to(self.device))[0].to(self.dtype)
        x = x.to(self.device, self.dtype)
        z = self.vae.encode(x * 2 - 1).latent_dist.mode() * 0.18215
        eps = self.unet(z, torch.tensor([999], device=self.device), encoder_hidden_states=c).sample
        x0 = (z - (1 - self.a) ** 0.5 * eps) / self.a**0.5
        y = (self.vae.decode(x0 / 0.18215).sample.clamp(-1, 1) * 0.5 + 0.5).float()
        x = x.float()  # the reference's colour fix runs on float32 tensors (torchvision's ToTensor)
        m, s = y.mean((2, 3), keepdim=True), (y.flatten(2).var(2)[..., None, None] + 1e-5).sqrt()
        xm, xs = x.mean((2, 3), keepdim=True), (x.flatten(2).var(2)[..., None, None] + 1e-5).sqrt()
        return ((y - m) / s * xs + xm).clamp(0, 1).cpu()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("base")
    ap.add_argument("lora")
    ap.add_argument("input")
    ap.add_argument("output")
    ap.add_argument("--scale", type=float, default=4)
    args = ap.parse_args()
    model = Baseline(args.base, args.lora)
    lr = Image.open(args.input).convert("RGB")
    w, h = round(lr.width * args.scale), round(lr.height * args.scale)
    x = torch.from_numpy(np.asarray(lr.resize((w, h), Image.BICUBIC), dtype=np.float32) / 255).permute(2, 0, 1)[None]
    y = model(x)
    Image.fromarray((y[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(args.output)


if __name__ == "__main__":
    main()
