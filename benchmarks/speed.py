"""Speed of the whole upscale on the full-size SD-2.1-base architecture (random weights, published
configs, a random full-size OSEDiff LoRA), against the reference graph in the same run.

Reports, per output size: median wall time of repeated runs after a warm-up (device-synchronised),
ms per 512x512-equivalent, achieved TFLOP/s (FLOPs counted with torch's FlopCounterMode) against
the measured matmul peak of this machine, and peak memory (CUDA: max allocated). Then the commands
as users run them, process start to file written.

On the CPU the reference ("baseline") is OSEDiff's graph in fp32 with glibc's default allocator;
"ours-default-malloc" shows what `reuse_freed_memory` (which the CLI turns on) is worth; the
end-to-end part compares `icmsr upscale` with the baseline script for a 512x512 output.
On CUDA there is no CPU baseline: the reference is OSEDiff's graph in fp16 on the same GPU, as its
test script runs it, against ours in the dtype `--dtype auto` picks; sizes go to 4096^2, and the
end-to-end part times a folder of 8 512^2 -> 2048^2 and one 1024^2 -> 4096^2 with defaults.

    python benchmarks/speed.py [--device cpu|cuda] [--sizes 512,768] [--repeats 3] [--model full|tiny]
"""

from __future__ import annotations

import argparse
import json
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

