"""The VAE's two hot spots on a GPU, each route side by side: GroupNorm(+SiLU) eager against the
fused Triton kernels (model/norms.py), and the mid-block attention through SDPA against query
blocks (model/attention.py), at the shapes a 512^2 .. 4096^2 output gives the decoder.

GroupNorm runs in both memory layouts, contiguous and channels-last, as the fused kernels take
either: which layout the pipeline runs on CUDA (devices.memory_format_for) is measured whole by
`speed.py` (variants ours and ours-channels-last); this shows the norms' share of it.

Prints ms per call (median of --repeats after a warm-up, device-synchronised), the effective
memory bandwidth or TFLOP/s, and each fused route's largest difference from eager. The routes the
pipeline takes on CUDA are chosen on these numbers; run this on each new kind of GPU.

    python benchmarks/kernels.py [--device cuda] [--dtype bf16] [--repeats 20]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from icmsr_cli.model import attention, norms
from icmsr_cli.model.devices import resolve_dtype


def timed(fn, device: torch.device, repeats: int) -> float:
    fn()
    torch.cuda.synchronize(device) if device.type == "cuda" else None
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize(device) if device.type == "cuda" else None
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="auto", help="bf16 | fp16 | fp32 | auto (as the CLI picks)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--outputs", default="512,1024,2048,4096", help="output sides whose decoder shapes are measured")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{name}, {str(dtype).removeprefix('torch.')}, torch {torch.__version__}; fused GroupNorm available: {norms.fused_available(device)}")

    print("\nGroupNorm(32 groups) + SiLU, decoder then UNet shapes (batch 1), in both memory layouts:")
    print(f"{'shape':>22} {'layout':>8} {'eager ms':>9} {'GB/s':>7} {'fused ms':>9} {'GB/s':>7} {'speed-up':>8} {'max diff':>9}")
    for side in (int(s) for s in args.outputs.split(",")):
        # the decoder's levels, then the UNet's (latent resolution; 2560 and 1920: its up blocks' concatenations)
        for channels, res in ((512, side // 8), (512, side // 4), (256, side // 2), (128, side),
                              (320, side // 8), (640, side // 16), (1920, side // 32), (2560, side // 64)):
            eager = nn.GroupNorm(32, channels).to(device, dtype)
            with torch.no_grad():
                eager.weight.normal_(1, 0.2), eager.bias.normal_(0, 0.2)
            fused = norms.FusedGroupNorm.replacing(eager, act=True)
            for layout, fmt in (("NCHW", torch.contiguous_format), ("NHWC", torch.channels_last)):
                x = torch.randn(1, channels, res, res, device=device, dtype=dtype).contiguous(memory_format=fmt)
                gb = x.numel() * x.element_size() * 3 / 1e9  # read for statistics, read + write to normalise (eager's SiLU adds two more)
                with torch.no_grad():
                    t_eager = timed(lambda: F.silu(eager(x), inplace=True), device, args.repeats)
                    t_fused = timed(lambda: fused(x), device, args.repeats) if norms.fused_available(device) else float("nan")
                    diff = float((fused(x).float() - F.silu(eager(x)).float()).abs().max())
                print(f"{str(tuple(x.shape)):>22} {layout:>8} {t_eager:9.2f} {gb / t_eager * 1e3:7.0f} {t_fused:9.2f} "
                      f"{gb / t_fused * 1e3:7.0f} {t_eager / t_fused:7.2f}x {diff:9.2e}")
                x = None  # freed before the next shape's allocation

    print("\nVAE mid-block attention, one head of 512 (batch 1):")
    print(f"{'tokens':>8} {'SDPA ms':>9} {'TFLOP/s':>8} {'blocks ms':>10} {'TFLOP/s':>8} {'speed-up':>8} {'max diff':>9}")
    for side in (int(s) for s in args.outputs.split(",")):
        n = (side // 8) ** 2
        q, k, v = (torch.randn(1, 1, n, 512, device=device, dtype=dtype) for _ in range(3))
        flop = 4 * n * n * 512
        scale = 512**-0.5
        with torch.no_grad():
            t_sdpa = timed(lambda: F.scaled_dot_product_attention(q, k, v, scale=scale), device, max(3, args.repeats // 4))
            t_blocks = timed(lambda: attention.chunked_attention(q, k, v, scale=scale), device, max(3, args.repeats // 4))
            diff = float((attention.chunked_attention(q, k, v, scale=scale).float() - F.scaled_dot_product_attention(q, k, v, scale=scale).float()).abs().max())
        route = "blocks" if attention._chunked_pays(q) else "SDPA"
        print(f"{n:8d} {t_sdpa:9.2f} {flop / t_sdpa / 1e9:8.1f} {t_blocks:10.2f} {flop / t_blocks / 1e9:8.1f} {t_sdpa / t_blocks:7.2f}x {diff:9.2e}  (pipeline: {route})")
        q = k = v = None  # freed before the next size's allocation
    return 0


if __name__ == "__main__":
    sys.exit(main())
