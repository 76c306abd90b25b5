"""LoRA checkpoints in the OSEDiff format: safe loading, conversion, and merging into base weights.

An OSEDiff `.pkl` is a `torch.save`d dict holding the LoRA ranks, the module names of each adapter,
and two peft-style state dicts (`{module}.lora_A.{adapter}.weight`, ...). The UNet state dict also
carries the trained `conv_in` (`conv_in.base_layer.weight/bias`), which replaces the base one.
The same content is stored as safetensors with the ranks and module lists in the metadata.
"""

from __future__ import annotations

import json
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError
from ..io import atomic

# peft's LoraConfig default at the time OSEDiff was trained; scaling = alpha / rank.
LORA_ALPHA = 8

UNET_MODULE_LISTS = ("unet_lora_encoder_modules", "unet_lora_decoder_modules", "unet_lora_others_modules")
VAE_MODULE_LISTS = ("vae_lora_encoder_modules",)
_SAFETENSORS_FORMAT = "icmsr-osediff-lora-1"
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<half>[AB])\.(?P<adapter>[^.]+)\.weight$")
_BASE_KEY = re.compile(r"^(?P<module>.+)\.base_layer\.(?P<param>weight|bias)$")


@dataclass(frozen=True)
class LoraCheckpoint:
    rank_unet: int
    rank_vae: int
    #: the checkpoint's module-name lists, keyed by the OSEDiff field name (kept for conversion)
    module_lists: dict[str, list[str]]
    state_dict_unet: dict[str, torch.Tensor]
    state_dict_vae: dict[str, torch.Tensor]