from icmsr_cli.model.devices import resolve_dtype  # noqa: E402
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
    ap.add_argument("--sizes", help="output sides; default 512,768 on the CPU, 512,1024,2048,4096 on CUDA")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--variants", help="default: baseline,ours-default-malloc,ours,ours-contiguous,ours-bf16 on the "
                                        "CPU; reference-fp16,ours,ours-channels-last on CUDA")
    ap.add_argument("--model", default="full", choices=["full", "tiny"], help="tiny: a quick check of the script itself")
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--e2e-only", action="store_true", help="only the end-to-end command comparison")
    args = ap.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    base, lora = random_model(args.model)
    if args.e2e_only:
        return end_to_end(base, lora, args.repeats, device)
    fast_dtype = resolve_dtype("auto", device)  # what the CLI runs: bf16 from sm 80 on, fp16 before; fp32 on the CPU
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
          + (f", {torch.cuda.get_device_name(device)}" if gpu else "") + f", model {args.model}")
    sizes = [int(s) for s in (args.sizes or ("512,1024,2048,4096" if gpu else "512,768")).split(",")]
    variants = (args.variants or ("reference-fp16,ours,ours-channels-last" if gpu else
                                  "baseline,ours-default-malloc,ours,ours-contiguous,ours-bf16")).split(",")
    # the roofs of the dtypes that run (fp16 matmuls on a CPU take minutes)
    used = {torch.float16 if v == "reference-fp16" else torch.bfloat16 if v == "ours-bf16" else
            torch.float32 if v == "baseline" else fast_dtype for v in variants}
    peaks = {dt: matmul_peak(device, dt) for dt in (torch.float32, torch.bfloat16, torch.float16) if dt in used}
    print("measured matmul peak: " + ", ".join(f"{_short(dt)} {tf:.2f} TFLOP/s" for dt, tf in peaks.items()))
    rows = []

    def inputs(size):
        return torch.from_numpy(np.random.default_rng(0).random((1, 3, size, size), dtype=np.float32))

    # the reference first: on the CPU it runs with glibc's default allocator, as a plain script would
    for name in [v for v in variants if v in ("baseline", "reference-fp16")]:
        dtype = torch.float16 if name == "reference-fp16" else torch.float32
        t0 = time.perf_counter()
        baseline = Baseline(str(base), str(lora), device, dtype)
        print(f"startup, {name} (load three models, add adapters): {time.perf_counter() - t0:.1f} s")
        for size in sizes:
            x = inputs(size)
            row = _timed_row(lambda: baseline(x), device, args.repeats, size, name, peaks[dtype])
            rows.append(row)
        baseline = None  # freed before ours loads (a del would leave the lambdas above a name they cannot see)
        _release(device)

    with tempfile.TemporaryDirectory() as cache:
        os.environ["ICMSR_CACHE_DIR"] = cache  # a cold merged-weights cache, then a warm one
        t0 = time.perf_counter()
        load_pipeline(base, lora, device=device, dtype=fast_dtype)
        _release(device)
        print(f"startup, ours, first load (from the base files: merge, write the merged-weights cache): {time.perf_counter() - t0:.1f} s")
        t0 = time.perf_counter()
        pipe = load_pipeline(base, lora, device=device, dtype=fast_dtype)
        print(f"startup, ours, later runs (merged weights mapped from the cache): {time.perf_counter() - t0:.1f} s")
        default_format = pipe.memory_format  # load_pipeline's choice for this device
        for name in [v for v in variants if v.startswith("ours")]:
            pipe.reuse_freed_memory = name != "ours-default-malloc"  # what the CLI does
            pipe.memory_format = {"ours-contiguous": torch.contiguous_format,
                                  "ours-channels-last": torch.channels_last}.get(name, default_format)
            dtype = torch.bfloat16 if name == "ours-bf16" else fast_dtype
            for m in (pipe.unet, pipe.vae):
                m.to(dtype=dtype, memory_format=pipe.memory_format)
            pipe.dtype = dtype
            for size in sizes:
                x = inputs(size)
                try:
                    rows.append(_timed_row(lambda: pipe(x, "adain", "auto"), device, args.repeats, size, name, peaks[dtype]))
                except Exception as exc:  # one size out of memory must not lose the table
                    print(f"{name} at {size}^2 failed: {str(exc).splitlines()[0][:160]}")
                _release(device)

    print()
    print("| output | variant | median s | ms per 512^2 | TFLOP | TFLOP/s | % of peak | peak mem (MB) | vs reference |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    ref_s = {r[0]: r[2] for r in rows if r[1] in ("baseline", "reference-fp16")}
    for size, name, seconds, flops, mem, peak in sorted(rows, key=lambda r: r[0]):
        ratio = f"{seconds / ref_s[size]:.2f}x" if size in ref_s else "-"
        print(f"| {size}^2 | {name} | {seconds:.3f} | {1000 * seconds / (size * size / 512**2):.1f} | {flops / 1e12:.2f} | "
              f"{flops / seconds / 1e12:.3f} | {100 * flops / seconds / 1e12 / peak:.0f}% | {mem:.0f} | {ratio} |")

    if not args.skip_e2e:
        end_to_end(base, lora, args.repeats, device)


def _short(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def _timed_row(fn, device, repeats, size, name, peak) -> tuple:
    seconds, flops, mem = timed(fn, device, repeats)
    # each row as soon as it is measured: a run cut short by a time limit keeps what it measured
    print(f"  {name} {size}^2: {seconds:.3f} s, {1000 * seconds / (size * size / 512**2):.1f} ms per 512^2, peak {mem:.0f} MB", flush=True)
    return size, name, seconds, flops, mem, peak


def _release(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _write_inputs(folder: str, side: int, count: int) -> None:
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(1)
    for i in range(count):
        Image.fromarray((rng.random((side, side, 3)) * 255).astype(np.uint8)).save(os.path.join(folder, f"in{i}.png"))


def end_to_end(base, lora, repeats: int, device: torch.device) -> None:
    """Wall time of the commands as users run them, process start to last file written."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "ICMSR_CACHE_DIR": os.path.join(tmp, "cache")}
        model = ["--base", str(base), "--lora", str(lora), "--overwrite", "--device", str(device)]

        def icmsr(src, out, *extra):
            return [sys.executable, "-m", "icmsr_cli", "upscale", src, "-o", out, *model, *extra]

        print()
        if device.type != "cuda":
            src = os.path.join(tmp, "one")
            _write_inputs(src, 128, 1)
            src = os.path.join(src, "in0.png")
            ours = icmsr(src, os.path.join(tmp, "a.png"), "-q")
            plain = [sys.executable, os.path.join(HERE, "baseline_upscale.py"), str(base), str(lora), src, os.path.join(tmp, "b.png")]
            t_first = e2e(ours, 1, env)  # merges, writes the merged-weights cache, computes the prompt embedding
            t_ours, t_plain = e2e(ours, repeats, env), e2e(plain, repeats, env)
            print(f"end to end, 512x512 output from a 128x128 PNG (median of {repeats}, process start to file written):")
            print(f"  icmsr upscale: {t_ours:.1f} s   baseline script: {t_plain:.1f} s   ratio: {t_ours / t_plain:.2f}")
            print(f"  icmsr upscale, very first run (empty icmsr cache): {t_first:.1f} s")
            return
        folder, big = os.path.join(tmp, "folder"), os.path.join(tmp, "big")
        _write_inputs(folder, 512, 8)
        _write_inputs(big, 1024, 1)
        t_first = e2e(icmsr(folder, os.path.join(tmp, "warm"), "-q"), 1, env)  # merge and cache, prompt embedding
        print(f"end to end on {torch.cuda.get_device_name(device)}, defaults (median of {repeats}, process start to last file):")
        print(f"  very first run (empty icmsr cache), folder of 8 512^2 -> 2048^2: {t_first:.2f} s")
        walls, per_file = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            proc = subprocess.run(icmsr(folder, os.path.join(tmp, "out"), "--json"), check=True, capture_output=True, env=env)
            walls.append(time.perf_counter() - t0)
            per_file += [json.loads(line)["seconds"] for line in proc.stdout.decode().splitlines() if line.startswith("{")]
        print(f"  folder of 8 512^2 -> 2048^2: {statistics.median(walls):.2f} s process wall; "
              f"per file median {statistics.median(per_file):.3f} s, max {max(per_file):.3f} s")
        t_big = e2e(icmsr(os.path.join(big, "in0.png"), os.path.join(tmp, "big.png"), "-q"), repeats, env)
        print(f"  one 1024^2 -> 4096^2: {t_big:.2f} s process wall")


if __name__ == "__main__":
    main()
