from __future__ import annotations

import numpy as np
import pytest
import torch

from sd21_factory import make_osediff_checkpoint, write_base_model


@pytest.fixture(autouse=True)
def _isolated_user_dirs(tmp_path, monkeypatch):
    """Each test gets its own icmsr cache; nothing reads or writes the real user directories."""
    monkeypatch.setenv("ICMSR_CACHE_DIR", str(tmp_path / "icmsr-cache"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    """A random SD-2.1-base-layout model (narrow widths) in the published folder layout."""
    return write_base_model(tmp_path_factory.mktemp("sd21") / "base", seed=0)


@pytest.fixture(scope="session")
def tiny_ckpt(tiny_base):
    return make_osediff_checkpoint(tiny_base, rank=4, seed=1)


@pytest.fixture(scope="session")
def tiny_lora(tiny_ckpt, tmp_path_factory):
    path = tmp_path_factory.mktemp("lora") / "osediff.pkl"
    torch.save(tiny_ckpt, path)
    return path


def photo_like(w: int, h: int, seed: int = 0) -> np.ndarray:
    """A smooth colourful uint8 image with edges and mild noise (H x W x 3)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    r = 0.5 + 0.4 * np.sin(xx / 7.0 + yy / 11.0)
    g = 0.5 + 0.4 * np.cos(yy / 5.0) * (xx > w / 3)
    b = np.clip((xx + yy) / (w + h), 0, 1)
    img = np.stack([r, g, b], axis=2) + rng.normal(0, 0.03, (h, w, 3))
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)
