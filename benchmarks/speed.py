"""Speed of the whole upscale on the full-size SD-2.1-base architecture (random weights, published
configs, a random full-size OSEDiff LoRA), against a straightforward baseline in the same run.

Reports, per output size: median wall time of repeated runs after a warm-up (device-synchronised),
ms per 512x512-equivalent, achieved TFLOP/s (FLOPs counted with torch's FlopCounterMode) against
the measured matmul peak of this machine, and peak memory. Then startup (command to first tile)
and the end-to-end wall time of `icmsr upscale` for a 512x512 output against the baseline script.

    python benchmarks/speed.py [--device cpu|cuda] [--sizes 512,768] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _models import random_model  # noqa: E402
from baseline_upscale import Baseline  # noqa: E402

from icmsr_cli.pipeline import load_pipeline  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    """Measured TFLOP/s of a large square matmul: the roof the pipeline is compared with."""
    n = 4096 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    reps = 20 if device.type == "cuda" else 5
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


def timed(fn, device, repeats: int) -> tuple[float, float]:
    """(median seconds, FLOPs of one call) with a counted warm-up run."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), counter.get_total_flops()


def peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def e2e(cmd: list[str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sizes", default="512,768")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--variants", default="ours,ours-contiguous,ours-bf16,baseline")
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--e2e-only", action="store_true", help="only the end-to-end command comparison")
    args = ap.parse_args()
    device = torch.device(args.device)
    base, lora = random_model("full")
    if args.e2e_only:
        return end_to_end(base, lora, args.repeats)
    fast_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
          + (f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""))
    peak32 = matmul_peak(device, torch.float32)
    peak16 = matmul_peak(device, torch.bfloat16)
    print(f"measured matmul peak: fp32 {peak32:.2f} TFLOP/s, bf16 {peak16:.2f} TFLOP/s")

    t0 = time.perf_counter()
    pipe = load_pipeline(base, lora, device=device, dtype=fast_dtype)
    print(f"startup, ours (load, merge, cached embedding): {time.perf_counter() - t0:.1f} s")
    rows = []
    variants = args.variants.split(",")
    for size in map(int, args.sizes.split(",")):
        x = torch.from_numpy(np.random.default_rng(0).random((1, 3, size, size), dtype=np.float32))
        equiv = size * size / 512**2
        for name in variants:
            if name == "baseline":
                continue
            pipe.memory_format = torch.contiguous_format if name == "ours-contiguous" else torch.channels_last
            for m in (pipe.unet, pipe.vae):
                m.to(memory_format=pipe.memory_format)
            dtype = torch.bfloat16 if name == "ours-bf16" else fast_dtype
            if dtype != pipe.dtype:
                pipe.unet.to(dtype), pipe.vae.to(dtype)
                pipe.dtype = dtype
            seconds, flops = timed(lambda: pipe(x, "adain", "auto"), device, args.repeats)
            rows.append((size, name, seconds, flops, peak_mb(device), peak16 if dtype != torch.float32 else peak32, equiv))
        pipe.unet.to(fast_dtype), pipe.vae.to(fast_dtype)
        pipe.dtype = fast_dtype
    pipe.memory_format = torch.channels_last
    del pipe
    if "baseline" in variants:
        t0 = time.perf_counter()
        baseline = Baseline(str(base), str(lora))
        print(f"startup, baseline (load three models, add adapters): {time.perf_counter() - t0:.1f} s")
        for size in map(int, args.sizes.split(",")):
            x = torch.from_numpy(np.random.default_rng(0).random((1, 3, size, size), dtype=np.float32))
            seconds, flops = timed(lambda: baseline(x), torch.device("cpu"), args.repeats)
            rows.append((size, "baseline", seconds, flops, peak_mb(torch.device("cpu")), peak32, size * size / 512**2))
        del baseline

    print()
    print("| output | variant | median s | ms per 512^2 | TFLOP | TFLOP/s | % of peak | peak mem (MB) | vs baseline |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    base_s = {r[0]: r[2] for r in rows if r[1] == "baseline"}
    for size, name, seconds, flops, mem, peak, equiv in sorted(rows, key=lambda r: (r[0], r[1])):
        ratio = f"{seconds / base_s[size]:.2f}x" if size in base_s else "-"
        print(f"| {size}^2 | {name} | {seconds:.2f} | {1000 * seconds / equiv:.0f} | {flops / 1e12:.2f} | "
              f"{flops / seconds / 1e12:.3f} | {100 * flops / seconds / 1e12 / peak:.0f}% | {mem:.0f} | {ratio} |")

    if not args.skip_e2e and device.type == "cpu":
        end_to_end(base, lora, args.repeats)


def end_to_end(base, lora, repeats: int) -> None:
    """Wall time of the two commands, process start to file written, for a 512x512 output."""
    with tempfile.TemporaryDirectory() as tmp:
        from PIL import Image

        src = os.path.join(tmp, "in.png")
        Image.fromarray((np.random.default_rng(1).random((128, 128, 3)) * 255).astype(np.uint8)).save(src)
        ours = [sys.executable, "-m", "icmsr_cli", "upscale", src, "-o", os.path.join(tmp, "a.png"), "--base", str(base),
                "--lora", str(lora), "--overwrite", "-q"]
        plain = [sys.executable, os.path.join(HERE, "baseline_upscale.py"), str(base), str(lora), src, os.path.join(tmp, "b.png")]
        subprocess.run(ours, check=True, capture_output=True)  # fills the prompt-embedding cache, as any earlier run would
        t_ours, t_plain = e2e(ours, repeats), e2e(plain, repeats)
    print()
    print(f"end to end, 512x512 output from a 128x128 PNG (median of {repeats}, process start to file written):")
    print(f"  icmsr upscale: {t_ours:.1f} s   baseline script: {t_plain:.1f} s   ratio: {t_ours / t_plain:.2f}")


if __name__ == "__main__":
    main()
