"""`icmsr eval`'s PSNR and SSIM against pyiqa's own code on the same files.

pyiqa needs torchvision, which has no CPU build here; its PSNR and SSIM modules need neither, so
they are imported from an unpacked wheel without the package's __init__:

    pip download --no-deps pyiqa==0.1.16 -d /tmp/pyiqa && unzip -q /tmp/pyiqa/*.whl -d /tmp/pyiqa/x
    python benchmarks/pyiqa_agreement.py /tmp/pyiqa/x [SR_DIR HR_DIR]

Without folders it writes photo-like pairs (8-bit and 16-bit PNGs, odd sizes). pyiqa reads files
as float32 RGB in [0, 1] (8-bit through Pillow; 16-bit here through OpenCV, / 65535).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import types

import cv2
import numpy as np
import torch


def import_pyiqa_metrics(root: str):
    """pyiqa's PSNR and SSIM classes from an unpacked wheel, skipping the package __init__s."""
    for name in ("pyiqa", "pyiqa.utils", "pyiqa.archs"):
        module = types.ModuleType(name)
        module.__path__ = [os.path.join(root, *name.split("."))]
        sys.modules[name] = module
    # matlab_utils imports scipy.special.factorial for a pyramid SSIM does not use
    scipy, special = types.ModuleType("scipy"), types.ModuleType("scipy.special")
    special.factorial = None
    sys.modules.setdefault("scipy", scipy)
    sys.modules.setdefault("scipy.special", special)
    sys.path.insert(0, root)
    from pyiqa.archs.psnr_arch import PSNR
    from pyiqa.archs.ssim_arch import SSIM

    return PSNR(test_y_channel=True, color_space="ycbcr"), SSIM(test_y_channel=True, color_space="ycbcr")


def load(path: str) -> torch.Tensor:
    a = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    top = 65535.0 if a.dtype == np.uint16 else 255.0
    return torch.from_numpy(np.ascontiguousarray(a[..., 2::-1]).astype(np.float32) / np.float32(top)).permute(2, 0, 1)[None]


def write_pairs(sr_dir: str, hr_dir: str) -> None:
    rng = np.random.default_rng(5)
    for i, (h, w, bits) in enumerate([(37, 53, 8), (128, 96, 8), (200, 311, 8), (45, 60, 16), (257, 190, 8)]):
        top = 2**bits - 1
        ref = cv2.GaussianBlur(rng.uniform(0, top, (h, w, 3)), (0, 0), 2.0)
        ref = np.clip((ref - ref.min()) / (ref.max() - ref.min()) * top, 0, top)
        sr = np.clip(cv2.GaussianBlur(ref, (0, 0), 0.8) + rng.normal(0, top / 40, ref.shape), 0, top)
        dtype = np.uint8 if bits == 8 else np.uint16
        cv2.imwrite(os.path.join(sr_dir, f"{i:04d}.png"), sr.round().astype(dtype))
        cv2.imwrite(os.path.join(hr_dir, f"{i:04d}.png"), ref.round().astype(dtype))


def main() -> None:
    if len(sys.argv) not in (2, 4) or sys.argv[1] in ("-h", "--help"):
        sys.exit(__doc__)
    psnr, ssim = import_pyiqa_metrics(sys.argv[1])
    with tempfile.TemporaryDirectory() as tmp:
        if len(sys.argv) == 4:
            sr_dir, hr_dir = sys.argv[2:]
        else:
            sr_dir, hr_dir = os.path.join(tmp, "sr"), os.path.join(tmp, "hr")
            os.makedirs(sr_dir), os.makedirs(hr_dir)
            write_pairs(sr_dir, hr_dir)
        proc = subprocess.run([sys.executable, "-m", "icmsr_cli", "eval", sr_dir, "--ref", hr_dir, "--json"],
                              capture_output=True, text=True)
        lines = [json.loads(line) for line in proc.stdout.splitlines()]
        worst = [0.0, 0.0]
        print("| pair | pyiqa PSNR | icmsr PSNR | pyiqa SSIM | icmsr SSIM |")
        print("| --- | --- | --- | --- | --- |")
        for line in lines[:-1]:
            x, y = load(line["sr"]), load(line["ref"])
            p, s = float(psnr(x, y)), float(ssim(x, y))
            worst = [max(worst[0], abs(p - line["psnr"])), max(worst[1], abs(s - line["ssim"]))]
            print(f"| {os.path.basename(line['sr'])} | {p:.6f} | {line['psnr']:.6f} | {s:.6f} | {line['ssim']:.6f} |")
        print(f"largest difference: PSNR {worst[0]:.1e} dB, SSIM {worst[1]:.1e} ({len(lines) - 1} pairs)")


if __name__ == "__main__":
    main()
