"""Speed of the whole upscale on the full-size SD-2.1-base architecture (random weights, published
configs, a random full-size OSEDiff LoRA), against a straightforward baseline in the same run.

Reports, per output size: median wall time of repeated runs after a warm-up (device-synchronised),
ms per 512x512-equivalent, achieved TFLOP/s (FLOPs counted with torch's FlopCounterMode) against
the measured matmul peak of this machine, and peak memory. Then startup (command to first tile),
cold and with the merged-weights cache, and the end-to-end wall time of `icmsr upscale` for a
512x512 output against the baseline script. The baseline runs first, with glibc's default
allocator; "ours-default-malloc" shows what `reuse_freed_memory` (which the CLI turns on) is worth.

    python benchmarks/speed.py [--device cpu|cuda] [--sizes 512,768] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _models import random_model  # noqa: E402
from baseline_upscale import Baseline  # noqa: E402

from icmsr_cli.model.loading import load_pipeline  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    """Measured TFLOP/s of a large square matmul, best of several trials (a single timing on a shared
    machine can land on a slow moment): the roof the pipeline is compared with."""
    n = 4096 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    reps = 20 if device.type == "cuda" else 3
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 * reps / best / 1e12


def timed(fn, device, repeats: int) -> tuple[float, float, float]:
    """(median seconds, FLOPs of one call, peak MB during the timed calls) after a counted warm-up run."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    times = []
    with PeakMemory(device) as peak:
        for _ in range(repeats):
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - t0)
    return statistics.median(times), counter.get_total_flops(), peak.mb


class PeakMemory:
    """Peak CUDA memory allocated, or peak resident set size sampled every 10 ms (the process-wide
    ru_maxrss would carry one variant's peak into the next)."""

    def __init__(self, device: torch.device):
        self.device, self.mb, self._stop = device, 0.0, threading.Event()

    def _sample(self) -> None:
        page = os.sysconf("SC_PAGE_SIZE")
        while not self._stop.wait(0.01):
            with open("/proc/self/statm") as f:
                self.mb = max(self.mb, int(f.read().split()[1]) * page / 2**20)

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self._stop.set()
            self._thread.join()


def e2e(cmd: list[str], repeats: int, env: dict) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, env=env)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sizes", default="512,768")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--variants", default="baseline,ours-default-malloc,ours,ours-contiguous,ours-bf16")
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
    sizes = [int(s) for s in args.sizes.split(",")]
    variants = args.variants.split(",")
    rows = []

    def inputs(size):
        return torch.from_numpy(np.random.default_rng(0).random((1, 3, size, size), dtype=np.float32))

    # the baseline first: it runs with glibc's default allocator, as a plain script would
    if "baseline" in variants:
        t0 = time.perf_counter()
        baseline = Baseline(str(base), str(lora))
        print(f"startup, baseline (load three models, add adapters): {time.perf_counter() - t0:.1f} s")
        for size in sizes:
            x = inputs(size)
            seconds, flops, mem = timed(lambda: baseline(x), torch.device("cpu"), args.repeats)
            rows.append((size, "baseline", seconds, flops, mem, peak32, size * size / 512**2))
        del baseline

    with tempfile.TemporaryDirectory() as cache:
        os.environ["ICMSR_CACHE_DIR"] = cache  # a cold merged-weights cache, then a warm one
        t0 = time.perf_counter()
        load_pipeline(base, lora, device=device, dtype=fast_dtype)
        print(f"startup, ours, first load (from the base files: merge, write the merged-weights cache; diffusers already imported): {time.perf_counter() - t0:.1f} s")
        t0 = time.perf_counter()
        pipe = load_pipeline(base, lora, device=device, dtype=fast_dtype)
        print(f"startup, ours, later runs (merged weights mapped from the cache): {time.perf_counter() - t0:.1f} s")
        for name in [v for v in variants if v != "baseline"]:
            pipe.reuse_freed_memory = name != "ours-default-malloc"  # what the CLI does
            pipe.memory_format = torch.contiguous_format if name == "ours-contiguous" else torch.channels_last
            dtype = torch.bfloat16 if name == "ours-bf16" else fast_dtype
            for m in (pipe.unet, pipe.vae):
                m.to(dtype=dtype, memory_format=pipe.memory_format)
            pipe.dtype = dtype
            for size in sizes:
                x = inputs(size)
                seconds, flops, mem = timed(lambda: pipe(x, "adain", "auto"), device, args.repeats)
                rows.append((size, name, seconds, flops, mem, peak16 if dtype != torch.float32 else peak32, size * size / 512**2))

    print()
    print("| output | variant | median s | ms per 512^2 | TFLOP | TFLOP/s | % of peak | peak mem (MB) | vs baseline |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    base_s = {r[0]: r[2] for r in rows if r[1] == "baseline"}
    for size, name, seconds, flops, mem, peak, equiv in sorted(rows, key=lambda r: r[0]):
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
        env = {**os.environ, "ICMSR_CACHE_DIR": os.path.join(tmp, "cache")}
        ours = [sys.executable, "-m", "icmsr_cli", "upscale", src, "-o", os.path.join(tmp, "a.png"), "--base", str(base),
                "--lora", str(lora), "--overwrite", "-q"]
        plain = [sys.executable, os.path.join(HERE, "baseline_upscale.py"), str(base), str(lora), src, os.path.join(tmp, "b.png")]
        t_first = e2e(ours, 1, env)  # merges, writes the merged-weights cache, computes the prompt embedding
        t_ours, t_plain = e2e(ours, repeats, env), e2e(plain, repeats, env)
    print()
    print(f"end to end, 512x512 output from a 128x128 PNG (median of {repeats}, process start to file written):")
    print(f"  icmsr upscale: {t_ours:.1f} s   baseline script: {t_plain:.1f} s   ratio: {t_ours / t_plain:.2f}")
    print(f"  icmsr upscale, very first run (empty icmsr cache): {t_first:.1f} s")


if __name__ == "__main__":
    main()