def load_lora_checkpoint(path: str | Path) -> LoraCheckpoint:
    """Read an OSEDiff `.pkl` (tensors and plain types only) or its safetensors conversion."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: " + ("a folder, not a LoRA checkpoint file" if path.is_dir() else "LoRA checkpoint not found"))
    if path.suffix == ".safetensors":
        return _load_safetensors(path)
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # weights_only refuses arbitrary objects: never fall back to a full unpickle.
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if found:
            raise CheckpointError(f"{path}: refused to load, it contains Python code or objects ({found[1]}), not only tensors") from exc
        raise CheckpointError(f"{path}: not a readable torch checkpoint") from exc
    except Exception as exc:  # torch raises RuntimeError, EOFError, KeyError... on non-checkpoints
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({type(exc).__name__}: {exc})") from exc
    return _from_dict(raw, path)


def _from_dict(raw: object, path: Path) -> LoraCheckpoint:
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: not an OSEDiff LoRA checkpoint (top level is {type(raw).__name__})")
    required = ("rank_unet", "rank_vae", "state_dict_unet", "state_dict_vae", *UNET_MODULE_LISTS, *VAE_MODULE_LISTS)
    missing = [k for k in required if k not in raw]
    if missing:
        raise CheckpointError(f"{path}: not an OSEDiff LoRA checkpoint (missing {', '.join(missing)})")
    return LoraCheckpoint(
        rank_unet=int(raw["rank_unet"]),
        rank_vae=int(raw["rank_vae"]),
        module_lists={k: [str(m) for m in raw[k]] for k in (*UNET_MODULE_LISTS, *VAE_MODULE_LISTS)},
        state_dict_unet=dict(raw["state_dict_unet"]),
        state_dict_vae=dict(raw["state_dict_vae"]),
    )


def _load_safetensors(path: Path) -> LoraCheckpoint:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != _SAFETENSORS_FORMAT:
                raise CheckpointError(f"{path}: not an icmsr LoRA safetensors file (metadata format is {meta.get('format')!r})")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except CheckpointError:
        raise
    except Exception as exc:  # safetensors raises its own SafetensorError and OSErrors
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc
    raw: dict[str, object] = {k: json.loads(meta[k]) for k in (*UNET_MODULE_LISTS, *VAE_MODULE_LISTS)}
    raw["rank_unet"], raw["rank_vae"] = int(meta["rank_unet"]), int(meta["rank_vae"])
    raw["state_dict_unet"] = {k[5:]: v for k, v in tensors.items() if k.startswith("unet.")}
    raw["state_dict_vae"] = {k[4:]: v for k, v in tensors.items() if k.startswith("vae.")}
    return _from_dict(raw, path)


def save_lora_safetensors(ckpt: LoraCheckpoint, path: str | Path) -> None:
    """Write the same tensors as safetensors; ranks and module lists go in the metadata.

    Written the one way icmsr writes files (io.atomic): safetensors' own save_file renames its
    temporary into place unsynced, leaves it behind when killed, and makes the file 0600."""
    from safetensors.torch import save

    tensors = {f"unet.{k}": v.contiguous() for k, v in ckpt.state_dict_unet.items()}
    tensors.update({f"vae.{k}": v.contiguous() for k, v in ckpt.state_dict_vae.items()})
    meta = {"format": _SAFETENSORS_FORMAT, "rank_unet": str(ckpt.rank_unet), "rank_vae": str(ckpt.rank_vae)}
    meta.update({k: json.dumps(v) for k, v in ckpt.module_lists.items()})
    atomic.write_bytes(save(tensors, metadata=meta), path)  # a LoRA is megabytes: one buffer is fine


def merged_weight(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float,
                  memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """W + scaling * B @ A for linear layers and convs (A has the layer's kernel, B is 1x1),
    computed in float32 at least in one addmm into a fresh buffer, returned in W's dtype.

    For a conv with `memory_format=torch.channels_last` the result is laid out channels-last straight
    away: W and A are read in (out, kh, kw, in) order, so no second pass converts the merged weight.
    """
    acc = torch.promote_types(weight.dtype, torch.float32)
    b2 = b.flatten(1).to(weight.device, acc)
    order = (0, 2, 3, 1) if weight.dim() == 4 and memory_format == torch.channels_last else tuple(range(weight.dim()))
    a2 = (a.permute(order) if a.dim() == len(order) else a).flatten(1).to(weight.device, acc)
    if b2.shape[0] * a2.shape[1] != weight.numel() or b2.shape[1] != a2.shape[0]:
        raise ValueError(f"LoRA of shape {tuple(b.shape)} @ {tuple(a.shape)} does not fit weight {tuple(weight.shape)}")
    laid_out = weight.permute(order)
    # our own buffer, so the addmm can run in place: the base weights are often mmap'd from safetensors
    merged = torch.empty(laid_out.shape, dtype=acc, device=weight.device).copy_(laid_out)
    merged.view(b2.shape[0], -1).addmm_(b2, a2, alpha=scaling)
    inverse = tuple(order.index(i) for i in range(len(order)))
    return merged.permute(inverse).to(weight.dtype)


def merge_lora(model: nn.Module, state_dict: dict[str, torch.Tensor], rank: int, *, what: str,
               memory_format: torch.memory_format = torch.contiguous_format) -> int:
    """Merge every LoRA pair of `state_dict` into `model`'s weights in place; return the pair count.

    `{m}.base_layer.{weight,bias}` entries replace `{m}`'s own parameters (OSEDiff's trained conv_in).
    Merging once at load means inference runs plain modules with no adapter overhead.
    """
    scaling = LORA_ALPHA / rank
    pairs: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    replaced: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        if m := _LORA_KEY.match(key):
            pairs.setdefault((m["module"], m["adapter"]), {})[m["half"]] = tensor
        elif m := _BASE_KEY.match(key):
            replaced.setdefault(m["module"], {})[m["param"]] = tensor
        else:
            raise CheckpointError(f"{what}: unexpected key {key!r} in the LoRA checkpoint")

    with torch.no_grad():
        for module_name, params in replaced.items():
            module = _submodule(model, module_name, what)
            for param_name, tensor in params.items():
                target = getattr(module, param_name)
                if target is None or target.shape != tensor.shape:
                    raise CheckpointError(f"{what}: checkpoint {module_name}.{param_name} does not fit the base model")
                target.copy_(tensor.to(target.dtype))
        for (module_name, adapter), halves in pairs.items():
            if set(halves) != {"A", "B"}:
                raise CheckpointError(f"{what}: {module_name} has lora_A or lora_B missing for adapter {adapter}")
            module = _submodule(model, module_name, what)
            if not isinstance(module, (nn.Linear, nn.Conv2d)):
                raise CheckpointError(f"{what}: {module_name} is a {type(module).__name__}, not a Linear or Conv2d")
            try:
                merged = merged_weight(module.weight, halves["A"], halves["B"], scaling, memory_format)
            except ValueError as exc:
                raise CheckpointError(f"{what}: {module_name}: {exc}") from exc
            module.weight = nn.Parameter(merged, requires_grad=False)
    return len(pairs)


def _submodule(model: nn.Module, name: str, what: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError as exc:
        raise CheckpointError(f"{what}: the base model has no module {name!r} named by the LoRA checkpoint") from exc
