"""Random-weight SD-2.1-layout models for the benchmark scripts (built once into a cache folder)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from sd21_factory import make_osediff_checkpoint, write_base_model  # noqa: E402

# benchmark runs keep their prompt embeddings and merged weights beside their models, not in the
# user's cache (unless ICMSR_CACHE_DIR says otherwise)
os.environ.setdefault("ICMSR_CACHE_DIR", str(ROOT / "benchmarks" / ".models" / "icmsr-cache"))


def random_model(kind: str, cache: Path = ROOT / "benchmarks" / ".models") -> tuple[Path, Path]:
    """(base folder, LoRA .pkl) for kind "tiny" (narrow widths) or "full" (the real SD-2.1-base configs)."""
    folder = cache / kind
    base, lora = folder / "base", folder / "osediff.pkl"
    if not lora.is_file():
        write_base_model(base, full=(kind == "full"), seed=0)
        torch.save(make_osediff_checkpoint(base, rank=4, seed=1), lora)
    return base, lora
