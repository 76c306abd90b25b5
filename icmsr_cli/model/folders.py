"""A model folder as diffusers saves one (`config.json` and `diffusion_pytorch_model[.variant].safetensors`
or `.bin`), read without diffusers: the config checked against the layout icmsr implements, the
weights as a state dict with diffusers' names.

Why not diffusers at run time: importing it to reach two model classes took 4.5 s on the 2-core CPU
(every autoencoder and transformer it ships, torch._dynamo, transformers, peft), against 2.1 s for
torch itself, on every run. unet.py and vae.py hold the two networks SD-2.1-base needs.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import torch
from torch import nn

from ..errors import ModelNotFoundError, SetupError

WEIGHTS_STEM = "diffusion_pytorch_model"

# VAE attention blocks saved before diffusers 0.14 named their projections so; diffusers renames them on load
_OLD_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def read_json(path: Path) -> dict:
    """A model folder's JSON file (a config), or ModelNotFoundError naming it."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(f"{path}: unreadable ({exc})") from exc


def read_config(folder: Path) -> dict:
    return read_json(Path(folder) / "config.json")


def check_config(config: dict, what: str, required: dict) -> None:
    """Refuse a config that asks for a layout other than the one implemented: each key of
    `required` must be absent (diffusers' default, which is the value given) or equal to it."""
    for key, value in required.items():
        got = config.get(key, value)
        if isinstance(value, (list, tuple)) and isinstance(got, (list, tuple)):
            got, value = list(got), list(value)
        if got != value:
            raise SetupError(f"{what}: {key}={got!r} is not supported (icmsr runs SD-2.1-base's layout, {key}={value!r})")


def weights_file(folder: Path, variant: str | None) -> Path:
    stem = f"{WEIGHTS_STEM}.{variant}" if variant else WEIGHTS_STEM
    for suffix in (".safetensors", ".bin"):
        if (path := Path(folder) / f"{stem}{suffix}").is_file():
            return path
    raise ModelNotFoundError(f"{folder}: no {stem}.safetensors or {stem}.bin")


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        # mapped when it is a zip archive (torch >= 1.6); older .bin files are the legacy format, read whole
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file, in the file's own words
        # a download's copy is not the user's to mend by hand: say how to get a good one
        cached = "snapshots" in path.parts and any(part.startswith("models--") for part in path.parts)
        hint = "; `icmsr weights verify` removes a damaged download and `icmsr weights download` fetches it again" if cached else ""
        raise ModelNotFoundError(f"{path}: unreadable weights ({exc}){hint}") from exc


def load_into(module: nn.Module, folder: Path, *, dtype: torch.dtype | None, variant: str | None) -> nn.Module:
    """Fill a module built on the meta device from the folder's weights, cast to `dtype`."""
    path = weights_file(folder, variant)
    state = _renamed(read_weights(path))
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    try:
        missing, unexpected = module.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as exc:  # shapes that differ from the config's
        first = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), str(exc).splitlines()[0])
        raise SetupError(f"{path}: does not fit the model its config describes ({first})") from exc
    if missing or unexpected:
        names = ", ".join((missing or unexpected)[:3])
        raise SetupError(f"{path}: does not fit the model its config describes ({'missing' if missing else 'unexpected'}: {names})")
    return module


def _renamed(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        head, _, tail = key.rpartition(".")  # tail: weight or bias
        prefix, _, name = head.rpartition(".")
        if "attentions" in prefix and name in _OLD_ATTENTION_NAMES:
            key = f"{prefix}.{_OLD_ATTENTION_NAMES[name]}.{tail}"
        out[key] = value
    return out


class FromFolder:
    """`from_config(config)` and `from_pretrained(folder)` for the two networks, the calls
    loading.py and weight_cache.py make."""

    @classmethod
    def load_config(cls, folder: Path) -> dict:
        return read_config(folder)

    @classmethod
    def from_config(cls, config: dict, folder: Path | None = None):
        try:
            return cls(config)
        except (KeyError, TypeError, ValueError, IndexError) as exc:  # a field missing or of the wrong kind
            where = f"{folder / 'config.json'}" if folder else f"{cls.__name__} config"
            raise SetupError(f"{where}: not a usable {cls.__name__} config ({type(exc).__name__}: {exc})") from None

    @classmethod
    def from_pretrained(cls, folder: Path, *, torch_dtype: torch.dtype | None = None, variant: str | None = None):
        folder = Path(folder)
        config = read_config(folder)
        with torch.device("meta"):  # no memory for weights the file is about to provide
            module = cls.from_config(config, folder)
        return load_into(module, folder, dtype=torch_dtype, variant=variant)
